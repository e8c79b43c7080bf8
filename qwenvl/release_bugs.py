"""What some transformers releases cannot run at all for a family, patched or not, each with the bug named: the
``release_bugs`` of a ``FamilySpec`` (``qwenvl.families``) are built from these, and an input a release cannot run is
refused with ``UpstreamLimit`` (the harness and the data path) instead of crashing deep inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReleaseBug", "UpstreamLimit", "glm_bugs", "GLM_MOE_BUGS", "OMNI_BUGS"]


class UpstreamLimit(RuntimeError):
    """The installed transformers release cannot run this input at all, patched or not (a named upstream bug)."""


@dataclass(frozen=True)
class ReleaseBug:
    """What some transformers releases cannot run at all for a family, patched or not, and why (the bug named).

    ``what`` is one of:
        "mixed"          images and videos in one forward (the samples then go to separate rows)
        "videos"         any video
        "float64"        the model in float64 (no float64 oracle on the CPU)
        "four_rows"      4-row positions of an unpacked row (one sample: an ordinary call, left to the model)
        "unmasked"       an ordinary forward with neither an attention mask nor a cache
        "router_logits"  ``output_router_logits=True`` (the MoE router loss)
        "autocast"       float32 weights under half-precision autocast
    """

    since: str  # the first release with the bug
    until: str  # the first release without it (or the first later one known to be fixed)
    what: str
    bug: str

    def applies(self, version: str) -> bool:
        from packaging.version import Version

        return Version(self.since) <= Version(Version(version).base_version) < Version(self.until)


def glm_bugs(prefix: str) -> tuple[ReleaseBug, ...]:
    return (
        ReleaseBug(
            "4.57.0",
            "5.0.0",
            "four_rows",
            f"{prefix}Model.forward takes (3, B, L) position_ids only: 4-row [text; t; h; w] positions of an unpacked "
            "row reach the rotary embedding and fail there (5.0 reads the 4-row form)",
        ),
        ReleaseBug(
            "4.57.0",
            "5.0.0",
            "unmasked",
            f"{prefix}TextModel.forward hands its (3, B, L) mrope positions to create_causal_mask, which expects "
            "(B, L) when a forward has neither an attention mask nor a cache: an expand() error (5.0 passes the "
            "text row)",
        ),
    )


GLM_MOE_BUGS = (
    ReleaseBug(
        "4.57.0",
        "5.0.0",
        "float64",
        "Glm4vMoeTextMoE.moe adds the experts' outputs into a buffer of the router weights' dtype, always float32: "
        "index_add_ refuses float64 outputs (the MoE block was rewritten in 5.0)",
    ),
    ReleaseBug(
        "5.0.0",
        "5.10.4",
        "router_logits",
        "Glm4vMoeForConditionalGeneration.forward reads outputs.router_logits, a field its model output "
        "(Glm4vMoeModelOutputWithPast) lacks: output_router_logits=True raises AttributeError (fixed by 5.10.4)",
    ),
)

OMNI_BUGS = (
    ReleaseBug(
        "4.57.0",
        "5.0.0",
        "mixed",
        "Qwen3OmniMoeThinkerForConditionalGeneration.forward joins the image and video deepstack features with masks "
        "expanded to (B, L, hidden): a shape mismatch whenever a forward holds both (huggingface/transformers#41680, "
        "fixed in 5.0 by #41741)",
    ),
    ReleaseBug(
        "5.0.0",
        "5.1.0",
        "videos",
        "Qwen3OmniMoeThinkerForConditionalGeneration.forward unpacks get_video_features(...).pooler_output into two "
        "values: 'too many values to unpack' for any video (huggingface/transformers#43540, fixed by #43588)",
    ),
    ReleaseBug(
        "5.0.0",
        "5.10.4",
        "router_logits",
        "Qwen3OmniMoeThinkerTextModel records router_logits as output 1 of its sparse MoE block, which returns the "
        "hidden states alone: output_router_logits=True fails in load_balancing_loss_func ('Class values must be "
        "smaller than num_classes'; fixed by 5.10.4)",
    ),
)

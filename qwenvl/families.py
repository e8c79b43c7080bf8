"""The Qwen-VL families we patch: one registry, ``FAMILIES``, and everything else derives from it.

The tiny fixtures (``qwenvl.fixtures``), the verify cases (``qwenvl verify``), the test parametrisation and the
sample builders (``qwenvl.verify.batches``) all read ``FAMILIES``; a per-family layout fact is a field of the
spec, never a check on the family's name. A new family sharing the text-attention pattern (one modeling module,
mask builders as module globals, attention resolved through ``ALL_ATTENTION_FUNCTIONS``) is one more
``FamilySpec`` entry plus its fixture config ``fixtures/configs/<fixture>.json``; ``parity_tests/test_families.py``
fails when either is missing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

__all__ = ["FamilySpec", "FAMILIES", "available_families", "get_family", "family_of_model", "UnknownFamilyError"]


class UnknownFamilyError(ValueError):
    pass


@dataclass(frozen=True)
class FamilySpec:
    """Where one family lives inside transformers, and the layout facts that differ between families.

    Where it lives (checked against the installed release when patching):
        name: our name for the family, equal to the top-level ``config.model_type``.
        module: the modeling module whose globals we patch.
        config_class: the top-level config class (in ``transformers``).
        entry_classes: model classes whose ``forward`` takes a packed batch (outermost first; the first is the
            one the fixtures build).
        text_attention: the text attention class (causal).
        vision_attention: the vision attention class (non-causal, builds its own cu_seqlens).
        mask_builders: module globals that build the text attention masks.
        aux_loss: module global computing the MoE router loss from the top-level attention mask; ``None`` for a
            dense family.

    Layout facts (defaults are Qwen2-VL's):
        fixture: the tiny config ``fixtures/configs/<fixture>.json``; defaults to ``name``.
        merger_width_key: the ``vision_config`` key holding the merger's output width, which must equal the text
            hidden size (``"hidden_size"`` in Qwen2-VL, where ``embed_dim`` is the tower's own width;
            ``"out_hidden_size"`` from Qwen2.5-VL on).
        deepstack_mergers: the vision-tower attribute holding the deepstack mergers (extra projectors feeding
            intermediate vision features to early decoder layers; optimizer component "projector"), or ``None``.
        min_transformers: the first transformers release that has the family (checked when patching; a release
            without it skips it when every family is patched, and refuses it when it is asked for by name).
        linear_attention: the linear-attention (Gated DeltaNet) token mixer class of a hybrid family, or ``None``.
            Its ``forward`` is wrapped so that the causal conv1d and the recurrent state restart at every sample
            (``qwenvl.patches._linear``).
        linear_attention_masks: what builds the mask the linear-attention layers receive, as alternatives across
            releases (a module global, or ``Class.method`` of the modeling module); the first one the installed
            release has is patched to let the packed metadata through.
        video_group_spans: whether each temporal group of a video gets its own
            ``<vision_start> <video>... <vision_end>`` span behind a timestamp (Qwen3-VL's processor), rather than
            one span for the whole video::

                False:  <vs> v v v v v v v v <ve>                 (t=2 groups of 4 merged patches)
                True:   <ts> <vs> v v v v <ve> <ts> <vs> v v v v <ve>
    """

    name: str
    module: str
    config_class: str
    entry_classes: tuple[str, ...]
    text_attention: str
    vision_attention: str
    mask_builders: tuple[str, ...]
    aux_loss: str | None = None
    fixture: str = ""
    merger_width_key: str = "hidden_size"
    deepstack_mergers: str | None = None
    video_group_spans: bool = False
    min_transformers: str = "4.57.0"
    linear_attention: str | None = None
    linear_attention_masks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.fixture:
            object.__setattr__(self, "fixture", self.name)

    def import_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def available(self, version: str | None = None) -> bool:
        """Whether the installed (or given) transformers release has this family."""
        from packaging.version import Version

        if version is None:
            import transformers

            version = transformers.__version__
        return Version(Version(version).base_version) >= Version(self.min_transformers)


def _registry(*specs: FamilySpec) -> dict[str, FamilySpec]:
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"family names must be unique, got {names}")
    return {spec.name: spec for spec in specs}


FAMILIES: dict[str, FamilySpec] = _registry(
    FamilySpec(
        name="qwen2_vl",
        module="transformers.models.qwen2_vl.modeling_qwen2_vl",
        config_class="Qwen2VLConfig",
        entry_classes=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
        text_attention="Qwen2VLAttention",
        vision_attention="VisionAttention",
        mask_builders=("create_causal_mask", "create_sliding_window_causal_mask"),
    ),
    FamilySpec(
        name="qwen2_5_vl",
        module="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        config_class="Qwen2_5_VLConfig",
        entry_classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
        text_attention="Qwen2_5_VLAttention",
        vision_attention="Qwen2_5_VLVisionAttention",
        mask_builders=("create_causal_mask", "create_sliding_window_causal_mask"),
        merger_width_key="out_hidden_size",
    ),
    FamilySpec(
        name="qwen3_vl",
        module="transformers.models.qwen3_vl.modeling_qwen3_vl",
        config_class="Qwen3VLConfig",
        entry_classes=("Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
        text_attention="Qwen3VLTextAttention",
        vision_attention="Qwen3VLVisionAttention",
        mask_builders=("create_causal_mask",),
        merger_width_key="out_hidden_size",
        deepstack_mergers="deepstack_merger_list",
        video_group_spans=True,
    ),
    FamilySpec(
        name="qwen3_vl_moe",
        module="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
        config_class="Qwen3VLMoeConfig",
        entry_classes=("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel"),
        text_attention="Qwen3VLMoeTextAttention",
        vision_attention="Qwen3VLMoeVisionAttention",
        mask_builders=("create_causal_mask",),
        aux_loss="load_balancing_loss_func",
        merger_width_key="out_hidden_size",
        deepstack_mergers="deepstack_merger_list",
        video_group_spans=True,
    ),
    FamilySpec(
        name="qwen3_5",
        module="transformers.models.qwen3_5.modeling_qwen3_5",
        config_class="Qwen3_5Config",
        entry_classes=("Qwen3_5ForConditionalGeneration", "Qwen3_5Model"),
        text_attention="Qwen3_5Attention",
        vision_attention="Qwen3_5VisionAttention",
        mask_builders=("create_causal_mask",),
        merger_width_key="out_hidden_size",
        video_group_spans=True,
        min_transformers="5.2.0",
        linear_attention="Qwen3_5GatedDeltaNet",
        linear_attention_masks=("create_recurrent_attention_mask", "Qwen3_5TextModel._update_linear_attn_mask"),
    ),
    FamilySpec(
        name="qwen3_5_moe",
        module="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        config_class="Qwen3_5MoeConfig",
        entry_classes=("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel"),
        text_attention="Qwen3_5MoeAttention",
        vision_attention="Qwen3_5MoeVisionAttention",
        mask_builders=("create_causal_mask",),
        aux_loss="load_balancing_loss_func",
        merger_width_key="out_hidden_size",
        video_group_spans=True,
        min_transformers="5.2.0",
        linear_attention="Qwen3_5MoeGatedDeltaNet",
        linear_attention_masks=("create_recurrent_attention_mask", "Qwen3_5MoeTextModel._update_linear_attn_mask"),
    ),
)


def available_families(version: str | None = None) -> tuple[str, ...]:
    """The families the installed (or given) transformers release has, in registry order."""
    return tuple(name for name, spec in FAMILIES.items() if spec.available(version))


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; supported families: {', '.join(FAMILIES)}"
        ) from None


def family_of_model(model) -> FamilySpec:
    """The family of a model instance (or a PEFT wrapper around one), from its config's model_type."""
    config = getattr(model, "config", None)
    base = getattr(model, "get_base_model", None)
    if base is not None:
        config = getattr(base(), "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnknownFamilyError(
            f"unknown model family {model_type!r} ({type(model).__name__}); supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]

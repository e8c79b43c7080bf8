"""The families we patch (Qwen2/2.5/3-VL, Qwen3.5, GLM-4V, the Qwen3-Omni-MoE thinker): one registry,
``FAMILIES``, and everything else derives from it.

The tiny fixtures (``qwenvl.fixtures``), the verify cases (``qwenvl verify``), the test parametrisation and the
sample builders (``qwenvl.verify.batches``) all read ``FAMILIES``; a per-family layout fact is a field of the
spec, never a check on the family's name. A new family sharing the text-attention pattern (one modeling module,
mask builders as module globals, attention resolved through ``ALL_ATTENTION_FUNCTIONS``) is one more
``FamilySpec`` entry plus its fixture config ``fixtures/configs/<fixture>.json`` (and a processor recipe in
``scripts/make_fixtures.py`` where its processor is not Qwen3-VL's); ``parity_tests/test_families.py`` fails when
either is missing, and ``parity_tests/test_new_family.py`` registers synthetic families to prove nothing else is
needed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from qwenvl.release_bugs import GLM_MOE_BUGS, OMNI_BUGS, ReleaseBug, UpstreamLimit, glm_bugs

__all__ = [
    "FamilySpec",
    "SpecialTokens",
    "ReleaseBug",
    "FAMILIES",
    "available_families",
    "get_family",
    "family_of_model",
    "UnknownFamilyError",
    "UpstreamLimit",
]


class UnknownFamilyError(ValueError):
    pass


@dataclass(frozen=True)
class SpecialTokens:
    """The top-level config keys of the token ids that lay out a sample's vision spans.

    Qwen-VL (the defaults)::

        image   <vision_start> <image_pad>... <vision_end>
        video   <vision_start> <video_pad>... <vision_end>        (per temporal group with ``video_group_spans``)

    GLM-4V fills video frames with the image placeholder; only the video wrapper tells them apart::

        image   <begin_of_image> <image>... <end_of_image>
        video   <begin_of_video> (<begin_of_image> <image>... <end_of_image> timestamp)... <end_of_video>
    """

    image: str = "image_token_id"
    video: str = "video_token_id"  # the placeholder filling a video's spans (GLM-4V: "image_token_id")
    start: str = "vision_start_token_id"  # opens an image span, or a video (group) span
    end: str = "vision_end_token_id"
    video_start: str | None = None  # wraps all of one video's spans (GLM-4V), or None
    video_end: str | None = None

    @property
    def shared_placeholder(self) -> bool:
        """Images and videos fill their spans with one placeholder: transformers then cannot take both kinds in
        one forward, packed or not (it counts every placeholder as an image feature and as a video feature)."""
        return self.image == self.video

    def keys(self) -> tuple[str, ...]:
        """Every config key named here, once, in field order."""
        names = (self.image, self.video, self.start, self.end, self.video_start, self.video_end)
        return tuple(dict.fromkeys(name for name in names if name is not None))


_GLM_TOKENS = SpecialTokens(
    video="image_token_id",
    start="image_start_token_id",
    end="image_end_token_id",
    video_start="video_start_token_id",
    video_end="video_end_token_id",
)


@dataclass(frozen=True)
class FamilySpec:
    """Where one family lives inside transformers, and the layout facts that differ between families.

    Where it lives (checked against the installed release when patching):
        name: our name for the family, equal to the top-level ``config.model_type``.
        module: the modeling module whose globals we patch.
        config_class: the top-level config class (``config_type()``: from the modeling module, which imports it, or
            registered with ``AutoConfig`` under ``name``).
        entry_classes: model classes whose ``forward`` takes a packed batch (outermost first; the first is the
            one the fixtures build).
        newer_entry_classes: entry classes only some releases have (patched where the module has them:
            ``entry_classes_in``), e.g. the Qwen3-Omni thinker's inner model, which holds its text model on 5.25.
        text_attention: the text attention class (causal).
        vision_attention: the vision attention class (non-causal, builds its own cu_seqlens).
        mask_builders: module globals that build the text attention masks.
        aux_loss: module global computing the MoE router loss from the top-level attention mask; ``None`` for a
            dense family. A release whose entry classes compute no router loss may lack it (GLM-4V-MoE before
            5.0); one whose entry classes still call it must have it.

    Layout facts (defaults are Qwen2-VL's):
        fixture: the tiny config ``fixtures/configs/<fixture>.json``; defaults to ``name``.
        merger_width_key: the ``vision_config`` key holding the merger's output width, which must equal the text
            hidden size (``"hidden_size"`` in Qwen2-VL, where ``embed_dim`` is the tower's own width;
            ``"out_hidden_size"`` from Qwen2.5-VL on).
        deepstack_mergers: the vision-tower attribute holding the deepstack mergers (extra projectors feeding
            intermediate vision features to early decoder layers; optimizer component "projector"), or ``None``.
        vision_tower: the attribute holding the vision tower (optimizer component "vision").
        projectors: the vision-tower attributes that map vision features to the text width (component
            "projector"; the deepstack mergers count too). GLM-4V's 2x2 ``downsample`` conv does the first half
            of Qwen's merger.
        other_towers: further encoders trained as component "vision" (Qwen3-Omni's ``audio_tower``: freezing
            the towers or giving them their own rate covers it too).
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

        moe_block: the text model's sparse MoE block class (router ``gate`` plus experts), or ``None``: the verify
            harness pins its expert choice to the oracle's (``qwenvl.verify.routing``).
        tokens: the config keys of the layout's special token ids (``SpecialTokens``; GLM-4V names them
            differently, reuses the image placeholder for video frames and wraps a video in its own pair).
        tower_reads_grid: the vision tower class that reads ``grid_thw`` on the device even when every input it
            derives from it comes precomputed (GLM-4V's position-embedding resampling), or ``None``. The patch hands
            that class's ``forward`` a device copy of the host grid (``qwenvl.patches._visual.grid_to_device``), so
            every family's grids stay on the host (``qwenvl.data.vision_meta``) and the split sizes computed from
            them need no host sync.
        release_bugs: what some releases cannot run at all for this family, unpatched (``ReleaseBug``): the
            harness refuses those inputs naming the bug (``qwenvl.release_bugs.UpstreamLimit``) and the tests
            skip them, instead of a crash deep inside transformers.
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
    vision_tower: str = "visual"
    projectors: tuple[str, ...] = ("merger",)
    other_towers: tuple[str, ...] = ()
    video_group_spans: bool = False
    min_transformers: str = "4.57.0"
    linear_attention: str | None = None
    linear_attention_masks: tuple[str, ...] = ()
    moe_block: str | None = None
    tokens: SpecialTokens = SpecialTokens()
    tower_reads_grid: str | None = None
    newer_entry_classes: tuple[str, ...] = ()
    release_bugs: tuple[ReleaseBug, ...] = ()

    def __post_init__(self) -> None:
        if not self.fixture:
            object.__setattr__(self, "fixture", self.name)

    def import_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        """The config class ``config_class`` names: from the modeling module (which imports it), else the one
        registered with ``AutoConfig`` under the family's model_type (``name``) when it has that class name."""
        cls = getattr(self.import_module(), self.config_class, None)
        if cls is None:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            registered = CONFIG_MAPPING[self.name] if self.name in CONFIG_MAPPING else None
            if registered is None or registered.__name__ != self.config_class:
                raise AttributeError(f"{self.module} has no {self.config_class}, nor does AutoConfig under {self.name!r}")
            cls = registered
        return cls

    def entry_type(self, index: int = 0) -> type:
        """The entry class ``entry_classes[index]`` (default: the outermost, which the fixtures build), from the
        modeling module."""
        return getattr(self.import_module(), self.entry_classes[index])

    def available(self, version: str | None = None) -> bool:
        """Whether the installed (or given) transformers release has this family."""
        from packaging.version import Version

        if version is None:
            import transformers

            version = transformers.__version__
        return Version(Version(version).base_version) >= Version(self.min_transformers)

    def release_bug(self, what: str, version: str | None = None) -> str | None:
        """Why the installed (or given) release cannot run ``what`` (see ``ReleaseBug``), or ``None``."""
        if version is None:
            import transformers

            version = transformers.__version__
        for bug in self.release_bugs:
            if bug.what == what and bug.applies(version):
                return f"transformers {version}: {bug.bug}"
        return None

    def entry_classes_in(self, module) -> tuple[str, ...]:
        """The entry classes to patch in ``module`` (the installed release's modeling module): every one of
        ``entry_classes`` and those of ``newer_entry_classes`` it has."""
        return self.entry_classes + tuple(name for name in self.newer_entry_classes if hasattr(module, name))

    def vision_tower_in(self, model):
        """``model``'s vision tower: its first submodule named ``vision_tower``, or ``None``."""
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == self.vision_tower:
                return module
        return None

    def mixes_media(self, version: str | None = None) -> bool:
        """Whether one forward can hold images and videos on the installed (or given) release: not where they
        share a placeholder (GLM-4V), nor where a release bug forbids it."""
        return not self.tokens.shared_placeholder and self.release_bug("mixed", version) is None


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
        moe_block="Qwen3VLMoeTextSparseMoeBlock",
        video_group_spans=True,
        release_bugs=(
            ReleaseBug(
                "4.57.0",
                "5.0.0",
                "autocast",
                "Qwen3VLMoeTextSparseMoeBlock.forward scatters its routing weights, cast to the hidden states' dtype "
                "(float32 weights: float32), into zeros like the gate's logits (bfloat16 under autocast): scatter_ "
                "refuses the mix, unpatched too (5.0 rewrote the MoE blocks; 5.17 and 5.25 run it)",
            ),
        ),
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
        moe_block="Qwen3_5MoeSparseMoeBlock",
        linear_attention="Qwen3_5MoeGatedDeltaNet",
        linear_attention_masks=("create_recurrent_attention_mask", "Qwen3_5MoeTextModel._update_linear_attn_mask"),
    ),
    FamilySpec(
        name="glm4v",
        module="transformers.models.glm4v.modeling_glm4v",
        config_class="Glm4vConfig",
        entry_classes=("Glm4vForConditionalGeneration", "Glm4vModel"),
        text_attention="Glm4vTextAttention",
        vision_attention="Glm4vVisionAttention",
        mask_builders=("create_causal_mask",),
        merger_width_key="out_hidden_size",
        projectors=("merger", "downsample"),
        video_group_spans=True,
        tokens=_GLM_TOKENS,
        tower_reads_grid="Glm4vVisionModel",
        release_bugs=glm_bugs("Glm4v"),
    ),
    FamilySpec(
        name="glm4v_moe",
        module="transformers.models.glm4v_moe.modeling_glm4v_moe",
        config_class="Glm4vMoeConfig",
        entry_classes=("Glm4vMoeForConditionalGeneration", "Glm4vMoeModel"),
        text_attention="Glm4vMoeTextAttention",
        vision_attention="Glm4vMoeVisionAttention",
        mask_builders=("create_causal_mask",),
        aux_loss="load_balancing_loss_func",  # absent from 4.57, which computes no router loss for it
        moe_block="Glm4vMoeTextMoE",
        merger_width_key="out_hidden_size",
        projectors=("merger", "downsample"),
        video_group_spans=True,
        tokens=_GLM_TOKENS,
        tower_reads_grid="Glm4vMoeVisionModel",
        release_bugs=glm_bugs("Glm4vMoe") + GLM_MOE_BUGS,
    ),
    # Qwen3-Omni-MoE's thinker: the part that reads text, images, videos (and audio) and writes text; the talker
    # and the code2wav vocoder are not trained on packed rows here. Its config's model_type names the family.
    FamilySpec(
        name="qwen3_omni_moe_thinker",
        fixture="qwen3_omni_moe",
        module="transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe",
        config_class="Qwen3OmniMoeThinkerConfig",
        entry_classes=("Qwen3OmniMoeThinkerForConditionalGeneration",),
        newer_entry_classes=("Qwen3OmniMoeThinkerModel",),
        text_attention="Qwen3OmniMoeThinkerTextAttention",
        vision_attention="Qwen3OmniMoeVisionAttention",
        mask_builders=("create_causal_mask",),
        aux_loss="load_balancing_loss_func",
        merger_width_key="out_hidden_size",
        deepstack_mergers="merger_list",
        other_towers=("audio_tower",),
        moe_block="Qwen3OmniMoeThinkerTextSparseMoeBlock",
        release_bugs=OMNI_BUGS,
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


def base_model(model):
    """The model inside a PEFT wrapper (``get_base_model()``), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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

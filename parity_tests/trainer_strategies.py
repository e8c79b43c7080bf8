"""Hypothesis strategies and small helpers for the optimizer-group, trainer and trainable-report tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hypothesis import strategies as st

from qwenvl.families import FAMILIES, available_families, family_of_model
from qwenvl.fixtures import tiny_model

__all__ = [
    "FAMILY_NAMES",
    "FREEZABLE",
    "FreezePlan",
    "apply_freeze_plan",
    "cached_model",
    "component_lrs",
    "freeze_plans",
    "module_components",
    "submodule",
    "tiny_model",
    "weight_decays",
]

FAMILY_NAMES = available_families()  # hypothesis draws only families the installed release has

# Substrings of parameter names that a plan can freeze as a whole.
FREEZABLE = (
    "visual.patch_embed",
    "visual.pos_embed",
    "visual.embeddings",  # GLM-4V
    "visual.blocks",
    "visual.downsample",  # GLM-4V
    "visual.merger",
    *dict.fromkeys(spec.deepstack_mergers for spec in FAMILIES.values() if spec.deepstack_mergers),
    "audio_tower",  # Qwen3-Omni
    "embed_tokens",
    "language_model.layers",
    "lm_head",
)


@dataclass(frozen=True)
class FreezePlan:
    """Freeze every parameter under ``frozen``; then, if ``mask`` is set, keep parameter ``i`` trainable
    only where bit ``i`` of ``mask`` is set (parameters in ``named_parameters()`` order)."""

    frozen: frozenset[str]
    mask: int | None


def freeze_plans(*, max_params: int = 256) -> st.SearchStrategy[FreezePlan]:
    return st.builds(
        FreezePlan,
        frozen=st.frozensets(st.sampled_from(FREEZABLE)),
        mask=st.none() | st.integers(min_value=0, max_value=2**max_params - 1),
    )


def component_lrs(*, max_lr: float = 1e-2) -> st.SearchStrategy[float | None]:
    """``None`` (inherit the base lr), exactly ``0.0``, or a positive learning rate."""
    return st.none() | st.just(0.0) | st.floats(min_value=1e-8, max_value=max_lr)


def weight_decays() -> st.SearchStrategy[float]:
    return st.just(0.0) | st.floats(min_value=1e-4, max_value=0.5)


def apply_freeze_plan(model, plan: FreezePlan) -> None:
    for i, (name, param) in enumerate(model.named_parameters()):
        keep = not any(key in name for key in plan.frozen)
        if plan.mask is not None:
            keep = keep and bool(plan.mask >> i & 1)
        param.requires_grad_(keep)


@functools.lru_cache(maxsize=None)
def cached_model(family: str):
    """One tiny model per family and process; tests only toggle ``requires_grad`` on it."""
    return tiny_model(family, seed=0)


def submodule(model, attribute: str):
    """The module held as ``attribute`` anywhere in ``model`` (``visual`` is ``model.model.visual``, or
    ``model.visual`` in Qwen3-Omni's thinker before 5.x), or ``None``."""
    return next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == attribute), None)


def module_components(model) -> dict[int, str]:
    """``id(param) -> component`` from the module tree, not from names (an oracle independent of ``classify``).

    projector: parameters of ``visual.merger``, of the deepstack mergers where the family's spec declares them and
    of GLM-4V's ``visual.downsample`` (its 2x2 patch merge into the text width); vision: the other parameters of
    ``visual``, and Qwen3-Omni's audio encoder (the encoders); base: everything else.
    """
    visual = submodule(model, "visual")
    projector = {id(p) for p in visual.merger.parameters()}
    deepstack = family_of_model(model).deepstack_mergers
    if deepstack is not None:
        projector |= {id(p) for p in getattr(visual, deepstack).parameters()}
    if getattr(visual, "downsample", None) is not None:
        projector |= {id(p) for p in visual.downsample.parameters()}
    encoders = [visual] + [m for m in (submodule(model, "audio_tower"),) if m is not None]
    vision = {id(p) for encoder in encoders for p in encoder.parameters()} - projector
    return {
        id(p): "projector" if id(p) in projector else "vision" if id(p) in vision else "base"
        for p in model.parameters()
    }

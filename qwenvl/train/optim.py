"""Optimizer parameter groups with a learning rate per Qwen-VL component.

Three components, told apart by parameter name (PEFT prefixes such as ``base_model.model.`` and LoRA
suffixes such as ``.lora_A.default.weight`` change nothing)::

    model.visual.merger.*                      projector   lr = mm_projector_lr, else lr
    model.visual.deepstack_merger_list.N.*     projector   (Qwen3-VL: also maps vision features to text width)
    model.visual.merger_list.N.*               projector   (Qwen3-Omni's deepstack mergers)
    model.visual.downsample.*                  projector   (GLM-4V: the 2x2 patch merge, a strided conv)
    model.visual.*  (patch_embed, blocks, ...) vision      lr = vision_tower_lr, else lr
    audio_tower.*                              vision      (Qwen3-Omni's audio encoder: the other tower)
    everything else (language model, lm_head)  base        lr

"vision" is the encoder towers: Qwen3-Omni's audio encoder goes with the vision tower, so that freezing the
towers (``--tune_mm_vision False``) or giving them their own rate (``--vision_tower_lr``) covers it too, instead
of it training at the language model's rate on data that never feeds it.

Each component is split into a decay and a no-decay group. A learning rate of ``0.0`` means zero, never
"unset"; ``None`` means "use the base learning rate".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Literal

import torch

__all__ = ["COMPONENTS", "Component", "classify", "build_param_groups", "component_lrs", "group_name"]

logger = logging.getLogger(__name__)

Component = Literal["base", "vision", "projector"]

# The order of the groups is part of the checkpoint format: an optimizer state saved by one run is loaded
# group by group into the next, so it must never depend on dict or parameter iteration accidents.
COMPONENTS: tuple[Component, ...] = ("base", "vision", "projector")


def classify(name: str) -> Component:
    """The component a parameter belongs to, from its (possibly PEFT-prefixed) name.

    GLM-4V's ``visual.downsample`` (a 2x2 stride-2 conv from the tower's width to the text width) does what the
    first half of Qwen's merger does: projector.
    """
    if "merger" in name or "visual.downsample." in name:
        return "projector"
    if "visual" in name or "audio_tower" in name:
        return "vision"
    return "base"


def group_name(component: Component, decay: bool) -> str:
    return f"{component}_{'decay' if decay else 'no_decay'}"


def _check_lr(what: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 or None, got {value!r}")


def component_lrs(
    lr: float, *, mm_projector_lr: float | None = None, vision_tower_lr: float | None = None
) -> dict[Component, float]:
    """The learning rate of each component; ``None`` falls back to ``lr``, ``0.0`` stays zero."""
    _check_lr("lr", lr)
    _check_lr("mm_projector_lr", mm_projector_lr)
    _check_lr("vision_tower_lr", vision_tower_lr)
    return {
        "base": lr,
        "vision": lr if vision_tower_lr is None else vision_tower_lr,
        "projector": lr if mm_projector_lr is None else mm_projector_lr,
    }


def _default_decay_names(model: torch.nn.Module) -> list[str]:
    from transformers import Trainer

    # `get_decay_parameter_names` is an instance method that never reads `self` (4.57 through 5.24); calling
    # it unbound keeps this function pure and still follows whatever rule the installed release uses.
    return Trainer.get_decay_parameter_names(None, model)


def build_param_groups(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    mm_projector_lr: float | None = None,
    vision_tower_lr: float | None = None,
    decay_parameter_names: Iterable[str] | None = None,
) -> list[dict]:
    """Optimizer parameter groups: one per (component, decay) pair that has trainable parameters.

    Args:
        model: any module; only parameters with ``requires_grad`` are grouped.
        lr: the base learning rate (language model, lm_head, anything not visual).
        weight_decay: applied to the decay groups; no-decay groups get ``0.0``.
        mm_projector_lr: learning rate of the mergers (``None``: ``lr``).
        vision_tower_lr: learning rate of the rest of the vision tower (``None``: ``lr``).
        decay_parameter_names: names that take weight decay; default transformers' own rule
            (``Trainer.get_decay_parameter_names``). A name ending in ``bias`` never decays.

    Returns:
        Groups in the fixed order base, vision, projector, each decay then no-decay; empty groups omitted.
        Each is ``{"params": [...], "lr": float, "weight_decay": float, "name": str}``. torch optimizers keep
        the extra ``"name"`` key in ``param_groups`` and in their state dict, which makes logs readable.
    """
    lrs = component_lrs(lr, mm_projector_lr=mm_projector_lr, vision_tower_lr=vision_tower_lr)
    decay_names = set(_default_decay_names(model) if decay_parameter_names is None else decay_parameter_names)

    buckets: dict[tuple[Component, bool], list[torch.nn.Parameter]] = {
        (component, decay): [] for component in COMPONENTS for decay in (True, False)
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = name in decay_names and not name.endswith("bias")
        buckets[classify(name), decay].append(param)

    groups = []
    for component in COMPONENTS:
        for decay in (True, False):
            params = buckets[component, decay]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lrs[component],
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": group_name(component, decay),
                    }
                )

    for component, what in (("vision", "vision_tower_lr"), ("projector", "mm_projector_lr")):
        if lrs[component] == 0.0 and (buckets[component, True] or buckets[component, False]):
            logger.warning(
                "%s is 0.0: its %s parameters will not change but still hold optimizer state and gradients; "
                "set requires_grad=False on them instead to save memory.",
                what,
                component,
            )
    return groups

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

import functools
import logging
import math
import re
from collections.abc import Iterable
from typing import Literal

import torch

__all__ = [
    "COMPONENTS",
    "Component",
    "classify",
    "build_param_groups",
    "component_lrs",
    "component_lrs_given",
    "group_name",
    "UnreachedLearningRate",
    "upstream_param_groups",
    "adopt_optimizer_state",
]

logger = logging.getLogger(__name__)

Component = Literal["base", "vision", "projector"]

# The order of the groups is part of the checkpoint format: an optimizer state saved by one run is loaded
# group by group into the next, so it must never depend on dict or parameter iteration accidents.
COMPONENTS: tuple[Component, ...] = ("base", "vision", "projector")


# PEFT's ModulesToSaveWrapper puts `.modules_to_save.<adapter>.` (the trained copy) or `.original_module.` between
# a wrapped module and its parameters.
_PEFT_WRAPPER = re.compile(r"\.(?:modules_to_save\.[^.]+|original_module)\.")


def _layout_facts() -> tuple:
    from qwenvl.families import FAMILIES

    return tuple((s.vision_tower, s.projectors, s.deepstack_mergers, s.other_towers) for s in FAMILIES.values())


@functools.lru_cache(maxsize=4)
def _deepstack_patterns(facts: tuple) -> tuple[re.Pattern, re.Pattern]:
    """(a deepstack merger with its index, the vision tower) name patterns from the families' layout facts."""
    deepstack = sorted({f"{re.escape(t)}\\.{re.escape(d)}" for t, _, d, _ in facts if d})
    tower = sorted({re.escape(t) for t, _, _, _ in facts})
    return (
        re.compile(rf"(?:^|\.)(?:{'|'.join(deepstack)})\.(\d+)\."),
        re.compile(rf"(?:^|\.)(?:{'|'.join(tower)})\."),
    )


def deepstack_index(name: str) -> int | None:
    """The index of the deepstack merger a parameter belongs to (Qwen3-VL, the Qwen3-Omni thinker), or ``None``."""
    match = _deepstack_patterns(_layout_facts())[0].search(_PEFT_WRAPPER.sub(".", name))
    return int(match.group(1)) if match else None


def in_vision_tower(name: str) -> bool:
    """Whether a parameter is part of a vision tower (not another encoder, such as Qwen3-Omni's audio tower)."""
    return _deepstack_patterns(_layout_facts())[1].search(_PEFT_WRAPPER.sub(".", name)) is not None


@functools.lru_cache(maxsize=4)
def _component_patterns(facts: tuple) -> tuple[re.Pattern, re.Pattern]:
    """(projector, vision) name patterns from the families' layout facts (``_layout_facts``: each spec's
    ``vision_tower``, ``projectors``, ``deepstack_mergers``, ``other_towers``)."""
    projectors, towers = set(), set()
    for vision_tower, attributes, deepstack, other_towers in facts:
        towers.update((vision_tower, *other_towers))
        for attribute in (*attributes, deepstack):
            if attribute:
                projectors.add(f"{re.escape(vision_tower)}\\.{re.escape(attribute)}")
    alternatives = "|".join(sorted(projectors))
    return (
        re.compile(rf"(?:^|\.)(?:{alternatives})\."),
        re.compile(rf"(?:^|\.)(?:{'|'.join(map(re.escape, sorted(towers)))})\."),
    )


def classify(name: str) -> Component:
    """The component a parameter belongs to, from its (possibly PEFT-prefixed) name, by the family specs'
    layout facts (``_component_patterns``): a projector of a vision tower (mergers, deepstack mergers, GLM-4V's
    ``downsample``, which does what the first half of Qwen's merger does), else any part of a tower (the vision
    tower, Qwen3-Omni's audio tower), else the base model.
    """
    projector, tower = _component_patterns(_layout_facts())
    name = _PEFT_WRAPPER.sub(".", name)  # visual.modules_to_save.default.merger.* is the merger's trained copy
    if projector.search(name):
        return "projector"
    if tower.search(name):
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


class UnreachedLearningRate(ValueError):
    """A per-component learning rate was set but no trainable parameter belongs to that component."""


_LR_OF = {"vision": "vision_tower_lr", "projector": "mm_projector_lr"}
_WHAT = {"vision": "the vision tower (every '*visual*' parameter but the projector)", "projector": "the projector ('*merger*')"}
_PER_COMPONENT = ("mm_projector_lr", "vision_tower_lr")


def component_lrs_given(args) -> dict[str, float]:
    """The per-component learning rates set on training arguments ``args`` (plain transformers arguments have
    none), by argument name, ``mm_projector_lr`` first."""
    return {name: value for name in _PER_COMPONENT if (value := getattr(args, name, None)) is not None}


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
    require_reach: bool = False,
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
        require_reach: raise :class:`UnreachedLearningRate` when ``mm_projector_lr`` or ``vision_tower_lr`` is
            set and its component has no trainable parameter (a rate that would silently do nothing).

    Returns:
        Groups in the fixed order base, vision, projector, each decay then no-decay; empty groups omitted.
        Each is ``{"params": [...], "lr": float, "weight_decay": float, "name": str}``. torch optimizers keep
        the extra ``"name"`` key in ``param_groups`` and in their state dict, which makes logs readable.
    """
    lrs = component_lrs(lr, mm_projector_lr=mm_projector_lr, vision_tower_lr=vision_tower_lr)
    decay_names = set(_default_decay_names(model) if decay_parameter_names is None else decay_parameter_names)
    buckets = _bucket_params(model, decay_names)
    if require_reach:
        _check_reach(buckets, {"vision": vision_tower_lr, "projector": mm_projector_lr})
    groups = _groups(buckets, lrs, weight_decay)
    _warn_zero_lrs(buckets, lrs)
    return groups


_Buckets = dict[tuple[Component, bool], list[torch.nn.Parameter]]


def _bucket_params(model: torch.nn.Module, decay_names: set[str]) -> _Buckets:
    """The trainable parameters of ``model`` by (component, decay); every pair is a key, in the groups' order."""
    buckets: _Buckets = {(component, decay): [] for component in COMPONENTS for decay in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = name in decay_names and not name.endswith("bias")
        buckets[classify(name), decay].append(param)
    return buckets


def _trains(buckets: _Buckets, component: Component) -> bool:
    return bool(buckets[component, True] or buckets[component, False])


def _check_reach(buckets: _Buckets, given: dict[Component, float | None]) -> None:
    """Raise :class:`UnreachedLearningRate` for a rate in ``given`` (``None``: unset) whose component has no
    trainable parameter."""
    for component, what in _LR_OF.items():
        value = given[component]
        if value is not None and not _trains(buckets, component):
            raise UnreachedLearningRate(
                f"{what}={value} reaches no trainable parameter: {_WHAT[component]} is frozen or absent. "
                f"Make it trainable (--tune_mm_{'vision' if component == 'vision' else 'mlp'} True) or unset {what}"
            )


def _groups(buckets: _Buckets, lrs: dict[Component, float], weight_decay: float) -> list[dict]:
    """One group per non-empty bucket, in the fixed order base, vision, projector, each decay then no-decay."""
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
    return groups


def _warn_zero_lrs(buckets: _Buckets, lrs: dict[Component, float]) -> None:
    for component, what in _LR_OF.items():
        if lrs[component] == 0.0 and _trains(buckets, component):
            logger.warning(
                "%s is 0.0: its %s parameters will not change but still hold optimizer state and gradients; "
                "set requires_grad=False on them instead to save memory.",
                what,
                component,
            )


# -- optimizer states written by the upstream Qwen-VL fine-tuning trainer -----------------------------------


def upstream_param_groups(
    model: torch.nn.Module, count: int, *, decay_parameter_names: Iterable[str] | None = None
) -> list[list[torch.nn.Parameter]]:
    """The parameters of each group the upstream trainer's ``create_optimizer`` builds, in its order.

    Upstream (``qwen-vl-finetune/qwenvl/train/trainer.py``) makes 2, 4 or 6 groups, empty ones kept, by its own
    rule: projector = name contains ``merger``, vision = name contains ``visual``, decay = transformers' decay
    names without any name containing ``bias``; trainable parameters only, in ``named_parameters`` order::

        2 groups (no component lr set):          decay, no-decay
        4 groups (mm_projector_lr set):          decay, no-decay            (not projector), decay, no-decay (projector)
        6 groups (and vision_tower_lr set):      decay base, decay vision, no-decay base, no-decay vision,
                                                 decay projector, no-decay projector

    ``count`` is the number of groups the saved state has. Raises ``ValueError`` for any other count.
    """
    decay_names = set(_default_decay_names(model) if decay_parameter_names is None else decay_parameter_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def select(*, decay: bool, projector: bool | None = None, vision: bool | None = None):
        return [
            p
            for n, p in named
            if ((n in decay_names and "bias" not in n) == decay)
            and (projector is None or ("merger" in n) == projector)
            and (vision is None or ("visual" in n) == vision)
        ]

    if count == 2:
        return [select(decay=True), select(decay=False)]
    if count == 4:
        return [
            select(decay=True, projector=False),
            select(decay=False, projector=False),
            select(decay=True, projector=True),
            select(decay=False, projector=True),
        ]
    if count == 6:
        return [
            select(decay=True, projector=False, vision=False),
            select(decay=True, projector=False, vision=True),
            select(decay=False, projector=False, vision=False),
            select(decay=False, projector=False, vision=True),
            select(decay=True, projector=True),
            select(decay=False, projector=True),
        ]
    raise ValueError(f"upstream's create_optimizer makes 2, 4 or 6 parameter groups, not {count}")


class OptimizerStateMismatch(ValueError):
    """A saved optimizer state that fits neither our parameter groups nor upstream's for this model."""


def adopt_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, decay_parameter_names=None) -> dict:
    """A state dict that ``optimizer`` (our groups, :func:`build_param_groups`) loads, from ``saved``.

    ``saved`` is returned unchanged when its groups are ours (same count and sizes). A state written by the
    upstream trainer (no group names; 2, 4 or 6 groups, empty ones kept) is mapped parameter by parameter: each
    parameter keeps its moments and step, and each of our groups takes the learning-rate schedule's progress
    (saved ``lr / initial_lr``) of the upstream group its parameters were in, times its own initial rate.

    Raises:
        OptimizerStateMismatch: neither layout fits (another model, other frozen parts, another optimizer).
    """
    ours = optimizer.state_dict()
    saved_groups, our_groups = saved["param_groups"], ours["param_groups"]
    sizes = [len(g["params"]) for g in saved_groups]
    if sizes == [len(g["params"]) for g in our_groups] and all("name" in g for g in saved_groups):
        return saved
    named = all("name" in g for g in saved_groups)
    try:
        if named:
            raise ValueError("its groups are named, so it was written by qwenvl, for other groups")
        upstream = upstream_param_groups(model, len(saved_groups), decay_parameter_names=decay_parameter_names)
    except ValueError as exc:
        raise OptimizerStateMismatch(
            f"the saved optimizer state has {len(saved_groups)} groups of {sizes} tensors, which fit neither this "
            f"model's groups ({[len(g['params']) for g in our_groups]}) nor upstream's ({exc})"
        ) from None
    if [len(g) for g in upstream] != sizes:
        raise OptimizerStateMismatch(
            f"the saved optimizer state has groups of {sizes} tensors; upstream's create_optimizer would make "
            f"{[len(g) for g in upstream]} for this model (other parameters trainable, or another model)"
        )
    param_of_old: dict[int, torch.nn.Parameter] = {}
    group_of_param: dict[int, dict] = {}
    for group, params in zip(saved_groups, upstream):
        for index, param in zip(group["params"], params):
            param_of_old[index] = param
            group_of_param[id(param)] = group
    live = [p for group in optimizer.param_groups for p in group["params"]]
    new_index = {id(p): i for i, p in enumerate(live)}
    state = {}
    for old, value in saved["state"].items():
        param = param_of_old[old]
        if id(param) not in new_index:
            raise OptimizerStateMismatch("a parameter the saved state trains is not in this optimizer")
        for key, tensor in value.items():
            if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape != param.shape:
                raise OptimizerStateMismatch(f"saved {key} of shape {tuple(tensor.shape)} for a parameter of shape {tuple(param.shape)}")
        state[new_index[id(param)]] = value
    groups = []
    for our, live_group in zip(our_groups, optimizer.param_groups):
        our = dict(our)
        source = group_of_param.get(id(live_group["params"][0])) if live_group["params"] else None
        if source is not None and source.get("initial_lr"):
            progress = source["lr"] / source["initial_lr"]
            our["lr"] = our.get("initial_lr", our["lr"]) * progress
        groups.append(our)
    return {"state": state, "param_groups": groups}

"""The optimizer over per-component parameter groups, built where transformers builds its own.

:func:`create_component_optimizer` is what ``QwenVLTrainer.create_optimizer`` does and, after
``qwenvl.train.upstream.install()``, what every ``transformers.Trainer.create_optimizer`` does: the optimizer
``--optim`` names, over :func:`qwenvl.train.optim.build_param_groups`, or an error wherever the per-component
learning rates could not take effect (an ``--optim`` that builds its own groups, FSDP1's flattened parameters).
"""

from __future__ import annotations

import logging

import torch
import transformers.trainer

from qwenvl.train.optim import build_param_groups, component_lrs_given

__all__ = ["create_component_optimizer"]

# Built for QwenVLTrainer (and upstream.install's Trainer): its lines keep the trainer's logger, as before this
# module existed.
logger = logging.getLogger("qwenvl.train.trainer")


def _optimizer_factory_check():
    # Optimizer factories (Muon, Dion) arrived in 5.x; older releases have no such thing.
    return getattr(transformers.trainer, "is_optimizer_factory", lambda cls: False)


def _split_by_device_mesh(groups: list[dict]) -> list[dict]:
    """Give parameters on different device meshes their own groups (fused/foreach kernels need one mesh)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return groups
    if not any(isinstance(p, DTensor) for group in groups for p in group["params"]):
        return groups
    split = []
    for group in groups:
        by_mesh: dict = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split.extend({**group, "params": params} for params in by_mesh.values())
    return split


def create_component_optimizer(trainer, model=None, *, fallback):
    """The optimizer ``trainer.args.optim`` names, over :func:`build_param_groups` of ``model`` (default
    ``trainer.model``): what ``QwenVLTrainer.create_optimizer`` and, after ``qwenvl.train.upstream.install()``,
    every ``transformers.Trainer`` build. Keeps ``trainer.optimizer`` if one is set already.

    ``fallback(model)`` builds transformers' own optimizer, for an ``--optim`` that makes its own groups.
    Raises ``ValueError`` wherever the per-component learning rates could not take effect, and
    :class:`qwenvl.train.optim.UnreachedLearningRate` for one set on a component with nothing to train.
    """
    if trainer.optimizer is not None:
        return trainer.optimizer
    opt_model = trainer.model if model is None else model
    optimizer_cls, optimizer_kwargs = _optimizer_cls_and_kwargs(trainer, opt_model)
    if _builds_own_groups(optimizer_cls, optimizer_kwargs):
        if lrs := component_lrs_given(trainer.args):
            raise ValueError(
                f"--optim {trainer.args.optim} builds its own parameter groups, so {' and '.join(lrs)} cannot be "
                "applied. Use an optimizer that takes parameter groups (e.g. adamw_torch) or unset them."
            )
        return fallback(model)

    _refuse_flat_params(opt_model, trainer.args)
    groups = build_param_groups(
        opt_model,
        lr=trainer.args.learning_rate,
        weight_decay=trainer.args.weight_decay,
        mm_projector_lr=getattr(trainer.args, "mm_projector_lr", None),
        vision_tower_lr=getattr(trainer.args, "vision_tower_lr", None),
        decay_parameter_names=trainer.get_decay_parameter_names(opt_model),
        require_reach=True,
    )
    trainer.optimizer = optimizer_cls(_split_by_device_mesh(groups), **optimizer_kwargs)
    _keep_embeddings_32bit(optimizer_cls, optimizer_kwargs, opt_model)
    if trainer.is_world_process_zero():
        _log_groups(groups)
    return trainer.optimizer


def _optimizer_cls_and_kwargs(trainer, opt_model) -> tuple[type, dict]:
    """The optimizer class and its keyword arguments (a copy): the trainer's own, else what ``--optim`` names."""
    if trainer.optimizer_cls_and_kwargs is not None:
        optimizer_cls, optimizer_kwargs = trainer.optimizer_cls_and_kwargs
    else:
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, opt_model)
    return optimizer_cls, dict(optimizer_kwargs)


def _builds_own_groups(optimizer_cls, optimizer_kwargs: dict) -> bool:
    """Whether the optimizer makes its own parameter groups (GaLore, LOMO, layer-wise, optimizer factories)."""
    own = any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict"))
    return own or _optimizer_factory_check()(optimizer_cls)


def _refuse_flat_params(opt_model, args) -> None:
    """FSDP1 without ``use_orig_params`` leaves no parameter names to tell the components apart by."""
    flat = [name for name, _ in opt_model.named_parameters() if "_flat_param" in name]
    if flat and (lrs := component_lrs_given(args)):
        raise ValueError(
            f"FSDP1 without use_orig_params flattened the parameters into {flat[0]!r}, so "
            f"{' and '.join(lrs)} cannot be told apart by name: use FSDP2 "
            "(fsdp_version 2) or use_orig_params=True"
        )


def _keep_embeddings_32bit(optimizer_cls, optimizer_kwargs: dict, opt_model) -> None:
    if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits") == 8:
        # As transformers does: 8-bit state for embeddings hurts; keep theirs in 32 bits.
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in opt_model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})


def _log_groups(groups: list[dict]) -> None:
    for group in groups:
        logger.info(
            "optimizer group %s: %d tensors, %d parameters, lr %g, weight decay %g",
            group["name"],
            len(group["params"]),
            sum(p.numel() for p in group["params"]),
            group["lr"],
            group["weight_decay"],
        )

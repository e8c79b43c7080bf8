"""``QwenVLTrainer``: transformers' ``Trainer`` with per-component learning rates that are never silently wrong.

Importing this module changes nothing: no patching, no reassignment of ``transformers.Trainer`` methods.
Only instances of ``QwenVLTrainer`` build their optimizer from :func:`qwenvl.train.optim.build_param_groups`.

Where per-component learning rates cannot take effect, it raises instead of training with one learning rate:

- a DeepSpeed config with an ``optimizer`` block (transformers then builds DeepSpeed's optimizer and never
  calls ``create_optimizer``) or a ``scheduler`` block (DeepSpeed's schedulers set one learning rate for every
  group, erasing the ratios);
- an ``--optim`` that builds its own parameter groups (GaLore, LOMO, layer-wise, optimizer factories).

It also resumes checkpoints that transformers' own resume leaves half loaded (see ``_load_from_checkpoint``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os

import torch
import transformers
import transformers.trainer
from transformers import TrainerCallback

from qwenvl.train.optim import build_param_groups
from qwenvl.train.report import log_trainable_report

__all__ = ["QwenVLTrainer", "check_deepspeed_config", "replace_qwen2_vl_attention_class"]

logger = logging.getLogger(__name__)

_PER_COMPONENT = ("mm_projector_lr", "vision_tower_lr")


def replace_qwen2_vl_attention_class(backend: str = "auto"):
    """Upstream-compatible entry point: patch all supported Qwen-VL families for packed batches."""
    from qwenvl.patches import patch

    return patch(backend=backend)


def _per_component_lrs(args) -> dict[str, float]:
    """The per-component learning rates set on ``args`` (plain transformers arguments have none)."""
    return {name: value for name in _PER_COMPONENT if (value := getattr(args, name, None)) is not None}


def _load_deepspeed_config(ds_config) -> dict | None:
    if ds_config is None:
        return None
    if isinstance(ds_config, dict):
        return ds_config
    # HfDeepSpeedConfig / HfTrainerDeepSpeedConfig keep the parsed dict in `.config`; accelerate's
    # DeepSpeedPlugin in `.deepspeed_config`.
    for attr in ("config", "deepspeed_config"):
        if isinstance(value := getattr(ds_config, attr, None), dict):
            return value
    if isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        try:
            # transformers also accepts the JSON base64-encoded on the command line.
            return json.loads(base64.urlsafe_b64decode(path).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError(f"DeepSpeed config {path!r} is neither an existing file nor base64-encoded JSON") from None
    raise TypeError(f"cannot read a DeepSpeed config from {type(ds_config).__name__}")


def check_deepspeed_config(ds_config, args) -> bool:
    """Refuse a DeepSpeed config that would silently drop ``args``' per-component learning rates.

    Args:
        ds_config: a dict, a path to a JSON file, base64-encoded JSON, an ``HfDeepSpeedConfig`` or accelerate's
            ``DeepSpeedPlugin``; ``None`` for no DeepSpeed.
        args: training arguments; ``mm_projector_lr`` / ``vision_tower_lr`` are read if present.

    Returns:
        Whether DeepSpeed builds the optimizer (the config has an ``optimizer`` block).

    Raises:
        ValueError: per-component learning rates are set and the config has an ``optimizer`` or ``scheduler``
            block.
    """
    config = _load_deepspeed_config(ds_config)
    if not config:
        return False
    blocks = [block for block in ("optimizer", "scheduler") if block in config]
    if not blocks:
        return False
    lrs = _per_component_lrs(args)
    if lrs:
        settings = ", ".join(f"{name}={value}" for name, value in lrs.items())
        reasons = []
        if "optimizer" in blocks:
            reasons.append(
                "its 'optimizer' block makes transformers build DeepSpeed's optimizer with one learning rate for "
                "every parameter and never call create_optimizer"
            )
        if "scheduler" in blocks:
            reasons.append(
                "its 'scheduler' block makes DeepSpeed's scheduler set one learning rate for every parameter group"
            )
        raise ValueError(
            f"{settings} cannot take effect with this DeepSpeed config: {'; and '.join(reasons)}. "
            f"Remove the {' and '.join(repr(b) for b in blocks)} block(s) from the DeepSpeed config: the "
            "Hugging Face Trainer then builds the optimizer from --optim, --learning_rate, --weight_decay and "
            "--adam_* (ZeRO still partitions it) with one parameter group per component, and the scheduler from "
            "--lr_scheduler_type / --warmup_steps, which keeps each group's ratio. Or unset "
            f"{' and '.join(lrs)} to train every parameter at one learning rate."
        )
    logger.info(
        "DeepSpeed config defines %s: DeepSpeed builds it, with one learning rate for all parameters "
        "(fine: mm_projector_lr and vision_tower_lr are unset).",
        " and ".join(blocks),
    )
    return "optimizer" in blocks


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


def _checkpoint_keys(folder: str) -> set[str] | None:
    """The tensor names of a full-model checkpoint folder, without reading the tensors; ``None`` if unknown."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME

    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return set(json.load(f)["weight_map"])
    return None


class _TrainableReportCallback(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            log_trainable_report(model, logger)


class QwenVLTrainer(transformers.Trainer):
    """``transformers.Trainer`` with one optimizer group per (component, decay) pair.

    Reads ``args.mm_projector_lr`` and ``args.vision_tower_lr`` (see :class:`qwenvl.train.argument.TrainingArguments`;
    plain ``transformers.TrainingArguments`` work too and give base-lr groups). Logs the trainable-parameter
    report when training begins (rank 0 only).
    """

    def __init__(self, model=None, args=None, *more, **kwargs):
        if args is not None:
            # transformers never calls create_optimizer when DeepSpeed owns the optimizer: fail now, not never.
            check_deepspeed_config(
                getattr(args, "hf_deepspeed_config", None) or getattr(args, "deepspeed", None) or None, args
            )
        super().__init__(model, args, *more, **kwargs)
        # A config given to `accelerate launch` instead of --deepspeed only shows up on the accelerator.
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(self.args, "hf_deepspeed_config", None) is None:
            check_deepspeed_config(getattr(plugin, "hf_ds_config", None) or plugin, self.args)
        if self.optimizer is not None and (lrs := _per_component_lrs(self.args)):
            logger.warning(
                "An optimizer was passed to QwenVLTrainer, so %s are ignored: its own parameter groups are used. "
                "Build its groups with qwenvl.train.optim.build_param_groups to get per-component learning rates.",
                " and ".join(lrs),
            )
        self.add_callback(_TrainableReportCallback())

    def create_optimizer(self, model=None):
        """Build the optimizer ``args.optim`` names over :func:`build_param_groups`.

        Callable as ``create_optimizer()`` (transformers 4.57 - 5.2, and the usual path of later releases) and
        ``create_optimizer(model)`` (5.3+ passes the prepared model on its FSDP path). Keeps ``self.optimizer``
        if one is set already.
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model

        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)

        builds_own_groups = [key for key in ("params", "model", "optimizer_dict") if key in optimizer_kwargs]
        if builds_own_groups or _optimizer_factory_check()(optimizer_cls):
            if lrs := _per_component_lrs(self.args):
                raise ValueError(
                    f"--optim {self.args.optim} builds its own parameter groups, so {' and '.join(lrs)} cannot be "
                    "applied. Use an optimizer that takes parameter groups (e.g. adamw_torch) or unset them."
                )
            return self._upstream_create_optimizer(model)

        groups = build_param_groups(
            opt_model,
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            mm_projector_lr=getattr(self.args, "mm_projector_lr", None),
            vision_tower_lr=getattr(self.args, "vision_tower_lr", None),
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
        )
        self.optimizer = optimizer_cls(_split_by_device_mesh(groups), **optimizer_kwargs)

        if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits") == 8:
            # As transformers does: 8-bit state for embeddings hurts; keep theirs in 32 bits.
            import bitsandbytes

            manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
            for module in opt_model.modules():
                if isinstance(module, torch.nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})

        for group in groups:
            logger.info(
                "optimizer group %s: %d tensors, %d parameters, lr %g, weight decay %g",
                group["name"],
                len(group["params"]),
                sum(p.numel() for p in group["params"]),
                group["lr"],
                group["weight_decay"],
            )
        return self.optimizer

    def _upstream_create_optimizer(self, model):
        if model is None or model is self.model:
            return super().create_optimizer()
        return super().create_optimizer(model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # save_pretrained writes Qwen2-VL / Qwen2.5-VL weights under the hub's names (`visual.*`, `model.layers.*`)
        # while the model's own are `model.visual.*`, `model.language_model.layers.*`. transformers' resume
        # (4.57 through 5.24) loads the file with load_state_dict(strict=False): every renamed weight stays at its
        # freshly initialised value, behind a warning. from_pretrained knows the renaming, so load through it.
        target = self.model if model is None else model
        keys = None
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if isinstance(target, transformers.PreTrainedModel) and not sharded:
            keys = _checkpoint_keys(resume_from_checkpoint)
        if keys is None or keys == set(target.state_dict()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading %s with from_pretrained: its weight names are not the model's.", resume_from_checkpoint)
        dtype = next(target.parameters()).dtype
        loaded = type(target).from_pretrained(
            resume_from_checkpoint, config=target.config, dtype=dtype, attn_implementation="eager"
        )
        target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

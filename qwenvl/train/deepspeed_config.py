"""Refuse a DeepSpeed config that would silently drop the per-component learning rates.

With an ``optimizer`` block transformers builds DeepSpeed's optimizer (one learning rate for every parameter)
and never calls ``create_optimizer``; with a ``scheduler`` block DeepSpeed's scheduler sets one learning rate
for every group, erasing the ratios. :func:`check_deepspeed_config` says so before training, in one error
naming the way out, when ``mm_projector_lr`` or ``vision_tower_lr`` is set.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os

from qwenvl.train.optim import component_lrs_given

__all__ = ["check_deepspeed_config"]

# The check runs as part of QwenVLTrainer: its lines keep the trainer's logger, as before this module existed.
logger = logging.getLogger("qwenvl.train.trainer")


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
    lrs = component_lrs_given(args)
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

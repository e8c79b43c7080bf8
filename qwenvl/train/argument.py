"""Training arguments: transformers' own, plus a learning rate per vision component.

No ``from __future__ import annotations`` here: ``HfArgumentParser`` reads the field types at runtime.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import transformers

__all__ = ["TrainingArguments"]


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """``transformers.TrainingArguments`` with ``mm_projector_lr``, ``vision_tower_lr`` and ``dummy_vision_pass``.

    ``None`` means "same as ``learning_rate``"; ``0.0`` means a learning rate of zero (freezing the component
    with ``requires_grad=False`` does the same and saves the optimizer state).
    """

    # Optional[...] rather than `float | None`: HfArgumentParser of every supported release understands it.
    mm_projector_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Learning rate of the vision-to-text projector (every module named '*merger*', including "
            "Qwen3-VL's deepstack mergers). Default: --learning_rate."
        },
    )
    vision_tower_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Learning rate of the vision tower except the projector (patch embedding, blocks). "
            "Default: --learning_rate. Independent of --mm_projector_lr."
        },
    )

    dummy_vision_pass: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Run the vision tower on a tiny zero input, adding exactly zero, in every forward without an "
            "image (or video), so that ranks without one still take part in its backward (DDP, FSDP2, ZeRO-3). "
            "Default: on under a launcher (torchrun, accelerate launch), off in a plain process."
        },
    )

    def __post_init__(self):
        for name in ("mm_projector_lr", "vision_tower_lr"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        super().__post_init__()


def __getattr__(name):
    # An upstream fine-tuning checkout has its own qwenvl/train/argument.py (ModelArguments, DataArguments, its
    # TrainingArguments), which this module shadows: say how to reach it instead of a bare ImportError.
    import qwenvl.train
    from qwenvl._checkout import checkout_file

    file = None if name.startswith("__") else checkout_file(qwenvl.train.__path__, "argument.py")
    if file is not None:
        with open(file, encoding="utf-8") as f:
            defines = f"class {name}" in f.read()
        if defines:
            raise ImportError(
                f"qwenvl.train.argument is qwenvl's and has no {name}; the upstream checkout's {file} defines it: "
                "call qwenvl.train.upstream.install() before importing it (docs/migration.md)"
            )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The upstream Qwen-VL fine-tuning code (QwenLM's ``qwen-vl-finetune/``) running on qwenvl.

Upstream's ``train_qwen.py`` imports its own ``trainer.py``, whose import patches attention for packed batches
(flash-attn only, and broken on transformers 5.x), replaces ``Trainer.create_optimizer`` for every Trainer and
adds ``print_trainable_parameters`` to the vision and language model classes. With qwenvl installed, one line of
``train_qwen.py`` changes (``docs/migration.md``)::

    from trainer import replace_qwen2_vl_attention_class                                          # before
    from qwenvl.train.upstream import install, replace_qwen2_vl_attention_class; install()        # after

:func:`install` does what that import did, explicitly, correctly and reversibly (``install().revert()``):

- ``transformers.Trainer`` builds qwenvl's optimizer groups
  (:func:`qwenvl.train.component_optimizer.create_component_optimizer`): ``mm_projector_lr`` /
  ``vision_tower_lr`` each on its own, ``0.0`` meaning zero, and a rate set for a component with nothing
  trainable is an error; a DeepSpeed config that would drop them is refused when training starts; an
  ``optimizer.pt`` written by upstream's trainer resumes (its groups mapped by parameter).
- every supported family's models get ``print_trainable_parameters()`` with upstream's lines, from qwenvl's
  trainable report; the ``ForConditionalGeneration`` classes get ``visual`` and ``language_model`` where the
  installed release no longer has them (5.x moved both under ``model.model``).
- the checkout's own modules that a module of ours shadows by name (``qwenvl/train/argument.py``: its
  ``ModelArguments``, ``DataArguments``, ``TrainingArguments``) are imported from the checkout under that name.

``replace_qwen2_vl_attention_class()`` (called by upstream's script for ``--data_flatten`` / ``--data_packing``)
is qwenvl's: every family patched for packed batches, ``cu_seqlens`` read where the attention mask goes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from typing import TYPE_CHECKING

import transformers

from qwenvl._checkout import checkout_file, load_checkout_module
from qwenvl.train.checkpoint import load_optimizer_and_scheduler_adopting
from qwenvl.train.component_optimizer import create_component_optimizer
from qwenvl.train.deepspeed_config import check_deepspeed_config
from qwenvl.train.report import upstream_trainable_lines

if TYPE_CHECKING:
    from qwenvl.patches._handle import PatchRecorder

__all__ = ["install", "UpstreamHandle", "replace_qwen2_vl_attention_class", "SHADOWED"]

logger = logging.getLogger(__name__)

# Modules of upstream's checkout that a module of ours shadows by name, and that its script imports.
SHADOWED = ("qwenvl.train.argument",)

_WARNED_PLAIN_TRAINER = False


def replace_qwen2_vl_attention_class(backend: str = "auto"):
    """Upstream-compatible entry point: patch all supported Qwen-VL families for packed batches.

    Attention only. Upstream's module also made every ``Trainer`` honour ``mm_projector_lr`` /
    ``vision_tower_lr``; a plain ``transformers.Trainer`` ignores them, so this says so once (loudly) unless
    :func:`install` has made every Trainer build qwenvl's groups.
    """
    global _WARNED_PLAIN_TRAINER
    from qwenvl.patches import patch

    if not getattr(transformers.Trainer.create_optimizer, "__qwenvl_upstream__", False) and not _WARNED_PLAIN_TRAINER:
        _WARNED_PLAIN_TRAINER = True
        logger.warning(
            "replace_qwen2_vl_attention_class patches attention only: a plain transformers.Trainer ignores "
            "mm_projector_lr and vision_tower_lr. Train with QwenVLTrainer, or call qwenvl.train.upstream.install() "
            "(upstream's train_qwen.py: docs/migration.md)"
        )
    return patch(backend=backend)


class UpstreamHandle:
    """What :func:`install` changed; ``revert()`` (or leaving a ``with`` block) restores it all exactly."""

    def __init__(self, recorder: PatchRecorder, checkout_modules: dict[str, str]) -> None:
        self._recorder = recorder
        self.checkout_modules = checkout_modules  # module name -> the checkout's file it now is

    def revert(self) -> None:
        self._recorder.undo()

    def __enter__(self) -> "UpstreamHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def _set_module(recorder: PatchRecorder, name: str, module) -> None:
    previous = sys.modules.get(name)
    sys.modules[name] = module

    def undo() -> None:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous

    recorder.add_undo(undo)


def _use_checkout_modules(recorder: PatchRecorder) -> dict[str, str]:
    used = {}
    for name in SHADOWED:
        package, _, leaf = name.rpartition(".")
        file = checkout_file(importlib.import_module(package).__path__, f"{leaf}.py")
        if file is None:
            continue
        _set_module(recorder, name, load_checkout_module(package, file, name))
        used[name] = file
    return used


def _patch_trainer(recorder: PatchRecorder) -> None:
    trainer_cls = transformers.Trainer
    original_create = trainer_cls.create_optimizer
    original_load = trainer_cls._load_optimizer_and_scheduler
    original_train = trainer_cls.train

    def fallback(trainer, model):
        if model is None or model is trainer.model:
            return original_create(trainer)
        return original_create(trainer, model)

    @functools.wraps(original_create)
    def create_optimizer(self, model=None):
        return create_component_optimizer(self, model, fallback=functools.partial(fallback, self))

    @functools.wraps(original_load)
    def _load_optimizer_and_scheduler(self, checkpoint):
        return load_optimizer_and_scheduler_adopting(self, checkpoint, functools.partial(original_load, self))

    @functools.wraps(original_train)
    def train(self, *args, **kwargs):
        # DeepSpeed with its own optimizer block never calls create_optimizer: refuse before training, not never.
        ds = getattr(self.args, "hf_deepspeed_config", None) or getattr(self.args, "deepspeed", None) or None
        check_deepspeed_config(ds, self.args)
        return original_train(self, *args, **kwargs)

    recorder.setattr(trainer_cls, "create_optimizer", create_optimizer)
    recorder.setattr(trainer_cls, "_load_optimizer_and_scheduler", _load_optimizer_and_scheduler)
    recorder.setattr(trainer_cls, "train", train)


def _print_trainable_parameters(self) -> None:
    """Upstream's printout of what trains (its lines), from qwenvl's trainable report."""
    print(upstream_trainable_lines(self), flush=True)


def _submodule_property(attribute: str) -> property:
    return property(lambda self: getattr(self.model, attribute), doc=f"``self.model.{attribute}`` (the 4.57 name)")


def _patch_model_classes(recorder: PatchRecorder) -> None:
    from qwenvl.families import FAMILIES

    for spec in FAMILIES.values():
        if not spec.available():
            continue
        module = spec.import_module()
        entry = getattr(module, spec.entry_classes[0])
        # The family's own PreTrainedModel: every model class of the family (vision tower included) derives from it.
        family_base = next(c for c in entry.__mro__ if transformers.PreTrainedModel in c.__bases__)
        if "print_trainable_parameters" not in vars(family_base):
            recorder.setattr(family_base, "print_trainable_parameters", _print_trainable_parameters, create=True)
        for attribute in ("visual", "language_model"):
            if not hasattr(entry, attribute):
                recorder.setattr(entry, attribute, _submodule_property(attribute), create=True)


def install() -> UpstreamHandle:
    """Make upstream's ``train_qwen.py`` train on qwenvl, as importing its ``trainer.py`` did (module docstring).

    Applying it twice is harmless (the second call changes nothing that the first has not); everything is
    undone by the returned handle's ``revert()``. Nothing is left half-applied: a step that fails undoes the
    ones before it.
    """
    # Here, not at import: qwenvl.train.trainer imports this module (it re-exports replace_qwen2_vl_attention_class),
    # and importing the trainer must load nothing of qwenvl.patches.
    from qwenvl.patches._handle import PatchRecorder

    recorder = PatchRecorder()
    try:
        if getattr(transformers.Trainer.create_optimizer, "__qwenvl_upstream__", False):
            return UpstreamHandle(recorder, {})
        used = _use_checkout_modules(recorder)
        _patch_trainer(recorder)
        transformers.Trainer.create_optimizer.__qwenvl_upstream__ = True
        _patch_model_classes(recorder)
    except BaseException:
        recorder.undo()
        raise
    if used:
        logger.info("upstream checkout modules in use: %s", ", ".join(f"{k} ({v})" for k, v in used.items()))
    return UpstreamHandle(recorder, used)

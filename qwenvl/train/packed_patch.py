"""A packed batch needs a patched model: patch it for a training run, or refuse the batch in one line.

``QwenVLTrainer.train`` on packed rows (a ``PackedDataset`` or the ``PackedCollator``) with nothing patched
patches the model for the run (:func:`_patch_for_packed_rows`); a packed batch that still reaches a model no
qwenvl patch covers (another collator, a patch reverted) is refused by ``QwenVLTrainer.training_step``
(:func:`_refuse_unpatched_packed`) instead of crashing in transformers' mask code or mixing samples.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["UnpatchedPackedBatch"]

# Part of QwenVLTrainer.train: its lines keep the trainer's logger, as before this module existed.
logger = logging.getLogger("qwenvl.train.trainer")


class UnpatchedPackedBatch(ValueError):
    """A packed batch reached a model that no qwenvl patch covers: transformers would crash on it, or worse,
    ignore its sample boundaries."""


def _refuse_unpatched_packed(model, inputs) -> None:
    """One line instead of a crash deep in transformers' mask code (or silently mixed samples): a batch in a
    packed convention that only the patch reads (``attention_mask`` as 1-D cu_seqlens, ``cu_seq_lens_q`` kwargs)
    while the model's family is not patched. Shape checks only: no host sync."""
    mask = inputs.get("attention_mask")
    packed = (isinstance(mask, torch.Tensor) and mask.ndim == 1) or "cu_seq_lens_q" in inputs
    if not packed:
        return
    from qwenvl.families import UnknownFamilyError, family_of_model
    from qwenvl.patches import active_patch

    try:
        family = family_of_model(model).name
    except UnknownFamilyError as exc:
        raise UnpatchedPackedBatch(f"a packed batch (cu_seqlens) for a model qwenvl cannot patch: {exc}") from None
    active = active_patch()
    if active is None or family not in active.families:
        raise UnpatchedPackedBatch(
            f"a packed batch (cu_seqlens) reached an unpatched {family} model: patch it first, "
            "`with qwenvl.patch(model): trainer.train()` (QwenVLTrainer.train does this when nothing is patched)"
        )


def _patch_for_packed_rows(model, train_dataset, data_collator):
    """``qwenvl.patch(model)``'s handle when training runs on packed rows and nothing is patched, else ``None``."""
    from qwenvl.data import PackedCollator, PackedDataset
    from qwenvl.families import UnknownFamilyError, family_of_model
    from qwenvl.patches import active_patch, patch

    packed = isinstance(train_dataset, PackedDataset) or isinstance(data_collator, PackedCollator)
    if not packed or active_patch() is not None:
        return None  # ordinary batches need no patch; a patch the caller applied stays theirs (training_step judges it)
    try:
        family = family_of_model(model).name
    except UnknownFamilyError:
        return None  # not a model we patch; a packed batch reaching it is refused in training_step
    logger.info("QwenVLTrainer: %s patched for packed batches (qwenvl.patch(model)) for this run", family)
    return patch(model)

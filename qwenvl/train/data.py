"""``qwenvl train``'s map-style data: the checked samples (``qwenvl.data.SupervisedDataset``), packed into rows
(``--packing``, the default) or padded into batches, with their summary; and ``--skip_bad_samples`` as both this
path and ``--streaming`` (``qwenvl.train.streaming``) take it.
"""

from __future__ import annotations

import logging

__all__ = ["skip_bad_samples", "map_style_rows"]

logger = logging.getLogger("qwenvl.train")


def skip_bad_samples(processor, data_args) -> bool:
    """``--skip_bad_samples``, turned on for the demo data where videos cannot load (its video rows are skipped)."""
    from qwenvl.data.processor import videos_available

    if data_args.data_path is None and not videos_available(processor):
        logger.warning("qwenvl train: torchvision is not installed: the demo's video rows are skipped")
        return True
    return data_args.skip_bad_samples


def map_style_rows(data_path: str, processor, model, data_args, training_args, skip_bad: bool) -> tuple:
    """``(train_dataset, collator, summary)``: the samples packed into rows (``--packing``, the default) or
    padded into batches, and the data summary (``data``, ``truncated``, ``skipped``; with packing ``packing``,
    ``fill_ratio`` and, packed for several ranks, ``ranks``)."""
    from qwenvl.data import PackedCollator, PackedDataset, PaddedCollator

    dataset = _samples(data_path, processor, model, data_args, training_args, skip_bad)
    summary = {"data": dataset.summary(), "truncated": len(dataset.truncated), "skipped": len(dataset.skipped)}
    if training_args.process_index == 0:
        logger.warning("qwenvl train: data: %s", summary["data"])
    pad = getattr(processor.tokenizer, "pad_token_id", None) or 0
    if not data_args.packing:
        return dataset, PaddedCollator(pad), summary
    shards = data_args.pack_shards or training_args.world_size
    budget = data_args.pack_budget or data_args.model_max_length
    train_dataset = PackedDataset(dataset, budget, seed=training_args.seed, shards=shards)
    summary["packing"] = train_dataset.packing.summary()
    summary["fill_ratio"] = train_dataset.packing.fill_ratio
    if shards > 1:
        summary["ranks"] = train_dataset.packing.report()
    if training_args.process_index == 0:
        logger.warning("qwenvl train: packing: %s", summary["packing"])
    collator = PackedCollator(
        data_args.packing_convention, pad_to_multiple_of=data_args.pad_to_multiple_of, pad_token_id=pad
    )
    return train_dataset, collator, summary


def _samples(data_path: str, processor, model, data_args, training_args, skip_bad: bool):
    """The checked samples (``SupervisedDataset``) of the base model (under LoRA, the wrapped one)."""
    from qwenvl.data import SupervisedDataset
    from qwenvl.families import base_model

    return SupervisedDataset(
        data_path,
        processor,
        model=base_model(model),
        model_max_length=data_args.model_max_length,
        truncate=data_args.truncate,
        skip_bad_samples=skip_bad,
        num_workers=data_args.data_check_workers,
        seed=training_args.seed,
    )

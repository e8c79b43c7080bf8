"""``qwenvl train --streaming``: its option checks and its dataset (``qwenvl.data.StreamingDataset``).

Each rank reads its own shards (shard i on rank i % world); the Trainer (``QwenVLTrainer``) saves the stream's
position in every checkpoint and a resumed run goes on from there (docs/data.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["streaming_problem", "streaming_rows"]

logger = logging.getLogger("qwenvl.train")


def streaming_problem(data_args, training_args) -> str | None:
    """Why these options cannot run (one line, for ``Refused``), or ``None``: ``--streaming`` without
    ``--max_steps`` or with options of the map-style path; a streamed data path without ``--streaming``."""
    if not data_args.streaming:
        path = data_args.data_path or ""
        entries = [e.strip() for e in path.split(",") if e.strip()]
        streamed = [
            e
            for e in entries
            if any(c in e for c in "*?[") or Path(e).expanduser().is_dir() or e.endswith((".parquet", ".tar"))
        ]
        if streamed:
            return (
                f"--data_path {streamed[0]}: folders, glob patterns, parquet and tar files are read as a stream: "
                "add --streaming (and --max_steps)"
            )
        return None
    if training_args.max_steps is None or training_args.max_steps <= 0:
        return "--streaming needs --max_steps: a stream has no length, so an epoch cannot say when training ends"
    if not data_args.packing:
        return "--streaming packs rows online: it cannot be combined with --packing False"
    if data_args.pack_shards is not None:
        return (
            "--pack_shards packs the map-style dataset for several ranks; with --streaming each rank reads its own "
            "shards"
        )
    if data_args.stream_buffer < 2:
        return f"--stream_buffer must hold at least 2 samples, got {data_args.stream_buffer}"
    if training_args.dataloader_persistent_workers:
        return (
            "--streaming needs fresh DataLoader workers for each pass over the loader: drop "
            "--dataloader_persistent_workers"
        )
    return None


def streaming_rows(data_path: str, processor, model, data_args, training_args, skip_bad: bool) -> tuple:
    """``(train_dataset, collator, summary)`` for ``--streaming``: a ``StreamingDataset`` reading this rank's shards."""
    from qwenvl.data import PackedCollator
    from qwenvl.data.streaming import StreamingDataset
    from qwenvl.families import base_model

    budget = data_args.pack_budget or data_args.model_max_length
    dataset = StreamingDataset(
        data_path,
        processor,
        model=base_model(model),
        budget=budget,
        model_max_length=data_args.model_max_length,
        truncate=data_args.truncate,
        skip_bad_samples=skip_bad,
        buffer=data_args.stream_buffer,
        seed=training_args.seed,
        rank=training_args.process_index,
        world_size=training_args.world_size,
    )
    if training_args.process_index == 0:
        logger.warning("qwenvl train: streaming: %s", dataset.summary())
    pad = getattr(processor.tokenizer, "pad_token_id", None) or 0
    collator = PackedCollator(
        data_args.packing_convention, pad_to_multiple_of=data_args.pad_to_multiple_of, pad_token_id=pad
    )
    return dataset, collator, {"data": dataset.summary()}

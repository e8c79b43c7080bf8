"""The golden batch as packed rows: the batch stored in the golden tensors read back as its samples
(``golden_batch``), rows joined into the one batch the files record (``concat_rows``, for the writer) and split back
into the rows one forward each takes (``golden_rows``, for the check). Every row is built by the training collator
(``qwenvl.data.synthetic.PackedBatch``), each sample keeping the positions the files recorded.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qwenvl.verify.batches import PackedBatch, Sample

__all__ = ["golden_batch", "golden_rows", "concat_rows"]


def concat_rows(rows: Sequence[PackedBatch]) -> tuple[PackedBatch, list[int]]:
    """Packed rows as one batch of all their samples (in row order), and the token offsets where rows start."""
    whole = PackedBatch([item for row in rows for item in row.items], rows[0].family, rows[0].vision)
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r.input_ids.shape[1])
    return whole, starts


def golden_rows(batch: PackedBatch, row_starts: Sequence[int], *, config=None) -> tuple[list[PackedBatch], torch.Tensor]:
    """The packed rows of the golden batch (``batch.rows`` token offsets), each with its own cu_seqlens, and the
    batch's token index of every row token (rows concatenated).

    With ``config``, a row holding images and videos that the installed release cannot run in one forward
    (``qwenvl.verify.batches.split_by_media``: Qwen3-Omni on 4.57) is split as the data pipeline would split it.
    """
    from qwenvl.verify.batches import split_by_media

    cu = batch.cu_seqlens.tolist()
    samples = batch.samples
    rows, indices = [], []
    for start, end in zip(row_starts[:-1], row_starts[1:]):
        picked = [i for i, a in enumerate(cu[:-1]) if start <= a < end]
        groups = [picked]
        if config is not None:
            position = {id(samples[i]): i for i in picked}
            groups = [[position[id(s)] for s in group] for group in split_by_media(config, [samples[i] for i in picked])]
        for group in groups:
            rows.append(batch.select(group))
            indices.append(torch.cat([torch.arange(cu[i], cu[i + 1]) for i in group]))
    return rows, torch.cat(indices)


def golden_batch(tensors: dict[str, torch.Tensor]) -> PackedBatch:
    """The packed row stored in the golden tensors, as its samples with their recorded positions (the row the
    collator builds from them is the stored one: ``parity_tests/test_golden.py`` checks it)."""
    cu = tensors["batch.cu_seqlens"].tolist()
    images, videos = tensors["batch.images_per_sample"].tolist(), tensors["batch.videos_per_sample"].tolist()
    image_grid, video_grid = tensors.get("batch.image_grid_thw"), tensors.get("batch.video_grid_thw")
    positions = tensors["batch.position_ids"]
    items, patch = [], {"image": 0, "video": 0}
    grid_row = {"image": 0, "video": 0}

    def take(kind, grid, pixels, count):
        if not count:
            return None, None
        rows = grid[grid_row[kind] : grid_row[kind] + count]
        n = int(rows.prod(-1).sum())
        chunk = pixels[patch[kind] : patch[kind] + n]
        grid_row[kind] += count
        patch[kind] += n
        return chunk, rows

    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        pv, ig = take("image", image_grid, tensors.get("batch.pixel_values"), images[i])
        pvv, vg = take("video", video_grid, tensors.get("batch.pixel_values_videos"), videos[i])
        sample = Sample(tensors["batch.input_ids"][0, start:end], pv, ig, pvv, vg)
        items.append(sample.item(positions[:, 0, start:end]))
    return PackedBatch(items)

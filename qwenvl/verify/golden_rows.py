"""The golden batch as packed rows: the batch stored in the golden tensors read back with its samples
(``golden_batch``), rows joined into the one batch the files record (``concat_rows``, for the writer) and split back
into the rows one forward each takes (``golden_rows``, for the check).
"""

from __future__ import annotations

from typing import Sequence

import torch

from qwenvl.verify.batches import PackedBatch, Sample

__all__ = ["golden_batch", "golden_rows", "concat_rows"]


def concat_rows(rows: Sequence[PackedBatch]) -> tuple[PackedBatch, list[int]]:
    """Packed rows as one batch of all their samples (in row order), and the token offsets where rows start."""
    from qwenvl.packing import lengths_to_cu_seqlens

    samples = [s for row in rows for s in row.samples]

    def cat(name):
        present = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return torch.cat(present) if present else None

    whole = PackedBatch(
        samples=samples,
        input_ids=torch.cat([r.input_ids for r in rows], dim=1),
        cu_seqlens=lengths_to_cu_seqlens(torch.tensor([len(s) for s in samples])),
        position_ids=torch.cat([r.position_ids for r in rows], dim=-1),
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
    )
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r.input_ids.shape[1])
    return whole, starts


def _row(batch: PackedBatch, picked: Sequence[int]) -> tuple[PackedBatch, torch.Tensor]:
    """One packed row of the batch's samples ``picked`` (indices, in that order), and the batch's token index of
    each of its tokens."""
    from qwenvl.packing import lengths_to_cu_seqlens

    cu = batch.cu_seqlens.tolist()
    samples = [batch.samples[i] for i in picked]
    index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in picked])

    def cat(name):
        present = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return torch.cat(present) if present else None

    row = PackedBatch(
        samples=samples,
        input_ids=batch.input_ids[:, index],
        cu_seqlens=lengths_to_cu_seqlens(torch.tensor([len(s) for s in samples])),
        position_ids=batch.position_ids[:, :, index],
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
    )
    return row, index


def golden_rows(batch: PackedBatch, row_starts: Sequence[int], *, config=None) -> tuple[list[PackedBatch], torch.Tensor]:
    """The packed rows of the golden batch (``batch.rows`` token offsets), each with its own cu_seqlens, and the
    batch's token index of every row token (rows concatenated).

    With ``config``, a row holding images and videos that the installed release cannot run in one forward
    (``qwenvl.verify.batches.split_by_media``: Qwen3-Omni on 4.57) is split as the data pipeline would split it.
    """
    from qwenvl.verify.batches import split_by_media

    cu = batch.cu_seqlens.tolist()
    rows, indices = [], []
    for start, end in zip(row_starts[:-1], row_starts[1:]):
        picked = [i for i, a in enumerate(cu[:-1]) if start <= a < end]
        groups = [picked]
        if config is not None:
            position = {id(batch.samples[i]): i for i in picked}
            groups = [[position[id(s)] for s in group] for group in split_by_media(config, [batch.samples[i] for i in picked])]
        for group in groups:
            row, index = _row(batch, group)
            rows.append(row)
            indices.append(index)
    return rows, torch.cat(indices)


def golden_batch(tensors: dict[str, torch.Tensor]) -> PackedBatch:
    """The packed row stored in the golden tensors, with its samples (for the runs of each sample alone)."""
    cu = tensors["batch.cu_seqlens"].tolist()
    images, videos = tensors["batch.images_per_sample"].tolist(), tensors["batch.videos_per_sample"].tolist()
    image_grid, video_grid = tensors.get("batch.image_grid_thw"), tensors.get("batch.video_grid_thw")
    samples, patch = [], {"image": 0, "video": 0}
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
        samples.append(
            Sample(
                input_ids=tensors["batch.input_ids"][0, start:end],
                pixel_values=pv,
                image_grid_thw=ig,
                pixel_values_videos=pvv,
                video_grid_thw=vg,
            )
        )
    return PackedBatch(
        samples=samples,
        input_ids=tensors["batch.input_ids"],
        cu_seqlens=tensors["batch.cu_seqlens"],
        position_ids=tensors["batch.position_ids"],
        pixel_values=tensors.get("batch.pixel_values"),
        image_grid_thw=image_grid,
        pixel_values_videos=tensors.get("batch.pixel_values_videos"),
        video_grid_thw=video_grid,
    )

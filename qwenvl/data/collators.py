"""Collators: the samples of a batch as one packed row (``PackedCollator``) or as an ordinary padded batch
(``PaddedCollator``, the same samples the way an unpatched model takes them, for comparison).

A sample is a dict from ``SupervisedDataset``: ``input_ids (L,)``, ``labels (L,)``, ``position_ids (3, L)``
(its own mrope rows, from the model's ``get_rope_index`` on it alone), optional ``mm_token_type_ids (L,)``,
``pixel_values (P, D)``, ``image_grid_thw (n, 3)``, ``pixel_values_videos``, ``video_grid_thw``,
``second_per_grid_ts (n,)``. A packed row from ``PackedDataset`` is a list of such samples.

One packed row, upstream convention (three samples, T = 4 + 3 + 2)::

    input_ids       a0 a1 a2 a3 | b0 b1 b2 | c0 c1                     (1, T)
    attention_mask  [0, 4, 7, 9]                                       int32 cu_seqlens (S + 1,)
    position_ids    a's rows    | b's rows | c's rows                  (3, 1, T)
    labels          -100 .. .. .. | -100 .. .. | -100 ..               each sample's first label masked:
                                                                       no token predicts across a boundary
    pixel_values    a's patches, b's, c's (sample order); image_grid_thw likewise

``convention="hf_positions"`` sends no mask and 4-row positions ``[text; t; h; w]`` whose text row restarts
at 0 per sample (transformers' packed form); ``"hf_kwargs"`` adds transformers' flash kwargs to those
(``cu_seq_lens_q/k`` and ``max_length_q/k``). ``qwenvl verify`` and the synthetic batches of the tests and
benchmarks (``qwenvl.data.synthetic``) build their rows here too: there is one packed row.

Every packed row also carries ``qwenvl_host`` (``qwenvl.packing.HostMeta``): its boundaries on the host, so the
patched forward needs no host sync to learn them; given the model's vision preamble
(``PackedCollator.for_model``), also everything its vision tower derives from the grids
(``qwenvl.data.vision_meta``), computed here, in the DataLoader workers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from qwenvl.packing import (
    CONVENTIONS,
    HOST_KEY,
    IGNORE_INDEX,
    SKIPPED_KEY,
    VISUAL_KEY,
    HostMeta,
    cu_seqlens_to_position_ids,
    lengths_to_cu_seqlens,
    mask_boundary_labels,
)

__all__ = ["PackedCollator", "PaddedCollator", "to_device", "masked_segment", "VISION_KEYS", "SKIPPED_KEY", "STREAM_KEY", "CONVENTIONS", "IGNORE_INDEX"]

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
# A streamed packed row's position (``qwenvl.data.streaming``): carried by its first sample, passed through to the
# batch as a tuple (one per row), taken out by the trainer before the model sees the batch.
STREAM_KEY = "qwenvl_stream"


def _flatten(items: Sequence[Any]) -> list[dict]:
    samples = []
    for item in items:
        if isinstance(item, dict):
            samples.append(item)
        elif isinstance(item, (list, tuple)) and all(isinstance(s, dict) for s in item):
            samples.extend(item)
        else:
            raise TypeError(f"a collator takes samples (dicts) or packed rows (lists of dicts), got {type(item).__name__}")
    if not samples:
        raise ValueError("a batch needs at least one sample")
    return samples


def masked_segment(length: int, pad_token_id: int = 0, *, device=None) -> dict[str, torch.Tensor]:
    """A sample of ``length`` tokens that no loss sees: ``pad_token_id`` ids, every label ignored, text positions on
    the three mrope rows, no vision (a padded row's filler; a skipped sample's stand-in in the dataset)."""
    return {
        "input_ids": torch.full((length,), pad_token_id, dtype=torch.long, device=device),
        "labels": torch.full((length,), IGNORE_INDEX, dtype=torch.long, device=device),
        "position_ids": torch.arange(length, device=device).expand(3, length).clone(),
        "mm_token_type_ids": torch.zeros(length, dtype=torch.int32, device=device),
    }


def _skipped(samples: list[dict]) -> dict:
    """The skipped samples' names under ``SKIPPED_KEY`` and the streamed rows' positions under ``STREAM_KEY``, when
    there are any."""
    out = {}
    for key in (SKIPPED_KEY, STREAM_KEY):
        values = tuple(s[key] for s in samples if key in s)
        if values:
            out[key] = values
    return out


def _vision(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Vision tensors concatenated in sample order (the order the tokens appear in)."""
    out = {}
    for key in VISION_KEYS:
        present = [s[key] for s in samples if s.get(key) is not None]
        if present:
            out[key] = torch.cat(present)
    return out


class PackedCollator:
    """All samples of a batch as one packed row ``(1, T)``; see the module docstring for the layout.

    Args:
        convention: ``"upstream"`` (cu_seqlens as ``attention_mask``, ``(3, 1, T)`` positions),
            ``"hf_positions"`` (no mask, ``(4, 1, T)`` positions with the text row restarting per sample) or
            ``"hf_kwargs"`` (those positions plus ``cu_seq_lens_q/k``, ``max_length_q/k``).
    """

    def __init__(
        self, convention: str = "upstream", *, vision=None, pad_to_multiple_of: int | None = None, pad_token_id: int = 0
    ) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown packing convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive number of tokens, got {pad_to_multiple_of}")
        self.convention = convention
        self.vision = vision  # qwenvl.data.vision_meta.VisionPreamble, or None: the tower computes its own
        # Rows padded to a multiple of this many tokens take few distinct lengths, so kernels that compile per
        # shape (torch.compile, Triton autotune, tilelang) compile a bounded number of times over a run.
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else int(pad_to_multiple_of)
        self.pad_token_id = int(pad_token_id)

    def _filler(self, samples: list[dict]) -> list[dict]:
        """``samples`` and, where the row is padded, a trailing segment that no loss sees up to the multiple:
        ``pad_token_id``, every label ignored, text positions, no vision (its own segment: nothing attends
        across it; the MoE router loss leaves it out through ``VarlenMeta.padding``)."""
        total = sum(s["input_ids"].numel() for s in samples)
        extra = 0 if self.pad_to_multiple_of is None else -total % self.pad_to_multiple_of
        if not extra:
            return samples
        filler = masked_segment(extra, self.pad_token_id, device=samples[0]["input_ids"].device)
        if not all("mm_token_type_ids" in s for s in samples):
            filler.pop("mm_token_type_ids")
        return [*samples, filler]

    @classmethod
    def for_model(cls, model, convention: str = "upstream") -> "PackedCollator":
        """The collator for ``model``: its vision tower's inputs computed here, where the release takes them."""
        from qwenvl.data.vision_meta import VisionPreamble

        return cls(convention, vision=VisionPreamble.of(model))

    def _host(self, batch: dict, cu_seqlens: torch.Tensor, padding: int) -> HostMeta:
        """The host metadata of ``batch``, adding the vision tower's precomputed inputs to it."""
        vision, grids, checked = {}, {}, False
        if self.vision is not None and self.vision.config is not None:
            batch[VISUAL_KEY] = self.vision.check_placeholders(batch["input_ids"].cpu(), batch)
            checked = True
        if self.vision is not None:
            for modality in ("image", "video"):
                grid = batch.get(f"{modality}_grid_thw")
                if grid is None:
                    continue
                kwargs, offsets = self.vision.kwargs(modality, grid)
                batch.update(kwargs)
                vision.update(offsets)
                grids[f"{modality}_grid_thw"] = grid
        return HostMeta(tuple(cu_seqlens.tolist()), vision, grids, int(padding), checked)

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        real = _flatten(items)
        samples = self._filler(real)
        # On the samples' device (the host in a DataLoader; tests may collate rows already on the GPU).
        lengths = torch.tensor([s["input_ids"].numel() for s in samples], device=samples[0]["input_ids"].device)
        cu_seqlens = lengths_to_cu_seqlens(lengths)
        labels_T = mask_boundary_labels(torch.cat([s["labels"] for s in samples]), cu_seqlens, IGNORE_INDEX)
        positions_3T = torch.cat([s["position_ids"] for s in samples], dim=-1)
        batch = {
            "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": labels_T[None],
            **_vision(samples),
            **_skipped(samples),
        }
        if all("mm_token_type_ids" in s for s in samples):
            batch["mm_token_type_ids"] = torch.cat([s["mm_token_type_ids"] for s in samples])[None]
        batch[HOST_KEY] = self._host(batch, cu_seqlens, len(samples) > len(real) and samples[-1]["input_ids"].numel())
        if self.convention == "upstream":
            batch["attention_mask"] = cu_seqlens
            batch["position_ids"] = positions_3T[:, None, :]
            return batch
        text_T = cu_seqlens_to_position_ids(cu_seqlens, int(lengths.sum())).to(positions_3T.dtype)
        batch["position_ids"] = torch.cat([text_T[None], positions_3T])[:, None, :]
        if self.convention == "hf_kwargs":
            longest = int(lengths.max())
            batch.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
        return batch


def to_device(batch: dict, device) -> dict:
    """A collated batch on ``device`` the way a trainer moves it without waiting: each CPU tensor pinned and copied
    with ``non_blocking`` (no host sync on CUDA); the host metadata and plain values stay as they are."""
    device = torch.device(device)
    pin = device.type == "cuda"

    def move(value):
        if not isinstance(value, torch.Tensor) or value.device == device:
            return value
        if pin and value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()  # the DataLoader's pinning thread has usually done it already
        return value.to(device, non_blocking=pin)

    return {key: move(value) for key, value in batch.items()}


class PaddedCollator:
    """The same samples as an ordinary right-padded batch ``(B, L_max)`` with a 0/1 ``attention_mask``.

    Padding gets ``pad_token_id``, label -100 and position 1 (masked keys: never attended, never scored).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        samples = _flatten(items)
        width = max(s["input_ids"].numel() for s in samples)
        rows = len(samples)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.ones((3, rows, width), dtype=samples[0]["position_ids"].dtype)
        types = torch.zeros((rows, width), dtype=torch.int32) if all("mm_token_type_ids" in s for s in samples) else None
        for r, s in enumerate(samples):
            n = s["input_ids"].numel()
            input_ids[r, :n] = s["input_ids"]
            labels[r, :n] = s["labels"]
            mask[r, :n] = 1
            positions[:, r, :n] = s["position_ids"]
            if types is not None:
                types[r, :n] = s["mm_token_type_ids"]
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions, **_vision(samples), **_skipped(samples)}
        if types is not None:
            batch["mm_token_type_ids"] = types
        return batch

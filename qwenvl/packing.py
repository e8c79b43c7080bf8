"""Packed-sequence metadata: one validated object per forward, and exact converters.

Legend for shape suffixes: T = packed tokens, S = segments (samples), N = heads, H = head dim.

A packed row holds several samples back to back; attention must never cross a sample boundary::

    tokens        a0 a1 a2 | b0 b1 | c0 c1 c2 c3
    lengths       3          2       4
    cu_seqlens    0, 3, 5, 9                      (int32, S + 1 values)
    segment ids   0  0  0    1  1    2  2  2  2
    position ids  0  1  2    0  1    0  1  2  3   (restart at 0 per sample)

    causal block-diagonal mask (1 = may attend):
        a0 1
        a1 1 1
        a2 1 1 1
        b0       1
        b1       1 1
        c0           1
        ...

``cu_seqlens`` is the canonical representation; everything else converts to and from it. Zero-length
segments are allowed in ``cu_seqlens`` and lengths (they attend to nothing and own no token). Segment ids
keep them when the number of segments is given; position ids cannot represent them (a restart at 0 needs a
token), so the position-id round trip is exact only for segments of length >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import torch

__all__ = [
    "VarlenMeta",
    "validate_cu_seqlens",
    "lengths_to_cu_seqlens",
    "cu_seqlens_to_lengths",
    "cu_seqlens_to_segment_ids",
    "segment_ids_to_cu_seqlens",
    "cu_seqlens_to_position_ids",
    "position_ids_to_cu_seqlens",
    "mask_boundary_labels",
    "IGNORE_INDEX",
    "CONVENTIONS",
    "HostMeta",
    "HOST_KEY",
    "SKIPPED_KEY",
    "VISUAL_KEY",
]


class VarlenMeta(NamedTuple):
    """Varlen metadata for one packed forward, built and validated once, then read by every layer.

    Attributes:
        cu_seqlens: int32 ``(S + 1,)`` on the tensors' device, 0 first, non-decreasing, last = total tokens.
        max_seqlen: the longest segment, a Python int (what the kernels need on the host).
        num_segments: ``S``, zero-length segments included.
        offsets: the same boundaries as a host tuple, so per-segment backends never sync with the device.
        host_cu_seqlens: the same boundaries as an int64 CPU tensor: what a compiled region reads (a tensor is
            a graph input; the ints above would be baked into the graph and recompile it for every batch).
        padding: how many tokens at the end are a filler segment that no loss sees (a row padded to a stable
            length, ``PackedCollator(pad_to_multiple_of=...)``); 0 when none. The MoE router loss leaves them out.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_segments: int
    offsets: tuple[int, ...]
    host_cu_seqlens: torch.Tensor | None = None
    padding: int = 0

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor,
        *,
        total: int | None = None,
        device: torch.device | str | None = None,
        host_offsets: Sequence[int] | None = None,
    ) -> "VarlenMeta":
        """Validate ``cu_seqlens`` and build the metadata (one host sync: the boundaries are copied once).

        Args:
            cu_seqlens: integer ``(S + 1,)``, any integer dtype; converted to int32.
            total: the number of packed tokens it must end at (the q/k/v length), if known.
            device: the device of the tensors it will index; ``cu_seqlens`` must already be there.
            host_offsets: the same values already copied to the host by the caller (then no copy is made).
        """
        _check_structure(cu_seqlens, device)
        offsets = tuple(int(x) for x in (cu_seqlens.tolist() if host_offsets is None else host_offsets))
        if len(offsets) != cu_seqlens.numel():
            raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} values but host_offsets has {len(offsets)}")
        _check_offsets(offsets, total)
        return cls._build(cu_seqlens.to(torch.int32), offsets)

    @classmethod
    def from_offsets(cls, offsets: Sequence[int], *, total: int | None = None, device=None) -> "VarlenMeta":
        """Build from host boundaries, validated on the host and uploaded without waiting for the device."""
        offsets = tuple(int(x) for x in offsets)
        if not offsets:
            raise ValueError("cu_seqlens must hold at least one value (0), got an empty sequence")
        _check_offsets(offsets, total)
        host = torch.tensor(offsets, dtype=torch.int32)
        if device is not None and torch.device(device).type == "cuda":
            cu = host.pin_memory().to(device, non_blocking=True)
        else:
            cu = host.to(device) if device is not None else host
        return cls._build(cu, offsets)

    @classmethod
    def from_lengths(cls, lengths, *, device: torch.device | str | None = None) -> "VarlenMeta":
        """Build from host segment lengths (a list of ints or a 1-D tensor)."""
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths):
            raise ValueError(f"segment lengths must be >= 0, got {lengths}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls.from_offsets(offsets, device=device)

    @classmethod
    def _build(cls, cu_seqlens: torch.Tensor, offsets: tuple[int, ...]) -> "VarlenMeta":
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        return cls(
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths, default=0),
            num_segments=len(lengths),
            offsets=offsets,
            host_cu_seqlens=torch.tensor(offsets, dtype=torch.int64),
        )

    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def to(self, device: torch.device | str) -> "VarlenMeta":
        return self._replace(cu_seqlens=self.cu_seqlens.to(device))


# The batch key under which a collator hands the patched forward its HostMeta (popped at the model entry).
HOST_KEY = "qwenvl_host"
# A sample that failed to decode in a worker and was skipped (``SupervisedDataset(skip_bad_samples=True)``) carries
# this key naming it; the collators gather the names into the batch under it, the trainer counts them, and the
# model entry drops it.
SKIPPED_KEY = "qwenvl_skipped"
# The row's vision placeholder positions, int64 (2, V): ascending, and in the features' order (images, then videos),
# computed by the collator on the host and moved with the batch like any tensor: the vision features go into the text
# model by index at them instead of through boolean masks (a host sync each; qwenvl.patches._visual).
VISUAL_KEY = "qwenvl_visual_positions"


@dataclass(frozen=True)
class HostMeta:
    """What the collator computed on the host for one packed batch, so the patched forward never waits on the device
    to learn it (``batch[HOST_KEY]``; ``qwenvl.data.PackedCollator`` adds it):

        offsets   the batch's sample boundaries (its cu_seqlens, as a tuple)
        vision    for each vision cu_seqlens kwarg the batch carries (``image_cu_seqlens``, ...), its boundaries
        grids     host copies of the grid kwargs: what the model computes from them before its tower (split
                  sizes, GLM-4V's frame expansion) stays on the host; a tower that reads them on the device gets
                  its own copy (``FamilySpec.tower_reads_grid``)
        padding   the tokens of a trailing filler segment (a row padded to a stable length), 0 when none
        placeholders_checked  each modality's placeholder tokens counted against its features here: the model's
                  own check (a host sync per modality) is skipped

    It has no ``to`` and no ``pin_memory``: moving a batch to the device (the Trainer, accelerate, the DataLoader's
    pinning) leaves it on the host as it is. The values are trusted to be the batch's (the collator made both from
    the same numbers); a batch without it takes one host sync per distinct cu_seqlens instead.
    """

    offsets: tuple[int, ...]
    vision: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    grids: Mapping[str, torch.Tensor] = field(default_factory=dict)
    padding: int = 0  # the trailing filler segment's tokens (VarlenMeta.padding)
    placeholders_checked: bool = False  # each modality's placeholder count matched its features (on the host)


def validate_cu_seqlens(
    cu_seqlens,
    *,
    total: int | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Raise ``ValueError`` naming ``cu_seqlens`` and what is wrong with it; return ``None`` if it is valid.

    Checks: a tensor, 1-D, integer dtype, at least one value, on ``device`` (if given), starts at 0,
    never decreases, ends at ``total`` (if given). The value checks copy it to the host once.
    """
    _check_structure(cu_seqlens, device)
    _check_offsets(tuple(int(x) for x in cu_seqlens.tolist()), total)


def _check_structure(cu_seqlens, device) -> None:
    """The checks that need no values (no device sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.ndim != 1:
        raise ValueError(f"cu_seqlens must be 1-D (S + 1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype (int32), got {cu_seqlens.dtype}")
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must hold at least one value (0), got an empty tensor")
    if device is not None and torch.device(device) != cu_seqlens.device:
        want = torch.device(device)
        # "cuda" and "cuda:0" name the same device when the current device is 0.
        same = want.type == cu_seqlens.device.type and (want.index is None or cu_seqlens.device.index is None)
        if not same:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tensors are on {want}")


def _check_offsets(offsets: tuple[int, ...], total: int | None) -> None:
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if b < a:
            raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}]={b} < cu_seqlens[{i}]={a}")
    if offsets[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"cu_seqlens last value {offsets[-1]} does not fit int32")
    if total is not None and offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the total token count {total}, but its last value is {offsets[-1]}")


def lengths_to_cu_seqlens(lengths_S: torch.Tensor) -> torch.Tensor:
    """int ``(S,)`` segment lengths -> int32 ``(S + 1,)`` cu_seqlens (same device)."""
    if lengths_S.ndim != 1:
        raise ValueError(f"segment lengths must be 1-D, got shape {tuple(lengths_S.shape)}")
    zero = torch.zeros(1, dtype=torch.int32, device=lengths_S.device)
    return torch.cat([zero, lengths_S.to(torch.int32).cumsum(0, dtype=torch.int32)])


def cu_seqlens_to_lengths(cu_seqlens_S1: torch.Tensor) -> torch.Tensor:
    """int32 ``(S + 1,)`` -> int32 ``(S,)`` segment lengths."""
    return (cu_seqlens_S1[1:] - cu_seqlens_S1[:-1]).to(torch.int32)


def cu_seqlens_to_segment_ids(cu_seqlens_S1: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """int32 ``(S + 1,)`` -> int64 ``(T,)``: the segment each token belongs to (zero-length ones own none)."""
    lengths = cu_seqlens_to_lengths(cu_seqlens_S1).long()
    ids = torch.arange(lengths.numel(), device=cu_seqlens_S1.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def segment_ids_to_cu_seqlens(segment_ids_T: torch.Tensor, num_segments: int | None = None) -> torch.Tensor:
    """int ``(T,)`` non-decreasing segment ids -> int32 cu_seqlens.

    ``num_segments`` restores trailing zero-length segments (and is required to count them); ids that never
    occur in the middle come back as zero-length segments.
    """
    if segment_ids_T.ndim != 1:
        raise ValueError(f"segment ids must be 1-D, got shape {tuple(segment_ids_T.shape)}")
    if segment_ids_T.numel() and bool((segment_ids_T[1:] < segment_ids_T[:-1]).any()):
        raise ValueError("segment ids must be non-decreasing (each segment contiguous)")
    if segment_ids_T.numel() and int(segment_ids_T.min()) < 0:
        raise ValueError("segment ids must be >= 0")
    counts = torch.bincount(segment_ids_T.long(), minlength=num_segments or 0)
    if num_segments is not None and counts.numel() > num_segments:
        raise ValueError(f"segment ids reach {counts.numel() - 1} but num_segments={num_segments}")
    return lengths_to_cu_seqlens(counts)


def cu_seqlens_to_position_ids(cu_seqlens_S1: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """int32 ``(S + 1,)`` -> int64 ``(T,)`` positions restarting at 0 at each segment start."""
    seg = cu_seqlens_to_segment_ids(cu_seqlens_S1, total)
    starts = cu_seqlens_S1[:-1].long()
    return torch.arange(seg.numel(), device=seg.device) - starts[seg]


def position_ids_to_cu_seqlens(position_ids_T: torch.Tensor) -> torch.Tensor:
    """int ``(T,)`` positions -> int32 cu_seqlens: a new segment starts at every position that is 0.

    Every segment must start at 0 (the first token included); zero-length segments cannot be expressed.
    """
    if position_ids_T.ndim != 1:
        raise ValueError(f"position ids must be 1-D to derive cu_seqlens, got shape {tuple(position_ids_T.shape)}")
    total = position_ids_T.numel()
    if total == 0:
        return torch.zeros(1, dtype=torch.int32, device=position_ids_T.device)
    starts = torch.nonzero(position_ids_T == 0).flatten().to(torch.int32)
    end = torch.tensor([total], dtype=torch.int32, device=position_ids_T.device)
    cu = torch.cat([starts, end])
    if int(cu[0]) != 0:
        raise ValueError("position ids must start at 0 to mark the first segment")
    return cu


# The packed-batch conventions a patched model reads (qwenvl.patches), one name each everywhere:
#   upstream      attention_mask = cu_seqlens (int32, (S+1,)), position_ids (3, 1, T) restarting per sample
#   hf_positions  no mask, 4-row position_ids [text; t; h; w] whose text row restarts at 0 per sample
#   hf_kwargs     the 4-row positions plus cu_seq_lens_q/k and max_length_q/k (transformers' flash kwargs)
# The collators build all three (qwenvl.data.PackedCollator), the trainer takes any, and qwenvl verify checks each.
CONVENTIONS = ("upstream", "hf_positions", "hf_kwargs")

# The label that no loss sees (transformers' and torch's cross-entropy default).
IGNORE_INDEX = -100


def mask_boundary_labels(labels_T: torch.Tensor, cu_seqlens_S1: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels with each sample's first token set to ``ignore_index``, so no label predicts across a boundary.

    A causal LM loss shifts labels left by one: the logits at a sample's last token are scored against the
    label of the next sample's first token. Ignoring every first token removes exactly those pairs::

        tokens   a0 a1 a2 | b0 b1
        labels   -  a1 a2 | -  b1      (the loss pairs logits(a2) with b0's label: now ignored)

    ``labels_T`` may be ``(T,)`` or ``(1, T)``; a new tensor is returned.
    """
    out = labels_T.clone()
    flat = out.view(-1)
    starts = cu_seqlens_S1[:-1].long()
    starts = starts[starts < flat.numel()]  # zero-length segments at the end start nowhere
    flat[starts] = ignore_index
    return out

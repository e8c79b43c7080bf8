"""Hypothesis strategies for packings and attention problems; small keyword-only bounds, no filtering.

Segment lengths are drawn first and ``cu_seqlens`` derived from them, so every draw is a valid packing and
shrinking moves towards fewer, shorter segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from qwenvl.packing import VarlenMeta

__all__ = [
    "AttnCase",
    "segment_lengths",
    "packings",
    "windows",
    "attention_cases",
    "HEAD_CONFIGS",
    "HEAD_DIMS",
]

# (query heads, kv heads): MHA, GQA 2, GQA 3, MQA.
HEAD_CONFIGS = ((4, 4), (4, 2), (6, 2), (4, 1))
# Odd and non-multiple-of-8 dims included: SDPA on CPU takes any head dim.
HEAD_DIMS = (8, 13, 16, 32)


@st.composite
def segment_lengths(
    draw,
    *,
    min_segments: int = 1,
    max_segments: int = 8,
    max_length: int = 16,
    max_total: int = 64,
    min_total: int = 1,
    allow_empty: bool = True,
) -> tuple[int, ...]:
    """Segment lengths whose sum lies in ``[min_total, max_total]``; zero-length ones if ``allow_empty``."""
    n = draw(st.integers(min_segments, max_segments))
    low = 0 if allow_empty else 1
    lengths, budget = [], max_total
    for _ in range(n):
        # Keep room for the segments still to come when they cannot be empty.
        reserve = low * (n - len(lengths) - 1)
        length = draw(st.integers(low, max(low, min(max_length, budget - reserve))))
        lengths.append(length)
        budget -= length
    short = min_total - sum(lengths)
    if short > 0 and lengths:
        lengths[-1] += short
    return tuple(lengths)


def packings(**bounds) -> st.SearchStrategy[VarlenMeta]:
    """``VarlenMeta`` on the CPU built from drawn lengths (``bounds`` as for ``segment_lengths``)."""
    return segment_lengths(**bounds).map(VarlenMeta.from_lengths)


def windows(*, max_side: int = 8) -> st.SearchStrategy[tuple[int, int]]:
    """``(left, right)`` flash-attention windows, -1 = unbounded; the unbounded window is drawn often."""
    side = st.integers(-1, max_side)
    return st.one_of(st.just((-1, -1)), st.tuples(side, side))


@dataclass(frozen=True)
class AttnCase:
    """One attention problem; tensors come from ``seed`` so a failing draw prints in one line."""

    lengths: tuple[int, ...]
    n_heads: int = 4
    kv_heads: int = 4
    head_dim: int = 16
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    scale: float | None = None
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def tensors(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """Leaf ``q (T, N, H)``, ``k, v (T, K, H)`` requiring grad, and an upstream gradient ``(T, N, H)``."""
        gen = torch.Generator().manual_seed(self.seed)
        shapes = [
            (self.total, self.n_heads, self.head_dim),
            (self.total, self.kv_heads, self.head_dim),
            (self.total, self.kv_heads, self.head_dim),
            (self.total, self.n_heads, self.head_dim),
        ]
        q, k, v, grad = (
            torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes
        )
        return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad


@st.composite
def attention_cases(
    draw,
    *,
    max_segments: int = 8,
    max_length: int = 24,
    max_total: int = 64,
    head_configs=HEAD_CONFIGS,
    head_dims=HEAD_DIMS,
    max_window: int = 8,
) -> AttnCase:
    lengths = draw(segment_lengths(max_segments=max_segments, max_length=max_length, max_total=max_total))
    n_heads, kv_heads = draw(st.sampled_from(head_configs))
    return AttnCase(
        lengths=lengths,
        n_heads=n_heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from(head_dims)),
        causal=draw(st.booleans()),
        window=draw(windows(max_side=max_window)),
        scale=draw(st.none() | st.floats(0.05, 1.0)),
        seed=draw(st.integers(0, 2**16)),
    )

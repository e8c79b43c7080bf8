"""Packing metadata: exact round trips between representations, and loud failures on malformed cu_seqlens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given

from qwenvl.packing import (
    VarlenMeta,
    cu_seqlens_to_lengths,
    cu_seqlens_to_position_ids,
    cu_seqlens_to_segment_ids,
    lengths_to_cu_seqlens,
    position_ids_to_cu_seqlens,
    segment_ids_to_cu_seqlens,
    validate_cu_seqlens,
)
from strategies import segment_lengths

ANY_LENGTHS = segment_lengths(min_segments=1, max_segments=12, max_length=12, max_total=64, min_total=0)


def _cu(lengths) -> torch.Tensor:
    return lengths_to_cu_seqlens(torch.tensor(lengths, dtype=torch.int64))


@given(lengths=ANY_LENGTHS)
@example(lengths=(0,))
@example(lengths=(1,) * 12)
@example(lengths=(0, 3, 0, 0, 2, 0))
def test_lengths_round_trip(lengths):
    cu = _cu(lengths)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert cu_seqlens_to_lengths(cu).tolist() == list(lengths)


@given(lengths=ANY_LENGTHS)
@example(lengths=(0, 3, 0, 0, 2, 0))
def test_segment_ids_round_trip(lengths):
    cu = _cu(lengths)
    seg = cu_seqlens_to_segment_ids(cu)
    assert seg.numel() == sum(lengths)
    assert seg.tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert torch.equal(segment_ids_to_cu_seqlens(seg, num_segments=len(lengths)), cu)


@given(lengths=ANY_LENGTHS)
@example(lengths=(0, 3, 0, 0, 2, 0))
def test_position_ids_round_trip(lengths):
    cu = _cu(lengths)
    pos = cu_seqlens_to_position_ids(cu)
    assert pos.tolist() == [p for n in lengths for p in range(n)]
    steps = (pos[1:] - pos[:-1]).tolist()
    assert all(step == 1 or nxt == 0 for step, nxt in zip(steps, pos[1:].tolist())), "a step is neither +1 nor a reset"
    # Zero-length segments own no token, so position ids lose exactly them and nothing else.
    assert torch.equal(position_ids_to_cu_seqlens(pos), _cu([n for n in lengths if n]))


@given(lengths=ANY_LENGTHS)
def test_meta_constructors_agree(lengths):
    cu = _cu(lengths)
    by_cu = VarlenMeta.from_cu_seqlens(cu, total=sum(lengths), device="cpu")
    by_lengths = VarlenMeta.from_lengths(lengths)
    assert torch.equal(by_cu.cu_seqlens, by_lengths.cu_seqlens)
    assert by_cu.cu_seqlens.dtype == torch.int32
    assert by_cu.offsets == by_lengths.offsets == tuple(cu.tolist())
    assert by_cu.max_seqlen == by_lengths.max_seqlen == max(lengths)
    assert by_cu.num_segments == by_lengths.num_segments == len(lengths)
    assert by_cu.total == sum(lengths)
    assert by_cu.lengths() == list(lengths)


MALFORMED = [
    pytest.param(torch.zeros(2, 2, dtype=torch.int32), {}, r"cu_seqlens must be 1-D", id="not-1d"),
    pytest.param(torch.tensor([0.0, 3.0]), {}, r"cu_seqlens must have an integer dtype", id="float"),
    pytest.param(torch.tensor([True, False]), {}, r"cu_seqlens must have an integer dtype", id="bool"),
    pytest.param(torch.tensor([1, 3], dtype=torch.int32), {}, r"cu_seqlens must start at 0", id="not-from-0"),
    pytest.param(torch.tensor([0, 5, 3], dtype=torch.int32), {}, r"cu_seqlens must be non-decreasing", id="decreasing"),
    pytest.param(torch.tensor([0, 3, 5], dtype=torch.int32), {"total": 6}, r"cu_seqlens must end at .* 6", id="not-total"),
    pytest.param(
        torch.tensor([0, 3, 5], dtype=torch.int32, device="meta"), {"device": "cpu"}, r"cu_seqlens is on meta", id="device"
    ),
    pytest.param(torch.tensor([], dtype=torch.int32), {}, r"cu_seqlens must hold at least one value.*empty", id="empty"),
    pytest.param([0, 3], {}, r"cu_seqlens must be a torch.Tensor", id="not-a-tensor"),
]


@pytest.mark.parametrize("cu, kwargs, message", MALFORMED)
@pytest.mark.parametrize("check", [validate_cu_seqlens, VarlenMeta.from_cu_seqlens], ids=["validate", "meta"])
def test_malformed_cu_seqlens_raise(check, cu, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check(cu, **kwargs)


@pytest.mark.parametrize("cu", [[0], [0, 0, 0], [0, 4], [0, 1, 1, 7]])
def test_well_formed_edge_cases_pass(cu):
    meta = VarlenMeta.from_cu_seqlens(torch.tensor(cu, dtype=torch.int64), total=cu[-1])
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.offsets == tuple(cu)

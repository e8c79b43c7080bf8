"""Online packing of a stream (``qwenvl.data.stream.OnlinePacker``): every sample once, rows within the budget,
and a resumed run that continues exactly where the uninterrupted one would."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenvl.data.packer import pack
from qwenvl.data.stream import OnlinePacker

streams = st.lists(st.integers(1, 64), min_size=1, max_size=300)


def _stream(lengths, start=0):
    return ((f"shard0:{i}", n) for i, n in enumerate(lengths) if i >= start)


@settings(max_examples=40, deadline=None)
@given(lengths=streams, buffer=st.integers(2, 80), budget=st.integers(64, 200))
def test_every_sample_once_in_rows_within_the_budget(lengths, buffer, budget):
    rows = list(OnlinePacker(budget, buffer=buffer).rows(_stream(lengths)))
    keys = [k for row in rows for k in row.keys]
    assert sorted(keys) == sorted(f"shard0:{i}" for i in range(len(lengths)))
    assert all(0 < row.tokens <= budget for row in rows)
    assert [n for row in rows for n in row.lengths] == [lengths[int(k.split(":")[1])] for k in keys]


@settings(max_examples=40, deadline=None)
@given(lengths=streams, buffer=st.integers(2, 80), budget=st.integers(64, 200), cut=st.floats(0, 1))
def test_a_resumed_run_yields_exactly_the_rows_of_the_uninterrupted_one(lengths, buffer, budget, cut):
    whole = list(OnlinePacker(budget, buffer=buffer, seed=3).rows(_stream(lengths)))
    k = int(cut * len(whole))
    first = OnlinePacker(budget, buffer=buffer, seed=3)
    taken = list(itertools.islice(first.rows(_stream(lengths)), k))  # k rows trained, then the checkpoint
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = OnlinePacker(budget, buffer=buffer, seed=3, state=state)
    rest = list(resumed.rows(_stream(lengths, start=state["consumed"])))
    assert taken == whole[:k]
    assert rest == whole[k:], f"resumed at row {k} of {len(whole)}"
    assert resumed.fill_ratio == pytest.approx(OnlinePacker(budget, buffer=buffer, seed=3)._fill(whole))


def test_a_buffer_holding_the_whole_stream_packs_as_the_offline_packer():
    lengths = [(i * 37) % 61 + 1 for i in range(500)]
    packer = OnlinePacker(128, buffer=10_000)
    rows = list(packer.rows(_stream(lengths)))
    assert len(rows) == len(pack(lengths, 128).rows)
    small = OnlinePacker(128, buffer=64)
    list(small.rows(_stream(lengths)))
    assert packer.fill_ratio >= small.fill_ratio > 0.9, (packer.fill_ratio, small.fill_ratio)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="sample 'shard0:2' has 300 tokens; a row holds 1 to 128"):
        list(OnlinePacker(128, buffer=4).rows(_stream([5, 6, 300])))
    with pytest.raises(ValueError, match="the packing buffer must hold at least 2 samples, got 1"):
        OnlinePacker(128, buffer=1)

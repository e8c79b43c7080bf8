"""The reference is checked against itself three ways: mask builders agree (including an independent
block_diag construction and a per-segment loop), packed attention equals each segment attended alone, and
the torch reference equals the JAX reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwenvl.packing import VarlenMeta, cu_seqlens_to_position_ids, cu_seqlens_to_segment_ids
from qwenvl.reference import (
    attention_ref,
    block_diag_mask,
    mask_from_cu_seqlens,
    mask_from_position_ids,
    mask_from_segment_ids,
)
from strategies import AttnCase, attention_cases, segment_lengths, windows

LENGTHS = segment_lengths(max_segments=8, max_length=12, max_total=48)


def _loop_mask(lengths, *, causal, window) -> torch.Tensor:
    """Segment by segment with local positions; shares no code with the builders under test."""
    left, right = window
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length in lengths:
        for a in range(length):
            for b in range(length):
                ok = (not causal or b <= a) and (left < 0 or b >= a - left) and (right < 0 or b <= a + right)
                mask[start + a, start + b] = ok
        start += length
    return mask


@given(lengths=LENGTHS, causal=st.booleans(), window=windows(max_side=6))
@example(lengths=(1,) * 8, causal=True, window=(-1, -1))
@example(lengths=(0, 4, 0, 0, 3, 0), causal=False, window=(1, 0))
@example(lengths=(48,), causal=True, window=(0, 0))
def test_mask_builders_agree(lengths, causal, window):
    meta = VarlenMeta.from_lengths(lengths)
    expected = _loop_mask(lengths, causal=causal, window=window)
    by_cu = mask_from_cu_seqlens(meta.cu_seqlens, causal=causal, window=window)
    by_seg = mask_from_segment_ids(cu_seqlens_to_segment_ids(meta.cu_seqlens), causal=causal, window=window)
    # Zero-length segments own no token, so position ids (which cannot express them) give the same mask.
    by_pos = mask_from_position_ids(cu_seqlens_to_position_ids(meta.cu_seqlens), causal=causal, window=window)
    for name, mask in (("cu_seqlens", by_cu), ("segment_ids", by_seg), ("position_ids", by_pos)):
        assert mask.dtype == torch.bool, name
        assert torch.equal(mask, expected), f"mask_from_{name} differs from the per-segment loop"
    if window == (-1, -1):
        assert torch.equal(block_diag_mask(lengths, causal), expected), "block_diag construction differs"
    assert bool(expected.diagonal().all()), "every token must see itself"


@given(case=attention_cases(max_total=48))
@example(case=AttnCase(lengths=(0, 5, 0, 1, 7), n_heads=6, kv_heads=2, head_dim=13, causal=True, window=(2, 0)))
@example(case=AttnCase(lengths=(1,) * 10, n_heads=4, kv_heads=1, head_dim=8, causal=False))
def test_packed_reference_equals_each_segment_alone(case):
    q, k, v, _ = case.tensors(torch.float64, "cpu")
    meta = VarlenMeta.from_lengths(case.lengths)
    mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=case.causal, window=case.window)
    packed = attention_ref(q, k, v, mask, scale=case.scale)
    for start, end in zip(meta.offsets[:-1], meta.offsets[1:]):
        if start == end:
            continue
        alone_mask = _loop_mask([end - start], causal=case.causal, window=case.window)
        alone = attention_ref(q[start:end], k[start:end], v[start:end], alone_mask, scale=case.scale)
        # Same maths; only BLAS blocking differs with the matrix size (~1e-16), so float64 defaults.
        torch.testing.assert_close(packed[start:end], alone, msg=lambda m: f"segment {start}:{end}: {m}\n{case}")


def test_fully_masked_rows_are_zero_with_zero_gradient():
    q = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 1, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    for upcast in (True, False):
        out = attention_ref(q, k, v, mask, upcast=upcast)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert not dq[1].any() and not dq[3].any()
        assert not dk[3].any() and not dv[3].any(), "a key nobody may see got a gradient"


def test_reorder_ops_and_softcap_are_the_same_maths():
    case = AttnCase(lengths=(5, 7), n_heads=4, kv_heads=2, head_dim=16)
    q, k, v, _ = case.tensors(torch.float64, "cpu")
    mask = mask_from_cu_seqlens(VarlenMeta.from_lengths(case.lengths).cu_seqlens, causal=True)
    torch.testing.assert_close(attention_ref(q, k, v, mask), attention_ref(q, k, v, mask, reorder_ops=True))
    # A huge cap is the identity on scores; a small one changes them.
    torch.testing.assert_close(attention_ref(q, k, v, mask), attention_ref(q, k, v, mask, softcap=1e6))
    assert not torch.allclose(attention_ref(q, k, v, mask), attention_ref(q, k, v, mask, softcap=0.5))


def test_dropout_mask_in_reference():
    case = AttnCase(lengths=(6,), n_heads=2, kv_heads=2, head_dim=8)
    q, k, v, _ = case.tensors(torch.float64, "cpu")
    mask = mask_from_cu_seqlens(torch.tensor([0, 6]), causal=False)
    keep_all = torch.ones(2, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(
        attention_ref(q, k, v, mask, dropout_p=0.5, dropout_mask=keep_all) * 0.5, attention_ref(q, k, v, mask)
    )
    with pytest.raises(ValueError, match="dropout_mask"):
        attention_ref(q, k, v, mask, dropout_p=0.5)


# JAX compiles every op for every new shape (~1 s per draw on CPU), so this property draws fewer examples.
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (optional extra 'jax')")
@settings(max_examples=min(settings().max_examples, 12))
@given(case=attention_cases(max_total=32), softcap=st.sampled_from([0.0, 2.0]), reorder=st.booleans())
def test_torch_reference_equals_jax_reference(case, softcap, reorder):
    import numpy as np

    from qwenvl.reference import jax_attention

    meta = VarlenMeta.from_lengths(case.lengths)
    mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=case.causal, window=case.window)
    mask_jax = jax_attention.mask_from_cu_seqlens_jax(meta.cu_seqlens, causal=case.causal, window=case.window)
    np.testing.assert_array_equal(np.asarray(mask_jax), mask.numpy())

    gen = torch.Generator().manual_seed(case.seed)
    keep = torch.rand(case.n_heads, case.total, case.total, generator=gen) > 0.3
    for dtype in (torch.float64, torch.float32):
        q, k, v, _ = case.tensors(dtype, "cpu")
        opts = dict(scale=case.scale, softcap=softcap, reorder_ops=reorder, dropout_p=0.3, dropout_mask=keep)
        out = attention_ref(q, k, v, mask, **opts).detach()
        out_jax = np.asarray(jax_attention.attention_ref_jax(q, k, v, mask, **opts))
        assert out_jax.dtype == np.dtype(str(dtype).removeprefix("torch."))
        torch.testing.assert_close(torch.from_numpy(out_jax.copy()), out, msg=lambda m: f"{m}\n{case}")

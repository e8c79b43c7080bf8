"""Reference attention over a packed row with an explicit mask, in the style of flash-attention's tests.

Legend: T = packed tokens, S = segments, N = query heads, K = kv heads, H = head dim.

The mask is the whole specification: ``mask_TT[i, j]`` is True where query i may attend key j::

    tokens        a0 a1 a2 | b0 b1
    segment ids   0  0  0    1  1
    causal mask   a0  1
                  a1  1 1
                  a2  1 1 1
                  b0        1
                  b1        1 1
    window (1, 0) drops a2 -> a0: only i - 1 <= j <= i survives.

Nothing here is fast: scores are a dense ``(N, T, T)`` tensor.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_ref",
    "attention_ref_flash_out",
    "attention_ref_flash_grads",
    "mask_from_cu_seqlens",
    "mask_from_segment_ids",
    "mask_from_position_ids",
    "block_diag_mask",
]


def attention_ref(
    q_TNH: torch.Tensor,
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    mask_TT: torch.Tensor,
    *,
    upcast: bool = True,
    reorder_ops: bool = False,
    scale: float | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention, computed the plain way.

    Args:
        q_TNH: ``(T, N, H)``; k_TKH, v_TKH: ``(T, K, H)`` with ``N % K == 0`` (kv heads are repeated).
        mask_TT: bool ``(T, T)``, True = may attend.
        upcast: compute in float32 (float64 inputs stay float64) and return that dtype; with False the
            whole computation runs in the input dtype, which is the "plain PyTorch" error the tests scale by.
        reorder_ops: scale k instead of q (a different rounding of the same maths).
        scale: default ``1 / sqrt(H)``.
        softcap: if > 0, ``scores = softcap * tanh(scores / softcap)`` before masking.
        dropout_p, dropout_mask: bool keep-mask ``(N, T, T)``; dropped probabilities are zeroed and the kept
            ones scaled by ``1 / (1 - dropout_p)``. Required when ``dropout_p > 0``.

    Returns:
        ``(T, N, H)``. Rows with nothing to attend are exact zeros, with zero gradient (no NaN anywhere).
    """
    n_heads, kv_heads = q_TNH.shape[1], k_TKH.shape[1]
    if n_heads % kv_heads != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({kv_heads})")
    if upcast and q_TNH.dtype != torch.float64:
        q_TNH, k_TKH, v_TKH = q_TNH.float(), k_TKH.float(), v_TKH.float()
    k_TNH = k_TKH.repeat_interleave(n_heads // kv_heads, dim=1)
    v_TNH = v_TKH.repeat_interleave(n_heads // kv_heads, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q_TNH.shape[-1])
    if reorder_ops:
        scores_NTT = torch.einsum("qnh,knh->nqk", q_TNH, k_TNH * scale)
    else:
        scores_NTT = torch.einsum("qnh,knh->nqk", q_TNH * scale, k_TNH)
    if softcap > 0:
        scores_NTT = torch.tanh(scores_NTT / softcap) * softcap
    mask_TT = mask_TT.to(device=scores_NTT.device, dtype=torch.bool)
    empty_T1 = ~mask_TT.any(dim=-1, keepdim=True)
    # Fully masked rows would softmax to NaN; give them finite scores, then zero their probabilities.
    scores_NTT = scores_NTT.masked_fill(~mask_TT, float("-inf")).masked_fill(empty_T1, 0.0)
    probs_NTT = torch.softmax(scores_NTT, dim=-1).masked_fill(empty_T1, 0.0)
    if dropout_p > 0:
        if dropout_mask is None:
            raise ValueError("attention_ref needs dropout_mask when dropout_p > 0")
        probs_NTT = probs_NTT.masked_fill(~dropout_mask, 0.0) / (1 - dropout_p)
    return torch.einsum("nqk,knh->qnh", probs_NTT, v_TNH)


def attention_ref_flash_out(
    q_TNH: torch.Tensor,
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    mask_TT: torch.Tensor,
    *,
    scale: float | None = None,
    tf32x3: bool = False,
) -> torch.Tensor:
    """The forward computed plainly, in the input dtype, the way fused kernels compute it.

    ``attention_ref`` with ``upcast=False`` takes ``softmax(scale * S)``; FlashAttention-style kernels (and
    the memory-efficient SDPA kernel) fold the scale into a base-2 exponent and normalise last::

        c = scale * log2(e)            m = rowmax(S)
        P = exp2(fma(S, c, -(m * c)))  O = (P V) * (1 / rowsum(P))

    Both are plain computations of the same maths, but they round differently: with one key per query
    (a window of (0, 0), length-1 segments) the softmax is exactly 1 and ``O`` exactly ``V``, while here the
    fused multiply-add leaves the rounding of ``m * c`` in the exponent, so ``P`` is 1 within an ulp and
    ``O`` is ``V`` within an ulp or two. The tolerance rule takes the larger error of the two plain
    computations as its yardstick (``qwenvl.tolerances``). The fused multiply-add is computed exactly:
    the product of two numbers of the input dtype is exact in float64, rounded once to the input dtype.

    ``tf32x3``: float32 only; both matmuls (``S = Q K^T`` and ``P V``) as the memory-efficient SDPA kernel runs
    them on GPUs of compute capability 8.0 and later (its ``DefaultGemmType``: CUTLASS's
    ``OpMultiplyAddFastF32``, "3xTF32" on tensor cores): each operand split into ``big = tf32(x)`` and
    ``small = tf32(x - big)`` and the product taken as ``big*big' + big*small' + small*big'``. The split keeps
    about 21 of float32's 24 significant bits, so even ``P = 1`` leaves ``O`` within a few ulps of ``V``.

    Returns:
        ``(T, N, H)`` in the input dtype; rows with nothing to attend are exact zeros.
    """
    n_heads, kv_heads = q_TNH.shape[1], k_TKH.shape[1]
    dtype = q_TNH.dtype
    if scale is None:
        scale = 1.0 / math.sqrt(q_TNH.shape[-1])
    q_TNH, k_TKH, v_TKH = q_TNH.detach(), k_TKH.detach(), v_TKH.detach()
    k_TNH = k_TKH.repeat_interleave(n_heads // kv_heads, dim=1)
    v_TNH = v_TKH.repeat_interleave(n_heads // kv_heads, dim=1)
    mask_TT = mask_TT.to(device=q_TNH.device, dtype=torch.bool)
    empty_T1 = ~mask_TT.any(dim=-1, keepdim=True)
    if tf32x3 and dtype != torch.float32:
        raise ValueError(f"tf32x3 is a float32 matmul, got {dtype}")
    matmul = _matmul_tf32x3 if tf32x3 else torch.einsum
    scores_NTT = matmul("qnh,knh->nqk", q_TNH, k_TNH).masked_fill(~mask_TT, float("-inf"))
    max_NT1 = scores_NTT.amax(dim=-1, keepdim=True).masked_fill(empty_T1, 0.0)
    c = torch.tensor(scale * math.log2(math.e), dtype=dtype, device=q_TNH.device)
    exponent_NTT = (scores_NTT.double() * c.double() - (max_NT1 * c).double()).to(dtype)
    probs_NTT = torch.exp2(exponent_NTT).masked_fill(empty_T1, 0.0)
    inverse_NT1 = 1.0 / probs_NTT.sum(dim=-1, keepdim=True).masked_fill(empty_T1, 1.0)
    out_NTH = matmul("nqk,knh->nqh", probs_NTT, v_TNH) * inverse_NT1
    return out_NTH.transpose(0, 1)


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (10 stored mantissa bits) to nearest, ties away from zero (``cvt.rna.tf32.f32``):
    half of the dropped 13 bits' weight is added to the magnitude bits, then the 13 bits are cleared."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def _matmul_tf32x3(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``einsum(equation, a, b)`` of float32 operands the 3xTF32 way; the three products summed in float64 and
    rounded once (the accumulation's own rounding is the plain computation's, not what this adds)."""
    a_big, b_big = round_tf32(a), round_tf32(b)
    a_small, b_small = round_tf32(a - a_big), round_tf32(b - b_big)
    terms = ((a_big, b_big), (a_big, b_small), (a_small, b_big))
    return sum(torch.einsum(equation, x.double(), y.double()) for x, y in terms).float()


def attention_ref_flash_grads(
    q_TNH: torch.Tensor,
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    mask_TT: torch.Tensor,
    out_TNH: torch.Tensor,
    dout_TNH: torch.Tensor,
    *,
    scale: float | None = None,
    tf32x3: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` computed plainly, in the input dtype, by FlashAttention's backward algorithm.

    Autograd through ``attention_ref`` differentiates the softmax directly; fused kernels instead recompute
    the probabilities from the forward's log-sum-exp and subtract ``D = rowsum(dO * O)``::

        P  = exp(S_bwd - LSE_fwd)         S recomputed, rounded another way than in the forward
        dV = P^T dO      dP = dO V^T      dS = P * (dP - D)
        dQ = dS K * scale                 dK = dS^T Q * scale

    Both are plain computations of the same maths, but they round differently: where a segment is short or
    a window leaves one key per query, autograd's ``p * (g - sum(p * g))`` cancels exactly while ``dP - D``
    leaves a few ulps of ``|dO| |V|``, and ``P`` is no longer exactly 1. The tolerance rule therefore takes
    the larger error of the two plain computations as its yardstick (``qwenvl.tolerances``).

    Args:
        out_TNH: the forward output in the same dtype (the kernel's ``O`` in ``D``), ``(T, N, H)``.
        dout_TNH: the upstream gradient ``(T, N, H)``.
        tf32x3: float32 only; every matmul the 3xTF32 way (``attention_ref_flash_out``'s), as the memory-efficient
            SDPA kernel's backward runs them on GPUs of compute capability 8.0 and later. With one key per query
            ``dP - D`` is then a few TF32x3 ulps of ``|dO| |V|`` rather than float32 ones (measured on an H100:
            ``dk`` 2.5e-6 where the float32 yardsticks left 8.9e-8).
    Returns:
        ``dq (T, N, H)``, ``dk, dv (T, K, H)`` (kv-head groups summed), in the input dtype.
    """
    n_heads, kv_heads = q_TNH.shape[1], k_TKH.shape[1]
    group = n_heads // kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(q_TNH.shape[-1])
    q_TNH, k_TKH, v_TKH = q_TNH.detach(), k_TKH.detach(), v_TKH.detach()
    dout_TNH = dout_TNH.to(q_TNH.dtype)
    k_TNH = k_TKH.repeat_interleave(group, dim=1)
    v_TNH = v_TKH.repeat_interleave(group, dim=1)
    mask_TT = mask_TT.to(device=q_TNH.device, dtype=torch.bool)
    empty_T1 = ~mask_TT.any(dim=-1, keepdim=True)
    if tf32x3 and q_TNH.dtype != torch.float32:
        raise ValueError(f"tf32x3 is a float32 matmul, got {q_TNH.dtype}")
    einsum = _matmul_tf32x3 if tf32x3 else torch.einsum
    scores_fwd_NTT = einsum("qnh,knh->nqk", q_TNH * scale, k_TNH).masked_fill(~mask_TT, float("-inf"))
    lse_NT1 = torch.logsumexp(scores_fwd_NTT.masked_fill(empty_T1, 0.0), dim=-1, keepdim=True)
    scores_bwd_NTT = einsum("qnh,knh->nqk", q_TNH, k_TNH) * scale
    probs_NTT = torch.exp(scores_bwd_NTT - lse_NT1).masked_fill(~mask_TT, 0.0).masked_fill(empty_T1, 0.0)
    dv_TNH = einsum("nqk,qnh->knh", probs_NTT, dout_TNH)
    dprobs_NTT = einsum("qnh,knh->nqk", dout_TNH, v_TNH)
    d_NT1 = (dout_TNH * out_TNH.detach().to(q_TNH.dtype)).sum(-1).transpose(0, 1).unsqueeze(-1)
    dscores_NTT = probs_NTT * (dprobs_NTT - d_NT1)
    dq_TNH = einsum("nqk,knh->qnh", dscores_NTT, k_TNH) * scale
    dk_TNH = einsum("nqk,qnh->knh", dscores_NTT, q_TNH) * scale
    T = q_TNH.shape[0]

    def per_kv_head(t_TNH: torch.Tensor) -> torch.Tensor:
        return t_TNH.reshape(T, kv_heads, group, t_TNH.shape[-1]).sum(dim=2)

    return dq_TNH, per_kv_head(dk_TNH), per_kv_head(dv_TNH)


def _segment_mask_TT(seg_T: torch.Tensor, *, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """bool ``(T, T)`` from per-token segment ids by index arithmetic."""
    idx_T = torch.arange(seg_T.numel(), device=seg_T.device)
    q_T1, k_1T = idx_T[:, None], idx_T[None, :]
    mask_TT = seg_T[:, None] == seg_T[None, :]
    if causal:
        mask_TT &= q_T1 >= k_1T
    left, right = window
    if left >= 0:
        mask_TT &= k_1T >= q_T1 - left
    if right >= 0:
        mask_TT &= k_1T <= q_T1 + right
    return mask_TT


def mask_from_cu_seqlens(cu_seqlens: torch.Tensor, *, causal: bool, window: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """int ``(S + 1,)`` cu_seqlens -> bool ``(T, T)`` block-diagonal mask."""
    cu = cu_seqlens.long()
    lengths_S = cu[1:] - cu[:-1]
    seg_T = torch.repeat_interleave(torch.arange(lengths_S.numel(), device=cu.device), lengths_S)
    return _segment_mask_TT(seg_T, causal=causal, window=window)


def mask_from_segment_ids(
    segment_ids: torch.Tensor, *, causal: bool, window: tuple[int, int] = (-1, -1)
) -> torch.Tensor:
    """int ``(T,)`` segment ids (equal ids = same sample) -> bool ``(T, T)`` mask."""
    return _segment_mask_TT(segment_ids, causal=causal, window=window)


def mask_from_position_ids(
    position_ids: torch.Tensor, *, causal: bool, window: tuple[int, int] = (-1, -1)
) -> torch.Tensor:
    """int ``(T,)`` positions -> bool ``(T, T)`` mask; a new sample starts wherever the position is 0."""
    seg_T = torch.cumsum((position_ids == 0).long(), dim=0)
    return _segment_mask_TT(seg_T, causal=causal, window=window)


def block_diag_mask(lengths, causal: bool) -> torch.Tensor:
    """bool ``(T, T)`` from segment lengths via ``torch.block_diag``: a construction independent of the above."""
    blocks = []
    for length in (int(n) for n in lengths):
        ones = torch.ones(length, length)
        blocks.append(torch.tril(ones) if causal else ones)
    if not blocks:
        return torch.zeros(0, 0, dtype=torch.bool)
    return torch.block_diag(*blocks).bool()

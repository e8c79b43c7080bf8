"""Varlen (packed) attention with interchangeable backends: ``sdpa``, ``torch``, ``flash_attn``, ``auto``.

Legend: T = packed tokens, N = query heads, K = kv heads (N % K == 0), H = head dim.

Every backend computes the same thing; ``qwenvl.reference.attention_ref`` with a block-diagonal mask is the
specification::

    tokens   a0 a1 a2 | b0 b1          causal mask        window (1, 0), causal
    a0                                 1                  1
    a1                                 1 1                1 1
    a2                                 1 1 1                1 1
    b0                                       1                  1
    b1                                       1 1                1 1

Options a backend cannot honour raise ``UnsupportedAttentionOption``; none is silently dropped. The backend
is resolved (and its device and options checked) before it is called: see ``_registry``.
"""

from __future__ import annotations

import math

import torch

from ..packing import VarlenMeta
from ._common import UnsupportedAttentionOption
from ._registry import BACKENDS, available_backends, long_causal_forward, resolve_backend, unavailable_reason

__all__ = [
    "varlen_attention",
    "available_backends",
    "unavailable_reason",
    "resolve_backend",
    "UnsupportedAttentionOption",
    "BACKENDS",
]


def varlen_attention(
    q_TNH: torch.Tensor,
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    meta: VarlenMeta,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    training: bool = False,
) -> torch.Tensor:
    """Attention within each packed segment; returns ``(T, N, H)`` in the dtype of ``q``.

    Args:
        q_TNH: ``(T, N, H)`` queries, float.
        k_TKH, v_TKH: ``(T, K, H)`` keys and values, same dtype and device; ``N % K == 0`` (GQA/MQA).
        meta: the packing; ``meta.total == T`` and ``meta.cu_seqlens`` on q's device.
        causal: query i attends key j only if ``j <= i`` (within its segment).
        scale: score scale, default ``1 / sqrt(H)``.
        dropout_p: dropout on the attention probabilities (pass 0 at eval).
        window: ``(left, right)`` in flash-attention's convention: query i attends key j of its segment
            iff ``i - left <= j <= i + right``; -1 leaves that side unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        backend: a name from ``BACKENDS`` or ``"auto"``.
        compute_dtype: the half dtype fp32 inputs are cast to for fp16/bf16-only kernels; default the CUDA
            autocast dtype if autocast is on, else bfloat16.
        training: the calling module is training. ``auto``'s shape rule for forward-only calls then stays off:
            a reentrant activation checkpoint runs its first pass without gradients and recomputes with them, and
            both passes must take the same kernel.
    """
    _check_inputs(q_TNH, k_TKH, v_TKH, meta)
    _check_options(dropout_p, window, softcap)
    name = resolve_backend(
        backend,
        device=q_TNH.device,
        dtype=q_TNH.dtype,
        dropout_p=dropout_p,
        window=tuple(window),
        softcap=softcap,
        head_dim=q_TNH.shape[-1],
        long_causal_forward=long_causal_forward(
            meta,
            causal=bool(causal),
            needs_grad=training or (torch.is_grad_enabled() and any(t.requires_grad for t in (q_TNH, k_TKH, v_TKH))),
        ),
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q_TNH.shape[-1])
    return BACKENDS[name].attention(
        q_TNH,
        k_TKH,
        v_TKH,
        meta,
        causal=bool(causal),
        scale=float(scale),
        dropout_p=float(dropout_p),
        window=(int(window[0]), int(window[1])),
        softcap=float(softcap),
        compute_dtype=compute_dtype,
    )


def _check_inputs(q_TNH, k_TKH, v_TKH, meta) -> None:
    if not isinstance(meta, VarlenMeta):
        raise ValueError(f"meta must be a qwenvl.packing.VarlenMeta, got {type(meta).__name__}")
    for name, t in (("q", q_TNH), ("k", k_TKH), ("v", v_TKH)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor (tokens, heads, head_dim), got {shape}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if k_TKH.shape != v_TKH.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_TKH.shape)} and {tuple(v_TKH.shape)}")
    if q_TNH.shape[0] != k_TKH.shape[0] or q_TNH.shape[2] != k_TKH.shape[2]:
        raise ValueError(
            f"q {tuple(q_TNH.shape)} and k/v {tuple(k_TKH.shape)} must share the token count and head dim"
        )
    n_heads, kv_heads = q_TNH.shape[1], k_TKH.shape[1]
    if kv_heads == 0 or n_heads % kv_heads != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({kv_heads})")
    if not (q_TNH.dtype == k_TKH.dtype == v_TKH.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q_TNH.dtype}, {k_TKH.dtype}, {v_TKH.dtype}")
    if not (q_TNH.device == k_TKH.device == v_TKH.device):
        raise ValueError(f"q, k, v must share a device, got {q_TNH.device}, {k_TKH.device}, {v_TKH.device}")
    if q_TNH.shape[0] != meta.total:
        raise ValueError(f"q/k/v hold {q_TNH.shape[0]} tokens but meta.cu_seqlens ends at {meta.total}")
    cu = meta.cu_seqlens
    if cu.device.type != q_TNH.device.type or (
        cu.device.index is not None and q_TNH.device.index is not None and cu.device.index != q_TNH.device.index
    ):
        raise ValueError(f"meta.cu_seqlens is on {cu.device} but q/k/v are on {q_TNH.device}")
    if cu.dtype != torch.int32 or cu.shape != (meta.num_segments + 1,):
        raise ValueError(
            f"meta.cu_seqlens must be int32 of shape ({meta.num_segments + 1},), got {cu.dtype} {tuple(cu.shape)}"
        )


def _check_options(dropout_p, window, softcap) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if len(window) != 2 or any(int(w) != w or w < -1 for w in window):
        raise ValueError(f"window must be (left, right) with ints >= -1 (-1 = unbounded), got {window}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap}")

"""The reference attention again, written in JAX: a second implementation to check the first against.

Legend: T = packed tokens, S = segments, N = query heads, K = kv heads, H = head dim.

Inputs are torch tensors (or anything with ``__dlpack__``), handed over through DLPack; outputs are jax
arrays. JAX is imported on first call (optional extra ``jax``); float64 inputs switch on ``jax_enable_x64``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_ref_jax", "mask_from_cu_seqlens_jax"]


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def _to_jax(x):
    jax, _ = _jax()
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.float64:
            jax.config.update("jax_enable_x64", True)
        elif x.dtype == torch.int64:
            # Index tensors are small; int32 keeps them exact without switching x64 on.
            x = x.to(torch.int32)
        x = x.contiguous()
    return jax.dlpack.from_dlpack(x)


def attention_ref_jax(
    q_TNH,
    k_TKH,
    v_TKH,
    mask_TT,
    *,
    upcast: bool = True,
    reorder_ops: bool = False,
    scale: float | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_mask=None,
):
    """Same contract as ``qwenvl.reference.attention_ref``; returns a jax array ``(T, N, H)``."""
    _, jnp = _jax()
    q, k, v, mask = (_to_jax(x) for x in (q_TNH, k_TKH, v_TKH, mask_TT))
    n_heads, kv_heads = q.shape[1], k.shape[1]
    if n_heads % kv_heads != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({kv_heads})")
    if upcast and q.dtype != jnp.float64:
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    k = jnp.repeat(k, n_heads // kv_heads, axis=1)
    v = jnp.repeat(v, n_heads // kv_heads, axis=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = jnp.asarray(scale, dtype=q.dtype)
    if reorder_ops:
        scores = jnp.einsum("qnh,knh->nqk", q, k * scale)
    else:
        scores = jnp.einsum("qnh,knh->nqk", q * scale, k)
    if softcap > 0:
        cap = jnp.asarray(softcap, dtype=scores.dtype)
        scores = jnp.tanh(scores / cap) * cap
    mask = mask.astype(bool)
    empty = ~mask.any(axis=-1, keepdims=True)
    scores = jnp.where(mask, scores, -jnp.inf)
    scores = jnp.where(empty, jnp.zeros((), scores.dtype), scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores)
    probs = weights / weights.sum(axis=-1, keepdims=True)
    probs = jnp.where(empty, jnp.zeros((), probs.dtype), probs)
    if dropout_p > 0:
        if dropout_mask is None:
            raise ValueError("attention_ref_jax needs dropout_mask when dropout_p > 0")
        keep = _to_jax(dropout_mask).astype(bool)
        probs = jnp.where(keep, probs, jnp.zeros((), probs.dtype)) / jnp.asarray(1 - dropout_p, probs.dtype)
    return jnp.einsum("nqk,knh->qnh", probs, v)


def mask_from_cu_seqlens_jax(cu_seqlens, *, causal: bool, window: tuple[int, int] = (-1, -1)):
    """int ``(S + 1,)`` cu_seqlens -> bool ``(T, T)`` jax mask, built from boundaries, not segment ids."""
    _, jnp = _jax()
    cu = _to_jax(cu_seqlens).astype(jnp.int32)
    total = int(cu[-1])
    idx = jnp.arange(total)
    # The segment of token t is the number of segment ends at or before t.
    seg = jnp.sum(cu[None, 1:] <= idx[:, None], axis=1)
    q, k = idx[:, None], idx[None, :]
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= q >= k
    left, right = window
    if left >= 0:
        mask &= k >= q - left
    if right >= 0:
        mask &= k <= q + right
    return mask

"""``flash_attn`` backend: the flash-attn package's ``flash_attn_varlen_func`` (FA3 when it can be used).

Legend: T = packed tokens, N = query heads, K = kv heads, H = head dim.

Imported lazily: neither ``flash_attn`` nor ``flash_attn_interface`` is loaded until this backend is used.
FA3 (``flash_attn_interface``, Hopper) has no dropout, so FA2 runs whenever ``dropout_p > 0``. Both take
GQA natively, softcap, and flash-attention's window convention, which is also ours.
"""

from __future__ import annotations

import functools
import importlib

import torch

from ._registry import (
    UnsupportedAttentionOption,
    effective_window,
    flash_kernel_refusal,
    half_precision_inputs,
)

NAME = "flash_attn"


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def _varlen_func(version: int):
    """``flash_attn_varlen_func`` of FA2 (``version=2``) or FA3 (``version=3``), or ``None`` if absent.

    Cached: a failed import is not remembered by Python, and ``auto`` asks once per layer call.
    """
    module = "flash_attn" if version == 2 else "flash_attn_interface"
    try:
        return importlib.import_module(module).flash_attn_varlen_func
    except (ImportError, OSError, AttributeError):
        # OSError / undefined-symbol ImportError: a wheel built for another torch or CUDA counts as absent.
        return None


def is_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _varlen_func(2) is not None or _varlen_func(3) is not None


def unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None:
    if dropout_p and _varlen_func(2) is None:
        return f"dropout_p={dropout_p} (only FA3 is installed)"
    return flash_kernel_refusal(dtype, head_dim)


def attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype):
    fa3, fa2 = _varlen_func(3), _varlen_func(2)
    if fa3 is None and fa2 is None:
        raise UnsupportedAttentionOption(NAME, "this environment", "flash-attn is not importable")
    if dropout_p and fa2 is None:
        raise UnsupportedAttentionOption(NAME, f"dropout_p={dropout_p}", "FA3 has no dropout and FA2 is absent")
    if q_TNH.device.type != "cuda":
        raise UnsupportedAttentionOption(NAME, f"device={q_TNH.device}", "flash-attn runs on CUDA only")
    if meta.total == 0:
        return torch.zeros_like(q_TNH)
    out_dtype, (q_TNH, k_TKH, v_TKH) = half_precision_inputs(NAME, compute_dtype, q_TNH, k_TKH, v_TKH)
    window_size = effective_window(causal, window)
    common = dict(softmax_scale=scale, causal=causal, window_size=window_size, softcap=softcap)
    args = (q_TNH, k_TKH, v_TKH, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
    if fa3 is not None and not dropout_p:
        out = fa3(*args, **common)
        # Some FA3 releases return (out, softmax_lse) unconditionally.
        out_TNH = out[0] if isinstance(out, tuple) else out
    else:
        out_TNH = fa2(*args, dropout_p=dropout_p, **common)
    return out_TNH.to(out_dtype)

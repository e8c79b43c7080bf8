"""``flash_attn`` backend: the flash-attn package's ``flash_attn_varlen_func`` (FA3 when it can be used).

Legend: T = packed tokens, N = query heads, K = kv heads, H = head dim.

flash-attn is an optional third-party package: ``_varlen_func`` is the one place that imports it, on first
use, so neither ``flash_attn`` nor ``flash_attn_interface`` is loaded until this backend is asked about.
FA3 (``flash_attn_interface``, Hopper) has no dropout, so FA2 runs whenever ``dropout_p > 0``. Both take
GQA natively, softcap, and flash-attention's window convention, which is also ours.
"""

from __future__ import annotations

import functools
import importlib

import torch

from ._common import effective_window, flash_kernel_refusal, half_precision_inputs

NAME = "flash_attn"


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


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "flash-attn needs CUDA"
    if not torch.cuda.is_available():
        return f"CUDA is not available to torch {torch.__version__}"
    if _varlen_func(2) is None and _varlen_func(3) is None:
        return "flash-attn not installed or not importable"
    return None


def unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None:
    if dropout_p and _varlen_func(2) is None:
        return f"dropout_p={dropout_p} (FA3 has no dropout and FA2 is not installed)"
    return flash_kernel_refusal(dtype, head_dim)


def attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype):
    if meta.total == 0:
        return torch.zeros_like(q_TNH)
    fa3, fa2 = _varlen_func(3), _varlen_func(2)
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

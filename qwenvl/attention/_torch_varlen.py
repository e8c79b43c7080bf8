"""``torch`` backend: ``torch.nn.attention.varlen.varlen_attn``, one kernel over the whole packed row.

Legend: T = packed tokens, N = query heads, K = kv heads, H = head dim.

CUDA only, fp16/bf16 only (fp32 inputs are cast to ``compute_dtype`` and back), no dropout, no softcap.
Causal attention is the window ``(-1, 0)``; a causal sliding window is ``(left, 0)``.

``torch.nn.attention.varlen`` is imported on first use, not with this module: it pulls in ``torch._dynamo``
(about 5 s on a CPU machine), which ``import qwenvl`` should not pay.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from ._common import effective_window, flash_kernel_refusal, half_precision_inputs

NAME = "torch"


@functools.lru_cache(maxsize=None)
def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn``, or ``None`` on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _has_gqa() -> bool:
    # torch 2.11's varlen_attn has no enable_gqa. The FlashAttention-2 op underneath it handles fewer kv
    # heads natively and has autograd, so GQA calls go to that op directly instead of repeating kv heads
    # (which cost 1.6x the kernel time at 8k tokens, 32 q / 8 kv heads, on an H200).
    return "enable_gqa" in inspect.signature(_varlen_attn()).parameters


def _flash_op_gqa(q_TNH, k_TKH, v_TKH, meta, *, scale, window):
    left, right = window
    out_TNH, *_ = torch.ops.aten._flash_attention_forward(
        q_TNH,
        k_TKH,
        v_TKH,
        meta.cu_seqlens,
        meta.cu_seqlens,
        meta.max_seqlen,
        meta.max_seqlen,
        0.0,
        (left, right) == (-1, 0),
        False,
        scale=scale,
        window_size_left=left,
        window_size_right=right,
    )
    return out_TNH


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "torch.nn.attention.varlen needs CUDA"
    if not torch.cuda.is_available():
        return f"CUDA is not available to torch {torch.__version__}"
    if _varlen_attn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None:
    if dropout_p:
        return f"dropout_p={dropout_p} (varlen_attn has no dropout)"
    if softcap:
        return f"softcap={softcap} (varlen_attn has no softcap)"
    return flash_kernel_refusal(dtype, head_dim)


def attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype):
    if meta.total == 0:
        return torch.zeros_like(q_TNH)
    head_dim = q_TNH.shape[-1]
    out_dtype, (q_TNH, k_TKH, v_TKH) = half_precision_inputs(NAME, compute_dtype, q_TNH, k_TKH, v_TKH)
    n_heads, kv_heads = q_TNH.shape[1], k_TKH.shape[1]
    gqa = {"enable_gqa": True} if n_heads != kv_heads and _has_gqa() else {}
    # The flash kernel wants the head dim a multiple of 8; zero columns change neither q.k nor the kept
    # part of the output (the scale is passed explicitly, so it still uses the true head dim).
    pad = -head_dim % 8
    if pad:
        q_TNH, k_TKH, v_TKH = (F.pad(t, (0, pad)) for t in (q_TNH, k_TKH, v_TKH))
    q_TNH, k_TKH, v_TKH = q_TNH.contiguous(), k_TKH.contiguous(), v_TKH.contiguous()
    window = effective_window(causal, window)
    if n_heads != kv_heads and not _has_gqa():
        out_TNH = _flash_op_gqa(q_TNH, k_TKH, v_TKH, meta, scale=scale, window=window)
    else:
        out_TNH = _varlen_attn()(
            q_TNH,
            k_TKH,
            v_TKH,
            meta.cu_seqlens,
            meta.cu_seqlens,
            meta.max_seqlen,
            meta.max_seqlen,
            scale=scale,
            window_size=window,
            **gqa,
        )
    if pad:
        out_TNH = out_TNH[..., :head_dim]
    return out_TNH.to(out_dtype)

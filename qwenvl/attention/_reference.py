"""``reference`` backend: the oracle from ``qwenvl.reference`` behind the backend interface.

A dense ``(T, T)`` block-diagonal mask and float64 softmax attention, cast back to the input dtype. Slow and
memory-hungry by design; ``auto`` never picks it. It lets a whole patched model run on the obvious
implementation, so model parity can be checked against the reference as well as against the unpatched model.
"""

from __future__ import annotations

import torch

from qwenvl.reference import attention_ref, mask_from_cu_seqlens

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    return None


def unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None:
    return f"dropout_p={dropout_p} (the reference draws no dropout mask)" if dropout_p else None


def attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype):
    mask_TT = mask_from_cu_seqlens(meta.cu_seqlens, causal=causal, window=window)
    out_TNH = attention_ref(
        q_TNH.double(), k_TKH.double(), v_TKH.double(), mask_TT, scale=scale, softcap=softcap or 0.0
    )
    return out_TNH.to(q_TNH.dtype)

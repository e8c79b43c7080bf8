"""``sdpa`` backend: one ``scaled_dot_product_attention`` call per segment; any device, any dtype.

Legend: T = packed tokens, L = tokens of one segment, N = query heads, K = kv heads, H = head dim.

Segments are cut with ``meta.offsets`` (host ints), so the loop never syncs with the device::

    q_TNH      a0 a1 a2 | b0 b1 | c0 c1 c2 c3
    call 1     [a0 a1 a2]                    (1, N, 3, H)
    call 2                [b0 b1]            (1, N, 2, H)
    call 3                        [c0 .. c3] (1, N, 4, H)

Exact for fp32/fp64; slower than a varlen kernel when there are many segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import effective_window

NAME = "sdpa"


def unavailable_reason(device: torch.device) -> str | None:
    return None


def unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None:
    if softcap:
        return f"softcap={softcap} (scaled_dot_product_attention has no softcap)"
    return None


def _window_mask_LL(length: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """bool ``(L, L)``, True where query i may attend key j: ``i - left <= j <= i + right`` (-1 = no bound)."""
    idx = torch.arange(length, device=device)
    diff = idx[:, None] - idx[None, :]  # i - j
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    return allowed


def attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype):
    left, right = effective_window(causal, window)
    use_is_causal = causal and left < 0
    needs_mask = not use_is_causal and (left >= 0 or right >= 0)
    gqa = q_TNH.shape[1] != k_TKH.shape[1]
    masks: dict[int, torch.Tensor] = {}
    pieces = []
    for start, end in zip(meta.offsets[:-1], meta.offsets[1:]):
        length = end - start
        if length == 0:
            continue
        mask_LL = None
        if needs_mask:
            if length not in masks:
                masks[length] = _window_mask_LL(length, left, right, q_TNH.device)
            mask_LL = masks[length]
        q_1NLH = q_TNH[start:end].transpose(0, 1).unsqueeze(0)
        k_1KLH = k_TKH[start:end].transpose(0, 1).unsqueeze(0)
        v_1KLH = v_TKH[start:end].transpose(0, 1).unsqueeze(0)
        out_1NLH = F.scaled_dot_product_attention(
            q_1NLH,
            k_1KLH,
            v_1KLH,
            attn_mask=mask_LL,
            dropout_p=dropout_p,
            is_causal=use_is_causal,
            scale=scale,
            enable_gqa=gqa,
        )
        pieces.append(out_1NLH.squeeze(0).transpose(0, 1))
    if not pieces:
        return torch.zeros_like(q_TNH)
    return torch.cat(pieces, dim=0)

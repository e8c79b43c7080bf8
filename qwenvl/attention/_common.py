"""What the backends and the registry share: the refusal error and the kernel limits and casts.

Imported by every backend module and by ``_registry``; it imports none of them, so there is no cycle.
"""

from __future__ import annotations

import torch

__all__ = [
    "UnsupportedAttentionOption",
    "HALF",
    "FLASH_MAX_HEAD_DIM",
    "effective_window",
    "flash_kernel_refusal",
    "half_precision_inputs",
]

HALF = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2 kernels (flash-attn and torch's varlen) stop here


class UnsupportedAttentionOption(ValueError):
    """A backend was asked for an option it cannot honour; raised instead of silently ignoring it."""

    def __init__(self, backend: str, option: str, why: str = ""):
        self.backend = backend
        self.option = option
        msg = f"attention backend {backend!r} does not support {option}"
        super().__init__(f"{msg}: {why}" if why else msg)


def effective_window(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """Fold ``causal`` into a flash-attention window ``(left, right)``; -1 means unbounded.

    Causal means ``j <= i``, which is the window's right side at 0 (a right bound >= 0 adds nothing).
    """
    left, right = window
    return (left, 0) if causal else (left, right)


def flash_kernel_refusal(dtype: torch.dtype, head_dim: int | None) -> str | None:
    """The dtype / head-dim limits shared by the FlashAttention kernels (fp32 is cast, so it is allowed)."""
    if dtype not in (*HALF, torch.float32):
        return f"dtype={dtype} (the kernel computes in float16/bfloat16; float32 is cast)"
    if head_dim is not None and head_dim > FLASH_MAX_HEAD_DIM:
        return f"head_dim={head_dim} (the kernel stops at {FLASH_MAX_HEAD_DIM})"
    return None


def half_precision_inputs(
    backend: str, compute_dtype: torch.dtype | None, *tensors: torch.Tensor
) -> tuple[torch.dtype, list[torch.Tensor]]:
    """Cast fp32 inputs for a half-precision-only kernel; return the dtype to cast the output back to.

    The dtype itself was already vetted by ``flash_kernel_refusal``. ``compute_dtype`` defaults to the CUDA
    autocast dtype when autocast is on, else bfloat16. The casts are differentiable, so gradients come back
    in the input dtype.
    """
    dtype = tensors[0].dtype
    if dtype in HALF:
        return dtype, list(tensors)
    if compute_dtype is None:
        on_cuda = tensors[0].device.type == "cuda"
        autocast = on_cuda and torch.is_autocast_enabled("cuda")
        compute_dtype = torch.get_autocast_dtype("cuda") if autocast else torch.bfloat16
    if compute_dtype not in HALF:
        raise ValueError(f"compute_dtype must be torch.float16 or torch.bfloat16 for {backend!r}, got {compute_dtype}")
    return dtype, [t.to(compute_dtype) for t in tensors]

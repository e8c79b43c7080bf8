"""Backend registry and ``auto`` selection.

Each backend lives in its own module and exposes the same three names:

* ``is_available(device) -> bool``: can it run on this device at all (cheap after the first call);
* ``unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None``: the first option it
  cannot honour, written as ``"option=value"``, or ``None``;
* ``attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype)``.

Modules are imported on first use, so ``import qwenvl.attention`` loads neither flash_attn nor the torch varlen
module.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

__all__ = ["UnsupportedAttentionOption", "Backend", "BACKENDS", "available_backends", "resolve_backend"]

_HALF = (torch.float16, torch.bfloat16)


class UnsupportedAttentionOption(ValueError):
    """A backend was asked for an option it cannot honour; raised instead of silently ignoring it."""

    def __init__(self, backend: str, option: str, why: str = ""):
        self.backend = backend
        self.option = option
        msg = f"attention backend {backend!r} does not support {option}"
        super().__init__(f"{msg}: {why}" if why else msg)


class Backend:
    """A named backend whose module is imported the first time it is used."""

    def __init__(self, name: str, module: str):
        self.name = name
        self._module_name = module
        self._module: ModuleType | None = None

    @property
    def module(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._module_name, __package__)
        return self._module

    def is_available(self, device: torch.device) -> bool:
        return self.module.is_available(device)

    def unsupported(self, **options) -> str | None:
        return self.module.unsupported(**options)

    def __call__(self, q_TNH, k_TKH, v_TKH, meta, **options) -> torch.Tensor:
        return self.module.attention(q_TNH, k_TKH, v_TKH, meta, **options)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", "._sdpa"),
    "torch": Backend("torch", "._torch_varlen"),
    "flash_attn": Backend("flash_attn", "._flash_attn"),
    # The oracle, for whole-model checks; never chosen by auto.
    "reference": Backend("reference", "._reference"),
}

# auto tries these in order on CUDA with half-precision inputs.
_AUTO_ORDER = ("flash_attn", "torch", "sdpa")


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def available_backends(device=None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU), registry order."""
    dev = _as_device(device)
    return [name for name, backend in BACKENDS.items() if backend.is_available(dev)]


def resolve_backend(
    name: str,
    *,
    device,
    dtype: torch.dtype,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    head_dim: int | None = None,
) -> str:
    """Turn ``name`` (a registry name or ``"auto"``) into the concrete backend to call.

    A concrete name is checked for availability only; the backend itself raises
    ``UnsupportedAttentionOption`` for options it cannot honour. ``auto`` picks, on CUDA with fp16/bf16,
    the first of flash_attn, torch, sdpa that is available and supports every requested option; anywhere else
    (CPU, fp32 on CUDA where sdpa is exact) it picks sdpa. If nothing supports the options,
    ``UnsupportedAttentionOption`` says which option each candidate refused.
    """
    return _resolve(name, _as_device(device), dtype, float(dropout_p), tuple(window), float(softcap), head_dim)


@functools.lru_cache(maxsize=256)
def _resolve(name, dev, dtype, dropout_p, window, softcap, head_dim) -> str:
    # Cached: the patched models ask once per layer call, and the answer depends only on these arguments.
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")
        if not BACKENDS[name].is_available(dev):
            raise ValueError(
                f"attention backend {name!r} is not available on {dev}; available here: {available_backends(dev)}"
            )
        return name
    options = dict(device=dev, dtype=dtype, head_dim=head_dim, dropout_p=dropout_p, window=window, softcap=softcap)
    candidates = _AUTO_ORDER if (dev.type == "cuda" and dtype in _HALF) else ("sdpa",)
    refusals = []
    for cand in candidates:
        backend = BACKENDS[cand]
        if not backend.is_available(dev):
            continue
        refused = backend.unsupported(**options)
        if refused is None:
            return cand
        refusals.append(f"{cand}: {refused}")
    raise UnsupportedAttentionOption("auto", "these options", "; ".join(refusals))


def effective_window(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """Fold ``causal`` into a flash-attention window ``(left, right)``; -1 means unbounded.

    Causal means ``j <= i``, which is the window's right side at 0 (a right bound >= 0 adds nothing).
    """
    left, right = window
    return (left, 0) if causal else (left, right)


FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2 kernels (flash-attn and torch's varlen) stop here


def flash_kernel_refusal(dtype: torch.dtype, head_dim: int | None) -> str | None:
    """The dtype / head-dim limits shared by the FlashAttention kernels (fp32 is cast, so it is allowed)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype={dtype}"
    if head_dim is not None and head_dim > FLASH_MAX_HEAD_DIM:
        return f"head_dim={head_dim}"
    return None


def half_precision_inputs(
    backend: str, compute_dtype: torch.dtype | None, *tensors: torch.Tensor
) -> tuple[torch.dtype, list[torch.Tensor]]:
    """Cast fp32 inputs for a half-precision-only kernel; return the dtype to cast the output back to.

    ``compute_dtype`` defaults to the CUDA autocast dtype when autocast is on, else bfloat16. The casts are
    differentiable, so gradients come back in the input dtype.
    """
    dtype = tensors[0].dtype
    if dtype in _HALF:
        return dtype, list(tensors)
    if dtype != torch.float32:
        raise UnsupportedAttentionOption(backend, f"dtype={dtype}", "it computes in float16/bfloat16 only")
    if compute_dtype is None:
        on_cuda = tensors[0].device.type == "cuda"
        autocast = on_cuda and torch.is_autocast_enabled("cuda")
        compute_dtype = torch.get_autocast_dtype("cuda") if autocast else torch.bfloat16
    if compute_dtype not in _HALF:
        raise ValueError(f"compute_dtype must be torch.float16 or torch.bfloat16 for {backend!r}, got {compute_dtype}")
    return dtype, [t.to(compute_dtype) for t in tensors]

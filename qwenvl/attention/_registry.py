"""Backend registry and ``auto`` selection.

Each backend is one module, imported here directly, exposing the same four names:

* ``NAME``: its key in ``BACKENDS``;
* ``unavailable_reason(device) -> str | None``: why it cannot run on this device at all, or ``None`` if it can
  (cheap after the first call);
* ``unsupported(*, device, dtype, head_dim, dropout_p, window, softcap) -> str | None``: the first option it
  cannot honour, written as ``"option=value (why)"``, or ``None``;
* ``attention(q_TNH, k_TKH, v_TKH, meta, *, causal, scale, dropout_p, window, softcap, compute_dtype)``:
  the computation, called only after ``resolve_backend`` accepted the device and the options, so it checks
  neither again.

Importing the backend modules is cheap: the torch varlen module and flash-attn are imported inside them on
first use (see each module).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from . import _flash_attn, _reference, _sdpa, _torch_varlen
from ._common import HALF, UnsupportedAttentionOption

__all__ = ["BACKENDS", "available_backends", "unavailable_reason", "resolve_backend", "long_causal_forward"]

BACKENDS: dict[str, ModuleType] = {
    module.NAME: module
    # Registry order is the order of available_backends(); "reference" is the oracle, never chosen by auto.
    for module in (_sdpa, _torch_varlen, _flash_attn, _reference)
}

# auto tries these in order on CUDA with half-precision inputs.
AUTO_ORDER = ("flash_attn", "torch", "sdpa")

# Where auto puts per-segment SDPA first, from docs/benchmarks.md "Attention kernel" (H200, bf16, causal, head dim
# 128; 8 and 32 kv heads): a forward alone, one SDPA call per segment, ran 1.29-1.51x faster than the varlen
# kernel over segments of >= 2048 tokens on average (32k tokens in 16 or 8 documents), 0.97x (0.49x with GQA) at
# 1024 (8k in 8) and 0.46x at 512 (8k in 16). With a backward it ran at 0.19-1.18x, so training keeps the varlen
# kernel. Only the measured head dims take the rule.
FORWARD_SDPA_MIN_MEAN = 2048
FORWARD_SDPA_HEAD_DIMS = (128,)


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unavailable_reason(name: str, device=None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (default: CUDA if present, else CPU), or ``None``."""
    return BACKENDS[name].unavailable_reason(_as_device(device))


def available_backends(device=None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU), registry order."""
    dev = _as_device(device)
    return [name for name, backend in BACKENDS.items() if backend.unavailable_reason(dev) is None]


def resolve_backend(
    name: str,
    *,
    device,
    dtype: torch.dtype,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    head_dim: int | None = None,
    long_causal_forward: bool = False,
) -> str:
    """Turn ``name`` (a registry name or ``"auto"``) into the concrete backend to call.

    This is the one place where availability and options are checked. A concrete name that cannot run on
    ``device`` is a ``ValueError`` giving the reason; one that cannot honour an option raises
    ``UnsupportedAttentionOption``. ``auto`` picks, on CUDA with fp16/bf16, the first of flash_attn, torch,
    sdpa that is available and supports every requested option; anywhere else (CPU, fp32 on CUDA where sdpa
    is exact) it picks sdpa. If nothing supports the options, ``UnsupportedAttentionOption`` says which
    option each candidate refused. ``long_causal_forward`` (a causal call without gradients whose segments average
    at least ``FORWARD_SDPA_MIN_MEAN`` tokens) puts sdpa first on CUDA at the head dims where it measured faster.
    """
    long = bool(long_causal_forward) and head_dim in FORWARD_SDPA_HEAD_DIMS
    return _resolve(name, _as_device(device), dtype, float(dropout_p), tuple(window), float(softcap), head_dim, long)


def long_causal_forward(meta, *, causal: bool, needs_grad: bool) -> bool:
    """Whether a call is one ``FORWARD_SDPA_MIN_MEAN`` is about, from the packing's host boundaries (no sync)."""
    return causal and not needs_grad and meta.total >= FORWARD_SDPA_MIN_MEAN * max(meta.num_segments, 1)


@functools.lru_cache(maxsize=256)
def _resolve(name, dev, dtype, dropout_p, window, softcap, head_dim, long=False) -> str:
    # Cached: the patched models ask once per layer call, and the answer depends only on these arguments.
    options = dict(device=dev, dtype=dtype, head_dim=head_dim, dropout_p=dropout_p, window=window, softcap=softcap)
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")
        why = BACKENDS[name].unavailable_reason(dev)
        if why is not None:
            raise ValueError(
                f"attention backend {name!r} is not available on {dev} ({why}); "
                f"available here: {available_backends(dev)}"
            )
        refused = BACKENDS[name].unsupported(**options)
        if refused is not None:
            raise UnsupportedAttentionOption(name, refused)
        return name
    candidates = AUTO_ORDER if (dev.type == "cuda" and dtype in HALF) else ("sdpa",)
    if long:
        candidates = ("sdpa", *(c for c in candidates if c != "sdpa"))
    refusals = []
    for cand in candidates:
        backend = BACKENDS[cand]
        if backend.unavailable_reason(dev) is not None:
            continue
        refused = backend.unsupported(**options)
        if refused is None:
            return cand
        refusals.append(f"{cand}: {refused}")
    raise UnsupportedAttentionOption("auto", "these options", "; ".join(refusals))

"""Varlen attention as one opaque operator, so a compiled region can hold it without recompiling per batch.

Inside ``torch.compile`` the packing must arrive as tensors: ``VarlenMeta``'s host ints (boundaries, longest
segment) would be baked into the graph as constants and guard it, so every new batch would recompile. The
operator ``qwenvl::varlen_attention`` takes the boundaries twice, as tensors (the device ``cu_seqlens`` the
kernels read and an int64 CPU copy the per-segment backends and ``max_seqlen`` come from), and runs the eager
``qwenvl.attention.varlen_attention`` inside; the compiler sees one node with a known output shape.

Its backward recomputes the forward under autograd and differentiates it (the same kernels and arithmetic as
eager mode; one extra attention forward per backward). Dropout is refused: a recomputed forward would draw
another mask.

Vision towers hand every block the same device ``cu_seqlens`` and no host copy: the operator takes the host
boundaries the collator sent (``remember_host_offsets``, called by the model entry), or else reads the tensor
once (one sync) and keeps it for the next blocks, keyed by the tensor's storage while it holds a reference to it.
"""

from __future__ import annotations

import torch

from qwenvl.packing import VarlenMeta

__all__ = ["compiled_varlen_attention"]

_HOST_CACHE: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []


def _key(cu_seqlens: torch.Tensor) -> tuple:
    return (cu_seqlens.data_ptr(), tuple(cu_seqlens.shape), cu_seqlens._version)


def remember_host_offsets(cu_seqlens: torch.Tensor, host_cu: torch.Tensor) -> None:
    """``host_cu`` (int64, CPU) holds ``cu_seqlens``'s values: the operator takes them from here, no sync (the
    vision boundaries the collator sent, registered by the model entry before the tower runs)."""
    # Holding the tensor keeps its storage alive, so no other tensor can reuse its address while it is cached.
    _HOST_CACHE[:] = [*_HOST_CACHE[-3:], (cu_seqlens, _key(cu_seqlens), host_cu)]


def _read_back(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens.to("cpu", torch.int64)  # a host sync


def _host_offsets(cu_seqlens: torch.Tensor, host_cu: torch.Tensor | None) -> torch.Tensor:
    if host_cu is not None and host_cu.numel() > 0:
        return host_cu
    key = _key(cu_seqlens)
    for tensor, cached_key, host in _HOST_CACHE:
        if cached_key == key:
            return host
    host = _read_back(cu_seqlens)  # one sync per distinct cu_seqlens the collator did not send
    remember_host_offsets(cu_seqlens, host)
    return host


def _meta(cu_seqlens: torch.Tensor, host_cu: torch.Tensor) -> VarlenMeta:
    offsets = tuple(host_cu.tolist())
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    return VarlenMeta(
        cu_seqlens=cu_seqlens.to(torch.int32),
        max_seqlen=max(lengths, default=0),
        num_segments=len(lengths),
        offsets=offsets,
        host_cu_seqlens=host_cu,
    )


def _eager(q, k, v, cu_seqlens, host_cu, causal, scale, window_left, window_right, softcap, backend, compute_dtype):
    from qwenvl.attention import varlen_attention

    meta = _meta(cu_seqlens, _host_offsets(cu_seqlens, host_cu))
    dtype = None if compute_dtype == "" else getattr(torch, compute_dtype)
    # training=True: the operator's body runs without autograd whether or not a backward follows, and the backward
    # recomputes the forward with gradients; both must take the same kernel (auto's forward-only rule stays off)
    return varlen_attention(
        q, k, v, meta, causal=causal, scale=scale, window=(window_left, window_right), softcap=softcap,
        backend=backend, compute_dtype=dtype, training=True,
    )


@torch.library.custom_op("qwenvl::varlen_attention", mutates_args=())
def _op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    host_cu: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
    compute_dtype: str,
) -> torch.Tensor:
    # Contiguous, as the fake kernel promises (the compiler plans the strides of what follows from it).
    out = _eager(q, k, v, cu_seqlens, host_cu, causal, scale, window_left, window_right, softcap, backend, compute_dtype)
    return out.contiguous()


@_op.register_fake
def _(q, k, v, cu_seqlens, host_cu, causal, scale, window_left, window_right, softcap, backend, compute_dtype):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@torch.library.custom_op("qwenvl::varlen_attention_backward", mutates_args=())
def _op_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    host_cu: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
    compute_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = (cu_seqlens, host_cu, causal, scale, window_left, window_right, softcap, backend, compute_dtype)
    # A custom operator's body runs with the autograd dispatch keys excluded; lift that for the recomputation
    # (torch.func's vjp would not do: torch's own varlen kernel is an autograd.Function without setup_context).
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = _eager(*leaves, *options)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_op_backward.register_fake
def _(grad, q, k, v, cu_seqlens, host_cu, causal, scale, window_left, window_right, softcap, backend, compute_dtype):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, host_cu, *options = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, host_cu)
    ctx.options = options


def _backward(ctx, grad):
    q, k, v, cu_seqlens, host_cu = ctx.saved_tensors
    dq, dk, dv = _op_backward(grad.contiguous(), q, k, v, cu_seqlens, host_cu, *ctx.options)
    return dq, dk, dv, None, None, *([None] * len(ctx.options))


_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_varlen_attention(
    q_TNH: torch.Tensor,
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    cu_seqlens: torch.Tensor,
    host_cu_seqlens: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``varlen_attention`` through the opaque operator (what the dispatcher calls inside a compiled region)."""
    if dropout_p:
        raise ValueError(
            "attention dropout inside a compiled region is not supported (the backward recomputes the forward, "
            "which would draw another dropout mask): set attention_dropout=0 or patch without compile=True"
        )
    if scale is None:
        scale = q_TNH.shape[-1] ** -0.5
    host = host_cu_seqlens if host_cu_seqlens is not None else cu_seqlens.new_empty(0, device="cpu", dtype=torch.int64)
    return _op(
        q_TNH,
        k_TKH,
        v_TKH,
        cu_seqlens,
        host,
        bool(causal),
        float(scale),
        int(window[0]),
        int(window[1]),
        float(softcap),
        backend,
        "" if compute_dtype is None else str(compute_dtype).removeprefix("torch."),
    )

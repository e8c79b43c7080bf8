"""Packed batches through linear-attention (Gated DeltaNet) layers: no state crosses a sample boundary.

A Gated DeltaNet layer (Qwen3.5) mixes tokens in two places, and both must restart at every sample start::

    x (T, D) -> in_proj_qkv -> causal depthwise conv1d (kernel W) -> q, k, v -> gated delta rule -> norm(., z) -> out_proj
                               ^ token t reads t-W+1 .. t              ^ state S_t = f(S_{t-1}, k_t, v_t)
                               zero history at each sample start        S = 0 at each sample start

transformers gets neither right for packed rows (its conv fallback drops the boundaries; the delta rule sees
them only on some releases), so once patched the layer's ``forward`` is wrapped: an ordinary call runs the
original; a call whose mask is a ``VarlenMeta`` runs one of these paths (``linear_backend``, whose names
``qwenvl.options.LINEAR_BACKENDS`` lists):

    segments   the original forward once per sample, cache off: each sample computes exactly what it computes
               alone, on any device and release (the default on CPU without flash-linear-attention).
    batched    the original forward once over the samples as rows of a right-padded batch: the conv and the
               delta rule are causal, so the padding after a sample never reaches it. One call instead of one
               per sample (the default on CUDA when fla cannot run the call); the same maths, batched.
    fla        our glue around flash-linear-attention's varlen Triton kernels (``causal_conv1d`` and
               ``chunk_gated_delta_rule``, both given ``cu_seqlens``): one call per layer (CUDA only).
    torch      the same glue with pure-torch kernels run per segment (the modeling module's own
               ``torch_chunk_gated_delta_rule``): proves the glue on CPU, where the fla kernels cannot run.

The glue reads the layer's parameters by name (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``,
``conv1d``, ``A_log``, ``dt_bias``, ``norm``, ``out_proj``: the same on every release that has the family);
``GLUE_ATTRIBUTES`` is checked when the patch is applied, and a layer lacking one refuses the glue paths.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from qwenvl.packing import VarlenMeta
from qwenvl.patches._handle import WRAPPED as _WRAPPED

__all__ = ["GLUE_ATTRIBUTES", "linear_forward", "resolve_linear_backend", "fla_available", "fla_problem"]

GLUE_ATTRIBUTES = (
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_b",
    "in_proj_a",
    "conv1d",
    "A_log",
    "dt_bias",
    "norm",
    "out_proj",
    "head_k_dim",
    "head_v_dim",
    "key_dim",
    "value_dim",
    "num_k_heads",
    "num_v_heads",
    "activation",
)
_CACHE_NAMES = ("cache", "cache_params", "past_key_values")


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def fla_problem(device: torch.device, *, backward: bool) -> str | None:
    """Why flash-linear-attention's kernels cannot run this call, or ``None``.

    fla 0.6 refuses its gated delta-rule backward on Hopper GPUs with Triton 3.4 to 3.7.0 (wrong results there,
    fla issue #640) unless tilelang is installed; torch 2.11 ships Triton 3.6. The forward is unaffected.
    """
    if device.type != "cuda":
        return f"its Triton kernels run on CUDA only, got tensors on {device}"
    if not fla_available():
        return "flash-linear-attention is not installed (pip install 'qwenvl[linear]')"
    if backward and importlib.util.find_spec("tilelang") is None:
        import triton
        from packaging.version import Version

        triton_version = Version(Version(triton.__version__).base_version)
        hopper = torch.cuda.get_device_capability(device)[0] == 9
        if hopper and Version("3.4.0") <= triton_version < Version("3.7.1"):
            return (
                f"fla refuses its gated delta-rule backward on Hopper with Triton {triton.__version__} (3.4 to 3.7.0 "
                "give wrong results, fla issue #640): upgrade Triton to 3.7.1 or install tilelang "
                "(pip install 'qwenvl[linear]' brings it on Linux x86_64)"
            )
    return None


def resolve_linear_backend(requested: str, device: torch.device, *, backward: bool = False) -> str:
    """``auto``: flash-linear-attention's kernels where they can run this call, else the exact per-sample path."""
    if requested == "auto":
        if fla_problem(device, backward=backward) is None:
            return "fla"
        return "batched" if device.type == "cuda" else "segments"
    if requested == "fla":
        problem = fla_problem(device, backward=backward)
        if problem is not None:
            raise ValueError(f"linear_backend='fla' cannot run here: {problem}")
    return requested


def linear_forward(original: Callable, state) -> Callable:
    """Wrap a Gated DeltaNet ``forward``: a ``VarlenMeta`` mask takes a packed path, anything else the original."""

    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        meta = kwargs.get("attention_mask")
        if not isinstance(meta, VarlenMeta):
            meta = next((a for a in args if isinstance(a, VarlenMeta)), None)
            if meta is None:
                return original(self, hidden_states, *args, **kwargs)
        backward = torch.is_grad_enabled() and hidden_states.requires_grad
        backend = resolve_linear_backend(state.linear_backend, hidden_states.device, backward=backward)
        if backend == "segments":
            return _segments(original, self, hidden_states, meta, args, kwargs)
        if backend == "batched":
            return _batched(original, self, hidden_states, meta, args, kwargs)
        kernels = _FLA if backend == "fla" else _TorchKernels(self)
        return _glue(self, hidden_states, meta, kernels)

    setattr(forward, _WRAPPED, original)
    return forward


def _without_state(args, kwargs) -> tuple[tuple, dict]:
    """The call's arguments with the packed mask and any cache removed (a packed row never continues one)."""
    args = tuple(None if isinstance(a, VarlenMeta) or _is_cache(a) else a for a in args)
    kwargs = {k: (None if k in _CACHE_NAMES else v) for k, v in kwargs.items() if k != "attention_mask"}
    return args, kwargs


def _is_cache(value) -> bool:
    return hasattr(value, "get_seq_length") or hasattr(value, "update_conv_state")


def _segments(original, module, hidden_BLD: torch.Tensor, meta: VarlenMeta, args, kwargs) -> torch.Tensor:
    B, L, D = hidden_BLD.shape
    args, kwargs = _without_state(args, kwargs)
    flat_1TD = hidden_BLD.reshape(1, B * L, D)
    pieces = [
        original(module, flat_1TD[:, start:end], *args, **kwargs)
        for start, end in zip(meta.offsets[:-1], meta.offsets[1:])
        if end > start
    ]
    return torch.cat(pieces, dim=1).reshape(B, L, -1)


def _batched(original, module, hidden_BLD: torch.Tensor, meta: VarlenMeta, args, kwargs) -> torch.Tensor:
    B, L, D = hidden_BLD.shape
    args, kwargs = _without_state(args, kwargs)
    bounds = [(start, end) for start, end in zip(meta.offsets[:-1], meta.offsets[1:]) if end > start]
    width = max(end - start for start, end in bounds)
    # Row r holds sample r from column 0; the padding after it reads token 0 and is multiplied by 0. Both index
    # maps are built on the host from the boundaries and uploaded without waiting (no device sync).
    scatter, gather = [], []
    for row, (start, end) in enumerate(bounds):
        scatter += [*range(start, end), *([0] * (width - (end - start)))]
        gather += range(row * width, row * width + end - start)
    device = hidden_BLD.device
    scatter_SW = _upload(torch.tensor(scatter).view(len(bounds), width), device)
    valid_SW = _upload((torch.arange(width)[None, :] < torch.tensor([e - s for s, e in bounds])[:, None]), device)
    gather_T = _upload(torch.tensor(gather), device)
    rows_SWD = hidden_BLD.reshape(B * L, D)[scatter_SW] * valid_SW[..., None].to(hidden_BLD.dtype)
    out_SWE = original(module, rows_SWD, *args, **kwargs)
    return out_SWE.reshape(len(bounds) * width, -1)[gather_T].reshape(B, L, -1)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# ---------------------------------------------------------------------------------------------------------
# The glue: the layer's own projections over the whole packed row, varlen kernels for the two token mixers.


def _glue(module, hidden_BLD: torch.Tensor, meta: VarlenMeta, kernels) -> torch.Tensor:
    missing = [name for name in GLUE_ATTRIBUTES if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"{type(module).__name__} has no {', '.join(missing)}: this release's layout is not the one the "
            "'fla'/'torch' linear backends were written for; use linear_backend='segments'"
        )
    B, L, D = hidden_BLD.shape
    T = B * L
    x_1TD = hidden_BLD.reshape(1, T, D)
    mixed_1TC = module.in_proj_qkv(x_1TD)
    z = module.in_proj_z(x_1TD).reshape(1, T, -1, module.head_v_dim)
    b = module.in_proj_b(x_1TD)
    a = module.in_proj_a(x_1TD)

    weight_CW = module.conv1d.weight.squeeze(1)
    mixed_1TC = kernels.conv(mixed_1TC, weight_CW, module.conv1d.bias, module.activation, meta)
    query, key, value = torch.split(mixed_1TC, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(1, T, -1, module.head_k_dim)
    key = key.reshape(1, T, -1, module.head_k_dim)
    value = value.reshape(1, T, -1, module.head_v_dim)
    groups = module.num_v_heads // module.num_k_heads
    if groups > 1:
        # Each q/k head serves `groups` consecutive value heads (transformers' repeat_interleave).
        query = query.repeat_interleave(groups, dim=2)
        key = key.repeat_interleave(groups, dim=2)

    beta = b.sigmoid()
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    core = kernels.delta_rule(query, key, value, g, beta, meta)

    core = module.norm(core.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
    return module.out_proj(core.reshape(B, L, -1))


FLA_CHUNK = 64  # the chunk size of fla's varlen conv1d and chunked delta rule (their defaults)


def chunk_indices(offsets: Sequence[int], chunk: int = FLA_CHUNK) -> torch.Tensor:
    """fla's ``(NT, 2)`` chunk table ``[segment, chunk within it]`` for the boundaries ``offsets``, built on the
    host (fla's ``prepare_chunk_indices`` builds the same on the device and reads it back: a host sync)::

        offsets [0, 100, 164]  ->  [[0, 0], [0, 1], [1, 0]]        (chunk 64: 100 tokens = 2 chunks, 64 = 1)
    """
    rows = [(i, j) for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])) for j in range(-(-(b - a) // chunk))]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


class _FlaKernels:
    """flash-linear-attention's varlen kernels: one call each over the packed row (B must be 1). The boundaries and
    the chunk table are handed over from the host, built once per forward (every linear layer gets the same
    ``VarlenMeta``): the kernels never read them back from the device."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, tuple] | None = None

    def _cu(self, meta: VarlenMeta) -> dict:
        if self._last is None or self._last[0] is not meta.cu_seqlens:
            table = chunk_indices(meta.offsets)
            if meta.cu_seqlens.is_cuda:
                table = table.pin_memory().to(meta.cu_seqlens.device, non_blocking=True)
            host = meta.host_cu_seqlens if meta.host_cu_seqlens is not None else torch.tensor(meta.offsets)
            self._last = (meta.cu_seqlens, {"cu_seqlens": meta.cu_seqlens.long(), "cu_seqlens_cpu": host, "chunk_indices": table.to(meta.cu_seqlens.device)})
        return self._last[1]

    def conv(self, x_1TC, weight_CW, bias, activation, meta):
        from fla.modules.causal_conv1d import causal_conv1d

        out, _ = causal_conv1d(x=x_1TC, weight=weight_CW, bias=bias, activation=activation, **self._cu(meta))
        return out

    def delta_rule(self, query, key, value, g, beta, meta):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        out, _ = chunk_gated_delta_rule(
            query,
            key,
            value,
            g=g,
            beta=beta,
            initial_state=None,
            output_final_state=False,
            use_qk_l2norm_in_kernel=True,
            **self._cu(meta),
        )
        return out


_FLA = _FlaKernels()


class _TorchKernels:
    """Pure-torch kernels, one call per segment: transformers' own conv fallback and chunked delta rule."""

    def __init__(self, module) -> None:
        self._rule = sys.modules[type(module).__module__].torch_chunk_gated_delta_rule

    @staticmethod
    def _segments(meta: VarlenMeta):
        return [(s, e) for s, e in zip(meta.offsets[:-1], meta.offsets[1:]) if e > s]

    def conv(self, x_1TC, weight_CW, bias, activation, meta):
        from transformers.activations import ACT2FN

        channels, width = weight_CW.shape
        x_1CT = x_1TC.transpose(1, 2)
        pieces = []
        for start, end in self._segments(meta):
            seg = F.conv1d(x_1CT[:, :, start:end].to(weight_CW.dtype), weight_CW.unsqueeze(1), bias, padding=width - 1, groups=channels)
            pieces.append(seg[:, :, : end - start])
        out = ACT2FN[activation](torch.cat(pieces, dim=-1)).to(x_1TC.dtype)
        return out.transpose(1, 2)

    def delta_rule(self, query, key, value, g, beta, meta):
        pieces = []
        for start, end in self._segments(meta):
            out, _ = self._rule(
                query[:, start:end],
                key[:, start:end],
                value[:, start:end],
                g=g[:, start:end],
                beta=beta[:, start:end],
                initial_state=None,
                output_final_state=False,
                use_qk_l2norm_in_kernel=True,
            )
            pieces.append(out)
        return torch.cat(pieces, dim=1)

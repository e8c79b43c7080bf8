"""The wrappers the patch installs: packed-batch detection at the model entry, mask-builder pass-through,
and attention dispatch to the varlen core.

Shape legend: B = batch rows, L = tokens per row, T = B * L packed tokens, N = query heads, K = kv heads,
H = head dim.

How a packed batch flows once patched::

    XForConditionalGeneration.forward(input_ids (B, L), attention_mask=cu_seqlens | None, position_ids, ...)
      entry wrapper (qwenvl.patches._entry): detect the convention, build one VarlenMeta, pass it on as
                     ``attention_mask``; with the collator's ``qwenvl_host`` (``HostMeta``) from its host
                     boundaries, no host sync; without it (a user's own collator), one (said once in the log)
      -> XModel.forward                   (entry wrapper again: already a VarlenMeta, passes through)
      -> text model: create_causal_mask(attention_mask=VarlenMeta, ...)  -> returns the VarlenMeta as is
      -> every decoder layer: attention_interface(module, q, k, v, attention_mask=VarlenMeta, ...)
           dispatcher: VarlenMeta -> qwenvl.attention.varlen_attention on (T, N, H), causal per module
      -> MoE router loss: load_balancing_loss_func(..., attention_mask=VarlenMeta) -> sees None (no padding)

Ordinary batches (a 2-D padding mask, a cache being continued, or no mask and positions that never restart
at 0 inside a row, as ``generate`` sends them) never meet a VarlenMeta and run the original code unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from qwenvl.attention import varlen_attention
from qwenvl.packing import VarlenMeta
from qwenvl.patches._entry import entry_forward, packed_meta_from_inputs
from qwenvl.patches._handle import WRAPPED as _WRAPPED

__all__ = [
    "PatchState",
    "entry_forward",
    "packed_meta_from_inputs",
    "mask_builder",
    "aux_loss",
    "DispatchingAttentionFunctions",
    "dispatcher",
]


@dataclass
class PatchState:
    """What the wrappers read at call time (one object per active patch)."""

    backend: str = "auto"
    # Linear-attention layers (Gated DeltaNet) of hybrid families: see qwenvl.patches._linear.
    linear_backend: str = "auto"
    # Vision encoders pass the same cu_seqlens tensor to every block: remember its metadata so validating
    # it costs one host sync per vision forward, not one per block.
    _vision_cache: list[tuple[torch.Tensor, VarlenMeta]] = field(default_factory=list)
    # This forward's placeholder counts were checked on the host (HostMeta.placeholders_checked): the model's own
    # check, a host sync per modality, is skipped (``placeholder_mask``).
    placeholders_checked: bool = False
    # This forward's vision placeholder positions on the device (the collator's VISUAL_KEY), or None: deepstack
    # then adds its features by index (``deepstack``) instead of through a boolean mask.
    visual_index: torch.Tensor | None = None
    # The same positions in the features' order (images, then videos): the vision features' gradient is gathered
    # there (``qwenvl.patches._visual``).
    modality_index: torch.Tensor | None = None
    # The VarlenMeta of the forward the fields above belong to (set by the model entry that built it).
    owner: VarlenMeta | None = None
    # Inside XModel.forward with the positions: get_*_features detach what they return, and the live features
    # (the output object, its live pooler_output) wait here for the text model's entry.
    reattach_open: bool = False
    in_features: bool = False
    reattached: bool = False
    pending: list = field(default_factory=list)
    # ... and their deepstack features go in at the text model's entry (its _deepstack_process adds them by
    # index): ``deepstack_by_hand`` for this forward, ``deepstack_handed`` once they went in (features' order).
    deepstack_by_hand: bool = False
    deepstack_handed: bool = False
    # A row's videos computed before XModel.forward, which then sees only its images (``media_apart``): their
    # pending entry, put in at the text model's entry after the images'.
    apart: tuple | None = None

    def forget(self) -> None:
        """A new forward: nothing of the last one's host metadata applies."""
        self.placeholders_checked, self.visual_index, self.modality_index, self.owner = False, None, None, None

    def vision_meta(self, cu_seqlens: torch.Tensor) -> VarlenMeta:
        for cached, meta in self._vision_cache:
            if cached is cu_seqlens:
                return meta
        return self.remember_vision(cu_seqlens)

    def remember_vision(self, cu_seqlens: torch.Tensor, host_offsets=None) -> VarlenMeta:
        """The metadata of a vision cu_seqlens tensor, kept for the blocks that receive the same tensor (from its
        host boundaries when the collator sent them: then no host sync)."""
        meta = VarlenMeta.from_cu_seqlens(cu_seqlens, host_offsets=host_offsets)
        self._vision_cache = [*self._vision_cache[-3:], (cu_seqlens, meta)]
        if host_offsets is not None:  # compiled vision blocks read their boundaries from there, no sync
            from qwenvl.attention._compiled import remember_host_offsets

            remember_host_offsets(cu_seqlens, meta.host_cu_seqlens)
        return meta


# ---------------------------------------------------------------------------------------------------------
# Mask builders and the router loss: let a VarlenMeta through untouched.


def _find_meta(args, kwargs) -> VarlenMeta | None:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, VarlenMeta):
        return mask
    for value in args:
        if isinstance(value, VarlenMeta):
            return value
    return None


def mask_builder(original: Callable) -> Callable:
    @functools.wraps(original)
    def build(*args, **kwargs):
        meta = _find_meta(args, kwargs)
        return meta if meta is not None else original(*args, **kwargs)

    setattr(build, _WRAPPED, original)
    return build


def _router_mask(meta: VarlenMeta, device) -> torch.Tensor | None:
    """The router loss's token mask for a packed row: ``None`` (every token counts) unless the row ends in a filler
    segment (``meta.padding``), whose tokens a ``(1, T)`` 0/1 mask leaves out (built on the device, no sync)."""
    if not meta.padding:
        return None
    mask = torch.ones(1, meta.total, dtype=torch.long, device=device)
    mask[:, meta.total - meta.padding :] = 0
    return mask


def aux_loss(original: Callable) -> Callable:
    """A packed row's router loss counts every real token: the mask becomes ``None``, or leaves out the filler
    segment of a padded row."""
    params = list(inspect.signature(original).parameters)
    mask_index = params.index("attention_mask")

    @functools.wraps(original)
    def loss(*args, **kwargs):
        gate = args[0] if args else kwargs.get("gate_logits")
        device = getattr(gate[0] if isinstance(gate, (tuple, list)) and gate else gate, "device", None)
        if isinstance(kwargs.get("attention_mask"), VarlenMeta):
            kwargs["attention_mask"] = _router_mask(kwargs["attention_mask"], device)
        if len(args) > mask_index and isinstance(args[mask_index], VarlenMeta):
            args = (*args[:mask_index], _router_mask(args[mask_index], device), *args[mask_index + 1 :])
        return original(*args, **kwargs)

    setattr(loss, _WRAPPED, original)
    return loss


# ---------------------------------------------------------------------------------------------------------
# Attention dispatch.


def _compute_dtype(module, query: torch.Tensor) -> torch.dtype | None:
    """The half dtype an fp32 activation should be cast to for a half-only kernel (PEFT upcasts, say)."""
    if query.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    for name in ("q_proj", "qkv"):
        proj = getattr(module, name, None)
        weight = getattr(proj, "weight", None)
        if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
            return weight.dtype
    return None


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (never float64)


def autocast_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs these tensors' matmuls in, or ``None``: autocast off on their device, or one of them
    of a dtype autocast leaves alone (float64)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device) or any(t.dtype not in _AUTOCAST_CASTS for t in tensors):
        return None
    return torch.get_autocast_dtype(device)


def _autocast_common(q, k, v):
    """Under autocast, queries, keys and values in the autocast dtype, as transformers' own attention computes
    them there (SDPA is on autocast's lower-precision list, and so are the eager path's matmuls); else unchanged.

    fp32 weights under bf16 autocast give bf16 projections, but the text rotary multiplies q and k by cos/sin made
    in the embeddings' fp32: transformers 5.25 hands over fp32 q, k with a bf16 v (the varlen kernels take one
    dtype), 5.17 all three in fp32 (which would resolve ``auto`` to the exact fp32 per-segment path instead of the
    half-precision kernel the unpatched SDPA runs)."""
    dtype = autocast_dtype(q, k, v)  # None with float64 among them: SDPA keeps a float64 call in float64
    if dtype is None or q.dtype == k.dtype == v.dtype == dtype:
        return q, k, v
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _varlen(module, query_BNLH, key_BKLH, value_BKLH, meta, *, causal, scaling, dropout, window, softcap, state):
    """``meta``: a ``VarlenMeta``, or inside a compiled region the ``(cu_seqlens, host copy or None)`` tensors."""
    query_BNLH, key_BKLH, value_BKLH = _autocast_common(query_BNLH, key_BKLH, value_BKLH)
    B, N, L, H = query_BNLH.shape
    q_TNH = query_BNLH.transpose(1, 2).reshape(B * L, N, H)
    k_TKH = key_BKLH.transpose(1, 2).reshape(B * L, key_BKLH.shape[1], H)
    v_TKH = value_BKLH.transpose(1, 2).reshape(B * L, value_BKLH.shape[1], value_BKLH.shape[-1])
    if torch.compiler.is_compiling() and not dropout:
        # (With attention dropout the eager path below is traced instead: the operator's recomputing backward
        # would draw another mask. Qwen-VL configs train with attention_dropout 0.)
        # Tensors only: the host ints of a VarlenMeta would become graph constants (a recompile per batch). The
        # entry wrapper, outside the compiled region, has already checked the boundaries against the batch.
        from qwenvl.attention._compiled import compiled_varlen_attention

        cu_seqlens, host_cu = (meta.cu_seqlens, meta.host_cu_seqlens) if isinstance(meta, VarlenMeta) else meta
        out_TNH = compiled_varlen_attention(
            q_TNH, k_TKH, v_TKH, cu_seqlens, host_cu, causal=causal, scale=scaling, dropout_p=dropout,
            window=window, softcap=softcap, backend=state.backend, compute_dtype=_compute_dtype(module, query_BNLH),
        )
        return out_TNH.reshape(B, L, N, out_TNH.shape[-1]), None
    if key_BKLH.shape[2] != L:
        raise ValueError(f"packed attention needs as many keys as queries, got {key_BKLH.shape[2]} keys for {L} queries")
    if meta.total != B * L:
        raise ValueError(f"cu_seqlens must end at the total token count {B * L}, but its last value is {meta.total}")
    out_TNH = varlen_attention(
        q_TNH,
        k_TKH,
        v_TKH,
        meta,
        causal=causal,
        scale=scaling,
        dropout_p=dropout,
        window=window,
        softcap=softcap,
        backend=state.backend,
        compute_dtype=_compute_dtype(module, query_BNLH),
        training=bool(getattr(module, "training", False)),
    )
    return out_TNH.reshape(B, L, N, out_TNH.shape[-1]), None


def dispatcher(fallback: Callable, state: PatchState) -> Callable:
    """An attention function: packed calls go to the varlen core, everything else to ``fallback``."""
    if getattr(fallback, _WRAPPED, None) is not None:
        return fallback

    @functools.wraps(fallback)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if isinstance(attention_mask, VarlenMeta):
            sliding = kwargs.get("sliding_window")
            return _varlen(
                module,
                query,
                key,
                value,
                attention_mask,
                causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
                scaling=kwargs.get("scaling"),
                dropout=float(kwargs.get("dropout") or 0.0),
                window=(sliding - 1, -1) if sliding else (-1, -1),
                softcap=float(kwargs.get("softcap") or 0.0),
                state=state,
            )
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None and not getattr(module, "is_causal", True) and attention_mask is None:
            # A vision encoder on its flash path: one varlen call over its own (window) cu_seqlens.
            meta = (cu_seqlens, None) if torch.compiler.is_compiling() else state.vision_meta(cu_seqlens)
            return _varlen(
                module,
                query,
                key,
                value,
                meta,
                causal=False,
                scaling=kwargs.get("scaling"),
                dropout=float(kwargs.get("dropout") or 0.0),
                window=(-1, -1),
                softcap=0.0,
                state=state,
            )
        return fallback(module, query, key, value, attention_mask, *args, **kwargs)

    setattr(attention, _WRAPPED, fallback)
    return attention


def varlen_only(module, query, key, value, attention_mask, *args, **kwargs):
    """The function registered under our own implementation name: it exists so that sub-configs set to that
    name take the flash (varlen) path; every call it receives is dispatched before it is reached."""
    raise ValueError(
        f"{type(module).__name__}: the qwenvl_flash_varlen implementation needs a packed batch or cu_seq_lens_q; "
        "is the qwenvl patch active?"
    )


class DispatchingAttentionFunctions:
    """Stands in for a modeling module's ``ALL_ATTENTION_FUNCTIONS`` global: every function it hands out is
    wrapped by ``dispatcher``. Everything else is forwarded to the real registry."""

    def __init__(self, real, state: PatchState) -> None:
        self._real = real
        self._state = state
        self._cache: dict[int, Callable] = {}

    def _wrap(self, fn: Callable) -> Callable:
        if torch.compiler.is_compiling():
            # Traced: a fresh wrapper is free, while reading or filling the cache would guard the graph on it.
            return dispatcher(fn, self._state)
        wrapped = self._cache.get(id(fn))
        if wrapped is None or getattr(wrapped, _WRAPPED, None) is not fn:
            wrapped = dispatcher(fn, self._state)
            self._cache[id(fn)] = wrapped
        return wrapped

    def __getitem__(self, name: str) -> Callable:
        return self._wrap(self._real[name])

    def get_interface(self, name: str, default: Callable) -> Callable:
        return self._wrap(self._real.get_interface(name, default))

    def get(self, name, default=None):
        fn = self._real.get(name, default)
        return self._wrap(fn) if callable(fn) else fn

    def __contains__(self, name) -> bool:
        return name in self._real

    def __getattr__(self, name):
        return getattr(self._real, name)

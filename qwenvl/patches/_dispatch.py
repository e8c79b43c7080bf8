"""The wrappers the patch installs: packed-batch detection at the model entry, mask-builder pass-through,
and attention dispatch to the varlen core.

Shape legend: B = batch rows, L = tokens per row, T = B * L packed tokens, N = query heads, K = kv heads,
H = head dim.

How a packed batch flows once patched::

    XForConditionalGeneration.forward(input_ids (B, L), attention_mask=cu_seqlens | None, position_ids, ...)
      entry wrapper: detect the convention, build one VarlenMeta (the only host sync of the forward),
                     pass it on as ``attention_mask``
      -> XModel.forward                   (entry wrapper again: already a VarlenMeta, passes through)
      -> text model: create_causal_mask(attention_mask=VarlenMeta, ...)  -> returns the VarlenMeta as is
      -> every decoder layer: attention_interface(module, q, k, v, attention_mask=VarlenMeta, ...)
           dispatcher: VarlenMeta -> qwenvl.attention.varlen_attention on (T, N, H), causal per module
      -> MoE router loss: load_balancing_loss_func(..., attention_mask=VarlenMeta) -> sees None (no padding)

Ordinary batches (a 2-D padding mask, or a cache being continued) never meet a VarlenMeta and run the
original code unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qwenvl.attention import varlen_attention
from qwenvl.packing import VarlenMeta

__all__ = ["PatchState", "entry_forward", "mask_builder", "aux_loss", "DispatchingAttentionFunctions", "dispatcher"]

_WRAPPED = "__qwenvl_wrapped__"


@dataclass
class PatchState:
    """What the wrappers read at call time (one object per active patch)."""

    backend: str = "auto"
    # Vision encoders pass the same cu_seqlens tensor to every block: remember its metadata so validating
    # it costs one host sync per vision forward, not one per block.
    _vision_cache: list[tuple[torch.Tensor, VarlenMeta]] = field(default_factory=list)

    def vision_meta(self, cu_seqlens: torch.Tensor) -> VarlenMeta:
        for cached, meta in self._vision_cache:
            if cached is cu_seqlens:
                return meta
        meta = VarlenMeta.from_cu_seqlens(cu_seqlens)
        self._vision_cache = [*self._vision_cache[-3:], (cu_seqlens, meta)]
        return meta


# ---------------------------------------------------------------------------------------------------------
# Model entry: detect the packed conventions and build the metadata once.


def _row_boundaries_ok(offsets: tuple[int, ...], rows: int, row_len: int) -> bool:
    points = set(offsets)
    return all(r * row_len in points for r in range(rows + 1))


def _cache_is_empty(cache) -> bool:
    if cache is None:
        return True
    get_len = getattr(cache, "get_seq_length", None)
    return get_len is None or int(get_len()) == 0


def packed_meta_from_inputs(kwargs: dict[str, Any]) -> VarlenMeta | None:
    """Turn the packed conventions in ``kwargs`` into one ``VarlenMeta`` (and remove their raw forms).

    Conventions (first match wins):
      1. upstream Qwen-VL: ``attention_mask`` is 1-D int cu_seqlens over the B * L tokens;
      2. transformers: ``cu_seq_lens_q``/``cu_seq_lens_k`` (and ``max_length_q``/``max_length_k``) kwargs;
      3. transformers: 4-row ``position_ids`` ``[text; t; h; w]`` and no attention mask: a sample starts
         wherever the text row is 0.
    Returns ``None`` for everything else (a 2-D padding mask, no mask and no packing information, a cache
    being continued): the original code runs unchanged, exactly as it would unpatched.
    """
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, VarlenMeta):
        return attention_mask
    cu_q = kwargs.pop("cu_seq_lens_q", None)
    cu_k = kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)

    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None:
        raise ValueError("a forward needs input_ids or inputs_embeds")
    rows, row_len = reference.shape[0], reference.shape[1]
    device = reference.device
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    position_ids = kwargs.get("position_ids")

    is_cu_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 1
    if not _cache_is_empty(cache):
        if is_cu_mask or cu_q is not None:
            raise ValueError("a packed batch (cu_seqlens) cannot continue a non-empty cache")
        return None

    if is_cu_mask:
        meta = VarlenMeta.from_cu_seqlens(attention_mask, total=rows * row_len, device=device)
    elif cu_q is not None:
        if attention_mask is not None:
            raise ValueError("cu_seq_lens_q was given together with an attention_mask; pass one or the other")
        host = None
        if cu_k is not None and cu_k is not cu_q:
            if not isinstance(cu_k, torch.Tensor) or cu_k.shape != getattr(cu_q, "shape", None):
                raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (packed self-attention)")
            host_q, host_k = torch.stack([cu_q, cu_k.to(cu_q.device)]).tolist()  # the forward's one sync
            if host_q != host_k:
                raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (packed self-attention)")
            host = host_q
        meta = VarlenMeta.from_cu_seqlens(cu_q, total=rows * row_len, device=device, host_offsets=host)
    elif attention_mask is None and position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] == 4:
        starts = (position_ids[0].reshape(-1) == 0).cpu()  # the forward's one sync
        starts[::row_len] = True  # every row starts a sample
        offsets = [*torch.nonzero(starts).flatten().tolist(), rows * row_len]
        meta = VarlenMeta.from_offsets(offsets, total=rows * row_len, device=device)
    else:
        if attention_mask is None and position_ids is not None and position_ids.ndim == 2:
            if bool((position_ids[:, 1:] == 0).any()):
                # DataCollatorWithFlattening's form: one position row restarting per sample. transformers gives
                # Qwen-VL models wrong (text-only) mrope positions from it and, on 5.x, mixes the samples.
                raise ValueError(
                    "position_ids of shape (B, T) restart at 0 inside a row (a packed batch), but Qwen-VL models need "
                    "mrope positions: pass 4-row position_ids [text; t; h; w], or attention_mask=cu_seqlens with "
                    "each sample's (3, 1, T) positions (qwenvl.positions.packed_position_ids)"
                )
        return None

    if (is_cu_mask or cu_q is not None) and position_ids is None:
        raise ValueError(
            "a packed batch needs position_ids: each sample's own mrope rows concatenated, shape (3, 1, T) or the "
            "4-row form; qwenvl.positions.packed_position_ids computes them"
        )
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not available for packed batches: the varlen kernels return no weights")

    if not _row_boundaries_ok(meta.offsets, rows, row_len):
        raise ValueError(
            f"cu_seqlens {list(meta.offsets)} must put a boundary at every row start of the {rows} x {row_len} batch"
        )
    kwargs["attention_mask"] = meta
    return meta


def entry_forward(original: Callable) -> Callable:
    """Wrap a model class's ``forward`` so packed conventions become one ``VarlenMeta`` attention mask."""
    names = [
        p.name
        for p in list(inspect.signature(original).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward got {len(args)} positional arguments")
        kwargs.update(zip(names, args))
        packed_meta_from_inputs(kwargs)
        return original(self, **kwargs)

    setattr(forward, _WRAPPED, original)
    return forward


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


def aux_loss(original: Callable) -> Callable:
    """Packed rows hold no padding, so the router loss counts every token: the mask becomes ``None``."""
    params = list(inspect.signature(original).parameters)
    mask_index = params.index("attention_mask")

    @functools.wraps(original)
    def loss(*args, **kwargs):
        if isinstance(kwargs.get("attention_mask"), VarlenMeta):
            kwargs["attention_mask"] = None
        if len(args) > mask_index and isinstance(args[mask_index], VarlenMeta):
            args = (*args[:mask_index], None, *args[mask_index + 1 :])
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


def _varlen(module, query_BNLH, key_BKLH, value_BKLH, meta: VarlenMeta, *, causal, scaling, dropout, window, softcap, state):
    B, N, L, H = query_BNLH.shape
    if key_BKLH.shape[2] != L:
        raise ValueError(f"packed attention needs as many keys as queries, got {key_BKLH.shape[2]} keys for {L} queries")
    if meta.total != B * L:
        raise ValueError(f"cu_seqlens must end at the total token count {B * L}, but its last value is {meta.total}")
    q_TNH = query_BNLH.transpose(1, 2).reshape(B * L, N, H)
    k_TKH = key_BKLH.transpose(1, 2).reshape(B * L, key_BKLH.shape[1], H)
    v_TKH = value_BKLH.transpose(1, 2).reshape(B * L, value_BKLH.shape[1], value_BKLH.shape[-1])
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
            meta = state.vision_meta(cu_seqlens)
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

"""The model entry of a patched family: detect which packed convention a batch uses and turn it into one
``VarlenMeta``, passed on as the attention mask (``entry_forward`` wraps each entry class's ``forward``;
``packed_meta_from_inputs`` is the detection, also used by the fused loss).

Conventions (first match wins; ``qwenvl.packing.CONVENTIONS``)::

    upstream      attention_mask = cu_seqlens (S + 1,), positions (3, B, L)          _upstream_meta
    hf_kwargs     cu_seq_lens_q / cu_seq_lens_k kwargs, 4-row positions               _kwargs_meta
    hf_positions  no mask, 4-row positions [text; t; h; w], text restarting at 0      _four_row_meta
    flattened     no mask, (B, L) positions restarting at 0 (text only)              _flattened_meta

The collator's ``qwenvl_host`` (``HostMeta``) gives the boundaries from the host: then nothing here reads them back
from the device. Everything else (a 2-D padding mask, positions that never restart inside a row, a cache being
continued) is an ordinary batch, left to the original code.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

from qwenvl.packing import HOST_KEY, SKIPPED_KEY, VISUAL_KEY, HostMeta, VarlenMeta
from qwenvl.patches._handle import WRAPPED as _WRAPPED
from qwenvl.patches._visual import fills_video_outputs, media_apart, reattaching

if TYPE_CHECKING:
    from qwenvl.patches._dispatch import PatchState

logger = logging.getLogger("qwenvl")

__all__ = ["entry_forward", "packed_meta_from_inputs"]



def _row_boundaries_ok(offsets: tuple[int, ...], rows: int, row_len: int) -> bool:
    points = set(offsets)
    return all(r * row_len in points for r in range(rows + 1))


def _cache_is_empty(cache) -> bool:
    if cache is None:
        return True
    get_len = getattr(cache, "get_seq_length", None)
    return get_len is None or int(get_len()) == 0


_VISION_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")

_CONVENTIONS = (
    "4-row position_ids [text; t; h; w] with the text row restarting at 0 per sample, or "
    "attention_mask=cu_seqlens with each sample's (3, 1, T) positions (qwenvl.positions.packed_position_ids)"
)


def _restart_offsets(text_BL: torch.Tensor) -> list[int] | None:
    """Sample starts of a batch whose text positions restart at 0 inside a row, or ``None`` for an ordinary batch.

    ::

        text row    0 1 2 3 0 1 2 | 5 6 7 8 0 1 2      (B = 2 rows of L = 7)
        starts      ^       ^     | ^       ^          every row start, and every 0 inside a row
        offsets     [0, 4, 7, 11, 14]

    Positions that never restart inside a row are one sample per row: an ordinary batch (``generate``'s prefill
    on transformers 5.x sends exactly that, with no mask), left to the original code. One host sync.
    """
    starts_BL = (text_BL == 0).cpu()  # the forward's one sync
    if not bool(starts_BL[:, 1:].any()):
        return None
    starts_BL[:, 0] = True
    rows, row_len = starts_BL.shape
    return [*torch.nonzero(starts_BL.flatten()).flatten().tolist(), rows * row_len]


def _require_positions(position_ids) -> None:
    if position_ids is None:
        raise ValueError(
            "a packed batch needs position_ids: each sample's own mrope rows concatenated, shape (3, 1, T) or the "
            "4-row form; qwenvl.positions.packed_position_ids computes them"
        )


def _upstream_meta(cu_seqlens: torch.Tensor, position_ids, rows: int, row_len: int, device, host) -> VarlenMeta:
    """Convention 1: ``attention_mask`` is int cu_seqlens ``(S+1,)`` over the ``B * L`` tokens."""
    meta = VarlenMeta.from_cu_seqlens(cu_seqlens, total=rows * row_len, device=device, host_offsets=host)
    _require_positions(position_ids)
    return meta


def _kwargs_meta(cu_q, cu_k, attention_mask, position_ids, rows: int, row_len: int, device, host) -> VarlenMeta:
    """Convention 2: transformers' ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs (self-attention: q == k; the
    collator's host boundaries are those of both)."""
    if attention_mask is not None:
        raise ValueError("cu_seq_lens_q was given together with an attention_mask; pass one or the other")
    if host is None and cu_k is not None and cu_k is not cu_q:
        if not isinstance(cu_k, torch.Tensor) or cu_k.shape != getattr(cu_q, "shape", None):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (packed self-attention)")
        host_q, host_k = torch.stack([cu_q, cu_k.to(cu_q.device)]).tolist()  # the forward's one sync
        if host_q != host_k:
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (packed self-attention)")
        host = host_q
    meta = VarlenMeta.from_cu_seqlens(cu_q, total=rows * row_len, device=device, host_offsets=host)
    _require_positions(position_ids)
    return meta


def _four_row_meta(position_ids: torch.Tensor, rows: int, row_len: int, device, host) -> VarlenMeta | None:
    """Convention 3: transformers' 4-row ``position_ids`` ``[text; t; h; w]``, no mask; a sample starts wherever
    the text row restarts at 0 (or where the collator's host boundaries say). ``None`` when it never restarts
    inside a row (an ordinary batch)."""
    offsets = host if host is not None else _restart_offsets(position_ids[0].expand(rows, row_len))
    return None if offsets is None else VarlenMeta.from_offsets(offsets, total=rows * row_len, device=device)


def _flattened_meta(kwargs: dict[str, Any], position_ids: torch.Tensor, rows: int, row_len: int, device):
    """``DataCollatorWithFlattening``'s ``(B, L)`` positions, restarting at 0 per sample, no mask.

    Text-only samples have the text position on all three mrope rows (what every family's ``get_rope_index``
    gives them alone), so the positions become ``(3, B, L)``. With vision inputs the mrope rows cannot be
    recovered from one row: refused. ``None`` when they never restart inside a row (an ordinary batch).
    """
    text_BL = position_ids.expand(rows, row_len)
    offsets = _restart_offsets(text_BL)
    if offsets is None:
        return None
    vision = [name for name in _VISION_INPUTS if kwargs.get(name) is not None]
    if vision:
        raise ValueError(
            f"position_ids of shape (B, T) restart at 0 inside a row (a packed batch) and come with {', '.join(vision)}, "
            f"but vision tokens need mrope positions that one row cannot carry: pass {_CONVENTIONS}"
        )
    kwargs["position_ids"] = text_BL[None].expand(3, rows, row_len)
    return VarlenMeta.from_offsets(offsets, total=rows * row_len, device=device)


def packed_meta_from_inputs(kwargs: dict[str, Any], state: PatchState | None = None) -> VarlenMeta | None:
    """Turn the packed conventions in ``kwargs`` into one ``VarlenMeta`` (and remove their raw forms).

    Conventions (first match wins): ``attention_mask`` = cu_seqlens (``_upstream_meta``); ``cu_seq_lens_q/k``
    kwargs (``_kwargs_meta``); no mask and 4-row positions (``_four_row_meta``) or ``(B, L)`` positions
    (``_flattened_meta``) restarting at 0 inside a row. Returns ``None`` for everything else (a 2-D padding mask,
    positions that never restart inside a row, a cache being continued): the original code runs unchanged,
    exactly as it would unpatched.
    """
    host = kwargs.pop(HOST_KEY, None)
    kwargs.pop(SKIPPED_KEY, None)  # the names of skipped samples (for the trainer's count), never the model's
    visual = kwargs.pop(VISUAL_KEY, None)
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, VarlenMeta):
        # The outer entry's metadata passing through (the inner XModel.forward, the fused loss's call) keeps the
        # per-forward state it set; a VarlenMeta from anywhere else starts a forward of its own, without it.
        if state is not None and attention_mask is not state.owner:
            state.forget()
        return attention_mask
    if state is not None:
        state.forget()  # until this forward's host metadata says otherwise (_use_host)
    if host is not None and not isinstance(host, HostMeta):
        raise TypeError(f"{HOST_KEY} must be a qwenvl.packing.HostMeta (what PackedCollator adds), got {type(host).__name__}")
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
    position_ids = kwargs.get("position_ids")
    is_cu_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 1

    if not _cache_is_empty(kwargs.get("past_key_values", kwargs.get("cache"))):
        if is_cu_mask or cu_q is not None:
            raise ValueError("a packed batch (cu_seqlens) cannot continue a non-empty cache")
        return None

    offsets = None if host is None else host.offsets
    if is_cu_mask:
        meta = _upstream_meta(attention_mask, position_ids, rows, row_len, device, offsets)
    elif cu_q is not None:
        meta = _kwargs_meta(cu_q, cu_k, attention_mask, position_ids, rows, row_len, device, offsets)
    elif attention_mask is not None or position_ids is None:
        return None
    elif position_ids.ndim == 3 and position_ids.shape[0] == 4:
        meta = _four_row_meta(position_ids, rows, row_len, device, offsets)
    elif position_ids.ndim == 2:
        meta = _flattened_meta(kwargs, position_ids, rows, row_len, device)
    else:
        return None
    if meta is None:
        return None
    if host is not None and host.padding:
        if host.padding != meta.offsets[-1] - meta.offsets[-2]:
            raise ValueError(f"{HOST_KEY} says the last {host.padding} tokens are padding, but the last segment is not them")
        meta = meta._replace(padding=host.padding)
    _hand_on(kwargs, meta, rows, row_len)
    _use_host(kwargs, host, state, device)
    if state is not None:
        state.owner = meta
        if host is not None and visual is not None:
            state.visual_index, state.modality_index = visual[0], visual[1]
    return meta


def _hand_on(kwargs: dict[str, Any], meta: VarlenMeta, rows: int, row_len: int) -> None:
    """Check a packed batch's metadata against the batch and put it where the model reads the mask."""
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not available for packed batches: the varlen kernels return no weights")
    if not _row_boundaries_ok(meta.offsets, rows, row_len):
        raise ValueError(
            f"cu_seqlens {list(meta.offsets)} must put a boundary at every row start of the {rows} x {row_len} batch"
        )
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 3 and position_ids.shape[0] == 4:
        # The text row only said where samples start, which the VarlenMeta now says; every release takes the
        # (3, B, L) mrope rows, not every one the 4-row form (GLM-4V and GLM-4V-MoE on 4.57 take 3 rows only).
        kwargs["position_ids"] = position_ids[1:]
    kwargs["attention_mask"] = meta


_FALLBACK_SAID = False


def _use_host(kwargs: dict[str, Any], host: HostMeta | None, state: PatchState | None, device) -> None:
    """The collator's host metadata for the vision side: each vision cu_seqlens' boundaries (the attention dispatch
    then reads them instead of asking the device) and the grids that may stay on the host. Without it, say once
    that this batch costs host syncs."""
    global _FALLBACK_SAID
    if state is not None:
        state.placeholders_checked = host is not None and host.placeholders_checked
    if host is None:
        if not _FALLBACK_SAID and torch.device(device).type == "cuda":
            _FALLBACK_SAID = True
            logger.info(
                "qwenvl: packed batches without qwenvl_host (not from qwenvl.data.PackedCollator) cost one host sync "
                "per forward to read their boundaries; PackedCollator.for_model(model) sends them from the host"
            )
        return
    for name, offsets in host.vision.items():
        cu = kwargs.get(name)
        if isinstance(cu, torch.Tensor) and state is not None:
            state.remember_vision(cu, offsets)
    for name, grid in host.grids.items():
        if kwargs.get(name) is not None:
            kwargs[name] = grid


def entry_forward(original: Callable, state: PatchState | None = None) -> Callable:
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
        packed_meta_from_inputs(kwargs, state)
        with reattaching(self, state):
            kwargs, videos = media_apart(self, state, kwargs)
            out = original(self, **kwargs)
        if videos is not None and fills_video_outputs(original) and getattr(out, "video_outputs", False) is None:
            out.video_outputs = videos  # as the forward would return them, had it computed them
        return out

    setattr(forward, _WRAPPED, original)
    return forward

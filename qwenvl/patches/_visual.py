"""The vision features' way into the text model, without a host sync (the collator's placeholder positions).

transformers puts the vision features into the text embeddings with boolean masks::

    image_mask = get_placeholder_mask(input_ids, inputs_embeds, image_features=image_embeds)   # checks the count: syncs
    inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)   # backward: masked_select -> syncs
    hidden[visual_pos_masks] += deepstack_embeds                              # Qwen3-VL's deepstack: syncs

A data-dependent size is what syncs. The collator knows every placeholder's position on the host
(``qwenvl.packing.VISUAL_KEY``, checked against the grids there), so with it:

    get_placeholder_mask   runs without the features: the same masks, no count check (``placeholder_mask``)
    get_*_features         hand the model their features detached (``features``), so ``masked_scatter``
                           puts the same values in place and has no source gradient to select; the live
                           features wait in the ``PatchState``
    text model entry       ``_Reattach``: the embeddings unchanged, and in the backward the gradient at the
                           placeholder positions, gathered by index, goes to the live features (``reattaching``)
    _deepstack_process     adds by index at the same positions (``deepstack``)
    deepstack features     handed over at the text model's entry too, in the features' order (images, then
                           videos): transformers never joins them (a row with images and a video would join
                           them through boolean masks: 3 syncs a deepstack layer, and more in the backward)

    videos apart           a row with images and videos: the videos' features are computed before
                           ``XModel.forward`` runs and go in at the text model's entry, by index (``media_apart``)

Why videos apart: given both modalities, Qwen3-VL's forward (and the Qwen3-Omni thinker's) joins their deepstack
features by selecting each modality's mask at the union of both (``image_mask[visual_pos_masks]``: 2 syncs) before
anything of ours can run. Handed only the images, it has nothing to join; the videos' features are the same
tower's output for the same inputs, and their placeholder positions get exactly the values ``masked_scatter``
would have put there.

Values and gradients are bit-identical to the original (``parity_tests/test_host_meta.py``). A release whose
``get_*_features`` return no ``pooler_output`` (4.57) keeps its ``masked_scatter`` gradient, sync included.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from qwenvl.patches._handle import WRAPPED as _WRAPPED

if TYPE_CHECKING:
    from qwenvl.patches._dispatch import PatchState

__all__ = [
    "placeholder_mask", "deepstack", "features", "reattaching", "media_apart", "fills_video_outputs", "grid_to_device",
]  # fmt: skip


def placeholder_mask(original: Callable, state: PatchState) -> Callable:
    """Wrap an entry class's ``get_placeholder_mask``: when the collator checked this forward's placeholder counts on
    the host, the original runs without the features (``*_features=None``), which gives the same masks and skips
    its own count check: an f-string formatting a device count and the check itself, a host sync each."""
    signature = inspect.signature(original)
    names = [name for name in signature.parameters if name.endswith("_features")]

    @functools.wraps(original)
    def get_placeholder_mask(*args, **kwargs):
        if state.placeholders_checked:
            bound = signature.bind(*args, **kwargs)
            for name in names:
                if name in bound.arguments:
                    bound.arguments[name] = None
            return original(*bound.args, **bound.kwargs)
        return original(*args, **kwargs)

    setattr(get_placeholder_mask, _WRAPPED, original)
    return get_placeholder_mask


def deepstack(original: Callable, state: PatchState) -> Callable:
    """Wrap a text model's ``_deepstack_process``: with this forward's placeholder positions from the collator, the
    visual features are added with ``index_add`` at those positions, the same additions as the original's
    ``h[mask] + features`` written back to ``h[mask]`` (which syncs twice, and again in the backward)."""

    @functools.wraps(original)
    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        # handed over at the text model's entry: in the features' order; else transformers' join, by position
        index = state.modality_index if state.deepstack_handed else state.visual_index
        if index is None or hidden_states.shape[0] != 1 or index.numel() != visual_embeds.shape[0]:
            if state.deepstack_handed:  # features' order: the original's position-order mask would misplace them
                raise RuntimeError(
                    f"qwenvl: deepstack features handed over for {0 if index is None else index.numel()} placeholder "
                    f"positions of one packed row, got {visual_embeds.shape[0]} rows for hidden states "
                    f"{tuple(hidden_states.shape)}"
                )
            return original(self, hidden_states, visual_pos_masks, visual_embeds)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        added = flat.index_add(0, index.to(flat.device), visual_embeds.to(flat.device, flat.dtype))
        return added.view_as(hidden_states)

    setattr(_deepstack_process, _WRAPPED, original)
    return _deepstack_process


def features(original: Callable, state: PatchState) -> Callable:
    """Wrap an entry class's ``get_image_features`` / ``get_video_features``: inside a forward that reattaches
    (``reattaching``), the returned ``pooler_output`` is detached and its live tensors kept for the text model
    entry. Nested calls (Qwen3-VL's video features call its image features) act once, at the outermost; calls
    from the text model's entry on (``qwenvl.train.distributed``'s dummy vision pass) keep their gradient."""

    @functools.wraps(original)
    def get_features(*args, **kwargs):
        if not state.reattach_open or state.in_features or state.reattached:
            return original(*args, **kwargs)
        state.in_features = True
        try:
            out = original(*args, **kwargs)
        finally:
            state.in_features = False
        live = getattr(out, "pooler_output", None)
        if isinstance(live, torch.Tensor):
            out.pooler_output = live.detach()
        elif isinstance(live, (tuple, list)) and live and all(isinstance(t, torch.Tensor) for t in live):
            out.pooler_output = type(live)(t.detach() for t in live)
        else:
            return out  # not the 5.x output: the original masked_scatter gradient, as unpatched
        deep = getattr(out, "deepstack_features", None)
        if state.deepstack_by_hand and isinstance(deep, list) and deep:
            out.deepstack_features = []  # the forward joins nothing; they go in at the text model's entry
        else:
            deep = None
        state.pending.append((out, live, deep))
        return out

    setattr(get_features, _WRAPPED, original)
    return get_features


def grid_to_device(original: Callable) -> Callable:
    """Wrap a vision tower's ``forward(hidden_states, grid_thw, ...)`` that reads ``grid_thw`` on the device
    (``FamilySpec.tower_reads_grid``): a host grid (the collator's, ``HostMeta.grids``) is copied there without
    waiting; everything before the tower (split sizes, GLM-4V's frame expansion) read it on the host."""

    @functools.wraps(original)
    def forward(self, hidden_states, grid_thw, *args, **kwargs):
        if isinstance(grid_thw, torch.Tensor) and grid_thw.device != hidden_states.device:
            grid_thw = grid_thw.to(hidden_states.device, non_blocking=True)
        return original(self, hidden_states, grid_thw, *args, **kwargs)

    setattr(forward, _WRAPPED, original)
    return forward


class _Reattach(torch.autograd.Function):
    """Forward: the embeddings, unchanged. Backward: their gradient passes on, and its rows at the placeholder
    positions (``index``, the features' order) go to the features, as ``masked_scatter``'s backward would send them
    (by a boolean ``masked_select``, which syncs)."""

    @staticmethod
    def forward(ctx, embeds_BLD: torch.Tensor, index_V: torch.Tensor, features_VD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index_V)
        ctx.features_dtype = features_VD.dtype
        return embeds_BLD.clone()

    @staticmethod
    def backward(ctx, grad_BLD: torch.Tensor):
        (index_V,) = ctx.saved_tensors
        grad_VD = grad_BLD.reshape(-1, grad_BLD.shape[-1]).index_select(0, index_V)
        return grad_BLD, None, grad_VD.to(ctx.features_dtype)


def _flat(live) -> torch.Tensor:
    return live if isinstance(live, torch.Tensor) else torch.cat(list(live), dim=0)


def _put_apart(embeds_1LD: torch.Tensor, index_V: torch.Tensor, videos) -> torch.Tensor:
    """The videos' (detached) features at their placeholder positions, the last of ``index_V`` (the features'
    order): the values the forward's ``masked_scatter`` would have put there."""
    videos_VD = _flat(videos)
    if embeds_1LD.shape[0] != 1 or videos_VD.shape[0] > index_V.numel():
        raise RuntimeError(
            f"qwenvl: {videos_VD.shape[0]} video feature rows for {index_V.numel()} placeholder positions of "
            f"hidden states {tuple(embeds_1LD.shape)}"
        )
    flat = embeds_1LD.reshape(-1, embeds_1LD.shape[-1])
    positions = index_V[index_V.numel() - videos_VD.shape[0] :].to(flat.device)
    return flat.index_copy(0, positions, videos_VD.to(flat.device, flat.dtype)).view_as(embeds_1LD)


def _reattach_hook(state: PatchState):
    def hook(module, args, kwargs):
        if state.reattached:
            return None
        state.reattached = True  # the text model's entry: features computed from here on (a dummy pass) stay live
        if not state.pending:
            return None
        embeds = kwargs.get("inputs_embeds")
        index = state.modality_index
        if state.apart is not None:  # the videos, after the images (the features' order)
            state.pending.append(state.apart)
            state.apart = None
            if isinstance(embeds, torch.Tensor) and index is not None:
                embeds = _put_apart(embeds, index, state.pending[-1][0].pooler_output)
        live = torch.cat([_flat(live) for _, live, _ in state.pending], dim=0)
        if not isinstance(embeds, torch.Tensor) or index is None or index.numel() != live.shape[0]:
            got = "no inputs_embeds" if not isinstance(embeds, torch.Tensor) else f"{live.shape[0]} feature rows"
            raise RuntimeError(
                f"qwenvl: the vision features cannot be reattached to {type(module).__name__} ({got}, "
                f"{0 if index is None else index.numel()} placeholder positions); nothing was trained on this batch"
            )
        kwargs["inputs_embeds"] = _Reattach.apply(embeds, index.to(embeds.device), live)
        deep = [d for _, _, d in state.pending if d is not None]
        if deep:
            if len(deep) != len(state.pending) or len({len(d) for d in deep}) != 1:
                raise RuntimeError(f"qwenvl: deepstack features of {len(deep)} of {len(state.pending)} vision outputs")
            # per deepstack layer: every modality's features, in the features' order (``modality_index``'s)
            kwargs["deepstack_visual_embeds"] = [torch.cat([_flat(t) for t in layer], dim=0) for layer in zip(*deep)]
            state.deepstack_handed = True
        return args, kwargs

    return hook


@contextlib.contextmanager
def reattaching(model, state: PatchState | None) -> Iterator[None]:
    """Around ``XModel.forward`` (the class holding the ``language_model`` submodule): with the collator's positions,
    the features are detached where transformers scatters them and reattached at the text model's entry."""
    text = None if state is None else model._modules.get("language_model")
    if text is None or state.modality_index is None or state.reattach_open:
        yield
        return
    state.reattach_open, state.reattached, state.deepstack_handed = True, False, False
    # deepstack features are handed over only to a text model that takes them and adds them by index
    adds = getattr(type(text), "_deepstack_process", None)
    state.deepstack_by_hand = (
        getattr(adds, _WRAPPED, None) is not None
        and "deepstack_visual_embeds" in inspect.signature(type(text).forward).parameters
    )
    handle = text.register_forward_pre_hook(_reattach_hook(state), with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        state.reattach_open = state.deepstack_by_hand = state.deepstack_handed = False
        pending, state.pending = state.pending, []
        if state.apart is not None:  # never reached the text model's entry
            pending.append(state.apart)
            state.apart = None
        for out, live, deep in pending:  # the returned outputs hold the live features again, as unpatched
            out.pooler_output = live
            if deep is not None:
                out.deepstack_features = deep
    if pending and not state.reattached:
        raise RuntimeError(
            f"qwenvl: {type(model).__name__}.forward never handed its vision features to the text model; their "
            "gradient would be lost. Run it unpatched, or without qwenvl_visual_positions in the batch"
        )


_NOT_HANDED_ON = ("return_dict", "past_key_values", "cache")


@functools.lru_cache(maxsize=None)
def fills_video_outputs(forward: Callable) -> bool:
    """Whether an entry class's original ``forward`` returns the videos' features as ``video_outputs`` (Qwen3-VL's
    does from 5.x; the Qwen3-Omni thinker's inner model never does): read from its source."""
    try:
        return "video_outputs=" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def _takes_var_kwargs(function: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


def media_apart(model, state: PatchState | None, kwargs: dict) -> tuple[dict, object]:
    """Inside ``reattaching``, for a packed row holding images and videos whose forward would join their deepstack
    features (``state.deepstack_by_hand``): compute the videos' features here, through the patched
    ``get_video_features`` (so they come back detached, their live tensors kept), and return the forward's kwargs
    without them, and the videos' output (``reattaching`` gives it its live features back: the caller hands it on as
    the forward's ``video_outputs``). The text model's entry puts them in after the images' (``_reattach_hook``).
    Anything else: the kwargs unchanged, and ``None``."""
    if (
        state is None
        or not state.deepstack_by_hand
        or state.modality_index is None
        or kwargs.get("pixel_values") is None
        or kwargs.get("pixel_values_videos") is None
        or kwargs.get("position_ids") is None  # the forward would derive positions from the video grids
        or kwargs.get("input_ids") is None
        or kwargs["input_ids"].shape[0] != 1
        or not _takes_var_kwargs(type(model).get_video_features)  # 5.x: precomputed inputs, outputs with pooler_output
    ):
        return kwargs, None
    kwargs = dict(kwargs)
    videos, grid = kwargs.pop("pixel_values_videos"), kwargs.pop("video_grid_thw", None)
    named = set(inspect.signature(getattr(type(model).forward, _WRAPPED, type(model).forward)).parameters)
    # what the forward hands on in its **kwargs: not what its decorators take first (return_dict) or the cache
    passed = {k: v for k, v in kwargs.items() if k not in named and k not in _NOT_HANDED_ON}
    before = len(state.pending)
    out = model.get_video_features(videos, grid, return_dict=True, **passed)
    if len(state.pending) != before + 1 or state.pending[-1][0] is not out:
        raise RuntimeError(f"qwenvl: {type(model).__name__}.get_video_features kept no features to put in by index")
    state.apart = state.pending.pop()
    return kwargs, out


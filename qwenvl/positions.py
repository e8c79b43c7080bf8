"""Multimodal RoPE positions for packed rows, on every supported transformers release.

Each sample keeps the positions it would have alone (the model's own ``get_rope_index``); a packed row
concatenates them::

    sample a: text text <img> <img> <img> <img> text      t-row: 0 1 2 2 2 2 4
    sample b: text text text                              t-row: 0 1 2
    packed  (3, 1, 10)                                    t-row: 0 1 2 2 2 2 4 | 0 1 2

``get_rope_index`` changed signature in transformers 5.3 (it needs ``mm_token_type_ids``: text 0, image 1,
video 2); ``rope_index`` hides that.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from qwenvl.families import get_family

__all__ = ["rope_index", "mm_token_type_ids", "packed_position_ids"]


def _rope_owner(model):
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate
    raise ValueError(f"{type(model).__name__} has no get_rope_index: not a Qwen-VL model")


def mm_token_type_ids(config, input_ids_BL: torch.Tensor) -> torch.Tensor:
    """int32 ``(B, L)``: 0 for text, 1 for image tokens, 2 for video tokens (the 5.3+ processor output).

    GLM-4V fills video frames with the image placeholder: there a placeholder is a video token when it lies
    inside a ``<begin_of_video> ... <end_of_video>`` span (what ``Glm4vProcessor.create_mm_token_type_ids`` does)::

        ids    <boi> <img> <img> <eoi>  <bov> <boi> <img> <eoi> 0 <boi> <img> <eoi> 1 <eov>
        types    0     1     1     0      0     0     2     0   0   0     2     0   0   0
    """
    keys = get_family(config.model_type).tokens
    image_BL = input_ids_BL == getattr(config, keys.image)
    video_BL = input_ids_BL == getattr(config, keys.video)
    if keys.video_start is not None:
        opened_BL = torch.cumsum(input_ids_BL == getattr(config, keys.video_start), dim=-1)
        closed_BL = torch.cumsum(input_ids_BL == getattr(config, keys.video_end), dim=-1)
        video_BL = video_BL & (opened_BL > closed_BL)
        image_BL = image_BL & ~video_BL
    types = torch.zeros_like(input_ids_BL, dtype=torch.int32)
    types[image_BL] = 1
    types[video_BL] = 2
    return types


def rope_index(
    model,
    input_ids_BL: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask_BL: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's own mrope position ids, int64 ``(3, B, L)``, whatever the release's signature."""
    owner = _rope_owner(model)
    params = inspect.signature(owner.get_rope_index).parameters
    if attention_mask_BL is None:
        # Qwen3-Omni's thinker indexes the mask unconditionally; all ones is what "no mask" means for the others.
        attention_mask_BL = torch.ones_like(input_ids_BL)
    kwargs = {"image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw, "attention_mask": attention_mask_BL}
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = mm_token_type_ids(owner.config, input_ids_BL)
    # Qwen2.5-VL names the video spacing second_per_grid_ts (optional); Qwen3-Omni second_per_grids (required
    # with a video: there the default is its processor's, temporal_patch_size / fps at fps 1).
    seconds = next((name for name in ("second_per_grid_ts", "second_per_grids") if name in params), None)
    if second_per_grid_ts is None and seconds == "second_per_grids" and video_grid_thw is not None:
        temporal_patch = float(owner.config.vision_config.temporal_patch_size)
        second_per_grid_ts = torch.full((len(video_grid_thw),), temporal_patch)
    if second_per_grid_ts is not None:
        if seconds is None:
            raise ValueError(f"{type(owner).__name__}.get_rope_index takes no second_per_grid_ts")
        kwargs[seconds] = second_per_grid_ts
    position_ids, _ = owner.get_rope_index(input_ids_BL, **kwargs)
    return position_ids


def packed_position_ids(
    model,
    samples_input_ids: Sequence[torch.Tensor],
    *,
    image_grid_thw: Sequence[torch.Tensor | None] | None = None,
    video_grid_thw: Sequence[torch.Tensor | None] | None = None,
    second_per_grid_ts: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Concatenate each sample's own positions into the upstream packed form ``(3, 1, T)``.

    Args:
        samples_input_ids: one int ``(L_i,)`` tensor per sample.
        image_grid_thw / video_grid_thw: per sample, its grids ``(n_i, 3)`` or ``None``.
        second_per_grid_ts: per sample, Qwen2.5-VL's seconds per temporal video patch (the processor's
            output) or ``None``; without it videos get the model's default temporal spacing.
    """
    n = len(samples_input_ids)
    columns = [image_grid_thw or [None] * n, video_grid_thw or [None] * n, second_per_grid_ts or [None] * n]
    if any(len(column) != n for column in columns):
        raise ValueError(f"give one entry per sample ({n}) for each of image_grid_thw, video_grid_thw, second_per_grid_ts")
    rows = [
        rope_index(model, ids[None], image_grid_thw=img, video_grid_thw=vid, second_per_grid_ts=spg)[:, 0]
        for ids, img, vid, spg in zip(samples_input_ids, *columns)
    ]
    return torch.cat(rows, dim=-1)[:, None, :]

"""Multimodal samples and packed batches for the parity harness, laid out as the real processors lay them.

One sample (Qwen2/2.5-VL)::

    text ... <vision_start> <image> x (h*w/4) <vision_end> text ... <vision_start> <video> x (t*h*w/4) <vision_end>

A family whose spec has ``video_group_spans`` (Qwen3-VL, Qwen3-VL-MoE) gives every temporal group of a video
its own ``<vision_start> ... <vision_end>`` (the processor puts a timestamp before each group; here a text token
stands in for it). The token ids come from the config keys the spec names (``FamilySpec.tokens``); GLM-4V
fills video frames with the image placeholder and wraps the whole video in ``<begin_of_video> ... <end_of_video>``::

    <bov> <ts> <boi> <img> x (h*w/4) <eoi> <ts> <boi> <img> x (h*w/4) <eoi> <eov>

Such a family (``tokens.shared_placeholder``) cannot take images and videos in one forward, packed or not:
``make_sample`` refuses a sample with both, ``pack`` a row mixing them (``split_by_media`` orders samples into
rows that each hold one kind). What some releases cannot run at all, unpatched (``FamilySpec.release_bugs``, the
transformers bug named), is refused the same way (``UpstreamLimit``) instead of crashing deep inside the model.
Which parts of a run a release leaves out (its videos, its float64 oracle) is decided in one place, ``release_run``,
for ``qwenvl verify``'s plan, ``run_case`` and the golden check alike.

A packed batch concatenates samples along the token axis: ``input_ids (1, T)``, ``cu_seqlens`` int32,
positions ``(3, 1, T)`` (upstream convention) or ``(4, 1, T)`` with the text row restarting at 0 (the
transformers convention), and the samples' pixel tensors and grids concatenated in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from qwenvl.families import get_family
from qwenvl.packing import CONVENTIONS, cu_seqlens_to_position_ids, lengths_to_cu_seqlens
from qwenvl.positions import rope_index

__all__ = [
    "SampleSpec",
    "Sample",
    "PackedBatch",
    "make_sample",
    "pack",
    "split_by_media",
    "mixes_media",
    "runnable_specs",
    "UpstreamLimit",
    "upstream_limit",
    "ReleaseRun",
    "release_run",
]

_TEXT_LOW, _TEXT_HIGH = 3, 500  # clear of pad (0), bos/eos (1, 2) and the vision ids (500-511)


class UpstreamLimit(RuntimeError):
    """The installed transformers release cannot run this input at all, patched or not (a named upstream bug)."""


# The release bugs of every family (``FamilySpec.release_bugs``), by family: derived, never edited.


def upstream_limit(family: str, what: str, version: str | None = None) -> str | None:
    """Why the installed (or given) release cannot run ``what`` for ``family`` (``FamilySpec.release_bug``), or
    ``None`` when it can."""
    return get_family(family).release_bug(what, version)


def mixes_media(family: str) -> bool:
    """Whether one forward of ``family`` can hold images and videos on the installed release."""
    return get_family(family).mixes_media()


def runnable_specs(family: str, specs: Sequence["SampleSpec"]) -> list["SampleSpec"]:
    """``specs`` where a sample holding an image and a video keeps its video only, if one forward of ``family``
    cannot hold both on the installed release (``mixes_media``): no release can run such a sample, patched or
    not. For drawn specs; samples of different kinds then go to separate rows (``split_by_media``)."""
    if mixes_media(family):
        return list(specs)
    return [SampleSpec(s.text, None, s.video) if s.image is not None and s.video is not None else s for s in specs]


@dataclass(frozen=True)
class ReleaseRun:
    """What a run of one family does on one release (``release_run``): the sample specs it keeps, and each part it
    leaves out ("float64": the float64 oracle; "videos": every video) with the transformers bug that forbids it."""

    specs: tuple["SampleSpec", ...] = ()
    left_out: dict[str, str] = field(default_factory=dict)


def release_run(
    family: str,
    specs: Sequence["SampleSpec"] = (),
    *,
    videos: bool | None = None,
    float64: bool = False,
    version: str | None = None,
) -> ReleaseRun:
    """The one place that decides what of a run ``family`` can do on the installed (or given) release, from
    ``FamilySpec.release_bug``:

    - ``float64`` (the run wants a float64 oracle) is left out where the model cannot run in float64 (GLM-4V-MoE
      on 4.57);
    - ``videos`` (the run holds a video; default: whether one of ``specs`` has one) are left out where the release
      cannot run the family's videos at all (Qwen3-Omni on 5.0.0), and the specs with a video with them.

    Each caller says what a part left out means for it: ``qwenvl verify`` runs the family's cases without the
    video and leaves out the cases with no oracle, naming both; ``run_case`` refuses the run (``UpstreamLimit``);
    the golden check skips a batch it cannot run, and without a float64 run judges the patch against the golden
    alone.
    """
    left_out = {}
    if float64 and (why := upstream_limit(family, "float64", version)):
        left_out["float64"] = why
    if videos is None:
        videos = any(spec.video is not None for spec in specs)
    if videos and (why := upstream_limit(family, "videos", version)):
        left_out["videos"] = why
        specs = [spec for spec in specs if spec.video is None]
    return ReleaseRun(tuple(specs), left_out)


@dataclass(frozen=True)
class SampleSpec:
    """What one sample holds: ``text`` tokens, optional image grid ``(h, w)`` and video grid ``(t, h, w)``
    in patches (h and w even: the 2x2 merger)."""

    text: int
    image: tuple[int, int] | None = None
    video: tuple[int, int, int] | None = None


@dataclass
class Sample:
    input_ids: torch.Tensor  # int64 (L,)
    pixel_values: torch.Tensor | None = None  # (patches, C * tp * p * p)
    image_grid_thw: torch.Tensor | None = None  # int64 (n_images, 3)
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.numel()


def _patch_dim(vision_config) -> int:
    return vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2


def make_sample(config, spec: SampleSpec, *, generator: torch.Generator) -> Sample:
    """Random token ids and pixels for ``spec``, laid out for ``config``'s family."""
    if spec.text < 0:
        raise ValueError(f"a sample needs text >= 0 tokens, got {spec.text}")
    vision = config.vision_config
    merge = vision.spatial_merge_size**2
    family = get_family(config.model_type)
    per_group, keys = family.video_group_spans, family.tokens
    if spec.image is not None and spec.video is not None and not mixes_media(family.name):
        raise _mixing_error(family.name, "a sample")

    def text(n):
        return torch.randint(_TEXT_LOW, _TEXT_HIGH, (n,), generator=generator)

    def token(key):
        return torch.tensor([getattr(config, key)])

    def vision_span(key, t, h, w):
        if h % 2 or w % 2:
            raise ValueError(f"image/video grids need even h and w (2x2 merger), got {(t, h, w)}")
        start, end, token_id = token(keys.start), token(keys.end), getattr(config, key)
        if per_group and t > 1:
            group = torch.full((h * w // merge,), token_id)
            pieces = []
            for _ in range(t):
                pieces += [text(1), start, group, end]
            return torch.cat(pieces)
        return torch.cat([start, torch.full((t * h * w // merge,), token_id), end])

    first = spec.text // 2
    pieces = [text(first)]
    sample = Sample(input_ids=torch.empty(0, dtype=torch.long))
    if spec.image is not None:
        h, w = spec.image
        pieces.append(vision_span(keys.image, 1, h, w))
        sample.pixel_values = torch.randn(h * w, _patch_dim(vision), generator=generator)
        sample.image_grid_thw = torch.tensor([[1, h, w]])
    if spec.video is not None:
        t, h, w = spec.video
        span = vision_span(keys.video, t, h, w)
        if keys.video_start is not None:
            span = torch.cat([token(keys.video_start), span, token(keys.video_end)])
        pieces.append(span)
        sample.pixel_values_videos = torch.randn(t * h * w, _patch_dim(vision), generator=generator)
        sample.video_grid_thw = torch.tensor([[t, h, w]])
    pieces.append(text(spec.text - first))
    sample.input_ids = torch.cat(pieces).long()
    if sample.input_ids.numel() == 0:
        raise ValueError("a sample needs at least one token")
    return sample


def _cat(tensors):
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None


@dataclass
class PackedBatch:
    samples: list[Sample]
    input_ids: torch.Tensor  # (1, T)
    cu_seqlens: torch.Tensor  # int32 (S + 1,)
    position_ids: torch.Tensor  # (3, 1, T): each sample's own mrope rows
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    family: str | None = None  # whose release bugs apply (``FamilySpec.release_bugs``), when known

    def vision_inputs(self) -> dict:
        out = {}
        for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def model_inputs(self, convention: str = "upstream") -> dict:
        """Inputs in one of the conventions the patch accepts.

        - ``upstream``: ``attention_mask`` = cu_seqlens, positions ``(3, 1, T)``;
        - ``hf_positions``: 4-row positions ``[text; t; h; w]``, no mask;
        - ``hf_kwargs``: 4-row positions plus ``cu_seq_lens_q/k`` and ``max_length_q/k``.
        """
        inputs = {"input_ids": self.input_ids, **self.vision_inputs()}
        if convention == "upstream":
            return {**inputs, "attention_mask": self.cu_seqlens, "position_ids": self.position_ids}
        text_row = cu_seqlens_to_position_ids(self.cu_seqlens, self.input_ids.shape[1])
        four_rows = torch.cat([text_row.view(1, 1, -1).to(self.position_ids.dtype), self.position_ids])
        inputs["position_ids"] = four_rows
        if convention == "hf_positions":
            if self.family is not None and len(self.cu_seqlens) == 2 and (why := upstream_limit(self.family, "four_rows")):
                raise UpstreamLimit(why)
            return inputs
        if convention == "hf_kwargs":
            max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
            return {
                **inputs,
                "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": max_len,
                "max_length_k": max_len,
            }
        raise ValueError(f"unknown packing convention {convention!r}; use {', '.join(CONVENTIONS)}")

    def to(self, device) -> "PackedBatch":
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
            if name != "samples"
        }
        return PackedBatch(samples=self.samples, **moved)


def sample_inputs(model, sample: Sample, device=None) -> dict:
    """One sample alone, as an ordinary (unpacked) batch of one: explicit all-ones mask and its positions."""
    ids = sample.input_ids[None].to(device)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": rope_index(
            model,
            ids,
            image_grid_thw=None if sample.image_grid_thw is None else sample.image_grid_thw.to(device),
            video_grid_thw=None if sample.video_grid_thw is None else sample.video_grid_thw.to(device),
        ),
    }
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        value = getattr(sample, name)
        if value is not None:
            inputs[name] = value.to(device)
    return inputs


def _mixing_error(family: str, what: str) -> Exception:
    if get_family(family).tokens.shared_placeholder:
        return ValueError(
            f"{family} fills images and videos with one placeholder: transformers cannot run {what} with both "
            "in one forward; put them in separate rows (split_by_media)"
        )
    return UpstreamLimit(upstream_limit(family, "mixed"))


def split_by_media(config, samples: Sequence[Sample]) -> list[list[Sample]]:
    """The samples in rows that one forward can take: all of them in one row, except where images and videos
    cannot share a forward (``mixes_media``: GLM-4V) and both are there; then the samples with an image make one
    row and the others (videos, text) a second::

        [img, txt, vid, txt, img]   ->   [[img, img], [txt, vid, txt]]      (order kept inside each row)
    """
    with_image = [s for s in samples if s.image_grid_thw is not None]
    others = [s for s in samples if s.image_grid_thw is None]
    if mixes_media(config.model_type) or not with_image or all(s.video_grid_thw is None for s in others):
        return [list(samples)]
    return [with_image, others]


def pack(model, samples: Sequence[Sample]) -> PackedBatch:
    """Concatenate samples into one packed row with each sample's own positions."""
    if not samples:
        raise ValueError("pack needs at least one sample")
    has_image = any(s.image_grid_thw is not None for s in samples)
    has_video = any(s.video_grid_thw is not None for s in samples)
    if has_image and has_video and not mixes_media(model.config.model_type):
        raise _mixing_error(model.config.model_type, "a packed row")
    lengths = torch.tensor([len(s) for s in samples])
    positions = [
        rope_index(model, s.input_ids[None], image_grid_thw=s.image_grid_thw, video_grid_thw=s.video_grid_thw)[:, 0]
        for s in samples
    ]
    return PackedBatch(
        samples=list(samples),
        input_ids=torch.cat([s.input_ids for s in samples])[None],
        cu_seqlens=lengths_to_cu_seqlens(lengths),
        position_ids=torch.cat(positions, dim=-1)[:, None, :],
        pixel_values=_cat([s.pixel_values for s in samples]),
        image_grid_thw=_cat([s.image_grid_thw for s in samples]),
        pixel_values_videos=_cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=_cat([s.video_grid_thw for s in samples]),
        family=model.config.model_type,
    )

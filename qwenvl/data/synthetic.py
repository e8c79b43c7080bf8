"""Synthetic multimodal samples, laid out as the real processors lay them, and packed rows built from them by the
collator that training uses (``PackedCollator``): what ``qwenvl verify``, the golden check, the tests and the
benchmarks feed the models. There is one packed row: ``PackedBatch`` holds the samples as the dataset hands them to
the collator, and every tensor it shows is the collator's.

One sample (Qwen2/2.5-VL)::

    text ... <vision_start> <image> x (h*w/4) <vision_end> text ... <vision_start> <video> x (t*h*w/4) <vision_end>

A family whose spec has ``video_group_spans`` (Qwen3-VL, Qwen3-VL-MoE) gives every temporal group of a video
its own ``<vision_start> ... <vision_end>`` (the processor puts a timestamp before each group; here a text token
stands in for it). The token ids come from the config keys the spec names (``FamilySpec.tokens``); GLM-4V
fills video frames with the image placeholder and wraps the whole video in ``<begin_of_video> ... <end_of_video>``::

    <bov> <ts> <boi> <img> x (h*w/4) <eoi> <ts> <boi> <img> x (h*w/4) <eoi> <eov>

Such a family (``tokens.shared_placeholder``) cannot take images and videos in one forward, packed or not:
``make_sample`` refuses a sample with both, ``pack`` a row mixing them. What some releases cannot run at all
(``FamilySpec.release_bugs``) is refused with ``UpstreamLimit``, naming the transformers bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qwenvl.data.collators import VISION_KEYS, PackedCollator, to_device
from qwenvl.families import get_family
from qwenvl.packing import HOST_KEY
from qwenvl.release_bugs import UpstreamLimit

__all__ = ["SampleSpec", "Sample", "PackedBatch", "make_sample", "pack", "sample_inputs", "mixing_error"]

_TEXT_LOW, _TEXT_HIGH = 3, 500  # clear of pad (0), bos/eos (1, 2) and the vision ids (500-511)
_SAMPLE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


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

    def item(self, position_ids_3L: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sample as ``SupervisedDataset`` hands it to the collator, with its own mrope positions ``(3, L)``
        (labels: the ids; the harness weighs logits itself)."""
        item = {"input_ids": self.input_ids, "labels": self.input_ids.clone(), "position_ids": position_ids_3L}
        item.update({key: getattr(self, key) for key in _SAMPLE_KEYS if getattr(self, key) is not None})
        return item

    @classmethod
    def of_item(cls, item: dict[str, torch.Tensor]) -> "Sample":
        return cls(input_ids=item["input_ids"], **{key: item.get(key) for key in _SAMPLE_KEYS})


def mixing_error(family: str, what: str) -> Exception:
    """Why ``what`` (a sample, a packed row) cannot hold images and videos for ``family`` here."""
    spec = get_family(family)
    if spec.tokens.shared_placeholder:
        return ValueError(
            f"{family} fills images and videos with one placeholder: transformers cannot run {what} with both "
            "in one forward; put them in separate rows (split_by_media)"
        )
    return UpstreamLimit(spec.release_bug("mixed"))


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
    if spec.image is not None and spec.video is not None and not family.mixes_media():
        raise mixing_error(family.name, "a sample")

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


class PackedBatch:
    """One packed row: its samples as collator items (``Sample.item``: ids, labels, own positions, vision tensors),
    and the row ``PackedCollator`` builds from them. The tensors below are the collator's, upstream convention:
    ``input_ids (1, T)``, ``cu_seqlens`` int32 ``(S + 1,)``, ``position_ids (3, 1, T)``, the pixels and grids in
    sample order; ``model_inputs(convention)`` is the collator's row in any convention, without labels.
    """

    def __init__(self, items: Sequence[dict[str, torch.Tensor]], family: str | None = None, vision=None) -> None:
        if not items:
            raise ValueError("a packed batch needs at least one sample")
        self.items = list(items)
        self.family = family  # whose release bugs apply (``FamilySpec.release_bugs``), when known
        self.vision = vision  # the model's vision preamble (``PackedCollator.for_model``), when known
        self._row = PackedCollator("upstream")(self.items)

    @property
    def samples(self) -> list[Sample]:
        return [Sample.of_item(item) for item in self.items]

    input_ids = property(lambda self: self._row["input_ids"])
    labels = property(lambda self: self._row["labels"])  # the ids, each sample's first masked (the collator's)
    cu_seqlens = property(lambda self: self._row["attention_mask"])
    position_ids = property(lambda self: self._row["position_ids"])
    pixel_values = property(lambda self: self._row.get("pixel_values"))
    image_grid_thw = property(lambda self: self._row.get("image_grid_thw"))
    pixel_values_videos = property(lambda self: self._row.get("pixel_values_videos"))
    video_grid_thw = property(lambda self: self._row.get("video_grid_thw"))

    def vision_inputs(self) -> dict[str, torch.Tensor]:
        return {key: self._row[key] for key in VISION_KEYS if key in self._row}

    def model_inputs(self, convention: str = "upstream", device=None, *, host: bool = True, pad_to_multiple_of=None) -> dict:
        """The collator's row in ``convention`` (``qwenvl.packing.CONVENTIONS``), labels left out, its tensors moved
        to ``device`` as a trainer moves them (the host metadata stays on the host; ``host=False`` leaves it out,
        as a user's own collator would). A single sample in 4-row positions is an ordinary call to the model:
        refused where the release cannot run it."""
        if convention == "hf_positions" and self.family is not None and len(self.items) == 1:
            if why := get_family(self.family).release_bug("four_rows"):
                raise UpstreamLimit(why)
        collator = PackedCollator(convention, vision=self.vision if host else None, pad_to_multiple_of=pad_to_multiple_of)
        row = collator(self.items)
        row.pop("labels")
        if not host:
            row.pop(HOST_KEY)
        return row if device is None else to_device(row, device)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "PackedBatch":
        """The same row with ``fn(key, tensor)`` applied to every tensor of every sample."""
        return PackedBatch([{k: fn(k, v) for k, v in item.items()} for item in self.items], self.family, self.vision)

    def to(self, device) -> "PackedBatch":
        return self.map(lambda _, value: value.to(device))

    def with_pixels(self, dtype: torch.dtype) -> "PackedBatch":
        """The same row with its pixels in ``dtype`` (the model's)."""
        return self.map(lambda key, value: value.to(dtype) if key.startswith("pixel_values") else value)

    def select(self, picked: Sequence[int]) -> "PackedBatch":
        """A row of the samples ``picked`` (indices, in that order)."""
        return PackedBatch([self.items[i] for i in picked], self.family, self.vision)


def pack(model, samples: Sequence[Sample]) -> PackedBatch:
    """``samples`` as one packed row, each with its own positions (``model``'s ``get_rope_index`` on it alone)."""
    from qwenvl.data.vision_meta import VisionPreamble
    from qwenvl.positions import rope_index

    if not samples:
        raise ValueError("pack needs at least one sample")
    family = model.config.model_type
    has_image = any(s.image_grid_thw is not None for s in samples)
    has_video = any(s.video_grid_thw is not None for s in samples)
    if has_image and has_video and not get_family(family).mixes_media():
        raise mixing_error(family, "a packed row")
    items = [
        s.item(rope_index(model, s.input_ids[None], image_grid_thw=s.image_grid_thw, video_grid_thw=s.video_grid_thw)[:, 0])
        for s in samples
    ]
    return PackedBatch(items, family, VisionPreamble.of(model))


def sample_inputs(model, sample: Sample, device=None) -> dict:
    """One sample alone, as an ordinary (unpacked) batch of one: explicit all-ones mask and its positions."""
    from qwenvl.positions import rope_index

    ids = sample.input_ids[None].to(device)
    grids = {key: None if getattr(sample, key) is None else getattr(sample, key).to(device) for key in ("image_grid_thw", "video_grid_thw")}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": rope_index(model, ids, **grids)}
    for name in _SAMPLE_KEYS:
        value = getattr(sample, name)
        if value is not None:
            inputs[name] = value.to(device)
    return inputs

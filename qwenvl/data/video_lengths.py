"""A video's token count from its container's header, without decoding a frame.

The processor samples a video's frames by its metadata, resizes them by their size, and puts a placeholder text in
the template's video token (Qwen3-VL and GLM-4V: a timestamp a frame). Each step is asked of the processor itself::

    container      120 frames, 30 fps, 480x640      PyAV's stream header: the fields transformers' PyAV reader reports
    sampled        video_processor.sample_frames(metadata)                       -> frame indices (fps, min/max)
    patches        video_processor.get_num_of_video_patches(frames, height, width)   (its smart_resize)
    text           processor.replace_video_token(grid, metadata), put in by its get_text_with_replacements,
                   then tokenized with the rest of the templated row

so the count is the processor's own, never a copy of its rule; :func:`probe_video_rule` checks it against the
processor on synthetic videos once per dataset, and where a release has no such helpers, or they disagree, or
the dataset decodes videos with another reader than PyAV (whose header could count frames otherwise), every
video row is processed in full as before, said in the log.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qwenvl.data.rows import BadSampleError, RowRef

__all__ = ["VideoRule", "probe_video_rule", "container_metadata", "NoFrameCount"]

# (frames, fps, height, width): short (min frames), long at a high rate (fps sampling, max frames), odd sizes,
# small (min pixels) and large (max pixels).
PROBE_VIDEOS = ((3, 2.0, 30, 33), (97, 30.0, 64, 200), (17, 5.0, 600, 90), (9, 24.0, 1000, 1400))


class NoFrameCount(Exception):
    """The container does not say how many frames it holds: the row is processed in full."""


def container_metadata(ref: RowRef, path: Path):
    """The ``VideoMetadata`` transformers' PyAV reader reports for ``path``, from the stream's header."""
    import av
    from transformers.video_utils import VideoMetadata

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames, rate, height, width = stream.frames, stream.average_rate, stream.height, stream.width
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise BadSampleError(ref, f"video file {path} cannot be read (pyav): {type(exc).__name__}: {exc}") from None
    if not frames or not rate:
        raise NoFrameCount(f"{path}: the container has no frame count or rate")
    return VideoMetadata(
        total_num_frames=int(frames),
        fps=float(rate),
        duration=float(frames / rate),
        video_backend="pyav",
        height=height,
        width=width,
    )


def _processor_kwargs_class(processor):
    """The ``ProcessingKwargs`` class ``processor.__call__`` merges its kwargs with, where ``_merge_kwargs`` needs it
    passed (releases before 5.19: the ``<Processor>Kwargs`` class of the processor's module); ``None`` where the
    release finds it itself."""
    import inspect
    import sys

    first = next(iter(inspect.signature(processor._merge_kwargs).parameters.values()))
    if first.default is not inspect.Parameter.empty:
        return None
    module = sys.modules[type(processor).__module__]
    named = getattr(module, type(processor).__name__ + "Kwargs", None)
    if isinstance(named, type):
        return named
    # ProcessingKwargs is a TypedDict: no issubclass, so by name, defined in the processor's own module
    found = [c for n, c in vars(module).items() if n.endswith("ProcessorKwargs") and isinstance(c, type) and c.__module__ == module.__name__]
    if len(found) != 1:
        raise TypeError(f"{type(processor).__name__}: no single *ProcessorKwargs class in {module.__name__} ({len(found)} found)")
    return found[0]


class VideoRule:
    """The processor's placeholder text of each video, from its metadata (module docstring)."""

    def __init__(self, processor, *, partial_counted: bool = True) -> None:
        self.processor = processor
        self.partial_counted = partial_counted  # does get_num_of_video_patches count a partial temporal patch
        video = processor.video_processor
        tokenizer = getattr(processor, "tokenizer", processor)
        # The kwargs the processor's __call__ hands its video processor, and those the video processor's
        # preprocess hands its sample_frames.
        merged = processor._merge_kwargs(_processor_kwargs_class(processor), tokenizer_init_kwargs=tokenizer.init_kwargs)
        self.videos_kwargs = merged["videos_kwargs"]
        if hasattr(video, "_merge_and_standardize_kwargs"):
            kwargs = video._merge_and_standardize_kwargs(**self.videos_kwargs)
        else:  # releases before it (5.17): preprocess fills each kwarg not given from the video processor's attribute
            kwargs = dict(self.videos_kwargs)
            for name in video.valid_kwargs.__annotations__:
                kwargs.setdefault(name, getattr(video, name, None))
        self.sample = kwargs.pop("do_sample_frames")
        for name in ("input_data_format", "do_convert_rgb", "device", "video_metadata"):
            kwargs.pop(name, None)
        self.sample_kwargs = kwargs
        self.temporal = int(kwargs["temporal_patch_size"])

    def replacement(self, metadata) -> str:
        """The text the processor puts in place of a video token for a video of ``metadata`` (modified: its
        sampled ``frames_indices`` set, as the processor sets them)."""
        video = self.processor.video_processor
        if self.sample:
            metadata.frames_indices = video.sample_frames(metadata=metadata, **self.sample_kwargs)
        else:
            metadata.frames_indices = np.arange(metadata.total_num_frames)
        frames = len(metadata.frames_indices)
        grid_t = -(-frames // self.temporal)  # the last temporal patch is filled with repeats
        # The helper's own temporal count: the processor's (5.19 on), or whole patches only (5.17: 3 frames -> 1,
        # while its processor encodes 2); probe_video_rule finds which on its probe videos.
        helper_t = grid_t if self.partial_counted else frames // self.temporal
        if helper_t == 0:
            raise NoFrameCount(f"{frames} frame(s): this release's get_num_of_video_patches counts no temporal patch")
        patches = int(video.get_num_of_video_patches(frames, metadata.height, metadata.width, self.videos_kwargs))
        per_group = patches // helper_t
        # Only the grid's product per frame reaches the text (the frame count and its tokens a frame).
        grid = torch.tensor([[grid_t, 1, per_group]])
        return self.processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, video_idx=0)

    def expand(self, text: str, metadata: Sequence) -> str:
        """The templated ``text`` with each video token replaced as the processor replaces it."""
        replacements = [self.replacement(m) for m in metadata]
        return self.processor.get_text_with_replacements([text], videos_replacements=replacements)[0][0]


def probe_video_rule(processor) -> tuple[VideoRule | None, str]:
    """A :class:`VideoRule` if this processor has the helpers, the dataset would decode with PyAV, and the rule's
    text gives the processor's own token count on :data:`PROBE_VIDEOS` (frames built in memory, with their
    metadata); else ``None`` and why."""
    from transformers.video_utils import VideoMetadata

    from qwenvl.data.media import video_backend

    video = getattr(processor, "video_processor", None)
    missing = [
        name
        for owner, name in (
            (video, "sample_frames"),
            (video, "get_num_of_video_patches"),
            (processor, "replace_video_token"),
        )
        if not hasattr(owner, name)
    ]
    if missing:
        return None, f"{type(processor).__name__} has no {', '.join(missing)} in this transformers release"
    if (backend := video_backend()) != "pyav":
        return None, f"videos are decoded with {backend}, whose frame count may differ from the PyAV header's"
    if importlib.util.find_spec("av") is None:
        return None, "PyAV is not installed"
    content = [{"type": "video"}, {"type": "text", "text": "Describe it."}]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    ]
    tokenizer = getattr(processor, "tokenizer", processor)
    why = ""
    for partial_counted in (True, False):
        try:
            rule = VideoRule(processor, partial_counted=partial_counted)
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            for frames, fps, height, width in PROBE_VIDEOS:
                meta = dict(total_num_frames=frames, fps=fps, duration=frames / fps, video_backend="pyav")
                expanded = rule.expand(text, [VideoMetadata(**meta, height=height, width=width)])
                estimated = len(tokenizer(expanded, add_special_tokens=False)["input_ids"])
                pixels = np.zeros((frames, height, width, 3), dtype=np.uint8)
                out = processor(text=[text], videos=[pixels], video_metadata=[VideoMetadata(**meta)], return_tensors="pt")
                if estimated != out["input_ids"].shape[1]:
                    raise _Disagrees(
                        f"the video rule disagrees with {type(processor).__name__} ({estimated} vs "
                        f"{out['input_ids'].shape[1]} tokens on a probe video of {frames} frames at {fps} fps, "
                        f"{height}x{width})"
                    )
            return rule, ""
        except _Disagrees as exc:
            why = why or str(exc)
        except NotImplementedError:  # the base class's placeholder (5.17's Qwen3-Omni replace_video_token)
            why = why or f"{type(processor).__name__} does not implement its video helpers in this transformers release"
        except Exception as exc:  # a processor that cannot do this: process every video row, say why
            why = why or f"the video rule failed on probe videos: {type(exc).__name__}: {exc}"
    return None, why


class _Disagrees(Exception):
    pass

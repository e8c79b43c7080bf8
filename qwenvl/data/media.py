"""Media files of a row: an image's size from its header, an image or a video decoded; failures name the row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qwenvl.data.rows import BadSampleError, RowRef

__all__ = ["image_size", "open_image", "load_video", "video_backend"]


def image_size(ref: RowRef, path: Path) -> tuple[int, int]:
    """``(height, width)`` from the image file's header (PIL reads no pixels until asked)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise BadSampleError(ref, f"image file {path} cannot be read: {exc}") from None
    return height, width


def open_image(ref: RowRef, path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise BadSampleError(ref, f"image file {path} cannot be read: {exc}") from None


# transformers' video decoders, in the order we try them, with the module each needs.
_VIDEO_DECODERS = (("torchcodec", "torchcodec"), ("pyav", "av"), ("decord", "decord"), ("opencv", "cv2"))


def video_backend() -> str | None:
    """The decoder ``load_video`` uses here: the first of ``_VIDEO_DECODERS`` installed, or ``None``."""
    return next((name for name, module in _VIDEO_DECODERS if importlib.util.find_spec(module) is not None), None)


def load_video(ref: RowRef, path: Path):
    """All frames of a video file and its metadata, through transformers' ``load_video``; the processor
    samples frames by its own config, exactly as with a path."""
    from transformers.video_utils import load_video as decode

    backend = video_backend()
    if backend is None:
        raise BadSampleError(
            ref, f"video file {path} cannot be decoded: no video decoder is installed (pip install av, or torchcodec)"
        )
    try:
        return decode(str(path), backend=backend)
    except Exception as exc:
        raise BadSampleError(ref, f"video file {path} cannot be read ({backend}): {type(exc).__name__}: {exc}") from None

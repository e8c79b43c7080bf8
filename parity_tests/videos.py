"""Real mp4 files for the video tests, written with PyAV (imported when a file is written: callers skip first)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

__all__ = ["write_mp4"]


def write_mp4(path, frames: int, fps: int, height: int, width: int) -> None:
    """A moving square, MPEG-4 part 2 in mp4 (the encoder every FFmpeg build has), as scripts/make_fixtures.py."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i in range(frames):
            array = np.full((height, width, 3), 40, dtype=np.uint8)
            array[(i * 3) % height :, : (i * 5) % width + 4] = (200, 30, 30)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())

"""Where a CUDA step waits for the device: ``torch.cuda.set_sync_debug_mode`` with each sync's Python site.

    with recording_host_syncs() as sites:
        model(**batch).loss.backward()
    # sites: ["transformers/models/qwen3_vl/modeling_qwen3_vl.py:1211", ...]

torch's warning points into torch itself (``torch/cuda/__init__.py`` for a stream sync, ``torch/_tensor.py`` for
an f-string that formats a CUDA tensor); the site recorded is the innermost frame outside torch, with torch's line
after it where they differ, or the autograd engine's when a backward made it (no Python caller). Used by the GPU
tests and ``benchmarks/model_step.py``.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from typing import Iterator

import torch

__all__ = ["recording_host_syncs"]

# Checked in this order, each at its last occurrence in the path (a checkout may sit in a folder named qwenvl, a
# virtualenv in one named torch).
_ANCHORS = ("/parity_tests/", "/benchmarks/", "/transformers/", "/torch/", "/fla/", "/qwenvl/")


def short_site(site: str) -> str:
    """``transformers/models/qwen2_vl/modeling_qwen2_vl.py:1026`` rather than the whole path."""
    for anchor in _ANCHORS:
        if anchor in site:
            return anchor.strip("/") + "/" + site.rsplit(anchor, 1)[1]
    return site


def _site(filename: str, lineno: int) -> str:
    frames = [short_site(f"{f.filename}:{f.lineno}") for f in traceback.extract_stack()[:-2]]
    frames = [f for f in frames if not f.split(":")[0].endswith(("warnings.py", "host_syncs.py"))]
    here = short_site(f"{filename}:{lineno}")
    there = next((f for f in reversed(frames) if not f.startswith("torch/")), None)
    if there is None or there == here:
        return here
    return f"{there} -> {here}"


@contextlib.contextmanager
def recording_host_syncs() -> Iterator[list[str]]:
    """The sites of the host syncs made inside, in order (module docstring). CUDA's sync debug mode is ``warn``
    inside and back to its previous mode after."""
    sites: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites.append(_site(filename, lineno))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(previous)

"""The length pass's results on disk, so that a second start of the same run skips it.

One file per (data, processor, options) under ``$QWENVL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/qwenvl`` or
``~/.cache/qwenvl``), ``lengths/<key>.npz``: per input row, in order, its status (admitted, cut, bad), length,
whether it holds a video, and where it lies in its data file (``qwenvl.data.row_index.RowIndex``: a second start
neither scans nor parses the data files), and the problem of each bad row. The key hashes everything a length
depends on:

- each data file's resolved path, size and modification time, its ``%N`` ratio, and the sampling seed;
- the processor (its saved configuration, chat template included), the tokenizer's vocabulary, the model's
  family and vision token ids, ``model_max_length``, ``truncate``, whether header lengths were used;
- qwenvl's and transformers' versions (the processor's code) and this file's format number.

A changed data file or processor is a new key (the old file stays until the cache folder is cleared). An image
replaced by one of another size behind an unchanged data file is not seen by the key: the dataset's
``__getitem__`` still refuses a sample whose processed length differs, naming the cache file to delete.
A cache that cannot be written (read-only home) is skipped with a log line, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["cache_dir", "length_cache_key", "load_lengths", "save_lengths", "OK", "CUT", "BAD"]

logger = logging.getLogger(__name__)

FORMAT = 2
OK, CUT, BAD = 0, 1, 2


def cache_dir() -> Path:
    if os.environ.get("QWENVL_CACHE_DIR"):
        return Path(os.environ["QWENVL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl"


def _files_identity(specs: Sequence[str]) -> list:
    from qwenvl.data.rows import _parse_spec  # the data path's own parsing: one reading of "file%N"

    identity = []
    for spec in specs:
        path, ratio = _parse_spec(str(spec))
        resolved = path.resolve()
        stat = resolved.stat()
        identity.append([str(resolved), stat.st_size, stat.st_mtime_ns, ratio])
    return identity


def length_cache_key(specs: Sequence[str], processor, model, *, seed: int, model_max_length: int, truncate: bool, header: bool) -> str:
    """The hex key of one length pass (module docstring)."""
    import transformers

    import qwenvl
    from qwenvl.families import family_of_model

    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    spec = family_of_model(model)
    tokens = {name: getattr(model.config, name, None) for name in spec.tokens.keys()}
    parts = {
        "format": FORMAT,
        "qwenvl": qwenvl.__version__,
        "transformers": transformers.__version__,
        "files": _files_identity(specs),
        "seed": seed,
        "processor": processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor),
        "chat_template": getattr(processor, "chat_template", None),
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "family": spec.name,
        "tokens": tokens,
        "model_max_length": model_max_length,
        "truncate": truncate,
        "header": header,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_dir() / "lengths" / f"{key}.npz"


def load_lengths(key: str) -> tuple[dict[str, np.ndarray], dict[int, str], Path] | None:
    """``(arrays, problems, path)`` saved under ``key`` (``save_lengths``), or ``None``."""
    path = _path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name != "problems"}
            problems = {int(k): v for k, v in json.loads(str(data["problems"])).items()}
    except (OSError, ValueError, KeyError) as exc:
        logger.info("length cache %s unreadable (%s): the length pass runs again", path, exc)
        return None
    if len({len(values) for values in arrays.values()}) != 1 or "status" not in arrays:
        return None
    return arrays, problems, path


def save_lengths(key: str, arrays: dict[str, np.ndarray], problems: dict[int, str]) -> Path | None:
    """Per input row, ``arrays`` of one length each (``status``, ``lengths`` and the dataset's others), and
    the problem of each bad row."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, **arrays, problems=json.dumps(problems))
        os.replace(partial, path)  # atomic: a reader never sees half a file
    except OSError as exc:
        logger.info("length cache not written (%s): %s", path, exc)
        return None
    return path

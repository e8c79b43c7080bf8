"""Rows of the Qwen-VL fine-tuning format: reading the data files and the cheap checks of each row.

A data file is JSON (a list of rows) or JSONL (a row per line)::

    {"image": "images/cat.png",                      # optional: a path or a list, relative to the file
     "video": "clips/run.mp4",                       # optional, likewise
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Several files: ``"a.json,b.jsonl%50"``; ``%N`` keeps N percent of that file's rows (a seeded sample; N > 100
repeats rows). Each ``<image>`` / ``<video>`` tag takes the row's next image / video, in order. The checks here
need no processor and no model (``qwenvl.data.row_index.check_rows`` runs them before anything slow loads); a bad row raises
``BadSampleError`` naming its file and index.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DataFileError", "BadSampleError", "RowRef"]

_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_TAG = re.compile(r"(<image>|<video>)")


class DataFileError(ValueError):
    """A data file (or the data path) that cannot be read as rows; the message names it."""


class BadSampleError(ValueError):
    """A row that cannot become a training sample; the message names the file and the row."""

    def __init__(self, ref: "RowRef", problem: str):
        self.ref = ref
        self.problem = problem
        super().__init__(f"{ref}: {problem}")

    def __reduce__(self):  # crosses process boundaries (the forked length pass, DataLoader workers) intact
        return (type(self), (self.ref, self.problem))


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: its data file and its index there (0-based)."""

    file: Path
    index: int

    def __str__(self) -> str:
        return f"{self.file} sample {self.index}"


def _parse_spec(spec: str) -> tuple[Path, float]:
    path, _, ratio = spec.strip().partition("%")
    if ratio:
        try:
            percent = float(ratio)
        except ValueError:
            raise DataFileError(f"data path {spec!r}: the sampling ratio after % must be a number, got {ratio!r}") from None
        if not percent > 0 or not math.isfinite(percent):
            raise DataFileError(f"data path {spec!r}: the sampling ratio must be > 0 percent, got {ratio}")
    return Path(path).expanduser(), float(ratio) / 100 if ratio else 1.0


def _load_file(path: Path) -> list[Any]:
    """Every row of a data file, parsed (``qwenvl.data.shards`` reads a JSON list so; ``SupervisedDataset`` indexes
    rows by byte span instead: ``qwenvl.data.row_index``)."""
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataFileError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise DataFileError(f"{path}: a JSON data file must hold a list of rows, got {type(rows).__name__}")
    return rows


def _specs(data_path: str | os.PathLike | Sequence[str]) -> list[str]:
    """The ``file%N`` entries of a data path: comma-separated, one path, or a list."""
    if isinstance(data_path, str):
        return data_path.split(",")
    if isinstance(data_path, os.PathLike):  # one file (a Path is never split at commas)
        return [os.fspath(data_path)]
    return [str(spec) for spec in data_path]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class _Row:
    ref: RowRef
    messages: list[dict]
    images: list[Path]
    videos: list[Path]
    n_replies: int


def _check_row(ref: RowRef, row: Any) -> _Row:
    """Structure, tags and media presence; raises ``BadSampleError``."""
    if not isinstance(row, dict):
        raise BadSampleError(ref, f"a row must be a JSON object, got {type(row).__name__}")
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(ref, "'conversations' is missing or empty")
    base = ref.file.parent
    media: dict[str, list[Path]] = {}
    for kind in ("image", "video"):
        media[kind] = []
        for value in _as_list(row.get(kind)):
            if not isinstance(value, str) or not value:
                raise BadSampleError(ref, f"'{kind}' must be a path or a list of paths, got {value!r:.80}")
            path = Path(value) if Path(value).is_absolute() else base / value
            if not path.is_file():
                raise BadSampleError(ref, f"{kind} file {path} does not exist")
            media[kind].append(path)
    messages, counts, replies = [], Counter(), 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in _ROLES or not isinstance(turn.get("value"), str):
            raise BadSampleError(
                ref, f"turn {t} must be {{'from': one of {sorted(_ROLES)}, 'value': a string}}, got {turn!r:.80}"
            )
        role = _ROLES[turn["from"]]
        if role == "assistant":
            replies += 1
            if _TAG.search(turn["value"]):
                raise BadSampleError(ref, f"turn {t}: an assistant reply cannot hold <image> or <video>")
        content = []
        for piece in _TAG.split(turn["value"]):
            if piece == "<image>":
                content.append({"type": "image"})
                counts["image"] += 1
            elif piece == "<video>":
                content.append({"type": "video"})
                counts["video"] += 1
            elif piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    if replies == 0:
        raise BadSampleError(ref, "no assistant ('gpt') turn: nothing to train on")
    for kind in ("image", "video"):
        if counts[kind] != len(media[kind]):
            raise BadSampleError(ref, f"{counts[kind]} <{kind}> tags but {len(media[kind])} {kind} files")
    return _Row(ref, messages, media["image"], media["video"], replies)

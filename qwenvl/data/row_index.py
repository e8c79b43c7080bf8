"""Where each row of the data files is, in numpy arrays: a row is read back from its file by its byte span and
parsed when it is needed, so millions of rows cost bytes each, never a parsed dict each.

Per row (``RowIndex``; 20 bytes a row, against ~1.5 KB for a parsed row)::

    file_no int32  which data file (of the data path's files, in order)
    index   int32  its index in that file (``RowRef.index``: what an error names)
    offset  int64  where its bytes start in the file
    size    int32  how many bytes

    data.jsonl   {"conversations": ...}\\n{"image": ..., "conversations": ...}\\n
                 ^ offset 0, size 29       ^ offset 29, size 48

A JSONL file is scanned a line at a time (each line parsed once to check it, then dropped). A JSON file (one list
of rows) is read whole once and its elements' spans found with the standard decoder's ``raw_decode``; a file that
does not scan cleanly is parsed whole once more for the standard error message. The JSONL form is the one for
millions of rows.
"""

from __future__ import annotations

import json
import random
import re
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl.data.rows import BadSampleError, DataFileError, RowRef, _check_row, _parse_spec, _Row, _specs

__all__ = ["RowIndex", "AdmittedRows", "Ints", "read_rows", "check_rows", "index_files"]

_FIELDS = {"file_no": np.int32, "index": np.int32, "offset": np.int64, "size": np.int32}


class RowIndex(Sequence):
    """The rows of a data path as ``(RowRef, raw row)``, each read from disk and parsed when asked for."""

    def __init__(self, files: Sequence[Path], arrays: dict[str, np.ndarray]) -> None:
        self.files = [Path(f) for f in files]
        self.arrays = {name: np.ascontiguousarray(arrays[name], dtype=dtype) for name, dtype in _FIELDS.items()}

    def __len__(self) -> int:
        return len(self.arrays["offset"])

    def ref(self, i: int) -> RowRef:
        return RowRef(self.files[int(self.arrays["file_no"][i])], int(self.arrays["index"][i]))

    def __getitem__(self, i: int) -> tuple[RowRef, Any]:
        return self.chunk(i, i + 1)[0] if i >= 0 else self[len(self) + i]

    def chunk(self, start: int, stop: int) -> list[tuple[RowRef, Any]]:
        """Rows ``start:stop``, each file opened once for them."""
        a, handles, out = self.arrays, {}, []
        try:
            for i in range(start, min(stop, len(self))):
                f = int(a["file_no"][i])
                if f not in handles:
                    handles[f] = open(self.files[f], "rb")
                handles[f].seek(int(a["offset"][i]))
                out.append((self.ref(i), json.loads(handles[f].read(int(a["size"][i])).decode("utf-8"))))
        finally:
            for handle in handles.values():
                handle.close()
        return out

    def __iter__(self):
        for start in range(0, len(self), 512):
            yield from self.chunk(start, start + 512)

    def take(self, positions: np.ndarray) -> "RowIndex":
        return RowIndex(self.files, {name: values[positions] for name, values in self.arrays.items()})


class AdmittedRows(Sequence):
    """The admitted rows, in order, each a ``_Row`` parsed from disk when read (by a DataLoader worker)."""

    def __init__(self, index: RowIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> _Row:
        return _check_row(*self.index[i])

    def __iter__(self):
        return (_check_row(ref, raw) for ref, raw in self.index)


class Ints(Sequence):
    """A read-only sequence of ints over a numpy array (``SupervisedDataset.lengths``): a Python list of 10M
    lengths costs ~360 MB, this 40. Equal to any sequence of the same ints, as the list was."""

    def __init__(self, values) -> None:
        self.values = np.asarray(values)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return Ints(self.values[i]) if isinstance(i, slice) else int(self.values[i])

    def __iter__(self):
        return iter(self.values.tolist())

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and bool(np.array_equal(self.values, np.asarray(other)))

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __repr__(self) -> str:
        return f"Ints({self.values.tolist()!r})" if len(self) <= 20 else f"Ints({len(self)} values)"


def _scan_jsonl(path: Path) -> tuple[array, array]:
    offsets, sizes, position = array("q"), array("q"), 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line.decode("utf-8"))
                except json.JSONDecodeError as exc:
                    raise DataFileError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
                offsets.append(position)
                sizes.append(len(line))
            position += len(line)
    return offsets, sizes


_SPACE = re.compile(r"[ \t\n\r]*")


def _list_spans(text: str) -> list[tuple[int, int]]:
    """The character spans of a JSON list's elements; ``ValueError`` for anything else."""
    decoder, spans = json.JSONDecoder(), []
    i = _SPACE.match(text).end()
    if text[i : i + 1] != "[":
        raise ValueError("not a list")
    i = _SPACE.match(text, i + 1).end()
    if text[i : i + 1] == "]":
        i += 1
    else:
        while True:
            _, end = decoder.raw_decode(text, i)
            spans.append((i, end))
            i = _SPACE.match(text, end).end()
            if text[i : i + 1] == "]":
                i += 1
                break
            if text[i : i + 1] != ",":
                raise ValueError("expected , or ]")
            i = _SPACE.match(text, i + 1).end()
    if _SPACE.match(text, i).end() != len(text):
        raise ValueError("extra data")
    return spans


def _scan_json(path: Path) -> tuple[array, array]:
    text = path.read_text(encoding="utf-8")
    try:
        spans = _list_spans(text)
    except ValueError:
        try:  # the standard decoder's own message
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise DataFileError(
                f"{path}: a JSON data file must hold a list of rows, got {type(rows).__name__}"
            ) from None
        raise
    offsets, sizes = array("q"), array("q")
    if text.isascii():
        for start, end in spans:
            offsets.append(start)
            sizes.append(end - start)
        return offsets, sizes
    byte, char = 0, 0  # characters to bytes, one pass over the text
    for start, end in spans:
        byte += len(text[char:start].encode("utf-8"))
        size = len(text[start:end].encode("utf-8"))
        offsets.append(byte)
        sizes.append(size)
        byte, char = byte + size, end
    return offsets, sizes


def _scan(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    offsets, sizes = _scan_jsonl(path) if path.suffix == ".jsonl" else _scan_json(path)
    return np.frombuffer(offsets, dtype=np.int64), np.frombuffer(sizes, dtype=np.int64)


def index_files(data_path) -> list[Path]:
    """The data path's files, in order (``RowIndex.files``)."""
    return [_parse_spec(str(spec))[0] for spec in _specs(data_path)]


def read_rows(data_path, *, seed: int = 0) -> RowIndex:
    """The rows of every data file, each with its ``RowRef``; ``%N`` sampling applied (seeded). Nothing is kept
    parsed: the result is a ``RowIndex`` (a sequence of ``(RowRef, raw row)`` read from disk when asked for)."""
    files, parts = [], []
    for spec in _specs(data_path):
        path, ratio = _parse_spec(str(spec))
        offsets, sizes = _scan(path)
        kept = np.arange(len(offsets))
        if ratio != 1.0:
            whole, part = divmod(ratio, 1.0)
            rng = random.Random(f"{seed}:{path}")
            # random.sample picks by position: the same rows as sampling the parsed rows did
            sampled = np.asarray(rng.sample(range(len(offsets)), round(part * len(offsets))), dtype=np.int64)
            kept = np.concatenate([np.tile(kept, int(whole)), sampled])
            if len(offsets) and not len(kept):
                raise DataFileError(f"data path {spec!r}: {ratio * 100:g}% of {len(offsets)} rows keeps none")
        parts.append(
            {"file_no": np.full(len(kept), len(files)), "index": kept, "offset": offsets[kept], "size": sizes[kept]}
        )
        files.append(path)
    if not any(len(p["index"]) for p in parts):
        raise DataFileError(f"no rows in {data_path}")
    return RowIndex(files, {name: np.concatenate([p[name] for p in parts]) for name in _FIELDS})


def check_rows(data_path, *, seed: int = 0, skip_bad_samples: bool = False) -> list[tuple[RowRef, str]]:
    """The cheap checks of every row, before any processor or model loads: the files readable, each row's
    structure, its tags against its media, every media file present. Raises the first ``DataFileError`` /
    ``BadSampleError``; with ``skip_bad_samples`` returns the bad rows (``SupervisedDataset`` leaves them out
    and counts them) instead. Decoding and the processor come later, in ``SupervisedDataset``."""
    bad = []
    for ref, raw in read_rows(data_path, seed=seed):
        try:
            _check_row(ref, raw)
        except BadSampleError as exc:
            if not skip_bad_samples:
                raise
            bad.append((ref, exc.problem))
    return bad

"""Shards of rows for streaming: JSONL / JSON files, parquet files, webdataset-style tar files, a ``datasets`` dataset.

A shard reads its rows in order from any row on (``Shard.rows(start, scratch)``), each as ``(RowRef, raw row,
media folder)``: the raw row is the Qwen-VL fine-tuning format of ``qwenvl.data.rows`` with its media paths
absolute or relative to ``ref.file``'s folder, so the map-style checks (``_check_row``) read it unchanged::

    data/000.jsonl        a row per line; media relative to data/          row i: "data/000.jsonl sample i"
    data/001.parquet      a row per table row (columns image, video, conversations)
    data/002.tar          abc.json + abc.png, abd.json + abd.jpg ...       row i: "data/002.tar sample i (abd)"

In a tar, consecutive members sharing a key (the member name up to the first dot of its file name) are one sample;
its ``<key>.json`` is the row. The row's ``image`` / ``video`` entries name the sample's own members (by extension,
``"png"``, or by member name); a row without them takes the sample's image (video) members in tar order. Those
members are written to a folder of their own under ``scratch`` (the caller removes it once the sample is processed).

A ``datasets`` dataset (optional dependency: only imported when one is given) is cut into shards: an
``IterableDataset`` (``streaming=True``) by its own shards (``num_shards``), a map-style ``Dataset`` in contiguous
runs of ``rows_per_shard``. String media entries are relative to ``media_root``; ``datasets`` images (PIL images, or
``{"bytes": ...}`` when not decoded) are written under ``scratch``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from qwenvl.data.rows import DataFileError, RowRef

__all__ = ["Shard", "TarRowRef", "Unreadable", "open_shards", "STREAM_SUFFIXES"]

STREAM_SUFFIXES = (".jsonl", ".json", ".parquet", ".tar")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov")

# What Shard.rows yields: a row's name, the raw row, and the folder its extracted media were written to (or None).
RowItem = tuple[RowRef, Any, "Path | None"]


@dataclass(frozen=True)
class TarRowRef(RowRef):
    """A tar sample: its tar file, its ordinal there and its key."""

    key: str = ""

    def __str__(self) -> str:
        return f"{self.file} sample {self.index} ({self.key})"


@dataclass(frozen=True)
class Unreadable:
    """A row that could not be read at all (a tar sample without its JSON): refused by name, or skipped."""

    problem: str


class Shard:
    """One shard of rows; ``name`` identifies it in a resume state (a file path, or the dataset's shard)."""

    name: str

    def rows(self, start: int, scratch: Path) -> Iterator[RowItem]:
        raise NotImplementedError


@dataclass
class FileShard(Shard):
    """A shard that is one file: named by its path."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class JsonShard(FileShard):
    def rows(self, start: int, scratch: Path) -> Iterator[RowItem]:
        if self.path.suffix == ".json":  # a JSON list: read whole, as the map-style dataset does
            from qwenvl.data.rows import _load_file

            for index, row in enumerate(_load_file(self.path)):
                if index >= start:
                    yield RowRef(self.path, index), row, None
            return
        index = 0
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if index >= start:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataFileError(f"{self.path} line {line_no}: not valid JSON ({exc.msg})") from None
                    yield RowRef(self.path, index), row, None
                index += 1


@dataclass
class ParquetShard(FileShard):
    def rows(self, start: int, scratch: Path) -> Iterator[RowItem]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataFileError(f"{self.path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        file = pq.ParquetFile(self.path)
        first = 0
        for group in range(file.num_row_groups):
            count = file.metadata.row_group(group).num_rows
            if first + count > start:  # whole row groups before `start` are never read
                for offset, row in enumerate(file.read_row_group(group).to_pylist()):
                    if first + offset >= start:
                        yield RowRef(self.path, first + offset), row, None
            first += count


def _key_and_ext(member: str) -> tuple[str, str]:
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


@dataclass
class TarShard(FileShard):
    def rows(self, start: int, scratch: Path) -> Iterator[RowItem]:
        with tarfile.open(self.path) as tar:
            for index, (key, members) in enumerate(_tar_samples(tar)):
                if index >= start:
                    yield self._row(tar, TarRowRef(self.path, index, key), members, scratch)

    def _row(self, tar: tarfile.TarFile, ref: "TarRowRef", members: list[tarfile.TarInfo], scratch: Path) -> RowItem:
        by_ext = {_key_and_ext(m.name)[1]: m for m in members}
        if ".json" not in by_ext:
            return ref, Unreadable(f"no {ref.key}.json member in the tar"), None
        try:
            row = json.loads(tar.extractfile(by_ext[".json"]).read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return ref, Unreadable(f"{ref.key}.json is not valid JSON ({exc})"), None
        folder = scratch / f"{self.path.stem}-{ref.index}"
        if isinstance(row, dict):
            row = dict(row)
            for kind, exts in (("image", _IMAGE_EXTS), ("video", _VIDEO_EXTS)):
                row[kind] = _tar_media(tar, row.get(kind), members, exts, folder)
        return ref, row, folder


def _tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """Consecutive file members sharing a key, as ``(key, members)``."""
    key, members = None, []
    for info in tar:
        if not info.isfile():
            continue
        member_key = _key_and_ext(info.name)[0]
        if member_key != key and members:
            yield key, members
            members = []
        key = member_key
        members.append(info)
    if members:
        yield key, members


def _tar_media(tar, entries, members: list[tarfile.TarInfo], exts: Sequence[str], folder: Path):
    """The row's media entries with each of the sample's members written under ``folder``: named by extension
    or member name, or (no entries) every member with one of ``exts``. Anything else is left to the checks."""
    if entries is None:
        chosen = [m for m in members if _key_and_ext(m.name)[1].endswith(exts)]
        return [_extract(tar, m, folder) for m in chosen] or None
    out = []
    for entry in entries if isinstance(entries, list) else [entries]:
        match = next(
            (m for m in members if isinstance(entry, str) and entry in (m.name, _key_and_ext(m.name)[1].lstrip("."))),
            None,
        )
        out.append(_extract(tar, match, folder) if match is not None else entry)
    return out if isinstance(entries, list) else out[0]


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(member.name).name
    target.write_bytes(tar.extractfile(member).read())
    return str(target)


@dataclass
class DatasetsShard(Shard):
    """Shard ``index`` of ``count`` of a ``datasets`` dataset (``IterableDataset`` or map-style ``Dataset``)."""

    dataset: Any
    index: int
    count: int
    label: str
    media_root: Path

    @property
    def name(self) -> str:
        return f"{self.label}[shard {self.index} of {self.count}]"

    def _part(self):
        import datasets

        if isinstance(self.dataset, datasets.IterableDataset):
            return self.dataset.shard(num_shards=self.count, index=self.index)
        return self.dataset.shard(num_shards=self.count, index=self.index, contiguous=True)

    def rows(self, start: int, scratch: Path) -> Iterator[RowItem]:
        import datasets

        part = self._part()
        if isinstance(part, datasets.IterableDataset):
            rows = part.skip(start)
        else:
            rows = (part[i] for i in range(start, len(part)))
        file = Path(self.name)
        for index, row in enumerate(rows, start):
            ref = RowRef(file, index)
            folder = scratch / f"ds{self.index}-{index}"
            if isinstance(row, dict):
                row = dict(row)
                for kind in ("image", "video"):
                    row[kind] = self._media(row.get(kind), folder)
            yield ref, row, folder

    def _media(self, value, folder: Path):
        if value is None:
            return None
        if isinstance(value, list):
            return [self._media(v, folder / str(k)) for k, v in enumerate(value)]
        if isinstance(value, str):
            return value if os.path.isabs(value) else str(self.media_root / value)
        data = value.get("bytes") if isinstance(value, dict) else None
        if data is None and hasattr(value, "save"):  # a decoded PIL image
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            data = buffer.getvalue()
        if data is None:
            return value.get("path") if isinstance(value, dict) else value  # left to the checks to refuse
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "media"
        target.write_bytes(data)
        return str(target)


def _datasets_shards(dataset, *, num_shards, rows_per_shard: int, media_root) -> list[Shard]:
    import datasets

    root = Path(media_root or ".").expanduser().resolve()
    label = getattr(getattr(dataset, "info", None), "dataset_name", None) or type(dataset).__name__
    if isinstance(dataset, datasets.IterableDataset):
        count = num_shards or dataset.num_shards
    else:
        count = num_shards or max(1, -(-len(dataset) // rows_per_shard))
    return [DatasetsShard(dataset, i, count, label, root) for i in range(count)]


def _is_datasets(data) -> bool:
    module = type(data).__module__ or ""
    return module.split(".")[0] == "datasets"


def _files(entry: str) -> list[Path]:
    path = Path(entry).expanduser()
    if any(c in entry for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry)))
        if not found:
            raise DataFileError(f"data path {entry!r}: the pattern matches no file")
        return [p for p in found if p.is_file()]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in STREAM_SUFFIXES)
        if not found:
            raise DataFileError(f"data path {entry!r}: the folder holds no {', '.join(STREAM_SUFFIXES)} file")
        return found
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    return [path]


def open_shards(
    data: str | os.PathLike | Sequence[str] | Any,
    *,
    num_shards: int | None = None,
    rows_per_shard: int = 10_000,
    media_root: str | os.PathLike | None = None,
) -> list[Shard]:
    """The shards of ``data``: comma-separated (or a list of) files, folders (their ``.jsonl``, ``.json``,
    ``.parquet`` and ``.tar`` files, sorted) and glob patterns; or a ``datasets`` dataset. Raises
    ``DataFileError`` naming what cannot be read, before any row is."""
    if _is_datasets(data):
        return _datasets_shards(data, num_shards=num_shards, rows_per_shard=rows_per_shard, media_root=media_root)
    entries = (
        data.split(",") if isinstance(data, str) else [os.fspath(data)] if isinstance(data, os.PathLike) else list(data)
    )
    shards: list[Shard] = []
    for entry in (str(e).strip() for e in entries):
        if "%" in entry:
            raise DataFileError(f"data path {entry!r}: sampling ratios (%N) are not supported when streaming")
        for path in _files(entry):
            kinds = {".jsonl": JsonShard, ".json": JsonShard, ".parquet": ParquetShard, ".tar": TarShard}
            if path.suffix not in kinds:
                raise DataFileError(f"data file {path}: a stream reads {', '.join(STREAM_SUFFIXES)} files")
            shards.append(kinds[path.suffix](path))
    if not shards:
        raise DataFileError(f"no data files in {data}")
    return shards

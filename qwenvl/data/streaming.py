"""``StreamingDataset``: rows read from shards as a stream, packed online, with an exact mid-epoch resume.

Which rows a process reads (shard ``i`` to rank ``i % world``, then the rank's ``k``-th shard to DataLoader worker
``k % workers``), each worker packing its own stream (``qwenvl.data.stream.OnlinePacker``)::

    shards      s0 s1 s2 s3 s4 s5 s6          2 ranks, 2 workers each
    rank 0      s0 s2 s4 s6                   worker 0: s0 s4     worker 1: s2 s6
    rank 1      s1 s3 s5                      worker 0: s1 s5     worker 1: s3

A worker reads its shards in order, row by row: each row gets the map-style dataset's checks and its length from
the text, image and video headers (``SupervisedDataset``'s own methods and rules), waits in the packer's buffer, and
is decoded and processed only when its packed row goes out. When its shards end, the worker starts its next pass over them (a
stream never ends: train with ``max_steps``); a worker with no good row stops.

The DataLoader takes packed rows from its workers in turn (worker 0, 1, ..., 0, ...). Each row carries, under
``STREAM_KEY``, its worker's position after it: the pass, the shard and row where reading goes on, and the packer's
state (``OnlinePacker.state_dict``). ``PackedCollator`` puts it in the batch; whoever consumes the batch hands it to
``record`` (``QwenVLTrainer`` does, and saves ``state_dict()`` in each checkpoint). ``state_dict()`` is thus a
function of the batches consumed, never of what the workers prefetched::

    consumed   w0:r0  w1:r0  w0:r1          state: w0 after r1, w1 after r0, next worker w1
    resumed    physical worker 0 plays w1, physical worker 1 plays w0: the DataLoader's next row is w1's

A resumed dataset (``load_state_dict``) restarts each worker at its position, reads again the samples its packer
still held (their keys are in the packer's state), and so yields exactly the rows the uninterrupted run would have
yielded from there. It needs the same shards, ranks and number of DataLoader workers as the run that saved it
(checked), and fresh workers for each iteration (no ``persistent_workers``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from qwenvl.data.collators import STREAM_KEY
from qwenvl.data.dataset import SupervisedDataset, _named
from qwenvl.data.lengths import probe_length_rule
from qwenvl.data.replies import Replies
from qwenvl.data.rows import BadSampleError, DataFileError, _check_row
from qwenvl.data.shards import Unreadable, open_shards
from qwenvl.data.stream import OnlinePacker, StreamRow

__all__ = ["StreamingDataset", "STREAM_KEY"]

logger = logging.getLogger(__name__)
_VERSION = 1


class _Samples(SupervisedDataset):
    """``SupervisedDataset``'s per-row half, for rows that arrive one at a time: the same checks, header lengths,
    processing, cut and stand-in, with ``rows`` and ``lengths`` keyed by the sample's stream key."""

    def __init__(
        self, processor, *, model, model_max_length: int, truncate: bool, skip_bad_samples: bool, header_lengths: bool
    ):
        if model_max_length <= 0:
            raise ValueError(f"model_max_length must be positive, got {model_max_length}")
        self.processor, self.model = processor, model
        self.model_max_length, self.truncate, self.skip_bad_samples = int(model_max_length), truncate, skip_bad_samples
        self._replies = Replies(processor)
        self._rule = self._video_rule = None
        self._video_probed = not header_lengths  # probed at the first video row (``_by_header``)
        self.skipped, self.truncated, self.length_cache_path = [], [], None
        self.rows: dict[str, Any] = {}
        self.lengths: dict[str, int] = {}
        if header_lengths:
            self._rule, why = probe_length_rule(processor, model)
            if self._rule is None:
                logger.info("image rows are processed in full to learn their lengths: %s", why)
        from qwenvl.families import family_of_model

        self._mixes_media = family_of_model(model).mixes_media()

    def admit(self, ref, raw) -> tuple[Any, int]:
        """The checked row and its length (from headers where the rule covers it); raises ``BadSampleError``."""
        if isinstance(raw, Unreadable):
            raise BadSampleError(ref, raw.problem)
        row = _check_row(ref, raw)
        if row.videos and not self._mixes_media:
            raise BadSampleError(
                ref,
                "a video row in a stream: this family cannot take images and videos in one forward, and a stream "
                "packs them together (stream the video rows on their own, or use the map-style dataset)",
            )
        result = _named(row, self._admit_by_header if self._by_header(row) else self._admit, row)
        if isinstance(result, BadSampleError):
            raise result
        return row, int(result[1])

    def item(self, key: str, row, length: int) -> dict[str, torch.Tensor]:
        """The processed sample (``SupervisedDataset.__getitem__``: the length check, or the stand-in)."""
        self.rows[key], self.lengths[key] = row, length
        try:
            return self[key]
        finally:
            del self.rows[key], self.lengths[key]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's, accelerate launch's


class StreamingDataset(torch.utils.data.IterableDataset):
    """Packed rows (lists of samples, as ``PackedDataset`` gives) from a stream of shards; see the module docstring.

    Args:
        data: files, folders, glob patterns (``qwenvl.data.shards.open_shards``), or a ``datasets`` dataset.
        processor, model: as ``SupervisedDataset``.
        budget: tokens per packed row.
        model_max_length: the most tokens a sample may have (default ``budget``; at most ``budget``).
        buffer: samples the packer holds before it packs (``OnlinePacker``).
        rank, world_size: this process's; default torch.distributed's, else ``RANK`` / ``WORLD_SIZE``.
        num_shards, rows_per_shard, media_root: for a ``datasets`` dataset (``open_shards``).
    """

    def __init__(
        self,
        data,
        processor,
        *,
        model,
        budget: int,
        model_max_length: int | None = None,
        truncate: bool = True,
        skip_bad_samples: bool = False,
        buffer: int = 1024,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        header_lengths: bool = True,
        num_shards: int | None = None,
        rows_per_shard: int = 10_000,
        media_root: str | os.PathLike | None = None,
    ) -> None:
        model_max_length = budget if model_max_length is None else model_max_length
        if model_max_length > budget:
            raise ValueError(f"model_max_length {model_max_length} is above the packing budget {budget}")
        if buffer < 2:
            raise ValueError(f"the packing buffer must hold at least 2 samples, got {buffer}")
        self.budget, self.buffer, self.seed, self.skip_bad_samples = (
            int(budget),
            int(buffer),
            int(seed),
            skip_bad_samples,
        )
        self.shards = open_shards(data, num_shards=num_shards, rows_per_shard=rows_per_shard, media_root=media_root)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        # (global shard id, shard): shard i reads on rank i % world
        self.rank_shards = [(i, s) for i, s in enumerate(self.shards) if i % self.world_size == self.rank]
        if not self.rank_shards:
            raise DataFileError(
                f"{len(self.shards)} shards for {self.world_size} ranks: rank {self.rank} has none "
                "(give at least as many shards as ranks)"
            )
        self._samples = _Samples(
            processor,
            model=model,
            model_max_length=model_max_length,
            truncate=truncate,
            skip_bad_samples=skip_bad_samples,
            header_lengths=header_lengths,
        )
        self._state = self._fresh_state()

    def _fresh_state(self) -> dict:
        return {
            "version": _VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "shards": [shard.name for _, shard in self.rank_shards],
            "workers": None,
            "next": 0,
            "streams": {},
        }

    # -- the position: a function of the batches consumed ---------------------------------------------------

    def record(self, tag: str) -> None:
        """A consumed packed row's ``STREAM_KEY`` value: its worker's position after it."""
        entry = json.loads(tag)
        if self._state["workers"] not in (None, entry["workers"]):
            raise ValueError(
                f"rows from {entry['workers']} DataLoader workers, but this stream's state has {self._state['workers']}"
            )
        self._state["workers"] = entry["workers"]
        self._state["streams"][str(entry["role"])] = {k: entry[k] for k in ("pass", "position", "packer", "skipped")}
        self._state["next"] = (entry["role"] + 1) % entry["workers"]

    def state_dict(self) -> dict:
        """Where the stream goes on after the rows ``record``-ed so far (JSON-serialisable)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Go on from ``state`` (``state_dict()`` of a run over the same shards, ranks and DataLoader workers)."""
        mine = self._fresh_state()
        if state.get("version") != _VERSION:
            raise ValueError(
                f"a stream state of version {state.get('version')!r}; this qwenvl reads version {_VERSION}"
            )
        for field in ("rank", "world_size", "shards"):
            if state[field] != mine[field]:
                raise ValueError(
                    f"the stream state was saved with {field} {_short(state[field])}, this run has {_short(mine[field])}: "
                    "resume with the same data, ranks and shards"
                )
        self._state = copy.deepcopy(state)

    @property
    def fill_ratio(self) -> float:
        """Tokens over what the rows could hold, over the rows consumed in each worker's current pass."""
        packers = [s["packer"] for s in self._state["streams"].values()]
        rows = sum(p["rows"] for p in packers)
        return sum(p["tokens"] for p in packers) / (rows * self.budget) if rows else 1.0

    @property
    def skipped_rows(self) -> int:
        """Bad rows skipped (``skip_bad_samples``) in each worker's current pass, up to the rows consumed."""
        return sum(s["skipped"] for s in self._state["streams"].values())

    def summary(self) -> str:
        rows = sum(s["packer"]["rows"] for s in self._state["streams"].values())
        text = (
            f"{len(self.shards)} shards, {len(self.rank_shards)} read on rank {self.rank} of {self.world_size}; "
            f"{rows} packed rows consumed in the current pass, fill ratio {self.fill_ratio:.3f}"
        )
        return text + (f"; {self.skipped_rows} bad rows skipped" if self.skipped_rows else "")

    # -- reading ---------------------------------------------------------------------------------------------

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        saved = self._state["workers"]
        if saved is not None and saved != workers:
            raise ValueError(
                f"this stream's state was saved with {saved} DataLoader workers per rank; resume with as many "
                f"(--dataloader_num_workers {0 if saved == 1 else saved}), not {workers}"
            )
        role = (physical + self._state["next"]) % workers
        shards = self.rank_shards[role::workers]
        if shards:
            yield from _Stream(self, role, workers, shards, self._state["streams"].get(str(role))).rows()


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class _Stream:
    """One DataLoader worker's stream (logical worker ``role``): its shards in order, pass after pass."""

    def __init__(self, dataset: StreamingDataset, role: int, workers: int, shards: list, state: dict | None) -> None:
        self.ds, self.role, self.workers, self.shards = dataset, role, workers, shards
        state = state or {"pass": 0, "position": [0, 0], "packer": None, "skipped": 0}
        self.pass_, self.position, self.packer_state = int(state["pass"]), list(state["position"]), state["packer"]
        self.skipped = int(state["skipped"])
        self.waiting: dict[str, tuple[Any, int, Path | None]] = {}  # key -> (row, length, media folder)

    def rows(self):
        scratch = Path(tempfile.mkdtemp(prefix="qwenvl-stream-"))
        try:
            while True:
                fresh = self.packer_state is None and self.position == [0, 0]
                seed = random.Random(f"{self.ds.seed}:{self.ds.rank}:{self.role}:{self.pass_}").getrandbits(31)
                packer = OnlinePacker(self.ds.budget, self.ds.buffer, seed=seed, state=self.packer_state)
                if self.packer_state is not None:
                    self._recover(self.packer_state, scratch)
                emitted = 0
                for row in packer.rows(self._read(scratch)):
                    emitted += 1
                    yield self._items(row, packer)
                if fresh and not emitted:
                    logger.warning(
                        "no good row in %s: this DataLoader worker has nothing to train on",
                        [s.name for _, s in self.shards],
                    )
                    return
                self.pass_, self.position, self.packer_state, self.skipped = self.pass_ + 1, [0, 0], None, 0
        finally:
            for _, _, media in self.waiting.values():
                _remove(media)
            shutil.rmtree(scratch, ignore_errors=True)

    def _read(self, scratch: Path):
        """``(key, length)`` of each good row from the position on; the row waits in ``waiting`` for its packed row."""
        while self.position[0] < len(self.shards):
            ordinal, start = self.position
            shard_id, shard = self.shards[ordinal]
            for ref, raw, media in shard.rows(start, scratch):
                self.position = [ordinal, ref.index + 1]
                sample = self._admit(ref, raw, media)
                if sample is not None:
                    key = f"{shard_id}:{ref.index}"
                    self.waiting[key] = sample
                    yield key, sample[1]
            self.position = [ordinal + 1, 0]

    def _admit(self, ref, raw, media: Path | None):
        try:
            row, length = self.ds._samples.admit(ref, raw)
        except BadSampleError as exc:
            _remove(media)
            if not self.ds.skip_bad_samples:
                raise
            self.skipped += 1
            logger.warning("skipped a bad row (%d so far in this worker): %s", self.skipped, exc)
            return None
        return row, length, media

    def _items(self, row: StreamRow, packer: OnlinePacker) -> list[dict]:
        """The packed row's processed samples, the first carrying the worker's position after it."""
        items = []
        for key in row.keys:
            data, length, media = self.waiting.pop(key)
            try:
                items.append(self.ds._samples.item(key, data, length))
            finally:
                _remove(media)
        position = {
            "role": self.role,
            "workers": self.workers,
            "keys": list(row.keys),
            "pass": self.pass_,
            "position": self.position,
            "packer": packer.state_dict(),
            "skipped": self.skipped,
        }
        items[0][STREAM_KEY] = json.dumps(position)
        return items

    def _recover(self, state: dict, scratch: Path) -> None:
        """Read again the samples the packer held at the saved position (its held and pending keys)."""
        wanted: dict[str, int] = {str(k): int(n) for k, n in state["held"]}
        wanted.update({str(k): int(n) for r in state["pending"] for k, n in zip(r["keys"], r["lengths"])})
        ordinals = {shard_id: ordinal for ordinal, (shard_id, _) in enumerate(self.shards)}
        by_shard: dict[int, set[int]] = {}
        for key in wanted:
            shard_id, index = (int(part) for part in key.split(":"))
            by_shard.setdefault(ordinals[shard_id], set()).add(index)
        for ordinal, indices in sorted(by_shard.items()):
            shard_id, shard = self.shards[ordinal]
            for ref, raw, media in shard.rows(min(indices), scratch):
                if ref.index not in indices:
                    _remove(media)
                    continue
                key = f"{shard_id}:{ref.index}"
                try:
                    row, length = self.ds._samples.admit(ref, raw)
                except BadSampleError as exc:
                    raise RuntimeError(
                        f"{exc}: this sample was admitted before the checkpoint, and no longer is"
                    ) from None
                if length != wanted[key]:
                    raise RuntimeError(
                        f"{ref}: {length} tokens now, {wanted[key]} when the checkpoint was saved: the data changed"
                    )
                self.waiting[key] = (row, length, media)
                if ref.index >= max(indices):
                    break

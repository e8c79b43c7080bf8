"""Online packing of a stream of samples into rows, with a state from which a resumed run continues exactly.

Data that does not fit in memory arrives as a stream of ``(key, length)`` (a key names the sample: its shard and
position). ``OnlinePacker`` holds a bounded buffer, packs it first-fit-decreasing (``qwenvl.data.packer.pack``,
seeded) when it is full, hands out the full rows, and keeps the least-filled row's samples back to pack with what
comes next; at the end of the stream everything left goes out::

    buffer 4, budget 16     stream  a=9 b=7 c=5 d=4 | e=6 f=3 g=8 ...
    first pack              [a b] 16  [c d] 9           -> emit [a b]; keep c d (the least filled)
    second pack (c d e f)   [e c d] 15 [f] 3  ...

``state_dict()`` after any row says everything the rows to come depend on: how many samples the stream has
given, the samples held back, the rows of the current pack not yet handed out, and the counters. A run resumed from
that state, with the stream restarted at ``state["consumed"]``, yields exactly the rows the uninterrupted run yields
from there (``parity_tests/test_stream.py`` compares them row by row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Iterator

from qwenvl.data.packer import pack

__all__ = ["OnlinePacker", "StreamRow"]


@dataclass(frozen=True)
class StreamRow:
    """One packed row: its samples' keys in concatenation order, and their lengths."""

    keys: tuple[Hashable, ...]
    lengths: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class OnlinePacker:
    """Rows of at most ``budget`` tokens from a stream of ``(key, length)``, packed ``buffer`` samples at a time.

    ``state`` (from ``state_dict()``) resumes a packer: give it the stream from ``state["consumed"]`` on.
    """

    budget: int
    buffer: int = 1024
    seed: int = 0
    state: dict | None = None
    _held: list[tuple[Any, int]] = field(default_factory=list, init=False)
    _pending: list[StreamRow] = field(default_factory=list, init=False)
    _consumed: int = field(default=0, init=False)
    _packs: int = field(default=0, init=False)
    _tokens: int = field(default=0, init=False)
    _rows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.buffer < 2:
            raise ValueError(f"the packing buffer must hold at least 2 samples, got {self.buffer}")
        if self.state is not None:
            self._held = [(k, int(n)) for k, n in self.state["held"]]
            self._pending = [StreamRow(tuple(r["keys"]), tuple(r["lengths"])) for r in self.state["pending"]]
            self._consumed, self._packs = int(self.state["consumed"]), int(self.state["packs"])
            self._tokens, self._rows = int(self.state["tokens"]), int(self.state["rows"])

    @property
    def fill_ratio(self) -> float:
        """Tokens handed out over what the rows handed out could hold (the same whether or not the run resumed)."""
        return self._tokens / (self._rows * self.budget) if self._rows else 1.0

    def _fill(self, rows: list[StreamRow]) -> float:
        return sum(r.tokens for r in rows) / (len(rows) * self.budget) if rows else 1.0

    def state_dict(self) -> dict:
        """What the rows after the last one handed out depend on (JSON-serialisable when the keys are)."""
        return {
            "consumed": self._consumed,
            "held": [list(item) for item in self._held],
            "pending": [{"keys": list(r.keys), "lengths": list(r.lengths)} for r in self._pending],
            "packs": self._packs,
            "tokens": self._tokens,
            "rows": self._rows,
        }

    def rows(self, stream: Iterable[tuple[Hashable, int]]) -> Iterator[StreamRow]:
        """The packed rows of ``stream`` (continuing after ``state`` when resumed)."""
        yield from self._hand_out()
        for key, length in stream:
            if not 0 < int(length) <= self.budget:
                raise ValueError(f"sample {key!r} has {length} tokens; a row holds 1 to {self.budget}")
            self._held.append((key, int(length)))
            self._consumed += 1
            if len(self._held) >= self.buffer:
                self._pack(final=False)
                yield from self._hand_out()
        if self._held:
            self._pack(final=True)
            yield from self._hand_out()

    def _pack(self, *, final: bool) -> None:
        packing = pack([n for _, n in self._held], self.budget, seed=self.seed + self._packs, shuffle_rows=False)
        self._packs += 1
        rows = [
            StreamRow(tuple(self._held[i][0] for i in row), tuple(self._held[i][1] for i in row)) for row in packing.rows
        ]
        kept: list[tuple[Any, int]] = []
        if not final and len(rows) > 1:
            least = min(range(len(rows)), key=lambda r: (rows[r].tokens, r))
            kept = list(zip(rows[least].keys, rows[least].lengths))
            rows.pop(least)
        self._held = kept
        self._pending = rows

    def _hand_out(self) -> Iterator[StreamRow]:
        while self._pending:
            row = self._pending.pop(0)
            self._tokens += row.tokens
            self._rows += 1
            yield row

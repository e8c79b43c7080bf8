"""The bin packer: which samples share a packed row.

Rows are filled up to a token budget that counts every token the model sees, vision tokens included
(an image of 448x448 is ~256 tokens after the 2x2 merger: it must count)::

    budget 16      lengths  a=9  b=7  c=5  d=4  e=3
    rows (FFD)     [a b]           16/16
                   [c d e]         12/16
    fill ratio     28 / 32 = 0.875

First-fit-decreasing: samples sorted longest first (ties broken by a seeded shuffle, so equal lengths do
not keep file order), each placed in the first row with room (a segment tree of free room finds it in
O(log rows), so a million samples pack in seconds). FFD uses at most 11/9 OPT + 6/9 rows. The rows
are then shuffled with the same seed, so training does not see the longest rows first. Deterministic in
``seed``; a sample longer than the budget is never split (truncation, in text only, is the dataset's job).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Packing", "pack"]


@dataclass(frozen=True)
class Packing:
    """The rows of a packing: ``rows[r]`` lists sample indices in the order they are concatenated."""

    rows: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]
    budget: int

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def fill_ratio(self) -> float:
        """Tokens packed over the tokens the rows could hold (1.0 = no row has room left)."""
        return self.tokens / (len(self.rows) * self.budget) if self.rows else 1.0

    def row_tokens(self, row: int) -> int:
        return sum(self.lengths[i] for i in self.rows[row])

    def summary(self) -> str:
        return (
            f"{len(self.lengths)} samples in {len(self.rows)} rows of <= {self.budget} tokens, "
            f"fill ratio {self.fill_ratio:.3f}"
        )


def pack(lengths: Sequence[int], budget: int, *, seed: int = 0, shuffle_rows: bool = True) -> Packing:
    """Pack samples of ``lengths`` tokens into rows of at most ``budget`` tokens (first-fit-decreasing).

    Raises ``ValueError`` naming the first sample longer than the budget (the dataset truncates or refuses
    those before packing) or a non-positive length.
    """
    if budget <= 0:
        raise ValueError(f"the packing budget must be a positive number of tokens, got {budget}")
    lengths = tuple(int(n) for n in lengths)
    for index, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"sample {index} has {n} tokens; every sample needs at least one")
        if n > budget:
            raise ValueError(f"sample {index} has {n} tokens, more than the packing budget of {budget}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle breaks ties

    rows: list[list[int]] = []
    free = _MaxTree(len(lengths))  # free room per row; rows not opened yet hold the whole budget
    for i in order:
        r = free.leftmost_at_least(lengths[i], budget)
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        free.take(r, lengths[i], budget)
    if shuffle_rows:
        rng.shuffle(rows)
    return Packing(rows=tuple(tuple(r) for r in rows), lengths=lengths, budget=budget)


class _MaxTree:
    """Free room of ``n`` rows in a segment tree of maxima: the leftmost row with room >= k in O(log n).

    Rows not yet opened are stored as 0 and read as ``budget`` through ``opened``; first fit only ever opens
    the next row, so the unopened ones are exactly the rows ``>= opened``.
    """

    def __init__(self, n: int) -> None:
        self.size = 1
        while self.size < max(n, 1):
            self.size *= 2
        self.tree = [0] * (2 * self.size)
        self.opened = 0

    def leftmost_at_least(self, k: int, budget: int) -> int:
        if self.tree[1] < k:
            return self.opened  # no open row has room: open the next one
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= k else 2 * node + 1
        return node - self.size

    def take(self, row: int, n: int, budget: int) -> None:
        if row == self.opened:
            self.opened += 1
            room = budget - n
        else:
            room = self.tree[self.size + row] - n
        node = self.size + row
        self.tree[node] = room
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2

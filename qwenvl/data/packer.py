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

For data-parallel training (``pack_shards``) every rank packs rows from its own shard of the samples, and
step ``s`` trains rank ``r`` on row ``steps[s][r]``::

    2 ranks, budget 16     lengths a=9 b=8 c=7 d=6 e=5 f=4 g=3
    shards (tokens)        rank 0: a d e   20        rank 1: b c f g   22     (longest first, to the
                                                                               rank with fewest tokens)
    rows (FFD per shard)   rank 0: [a d] [e]         rank 1: [b c] [f g]
    steps (largest first)  step 0: [a d] | [b c]     15 | 15
                           step 1: [e]   | [f g]      5 |  7
    imbalance              22 / 21 - 1 = 4.8%        (most tokens on a rank over the mean)
    per-step wait          (15 + 7) / (15 + 6) - 1 = 4.8%   (sum of step maxima over sum of step means)

Every rank gets the same number of rows (a rank short of rows splits its fullest multi-sample rows; only
when none is left is a row repeated, and counted), so no rank waits at the end of an epoch for a step the
others never take. Each rank's k-th largest row is paired with the others' k-th largest: per step, the
ranks' token counts are as close as the rows allow.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Packing", "ShardedPacking", "pack", "pack_shards", "shard_by_tokens"]


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


def pack(
    lengths: Sequence[int],
    budget: int,
    *,
    seed: int = 0,
    shuffle_rows: bool = True,
    groups: Sequence[int] | None = None,
) -> Packing:
    """Pack samples of ``lengths`` tokens into rows of at most ``budget`` tokens (first-fit-decreasing).

    ``groups`` (a label per sample, optional): samples of different groups never share a row (GLM-4V cannot take
    images and videos in one forward: ``SupervisedDataset.media_groups``). Each group is packed on its own, and
    the rows are shuffled together.

    Raises ``ValueError`` naming the first sample longer than the budget (the dataset truncates or refuses
    those before packing) or a non-positive length.
    """
    lengths = _checked(lengths, budget)
    if groups is not None:
        return _pack_groups(lengths, budget, groups, seed=seed, shuffle_rows=shuffle_rows)
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


def _pack_groups(lengths, budget, groups, *, seed, shuffle_rows) -> Packing:
    if len(groups) != len(lengths):
        raise ValueError(f"give one group per sample: {len(groups)} groups for {len(lengths)} samples")
    rows: list[tuple[int, ...]] = []
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        local = pack([lengths[i] for i in members], budget, seed=seed, shuffle_rows=False)
        rows += [tuple(members[j] for j in row) for row in local.rows]
    if shuffle_rows:
        random.Random(seed).shuffle(rows)
    return Packing(rows=tuple(rows), lengths=lengths, budget=budget)


def _checked(lengths: Sequence[int], budget: int) -> tuple[int, ...]:
    if budget <= 0:
        raise ValueError(f"the packing budget must be a positive number of tokens, got {budget}")
    lengths = tuple(int(n) for n in lengths)
    for index, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"sample {index} has {n} tokens; every sample needs at least one")
        if n > budget:
            raise ValueError(f"sample {index} has {n} tokens, more than the packing budget of {budget}")
    return lengths


@dataclass(frozen=True)
class ShardedPacking:
    """Rows for ``shards`` data-parallel ranks: at step ``s`` rank ``r`` trains on ``steps[s][r]`` (sample indices).

    ``rows`` lists them step-major (``rows[s * shards + r]``), the order ``qwenvl.data.StepSampler`` hands
    them out in, so that a launcher dealing batches round-robin gives rank ``r`` exactly its own rows.
    """

    steps: tuple[tuple[tuple[int, ...], ...], ...]
    lengths: tuple[int, ...]
    budget: int
    shards: int
    repeated: int = 0  # rows repeated because a rank had too few samples to make as many rows as the others

    @property
    def rows(self) -> tuple[tuple[int, ...], ...]:
        return tuple(row for step in self.steps for row in step)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def fill_ratio(self) -> float:
        """Tokens in the rows (repeats included) over what the rows could hold."""
        rows = self.rows
        return sum(self._row_tokens(r) for r in rows) / (len(rows) * self.budget) if rows else 1.0

    def _row_tokens(self, row: tuple[int, ...]) -> int:
        return sum(self.lengths[i] for i in row)

    def row_tokens(self, row: int) -> int:
        return self._row_tokens(self.rows[row])

    def rank_tokens(self) -> list[int]:
        """Tokens each rank trains on in one epoch."""
        return [sum(self._row_tokens(step[r]) for step in self.steps) for r in range(self.shards)]

    @property
    def imbalance(self) -> float:
        """Most tokens on one rank over the mean, minus 1 (0.0: every rank trains on as many tokens)."""
        per_rank = self.rank_tokens()
        mean = sum(per_rank) / len(per_rank)
        return max(per_rank) / mean - 1 if mean else 0.0

    @property
    def step_wait(self) -> float:
        """The share of compute lost waiting if a step takes time in proportion to its largest row:
        sum over steps of the most tokens on a rank, over the sum of the mean, minus 1."""
        most = sum(max(self._row_tokens(row) for row in step) for step in self.steps)
        mean = sum(sum(self._row_tokens(row) for row in step) / self.shards for step in self.steps)
        return most / mean - 1 if mean else 0.0

    def report(self) -> dict:
        return {
            "shards": self.shards,
            "steps": len(self.steps),
            "rank_tokens": self.rank_tokens(),
            "imbalance": self.imbalance,
            "step_wait": self.step_wait,
            "repeated_rows": self.repeated,
            "fill_ratio": self.fill_ratio,
        }

    def summary(self) -> str:
        text = (
            f"{len(self.lengths)} samples for {self.shards} ranks: {len(self.steps)} rows each of <= {self.budget} "
            f"tokens, fill ratio {self.fill_ratio:.3f}; tokens per rank {self.rank_tokens()} "
            f"(imbalance {100 * self.imbalance:.2f}%, per-step wait {100 * self.step_wait:.2f}%)"
        )
        if self.repeated:
            text += f"; {self.repeated} rows repeated to give every rank as many rows"
        return text


def shard_by_tokens(lengths: Sequence[int], shards: int, *, seed: int = 0) -> list[list[int]]:
    """Split sample indices into ``shards`` lists with token totals as equal as greedy allows.

    Longest first (ties in a seeded order), each to the shard with the fewest tokens so far (then the fewest
    samples, then the lowest index): the largest total exceeds the mean by less than the longest sample.
    """
    if shards <= 0:
        raise ValueError(f"shards must be a positive number, got {shards}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    heap = [(0, 0, r) for r in range(shards)]
    out: list[list[int]] = [[] for _ in range(shards)]
    for i in order:
        tokens, count, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (tokens + int(lengths[i]), count + 1, r))
    return out


def _split(row: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Two non-empty rows from one of >= 2 samples, their token counts as even as greedy makes them."""
    parts: tuple[list[int], list[int]] = ([], [])
    sums = [0, 0]
    for i in sorted(row, key=lambda i: -lengths[i]):
        side = 0 if sums[0] <= sums[1] else 1
        parts[side].append(i)
        sums[side] += lengths[i]
    return parts


def pack_shards(
    lengths: Sequence[int], budget: int, shards: int, *, seed: int = 0, groups: Sequence[int] | None = None
) -> ShardedPacking:
    """Pack for ``shards`` data-parallel ranks: shard the samples by tokens (``shard_by_tokens``), pack each
    shard first-fit-decreasing (``pack``), give every rank the same number of rows, pair rows into steps
    largest with largest, and shuffle the steps (seeded). Deterministic in ``seed``: every rank computes the
    same plan from the same lengths, with no communication. ``shards=1`` gives ``pack``'s rows, one per step.
    ``groups`` as in ``pack`` (a row split to even the ranks out stays in its group).
    """
    lengths = _checked(lengths, budget)
    if shards <= 0:
        raise ValueError(f"shards must be a positive number, got {shards}")
    per_rank: list[list[list[int]]] = []
    for r, shard in enumerate(shard_by_tokens(lengths, shards, seed=seed)):
        local_groups = None if groups is None else [groups[i] for i in shard]
        local = (
            pack([lengths[i] for i in shard], budget, seed=seed + r, shuffle_rows=False, groups=local_groups)
            if shard
            else None
        )
        per_rank.append([[shard[j] for j in row] for row in local.rows] if local else [])

    want = max(len(rows) for rows in per_rank)
    repeated = 0
    for rows in per_rank:
        while len(rows) < want:
            splittable = [k for k, row in enumerate(rows) if len(row) > 1]
            if splittable:
                k = max(splittable, key=lambda k: (sum(lengths[i] for i in rows[k]), -k))
                first, second = _split(rows[k], lengths)
                rows[k] = first
                rows.append(second)
            else:
                if not rows:
                    raise ValueError(f"{len(lengths)} samples are too few to give each of {shards} ranks a row")
                rows.append(list(rows[repeated % len(rows)]))
                repeated += 1

    rng = random.Random(seed)
    ordered = []
    for rows in per_rank:
        keys = list(range(len(rows)))
        rng.shuffle(keys)
        # Largest first; the seeded keys break ties so equal rows do not keep packing order.
        by_size = sorted(zip(keys, rows), key=lambda kr: (-sum(lengths[i] for i in kr[1]), kr[0]))
        ordered.append([row for _, row in by_size])
    steps = [tuple(tuple(ordered[r][s]) for r in range(shards)) for s in range(want)]
    rng.shuffle(steps)
    return ShardedPacking(steps=tuple(steps), lengths=lengths, budget=budget, shards=shards, repeated=repeated)


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

"""From data files to packed batches: read and check rows (``SupervisedDataset``), choose which samples share
a row (``pack``), and build the batches (``PackedCollator``, or ``PaddedCollator`` for the ordinary form).

    dataset = SupervisedDataset("train.json", processor, model=model, model_max_length=4096)
    rows = PackedDataset(dataset, budget=8192, seed=0)          # rows.packing.fill_ratio
    trainer = QwenVLTrainer(..., train_dataset=rows, data_collator=PackedCollator())

    rows = StreamingDataset("shards/", processor, model=model, budget=8192)   # shards read as a stream, packed
                                                                            # online; train with max_steps

    rows = PackedDataset(dataset, budget=8192, seed=0, shards=world_size)   # data-parallel: rows per rank,
                                                                            # rows.packing.summary() (imbalance)

This package produces what ``qwenvl.packing`` describes and ``qwenvl.patches`` consumes; it never patches.
"""

from __future__ import annotations

import torch

from qwenvl._checkout import CheckoutPath, checkout_attribute

# Ours first, then an upstream checkout's `qwenvl/data/` (its data_processor, rope2d): qwenvl._checkout.
__path__ = CheckoutPath(__path__, __name__)

from qwenvl.data.collators import CONVENTIONS, PackedCollator, PaddedCollator, to_device
from qwenvl.data.dataset import BadSampleError, DataFileError, RowRef, SupervisedDataset, check_rows, read_rows
from qwenvl.data.packer import Packing, ShardedPacking, pack, pack_shards, shard_by_tokens
from qwenvl.data.stream import OnlinePacker
from qwenvl.data.streaming import StreamingDataset

__all__ = [
    "SupervisedDataset",
    "BadSampleError",
    "DataFileError",
    "RowRef",
    "read_rows",
    "check_rows",
    "pack",
    "pack_shards",
    "shard_by_tokens",
    "Packing",
    "OnlinePacker",
    "StreamingDataset",
    "ShardedPacking",
    "PackedDataset",
    "to_device",
    "StepSampler",
    "PackedCollator",
    "PaddedCollator",
    "CONVENTIONS",
]


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of a dataset with ``lengths``: item ``r`` is the list of samples of row ``r``.

    The packing is fixed when built (first-fit-decreasing, seeded; see ``qwenvl.data.packer``); the
    Trainer's sampler shuffles the rows each epoch. Use ``per_device_train_batch_size=1`` with
    ``PackedCollator``: a batch is one packed row.

    ``shards > 1`` packs for that many data-parallel ranks (``pack_shards``): each rank's rows come from its
    own shard of the samples, balanced by tokens, and item ``s * shards + r`` is rank ``r``'s row of step
    ``s``. ``step_sampler`` then keeps each step's rows together (``QwenVLTrainer`` uses it), so a launcher
    dealing batches round-robin (accelerate's ``BatchSamplerShard``) gives rank ``r`` its own rows. One process
    with ``shards=N`` and ``N`` times the gradient accumulation sees the same rows in every optimizer step as
    ``N`` ranks do.
    """

    def __init__(self, dataset, budget: int, *, seed: int = 0, shards: int = 1) -> None:
        self.dataset = dataset
        self.shards = int(shards)
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.packing: Packing | ShardedPacking
        # GLM-4V: samples with a video never share a row with samples with an image (None: any may).
        groups = getattr(dataset, "media_groups", None)
        if self.shards == 1:
            self.packing = pack(dataset.lengths, budget, seed=seed, groups=groups)
        else:
            self.packing = pack_shards(dataset.lengths, budget, self.shards, seed=seed, groups=groups)
        self._rows = self.packing.rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, row: int) -> list[dict]:
        return [self.dataset[i] for i in self._rows[row]]

    def step_sampler(self, seed: int = 0) -> "StepSampler":
        """The sampler that keeps each step's ``shards`` rows together (a new step order every epoch)."""
        return StepSampler(len(self._rows) // self.shards, self.shards, seed=seed)


class StepSampler(torch.utils.data.Sampler):
    """Steps in a seeded random order, each step's ``shards`` indices together and in rank order::

        steps 3, shards 2, epoch order [2, 0, 1]  ->  4 5 0 1 2 3

    The order depends only on ``seed`` and the epoch (``set_epoch``, which the Trainer calls), so a resumed run
    skipping into an epoch sees the same order as the run it continues.
    """

    def __init__(self, steps: int, shards: int, *, seed: int = 0) -> None:
        self.steps, self.shards, self.seed, self.epoch = int(steps), int(shards), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps * self.shards

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for step in torch.randperm(self.steps, generator=generator).tolist():
            yield from range(step * self.shards, (step + 1) * self.shards)


def __getattr__(name):
    # Upstream's `qwenvl/data/__init__.py` holds its dataset registry (data_list, data_dict), which its
    # data_processor imports with `from . import data_list`: names we lack come from a checkout's.
    return checkout_attribute(__name__, __path__, name)

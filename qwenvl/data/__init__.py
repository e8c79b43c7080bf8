"""From data files to packed batches: read and check rows (``SupervisedDataset``), choose which samples share
a row (``pack``), and build the batches (``PackedCollator``, or ``PaddedCollator`` for the ordinary form).

    dataset = SupervisedDataset("train.json", processor, model=model, model_max_length=4096)
    rows = PackedDataset(dataset, budget=8192, seed=0)          # rows.packing.fill_ratio
    trainer = QwenVLTrainer(..., train_dataset=rows, data_collator=PackedCollator())

This package produces what ``qwenvl.packing`` describes and ``qwenvl.patches`` consumes; it never patches.
"""

from __future__ import annotations

import torch

from qwenvl.data.collators import CONVENTIONS, PackedCollator, PaddedCollator
from qwenvl.data.dataset import BadSampleError, DataFileError, RowRef, SupervisedDataset, read_rows
from qwenvl.data.packer import Packing, pack

__all__ = [
    "SupervisedDataset",
    "BadSampleError",
    "DataFileError",
    "RowRef",
    "read_rows",
    "pack",
    "Packing",
    "PackedDataset",
    "PackedCollator",
    "PaddedCollator",
    "CONVENTIONS",
]


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of a dataset with ``lengths``: item ``r`` is the list of samples of row ``r``.

    The packing is fixed when built (first-fit-decreasing, seeded; see ``qwenvl.data.packer``); the
    Trainer's sampler shuffles the rows each epoch. Use ``per_device_train_batch_size=1`` with
    ``PackedCollator``: a batch is one packed row.
    """

    def __init__(self, dataset, budget: int, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.packing = pack(dataset.lengths, budget, seed=seed)

    def __len__(self) -> int:
        return len(self.packing.rows)

    def __getitem__(self, row: int) -> list[dict]:
        return [self.dataset[i] for i in self.packing.rows[row]]

"""The data position of a training run, in samples, and the global-batch sampler that resumes from it.

Epoch e visits the dataset in the order `torch.randperm(n)` drawn from a generator seeded with
`seed + e` (Accelerate's seedable sampler: the same order on every process and for every world
size). A trainer step's micro-batch is the next `global_batch` samples of that order (processes x
per-process batch); process r of W takes its r-th slice of them, as Accelerate's batch sharding does.
An epoch ends when fewer than `global_batch` samples are left (those are dropped, as `drop_last`).

The position is kept as (epoch, samples of its order consumed, samples consumed in all), not as
per-process batches, so a run saved with N processes and resumed with M continues at the same
sample: with the same global batch the batches are the same; with another global batch the epoch's
remaining samples are taken in batches of the new size, none skipped or repeated (but the tail an
epoch drops may change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from genkit.errors import DataError


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: `offset` samples of epoch `epoch`'s order consumed, `samples` in all."""

    epoch: int = 0
    offset: int = 0
    samples: int = 0

    def batch_start(self, global_batch: int, n: int) -> tuple[int, int]:
        """(epoch, offset) of the next global batch: this epoch's, or the next one's start when too few are left."""
        if global_batch > n:
            raise DataError(f"data: {n} images, fewer than one global batch of {global_batch}: lower data.batch_size")
        if self.offset + global_batch > n:
            return self.epoch + 1, 0
        return self.epoch, self.offset

    def advance(self, global_batch: int, n: int) -> DataPosition:
        """The position after one global batch of `global_batch` samples."""
        epoch, offset = self.batch_start(global_batch, n)
        return DataPosition(epoch, offset + global_batch, self.samples + global_batch)

    def state(self) -> dict[str, int]:
        """As stored in a checkpoint's state.json."""
        return asdict(self)

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> DataPosition:
        """From a checkpoint's state.json `data` entry."""
        return cls(int(data["epoch"]), int(data["offset"]), int(data["samples"]))

    @classmethod
    def from_batches(cls, batches: int, global_batch: int, n: int) -> DataPosition:
        """The position after `batches` global batches of one size from the start (checkpoints before
        positions in samples stored per-process micro-batches: equal to global ones)."""
        per_epoch = n // global_batch
        epoch, k = divmod(batches, per_epoch)
        return cls(epoch, k * global_batch, batches * global_batch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The dataset order of `epoch`: randperm(n) seeded with seed + epoch (as Accelerate's seedable sampler)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class GlobalBatchSampler(Sampler[list[int]]):
    """Endless per-process batches from `start` on: process `rank` of `world` takes its slice of each global batch."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: DataPosition):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.global_batch = batch_size * world
        self.start = start
        start.batch_start(self.global_batch, n)  # refuse a global batch larger than the data now

    def __iter__(self) -> Iterator[list[int]]:
        position, order, order_epoch = self.start, [], -1
        lo = self.rank * self.batch_size
        while True:
            epoch, offset = position.batch_start(self.global_batch, self.n)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            yield order[offset + lo:offset + lo + self.batch_size]
            position = position.advance(self.global_batch, self.n)

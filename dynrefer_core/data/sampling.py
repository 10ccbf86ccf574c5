"""The training data order: a seeded permutation per epoch, split over the processes, resumable mid-epoch."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .dataset import RegionBatch, RegionDataset, collate_regions


class EpochSampler(Sampler[int]):
    """Seeded permutation per epoch, split over ranks, able to skip the regions a resumed run already saw."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world  # drop the tail so every rank takes the same number of steps
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return self.n // self.world - self.skip


def endless_batches(ds: RegionDataset, sampler: EpochSampler, batch_size: int, num_workers: int, seed: int,
                    epoch: int = 0, skip: int = 0) -> Iterator[tuple[int, int, RegionBatch]]:
    """(epoch, index of the batch in its epoch, batch), epoch after epoch from `epoch` on, without end; the
    first `skip` batches of `epoch` (those a resumed run already trained on) are left out.

    Views and order are seeded by (seed, epoch) and the loader draws from its own generator, so an epoch
    gives the same batches whenever it is read, and the global RNG is left alone. Batches are full
    (`drop_last`); the caller decides when to stop.
    """
    while True:
        sampler.set_epoch(epoch, skip=skip * batch_size)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_regions, drop_last=True,
                            num_workers=num_workers, persistent_workers=False,
                            generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        for index, batch in enumerate(loader, start=skip):
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0

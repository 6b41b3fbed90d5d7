"""The order of batches in each epoch: a permutation fixed by (seed, epoch).

Because the order depends on nothing else (not on how many batches were drawn before, nor on the
global RNG), a resumed run replays exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, num_batches: int, seed: int):
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoader wrapper before each pass (``dataloader.set_epoch``)."""
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next pass only (resuming mid-epoch).

        Skipping here, rather than drawing and discarding batches, means skipped images are never
        loaded or decoded.
        """
        self._skip = count

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_batches, generator=generator).tolist()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.num_batches


def make_dataloader(dataset, *, seed: int, num_workers: int, persistent_workers: bool, collate_fn) -> DataLoader:
    """One item per batch (the dataset yields whole bucketed batches, hence ``batch_size=1``).

    The DataLoader gets its own generator so creating an iterator never draws from the global RNG,
    which training noise uses.
    """
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=EpochShuffleSampler(len(dataset), seed),
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )

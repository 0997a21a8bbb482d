"""A batch sampler whose position is a pure function of the global batch index.

Epoch e visits the blocks in the order ``randperm(n, seed=(seed, e))``; global batch g is the
(g mod batches_per_epoch)-th slice of epoch (g div batches_per_epoch). With several ranks,
rank r trains on global batches r, r + W, r + 2W, ... so no two ranks see the same block in
an epoch. Starting at the batch a checkpoint stopped at replays exactly the batches an
uninterrupted run would have seen next: the data-loader position needs no state of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


class ResumableBatchSampler:
    def __init__(self, num_blocks: int, batch_size: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_blocks < batch_size:
            raise ValueError(f"{num_blocks} blocks cannot fill one batch of {batch_size}")
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.batches_per_epoch = num_blocks // batch_size  # the last partial batch is dropped
        self._cached: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_blocks, generator=gen))
        return self._cached[1]

    def global_batch(self, index: int) -> list[int]:
        epoch, within = divmod(index, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        return order[within * self.batch_size : (within + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Endless: the length of training is trainer.max_steps, not a number of epochs.
        for local in itertools.count(self.start_batch):
            yield self.global_batch(local * self.world_size + self.rank)

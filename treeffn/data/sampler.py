"""Batch samplers whose batches are a pure function of where training or validation stands.

Training (``ResumableBatchSampler``). The unit is the *global batch* of one optimizer step:
G = batch_size x accumulate x world_size blocks. Epoch e visits the blocks in the order
``randperm(n, seed=(seed, e))``, cut into n // G global batches (the tail that cannot fill one
is dropped). Optimizer step s trains on global batch s; within it, micro-batch m of rank r is
the slice number m * world_size + r, of batch_size blocks. So:

* no two ranks, and no two micro-batches, see the same block in an epoch;
* global batch s holds the same blocks whatever the split into ranks and micro-batches:
  2 ranks x batch b, 1 rank x batch 2b, and 1 rank x batch b x 2 accumulation steps train on
  identical data, which is what makes their loss curves equal;
* the position is ``trainer.global_step`` alone: resuming a checkpoint, on the same or on
  another device count, replays exactly the global batches an uninterrupted run would have
  seen next. The data-loader position needs no state of its own.

Validation (``ShardedEvalBatches``): the first V blocks of the split (V from the batch limit),
cut into world_size x k contiguous chunks of near-equal size, k the same on every rank (FSDP
needs every rank to run the same number of forward passes). Chunk c goes to rank c mod
world_size. Every block is evaluated exactly once; there is no padding and no duplicate, so a
token-weighted mean over all ranks is the exact loss of those V blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch


class ResumableBatchSampler:
    def __init__(self, num_blocks: int, batch_size: int, seed: int, start_step: int = 0,
                 accumulate: int = 1, rank: int = 0, world_size: int = 1):
        self.global_blocks = batch_size * accumulate * world_size
        if num_blocks < self.global_blocks:
            raise ValueError(f"{num_blocks} blocks cannot fill one global batch of {self.global_blocks}")
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.start_step, self.accumulate = start_step, accumulate
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_blocks // self.global_blocks
        self._cached: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_blocks, generator=gen))
        return self._cached[1]

    def step_blocks(self, step: int) -> torch.Tensor:
        """The blocks of optimizer step ``step`` on all ranks together (the global batch)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[within * self.global_blocks : (within + 1) * self.global_blocks]

    def micro_batch(self, step: int, micro: int) -> list[int]:
        """This rank's blocks for micro-batch ``micro`` of optimizer step ``step``."""
        piece = micro * self.world_size + self.rank
        return self.step_blocks(step)[piece * self.batch_size : (piece + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Endless: the length of training is trainer.max_steps, not a number of epochs.
        for step in itertools.count(self.start_step):
            for micro in range(self.accumulate):
                yield self.micro_batch(step, micro)


def limited_blocks(num_blocks: int, batch_size: int, limit: int | float | None) -> int:
    """How many validation blocks ``trainer.limit_val_batches=limit`` keeps: an int counts
    batches of ``batch_size``, a float is a fraction of those batches (rounded down), as for
    a single device in Lightning. The count does not depend on the number of devices, so the
    validation set of a config is the same on 1 or 16 GPUs (and the same one treeffn eval
    re-measures: treeffn.evaluation.perplexity.validation_blocks)."""
    if limit is None:
        return num_blocks
    batches = math.ceil(num_blocks / batch_size)
    kept = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    return min(num_blocks, kept * batch_size)


class ShardedEvalBatches:
    def __init__(self, num_blocks: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_blocks, self.rank, self.world_size = num_blocks, rank, world_size
        per_rank = math.ceil(num_blocks / (batch_size * world_size)) if num_blocks else 0
        self.chunks = per_rank * world_size
        # Fewer blocks than chunks would leave a rank with an empty batch: then every rank
        # evaluates all blocks (duplicated work, the same exact mean) instead.
        self.replicated = self.chunks > num_blocks
        if self.replicated:
            self.chunks, self.world_size, self.rank = math.ceil(num_blocks / batch_size) if num_blocks else 0, 1, 0

    def chunk(self, c: int) -> list[int]:
        # Near-equal contiguous chunks: the first (V mod C) hold one block more.
        base, extra = divmod(self.num_blocks, self.chunks)
        start = c * base + min(c, extra)
        return list(range(start, start + base + (c < extra)))

    def __iter__(self) -> Iterator[list[int]]:
        for c in range(self.rank, self.chunks, self.world_size):
            yield self.chunk(c)

    def __len__(self) -> int:
        return len(range(self.rank, self.chunks, self.world_size))

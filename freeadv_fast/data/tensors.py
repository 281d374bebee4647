"""Batches of an in-memory dataset, shuffled per pass, sharded by rank.

Each global batch is cut into one contiguous piece per rank, so N processes
see, together, exactly the batches one process would: what makes a
distributed run comparable to a single-process one.
"""
from __future__ import annotations

import torch


class TensorBatches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the {world_size} process(es)")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self):
        if not self.shuffle:
            return torch.arange(len(self.x))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.x), generator=g)

    def skip(self, start: int):
        order = self._order().to(self.x.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = torch.tensor_split(idx, self.world_size)[self.rank]
            yield self.x[idx], self.y[idx]

    def __iter__(self):
        return self.skip(0)

"""Batches of a dataset held in memory (or on the GPU), shuffled per pass,
sharded by rank, optionally augmented on the device.

Each global batch is cut into one contiguous piece per rank, so N processes
see, together, exactly the batches one process would: ranks get disjoint
samples covering the pass, and a distributed run is comparable to a
single-process one. The order and the augmentation of pass e depend only on
(seed, e, rank), so a resumed run sees the same batches.
"""
from __future__ import annotations

import torch

from ..common import stream_seed
from .errors import DataError


class TensorBatches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, augment=None,
                 every_rank_steps: bool = True):
        """``every_rank_steps``: each batch gives every rank an image (a rank
        with none would skip the step while the others wait in its gradient
        all-reduce forever), so a last batch smaller than the ranks is left
        out; False (held-out batches, no collective per batch) keeps it and
        gives some ranks an empty shard."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank {rank!r} of "
                             f"world_size {world_size!r}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the {world_size} process(es)")
        if len(x) < batch_size and drop_last:
            raise DataError(f"the training split has {len(x)} images, fewer than one batch of {batch_size}: "
                            "lower --batch-size (or train on more images)")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.augment = rank, world_size, augment
        self.every_rank_steps = every_rank_steps
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        full, rest = divmod(len(self.x), self.batch_size)
        if self.drop_last or (self.every_rank_steps and rest < self.world_size):
            return full
        return full + (rest > 0)

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def _order(self):
        if not self.shuffle:
            return torch.arange(len(self.x))
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
        return torch.randperm(len(self.x), generator=g)

    def skip(self, start: int):
        """The pass's batches from batch ``start`` on (for resuming mid-pass)."""
        order = self._order().to(self.x.device)
        gen = None
        if self.augment is not None:
            gen = self.augment.generator(self.x.device, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                         skipped=start, batch_size=self.batch_size // self.world_size)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = torch.tensor_split(idx, self.world_size)[self.rank]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                xb = self.augment(xb, gen)
            yield xb, yb

    def __iter__(self):
        return self.skip(0)

    def rebatched(self, batch_size: int) -> "TensorBatches":
        """The same images in batches of ``batch_size`` (an attack's batches need
        not be the training's: bigger ones run faster on a CPU)."""
        return TensorBatches(self.x, self.y, batch_size, shuffle=self.shuffle, seed=self.seed,
                             drop_last=self.drop_last, rank=self.rank, world_size=self.world_size,
                             augment=self.augment, every_rank_steps=self.every_rank_steps)


class RandomCropFlip:
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, for a
    whole uint8 batch at once on its device: zero padding, one offset and one
    coin per image, no host work."""

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding, self.flip = padding, flip

    def _draw(self, gen, n, device):
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=gen, device=device)
        flips = torch.rand(n, generator=gen, device=device) < 0.5
        return offsets, flips

    def skip(self, gen, n):
        self._draw(gen, n, gen.device)

    def generator(self, device, *, seed: int, epoch: int, rank: int, skipped: int = 0, batch_size: int = 0):
        """The random stream of one rank's pass, fixed by (seed, epoch, rank),
        past the draws of ``skipped`` batches of ``batch_size`` (resuming
        mid-pass augments batch ``skipped`` as the uninterrupted pass did)."""
        gen = torch.Generator(device).manual_seed(stream_seed(seed, epoch, rank))
        for _ in range(skipped):
            self.skip(gen, batch_size)
        return gen

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.padding
        (dy, dx), flips = self._draw(gen, n, x.device)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * p)
        out = padded.gather(2, rows)
        cols = torch.arange(w, device=x.device).expand(n, w)
        if self.flip:
            cols = torch.where(flips[:, None], w - 1 - cols, cols)
        cols = (dx[:, None] + cols)[:, None, None, :].expand(n, c, h, w)
        return out.gather(3, cols)

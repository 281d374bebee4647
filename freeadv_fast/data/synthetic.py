"""Random uint8 batches made on the device: no I/O, for benchmarks and smoke runs."""
from __future__ import annotations

import torch

from ..common import stream_seed
from .imagenet import IMAGE_SIZE, MEAN, STD  # ImageNet's shape and statistics: a stand-in for it
from .registry import DatasetSpec, register_dataset


class SyntheticBatches:
    def __init__(self, batch_size: int, *, image_size: int = 224, channels: int = 3, classes: int = 1000,
                 batches_per_epoch: int = 100, device="cpu", seed: int = 0, channels_last: bool = True,
                 world_size: int = 1):
        if batch_size < 1 or image_size < 1 or classes < 1 or batches_per_epoch < 1:
            raise ValueError("synthetic data needs positive batch size, image size, classes and batches")
        self.batch_size, self.image_size, self.channels, self.classes = batch_size, image_size, channels, classes
        self.batches_per_epoch, self.device, self.seed = batches_per_epoch, torch.device(device), seed
        self.channels_last, self.world_size = channels_last, world_size
        self.epoch = 0

    # the images of a pass over every process, as the other loaders count them (batch_size is this process's)
    num_samples = property(lambda self: self.batch_size * self.world_size * self.batches_per_epoch)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.batches_per_epoch

    def skip(self, start):
        gen = torch.Generator(self.device).manual_seed(stream_seed(self.seed, self.epoch))
        shape = (self.batch_size, self.image_size, self.image_size, self.channels)
        for b in range(self.batches_per_epoch):
            x = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device, generator=gen)
            y = torch.randint(0, self.classes, (self.batch_size,), device=self.device, generator=gen)
            if b >= start:  # NHWC storage seen as NCHW: what DALI delivers
                x = x.permute(0, 3, 1, 2)
                yield (x if self.channels_last else x.contiguous()), y

    def __iter__(self):
        return self.skip(0)


def build(cfg, rank, world_size, device):
    size = cfg.image_size or IMAGE_SIZE
    common = dict(image_size=size, classes=cfg.synthetic_classes, device=device, seed=cfg.seed + rank,
                  world_size=world_size)
    per_rank = cfg.batch_size // world_size
    return (SyntheticBatches(per_rank, batches_per_epoch=cfg.synthetic_batches, **common),
            SyntheticBatches(per_rank, batches_per_epoch=2, **common), cfg.synthetic_classes, size)


register_dataset(DatasetSpec("synthetic", "synthetic (random pixels)", build, MEAN, STD, IMAGE_SIZE, "resnet50",
                             resizable=True, reads_data=False))

"""A run's data by name: ``build_data(cfg, rank, world_size, device)`` asks
the dataset's spec (freeadv_fast/data/registry.py) for its loaders. The
building blocks the specs share live here: a dataset held whole on the
device, an image-folder pair of splits, the held-out order and the subset."""
from __future__ import annotations

import torch

from .. import distributed
from ..messages import say_once
from .errors import DataError
from .folder import ImageFolderLoader
from .registry import DATASETS, Data
from .tensors import TensorBatches


def build_data(cfg, rank=0, world_size=1, device="cpu") -> Data:
    if cfg.batch_size % world_size:
        raise DataError(f"batch size {cfg.batch_size} is not divisible by the {world_size} processes")
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    spec = DATASETS[cfg.dataset]
    spec.check(cfg, layout=False)  # the loaders check the layout as they read it
    train, val, num_classes, image_size = spec.build(cfg, rank, world_size, device)
    return Data(train, val, num_classes, spec.channels, spec.mean, spec.std, image_size)


def in_memory(cfg, train, val, *, rank, world_size, device, augment=None, drop_last=False):
    """(train, val) batches of a dataset uploaded whole, once: ``train`` and
    ``val`` are (uint8 images, labels); batches are cut (and augmented) on the
    device. ``--train-subset N`` is taken here; a split its loader already cut
    to those N images (CIFAR's does, to decode no more) is kept whole, since
    N of N images are all of them."""
    (x, y), (xt, yt) = train, val
    keep = subset_indices(len(y), cfg.train_subset, cfg.seed)
    order = held_out_order(len(yt))
    x, y, xt, yt = (t.to(device) for t in (x[keep], y[keep], xt[order], yt[order]))
    return (TensorBatches(x, y, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                          drop_last=drop_last, augment=augment),
            TensorBatches(xt, yt, cfg.batch_size, shuffle=False, rank=rank, world_size=world_size,
                          every_rank_steps=False))


_SCANS: dict = {}  # the last scan of an image-folder pair: a run's phases share it (run.py forgets it first)


def forget_scans():
    _SCANS.clear()


def image_folders(cfg, scan, *, train_dir, val_dir, image_size, rank, world_size, device, **augment):
    """(train, val, classes) loaders of an image-folder dataset. ``scan()``
    gives ((classes, train samples), val samples); it reads a few bytes of
    every file, so it runs once, on rank 0, not on every rank."""
    key = (str(train_dir), str(val_dir))
    if key not in _SCANS:  # scanned once a process: every phase of a run rebuilds its loaders from it
        _SCANS.clear()
        _SCANS[key] = distributed.from_rank0(scan)
    (classes, samples), val_samples = _SCANS[key]
    val_samples = [val_samples[i] for i in held_out_order(len(val_samples)).tolist()]
    samples = [samples[i] for i in subset_indices(len(samples), cfg.train_subset, cfg.seed).tolist()]
    common = dict(batch_size=cfg.batch_size // world_size, device=device, image_size=image_size, rank=rank,
                  world_size=world_size, seed=cfg.seed, loader=cfg.loader, workers=cfg.workers, classes=classes,
                  source_size=cfg.source_size, decode_processes=cfg.decode_processes, **augment)
    return (ImageFolderLoader(train_dir, train=True, samples=samples, **common),
            ImageFolderLoader(val_dir, train=False, samples=val_samples, **common), classes)


def held_out_order(n: int) -> torch.Tensor:
    """The fixed order (the same in every run) in which held-out splits are
    read. Image-folder splits are sorted by class, so their first N images --
    what an evaluation limited to N samples attacks -- would be a few classes
    only; in this order any prefix is a uniform random sample."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` of ``total`` training samples, drawn without
    replacement, fixed by ``seed``, in their original order (0 or n >= total:
    all of them)."""
    if n > total:
        say_once(f"--train-subset {n} is more than the {total} images of the training split: training on all "
                 f"{total}")
    if not n or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def take(batches, limit: int):
    """Batches from ``batches`` until ``limit`` samples (0: all of them)."""
    seen = 0
    for x, y in batches:
        if limit and seen >= limit:
            return
        if limit and seen + len(y) > limit:
            x, y = x[:limit - seen], y[:limit - seen]
        seen += len(y)
        yield x, y


__all__ = ["build_data", "forget_scans", "held_out_order", "image_folders", "in_memory", "subset_indices", "take"]

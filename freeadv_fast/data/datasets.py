"""Datasets by name, as the loaders a run needs: ``build_data(cfg, dist)``."""
from __future__ import annotations

from dataclasses import dataclass


from .. import distributed
from . import cifar
from .digits import MEAN as DIGITS_MEAN
from .digits import STD as DIGITS_STD
from .digits import digits_split
from .errors import DataError
from .folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderLoader, find_split, scan_image_folder
from .synthetic import SyntheticBatches
from .tensors import TensorBatches


@dataclass
class Data:
    train: object  # per-rank batches of the training split
    val: object  # per-rank batches of the evaluation split, unaugmented, each image once over all ranks
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    image_size: int


def build_data(cfg, rank=0, world_size=1, device="cpu") -> Data:
    if cfg.batch_size % world_size:
        raise DataError(f"batch size {cfg.batch_size} is not divisible by the {world_size} processes")
    per_rank = cfg.batch_size // world_size
    name = cfg.dataset
    if name == "digits":
        (x, y), (xt, yt) = digits_split()
        x, y, xt, yt = (t.to(device) for t in (x, y, xt, yt))
        return Data(TensorBatches(x, y, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size),
                    TensorBatches(xt, yt, cfg.batch_size, shuffle=False, rank=rank, world_size=world_size),
                    10, 1, DIGITS_MEAN, DIGITS_STD, 8)
    if name in ("cifar10", "cifar100"):
        if cfg.data is None:
            raise DataError(f"{name} needs --data DIR (the folder holding {cifar.LAYOUTS[name][0]}/)")
        train = cifar.cifar_loader(cfg.data, name, train=True, batch_size=cfg.batch_size, device=device, rank=rank,
                                   world_size=world_size, seed=cfg.seed)
        val = cifar.cifar_loader(cfg.data, name, train=False, batch_size=cfg.batch_size, device=device, rank=rank,
                                 world_size=world_size)
        mean, std = cifar.MEAN_STD[name]
        return Data(train, val, 10 if name == "cifar10" else 100, 3, mean, std, 32)
    if name == "imagenet":
        if cfg.data is None:
            raise DataError("imagenet needs --data DIR (holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
        size = cfg.image_size or 224
        train_dir, val_dir = find_split(cfg.data, "train"), find_split(cfg.data, "val")

        def scan():  # reads a few bytes of every file: once, on rank 0, not on every rank
            train_scan, val_scan = scan_image_folder(train_dir), scan_image_folder(val_dir)
            if val_scan[0] != train_scan[0]:
                raise DataError(f"{val_dir}: its class folders differ from {train_dir}'s")
            return train_scan[:2], val_scan[1]
        (classes, samples), val_samples = distributed.from_rank0(scan)
        common = dict(batch_size=per_rank, device=device, image_size=size, val_resize=round(size * 256 / 224),
                      rank=rank, world_size=world_size, seed=cfg.seed, loader=cfg.loader, workers=cfg.workers)
        return Data(ImageFolderLoader(train_dir, train=True, samples=samples, classes=classes, **common),
                    ImageFolderLoader(val_dir, train=False, samples=val_samples, classes=classes, **common),
                    len(classes), 3, IMAGENET_MEAN, IMAGENET_STD, size)
    if name == "synthetic":
        size = cfg.image_size or 224
        common = dict(image_size=size, classes=cfg.synthetic_classes, device=device, seed=cfg.seed + rank)
        return Data(SyntheticBatches(per_rank, batches_per_epoch=cfg.synthetic_batches, **common),
                    SyntheticBatches(per_rank, batches_per_epoch=2, **common),
                    cfg.synthetic_classes, 3, IMAGENET_MEAN, IMAGENET_STD, size)
    raise DataError(f"unknown dataset {name!r}")


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


__all__ = ["Data", "build_data", "take"]

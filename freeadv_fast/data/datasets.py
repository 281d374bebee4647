"""Datasets by name, as the loaders a run needs: ``build_data(cfg, dist)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from . import cifar, fashion_mnist, tiny_imagenet
from .digits import MEAN as DIGITS_MEAN
from .digits import STD as DIGITS_STD
from .digits import digits_split
from .errors import DataError
from .folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderLoader, find_split, scan_image_folder
from .synthetic import SyntheticBatches
from .tensors import RandomCropFlip, TensorBatches


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

    def in_memory(x, y, xt, yt, augment=None, drop_last=False):
        """The whole dataset uploaded once; batches are cut (and augmented) on the device."""
        keep = subset_indices(len(y), cfg.train_subset, cfg.seed)
        x, y = x[keep], y[keep]
        order = held_out_order(len(yt))
        x, y, xt, yt = (t.to(device) for t in (x, y, xt[order], yt[order]))
        return (TensorBatches(x, y, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                              drop_last=drop_last, augment=augment),
                TensorBatches(xt, yt, cfg.batch_size, shuffle=False, rank=rank, world_size=world_size))

    if name == "digits":
        (x, y), (xt, yt) = digits_split()
        return Data(*in_memory(x, y, xt, yt), 10, 1, DIGITS_MEAN, DIGITS_STD, 8)
    if name == "fashion-mnist":
        train, val = in_memory(*fashion_mnist.load_fashion_mnist(cfg.data, train=True),
                               *fashion_mnist.load_fashion_mnist(cfg.data, train=False))
        return Data(train, val, 10, 1, fashion_mnist.MEAN, fashion_mnist.STD, fashion_mnist.IMAGE_SIZE)
    if name in ("cifar10", "cifar100"):
        if cfg.data is None:
            raise DataError(f"{name} needs --data DIR (the folder holding {cifar.LAYOUTS[name][0]}/, or "
                            "train/<class>/ and test/<class>/ image folders)")
        x, y, _ = cifar.load_cifar(cfg.data, name, train=True)
        xt, yt, _ = cifar.load_cifar(cfg.data, name, train=False)
        mean, std = cifar.MEAN_STD[name]
        train, val = in_memory(x, y, xt, yt, augment=RandomCropFlip(padding=4), drop_last=True)
        return Data(train, val, cifar.NUM_CLASSES[name], 3, mean, std, 32)
    if name in ("imagenet", "tiny-imagenet"):
        if cfg.data is None:
            raise DataError(f"{name} needs --data DIR (holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
        if name == "imagenet":
            size = cfg.image_size or 224
            train_dir, val_dir = find_split(cfg.data, "train"), find_split(cfg.data, "val")
            mean, std, augment = IMAGENET_MEAN, IMAGENET_STD, dict(val_resize=round(size * 256 / 224))
        else:  # native 64 x 64: padded random crop, no resizing when the images have that size
            size = cfg.image_size or tiny_imagenet.IMAGE_SIZE
            root = tiny_imagenet.find_root(cfg.data)
            train_dir, val_dir = root / "train", root / "val"
            mean, std = tiny_imagenet.MEAN, tiny_imagenet.STD
            augment = dict(val_resize=size, augment="pad-crop", padding=max(1, size // 16))

        def scan():  # reads a few bytes of every file: once, on rank 0, not on every rank
            if name == "tiny-imagenet":
                classes, train_samples, val_samples = tiny_imagenet.scan(cfg.data)
                return (classes, train_samples), val_samples
            train_scan, val_scan = scan_image_folder(train_dir), scan_image_folder(val_dir)
            if val_scan[0] != train_scan[0]:
                raise DataError(f"{val_dir}: its class folders differ from {train_dir}'s")
            return train_scan[:2], val_scan[1]
        (classes, samples), val_samples = distributed.from_rank0(scan)
        val_samples = [val_samples[i] for i in held_out_order(len(val_samples)).tolist()]
        samples = [samples[i] for i in subset_indices(len(samples), cfg.train_subset, cfg.seed).tolist()]
        common = dict(batch_size=per_rank, device=device, image_size=size, rank=rank, world_size=world_size,
                      seed=cfg.seed, loader=cfg.loader, workers=cfg.workers, classes=classes, **augment)
        return Data(ImageFolderLoader(train_dir, train=True, samples=samples, **common),
                    ImageFolderLoader(val_dir, train=False, samples=val_samples, **common),
                    len(classes), 3, mean, std, size)
    if name == "synthetic":
        size = cfg.image_size or 224
        common = dict(image_size=size, classes=cfg.synthetic_classes, device=device, seed=cfg.seed + rank)
        return Data(SyntheticBatches(per_rank, batches_per_epoch=cfg.synthetic_batches, **common),
                    SyntheticBatches(per_rank, batches_per_epoch=2, **common),
                    cfg.synthetic_classes, 3, IMAGENET_MEAN, IMAGENET_STD, size)
    raise DataError(f"unknown dataset {name!r}")


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


__all__ = ["Data", "build_data", "held_out_order", "subset_indices", "take"]

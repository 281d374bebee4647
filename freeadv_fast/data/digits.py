"""The embedded dataset: scikit-learn's handwritten digits (1,797 real 8x8
grayscale scans, 10 classes), shipped inside the scikit-learn package, so a
run needs no download. Pixels 0..16 are stored as uint8 0..255."""
from __future__ import annotations

import torch

from .datasets import in_memory
from .registry import DatasetSpec, register_dataset

MEAN, STD = (0.3,), (0.4,)
IMAGE_SIZE = 8


def load_digits_uint8():
    """(x uint8 N x 1 x 8 x 8, y int64): the whole dataset, in its fixed order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # a declared dependency, but say what to do if it is missing
        raise RuntimeError("the embedded digits dataset needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(digits.target).long()
    return x, y


def digits_split(test_fraction: float = 0.25, seed: int = 0):
    """A fixed, shuffled train/test split: ((x_train, y_train), (x_test, y_test))."""
    x, y = load_digits_uint8()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def build(cfg, rank, world_size, device):
    train, val = in_memory(cfg, *digits_split(), rank=rank, world_size=world_size, device=device)
    return train, val, 10, IMAGE_SIZE


register_dataset(DatasetSpec("digits", "scikit-learn digits", build, MEAN, STD, IMAGE_SIZE, "small_cnn", channels=1,
                             preset="digits-demo", reads_data=False))

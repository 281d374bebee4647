"""Fashion-MNIST from its standard IDX files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-*``; gzipped or not), held whole on the
device as uint8. Without ``--data`` the folder of Debian's
``dataset-fashion-mnist`` package is used when it is installed.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .datasets import in_memory
from .errors import DataError
from .registry import DatasetSpec, register_dataset

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)  # apt-get install dataset-fashion-mnist
FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)
IMAGE_SIZE = 28


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x00000801 / 0x00000803) as an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged .gz
        raise DataError(f"{path}: unreadable ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated (its header ends before its {ndim} dimension(s))")
    # Python ints: a header of 2^32 - 1 x 2^32 - 1 x 2^31 overflows a numpy int64 product
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise DataError(f"{path}: truncated or padded ({len(raw) - 4 - 4 * ndim:,} bytes of data, its header says "
                        f"{' x '.join(map(str, dims))})")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_root(data_dir=None) -> Path:
    candidates = [Path(data_dir)] if data_dir else [Path(d) for d in DEFAULT_DIRS]
    for root in candidates:
        if _file(root, FILES[True][0]):
            return root
    if data_dir:
        raise DataError(f"{data_dir}: no Fashion-MNIST here (expected {FILES[True][0]}[.gz] and the other IDX files)")
    raise DataError("fashion-mnist needs --data DIR holding the IDX files (or, on Debian/Ubuntu, "
                    "apt-get install dataset-fashion-mnist)")


def _file(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/name.gz``, whichever is a file; None if neither
    is there; a DataError if one is there but is no file (a directory)."""
    candidates = (root / name, root / f"{name}.gz")
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        for p in candidates:
            if p.exists():
                raise DataError(f"{p}: {'a directory' if p.is_dir() else 'not a regular file'}, not an IDX file")
    return found


def load_fashion_mnist(data_dir=None, train: bool = True):
    """(x uint8 N x 1 x 28 x 28, y int64)."""
    root = find_root(data_dir)
    paths = []
    for name in FILES[train]:
        path = _file(root, name)
        if path is None:
            raise DataError(f"{root}: {name}[.gz] is missing")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{paths[0]}: holds an array of shape {' x '.join(map(str, images.shape))}, expected "
                        f"N images of 28 x 28")
    if len(images) == 0:
        raise DataError(f"{paths[0]}: holds no images")
    if labels.ndim != 1:
        raise DataError(f"{paths[1]}: holds an array of shape {' x '.join(map(str, labels.shape))}, expected one "
                        f"label per image ({len(images)})")
    if len(labels) != len(images):
        raise DataError(f"{paths[1]}: {len(labels)} labels for {len(images)} images in {paths[0]}")
    if labels.max(initial=0) >= len(CLASSES):
        raise DataError(f"{paths[1]}: label {labels.max()} outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))



def build(cfg, rank, world_size, device):
    train, val = in_memory(cfg, load_fashion_mnist(cfg.data, train=True), load_fashion_mnist(cfg.data, train=False),
                           rank=rank, world_size=world_size, device=device)
    return train, val, len(CLASSES), IMAGE_SIZE


# (arch, epochs, batch, train subset, eval samples, eval steps) of bench/compare.py's full run and of --quick
register_dataset(DatasetSpec(
    "fashion-mnist", "Fashion-MNIST", build, MEAN, STD, IMAGE_SIZE, "small_cnn", channels=1,
    check_layout=lambda cfg: find_root(cfg.data), epsilon="0.1",
    compare=dict(full=("small_cnn_bn", 15, 128, 0, 0, "20,100"), quick=("small_cnn_bn", 16, 50, 1000, 250, "20"))))

__all__ = ["CLASSES", "MEAN", "STD", "find_root", "load_fashion_mnist", "read_idx"]

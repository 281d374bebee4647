"""CIFAR-10 / CIFAR-100, kept whole on the device as uint8; crop and flip
happen on the device per batch. Two layouts are read:

* the official python-pickle distributions (``cifar-10-batches-py/``,
  ``cifar-100-python/``), with an unpickler that admits only the numpy array
  types those files contain, so a doctored file cannot run code;
* the common image-folder export, ``train/<class>/*.png|jpg`` and
  ``test/<class>/*`` (class index = sorted class names, as torchvision's
  ImageFolder), decoded once when the run starts.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..messages import say_once
from .datasets import in_memory, subset_indices
from .errors import DataError
from .folder import decode_image_folder, not_a_directory
from .registry import DatasetSpec, register_dataset
from .tensors import RandomCropFlip

LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


def _empty_bytes(*args):
    """``bytes()``, which protocol-2 pickles of an empty array call; with any
    argument (``bytes(10**12)`` would allocate a terabyte) refused."""
    if args:
        raise pickle.UnpicklingError("refusing to call bytes with arguments")
    return b""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
            return _empty_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _bytes_keys(d):
    """A pickle's dict with its str keys as bytes: the official files have
    bytes keys; one re-saved from Python 3 (or by hand) may have str keys."""
    if not isinstance(d, dict):
        return d
    keys = {k.encode() if isinstance(k, str) else k: v for k, v in d.items() if isinstance(k, str)}
    return {**keys, **{k: v for k, v in d.items() if not isinstance(k, str)}}


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (expected the official python version of the dataset)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, not a CIFAR pickle file") from None
    except Exception as exc:
        why = " ".join(str(exc).split())  # one line, whatever the unpickler said
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {why})") from None


NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
FOLDER_TEST_SPLITS = ("test", "val")


def find_root(data_dir, name: str) -> tuple[str, Path]:
    """Where the data is: ("pickle", the folder holding the pickles: ``data_dir``
    itself or its official subfolder) or ("folder", ``data_dir`` holding
    train/<class>/ and test/<class>/)."""
    if name not in LAYOUTS:
        raise DataError(f"unknown CIFAR variant {name!r}: choose one of {', '.join(LAYOUTS)}")
    folder, first = LAYOUTS[name][0], LAYOUTS[name][1][0]
    data_dir = Path(data_dir)
    try:
        if not data_dir.is_dir():
            raise not_a_directory(data_dir)
    except (OSError, ValueError) as exc:  # a NUL byte, a name over the limit
        raise DataError(f"{str(data_dir)[:80]!r} cannot be used as a path ({getattr(exc, 'strerror', None) or exc})"
                        ) from None
    for candidate in (data_dir / folder, data_dir):
        if (candidate / first).is_file():
            return "pickle", candidate
    if (data_dir / "train").is_dir():
        if not any((data_dir / s).is_dir() for s in FOLDER_TEST_SPLITS):
            raise DataError(f"{data_dir}: has train/ but no test/ folder (expected test/<class>/<image>)")
        return "folder", data_dir
    raise DataError(f"{data_dir}: no {name} here (expected the official python version, {folder}/{first}, or "
                    f"image folders train/<class>/*.png and test/<class>/*.png)")


def _pixels(path: Path, raw) -> np.ndarray:
    """The images of one pickle as uint8 N x 3 x 32 x 32; another integer
    dtype is converted when every value is a pixel (0..255), anything else is
    refused by name -- never wrapped modulo 256."""
    a = np.asarray(raw)
    if a.dtype.kind == "f":
        raise DataError(f"{path}: images are {a.dtype} (values {a.min():.3g}..{a.max():.3g}); CIFAR pickles hold "
                        "uint8 pixels 0..255")
    if a.dtype.kind not in "iu":
        raise DataError(f"{path}: images are {a.dtype}, not integer pixels")
    if a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"{path}: pixel values {a.min()}..{a.max()} in a {a.dtype} array, outside 0..255")
        say_once(f"{path}: {a.dtype} pixels (all within 0..255) converted to uint8")
    if not (a.ndim == 2 and a.shape[1] == 3072 or a.ndim == 4 and a.shape[1:] == (3, 32, 32)):
        hint = (" (N x 32 x 32 x 3 is torchvision's in-memory layout: transpose it to N x 3 x 32 x 32)"
                if a.ndim == 4 and a.shape[1:] == (32, 32, 3) else "")
        raise DataError(f"{path}: images of shape {a.shape}, expected N x 3072 or N x 3 x 32 x 32 (channel, row, "
                        f"column){hint}")
    return a.astype(np.uint8).reshape(-1, 3, 32, 32)


def _class_names(path: Path, names_key: bytes, classes: int):
    meta = _bytes_keys(_load(path))
    names = meta.get(names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: no list of class names under {names_key.decode()!r}")
    if len(names) != classes:
        raise DataError(f"{path}: {len(names)} class names, but this dataset has {classes} classes")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def load_cifar(data_dir, name: str, train: bool, subset=None):
    """(x uint8 N x 3 x 32 x 32, y int64, class names). ``subset``: a function
    from the split's size to the indices of the images to keep (image files
    outside it are not decoded)."""
    layout, root = find_root(data_dir, name)
    if layout == "folder":
        return _load_folder(root, name, train, subset)
    _, train_files, test_files, label_key, meta_file, names_key = LAYOUTS[name]
    classes = NUM_CLASSES[name]
    xs, ys = [], []
    for fname in train_files if train else test_files:
        path = root / fname
        d = _bytes_keys(_load(path))
        if not isinstance(d, dict):
            raise DataError(f"{path}: holds a {type(d).__name__}, not the dict of a CIFAR pickle")
        missing = [k.decode() for k in (b"data", label_key) if k not in d]
        if missing:
            raise DataError(f"{path}: no {' or '.join(map(repr, missing))} in it")
        data = _pixels(path, d[b"data"])
        if len(data) == 0:
            raise DataError(f"{path}: holds no images")
        labels = d[label_key]
        # an empty list is no float array: the count, not the dtype, is what is wrong with it
        labels = np.zeros(0, np.int64) if isinstance(labels, (list, tuple)) and not labels else np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: labels of shape {labels.shape} and dtype {labels.dtype}, expected one integer "
                            "label per image")
        if len(data) != len(labels):
            raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise DataError(f"{path}: labels {labels.min()}..{labels.max()}, outside 0..{classes - 1} ({name} has "
                            f"{classes} classes)")
        xs.append(data)
        ys.append(labels.astype(np.int64))
    meta_path = root / meta_file
    names = _class_names(meta_path, names_key, classes) if meta_path.exists() else None
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    if subset is not None:
        keep = subset(len(y))
        x, y = x[keep], y[keep]
    return x, y, names


def _load_folder(root: Path, name: str, train: bool, subset=None):
    classes = sorted(e.name for e in (root / "train").iterdir() if e.is_dir() and not e.name.startswith("."))
    if len(classes) != NUM_CLASSES[name]:
        raise DataError(f"{root / 'train'}: {len(classes)} class folders, but {name} has {NUM_CLASSES[name]}")
    split = root / "train" if train else next(root / s for s in FOLDER_TEST_SPLITS if (root / s).is_dir())
    return decode_image_folder(split, size=32, classes=classes, subset=subset)


def build(cfg, rank, world_size, device):
    # --train-subset taken as the images are read: a folder's other files are never decoded
    train = load_cifar(cfg.data, cfg.dataset, train=True,
                       subset=lambda total: subset_indices(total, cfg.train_subset, cfg.seed))[:2]
    val = load_cifar(cfg.data, cfg.dataset, train=False)[:2]
    train, val = in_memory(cfg, train, val, rank=rank, world_size=world_size, device=device,
                           augment=RandomCropFlip(padding=4), drop_last=True)
    return train, val, NUM_CLASSES[cfg.dataset], 32


for _name, _title, _preset in (("cifar10", "CIFAR-10", "cifar10-free8"), ("cifar100", "CIFAR-100", "cifar100-free8")):
    register_dataset(DatasetSpec(
        _name, _title, build, *MEAN_STD[_name], 32, "wide_resnet32_10", preset=_preset,
        data_help=f"the folder holding {LAYOUTS[_name][0]}/, or train/<class>/ and test/<class>/ image folders",
        check_layout=lambda cfg: find_root(cfg.data, cfg.dataset), eval_attack=([20, 100], 2 / 255),
        # (arch, epochs, batch, train subset, eval samples, eval steps) of bench/compare.py's full run and of
        # --quick. Full: the Fast-AT budget (15 epochs). Quick (CI, 2 CPU cores, about 5 minutes for the
        # recipe, the m-sweep and the frontier together): every budget at 4/15 of its recipe's, on 800
        # images in batches of 25 (LR scaled with the batch), so each row makes ~130 optimizer steps or more,
        # attacked on 1,000 test images. At 3/15 and 400 the models stayed near chance and natural training's
        # PGD interval overlapped an adversarial method's on some CPUs and seeds; at 4/15 and 1,000 five seeds
        # kept them 2.9 points apart or more (AMD EPYC, 2026-12-07).
        compare=dict(full=("preact_resnet18", 15, 128, 0, 0, "20,100"),
                     quick=("small_cnn_bn", 4, 25, 800, 1000, "10")) if _name == "cifar10" else {}))

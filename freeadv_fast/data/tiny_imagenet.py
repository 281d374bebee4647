"""Tiny-ImageNet-200 and subsets of it: 64x64 ImageNet photos, read through
the same DALI / torchvision loaders as ImageNet and trained at their native
size with a padded random crop and flip.

Two layouts are understood, both under one root:

* ImageFolder: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``;
* the official archive: ``train/<wnid>/images/*.JPEG`` and a flat
  ``val/images/*.JPEG`` whose classes are listed in ``val/val_annotations.txt``
  (file, wnid, box). The unlabelled ``test/`` split is not used.

Labels follow the sorted training class names, as torchvision's ImageFolder.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError
from ..messages import say_once
from .datasets import image_folders
from .folder import check_no_class_lost, check_same_classes, not_a_directory, quick_check, scan_image_folder
from .registry import DatasetSpec, register_dataset

MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
IMAGE_SIZE = 64
ANNOTATIONS = "val_annotations.txt"


def find_root(data_dir) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise not_a_directory(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: no {split}/ folder (expected Tiny-ImageNet's train/<wnid>/ and val/, "
                            "as an ImageFolder or as the official archive with val/val_annotations.txt)")
    return root


def read_annotations(val_dir: Path, classes: list[str]):
    """([(path, label)] of every annotated image of the training ``classes``,
    the number of images annotated with other classes), from
    ``val_dir/val_annotations.txt``; any line that cannot be right (no class,
    an empty file name or one outside ``val/images``, a file listed twice or
    under two classes, a file that is missing) is named with its line number."""
    annotations = val_dir / ANNOTATIONS
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    images = val_dir / "images" if (val_dir / "images").is_dir() else val_dir
    try:
        text = annotations.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no name
    except UnicodeDecodeError:
        raise DataError(f"{annotations}: not a text file (expected lines of 'file<TAB>wnid ...')") from None
    except OSError as exc:
        raise DataError(f"{annotations}: unreadable ({exc.strerror or exc})") from None
    samples, other, seen = [], 0, {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations}:{n}: expected 'file<TAB>wnid ...', got {line[:60]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        where = f"{annotations}:{n}"
        if not name:
            raise DataError(f"{where}: no file name before the tab (expected 'file<TAB>wnid ...')")
        if not wnid:
            raise DataError(f"{where}: no class (wnid) for {name!r} (expected 'file<TAB>wnid ...')")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{where}: file name {name[:200]!r} points outside {images} (expected the name of a file "
                            "in it)")
        path = images / name
        key = os.path.normpath(path)
        if key in seen:
            line_before, wnid_before = seen[key]
            if wnid_before == wnid:
                raise DataError(f"{where}: {name} is listed twice (also on line {line_before}); each image once")
            raise DataError(f"{where}: {name} is labelled {wnid} here but {wnid_before} on line {line_before}")
        seen[key] = n, wnid
        if wnid not in label_of:  # a class the training split lacks (e.g. a subset of the 200)
            other += 1
            continue
        if not path.is_file():
            raise DataError(f"{where}: {path} {'is not a file' if path.exists() else 'does not exist'}")
        samples.append((str(path), label_of[wnid]))
    return samples, other


def scan_val(val_dir: Path, classes: list[str]):
    """[(path, label)] of the validation split, in either layout."""
    annotations = val_dir / ANNOTATIONS
    if not annotations.is_file():
        found, samples, _ = scan_image_folder(val_dir)
        check_same_classes(val_dir, found, classes, val_dir.parent / "train")
        return samples
    samples, other = read_annotations(val_dir, classes)
    verdicts = [quick_check(path) for path, _ in samples]
    bad = [(path, why) for (path, _), why in zip(samples, verdicts) if why]
    check_no_class_lost(list(zip(samples, verdicts)), lambda label: f"{annotations} (class {classes[label]})")
    samples = [s for s, why in zip(samples, verdicts) if not why]
    if other:
        say_once(f"{annotations}: left out {other} image(s) of classes not in {val_dir.parent / 'train'}")
    if bad:
        say_once(f"{val_dir}: left out {len(bad)} bad file(s), e.g. {bad[0][0]}: {bad[0][1]}")
    if not samples:
        raise DataError(f"{annotations}: no image of the training classes")
    return samples


def scan(data_dir):
    """(classes, train samples, val samples) of the dataset at ``data_dir``."""
    root = find_root(data_dir)
    classes, train, _ = scan_image_folder(root / "train")
    return classes, train, scan_val(root / "val", classes)



def build(cfg, rank, world_size, device):
    """Native 64 x 64: a padded random crop, no resizing when the images have that size."""
    size = cfg.image_size or IMAGE_SIZE
    root = find_root(cfg.data)

    def scan_splits():
        classes, train, val = scan(cfg.data)
        return (classes, train), val
    train, val, classes = image_folders(cfg, scan_splits, train_dir=root / "train", val_dir=root / "val",
                                        image_size=size, rank=rank, world_size=world_size, device=device,
                                        val_resize=size, augment="pad-crop", padding=max(1, size // 16))
    return train, val, len(classes), size


register_dataset(DatasetSpec(
    "tiny-imagenet", "Tiny-ImageNet", build, MEAN, STD, IMAGE_SIZE, "preact_resnet18",
    data_help="holding train/<wnid>/ and val/", check_layout=lambda cfg: find_root(cfg.data), resizable=True, in_folders=True,
    compare=dict(full=("preact_resnet18", 15, 128, 0, 0, "20,100"), quick=("small_cnn_bn", 16, 50, 500, 200, "20"))))

__all__ = ["ANNOTATIONS", "IMAGE_SIZE", "MEAN", "STD", "find_root", "read_annotations", "scan", "scan_val"]

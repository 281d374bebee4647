"""ImageNet (ILSVRC-2012) as an image folder: ``ROOT/train/<wnid>/*.JPEG`` and
``ROOT/val/<wnid>/*.JPEG``, read by DALI or torchvision workers
(freeadv_fast/data/folder.py) with a random-resized crop and flip."""
from __future__ import annotations

from .datasets import image_folders
from .folder import check_same_classes, find_split, scan_image_folder
from .registry import DatasetSpec, register_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 224


def build(cfg, rank, world_size, device):
    size = cfg.image_size or IMAGE_SIZE
    train_dir, val_dir = find_split(cfg.data, "train"), find_split(cfg.data, "val")

    def scan_splits():
        train_scan, val_scan = scan_image_folder(train_dir), scan_image_folder(val_dir)
        check_same_classes(val_dir, val_scan[0], train_scan[0], train_dir)
        return train_scan[:2], val_scan[1]
    train, val, classes = image_folders(cfg, scan_splits, train_dir=train_dir, val_dir=val_dir, image_size=size,
                                        rank=rank, world_size=world_size, device=device,
                                        val_resize=round(size * 256 / 224))  # the usual 256 -> 224 center crop
    return train, val, len(classes), size


def check_layout(cfg):
    train_dir, val_dir = find_split(cfg.data, "train"), find_split(cfg.data, "val")
    classes = scan_image_folder(train_dir, check=False)[0]
    check_same_classes(val_dir, scan_image_folder(val_dir, check=False)[0], classes, train_dir)


register_dataset(DatasetSpec(
    "imagenet", "ImageNet", build, MEAN, STD, IMAGE_SIZE, "resnet50", preset="imagenet-free4-eps4",
    data_help="holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG", check_layout=check_layout, epsilon="4/255",
    eval_attack=([10, 50, 100], 1 / 255), resizable=True, in_folders=True))

"""Images per second of each image-folder loader on the same folder.

    python bench/loader.py --data ROOT [--loader dali|torch] [--device cpu|cuda] [--json PATH]
                           [--split train] [--batch-size 256] [--image-size 224] [--batches N] [--workers W]

ROOT is an ImageFolder dataset (ROOT/train/<class>/*.JPEG). Each loader runs
one warm-up batch, then times --batches batches (the whole split by default)
of the training transform (random-resized crop + flip, uint8 out), with a
device synchronise per batch so the figure is what a training loop receives.
Free-m replays each batch m times, so training needs only 1/m of these
rates per replay-step rate.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from common import parse, parser, sync, wall_clock, write_json
from freeadv_fast.data.folder import ImageFolderLoader, dali_available, find_split, scan_image_folder


def loader_machine(device):
    """Loaders run on the host's cores too, so the CPU count matters even with a GPU."""
    cores = f"{os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores}"
    return f"{platform.processor() or platform.machine()} CPU, {cores}"


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--loader", choices=["dali", "torch"], action="append")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=0, help="batches to time (0: the whole split)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parse(p, argv)
    loaders = args.loader or (["dali", "torch"] if dali_available() else ["torch"])
    split = find_split(args.data, args.split)
    classes, samples, bad = scan_image_folder(split)
    device = args.device
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # DALI wants the GPU's index
    print(f"{split}: {len(samples)} images, {len(classes)} classes; device {device}, {args.workers} workers")
    records = []
    for name in loaders:
        data = ImageFolderLoader(split, train=True, batch_size=args.batch_size, image_size=args.image_size,
                                 device=device, loader=name, workers=args.workers, samples=samples, classes=classes)
        total = len(data) - 1 if not args.batches else min(args.batches, len(data) - 1)
        if total < 1:
            p.exit(2, f"bench/loader.py: {split} has too few images for two batches of {args.batch_size}\n")
        it = iter(data)
        next(it)  # warm-up: pipeline build, worker start

        def take():
            """Images in ``total`` batches, each synchronised: what a training loop receives."""
            images = 0
            for _ in range(total):
                x, y = next(it)
                sync(device)
                images += len(y)
            return images
        images, seconds = wall_clock(take, device)
        rate = images / seconds
        print(f"  {name:<6} {rate:10.1f} images/s  ({images} images in {seconds:.1f} s)", flush=True)
        records.append({"loader": name, "images_per_s": rate, "images": images, "seconds": seconds,
                        "batch_size": args.batch_size, "image_size": args.image_size, "workers": args.workers})
        del it, data
    if args.json:
        write_json(args.json, device, {"device": loader_machine(device), "data": str(args.data),
                                       "images": len(samples)}, records=records)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

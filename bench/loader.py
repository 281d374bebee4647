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

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from freeadv_fast.data.folder import ImageFolderLoader, dali_available, find_split, scan_image_folder
from provenance import provenance


def loader_machine(device):
    """Loaders run on the host's cores too, so the CPU count matters even with a GPU."""
    cores = f"{os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores}"
    return f"{platform.processor() or platform.machine()} CPU, {cores}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--loader", choices=["dali", "torch"], action="append")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=0, help="batches to time (0: the whole split)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench/loader.py: --device cuda asked for, but torch sees no GPU\n")
    loaders = args.loader or (["dali", "torch"] if dali_available() else ["torch"])
    split = find_split(args.data, args.split)
    classes, samples, bad = scan_image_folder(split)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
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
        images, start = 0, time.perf_counter()
        for _ in range(total):
            x, y = next(it)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            images += len(y)
        seconds = time.perf_counter() - start
        rate = images / seconds
        print(f"  {name:<6} {rate:10.1f} images/s  ({images} images in {seconds:.1f} s)", flush=True)
        records.append({"loader": name, "images_per_s": rate, "images": images, "seconds": seconds,
                        "batch_size": args.batch_size, "image_size": args.image_size, "workers": args.workers})
        del it, data
    if args.json:
        meta = {**provenance(device), "device": loader_machine(device), "data": str(args.data),
                "images": len(samples)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

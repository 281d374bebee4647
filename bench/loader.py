"""Images per second of each image-folder loader on the same folder, and how
many GPUs of a kind each one can feed.

    python bench/loader.py --data ROOT [--loader dali|nvjpeg|torch ...] [--device cpu|cuda] [--json PATH]
                           [--split train] [--batch-size 256] [--image-size 128,224,288] [--batches N]
                           [--workers W] [--decode-processes P[,P...]] [--train-step FILE ...]

ROOT is an ImageFolder dataset (ROOT/train/<class>/*.JPEG; bench/make_imagenet_like.py
writes one with ImageNet-like files). Each loader (default: every one this
machine has) runs one whole pass to warm up, then times the next pass (its
first --batches batches; the whole split by default) of the training
transform (random-resized crop + flip, uint8 out) at each image size, from
the pass's start and with a device synchronise per batch: what a training
loop receives, the pipeline's fill included (each pass starts empty, so
timing only batches already prefetched would overstate a loader). The fill
weighs less the more batches a pass has: give it many more batches than
workers. With --train-step (results of
bench/train_step.py, one file per image size), each rate is set beside the
best measured natural and free-4 step rates at its size: natural training
needs a new image per image-step, free-m one per m image-replays, so a
loader feeds rate / natural-rate GPUs of natural training and
rate / (free-4 rate / 4) of free-4. The nvjpeg loader runs once for each
--decode-processes value (0: it decodes in this process; P: in P processes
of its own, each with its own GPU decoder).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from common import (best_step_rates, cpu_name, guarded, named_twice, parse, parser, positive, sync, wall_clock,
                    write_json)
from freeadv_fast.cli import comma_list
from freeadv_fast.data.folder import ImageFolderLoader, dali_available, find_split, scan_image_folder
from freeadv_fast.data.nvjpeg import nvjpeg_available
from report import loader_label


def loader_machine(device):
    """Loaders run on the host's cores too, so the CPU count matters even with a GPU."""
    cores = f"{os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores}"
    return f"{cpu_name()}, {cores}"


@guarded
def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--loader", choices=["dali", "nvjpeg", "torch"], action="append")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=positive(int), default=256)
    p.add_argument("--image-size", type=comma_list(int, minimum=16, distinct=True), default=[224],
                   metavar="S[,S...]")
    p.add_argument("--batches", type=positive(int, zero=True), default=0, help="batches of the timed pass (0: the whole pass)")
    p.add_argument("--workers", type=positive(int, zero=True), default=os.cpu_count() or 1)
    p.add_argument("--decode-processes", type=comma_list(int, minimum=0, distinct=True), default=[0],
                   metavar="P[,P...]",
                   help="the nvjpeg loader's decoding processes, one run per value (0: this process)")
    p.add_argument("--train-step", action="append", default=[], metavar="FILE",
                   help="bench/train_step.py results to set the loader rates beside (repeatable)")
    args = parse(p, argv)
    if twice := named_twice("--loader", args.loader or []):
        p.error(twice)
    loaders = args.loader or (["dali"] * dali_available() + ["nvjpeg"] * nvjpeg_available(args.device) + ["torch"])
    if args.decode_processes != [0] and "nvjpeg" not in loaders:  # the nvjpeg loader's alone: it changed nothing
        p.error(f"--decode-processes applies to the nvjpeg loader, which is not run here ({', '.join(loaders)})")
    steps = best_step_rates(args.train_step, ("natural", "free-4"))
    split = find_split(args.data, args.split)
    classes, samples, bad = scan_image_folder(split)
    device = args.device
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # DALI wants the GPU's index
    print(f"{split}: {len(samples)} images, {len(classes)} classes; device {device}, {args.workers} workers")
    records = []
    runs = [(n, k) for n in loaders for k in (args.decode_processes if n == "nvjpeg" else [0])]
    for (name, procs), size in ((r, s) for s in args.image_size for r in runs):
        data = ImageFolderLoader(split, train=True, batch_size=args.batch_size, image_size=size, device=device,
                                 loader=name, workers=args.workers, samples=samples, classes=classes,
                                 decode_processes=procs)
        if len(data) < 2:
            p.exit(2, f"bench/loader.py: {split} has too few images for two batches of {args.batch_size}\n")

        def one_pass(limit=0):
            """Images in a pass (its first ``limit`` batches), timed from the pass's start, each batch
            synchronised: what a training loop receives, the pipeline's fill included."""
            images = 0
            for i, (x, y) in enumerate(data):
                sync(device)
                images += len(y)
                if i + 1 == limit:
                    break
            return images
        # warm-up, a whole pass: workers and decoding processes started, files in the page cache, nothing
        # left in flight; its time says what starting costs (decoding processes: the fork server imports torch and torchvision)
        _, warmup_s = wall_clock(one_pass, device)
        images, seconds = wall_clock(lambda: one_pass(args.batches), device)
        rate = images / seconds
        record = {"loader": name, "images_per_s": rate, "images": images, "seconds": seconds,
                  "warmup_pass_s": warmup_s, "batch_size": args.batch_size, "image_size": size,
                  "workers": args.workers, "decode_processes": procs}
        line = (f"  {size:>4}px {loader_label(record):<30} {rate:10.1f} images/s  ({images} images in {seconds:.1f} s"
                f" after a {warmup_s:.1f} s warm-up pass)")
        for kind, per_image in (("natural", 1), ("free-4", 4)):
            if kind in steps.get(size, {}):
                step, method = steps[size][kind]["images_per_s"], steps[size][kind]["method"]
                record[f"gpus_fed_{kind}"] = rate / (step / per_image)
                record[f"step_{kind}"] = {"method": method, "images_per_s": step}
                line += f"; feeds {rate / (step / per_image):.2f} GPUs of {method} ({step:.0f}/s)"
        print(line, flush=True)
        records.append(record)
        data.close()  # its worker processes (decoders with CUDA contexts) go now, not when collected
        del data
        if args.json:  # after every row: a run stopped by its time limit keeps what it measured
            write_json(args.json, device, {"device": loader_machine(device), "data": str(args.data),
                                           "images": len(samples)}, records=records)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

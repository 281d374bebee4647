"""Writes an ImageFolder of real photos at ImageNet-like size and JPEG quality,
for loader benchmarks: ``OUT/train/<class>/*.JPEG`` and ``OUT/val/<class>/*.JPEG``.

    python bench/make_imagenet_like.py SOURCE OUT [--size 400x350] [--quality 90] [--grain 0] [--limit N]

SOURCE is an image folder (``train/<class>/``, ``val/<class>/``), Tiny-ImageNet
in either layout, or a ``.tar.gz`` of one (``../shared/datasets/tiny-imagenet-20.tar.gz``).
Each image is upscaled (bicubic) to --size, ImageNet's typical 400 x 350, and
saved as a baseline JPEG at --quality (ImageNet's are mostly q90-ish, 4:2:0).

What this is not: the pixels are upscaled thumbnails, smoother than camera
photos, so the files come out smaller than ImageNet's (about 110 KB on
average): 64-px Tiny-ImageNet photos give about 18 KB at 400 x 350 q90.
Decoding cost follows pixel count and, less, the entropy-coded bytes;
--grain SIGMA adds Gaussian noise per pixel and channel (camera-like grain)
to bring the bytes up (sigma 8: about 42 KB). The script says what it wrote.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common import guarded, positive
from freeadv_fast.data import tiny_imagenet
from freeadv_fast.data.errors import DataError
from freeadv_fast.data.folder import scan_image_folder

IMAGENET_MEAN_KB = 110  # the average ILSVRC-2012 training JPEG


def splits_of(root: Path):
    """{"train": [(path, class)], "val": [...]} of an image folder or Tiny-ImageNet root."""
    try:
        classes, train, val = tiny_imagenet.scan(root)  # also reads Tiny-ImageNet's flat val/ layout
    except DataError:
        classes, train, _ = scan_image_folder(root / "train")
        val_classes, val, _ = scan_image_folder(root / "val")
        if val_classes != classes:
            raise DataError(f"{root}: val/ and train/ have different classes") from None
    return {"train": [(p, classes[c]) for p, c in train], "val": [(p, classes[c]) for p, c in val]}


def unique_name(folder: Path, src: Path, taken: set) -> Path:
    """``folder/<stem>.JPEG``, or with the source's extension in the name when
    another source took that one (0.png beside 0.JPEG: one replaced the other)."""
    for name in (f"{src.stem}.JPEG", f"{src.stem}_{src.suffix[1:]}.JPEG",
                 *(f"{src.stem}_{src.suffix[1:]}_{n}.JPEG" for n in range(1, 1000))):
        if (folder / name) not in taken:
            taken.add(folder / name)
            return folder / name
    raise DataError(f"{src}: too many sources named {src.stem} in {folder}")


def convert(src, dst: Path, size, quality: int, grain: float, seed: int) -> int | str:
    """Writes the converted image; returns its bytes, or why the source could not be read."""
    try:
        image = Image.open(src).convert("RGB").resize(size, Image.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # passed the quick check, failed to decode
        return f"{type(exc).__name__}: {exc}"
    if grain:
        pixels = np.asarray(image, dtype=np.float32)
        pixels += np.random.default_rng(seed).normal(0.0, grain, pixels.shape)
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    dst.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def size_arg(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WIDTHxHEIGHT: {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    if max(w, h) > 65535:  # the JPEG format's limit: the encoder failed after the folders were made
        raise argparse.ArgumentTypeError(f"a JPEG is at most 65535 pixels a side: {text!r}")
    return w, h


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=size_arg, default=(400, 350), help="WIDTHxHEIGHT (default 400x350)")
    p.add_argument("--quality", type=int, default=90, choices=range(1, 96), metavar="Q", help="JPEG quality (90)")
    p.add_argument("--grain", type=positive(zero=True), default=0.0, help="noise sigma in 8-bit levels (default 0: none)")
    p.add_argument("--limit", type=positive(int, zero=True), default=0, help="images per split (0: all)")
    args = p.parse_args(argv)
    if not args.source.exists():
        p.error(f"{args.source}: no such file or directory")
    if args.source.is_dir() and args.out.resolve().is_relative_to(args.source.resolve()):
        # written after the scan, its images would still join the source's for the next reader of SOURCE
        p.error(f"{args.out} is inside {args.source}: its images would be added to the source's; name a folder "
                "outside it")
    existed = args.out.exists()
    if args.out.exists() and not args.out.is_dir():
        p.error(f"{args.out} is not a directory")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"{args.out} is not empty")
    above = next(d for d in args.out.absolute().parents if d.exists())
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        p.error(f"{args.out}: cannot be made in {above}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.source
        if root.is_file():
            try:
                with tarfile.open(root) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                why = (str(exc).splitlines() or [""])[0].rstrip(":")  # tarfile's may list every method it tried
                p.error(f"{root}: not a readable tar archive ({type(exc).__name__}: {why})")
            found = [d for d in Path(tmp).rglob("train") if d.is_dir()]
            if not found:
                p.error(f"{root}: no train/ folder inside")
            root = found[0].parent
        try:
            splits = splits_of(root)
        except DataError as exc:
            p.error(str(exc))
        total, count = 0, 0
        for split, samples in splits.items():
            if args.limit and args.limit < len(samples):  # evenly spaced: every class, not the first few
                samples = [samples[i * len(samples) // args.limit] for i in range(args.limit)]
            jobs, taken = [], set()
            for i, (src, cls) in enumerate(samples):
                folder = args.out / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                dst = unique_name(folder, Path(src), taken)
                jobs.append((src, dst, args.size, args.quality, args.grain, i))
            pool = ThreadPoolExecutor()
            try:
                results = list(pool.map(lambda job: convert(*job), jobs))
            except KeyboardInterrupt:  # the queued conversions are dropped, not waited for
                pool.shutdown(wait=False, cancel_futures=True)
                print(f"{Path(sys.argv[0]).name}: interrupted: {args.out} holds part of the images; remove it "
                      "before running again", file=sys.stderr, flush=True)
                return 130
            pool.shutdown()
            sizes = [r for r in results if isinstance(r, int)]
            failed = [(job[0], r) for job, r in zip(jobs, results) if isinstance(r, str)]
            total, count = total + sum(sizes), count + len(sizes)
            print(f"{split}: {len(sizes)} images, {len({c for _, c in samples})} classes", flush=True)
            if failed:
                print(f"{split}: skipped {len(failed)} source image(s) that could not be decoded, e.g. "
                      f"{failed[0][0]}: {failed[0][1]}", file=sys.stderr, flush=True)
    if not count:  # no average of nothing: the folders made for the images go, the run fails
        for folder, _, _ in sorted(os.walk(args.out), key=lambda w: -len(w[0])):
            if not os.listdir(folder) and (existed is False or Path(folder) != args.out):
                os.rmdir(folder)
        print(f"{Path(sys.argv[0]).name}: error: no source image could be decoded: nothing written to {args.out}",
              file=sys.stderr)
        return 2
    mean_kb = total / count / 1024
    print(f"wrote {count} JPEGs to {args.out}: {args.size[0]}x{args.size[1]}, q{args.quality}, grain "
          f"{args.grain:g}, {mean_kb:.1f} KB a file on average (ImageNet's: about {IMAGENET_MEAN_KB} KB); "
          "upscaled photos, not ImageNet")
    return 0


if __name__ == "__main__":
    sys.exit(main())

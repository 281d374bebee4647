"""python -m freeadv_fast.data check ROOT: find every file a training run could not read.

ROOT is an image-folder dataset (ROOT/train/<class>/*, ROOT/val/<class>/*,
ROOT/test/<class>/*, or ROOT/<class>/* directly) or a folder with the CIFAR
python pickles. Every
image is fully decoded (in parallel); each unreadable file is listed with the
reason. Exit status: 0 all good, 1 bad files found, 2 the layout is unusable.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .errors import DataError
from .folder import full_check, scan_image_folder


def splits_of(root: Path):
    named = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    return named or [root]


def check(root: Path, workers: int) -> int:
    from . import cifar
    for name in cifar.LAYOUTS:
        try:
            layout, _ = cifar.find_root(root, name)
        except DataError:
            continue
        if layout != "pickle":  # an image-folder export: checked below like any image folder
            break
        for train in (True, False):
            x, y, _ = cifar.load_cifar(root, name, train)
            print(f"{root}: {name} {'train' if train else 'test'}: {len(x)} images, {int(y.max()) + 1} classes, ok")
        return 0
    bad_total = 0
    for split in splits_of(root):
        classes, samples, bad = scan_image_folder(split, check=False)
        print(f"{split}: {len(classes)} classes, {len(samples)} images; decoding all of them ...", flush=True)
        paths = [p for p, _ in samples]
        with ProcessPoolExecutor(workers) as pool:
            verdicts = list(pool.map(full_check, paths, chunksize=64))
        bad = [(p, why) for p, why in zip(paths, verdicts) if why]
        for p, why in bad:
            print(f"  BAD {p}: {why}")
        print(f"{split}: {len(bad)} bad file(s)")
        bad_total += len(bad)
    return 1 if bad_total else 0


def main(argv=None) -> int:
    from ..cli import ArgumentParser, int_at_least
    parser = ArgumentParser(prog="python -m freeadv_fast.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="list every unreadable file of a dataset")
    c.add_argument("root", type=Path)
    c.add_argument("--workers", type=int_at_least(1), default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        return check(args.root, args.workers)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

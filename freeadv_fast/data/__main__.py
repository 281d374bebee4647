"""python -m freeadv_fast.data check ROOT: find every file a training run could not read.

ROOT is an image-folder dataset (ROOT/train/<class>/*, ROOT/val/<class>/*,
ROOT/test/<class>/*, or ROOT/<class>/* directly) or a folder with the CIFAR
python pickles. The layout is checked as training checks it (the held-out
splits' class folders must be the training split's; Tiny-ImageNet's
val/val_annotations.txt is read). Every image is fully decoded (in parallel,
in at most one process per file); each unreadable file is listed with the
reason. Exit status: 0 all good, 1 bad files found, 2 the layout is unusable.
"""
from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .errors import DataError
from .folder import check_same_classes, full_check, printable, scan_image_folder


def splits_of(root: Path):
    named = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    return named or [root]


def _holds_cifar_pickles(root: Path, layout) -> bool:
    """Whether ``root`` has the pickle folder or one of the pickle files of a
    CIFAR variant's ``layout`` (cifar.LAYOUTS), usable or not."""
    folder, train_files, test_files, _, meta, _ = layout
    return (root / folder).is_dir() or any((root / f).is_file() for f in (*train_files, *test_files, meta))


def _image_splits(root: Path):
    """[(split, [paths], what it holds)], the layout checked as training checks
    it (a DataError when unusable): the held-out splits' class folders are
    the training split's, Tiny-ImageNet's val_annotations.txt is read line by
    line; the unlabelled test/images of Tiny-ImageNet's archive is decoded
    but not compared."""
    from .tiny_imagenet import ANNOTATIONS, read_annotations
    splits, train_classes = [], None
    for split in splits_of(root):
        if split.name == "val" and train_classes is not None and (split / ANNOTATIONS).is_file():
            samples, other = read_annotations(split, train_classes)
            what = f"{len(samples)} images annotated in {ANNOTATIONS}" + (
                f" ({other} of classes not in train/ left out)" if other else "")
        else:
            classes, samples, _ = scan_image_folder(split, check=False)
            what = f"{len(classes)} classes, {len(samples)} images"
            if split == root / "train":
                train_classes = classes
            elif split.name == "test" and classes == ["images"] and "images" not in (train_classes or []):
                what += " (unlabelled: Tiny-ImageNet's test/images, not compared with train/)"
            elif train_classes is not None:
                check_same_classes(split, classes, train_classes, root / "train")
        splits.append((split, [path for path, _ in samples], what))
    return splits


def check(root: Path, workers: int) -> int:
    from . import cifar
    pickled = []  # every CIFAR variant whose pickles are here (CIFAR-10's beside CIFAR-100's: both are read)
    for name, layout in cifar.LAYOUTS.items():
        try:
            found, _ = cifar.find_root(root, name)
        except DataError:
            if _holds_cifar_pickles(root, layout):  # some of its pickles: training says what is missing, so do we
                raise
            continue
        if found == "pickle":
            pickled.append(name)
    for name in pickled:
        for train in (True, False):
            x, y, _ = cifar.load_cifar(root, name, train)
            print(f"{printable(root)}: {name} {'train' if train else 'test'}: {len(x)} images, "
                  f"{len(set(y.tolist()))} classes, ok")  # present, not the largest label + 1
    if pickled:
        return 0
    from . import fashion_mnist
    if fashion_mnist._file(root, fashion_mnist.FILES[True][0]):  # IDX files, which training reads too
        for train in (True, False):
            x, y = fashion_mnist.load_fashion_mnist(root, train)
            print(f"{printable(root)}: fashion-mnist {'train' if train else 'test'}: {len(x)} images, "
                  f"{len(set(y.tolist()))} classes, ok")
        return 0
    bad_total = 0
    for split, paths, what in _image_splits(root):
        print(f"{printable(split)}: {what}; decoding all of them ...", flush=True)
        # no more processes than files; Ctrl-C is the parent's to answer, and the queued files are dropped
        pool = ProcessPoolExecutor(max(1, min(workers, len(paths))), initializer=signal.signal,
                                   initargs=(signal.SIGINT, signal.SIG_IGN))
        try:
            verdicts = list(pool.map(full_check, paths, chunksize=max(1, min(64, len(paths) // (4 * workers)))))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        bad = [(p, why) for p, why in zip(paths, verdicts) if why]
        for p, why in bad:
            print(f"  BAD {printable(p)}: {printable(why)}")
        print(f"{printable(split)}: {len(bad)} bad file(s)")
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
    for stream in (sys.stdout, sys.stderr):  # PYTHONIOENCODING=utf-8 makes stdout strict: no name may crash it
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return check(args.root, args.workers)
    except DataError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder it may not list: the layout is unusable as it stands
        print(f"error: {printable(exc.filename or args.root)}: cannot be read ({exc.strerror or exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m freeadv_fast.data: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""bench/make_imagenet_like.py: an image folder (or a .tar.gz of one) becomes
ImageNet-sized q90 JPEGs in the layout the loaders read, and says what it wrote."""
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image
from test_data import write_folder

from freeadv_fast.data.folder import scan_image_folder

ROOT = Path(__file__).resolve().parents[1]


def make(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "make_imagenet_like.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_a_folder_becomes_imagenet_sized_jpegs(tmp_path):
    for split in ("train", "val"):
        write_folder(tmp_path / "src" / split, classes=("n01", "n02"), per_class=3)
    r = make(tmp_path / "src", tmp_path / "out", "--grain", "8")
    assert r.returncode == 0, r.stderr
    assert "wrote 12 JPEGs" in r.stdout and "400x350, q90, grain 8" in r.stdout and "not ImageNet" in r.stdout
    for split in ("train", "val"):
        classes, samples, bad = scan_image_folder(tmp_path / "out" / split)
        assert classes == ["n01", "n02"] and len(samples) == 6 and not bad
        for path, _ in samples:
            with Image.open(path) as image:
                assert image.size == (400, 350) and image.format == "JPEG" and image.mode == "RGB"
    assert make(tmp_path / "src", tmp_path / "out").returncode == 2  # never writes into a full folder


def test_a_tarball_and_a_limit_spread_over_the_classes(tmp_path):
    for split in ("train", "val"):
        write_folder(tmp_path / "data" / split, classes=("n01", "n02", "n03"), per_class=4)
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "data", arcname="data")
    for limit in (3, 7):  # 7 of 12: a step of 1 would take the first 7, two classes
        r = make(tmp_path / "data.tar.gz", tmp_path / f"out{limit}", "--limit", str(limit), "--size", "200x100")
        assert r.returncode == 0, r.stderr
        classes, samples, _ = scan_image_folder(tmp_path / f"out{limit}" / "train")
        assert classes == ["n01", "n02", "n03"] and len(samples) == limit


def test_sources_sharing_a_name_stem_each_get_a_file_and_impossible_sizes_are_refused(tmp_path):
    for split in ("train", "val"):
        write_folder(tmp_path / "src" / split, classes=("n01",), per_class=2)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "src" / "train" / "n01" / "img0.png")
    r = make(tmp_path / "src", tmp_path / "out", "--size", "32x32")
    assert r.returncode == 0, r.stderr
    # img0.png and img0.JPEG were both written to img0.JPEG: one image lost, the count said 5
    written = sorted(p.name for p in (tmp_path / "out" / "train" / "n01").iterdir())
    assert len(written) == 3 and "wrote 5 JPEGs" in r.stdout, written
    r = make(tmp_path / "src", tmp_path / "big", "--size", "70000x1")  # the encoder failed after the folders
    assert r.returncode == 2 and "a JPEG is at most 65535 pixels a side" in r.stderr and not (tmp_path / "big").exists()

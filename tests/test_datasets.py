"""CIFAR as image folders, Tiny-ImageNet (both layouts) and Fashion-MNIST
(IDX), each written here in its real on-disk format."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from freeadv_fast.config import ConfigError, build_config
from freeadv_fast.data import cifar, fashion_mnist, tiny_imagenet
from freeadv_fast.data.datasets import build_data, subset_indices
from freeadv_fast.data.errors import DataError
from freeadv_fast.data.folder import dali_available

LOADERS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")),
           "torch"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_folders(root, per_class=(3, 2), grey=()):
    """Lossless PNGs in train/<class>/ and test/<class>/; returns {path: pixels (3 x 32 x 32)}."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in zip(("train", "test"), per_class):
        for c in reversed(CIFAR_CLASSES):  # written out of order: labels must follow sorted names
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                path = root / split / c / f"{i:04d}.png"
                if (split, c, i) in grey:
                    g = rng.integers(0, 256, (32, 32), dtype=np.uint8)
                    Image.fromarray(g, "L").save(path)
                    pixels[str(path)] = np.stack([g] * 3)
                else:
                    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(a).save(path)
                    pixels[str(path)] = a.transpose(2, 0, 1)
    return pixels


def test_cifar_image_folders_decode_exactly_with_sorted_class_labels(tmp_path):
    pixels = write_cifar_folders(tmp_path, grey={("train", "cat", 1)})
    x, y, classes = cifar.load_cifar(tmp_path, "cifar10", train=True)
    assert classes == CIFAR_CLASSES and x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [i // 3 for i in range(30)]
    expected = [pixels[str(tmp_path / "train" / c / f"{i:04d}.png")] for c in CIFAR_CLASSES for i in range(3)]
    assert np.array_equal(x.numpy(), np.stack(expected))  # greyscale PNG -> three equal channels
    xt, yt, _ = cifar.load_cifar(tmp_path, "cifar10", train=False)
    assert len(xt) == 20 and yt.bincount().tolist() == [2] * 10
    data = build_data(build_config(dataset="cifar10", flags=dict(data=str(tmp_path), batch_size=10)))
    assert data.num_classes == 10 and sum(len(yb) for _, yb in data.train) == 30


def test_cifar_image_folder_mistakes_are_named(tmp_path):
    write_cifar_folders(tmp_path)
    with pytest.raises(DataError, match="100 class folders|has 100"):
        cifar.load_cifar(tmp_path, "cifar100", train=True)
    Image.new("RGB", (33, 32)).save(tmp_path / "train" / "dog" / "big.png")
    with pytest.raises(DataError, match=r"big.png: 33x32 pixels, expected 32x32"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    (tmp_path / "train" / "dog" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DataError, match="big.png: truncated PNG"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    (tmp_path / "train" / "dog" / "big.png").unlink()
    for f in (tmp_path / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "test").iterdir()):
        d.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(DataError, match="no test/ folder"):
        cifar.load_cifar(tmp_path, "cifar10", train=False)


def test_cifar_image_folders_scale_16_bit_greyscale_and_name_formats_torchvision_cannot_read(tmp_path):
    """Scaled as the image-folder loaders scale it (test_data.py); a BMP is
    refused by name as the data checker refuses it, not by the decoder."""
    write_cifar_folders(tmp_path)
    grey16 = tmp_path / "train" / "dog" / "0000.png"
    Image.fromarray(np.full((32, 32), 17038, np.uint16)).save(grey16)
    x, _, _ = cifar.load_cifar(tmp_path, "cifar10", train=True)
    assert x[5 * 3].unique().tolist() == [66]  # dog is class 5: round(17038 * 255 / 65535)
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "dog" / "x.bmp")
    with pytest.raises(DataError, match=r"x.bmp: unsupported format \(BMP; convert it to PNG or JPEG\)"):
        cifar.load_cifar(tmp_path, "cifar10", train=True)


def write_tiny(root, official: bool, wnids=("n03", "n01", "n02"), per_class=4, val_per_class=2, extra_val_class=None):
    """Tiny-ImageNet-like 64x64 JPEGs, in the ImageFolder or the official layout."""
    rng = np.random.default_rng(1)

    def image(path, grey=False):
        coarse = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
        (coarse.convert("L") if grey else coarse).save(path, quality=95)

    for w in wnids:
        d = root / "train" / w / ("images" if official else "")
        d.mkdir(parents=True)
        for i in range(per_class):
            image(d / f"{w}_{i}.JPEG", grey=(i == 0 and w == "n02"))
        if official:
            (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for k, w in enumerate(sorted(wnids) + ([extra_val_class] if extra_val_class else [])):
        for i in range(val_per_class):
            name = f"val_{k * val_per_class + i}.JPEG"
            if official:
                (root / "val" / "images").mkdir(parents=True, exist_ok=True)
                image(root / "val" / "images" / name)
                lines.append(f"{name}\t{w}\t0\t0\t63\t63")
            else:
                (root / "val" / w).mkdir(parents=True, exist_ok=True)
                image(root / "val" / w / name)
    if official:
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("official", [False, True], ids=["imagefolder", "official"])
def test_tiny_imagenet_layouts(tmp_path, official):
    write_tiny(tmp_path, official, extra_val_class="n09" if official else None)
    classes, train, val = tiny_imagenet.scan(tmp_path)
    assert classes == ["n01", "n02", "n03"] and len(train) == 12
    assert [label for _, label in train] == [0] * 4 + [1] * 4 + [2] * 4
    assert [label for _, label in val] == [0, 0, 1, 1, 2, 2]  # n09 is no training class: left out
    assert all(f"/{classes[label]}" in path or official for path, label in val)


ANNOTATION_MISTAKES = {  # a line appended to the official val_annotations.txt (six lines): what is said of it
    "duplicated": ("val_0.JPEG\tn01\t0\t0\t63\t63", ":7: val_0.JPEG is listed twice (also on line 1)"),
    "two-classes": ("val_0.JPEG\tn03\t0\t0\t63\t63", ":7: val_0.JPEG is labelled n03 here but n01 on line 1"),
    "leaves-val": ("../../train/n01/images/n01_0.JPEG\tn02", ":7: file name '../../train/n01/images/n01_0.JPEG' "
                   "points outside"),
    "absolute": ("{root}/train/n03/images/n03_0.JPEG\tn01", ":7: file name '{root}/train/n03/images/n03_0.JPEG' "
                 "points outside"),
    "no-name": ("\tn01", ":7: no file name before the tab"),
    "no-class": ("val_0.JPEG\t", ":7: no class (wnid) for 'val_0.JPEG'"),
}


@pytest.mark.parametrize("case", list(ANNOTATION_MISTAKES))
def test_tiny_imagenet_annotation_mistakes_are_named_by_line(tmp_path, case):
    """Accepted silently before: a duplicated line (the image counted twice),
    an image under two classes, a name reaching out of val/images (a
    training image evaluated under a wrong label)."""
    write_tiny(tmp_path, official=True)
    line, said = (text.format(root=tmp_path) for text in ANNOTATION_MISTAKES[case])
    annotations = tmp_path / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + line + "\n")
    with pytest.raises(DataError) as refused:
        tiny_imagenet.scan(tmp_path)
    assert str(refused.value).startswith(f"{annotations}{said}"), str(refused.value)
    assert "\n" not in str(refused.value)


def test_tiny_imagenet_annotations_with_a_byte_order_mark_and_crlf_are_read(tmp_path):
    write_tiny(tmp_path, official=True)
    annotations = tmp_path / "val" / "val_annotations.txt"
    annotations.write_bytes(b"\xef\xbb\xbf" + annotations.read_text().replace("\n", "\r\n").encode())
    _, _, val = tiny_imagenet.scan(tmp_path)
    assert [(p.rsplit("/", 1)[1], label) for p, label in val] == [(f"val_{i}.JPEG", i // 2) for i in range(6)]


def test_tiny_imagenet_val_folders_that_differ_are_named(tmp_path):
    write_tiny(tmp_path, official=False)
    (tmp_path / "val" / "n02").rename(tmp_path / "val" / "n07")
    with pytest.raises(DataError, match="val: its class folders differ from .*train's: it lacks n02; it has n07"):
        tiny_imagenet.scan(tmp_path)


def test_data_check_reads_tiny_imagenet_annotations_as_training_does(tmp_path, capsys):
    from freeadv_fast.data.__main__ import main
    write_tiny(tmp_path, official=True)
    (tmp_path / "test" / "images").mkdir(parents=True)  # the archive's unlabelled test split
    Image.new("RGB", (64, 64)).save(tmp_path / "test" / "images" / "test_0.JPEG")
    assert main(["check", str(tmp_path), "--workers", "1"]) == 0, capsys.readouterr()
    assert "6 images annotated in val_annotations.txt" in capsys.readouterr().out
    annotations = tmp_path / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn02\n")
    assert main(["check", str(tmp_path), "--workers", "1"]) == 2
    assert capsys.readouterr().err == f"error: {annotations}:7: val_0.JPEG is labelled n02 here but n01 on line 1\n"


@pytest.mark.parametrize("loader", LOADERS)
def test_tiny_imagenet_batches_are_padded_crops_and_flips_of_the_photos(tmp_path, loader):
    write_tiny(tmp_path, official=True)
    cfg = build_config(dataset="tiny-imagenet", flags=dict(data=str(tmp_path), batch_size=6, loader=loader,
                                                           workers=1))
    data = build_data(cfg)
    assert (data.num_classes, data.image_size, data.in_channels) == (3, 64, 3)
    val = torch.cat([x for x, _ in data.val])
    decoded = {}
    for (path, _), image in zip(data.val.samples, val):
        decoded[path] = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert (image.int() - decoded[path].int()).abs().max() <= 1  # native size: no resampling
    train = list(data.train)
    assert [x.shape for x, _ in train] == [(6, 3, 64, 64)] * 2
    originals = {path: torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
                 for path, _ in data.train.samples}
    pad = 4
    for x, y in train:
        for image, label in zip(x, y):
            candidates = [o for (p, lab), o in zip(data.train.samples, originals.values()) if lab == label]
            found = False
            for o in candidates:
                padded = torch.nn.functional.pad(o, (pad, pad, pad, pad))
                for dy in range(2 * pad + 1):
                    for dx in range(2 * pad + 1):
                        crop = padded[:, dy:dy + 64, dx:dx + 64]
                        if any((image.int() - c.int()).abs().max() <= 1 for c in (crop, crop.flip(2))):
                            found = True
                            break
                    if found:
                        break
                if found:
                    break
            assert found, "a training image is no padded crop (or its mirror) of a photo of its class"


def write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_idx_files(tmp_path, compress):
    rng = np.random.default_rng(2)
    images = {True: rng.integers(0, 256, (30, 28, 28)), False: rng.integers(0, 256, (10, 28, 28))}
    labels = {True: np.arange(30) % 10, False: np.arange(10)[::-1]}
    for train, (fi, fl) in fashion_mnist.FILES.items():
        write_idx(tmp_path / fi, images[train], compress)
        write_idx(tmp_path / fl, labels[train], compress)
    x, y = fashion_mnist.load_fashion_mnist(tmp_path, train=True)
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.uint8 and np.array_equal(x[:, 0].numpy(), images[True])
    assert y.tolist() == labels[True].tolist()
    data = build_data(build_config(dataset="fashion-mnist", flags=dict(data=str(tmp_path), batch_size=8)))
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    from freeadv_fast.data.datasets import held_out_order
    val = torch.cat([yb for _, yb in data.val])
    assert val.tolist() == labels[False][held_out_order(10).numpy()].tolist()  # every test image, once
    from freeadv_fast.data.__main__ import main as data_main  # the checker reads what training reads
    assert data_main(["check", str(tmp_path)]) == 0


def test_fashion_mnist_mistakes_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist(None)
    with pytest.raises(DataError, match="no Fashion-MNIST here"):
        fashion_mnist.load_fashion_mnist(tmp_path)
    fi, fl = fashion_mnist.FILES[True]
    write_idx(tmp_path / fi, np.zeros((3, 28, 28)), False)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*missing"):
        fashion_mnist.load_fashion_mnist(tmp_path)
    write_idx(tmp_path / fl, np.zeros(4), False)
    with pytest.raises(DataError, match="4 labels for 3 images"):
        fashion_mnist.load_fashion_mnist(tmp_path)
    path = tmp_path / fi
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist.load_fashion_mnist(tmp_path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(DataError, match="not an IDX file"):
        fashion_mnist.load_fashion_mnist(tmp_path)


def test_fashion_mnist_shapes_directories_and_overflowing_headers_are_named(tmp_path):
    fi, fl = fashion_mnist.FILES[True]
    write_idx(tmp_path / fi, np.zeros((12, 28, 28)), False)
    write_idx(tmp_path / fl, np.zeros((12, 1)), False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: holds an array of shape 12 x 1, expected one label "
                                        r"per image \(12\)"):
        fashion_mnist.load_fashion_mnist(tmp_path)
    write_idx(tmp_path / fl, np.zeros(12), False)
    write_idx(tmp_path / fi, np.zeros(12 * 784), False)
    with pytest.raises(DataError, match="holds an array of shape 9408, expected N images of 28 x 28"):
        fashion_mnist.load_fashion_mnist(tmp_path)
    (tmp_path / fi).write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**31) + bytes(16))
    with pytest.raises(DataError) as refused:
        fashion_mnist.load_fashion_mnist(tmp_path)
    assert str(refused.value).endswith("truncated or padded (16 bytes of data, its header says 4294967295 x "
                                       "4294967295 x 2147483648)")
    write_idx(tmp_path / fi, np.zeros((12, 28, 28)), False)
    (tmp_path / fashion_mnist.FILES[False][0]).mkdir()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: a directory, not an IDX file"):
        fashion_mnist.load_fashion_mnist(tmp_path, train=False)


def test_train_subset_is_fixed_by_the_seed_and_checked(tmp_path):
    write_cifar_folders(tmp_path, per_class=(5, 1))
    flags = dict(data=str(tmp_path), batch_size=5, train_subset=20)
    a, b = (build_data(build_config(dataset="cifar10", flags=flags)) for _ in range(2))
    assert a.train.num_samples == 20 and torch.equal(a.train.x, b.train.x)
    other = build_data(build_config(dataset="cifar10", flags={**flags, "seed": 1}))
    assert not torch.equal(a.train.x, other.train.x)
    # the images of the subset of the whole split, and image files outside it are never decoded
    x, y, _ = cifar.load_cifar(tmp_path, "cifar10", train=True)
    keep = subset_indices(len(y), 20, 0)
    assert torch.equal(a.train.x, x[keep]) and torch.equal(a.train.y, y[keep])
    files = sorted((tmp_path / "train").rglob("*.png"))  # the scan's order: classes, then files, by name
    outside = files[min(set(range(len(files))) - set(keep.tolist()))]
    outside.write_bytes(b"not an image")
    assert torch.equal(build_data(build_config(dataset="cifar10", flags=flags)).train.x, a.train.x)
    with pytest.raises(DataError, match=outside.name):
        cifar.load_cifar(tmp_path, "cifar10", train=True)
    with pytest.raises(ConfigError, match="train-subset"):
        build_config(dataset="cifar10", flags={**flags, "train_subset": -1})


def test_a_train_subset_larger_than_the_split_says_it_trains_on_all(tmp_path, capsys):
    write_cifar_folders(tmp_path, per_class=(2, 1))
    data = build_data(build_config(dataset="cifar10", flags=dict(data=str(tmp_path), batch_size=5,
                                                                 train_subset=1000)))
    assert data.train.num_samples == 20
    assert "--train-subset 1000 is more than the 20 images of the training split" in capsys.readouterr().err


def test_a_held_out_prefix_samples_every_class_of_a_class_sorted_split(tmp_path):
    """Image-folder test splits are sorted by class; an evaluation limited to
    N images must still see all of them, not the first class or two."""
    write_cifar_folders(tmp_path, per_class=(1, 20))
    data = build_data(build_config(dataset="cifar10", flags=dict(data=str(tmp_path), batch_size=10)))
    first = next(iter(data.val))[1]
    assert len(set(first.tolist())) >= 5
    assert sorted(torch.cat([yb for _, yb in data.val]).tolist()) == sorted(list(range(10)) * 20)
    write_tiny(tmp_path / "tiny", official=False, val_per_class=10)
    data = build_data(build_config(dataset="tiny-imagenet", flags=dict(data=str(tmp_path / "tiny"), batch_size=6,
                                                                       loader="torch", workers=0)))
    assert len(set(next(iter(data.val))[1].tolist())) == 3

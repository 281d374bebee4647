"""The loaders and the paper's central claim on the real shared datasets
(../shared/datasets: CIFAR-10 as JPEG q75, 20 classes of Tiny-ImageNet;
Debian's dataset-fashion-mnist). Each test skips, saying why, where its data
is absent: nothing in the package depends on these files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freeadv_fast.config import build_config
from freeadv_fast.data import cifar, fashion_mnist, tiny_imagenet
from freeadv_fast.data.datasets import build_data
from freeadv_fast.data.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_jpeg_copy_loads_whole_with_torchvision_labels(cifar10_jpeg):
    from torchvision.datasets import ImageFolder
    x, y, classes = cifar.load_cifar(cifar10_jpeg, "cifar10", train=True)
    assert classes == CIFAR_CLASSES == ImageFolder(str(cifar10_jpeg / "test")).classes
    assert x.shape == (50_000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [5000] * 10
    xt, yt, _ = cifar.load_cifar(cifar10_jpeg, "cifar10", train=False)
    assert xt.shape == (10_000, 3, 32, 32) and yt.bincount().tolist() == [1000] * 10
    # a file and its row agree; the per-channel means are CIFAR-10's (0.491, 0.482, 0.447)
    first_cat = sorted((cifar10_jpeg / "train" / "cat").iterdir())[0]
    row = x[(y == 3).nonzero()[0, 0]]
    assert np.array_equal(row.permute(1, 2, 0).numpy(), np.asarray(Image.open(first_cat).convert("RGB")))
    means = x[::10].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor(cifar.MEAN_STD["cifar10"][0]), atol=0.01)


def test_tiny_imagenet_20_loads_with_greyscale_photos_as_rgb(tiny_imagenet_20):
    classes, train, val = tiny_imagenet.scan(tiny_imagenet_20)
    assert len(classes) == 20 and classes == sorted(classes)
    assert np.bincount([label for _, label in train]).tolist() == [500] * 20
    assert np.bincount([label for _, label in val]).tolist() == [50] * 20
    grey = next(p for p, _ in val if Image.open(p).mode == "L")
    cfg = build_config(dataset="tiny-imagenet", flags=dict(data=str(tiny_imagenet_20), batch_size=100,
                                                           loader="torch", workers=1))
    data = build_data(cfg)
    index = [p for p, _ in data.val.samples].index(grey)
    for b, (x, y) in enumerate(data.val):
        if b == index // 100:
            image = x[index % 100]
            break
    assert image.shape == (3, 64, 64) and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert np.array_equal(image[0].numpy(), np.asarray(Image.open(grey)))
    x, y = next(iter(data.train))
    assert x.shape == (100, 3, 64, 64) and x.dtype == torch.uint8 and y.max() < 20


def test_fashion_mnist_from_the_debian_package():
    try:
        root = fashion_mnist.find_root(None)
    except DataError as exc:
        pytest.skip(str(exc))
    x, y = fashion_mnist.load_fashion_mnist(root, train=True)
    assert x.shape == (60_000, 1, 28, 28) and y.bincount().tolist() == [6000] * 10
    xt, yt = fashion_mnist.load_fashion_mnist(root, train=False)
    assert xt.shape == (10_000, 1, 28, 28) and yt.bincount().tolist() == [1000] * 10
    assert abs(x.float().mean().item() / 255 - fashion_mnist.MEAN[0]) < 0.005


def test_free_training_on_real_cifar10_beats_natural_under_attack(cifar10_jpeg, tmp_path):
    """A short real-data run of bench/compare.py: free-8 against natural training
    at --quick's fast-at recipe (800 CIFAR-10 images, 128 optimizer steps of
    natural training, 3 passes of free-8 at Fast-AT's LR scaled to the batch),
    PGD-10 on 1,000 held-out images. The same rows as CI's whole --quick run, so
    the README's test command checks the claim on real data by itself."""
    out = tmp_path / "cmp"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--data", str(cifar10_jpeg),
                          "--quick", "--methods", "natural,free", "--restarts", "1",
                          "--json", str(out / "compare.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["compare"]}
    natural, free = rows["natural"]["eval"], rows["free"]["eval"]
    assert free["pgd-10_ci95"][0] > natural["pgd-10_ci95"][1], (natural, free)  # CIs apart
    assert free["clean_top1_ci95"][0] > 0.1  # and it learnt the task: above chance (10%)
    assert (out / "compare.png").stat().st_size > 1000 and "| free-8 |" in (out / "compare.md").read_text()

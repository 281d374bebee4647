"""A registry of the architectures the paper and its baselines use."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..common import check_int, register as add

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        return add(ARCHITECTURES, name, fn, "architecture")
    return deco


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r:.80}: choose one of {', '.join(sorted(ARCHITECTURES))}")
    check_int("num_classes", num_classes, 1)
    check_int("in_channels", in_channels, 1)
    return ARCHITECTURES[name](num_classes=num_classes, in_channels=in_channels)


def _torchvision_resnet(name, num_classes, in_channels):
    import torchvision.models
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


@register("resnet50")
def resnet50(num_classes=1000, in_channels=3):
    """torchvision's ResNet-50 (the paper's ImageNet model)."""
    return _torchvision_resnet("resnet50", num_classes, in_channels)


@register("resnet18")
def resnet18(num_classes=1000, in_channels=3):
    return _torchvision_resnet("resnet18", num_classes, in_channels)


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride, dropout=0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet: a 3x3 stem, no stem pooling."""

    def __init__(self, widths, blocks, strides, num_classes, in_channels=3, stem=None):
        super().__init__()
        stem = stem or widths[0]
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        layers, cin = [], stem
        for width, n, stride in zip(widths, blocks, strides):
            for i in range(n):
                layers.append(PreActBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


@register("preact_resnet18")
def preact_resnet18(num_classes=10, in_channels=3):
    """PreActResNet-18, the model of Wong et al.'s fast CIFAR recipe."""
    return PreActResNet([64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2], num_classes, in_channels)


@register("wide_resnet32_10")
def wide_resnet32_10(num_classes=10, in_channels=3):
    """WRN-32-10 of Madry et al.'s CIFAR code (used by the paper): 3 stages of
    5 pre-activation blocks, widths 160/320/640, a 16-channel stem."""
    return PreActResNet([160, 320, 640], [5, 5, 5], [1, 2, 2], num_classes, in_channels, stem=16)


@register("small_cnn")
def small_cnn(num_classes=10, in_channels=1):
    """A small CNN for tiny images (the embedded digits default)."""
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))


@register("small_cnn_bn")
def small_cnn_bn(num_classes=10, in_channels=3):
    """Four 3x3 conv + batch-norm layers (16-32-64-128 channels, pooling after
    the last three): trains in minutes on a CPU, for quick comparisons."""
    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])
    return nn.Sequential(*block(in_channels, 16, False), *block(16, 32, True), *block(32, 64, True),
                         *block(64, 128, True), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

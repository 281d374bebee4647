"""Small models and datasets shared by the engine tests (and their worker processes)."""
import torch
import torch.nn as nn

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
EPS, STEP = 8 / 255, 4 / 255


def small_cnn(batchnorm=True, dropout=0.0, classes=5, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, classes))
    return nn.Sequential(*layers)


def toy_data(n=21, size=8, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    x[:, :, 0, :] = 0  # pixels at the range ends, where the clamp masks the gradient
    x[:, :, -1, :] = 255
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def sgd(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


class _StatedClamp(torch.autograd.Function):
    """clamp(a, lo, hi) whose gradient mask is stated, not whatever the
    installed torch gives (inclusive bounds up to 2026, strict since)."""

    @staticmethod
    def forward(ctx, a, lo, hi, inclusive):
        ctx.save_for_backward(a)
        ctx.bounds = lo, hi, inclusive
        return a.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        lo, hi, inclusive = ctx.bounds
        inside = (a >= lo) & (a <= hi) if inclusive else (a > lo) & (a < hi)
        return grad * inside, None, None, None


def clamp_with_mask(a, lo, hi, mask):
    """``mask``: "inclusive" (the paper's code as it ran on torch 1.x) or "strict"."""
    return _StatedClamp.apply(a, lo, hi, mask == "inclusive")

"""Facts and small helpers every layer shares (it imports torch only):
precisions and their autocast, compile modes, the per-stream seed formula,
per-channel constants and the pixel-range check."""
from __future__ import annotations

import math
import numbers
from contextlib import nullcontext

import torch

# precision name -> autocast dtype (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inductor's own CUDA graphs ("reduce-overhead") would capture inside ours: offered are modes without them
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_precision(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device, precision: str, *, cache_enabled: bool = True):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = check_precision(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


def stream_seed(seed: int, epoch: int, rank: int | None = None, batch: int | None = None) -> int:
    """The seed of one random stream: a pass's shuffle (``rank`` None: the same
    on every rank), one rank's augmentation of a pass, or (``batch``) the
    stream of one batch of a rank's pass. Only these numbers decide it, so a
    resumed run draws what the uninterrupted one did."""
    base = seed * 1_000_003 + epoch
    if rank is None:
        return base
    return base * 1009 + (rank if batch is None else rank * 101 + batch)


def register(table: dict, name: str, item, what: str):
    """Adds ``item`` to a registry under ``name``; another item under a taken
    name is refused (registering the same one again is harmless)."""
    if table.get(name, item) is not item:
        raise ValueError(f"a {what} named {name!r} is registered already")
    table[name] = item
    return item


def check_pixel_range(pixel_range) -> tuple[float, float]:
    if torch.compiler.is_compiling() and isinstance(pixel_range, tuple) and len(pixel_range) == 2:
        return pixel_range  # numbers a dynamic=True trace makes symbolic (math.isfinite breaks the graph)
    if not (isinstance(pixel_range, (tuple, list)) and len(pixel_range) == 2
            and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in pixel_range)):
        raise ValueError(f"pixel_range must be two finite numbers (lo, hi), got {pixel_range!r:.80}")
    lo, hi = (float(v) for v in pixel_range)
    if not lo < hi:
        raise ValueError(f"pixel_range must be (lo, hi) with lo < hi, got {tuple(pixel_range)}")
    return lo, hi


def check_int(name: str, value, low: int):
    """An integer argument (not a bool, not a float) of at least ``low``, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_uint8_range(x, pixel_range: tuple[float, float]):
    """uint8 images are read as x / 255, so their pixel range is (0, 1): with
    another, epsilon, the step and mean/std in its units would be misread."""
    if x.dtype == torch.uint8 and pixel_range != (0.0, 1.0):
        raise ValueError(f"uint8 images are read as x / 255, pixels in [0, 1], but pixel_range is "
                         f"{tuple(pixel_range)}: give pixel_range=(0, 1) (step_size, epsilon and mean/std in its "
                         "units), or float images in that range")


def check_batch(x, y, pixel_range, *, pixel_check=True):
    """Images and labels a step or an attack would misread, refused by name:
    tensors, one class index per image, and (``pixel_check``, one sync)
    floating-point pixels inside the pixel range: 0..255 floats would be
    clamped to constant images."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"a batch is (x, y) tensors, got ({type(x).__name__}, {type(y).__name__})")
    if y.dim() == 0:  # a Dataset where a DataLoader belongs: its items are single images
        raise ValueError(f"a batch holds N images and N labels; got x of shape {tuple(x.shape)} and one label: single "
                         "images, e.g. a Dataset given where batches belong (wrap it in a DataLoader)")
    if y.dim() != 1 or len(y) != len(x) or y.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"y must be one class index per image (int64, shape ({len(x)},)), got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):  # refused before a step's state changes
        raise TypeError(f"x must be uint8 or floating-point images, got {x.dtype}")
    check_uint8_range(x, check_pixel_range(pixel_range))
    if pixel_check and x.is_floating_point() and x.numel():
        lo, hi = check_pixel_range(pixel_range)
        low, high = x.aminmax()
        if low < lo or high > hi:
            raise ValueError(f"x holds values in [{low:g}, {high:g}], outside the pixel range [{lo:g}, {hi:g}] "
                             "(uint8 images, or floats scaled to the range)")

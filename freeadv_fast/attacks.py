"""White-box L-inf attacks for evaluating robustness: batched PGD with
restarts (cross-entropy or CW margin loss), FGSM, and clean accuracy.

The model takes normalized input; examples live in pixel space. Every step
is the fused "project" update: ``delta = clip(delta + step * sign(g), -eps,
eps)`` kept so that ``x + delta`` stays in the pixel range, and the next
normalized input is written in the same pass. The caller puts the model in
eval mode.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from . import ops
from .common import autocast, check_batch, check_int, check_pixel_range
from .data.errors import DataError
from .ops import reference

LOSSES = ("ce", "cw")


def margin_loss(logits, y):
    """CW margin: the largest other logit minus the true one (> 0 means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return other.amax(1) - true


def check_labels(y, classes: int):
    """Class indices outside the model's ``classes`` logits, refused by name
    (one read of ``y``: a sync where it is on a device). Cross-entropy would
    raise an IndexError on the CPU and a device-side assert on a GPU, and an
    accuracy would count them as wrong. A DataError (a ValueError): the
    commands say it in one line."""
    if y.numel():
        low, high = torch.stack(y.aminmax()).tolist()
        if low < 0 or high >= classes:
            raise DataError(f"y holds class indices from {low} to {high}, but the model gives {classes} logits "
                            f"per image (classes 0 to {classes - 1})")


def check_model_output(logits, n: int) -> int:
    """The number of classes of a model's output for ``n`` images, refused by
    name unless it is a tensor of shape (n, classes) with classes >= 2; a
    single logit would make cross-entropy 0 whatever the image."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        raise ValueError(f"the model must return logits of shape (images, classes); for {n} images it returned "
                         f"{got}")
    if logits.shape[1] < 2:  # a dataset of one class, for the commands
        raise DataError(f"the model gives only {logits.shape[1]} logit(s) per image: classification needs 2 or more "
                        "classes")
    return logits.shape[1]


def check_pixels_finite(x):
    """NaN pixels, which the pixel-range check lets through (NaN compares
    false both ways) and which make every loss and logit NaN (one sync)."""
    if x.is_floating_point() and x.isnan().any():
        raise ValueError("x holds NaN pixels")


def _check_images(x, y, pixel_range):
    if isinstance(x, torch.Tensor) and x.dim() < 2:  # else the labels' count is what check_batch would name
        raise ValueError(f"x must be a batch of images (N, C, ...), got shape {tuple(x.shape)}")
    check_batch(x, y, pixel_range)
    check_pixels_finite(x)


def _checked_logits(logits, y):
    check_labels(y, check_model_output(logits, len(y)))
    return logits


def per_sample_loss(logits, y, loss):
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return margin_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}: choose one of {', '.join(LOSSES)}")


def check_mean(mean, pixel_range):
    """A mean outside the pixel range: 0-255 values given for pixels in [0, 1],
    which would train or attack on inputs of about -2 without a word (a
    tensor is read once, check_values)."""
    lo, hi = pixel_range
    values = ops.check_values(mean, "mean", signed=True) or ()
    if any(not lo <= m <= hi for m in values):
        shown = mean if not isinstance(mean, torch.Tensor) else tuple(round(m, 4) for m in values)
        raise ValueError(f"mean {shown} lies outside the pixel range [{lo:g}, {hi:g}]: mean and std are in pixel "
                         "units (e.g. (0.4914, 0.4822, 0.4465) for CIFAR-10, not 0-255 values)")


def logits_of(model, x, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32", delta=None, backend="auto"):
    """The model's logits for pixel-space ``x`` (+ ``delta``), without gradients."""
    check_mean(mean, check_pixel_range(pixel_range))
    if delta is None:
        delta = torch.zeros(x.shape, device=x.device)
    with torch.no_grad(), autocast(x.device, precision):
        inp = ops.make_input(x, delta, mean=mean, std=std, pixel_range=pixel_range, mode="project", backend=backend)
        return model(inp).float()


def check_width(name, value, pixel_range):
    """A perturbation size beyond the pixel range's width: a unit mistake (8
    meaning 8/255) that would let any image through. ``value`` is checked
    (finite, non-negative; a tensor is read once, check_values) and its values returned."""
    values = ops.check_values(value, name)
    width = pixel_range[1] - pixel_range[0]
    if values is not None and values and max(values) > width:
        shown = value if not isinstance(value, torch.Tensor) else max(values)
        raise ValueError(f"{name} {shown} is more than the pixel range's width {width:g}: give it in the units "
                         f"of the pixel range (8/255 = {8 / 255:.4f} for 8 of 255 on [0, 1])")
    return values


def check_budget(epsilon, step_size, steps: int, channels: int, pixel_range):
    """Numbers that would make an attack a no-op or a unit mistake are refused
    (a tensor is read: an attack synchronises anyway)."""
    values = {}
    for name, v in (("epsilon", epsilon), ("step_size", step_size)):
        ops.channel_param(v, name, channels, "cpu")  # the count of values
        values[name] = check_width(name, v, pixel_range) or [1.0]
    if steps and max(values["epsilon"]) > 0 and min(values["step_size"]) == 0:
        raise ValueError("step_size 0 with epsilon > 0: the attack would never move from its start, and its "
                         "accuracy would be clean accuracy (or the random start's)")


@torch.enable_grad()  # an attack inside a caller's torch.no_grad() still needs its input gradients
def pgd(model, x, y, *, epsilon, step_size, steps, restarts=1, random_start=True, loss="ce", mean, std,
        pixel_range=(0.0, 1.0), precision="fp32", generator=None, backend="auto") -> torch.Tensor:
    """Projected gradient descent (Madry et al.); returns the adversarial
    examples in float32 pixel units, within ``epsilon`` of ``x`` (L-inf) and
    inside ``pixel_range``.

    With ``restarts`` > 1 each sample keeps its worst case: a misclassified
    example if any restart found one, else the one with the highest loss.
    Samples already misclassified are not attacked again (which changes no
    result); the r-th restart's random start is the same whatever the total
    number of restarts. The model runs in the mode it is in: in training
    mode (as PGD training attacks) BatchNorm uses the batch's statistics and
    moves its running ones; evaluate() and correct() use eval mode.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("pgd needs input gradients: it was called inside torch.inference_mode()")
    check_int("steps", steps, 0)
    check_int("restarts", restarts, 1)
    _check_images(x, y, pixel_range)
    check_budget(epsilon, step_size, steps, x.shape[1], pixel_range)
    check_mean(mean, check_pixel_range(pixel_range))
    x, y = x.detach(), y.detach().long()  # uint8 labels are accepted; gather (the CW margin) takes int64 alone
    kw = dict(mean=mean, std=std, pixel_range=pixel_range, backend=backend)
    best_delta = torch.zeros(x.shape, device=x.device)
    best_loss = torch.full((len(x),), -math.inf, device=x.device)
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for restart in range(restarts):
        todo = (~fooled).nonzero().squeeze(1)
        # the starting noise is drawn for the whole batch, so restart r starts the same in any run
        delta_all = torch.zeros(x.shape, device=x.device)
        if random_start:
            ops.random_init_(delta_all, x, epsilon=epsilon, pixel_range=pixel_range, mode="project",
                             generator=generator, backend=backend)
        if len(todo) == 0:
            continue
        xs, ys = x[todo], y[todo]
        delta = delta_all[todo]
        inp = ops.make_input(xs, delta, mode="project", **kw)
        for step in range(steps):
            inp.requires_grad_(True)
            with autocast(x.device, precision):
                logits = model(inp)
            if restart == step == 0:  # once: the labels against the classes (a sync)
                _checked_logits(logits, ys)
            objective = per_sample_loss(logits, ys, loss).sum()
            if precision == "fp16":
                objective = objective * 1024.0  # keeps fp16 input gradients from underflowing to 0 (sign only)
            (grad,) = torch.autograd.grad(objective, inp)
            inp = ops.update_and_make_input_(delta, grad, xs, step_size=step_size, epsilon=epsilon, mode="project",
                                             **kw)
        logits = logits_of(model, xs, delta=delta, precision=precision, **kw)
        if restart == 0 and not steps:
            _checked_logits(logits, ys)
        now_loss = per_sample_loss(logits, ys, loss)
        now_fooled = logits.argmax(1) != ys
        better = now_fooled | (now_loss > best_loss[todo])
        idx = todo[better]
        best_delta[idx] = delta[better]
        best_loss[idx] = now_loss[better]
        fooled[idx] = now_fooled[better]
    return reference.pixels(x) + best_delta


def fgsm(model, x, y, *, epsilon, mean, std, pixel_range=(0.0, 1.0), precision="fp32", backend="auto"):
    """One signed-gradient step of size epsilon from x (Goodfellow et al.)."""
    return pgd(model, x, y, epsilon=epsilon, step_size=epsilon, steps=1, random_start=False, mean=mean, std=std,
               pixel_range=pixel_range, precision=precision, backend=backend)


@contextlib.contextmanager
def eval_mode(model):
    """``model`` with every module in eval mode, each put back as it was:
    in training mode BatchNorm would judge images by the batch's statistics
    and move its running ones."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def correct(model, x, y, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32", topk=(1,), backend="auto"):
    """Per-sample booleans: is y among the model's top-k predictions, for each k
    (k larger than the number of classes counts every class); the model is
    asked in eval mode (eval_mode)."""
    if not (isinstance(topk, (tuple, list)) and topk and all(type(k) is int and k >= 1 for k in topk)):
        raise ValueError(f"topk must be a non-empty sequence of integers >= 1, got {topk!r:.80}")
    _check_images(x, y, pixel_range)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with eval_mode(model):
        logits = logits_of(model, x, mean=mean, std=std, pixel_range=pixel_range, precision=precision,
                           backend=backend)
    logits = _checked_logits(logits, y)
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    hits = top == y[:, None]
    return {k: hits[:, :k].any(1) for k in topk}


def clean_accuracy(model, x, y, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32", batch_size=256,
                   backend="auto") -> float:
    """Top-1 accuracy on clean inputs, as a fraction."""
    check_int("batch_size", batch_size, 1)
    check_batch(x, y, pixel_range, pixel_check=False)  # each slice's pixels are checked by correct
    if not len(x):
        raise ValueError("x holds no image: an accuracy of nothing")
    hits = 0
    for i in range(0, len(x), batch_size):
        hits += int(correct(model, x[i:i + batch_size], y[i:i + batch_size], mean=mean, std=std,
                            pixel_range=pixel_range, precision=precision, backend=backend)[1].sum())
    return hits / len(x)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))

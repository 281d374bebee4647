"""White-box L-inf attacks for evaluating robustness: batched PGD with
restarts (cross-entropy or CW margin loss), FGSM, and clean accuracy.

The model takes normalized input; examples live in pixel space. Every step
is the fused "project" update: ``delta = clip(delta + step * sign(g), -eps,
eps)`` kept so that ``x + delta`` stays in the pixel range, and the next
normalized input is written in the same pass. The caller puts the model in
eval mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops
from .common import autocast, check_batch, check_int
from .ops import reference

LOSSES = ("ce", "cw")


def margin_loss(logits, y):
    """CW margin: the largest other logit minus the true one (> 0 means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return other.amax(1) - true


def per_sample_loss(logits, y, loss):
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return margin_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}: choose one of {', '.join(LOSSES)}")


def logits_of(model, x, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32", delta=None, backend="auto"):
    """The model's logits for pixel-space ``x`` (+ ``delta``), without gradients."""
    if delta is None:
        delta = torch.zeros(x.shape, device=x.device)
    with torch.no_grad(), autocast(x.device, precision):
        inp = ops.make_input(x, delta, mean=mean, std=std, pixel_range=pixel_range, mode="project", backend=backend)
        return model(inp).float()


def check_budget(epsilon, step_size, steps: int, channels: int, pixel_range):
    """Numbers that would make an attack a no-op or a unit mistake are refused
    (tensors are taken as they are: reading them would synchronise)."""
    width = pixel_range[1] - pixel_range[0]
    values = {}
    for name, v in (("epsilon", epsilon), ("step_size", step_size)):
        if not isinstance(v, torch.Tensor):
            values[name] = ops.channel_param(v, name, channels, "cpu").tolist()
            if max(values[name]) > width:
                raise ValueError(f"{name} {v} is more than the pixel range's width {width:g}: give it in the units "
                                 f"of the pixel range (8/255 = {8 / 255:.4f} for 8 of 255 on [0, 1])")
    if steps and max(values.get("epsilon", [1.0])) > 0 and min(values.get("step_size", [1.0])) == 0:
        raise ValueError("step_size 0 with epsilon > 0: the attack would never move from its start, and its "
                         "accuracy would be clean accuracy (or the random start's)")


def pgd(model, x, y, *, epsilon, step_size, steps, restarts=1, random_start=True, loss="ce", mean, std,
        pixel_range=(0.0, 1.0), precision="fp32", generator=None, backend="auto") -> torch.Tensor:
    """Projected gradient descent (Madry et al.); returns the adversarial
    examples in float32 pixel units, within ``epsilon`` of ``x`` (L-inf) and
    inside ``pixel_range``.

    With ``restarts`` > 1 each sample keeps its worst case: a misclassified
    example if any restart found one, else the one with the highest loss.
    Samples already misclassified are not attacked again (which changes no
    result); the r-th restart's random start is the same whatever the total
    number of restarts.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}: choose one of {', '.join(LOSSES)}")
    check_int("steps", steps, 0)
    check_int("restarts", restarts, 1)
    check_batch(x, y, pixel_range)
    check_budget(epsilon, step_size, steps, x.shape[1], pixel_range)
    x, y = x.detach(), y.detach()
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
        for _ in range(steps):
            inp.requires_grad_(True)
            with autocast(x.device, precision):
                logits = model(inp)
            objective = per_sample_loss(logits, ys, loss).sum()
            if precision == "fp16":
                objective = objective * 1024.0  # keeps fp16 input gradients from underflowing to 0 (sign only)
            (grad,) = torch.autograd.grad(objective, inp)
            inp = ops.update_and_make_input_(delta, grad, xs, step_size=step_size, epsilon=epsilon, mode="project",
                                             **kw)
        logits = logits_of(model, xs, delta=delta, precision=precision, **kw)
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


def correct(model, x, y, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32", topk=(1,), backend="auto"):
    """Per-sample booleans: is y among the model's top-k predictions, for each k
    (k larger than the number of classes counts every class)."""
    logits = logits_of(model, x, mean=mean, std=std, pixel_range=pixel_range, precision=precision, backend=backend)
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    hits = top == y[:, None]
    return {k: hits[:, :k].any(1) for k in topk}


def clean_accuracy(model, x, y, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32", batch_size=256,
                   backend="auto") -> float:
    """Top-1 accuracy on clean inputs, as a fraction."""
    check_int("batch_size", batch_size, 1)
    hits = 0
    for i in range(0, len(x), batch_size):
        hits += int(correct(model, x[i:i + batch_size], y[i:i + batch_size], mean=mean, std=std,
                            pixel_range=pixel_range, precision=precision, backend=backend)[1].sum())
    return hits / max(1, len(x))


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

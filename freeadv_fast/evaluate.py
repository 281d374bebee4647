"""Clean and adversarial accuracy over a loader, summed across ranks, with
95% confidence intervals."""
from __future__ import annotations

import torch

from . import attacks, distributed
from .common import check_batch, check_int
from .data.datasets import take
from .data.errors import DataError


def pairs(batches, pixel_range=None):
    """The (x, y) batches of ``batches``, anything else named (a batch of
    images alone would be unpacked into its first two images); with
    ``pixel_range``, each batch checked by check_batch, its pixels unread."""
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of (x, y) batches, got {type(batches).__name__}") from None
    for batch in it:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"each batch must be an (x, y) pair, got {type(batch).__name__}"
                             + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        if pixel_range is not None:
            check_batch(*batch, pixel_range, pixel_check=False)
        yield batch


def attack_name(loss: str, steps: int, restarts: int = 1) -> str:
    name = f"{'pgd' if loss == 'ce' else 'cw'}-{steps}"
    return name + (f"x{restarts}" if restarts > 1 else "")


def non_finite_weight(model) -> str | None:
    """The name of a weight or buffer of ``model`` holding NaN or inf, or None."""
    return next((name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()),
                None)


class EvaluationStopped(Exception):
    """``should_stop()`` turned true between two batches of an evaluation."""


class NothingEvaluated(DataError):
    """Every rank's held-out batches together held no image (every rank raises it)."""


def evaluate(model, batches, *, mean, std, epsilon, step_size, steps=(10,), losses=("ce",), restarts=1, limit=0,
             precision="fp32", seed=0, progress=None, should_stop=None) -> dict:
    """{"samples", "clean_top1", "clean_top5", "<attack>": acc, "<metric>_ci": (lo, hi), ...}; accuracies
    are fractions. ``limit`` caps the samples per rank (0: all). The model is put in eval mode and back.
    ``should_stop()`` is asked between batches; when true, EvaluationStopped is raised (a stop request is
    answered within one batch's attacks, not at the end of a long evaluation)."""
    if not isinstance(steps, (tuple, list)) or not isinstance(losses, (tuple, list)):
        raise ValueError(f"steps must be integers >= 0 and losses a sequence of names, got {steps!r} and "
                         f"{losses!r}")
    for s in steps:
        check_int("steps", s, 0)
    check_int("limit", limit, 0)
    check_int("restarts", restarts, 1)
    check_int("seed", seed, 0)
    for name, hook in (("progress", progress), ("should_stop", should_stop)):
        if hook is not None and not callable(hook):  # it failed after the attacks of the first batch
            raise TypeError(f"{name} must be a function or None, got {type(hook).__name__}")
    if seed >= 2 ** 64:  # what torch.Generator takes
        raise ValueError(f"seed must be below 2**64, got {seed}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    net = distributed.unwrap(model)
    if next(net.parameters(), None) is None:
        raise ValueError("model has no parameters: nothing to evaluate")
    bad = non_finite_weight(net)  # one look before the work: argmax of NaN logits is class 0, a plausible accuracy
    if bad is not None:
        raise ValueError(f"the model holds non-finite weights (NaN or inf, in {bad}): its accuracies would mean "
                         "nothing")
    names = [(attack_name(loss, s, restarts), loss, s) for loss in losses for s in steps]
    device = next(net.parameters()).device
    counts = torch.zeros(3 + len(names), dtype=torch.float64, device=device)  # n, top1, top5, attacks...
    gen = torch.Generator(device).manual_seed(seed)
    with attacks.eval_mode(net):
        # checked before take() counts them: a Dataset's (image, label) items are named, not a len() of 0-d error
        for x, y in take(pairs(batches, pixel_range=(0.0, 1.0)), limit):
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            if len(y) == 0:  # this rank's shard of a last batch smaller than the ranks
                continue
            x, y = x.to(device), y.to(device)
            hits = attacks.correct(net, x, y, mean=mean, std=std, precision=precision, topk=(1, 5))
            row = [len(y), hits[1].sum(), hits[5].sum()]
            for _, loss, s in names:
                adv = attacks.pgd(net, x, y, epsilon=epsilon, step_size=step_size, steps=s, restarts=restarts,
                                  loss=loss, mean=mean, std=std, precision=precision, generator=gen)
                row.append(attacks.correct(net, adv, y, mean=mean, std=std, precision=precision)[1].sum())
            counts += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in row])
            if progress is not None:
                progress(len(y))
    totals = distributed.all_reduce_sum(counts).tolist()
    n = int(totals[0])
    if n == 0:
        raise NothingEvaluated("the held-out batches held no image (an empty split, or none of its images could be "
                               "decoded): nothing was evaluated")
    result = {"samples": n, "epsilon": epsilon, "step_size": step_size, "restarts": restarts}
    for key, hits in zip(["clean_top1", "clean_top5"] + [name for name, _, _ in names], totals[1:]):
        result[key] = hits / n
        result[key + "_ci95"] = list(attacks.wilson_interval(int(round(hits)), n))
    return result


"""Learning-rate schedules that count optimizer steps, and the paper's epoch convention.

Free-m replays each minibatch m times, so a pass over the data makes
m * batches optimizer steps. The paper keeps the number of gradient steps of
natural training: "E epochs" with m replays means ceil(E / m) passes over the
data. ``passes_for`` is the one place that conversion happens.

Every schedule is a ``torch.optim.lr_scheduler.LambdaLR``, stepped once per
optimizer step, whose factor is a pure module-level function of the step
count (bound with ``functools.partial``): its state_dict holds plain numbers
only, so it checkpoints with ``weights_only=True``, and the schedule's
parameters come from the run's configuration, never from the checkpoint.
"""
from __future__ import annotations

import bisect
import math
import numbers
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from .common import check_int

SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle")


def passes_for(epochs: float, replays: int) -> int:
    """Passes over the data that give ``epochs`` epochs' worth of gradient steps."""
    check_int("replays", replays, 1)
    if not (isinstance(epochs, numbers.Real) and math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a positive finite number, got {epochs!r}")
    return math.ceil(epochs / replays)


def official_step_passes(replays: int, every_epochs: int = 30) -> int:
    """The official ImageNet code divides the LR by 10 every ceil(30/m) passes."""
    return math.ceil(every_epochs / replays)


# -- factors of the base LR, pure functions of the optimizer-step count ------
def constant(step: int) -> float:
    return 1.0


def step_decay(step: int, *, every_steps: int, gamma: float = 0.1) -> float:
    """``gamma`` every ``every_steps`` optimizer steps (the official ImageNet
    schedule with every_steps = ceil(30/m) passes of steps)."""
    return gamma ** (step // every_steps)


def multistep_decay(step: int, *, milestones: tuple, gamma: float = 0.1) -> float:
    """``gamma`` at each milestone (in optimizer steps); the official CIFAR code
    divides by 10 at 40k and 60k of 80k steps."""
    return gamma ** sum(step >= m for m in milestones)


def cosine(step: int, *, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> float:
    """Cosine from 1 to ``final_factor`` over ``total_steps``, after
    ``warmup_steps`` of linear warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))


def one_cycle(step: int, *, total_steps: int, peak_fraction: float = 0.4) -> float:
    """Wong et al.'s cyclic schedule: linear from 0 up to 1 at ``peak_fraction``
    of the run, then linearly back to 0."""
    t = (step + 1) / total_steps  # the first step already trains, at a small LR
    if t <= peak_fraction:
        return t / peak_fraction
    return max(0.0, (1 - t) / (1 - peak_fraction))


def phase_scaled(step: int, *, factor, starts: tuple, scales: tuple) -> float:
    """``factor(step)`` times the LR scale of the phase (freeadv_fast/phases.py)
    that optimizer step belongs to; ``starts``: each phase's first step."""
    return factor(step) * scales[bisect.bisect_right(starts, step) - 1]


def build_schedule(name: str, optimizer, *, steps_per_pass: int, passes: int, replays: int = 1,
                   milestones=None, warmup_passes: float = 0.0, phase_starts=(), phase_scales=()) -> LambdaLR:
    """A schedule by name, with its lengths given in passes and converted to
    optimizer steps here (``steps_per_pass`` = batches per pass * replays).
    With phases (their first optimizer steps and LR scales), the factor is
    scaled by the phase of each step."""
    for arg, value in (("steps_per_pass", steps_per_pass), ("passes", passes), ("replays", replays)):
        check_int(arg, value, 1)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not (isinstance(warmup_passes, numbers.Real) and 0 <= warmup_passes < math.inf):
        raise ValueError(f"warmup_passes must be a finite number >= 0, got {warmup_passes!r}")
    total = steps_per_pass * passes
    if name == "constant":
        factor = constant
    elif name == "step":
        factor = partial(step_decay, every_steps=official_step_passes(replays) * steps_per_pass, gamma=0.1)
    elif name == "multistep":
        if not milestones:
            raise ValueError("the multistep schedule needs milestones (in optimizer steps)")
        try:
            steps = tuple(sorted(int(m) for m in milestones))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"milestones must be optimizer steps (integers), got {list(milestones)!r:.80}") from None
        factor = partial(multistep_decay, milestones=steps, gamma=0.1)
    elif name == "cosine":
        factor = partial(cosine, total_steps=total, warmup_steps=round(warmup_passes * steps_per_pass))
    elif name == "onecycle":
        factor = partial(one_cycle, total_steps=total)
    else:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if phase_starts:
        factor = partial(phase_scaled, factor=factor, starts=tuple(phase_starts), scales=tuple(phase_scales))
    schedule = LambdaLR(optimizer, factor)
    # plain numbers: an optimizer whose LR is a device tensor (CUDA graphs) is
    # then written with fill_, never read back to the host
    schedule.base_lrs = [float(b) for b in schedule.base_lrs]
    return schedule

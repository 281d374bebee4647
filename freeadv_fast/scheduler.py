"""Learning-rate schedules that count optimizer steps, and the paper's epoch convention.

Free-m replays each minibatch m times, so a pass over the data makes
m * batches optimizer steps. The paper keeps the number of gradient steps of
natural training: "E epochs" with m replays means ceil(E / m) passes over the
data. ``passes_for`` is the one place that conversion happens.

Every schedule here is a ``torch.optim.lr_scheduler.LRScheduler`` to be
stepped once per optimizer step; its state is plain numbers, so it checkpoints
with ``weights_only=True``.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle")


def passes_for(epochs: float, replays: int) -> int:
    """Passes over the data that give ``epochs`` epochs' worth of gradient steps."""
    if replays < 1:
        raise ValueError(f"replays must be >= 1, got {replays}")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    return math.ceil(epochs / replays)


def official_step_passes(replays: int, every_epochs: int = 30) -> int:
    """The official ImageNet code divides the LR by 10 every ceil(30/m) passes."""
    return math.ceil(every_epochs / replays)


class StepCountSchedule(LRScheduler):
    """LR = base_lr * factor(step), with ``factor`` a pure function of the
    optimizer-step count. Subclasses define ``factor``."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        super().__init__(optimizer, last_epoch)
        # plain numbers: an optimizer whose LR is a device tensor (CUDA graphs)
        # is then written with fill_, never read back to the host
        self.base_lrs = [float(b) for b in self.base_lrs]

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self):
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()


class Constant(StepCountSchedule):
    def factor(self, step):
        return 1.0


class StepDecay(StepCountSchedule):
    """Multiply by ``gamma`` every ``every_steps`` optimizer steps (the official
    ImageNet schedule with every_steps = ceil(30/m) passes of steps)."""

    def __init__(self, optimizer, every_steps: int, gamma: float = 0.1, last_epoch: int = -1):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.every_steps, self.gamma = int(every_steps), float(gamma)
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        return self.gamma ** (step // self.every_steps)


class MultiStepDecay(StepCountSchedule):
    """Multiply by ``gamma`` at each milestone (in optimizer steps); the official
    CIFAR code divides by 10 at 40k and 60k of 80k steps."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, last_epoch: int = -1):
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        return self.gamma ** sum(step >= m for m in self.milestones)


class Cosine(StepCountSchedule):
    """Cosine from base_lr to ``final_factor * base_lr`` over ``total_steps``,
    after ``warmup_steps`` of linear warm-up."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0,
                 last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.warmup_steps, self.final_factor = int(total_steps), int(warmup_steps), final_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * t))


class OneCycle(StepCountSchedule):
    """Wong et al.'s cyclic schedule: linear from 0 up to base_lr at
    ``peak_fraction`` of the run, then linearly back to 0."""

    def __init__(self, optimizer, total_steps: int, peak_fraction: float = 0.4, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 < peak_fraction < 1:
            raise ValueError(f"peak_fraction must be in (0, 1), got {peak_fraction}")
        self.total_steps, self.peak_fraction = int(total_steps), float(peak_fraction)
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        t = (step + 1) / self.total_steps  # the first step already trains, at a small LR
        if t <= self.peak_fraction:
            return t / self.peak_fraction
        return max(0.0, (1 - t) / (1 - self.peak_fraction))


def build_schedule(name: str, optimizer, *, steps_per_pass: int, passes: int, replays: int = 1,
                   milestones=None, warmup_passes: float = 0.0) -> LRScheduler:
    """A schedule by name, with its lengths given in passes and converted to
    optimizer steps here (``steps_per_pass`` = batches per pass * replays)."""
    total = steps_per_pass * passes
    if name == "constant":
        return Constant(optimizer)
    if name == "step":
        return StepDecay(optimizer, every_steps=official_step_passes(replays) * steps_per_pass)
    if name == "multistep":
        if not milestones:
            raise ValueError("the multistep schedule needs milestones (in optimizer steps)")
        return MultiStepDecay(optimizer, milestones)
    if name == "cosine":
        return Cosine(optimizer, total, warmup_steps=round(warmup_passes * steps_per_pass))
    if name == "onecycle":
        return OneCycle(optimizer, total)
    raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")

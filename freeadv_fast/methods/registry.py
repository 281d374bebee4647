"""What a training method is, by name: ``register_method(MethodSpec(...))``.

A method is a ``Trainer`` subclass plus the few facts the rest of the engine
needs about it; each lives in its own module of this package, which
registers it when imported (``freeadv_fast.methods`` imports them all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..common import register


@dataclass(frozen=True)
class MethodSpec:
    name: str
    trainer: type  # a freeadv_fast.trainer.Trainer subclass
    label: str  # how results name it: {m} is the replays, {k} the attack steps
    default_step_size: Callable  # cfg -> the attack step when none is given (cfg.epsilon is a float by then)
    trainer_args: Callable = field(default=lambda cfg: {})  # cfg -> the trainer's own keyword arguments
    replayed: bool = False  # takes --replays (free-m); the others take one optimizer step per batch
    # the pixel modes (freeadv_fast/ops) its perturbation can keep, its default first; () for no perturbation
    pixel_modes: tuple = ()
    help: str = ""

    def replays(self, cfg) -> int:
        return cfg.replays if self.replayed else 1

    def title(self, cfg) -> str:
        return self.label.format(m=self.replays(cfg), k=cfg.pgd_steps)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    return register(METHODS, spec.name, spec, "method")

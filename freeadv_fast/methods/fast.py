"""FGSM with a random start ("Fast is better than free", Wong et al. 2020)."""
from __future__ import annotations

from .. import ops
from .pgd import PGDTrainer
from .registry import MethodSpec, register_method


class FastTrainer(PGDTrainer):
    """FGSM with a random start (Wong, Rice and Kolter, "Fast is better than
    free", 2020): one step of size ``step_size`` (default 1.25 * epsilon) from
    a uniform start, projected, then the optimizer step."""

    method = "fast"

    def __init__(self, model, optimizer, *, epsilon, step_size=None, **kw):
        super().__init__(model, optimizer, steps=1, epsilon=epsilon, step_size=step_size, random_start=True, **kw)

    def _step_size(self, C):
        if self.step_size is not None:
            return super()._step_size(C)
        return ops.vouch(1.25 * self._param("epsilon", self.epsilon, C))  # made from a checked epsilon


register_method(MethodSpec(
    "fast", FastTrainer, label="FGSM-RS",
    default_step_size=lambda cfg: 1.25 * cfg.epsilon,  # Wong et al.'s alpha = 1.25 eps
    trainer_args=lambda cfg: dict(epsilon=cfg.epsilon, step_size=cfg.step_size),
    pixel_modes=("project",),  # as Fast-AT's code does
    help="FGSM with a random start (Wong et al. 2020)"))

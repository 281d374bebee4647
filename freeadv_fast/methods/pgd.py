"""PGD-k adversarial training (Madry et al. 2018)."""
from __future__ import annotations

import torch

from .. import ops
from ..common import check_int
from ..trainer import Trainer, check_channel_counts, check_pixel_value, check_step_moves
from .registry import MethodSpec, register_method


class PGDTrainer(Trainer):
    """Madry et al.'s k-step PGD adversarial training: each minibatch is
    attacked from a fresh (random) start with ``steps`` signed-gradient steps
    projected onto the epsilon ball and the pixel range, then one optimizer
    step is taken on the adversarial batch."""

    method = "pgd"
    needs_input_grad = True

    def __init__(self, model, optimizer, *, steps, epsilon, step_size, random_start=True, **kw):
        check_int("steps", steps, 1)
        pixel_range = kw.get("pixel_range", (0.0, 1.0))
        check_pixel_value("epsilon", epsilon, pixel_range)
        if step_size is not None:
            check_pixel_value("step_size", step_size, pixel_range)
            check_step_moves(self.method, epsilon, step_size)
        check_channel_counts(epsilon=epsilon, step_size=step_size, mean=kw.get("mean"), std=kw.get("std"))
        if not isinstance(random_start, bool):  # "no" is true
            raise TypeError(f"random_start must be True or False, got {random_start!r:.40}")
        super().__init__(model, optimizer, **kw)
        self.steps, self.epsilon, self.step_size, self.random_start = steps, epsilon, step_size, random_start
        self._delta = None

    def _step_size(self, C):
        return self._param("step_size", self.step_size, C)

    def attack(self, x, y):
        """The adversarial model input for a prepared batch (and its delta)."""
        n, C = x.shape[0], x.shape[1]
        self._delta = self._scratch(self._delta, x)
        delta = self._delta[:n]
        eps, step, norm = self._param("epsilon", self.epsilon, C), self._step_size(C), self._norm(x)
        if self.random_start:
            ops.random_init_(delta, x, epsilon=eps, pixel_range=(self.lo, self.hi), mode="project",
                             generator=self.generator, backend=self.backend)
        else:
            delta.zero_()
        inp = ops.make_input(x, delta, mode="project", **norm)
        for _ in range(self.steps):
            inp.requires_grad_(True)
            loss, _ = self._forward(inp, y)
            # the input gradient only: no weight gradients are made here
            (grad,) = torch.autograd.grad(self._scaled(loss), inp)
            inp = ops.update_and_make_input_(delta, grad, x, step_size=step, epsilon=eps, mode="project", **norm)
        return inp, delta

    def train_batch(self, x, y) -> dict:
        x, y = self._prepare(x, y)
        if self._graphed(x):
            return self._train_batch_graphed(x, y)
        inp, _ = self.attack(x, y)
        loss, logits, _ = self._train_step(inp.detach(), y, input_grad=False)
        self._optimizer_step()
        self._record(loss, logits, y)
        return {"loss": loss.detach(), "samples": x.shape[0], "replays": 1}

    def _train_batch_graphed(self, x, y) -> dict:
        return self._one_step_graphed(x, y, generators=(self.generator,))  # the random start draws in the graph

    def _graphed_step(self):
        s = self._static
        inp, _ = self.attack(s.x, s.y)
        loss, logits, _ = self._train_step(inp.detach(), s.y, input_grad=False)
        self.optimizer.step()
        self._record_on_device(loss, logits, s.y)
        s.loss.copy_(loss.detach())


register_method(MethodSpec(
    "pgd", PGDTrainer, label="PGD-{k}",
    default_step_size=lambda cfg: 2.5 * cfg.epsilon / cfg.pgd_steps,  # Madry et al.'s 2.5 eps / k
    trainer_args=lambda cfg: dict(steps=cfg.pgd_steps, epsilon=cfg.epsilon, step_size=cfg.step_size),
    pixel_modes=("project",),  # x + delta kept in the pixel range, as Madry's and Fast-AT's code do
    help="PGD adversarial training with --pgd-steps attack steps from a random start"))

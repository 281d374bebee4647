"""Natural training: the speed limit free training is measured against."""
from __future__ import annotations

from .. import ops
from ..trainer import Trainer
from .registry import MethodSpec, register_method


class NaturalTrainer(Trainer):
    """Plain training on clean inputs, through the same machinery (the speed
    limit free training is measured against)."""

    method = "natural"

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        self._clean = None  # a zero delta: the fused op then just normalizes

    def train_batch(self, x, y) -> dict:
        x, y = self._prepare(x, y)
        if self._graphed(x):
            return self._train_batch_graphed(x, y)
        self._clean = self._scratch(self._clean, x)
        inp = ops.make_input(x, self._clean[:x.shape[0]], **self._norm(x))
        loss, logits, _ = self._train_step(inp, y, input_grad=False)
        self._optimizer_step()
        self._record(loss, logits, y)
        return {"loss": loss.detach(), "samples": x.shape[0], "replays": 1}

    def _train_batch_graphed(self, x, y) -> dict:
        return self._one_step_graphed(x, y)

    def _graphed_step(self):
        s = self._static
        self._clean = self._scratch(self._clean, s.x)
        inp = ops.make_input(s.x, self._clean[:s.x.shape[0]], **self._norm(s.x))
        loss, logits, _ = self._train_step(inp, s.y, input_grad=False)
        self.optimizer.step()
        self._record_on_device(loss, logits, s.y)
        s.loss.copy_(loss.detach())


register_method(MethodSpec("natural", NaturalTrainer, label="natural", default_step_size=lambda cfg: 0.0,
                           help="plain training on clean images"))

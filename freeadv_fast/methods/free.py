"""Free-m (Algorithm 1 of the paper): every minibatch replayed m times, one
forward/backward per replay giving both the weight and the input gradient."""
from __future__ import annotations

import torch

from .. import ops
from ..common import check_int
from ..graphs import Static
from ..trainer import Trainer, check_channel_counts, check_pixel_value, check_step_moves
from .registry import MethodSpec, register_method


class FreeAdversarialTrainer(Trainer):
    """Free-m: each minibatch is replayed ``replays`` times; every replay is one
    optimizer step and one update of the persistent perturbation ``delta``
    from the same backward pass.

    ``delta`` (float32, pixel units) persists across minibatches and epochs;
    a smaller batch uses and updates its leading slice, a larger one grows it
    keeping the old values. ``stem_input_grad`` picks how the input gradient
    is made (Trainer; freeadv_fast/stem.py). ``pixel_mode="clamp_input"`` is the paper's code
    (the model sees ``normalize(clamp(x + delta))``); ``"project"`` keeps
    ``x + delta`` in the pixel range instead.
    """

    method = "free"
    needs_input_grad = True

    def __init__(self, model, optimizer, *, replays, epsilon, step_size, mean, std, pixel_range=(0.0, 1.0),
                 pixel_mode="clamp_input", precision="fp32", channels_last=False, compile=False, cuda_graph=False,
                 scheduler=None, backend="auto", seed=0, max_bad_steps=10, stem_input_grad="autograd"):
        check_int("replays", replays, 1)
        ops.check_mode(pixel_mode)
        for name, value in (("epsilon", epsilon), ("step_size", step_size)):
            check_pixel_value(name, value, pixel_range)
        check_step_moves("free", epsilon, step_size)
        check_channel_counts(epsilon=epsilon, step_size=step_size, mean=mean, std=std)
        super().__init__(model, optimizer, mean=mean, std=std, pixel_range=pixel_range, precision=precision,
                         channels_last=channels_last, compile=compile, cuda_graph=cuda_graph, scheduler=scheduler,
                         backend=backend, seed=seed, max_bad_steps=max_bad_steps, stem_input_grad=stem_input_grad)
        self.replays, self.pixel_mode = replays, pixel_mode
        self.epsilon, self.step_size = epsilon, step_size
        self.delta: torch.Tensor | None = None
        update = self._update_and_make_input
        self._update_and_make_input = (torch.compile(update, fullgraph=True, mode=self._compile_mode) if compile
                                       else update)

    def start_phase(self):
        """The perturbation restarts from zero at a new image size (why: freeadv_fast/phases.py)."""
        self.delta = None

    def _delta_for(self, x):
        n = x.shape[0]
        if self.delta is not None and self.delta.shape[1:] != x.shape[1:]:
            raise ValueError(f"batch of images {tuple(x.shape[1:])} but the perturbation buffer holds "
                             f"{tuple(self.delta.shape[1:])}: free training needs one image size")
        if self.delta is None or n > self.delta.shape[0]:
            grown = self._zeros(x.shape)
            if self.delta is not None:
                grown[:self.delta.shape[0]] = self.delta
            self.delta = grown
        return self.delta[:n]

    def _update_and_make_input(self, delta, grad, x, step, eps, norm):
        return ops.update_and_make_input_(delta, grad, x, step_size=step, epsilon=eps, mode=self.pixel_mode,
                                          **norm)

    def train_batch(self, x, y) -> dict:
        x, y = self._prepare(x, y)
        C = x.shape[1]  # per-channel values of another count are refused before the buffer grows
        step, eps = self._param("step_size", self.step_size, C), self._param("epsilon", self.epsilon, C)
        delta = self._delta_for(x)
        if self._graphed(x) and delta.shape[0] == self.delta.shape[0]:
            return self._train_batch_graphed(x, y)
        norm = self._norm(x)
        inp = ops.make_input(x, delta, mode=self.pixel_mode, **norm)
        loss_sum = torch.zeros((), device=self.device)  # summed in replay order, as the captured step does
        for replay in range(self.replays):
            loss, logits, grad = self._train_step(inp, y, input_grad=True)
            # a step the scaler skips (inf/NaN) must leave delta unchanged too
            step_now = ops.vouch(step * self._gradient_ok()) if self.scaler is not None else step
            if replay + 1 < self.replays:
                inp = self._update_and_make_input(delta, grad, x, step_now, eps, norm)
            else:  # the next minibatch makes its own input
                ops.update_delta_(delta, grad, x, step_size=step_now, epsilon=eps, pixel_range=(self.lo, self.hi),
                                  mode=self.pixel_mode, backend=self.backend)
            self._optimizer_step()
            self._record(loss, logits, y)
            loss_sum.add_(loss.detach())
        return {"loss": loss_sum / self.replays, "samples": x.shape[0], "replays": self.replays}

    def _train_batch_graphed(self, x, y) -> dict:
        """The batch's input is made eagerly (one kernel), then each replay is
        one launch of the captured replay step. The step always writes the
        next input: on the last replay that is a wasted write of the input
        (2 of ~13 bytes an element), which keeps one graph instead of two."""
        key = (tuple(x.shape), x.dtype, self.delta.data_ptr())
        graph = self._graph_for(key, lambda: self._static_for(x, y), self._replay_step)
        s = self._static
        s.x.copy_(x)
        s.y.copy_(y)
        s.loss_sum.zero_()
        ops.make_input(s.x, self.delta, mode=self.pixel_mode, out=s.inp, **s.norm)
        for _ in range(self.replays):
            graph()
            self._advance()
            self.metrics.samples += x.shape[0]
        return {"loss": s.loss_sum / self.replays, "samples": x.shape[0], "replays": self.replays}

    def _static_for(self, x, y):
        C = x.shape[1]
        return Static(x=torch.empty_like(x), y=torch.empty_like(y), norm=self._norm(x),
                      inp=torch.empty(x.shape, dtype=self.input_dtype, device=self.device,
                                      memory_format=self.memory_format),
                      step=self._param("step_size", self.step_size, C), eps=self._param("epsilon", self.epsilon, C),
                      loss_sum=torch.zeros((), device=self.device))

    def _replay_step(self):
        """One replay on the static tensors (captured): the eager replay's
        arithmetic in the same order."""
        s = self._static
        loss, logits, grad = self._train_step(s.inp.detach(), s.y, input_grad=True)
        ops.update_and_make_input_(self.delta, grad, s.x, step_size=s.step, epsilon=s.eps, mode=self.pixel_mode,
                                   out=s.inp, **s.norm)
        self.optimizer.step()
        self._record_on_device(loss, logits, s.y)
        s.loss_sum.add_(loss.detach())

    def rank_state(self):
        return {**super().rank_state(), "delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_rank_state(self, state):
        super().load_rank_state(state)
        d = state.get("delta")
        self.delta = None if d is None else d.to(self.device).contiguous(memory_format=self.memory_format)


register_method(MethodSpec(
    "free", FreeAdversarialTrainer, label="free-{m}", replayed=True,
    default_step_size=lambda cfg: cfg.epsilon,
    pixel_modes=("clamp_input", "clamp_input_strict", "project"),  # the paper's code as it ran, first
    trainer_args=lambda cfg: dict(replays=cfg.replays, pixel_mode=cfg.pixel_mode, epsilon=cfg.epsilon,
                                  step_size=cfg.step_size),
    help="free adversarial training: each batch replayed --replays times (Shafahi et al. 2019)"))

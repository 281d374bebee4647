"""The training engine every method shares (freeadv_fast/methods/ defines
Free-m and the baselines on it): device placement, precision, compile and
CUDA graphs, the optimizer and schedule steps, the pass loop, metrics and
checkpoint state.

A replay of Free-m is one forward and ONE backward: the backward gives the
weight gradients and, because the model input requires grad, the input
gradient that moves the persistent perturbation ``delta``. No leaf tensor is
made for delta and nothing in the loop waits for the device: losses and
accuracies accumulate in device tensors that ``RunningMetrics.compute``
reads at log intervals.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from . import distributed, ops
from .attacks import check_labels, check_mean, check_model_output, check_pixels_finite, check_width, eval_mode
from .common import COMPILE_MODES, autocast, check_batch, check_int, check_pixel_range, check_precision
from .data.errors import DataError
from .evaluate import pairs
from .graphs import Static, StepGraph
from .messages import say_once
from .stem import INPUT_GRADS, use_fast_input_grad


class NonFiniteError(RuntimeError):
    """Training diverged: non-finite weights, or too many non-finite losses in a row."""


class RunningMetrics:
    """Loss and accuracy summed on the device, the sample count on the host
    (it is known there: no host-to-device copy per step); one sync (and
    all-reduce) per read."""

    def __init__(self, device):
        self.device = torch.device(device)
        dtype = torch.float64 if self.device.type != "mps" else torch.float32
        self.sums = torch.zeros(2, dtype=dtype, device=self.device)  # loss * n, correct
        self.samples = 0
        self._started = time.perf_counter()
        self._paused_at = None

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluations, checkpoints) is not training time:
        the clock of samples/s stops, so the first rate after a held-out
        evaluation is the training rate, not one diluted by the evaluation."""
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._started += time.perf_counter() - self._paused_at
            self._paused_at = None

    def accumulate(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor):
        """Adds a batch's loss and correct count on the device (capturable: no
        sync); the caller adds the batch's size to ``samples``."""
        self.sums[0] += loss.detach().to(self.sums.dtype) * y.numel()
        self.sums[1] += (logits.detach().argmax(1) == y).sum()

    def compute(self, reset: bool = True) -> dict:
        """Mean loss, accuracy and samples/s over every rank since the last reset (paused time left out)."""
        local = torch.cat([self.sums, self.sums.new_tensor([self.samples])])
        loss_sum, correct, n = distributed.all_reduce_sum(local).tolist()
        elapsed = (self._paused_at or time.perf_counter()) - self._started
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = {"loss": loss_sum / n if n else math.nan, "acc": correct / n if n else math.nan, "samples": int(n),
               "samples_per_s": n / elapsed if elapsed > 0 else math.nan, "world_size": world}
        if reset:
            self.sums.zero_()
            self.samples = 0
            self._started = self._paused_at or time.perf_counter()  # read while paused: counts from the pause's end
        return out


def check_pixel_value(name, value, pixel_range=None, **rule):
    """Fails now, not at the first batch, on a negative or NaN epsilon/step
    size (``rule``: channel_param's, for a mean or std), and with
    ``pixel_range`` on one beyond its width (8 meaning 8/255). A tensor is
    read here, once: the steps then take it without reading it again."""
    if pixel_range is not None:
        check_width(name, value, check_pixel_range(pixel_range))
    else:
        ops.check_values(value, name, **rule)


def check_step_moves(method, epsilon, step_size):
    """A step size of 0 under an epsilon above 0 never moves the perturbation:
    the training would be natural training at an adversarial method's cost
    (the CLI refuses it too)."""
    def values(v):
        return list(v) if isinstance(v, (tuple, list)) else [v]
    if isinstance(epsilon, torch.Tensor) or isinstance(step_size, torch.Tensor):
        return  # read where it is checked, not again
    if any(e > 0 for e in values(epsilon)) and all(s == 0 for s in values(step_size)):
        raise ValueError(f"step_size 0 with epsilon {epsilon if isinstance(epsilon, (tuple, list)) else format(epsilon, '.4g')}: the perturbation would never move, and {method} "
                         "training would be natural training at a higher cost")


def check_channel_counts(**values):
    """Per-channel values of different counts (3 means, 2 epsilons): refused
    when the trainer is made, not at the first batch (free training's
    perturbation buffer would have grown by then)."""
    counts = {name: len(v) if isinstance(v, (tuple, list)) else v.numel() if isinstance(v, torch.Tensor) else 1
              for name, v in values.items() if v is not None}
    many = {name: n for name, n in counts.items() if n != 1}
    if len(set(many.values())) > 1:
        raise ValueError("per-channel values must have one value or one per channel, the same count for all: got "
                         + ", ".join(f"{n} for {name}" for name, n in many.items()))


class Trainer:
    """Shared machinery: device placement, precision (autocast, GradScaler),
    channels_last, torch.compile, CUDA graphs, optimizer/scheduler steps, the
    pass loop and checkpoint state. Subclasses define ``train_batch``.

    ``cuda_graph=True`` captures each method's whole step (forward, backward,
    perturbation update, optimizer step, device-side metrics) as a CUDA graph
    for full batches (freeadv_fast/graphs.py). The optimizer's LR then lives
    in a device tensor that the schedule writes, and SGD steps fused (the
    foreach SGD reads a tensor LR on the host). fp16 (loss scaling decides on
    the host), DDP, CPU devices and batches of another size run eagerly;
    each fallback is said once."""

    method = "base"
    needs_input_grad = False  # whether its steps move a perturbation by the loss's input gradient

    def __init__(self, model, optimizer, *, mean, std, pixel_range=(0.0, 1.0), precision="fp32",
                 channels_last=False, compile=False, cuda_graph=False, scheduler=None, backend="auto", seed=0,
                 max_bad_steps=10, stem_input_grad="autograd"):
        self.amp_dtype = check_precision(precision)
        for name, value in (("channels_last", channels_last), ("cuda_graph", cuda_graph)):
            if not isinstance(value, bool):  # "no" is true
                raise TypeError(f"{name} must be True or False, got {value!r:.40}")
        self.lo, self.hi = check_pixel_range(pixel_range)
        self._check_parts(model, optimizer, scheduler)
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32} and not (dtypes == {torch.bfloat16} and precision == "bf16"):  # a bf16 model
            # trains under bf16 autocast; any other mix fails at the first forward, or at fp16's unscaling
            shown = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            raise TypeError(f"the model's parameters are {shown} with precision {precision!r}: the trainers keep "
                            "float32 weights (call model.float(); precision 'bf16' or 'fp16' runs them in 16 bits "
                            "under autocast), or a model all in bfloat16 with precision 'bf16'")
        check_mean(mean, (self.lo, self.hi))
        check_channel_counts(mean=mean, std=std)
        check_pixel_value("std", std, positive=True)
        check_int("max_bad_steps", max_bad_steps, 1)
        check_int("seed", seed, 0)
        if seed >= 2 ** 64:  # what torch.Generator takes
            raise ValueError(f"seed must be below 2**64, got {seed}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device = next(model.parameters()).device
        self._range_checked = False  # the first floating-point batch is checked to lie in the pixel range
        self._classes: int | None = None  # the model's logits per image, seen on the first batch
        self.backend = ops.resolve_backend(backend, self.device)
        self.precision = precision
        # the model sees its input in the autocast dtype anyway; writing it so halves the traffic
        self.input_dtype = self.amp_dtype or torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self._to_channels_last(model)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.mean, self.std = mean, std
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.metrics = RunningMetrics(self.device)
        # consecutive optimizer steps with a non-finite loss (now, and the longest run), kept on the device
        self.max_bad_steps = max_bad_steps
        self._bad_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self._worst_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # passes over the data completed
        self.batch_in_epoch = 0  # batches of the current pass completed
        if compile not in (False, True) + COMPILE_MODES:
            raise ValueError(f"compile must be True, False or a mode ({', '.join(COMPILE_MODES)}), got {compile!r}")
        self.compiled = compile
        self._compile_mode = None if compile in (True, "default") else compile
        self._forward = (torch.compile(self._forward_eager, mode=self._compile_mode) if compile
                         else self._forward_eager)
        self._use_stem_input_grad(stem_input_grad)
        self.cuda_graph = cuda_graph and self._graphs_apply()
        self._graph: StepGraph | None = None
        self._graph_key = None
        self._graph_lrs: list | None = None  # the LR tensors the graphs read
        self._static: Static | None = None
        self._step_lr = None  # the LR the latest step used, once a schedule has moved the group's on

    @staticmethod
    def _check_parts(model, optimizer, scheduler):
        """The model, an optimizer that steps some of its parameters, and a
        scheduler, each checked now rather than found wrong at the first step."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters to train")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in stepped for p in params):
            raise ValueError("optimizer holds none of the model's parameters (was it built for another model?)")
        if not any(id(p) in stepped and p.requires_grad for p in params):  # every step would change nothing
            raise ValueError("none of the model's parameters the optimizer holds requires grad (all frozen): "
                             "training would change no weight")
        for group in optimizer.param_groups:  # torch's own checks let NaN through (NaN < 0 is false)
            for key, value in group.items():
                for v in (value if isinstance(value, (tuple, list)) and key != "params" else (value,)):
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        v = float(v)  # an LR tensor: read once, here
                    if isinstance(v, float) and not math.isfinite(v):
                        raise ValueError(f"the optimizer's {key} is {value}: it must be finite")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # its step() needs a metric
            raise TypeError("ReduceLROnPlateau steps on a metric, not per optimizer step: use a schedule whose "
                            "step() takes no argument (freeadv_fast.scheduler.build_schedule, or torch's LambdaLR)")
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:  # the LR it set was another optimizer's
            raise ValueError("scheduler was built for another optimizer: this one's LR would never be scheduled")

    def _graphs_apply(self) -> bool:
        """Whether steps can be captured here; says once why not."""
        why = None
        if self.device.type != "cuda":
            why = f"--cuda-graph applies to CUDA devices; on {self.device.type} training runs eagerly"
        elif self.scaler is not None:
            why = "--cuda-graph: fp16 training runs eagerly (loss scaling decides on the host whether to step)"
        elif isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            why = "--cuda-graph: DDP training runs eagerly (its gradient buckets are not captured)"
        elif not all(isinstance(self.optimizer, torch.optim.SGD) or "capturable" in g
                     for g in self.optimizer.param_groups):
            why = f"--cuda-graph: {type(self.optimizer).__name__} cannot step inside a graph; training runs eagerly"
        if why:
            say_once(why)
        return why is None

    def _use_stem_input_grad(self, choice):
        """How the input gradient is made: "autograd", or one of
        stem.INPUT_GRADS by the stem convolution's own backward."""
        choices = ("autograd", *INPUT_GRADS)
        if choice not in choices:
            raise ValueError(f"stem_input_grad must be one of {', '.join(choices)}, got {choice!r}")
        if not use_fast_input_grad(distributed.unwrap(self.model), choice) and choice != "autograd":
            say_once(f"stem_input_grad={choice!r} needs a model whose first 3-channel convolution is a plain "
                     "nn.Conv2d (ungrouped, undilated, zero-padded); the input gradient comes from autograd")

    def _zeros(self, shape):
        """A float32 zero buffer in the trainer's memory format."""
        return torch.empty(shape, dtype=torch.float32, device=self.device, memory_format=self.memory_format).zero_()

    def _scratch(self, buffer, x):
        """``buffer`` if it can hold a batch like ``x``, else a new zero one."""
        if buffer is None or buffer.shape[0] < x.shape[0] or buffer.shape[1:] != x.shape[1:]:
            return self._zeros(x.shape)
        return buffer

    @staticmethod
    def _to_channels_last(model):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            if any(p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)
                   for p in model.parameters()):
                raise ValueError("channels_last: convert the model with "
                                 "model.to(memory_format=torch.channels_last) before wrapping it in DDP")
        else:
            model.to(memory_format=torch.channels_last)

    # -- pieces of a step ---------------------------------------------------
    def _param(self, name, value, channels, **rule):
        """A per-channel float32 tensor on the device (ops.channel_param makes each once)."""
        return ops.channel_param(value, name, channels, self.device, **rule)

    def _prepare(self, x, y):
        if not self.model.training:  # BatchNorm's statistics and dropout would stay frozen, without a word
            say_once("note: the model is in eval mode (model.eval() was called): BatchNorm statistics and dropout "
                     "stay frozen while it trains; call model.train() before training if that is not meant")
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():  # autograd's own error names neither
            raise RuntimeError(f"{type(self).__name__}.train_batch needs gradients: it was called inside "
                               "torch.no_grad() or torch.inference_mode()")
        self._check_batch(x, y)
        labels = y
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if x.dim() == 4 and not x.is_contiguous(memory_format=self.memory_format):
            x = x.contiguous(memory_format=self.memory_format)  # once per batch, reused by every replay
        if self._classes is None:
            self._classes = self._probe_classes(x)
            check_labels(labels, self._classes)  # the first batch's labels are read wherever they are
        elif labels.device.type == "cpu":
            # host labels are read on the host, no device waits; labels already on a GPU are read on the
            # first batch only (each read would wait for the device), later ones are taken as they are
            check_labels(labels, self._classes)
        return x, y

    def _probe_classes(self, x) -> int:
        """The model's logits per image, from its output for two images of the
        first batch: every module in eval mode and no gradients, then in
        training mode with BatchNorm's statistics put back, so nothing of the
        model changes before a wrong output is refused."""
        net = distributed.unwrap(self.model)
        few = x[:2]
        inp = ops.make_input(few, self._zeros(few.shape), **self._norm(few))
        with eval_mode(net), torch.no_grad(), self._autocast():
            classes = check_model_output(net(inp), len(few))
        if net.training or self.needs_input_grad:
            # some models return another type while training (GoogLeNet's aux logits), and a model whose output
            # does not depend on its input (a detached input path) gives no input gradient: ask both now, with
            # BatchNorm's statistics put back and the random state (dropout) as it was
            buffers = [(b, b.clone()) for b in net.buffers()]
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                probe = inp.detach().requires_grad_(self.needs_input_grad)
                with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(self.needs_input_grad), \
                        self._autocast():
                    out = net(probe)
                    if net.training:
                        check_model_output(out, len(few))
                    if self.needs_input_grad and not (
                            isinstance(out, torch.Tensor) and out.requires_grad
                            and torch.autograd.grad(out.float().sum(), probe, allow_unused=True)[0] is not None):
                        raise ValueError(f"the model's output does not depend on its input (is the input detached, "
                                         f"or run under torch.no_grad()?): {self.method} training moves the "
                                         "perturbation by the loss's input gradient, which would not exist")
            finally:
                with torch.no_grad():
                    for b, kept in buffers:
                        b.copy_(kept)
        return classes

    def _check_batch(self, x, y):
        """A batch the step would misread is refused before any state changes
        (host-side checks of shapes and dtypes; only the first floating-point
        batch pays the one sync of the pixel-range check)."""
        if isinstance(x, torch.Tensor) and (x.dim() < 2 or len(x) == 0):
            raise ValueError(f"x must be a non-empty batch of images (N, C, ...), got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise ValueError("x is a meta tensor: it holds no images")
        check_batch(x, y, (self.lo, self.hi), pixel_check=not self._range_checked)
        if self.memory_format == torch.channels_last and x.dim() != 4:  # torch's 'required rank 4 tensor'
            raise ValueError(f"channels_last applies to 4-D image batches (N, C, H, W), got x of shape "
                             f"{tuple(x.shape)}: train with channels_last=False")
        if len(x) == 1 and any(isinstance(m, torch.nn.BatchNorm1d) and m.training for m in self.model.modules()):
            # torch's error would come mid-forward, after earlier BatchNorm layers moved their statistics
            raise ValueError("a batch of 1 image: the model's BatchNorm1d needs more than one value per channel "
                             "while training (drop a last batch of one: DataLoader(drop_last=True))")
        if not self._range_checked:
            check_pixels_finite(x)
        channels = len(self.mean) if isinstance(self.mean, (tuple, list)) else 1
        if channels > 1 and x.shape[1] != channels:
            raise ValueError(f"x has {x.shape[1]} channels (dim 1 of {tuple(x.shape)}) but mean has {channels} "
                             "values; images are N, C, H, W (for N, H, W, C storage use x.permute(0, 3, 1, 2))")
        self._range_checked = self._range_checked or x.is_floating_point()

    def _norm(self, x):
        C = x.shape[1]
        return dict(mean=self._param("mean", self.mean, C, signed=True),
                    std=self._param("std", self.std, C, positive=True),
                    pixel_range=(self.lo, self.hi), out_dtype=self.input_dtype, memory_format=self.memory_format,
                    backend=self.backend)

    def _autocast(self):
        # autocast's weight cache cannot outlive a graph capture (same casts, same numbers)
        return autocast(self.device, self.precision, cache_enabled=not self.cuda_graph)

    def _forward_eager(self, inp, y):
        with self._autocast():
            logits = self.model(inp)
        return F.cross_entropy(logits.float(), y), logits

    def _scaled(self, loss):
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _gradient_ok(self):
        """A 0-dim device tensor: 1 when the scaler will take this step, 0 when it
        will skip it (inf/NaN gradients). Unscales the gradients; no sync."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # the largest |gradient| is finite exactly when the scaler finds no inf/NaN and steps
        return torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)).float()

    def _optimizer_step(self):
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._advance()

    def _advance(self):
        """The host side of an optimizer step: its count and the LR schedule."""
        self.step += 1
        if self.scheduler is not None:
            # the schedule's own copy of the LR this step used (a clone of the graphs' LR tensor: no sync)
            last = getattr(self.scheduler, "get_last_lr", None)
            lr = last()[0] if last is not None else self.optimizer.param_groups[0]["lr"]
            # the group's own tensor (torch < 2.10 kept it in get_last_lr) takes the next LR in place
            aliased = isinstance(lr, torch.Tensor) and lr is self.optimizer.param_groups[0]["lr"]
            self._step_lr = lr.clone() if aliased else lr
            self.scheduler.step()
            if self._graph_lrs is not None:
                self._keep_graph_lrs()

    # -- CUDA graphs --------------------------------------------------------
    def _capturable_optimizer(self):
        """LR tensors on the device, and fused SGD; said once if it changes anything."""
        changed = set()
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
                changed.add("its learning rate now lives in a device tensor")
            if isinstance(self.optimizer, torch.optim.SGD) and not group.get("fused"):
                group["fused"], group["foreach"] = True, False
                changed.add("SGD steps fused")
            elif "capturable" in group and not group["capturable"]:
                group["capturable"] = True
                changed.add("it steps capturable")
        if changed:
            say_once(f"--cuda-graph: the optimizer was made capturable: {'; '.join(sorted(changed))}")
        self._graph_lrs = [group["lr"] for group in self.optimizer.param_groups]

    def _keep_graph_lrs(self):
        """The captured graphs read these LR tensors: a schedule or a loaded
        optimizer state that put another value in their place is copied in."""
        for group, lr in zip(self.optimizer.param_groups, self._graph_lrs):
            if group["lr"] is not lr:
                group["lr"] = _write_into(lr, group["lr"])

    def _graph_for(self, key, make_static, body, generators=()) -> StepGraph:
        """The step graph for batches described by ``key``; a new key (another
        image size, a regrown buffer) makes new static tensors and a new graph."""
        if self._graph_key != key:
            if self._graph_lrs is None:
                self._capturable_optimizer()
            self._graph = None  # frees the old graph's memory pool first
            self._static = make_static()
            self._graph = StepGraph(body, generators=generators)
            self._graph_key = key
        self._keep_graph_lrs()
        return self._graph

    def _one_step_graphed(self, x, y, generators=()) -> dict:
        """A batch of a one-step method (natural, PGD-k, FGSM-RS) through its
        captured ``_graphed_step``, which reads ``self._static``."""
        def make_static():
            return Static(x=torch.empty_like(x), y=torch.empty_like(y), loss=torch.zeros((), device=self.device))
        graph = self._graph_for((tuple(x.shape), x.dtype), make_static, self._graphed_step, generators)
        s = self._static
        s.x.copy_(x)
        s.y.copy_(y)
        graph()
        self._advance()
        self.metrics.samples += x.shape[0]
        return {"loss": s.loss.clone(), "samples": x.shape[0], "replays": 1}

    def _graphed(self, x) -> bool:
        """Whether this prepared batch runs through the step graph."""
        if not self.cuda_graph:
            return False
        captured = self._graph_key[0] if self._graph_key is not None else None
        if captured is not None and x.shape[0] < captured[0] and tuple(x.shape[1:]) == captured[1:]:
            say_once(f"--cuda-graph: a smaller batch ({x.shape[0]} images, the graph holds {captured[0]}) "
                     "runs eagerly")
            return False
        return True  # the captured shape, or a new one (captured anew)

    def _train_step(self, inp, y, *, input_grad):
        """Forward, mean cross-entropy, zero grads, one backward; returns the
        loss, the logits and (when ``input_grad``) the input gradient."""
        if input_grad:
            inp.requires_grad_(True)
        loss, logits = self._forward(inp, y)
        self.optimizer.zero_grad(set_to_none=True)
        self._scaled(loss).backward()
        return loss, logits, (inp.grad if input_grad else None)

    def _record(self, loss, logits, y):
        """Metrics and the non-finite-loss streak, on the device."""
        self._record_on_device(loss, logits, y)
        self.metrics.samples += y.numel()

    def _record_on_device(self, loss, logits, y):
        self.metrics.accumulate(loss, logits, y)
        self._bad_streak.add_(1).mul_(~torch.isfinite(loss.detach()))  # +1, or back to 0 on a finite loss
        torch.maximum(self._worst_streak, self._bad_streak, out=self._worst_streak)

    def check_finite(self):
        """Raises NonFiniteError if any weight is NaN/Inf or the loss was
        non-finite for ``max_bad_steps`` steps in a row (on any rank). One
        sync; collective when distributed."""
        params = [p.detach() for p in distributed.unwrap(self.model).parameters()]
        bad_weights = (~torch.stack([torch.isfinite(p).all() for p in params]).all()).float()
        flags = distributed.all_reduce_sum(torch.stack([self._worst_streak.float(), bad_weights]))
        worst, bad = flags.tolist()
        if bad:
            raise NonFiniteError(f"the weights became NaN/Inf by optimizer step {self.step}")
        if worst >= self.max_bad_steps:
            raise NonFiniteError(f"the loss was NaN/Inf for {int(worst)} optimizer steps in a row "
                                 f"(limit {self.max_bad_steps}) by step {self.step}")

    def train_batch(self, x, y) -> dict:
        raise NotImplementedError

    def start_phase(self):
        """A new phase of progressive resizing begins (freeadv_fast/phases.py):
        state tied to the old image size restarts. Nothing here; free-m's delta."""

    # -- the pass loop ----------------------------------------------------
    def fit(self, loader, passes: int, *, log_every: int = 0, on_log=None, checkpoint_path=None,
            checkpoint_every: int = 0, should_stop=None, config=None, on_batch=None, on_pass_end=None) -> bool:
        """Trains until ``passes`` passes over ``loader`` are complete, resuming
        from ``self.epoch`` / ``self.batch_in_epoch`` (set by a loaded
        checkpoint). ``loader`` is iterable per pass and may define
        ``set_epoch(epoch)`` (the shuffle of each pass) and ``skip(n)`` (start
        the pass at batch n). Every ``log_every`` batches the metrics are read
        (the only host sync) and given to ``on_log``. A checkpoint is written
        every ``checkpoint_every`` batches, at the end of each pass and when
        ``should_stop()`` turns true, which ends training early: the return
        value says whether all passes completed. ``on_batch(batch_size)``
        follows every batch, ``on_pass_end(passes_done)`` every pass (before
        its checkpoint); ``config`` is stored in the checkpoints. The logged
        samples/s leave out the time of ``on_pass_end`` and of checkpoints."""
        from .checkpoint import check_replaceable, save_checkpoint, saveable_state

        if checkpoint_path is not None:  # before the first batch, not after a pass of training
            check_replaceable(checkpoint_path)
            saveable_state(self)

        def checkpoint():
            self.check_finite()  # never overwrite a good checkpoint with a diverged model
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, self, config=config)

        check_int("passes", passes, 0)
        check_int("log_every", log_every, 0)
        check_int("checkpoint_every", checkpoint_every, 0)
        for name, hook in (("on_log", on_log), ("should_stop", should_stop), ("on_batch", on_batch),
                           ("on_pass_end", on_pass_end)):  # found now, not after the first batch trained
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be a function (or None), got {type(hook).__name__}")
        batches_done = 0
        while self.epoch < passes:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch)
            start = self.batch_in_epoch
            if start and hasattr(loader, "skip"):
                batches = loader.skip(start)
            else:
                batches = (b for i, b in enumerate(loader) if i >= start)
            trained = False
            for x, y in pairs(batches):
                trained = True
                self.train_batch(x, y)
                self.batch_in_epoch += 1
                batches_done += 1
                if on_batch is not None:
                    on_batch(len(y))
                if log_every and batches_done % log_every == 0:
                    self.check_finite()
                    if on_log is not None:
                        on_log(self.log_record())
                if should_stop is not None and should_stop():
                    if on_log is not None and log_every and batches_done % log_every:  # the batches since the last
                        on_log(self.log_record())  # record, which no later run will train again
                    checkpoint()
                    return False
                if checkpoint_every and batches_done % checkpoint_every == 0:
                    with self.metrics.paused():
                        checkpoint()
            if not trained and not start:
                once = self.epoch > 0 and iter(loader) is loader  # a generator gives its batches once
                raise DataError(f"the loader gave no batch in pass {self.epoch + 1}: nothing to train on "
                                + ("(it is an iterator, spent after one pass: give a list or a DataLoader, which "
                                   "start again each pass)" if once else
                                   "(an empty loader, or every image in it could not be decoded)"))
            self.epoch += 1
            self.batch_in_epoch = 0
            with self.metrics.paused():
                if on_pass_end is not None:
                    on_pass_end(self.epoch)
                checkpoint()
        return True

    def last_step_lr(self) -> float:
        """The LR of the latest optimizer step (the group's LR is the next
        step's once the schedule has moved it on)."""
        return float(self._step_lr if self._step_lr is not None else self.optimizer.param_groups[0]["lr"])

    def log_record(self) -> dict:
        record = {"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch, "lr": self.last_step_lr(),
                  **self.metrics.compute()}
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()
        return record

    # -- checkpoint state -------------------------------------------------
    def rank_state(self) -> dict:
        """What differs between ranks: the perturbation buffer and the RNGs."""
        return {"delta": None, "generator": self.generator.get_state()}

    def load_rank_state(self, state: dict):
        self.generator.set_state(state["generator"])

    def state_dict(self) -> dict:
        return {"method": self.method, "model": distributed.unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "optimizer_type": type(self.optimizer).__name__,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    # how the optimizer steps, not what it learned: a checkpoint does not change these
    _STEPPING_KEYS = ("fused", "foreach", "capturable", "differentiable")

    def _load_optimizer_state(self, saved: dict):
        """The saved optimizer state, with each group's LR in the form this
        optimizer holds it: the same device tensor (a captured graph reads it)
        or a Python number, whatever form the checkpoint wrote."""
        before = [{k: g[k] for k in ("lr",) + self._STEPPING_KEYS if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, old in zip(self.optimizer.param_groups, before):
            old["lr"] = _write_into(old["lr"], group["lr"]) if isinstance(old["lr"], torch.Tensor) else float(group["lr"])
            group.update(old)

    def retune(self, *, lr_scale: float = 1.0, **group_values):
        """Optimizer settings changed after a checkpoint is loaded (a lower LR
        to finish a run), which loading had put back to the saved ones:
        ``group_values`` (momentum=0.5, ...) set in every group, and the LR
        scaled by ``lr_scale`` now and for the rest of the schedule."""
        for group in self.optimizer.param_groups:
            group.update(group_values)
            if lr_scale != 1.0:
                lr = group["lr"]
                group["lr"] = lr.mul_(lr_scale) if isinstance(lr, torch.Tensor) else lr * lr_scale
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * lr_scale
        if lr_scale != 1.0 and self.scheduler is not None:
            groups = {id(g["lr"]) for g in self.optimizer.param_groups}  # scaled above (torch < 2.10 lists them)
            for name in ("base_lrs", "_last_lr"):  # what LRScheduler computes from, and its copy of the LR now
                if isinstance(getattr(self.scheduler, name, None), list):
                    setattr(self.scheduler, name, [v if id(v) in groups else v * lr_scale
                                                   for v in getattr(self.scheduler, name)])
        if group_values:  # a captured fused SGD step holds them as numbers: capture again
            self._graph_key = None
        self._step_lr = None

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict):
            raise ValueError(f"a trainer state is a dict (from state_dict()), got {type(state).__name__}")
        missing = [k for k in ("model", "optimizer", "step", "epoch", "batch_in_epoch") if k not in state]
        if missing:  # said before anything is loaded, so nothing is half-loaded
            raise ValueError(f"the trainer state lacks {', '.join(missing)}")
        if state.get("method") != self.method:
            raise ValueError(f"the checkpoint was written by {state.get('method')!r} training, not {self.method!r}")
        saved_optimizer = state.get("optimizer_type")  # absent from checkpoints written before it was kept
        if saved_optimizer is not None and saved_optimizer != type(self.optimizer).__name__:
            raise ValueError(f"the checkpoint was written with a {saved_optimizer} optimizer, this trainer has "
                             f"{type(self.optimizer).__name__}: its state holds other settings")
        if (state.get("scheduler") is None) != (self.scheduler is None):  # the LR would freeze, or start over
            raise ValueError("the checkpoint was written " + ("without an LR schedule, and this trainer has one: it "
                             "would start again at its first step" if self.scheduler is not None else
                             "with an LR schedule, and this trainer has none: the LR would stay where it was"))
        for key in ("step", "epoch", "batch_in_epoch"):  # a 1.5 or a "2" would count on wrongly, unnoticed
            check_int(f"the trainer state's {key}", state[key], 0)
        distributed.unwrap(self.model).load_state_dict(state["model"])
        self._load_optimizer_state(state["optimizer"])
        self._graph_key = None  # a captured step holds the optimizer's settings as numbers: capture again
        if self.scheduler is not None:
            # checkpoints written before the schedules were LambdaLRs lack its (stateless) lr_lambdas
            lambdas = [None] * len(getattr(self.scheduler, "lr_lambdas", []))
            self.scheduler.load_state_dict({"lr_lambdas": lambdas, **state["scheduler"]})
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def _write_into(target: torch.Tensor, value) -> torch.Tensor:
    """``value`` (a number or a tensor) written into ``target``, which is returned."""
    return target.copy_(value) if isinstance(value, torch.Tensor) else target.fill_(float(value))

"""The pure-PyTorch reference of the perturbation ops: this file is the spec.

Every other backend (C++ on CPU, CUDA, Triton) must match these functions:
fp32 results to 1e-6, the ``clamp_input`` delta update bit for bit, fp16/bf16
outputs to one ulp of this result rounded to that dtype.

Notation: ``x`` is the clean batch, uint8 in [0, 255] (read as ``x.float() /
255``) or floating point in pixel units; ``delta`` is the float32 perturbation
in pixel units; ``grad`` is the gradient of the loss with respect to the
tensor fed to the model (the *normalized* input); ``lo, hi`` is the pixel
range; ``mean, std`` are per channel (dimension 1). Parameters given as
tensors hold one value per channel (or a single value).

Pixel modes:

* ``"clamp_input"`` -- the paper's official code as it ran. The model saw
  ``normalize(clamp(x + delta, lo, hi))``, so no gradient reaches delta where
  ``x + delta`` lies outside [lo, hi]; ON a bound it does. That is the
  subgradient 1 that autograd of ``clamp`` gave from torch 0.4.1
  (pytorch/pytorch#7049, 2018) until the 2026 change to strict masks
  (pytorch/pytorch#191142; torch 2.11 has the inclusive mask, 2.14 the strict
  one). It matters: a pixel at 0 or 1 with delta 0 sits on a bound, and with
  the strict mask its delta never moves.
* ``"clamp_input_strict"`` -- the same input, with the bounds masked too
  (``lo < x + delta < hi``), as autograd of ``clamp`` gives in torch 2.14.
* ``"project"`` -- PGD, FGSM-RS and Fast-AT's free variant. ``x + delta`` is
  kept inside [lo, hi] by projecting delta after each step; the model saw
  ``normalize(x + delta)``.
"""
from __future__ import annotations

import torch

# the index of a mode is its id in the compiled kernels (csrc/perturb.h PixelMode)
PIXEL_MODES = ("clamp_input", "project", "clamp_input_strict")
CLAMPING_MODES = ("clamp_input", "clamp_input_strict")


def pixels(x: torch.Tensor) -> torch.Tensor:
    """The clean batch in float32 pixel units."""
    if x.dtype == torch.uint8:
        # a one-element tensor, not the number 255: torch's CUDA division by a
        # Python number multiplies by its rounded reciprocal, which is not
        # x / 255 correctly rounded (one ulp off for some x)
        return x.float() / torch.full((1,) * x.dim(), 255.0, device=x.device)
    return x.float()


def per_channel(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel value shaped to broadcast over dimension 1."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1)
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def sign(grad: torch.Tensor) -> torch.Tensor:
    """sign() with sign(NaN) = sign(0) = 0, in float32."""
    g = grad.float()
    return torch.where(torch.isnan(g), torch.zeros_like(g), torch.sign(g))


def make_input(x, delta, *, mean, std, pixel_range=(0.0, 1.0), mode="clamp_input", out_dtype=None,
               memory_format=None):
    """The model input ``(clamp(x + delta, lo, hi) - mean) / std``.

    ``"project"`` mode skips the clamp: there ``x + delta`` is already in range.
    """
    lo, hi = pixel_range
    a = pixels(x) + delta
    if mode in CLAMPING_MODES:
        a = torch.clamp(a, lo, hi)
    out = (a - per_channel(mean, a)) / per_channel(std, a)
    return out.to(dtype=out_dtype or torch.float32).contiguous(
        memory_format=memory_format or torch.contiguous_format)


def update_delta_(delta, grad, x, *, step_size, epsilon, pixel_range=(0.0, 1.0), mode="clamp_input"):
    """One signed-gradient ascent step on delta, in place; returns delta."""
    lo, hi = pixel_range
    xf = pixels(x)
    step = per_channel(step_size, delta)
    eps = per_channel(epsilon, delta)
    if mode in CLAMPING_MODES:
        a = xf + delta
        mask = (a > lo) & (a < hi) if mode == "clamp_input_strict" else (a >= lo) & (a <= hi)
        new = torch.clamp(delta + step * sign(grad) * mask, -eps, eps)
    else:
        new = torch.clamp(delta + step * sign(grad), -eps, eps)
        new = torch.clamp(xf + new, lo, hi) - xf
    return delta.copy_(new)


def update_and_make_input_(delta, grad, x, *, step_size, epsilon, mean, std, pixel_range=(0.0, 1.0),
                           mode="clamp_input", out_dtype=None, memory_format=None):
    """update_delta_ then make_input from the new delta (the between-replays op)."""
    update_delta_(delta, grad, x, step_size=step_size, epsilon=epsilon, pixel_range=pixel_range, mode=mode)
    return make_input(x, delta, mean=mean, std=std, pixel_range=pixel_range, mode=mode, out_dtype=out_dtype,
                      memory_format=memory_format)


def random_init_(delta, x, *, epsilon, pixel_range=(0.0, 1.0), mode="clamp_input", generator=None):
    """Uniform start in [-eps, eps], projected into the pixel range in "project" mode."""
    lo, hi = pixel_range
    delta.uniform_(-1.0, 1.0, generator=generator).mul_(per_channel(epsilon, delta))
    if mode == "project":
        xf = pixels(x)
        delta.copy_(torch.clamp(xf + delta, lo, hi) - xf)
    return delta


def perturb(x, delta, grad, out, step, eps, mean, std, lo, hi, pixel_mode, update):
    """The fused op in the compiled ops' form (csrc/ops.cpp): the torch backend.

    With ``update``, one step on delta in place (no ``grad``: a zero sign,
    which leaves only the clip and, in "project" mode, the projection); with
    ``out``, the model input from the (new) delta written into it.
    ``pixel_mode`` is the index of the mode in PIXEL_MODES.
    """
    mode = PIXEL_MODES[pixel_mode]
    if update:
        update_delta_(delta, torch.zeros_like(delta) if grad is None else grad, x, step_size=step, epsilon=eps,
                      pixel_range=(lo, hi), mode=mode)
    if out is not None:
        out.copy_(make_input(x, delta, mean=mean, std=std, pixel_range=(lo, hi), mode=mode, out_dtype=out.dtype))

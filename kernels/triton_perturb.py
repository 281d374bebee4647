"""Triton implementation of the fused perturbation kernel.

Same contract as the C++/CUDA op (csrc/perturb.h), same spec
(freeadv_fast/ops/reference.py), same schema as ``freeadv_fast::perturb``
(csrc/ops.cpp). Registered as the torch op ``freeadv_fast::triton_perturb``
through ``torch.library.triton_op`` so that ``torch.compile`` traces into it
instead of breaking the graph; its fake kernel, like the C++ Meta one, does
nothing (shapes never change, nothing is returned).

Triton decides at decoration time whether a kernel is compiled or
interpreted, so ``TRITON_INTERPRET=1`` must be set before this module is
imported for it to run on CPU tensors (that is how CI tests it).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    if INTERPRETED:  # the interpreter cannot time kernels; one config is enough
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [triton.Config({"BLOCK": block}, num_warps=warps)
            for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8), (8192, 16))]


@triton.jit
def _clamp(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


# restore_value: autotuning runs the kernel several times; each run must start
# from the same delta or the tuning itself would move the perturbation.
@triton.autotune(configs=_configs(), key=["numel", "X_U8", "HAS_GRAD", "HAS_OUT", "UPDATE", "PROJECT", "STRICT"],
                 restore_value=["delta_ptr"])
@triton.jit
def _perturb_kernel(x_ptr, delta_ptr, grad_ptr, out_ptr, step_ptr, eps_ptr, mean_ptr, std_ptr,
                    lo, hi, numel, channels, channel_stride,
                    X_U8: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_OUT: tl.constexpr,
                    UPDATE: tl.constexpr, PROJECT: tl.constexpr, STRICT: tl.constexpr, INDEX64: tl.constexpr,
                    BLOCK: tl.constexpr):
    # Inductor passes float scalars as fp64; the spec's arithmetic is fp32
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    pid = tl.program_id(0)
    if INDEX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    c = (offs // channel_stride) % channels

    xv = tl.load(x_ptr + offs, mask=inside, other=0).to(tl.float32)
    if X_U8:
        xv = tl.math.div_rn(xv, 255.0)  # exact, like the reference's x / 255
    d = tl.load(delta_ptr + offs, mask=inside, other=0.0)

    if UPDATE:
        step = tl.load(step_ptr + c, mask=inside, other=0.0)
        eps = tl.load(eps_ptr + c, mask=inside, other=0.0)
        if HAS_GRAD:
            g = tl.load(grad_ptr + offs, mask=inside, other=0).to(tl.float32)
            sgn = (g > 0).to(tl.float32) - (g < 0).to(tl.float32)  # sign(NaN) = 0
        else:
            sgn = tl.zeros_like(d)
        if PROJECT:
            d = _clamp(d + step * sgn, -eps, eps)
            d = _clamp(xv + d, lo, hi) - xv
        else:
            s = xv + d
            if STRICT:
                mask = ((s > lo) & (s < hi)).to(tl.float32)
            else:
                mask = ((s >= lo) & (s <= hi)).to(tl.float32)
            d = _clamp(d + step * sgn * mask, -eps, eps)
        tl.store(delta_ptr + offs, d, mask=inside)

    if HAS_OUT:
        v = xv + d
        if not PROJECT:
            v = _clamp(v, lo, hi)
        mean = tl.load(mean_ptr + c, mask=inside, other=0.0)
        std = tl.load(std_ptr + c, mask=inside, other=1.0)
        o = tl.math.div_rn(v - mean, std)
        tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=inside)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, delta, grad, out, params, pixel_mode):
    """The C++ op's checks (csrc/ops.cpp make_args), so direct torch.ops calls
    cannot make the kernel read or write out of bounds; returns the channel
    stride of delta's dense layout."""
    if x.dim() < 2 or x.dtype not in (torch.uint8, torch.float32) or delta.dtype != torch.float32:
        raise RuntimeError(f"freeadv perturb: x must be uint8 or float32 with a channel dimension and delta "
                           f"float32, got {x.dtype} {tuple(x.shape)} and {delta.dtype}")
    if not 0 <= pixel_mode <= 2:
        raise RuntimeError("freeadv perturb: mode must be 0 (clamp_input), 1 (project) or 2 (clamp_input_strict)")
    channels_last = not delta.is_contiguous() and x.dim() == 4 and delta.is_contiguous(
        memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, t, dtypes in (("delta", delta, None), ("x", x, None), ("grad", grad, _FLOATS), ("out", out, _FLOATS)):
        if t is not None and (t.shape != x.shape or t.device != x.device or not t.is_contiguous(memory_format=fmt)
                              or (dtypes and t.dtype not in dtypes)):
            raise RuntimeError(f"freeadv perturb: {name} ({t.dtype}, {tuple(t.shape)} on {t.device}) must have "
                               f"x's shape and device and delta's dense memory layout")
    for t in params:
        if t.device != x.device or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != x.shape[1]:
            raise RuntimeError(f"freeadv perturb: step, eps, mean and std must be contiguous float32 tensors of "
                               f"{x.shape[1]} values on {x.device}")
    return 1 if channels_last else math.prod(x.shape[2:])


# the schema of freeadv_fast::perturb (csrc/ops.cpp) word for word; the one
# inferred from the annotations would read "SymInt pixel_mode"
SCHEMA = ("(Tensor x, Tensor(a!) delta, Tensor? grad, Tensor(b!)? out, Tensor step, Tensor eps, "
          "Tensor mean, Tensor std, float lo, float hi, int pixel_mode, bool update) -> ()")


@triton_op("freeadv_fast::triton_perturb", mutates_args={"delta", "out"}, schema=SCHEMA)
def perturb(x: torch.Tensor, delta: torch.Tensor, grad: Optional[torch.Tensor], out: Optional[torch.Tensor],
            step: torch.Tensor, eps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
            lo: float, hi: float, pixel_mode: int, update: bool) -> None:
    """Arguments as freeadv_fast::perturb (csrc/ops.cpp): all tensors in delta's
    dense layout (contiguous, or channels_last for 4-D), parameters one
    float32 per channel."""
    channel_stride = _check(x, delta, grad, out, (step, eps, mean, std), pixel_mode)
    numel = x.numel()
    if numel == 0 or (not update and out is None):
        return
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    wrap_triton(_perturb_kernel)[grid](
        x, delta, grad if grad is not None else x, out if out is not None else delta,
        step, eps, mean, std, float(lo), float(hi), numel, x.shape[1], channel_stride,
        X_U8=x.dtype == torch.uint8, HAS_GRAD=grad is not None, HAS_OUT=out is not None,
        UPDATE=update, PROJECT=pixel_mode == 1, STRICT=pixel_mode == 2, INDEX64=numel >= 2**31)


@perturb.register_fake
def _perturb_fake(x, delta, grad, out, step, eps, mean, std, lo, hi, pixel_mode, update):
    """Shapes never change and nothing is returned, so tracing needs no work
    (the Meta kernel of the C++ op; the Triton interpreter cannot run on fake tensors)."""

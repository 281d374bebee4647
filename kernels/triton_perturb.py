"""Triton implementation of the fused perturbation kernel.

Same contract as the C++/CUDA op (csrc/perturb.h), same spec
(freeadv_fast/ops/reference.py). Registered as the torch op
``freeadv_fast::perturb_triton`` through ``torch.library.triton_op`` so that
``torch.compile`` traces into it instead of breaking the graph.

Triton decides at decoration time whether a kernel is compiled or
interpreted, so ``TRITON_INTERPRET=1`` must be set before this module is
imported for it to run on CPU tensors (that is how CI tests it).
"""
from __future__ import annotations

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


@triton_op("freeadv_fast::perturb_triton", mutates_args={"delta", "out"})
def perturb_triton(x: torch.Tensor, delta: torch.Tensor, grad: Optional[torch.Tensor], out: Optional[torch.Tensor],
                   step: torch.Tensor, eps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   lo: float, hi: float, pixel_mode: int, update: bool, channel_stride: int) -> None:
    """Arguments as freeadv_fast::perturb; tensors share one dense layout whose
    channel of element i is (i // channel_stride) % channels."""
    numel = x.numel()
    if numel == 0 or (not update and out is None):
        return
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    wrap_triton(_perturb_kernel)[grid](
        x, delta, grad if grad is not None else x, out if out is not None else delta,
        step, eps, mean, std, float(lo), float(hi), numel, x.shape[1], channel_stride,
        X_U8=x.dtype == torch.uint8, HAS_GRAD=grad is not None, HAS_OUT=out is not None,
        UPDATE=update, PROJECT=pixel_mode == 1, STRICT=pixel_mode == 2, INDEX64=numel >= 2**31)

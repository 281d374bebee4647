"""Microbenchmark of the fused perturbation ops.

For each op (make_input, update_delta_, update_and_make_input_) and batch
(ImageNet 256x3x224x224, CIFAR 512x3x32x32; uint8 x, bf16 channels_last
grad/out) it times every available backend, the same computation as eager
unfused PyTorch (the reference) and as torch.compile of the reference, and
reports time, effective bandwidth (the minimum bytes the op must move / time)
and that bandwidth as a fraction of a device-to-device copy timed in the same
run.

    python bench/kernels.py [--device cuda|cpu] [--quick] [--json PATH]

--quick uses smaller batches and fewer repetitions (the CPU run in CI).
"""
from __future__ import annotations

import os
import sys

import torch

import freeadv_fast.ops as ops
from common import device_name, guarded, in_graph_ms, median_ms, parse, parser, write_json
from freeadv_fast.data.imagenet import MEAN, STD
from freeadv_fast.ops import reference

EPS = STEP = 4 / 255
# bytes per element each op must move at the least: uint8 x, fp32 delta, bf16 grad/out
MIN_BYTES = {"make_input": 1 + 4 + 2, "update_delta_": 1 + 4 + 2 + 4, "update_and_make_input_": 1 + 4 + 2 + 4 + 2}


def shapes(quick: bool, device: str):
    if quick and device == "cpu":
        return {"imagenet": (16, 3, 224, 224), "cifar": (128, 3, 32, 32)}
    return {"imagenet": (256, 3, 224, 224), "cifar": (512, 3, 32, 32)}


def make_batch(shape, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)  # as DALI delivers it (NHWC)
    delta = torch.empty(shape, device=device).uniform_(-EPS, EPS, generator=g)
    delta = delta.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, device=device, generator=g).to(torch.bfloat16)
    grad = grad.contiguous(memory_format=torch.channels_last)
    out = torch.empty(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return x, delta, grad, out


def op_calls(x, delta, grad, out, backend):
    kw = dict(step_size=STEP, epsilon=EPS)
    norm = dict(mean=MEAN, std=STD, out_dtype=torch.bfloat16)
    return {
        "make_input": lambda: ops.make_input(x, delta, out=out, backend=backend, **norm),
        "update_delta_": lambda: ops.update_delta_(delta, grad, x, backend=backend, **kw),
        "update_and_make_input_": lambda: ops.update_and_make_input_(delta, grad, x, out=out, backend=backend,
                                                                     **kw, **norm),
    }


def reference_calls(x, delta, grad, out, wrap):
    """The same computation written as plain PyTorch, optionally compiled."""
    mean, std = (torch.tensor(v, device=x.device) for v in (MEAN, STD))
    norm = dict(mean=mean, std=std, out_dtype=torch.bfloat16, memory_format=torch.channels_last)
    kw = dict(step_size=STEP, epsilon=EPS)
    fns = {
        "make_input": wrap(lambda x, delta, out: out.copy_(reference.make_input(x, delta, **norm))),
        "update_delta_": wrap(lambda x, delta, grad: reference.update_delta_(delta, grad, x, **kw)),
        "update_and_make_input_": wrap(lambda x, delta, grad, out: out.copy_(
            reference.update_and_make_input_(delta, grad, x, **kw, **norm))),
    }
    return {
        "make_input": lambda: fns["make_input"](x, delta, out),
        "update_delta_": lambda: fns["update_delta_"](x, delta, grad),
        "update_and_make_input_": lambda: fns["update_and_make_input_"](x, delta, grad, out),
    }


@guarded
def main(argv=None):
    p = parser(__doc__, quick="smaller CPU batches, fewer repetitions", json="write the records here")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parse(p, argv)
    device = args.device
    reps, warmup = (5, 2) if args.quick else (50, 10)

    backends = [b for b in ops.available_backends(device) if b != "torch"]
    if device.type == "cpu" and "triton" in backends:
        backends.remove("triton")  # the interpreter is a correctness tool, not a speed one
    variants = [(b, None) for b in backends] + [("eager", lambda f: f)]
    if not args.no_compile:
        variants.append(("compile", torch.compile))

    records = []
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    for shape_name, shape in shapes(args.quick, device.type).items():
        x, delta, grad, out = make_batch(shape, device)
        numel = x.numel()
        src = torch.empty(numel, device=device)
        dst = torch.empty_like(src)
        copy_ms = median_ms(lambda: dst.copy_(src), device, reps, warmup)
        copy_gbps = 2 * 4 * numel / copy_ms / 1e6
        # in a graph too: back-to-back calls are what a captured step runs, and the fair copy to compare them to
        copy_graph_gbps = 2 * 4 * numel / in_graph_ms(lambda: dst.copy_(src)) / 1e6 if device.type == "cuda" else None
        print(f"\n{shape_name} {'x'.join(map(str, shape))}: device-to-device copy {copy_gbps:.1f} GB/s"
              + (f", {copy_graph_gbps:.1f} GB/s in a graph" if copy_graph_gbps else ""))
        print(f"  {'op':<24}{'variant':<10}{'ms':>10}{'GB/s':>10}{'of copy':>9}{'vs eager':>10}"
              f"{'in graph':>10}{'of copy':>9}")
        eager_ms = {}
        for variant, wrap in sorted(variants, key=lambda v: v[0] != "eager"):
            calls = op_calls(x, delta, grad, out, variant) if wrap is None else reference_calls(
                x, delta, grad, out, wrap)
            for op_name, fn in calls.items():
                delta.uniform_(-EPS, EPS)
                ms = median_ms(fn, device, reps, warmup)
                gbps = MIN_BYTES[op_name] * numel / ms / 1e6
                if variant == "eager":
                    eager_ms[op_name] = ms
                speedup = eager_ms[op_name] / ms
                graph_ms = None
                if device.type == "cuda":
                    try:
                        graph_ms = in_graph_ms(fn)
                    except Exception as exc:  # a variant that cannot be captured is reported, not fatal
                        print(f"  ({op_name} {variant}: not capturable: {type(exc).__name__}: {exc})"[:200])
                graph_fraction = MIN_BYTES[op_name] * numel / graph_ms / 1e6 / copy_graph_gbps if graph_ms else None
                graphed = f"{graph_ms:>10.3f}{graph_fraction:>9.0%}" if graph_ms else ""
                print(f"  {op_name:<24}{variant:<10}{ms:>10.3f}{gbps:>10.1f}{gbps / copy_gbps:>9.0%}{speedup:>9.1f}x"
                      + graphed)
                records.append({"op": op_name, "backend": variant, "shape": shape_name, "dims": list(shape),
                                "time_ms": ms, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
                                "speedup_vs_eager": speedup, "copy_gbps": copy_gbps, "in_graph_ms": graph_ms,
                                "copy_in_graph_gbps": copy_graph_gbps, "in_graph_fraction_of_copy": graph_fraction})
    if args.json:
        flags = os.environ.get("FREEADV_KERNEL_FLAGS") or "the defaults in kernels/perturb.cu"
        write_json(args.json, device, {"quick": args.quick, "reps": reps, "kernel_flags": flags}, records=records)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What free-m's input gradient costs at ResNet-50's first convolution, and
where a free replay's time goes against a natural step.

    python bench/stem_grad.py [--device cuda|cpu] [--quick] [--json PATH]

Free-m needs d loss / d input, which natural training never computes: at
ResNet-50 224 px that is the data gradient of the 7x7 stride-2 convolution
from 64 channels back to 3. This times, on the conv1 shapes of the batch
(bf16, channels_last on a GPU), the weight gradient alone (natural's
backward of conv1) against the weight and input gradients, with the input
gradient computed as autograd does (3 channels), with the weight padded
with zero channels to 4 and 8 (the gradient of the first 3 channels is the
same sum), and as a sub-pixel stride-1 convolution to 12 channels
(freeadv_fast/stem.py), in channels_last and NCHW. Then it profiles one eager natural
step and one eager free-4 replay of the whole model and lists the kernels
whose CUDA time differs most.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from common import guarded, median_ms, parse, parser, write_json
from freeadv_fast import FreeAdversarialTrainer, NaturalTrainer
from freeadv_fast.data.imagenet import MEAN, STD
from freeadv_fast.models import create_model
from freeadv_fast.stem import subpixel_input_grad, use_fast_input_grad


def conv1_backward(gy, x, w, *, input_grad, weight_grad=True):
    return torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], [3, 3], [1, 1], False, [0, 0], 1,
                                               [input_grad, weight_grad, False])


def conv1_timings(device, batch, size, dtype, reps):
    rows = []
    for layout in ("channels_last", "nchw"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = torch.randn(64, 3, 7, 7, device=device, dtype=dtype).contiguous(memory_format=fmt)
        gy = torch.randn(batch, 64, size // 2, size // 2, device=device, dtype=dtype).contiguous(memory_format=fmt)
        cases = {"weight grad only (natural)": lambda: conv1_backward(gy, x, w, input_grad=False),
                 "weight + input grad, 3 channels (autograd)": lambda: conv1_backward(gy, x, w, input_grad=True)}
        for c in (4, 8):
            xc = torch.empty(batch, c, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
            wc = F.pad(w, (0, 0, 0, 0, 0, c - 3)).contiguous(memory_format=fmt)

            def padded(xc=xc, wc=wc):
                conv1_backward(gy, x, w, input_grad=False)
                gx = conv1_backward(gy, xc, wc, input_grad=True, weight_grad=False)[0]
                return gx[:, :3].contiguous(memory_format=fmt)
            cases[f"weight grad + input grad via {c}-channel padded weight"] = padded
        def subpixel():
            conv1_backward(gy, x, w, input_grad=False)
            return subpixel_input_grad(w, gy, (2, 2), (3, 3), tuple(x.shape)).contiguous(memory_format=fmt)
        cases["weight grad + input grad via sub-pixel convolution (12 channels)"] = subpixel
        base = None
        for name, fn in cases.items():
            ms = median_ms(fn, device, reps, warmup=3)
            base = ms if base is None else base
            rows.append({"layout": layout, "case": name, "ms": ms, "extra_ms_over_natural": ms - base})
            print(f"  conv1 {layout:13s} {name:55s} {ms:7.3f} ms  (+{ms - base:.3f})", flush=True)
    return rows


def step_timings(device, batch, size, dtype, reps):
    """Forward and backward of the whole model (autocast, channels_last): the
    weight gradients only (natural), plus the input gradient from autograd,
    plus the input gradient made from conv1's output gradient (caught by a
    hook) with the weight padded to 4 or 8 channels, and through the stem's
    own backward (freeadv_fast/stem.py: StemConv2d, "subpixel" and "padded",
    what free-m's stem_input_grad uses)."""
    torch.manual_seed(0)
    model = create_model("resnet50", 1000).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    conv1 = model.conv1
    caught = {}

    def catch(module, inputs, output):  # conv1's output gradient, which natural training computes anyway
        if output.requires_grad:
            output.register_hook(lambda g: caught.__setitem__("gy", g))
    conv1.register_forward_hook(catch)

    def forward_backward(inp, net=model):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(net(inp), y)
        loss.backward()

    def natural():
        forward_backward(x)

    def autograd_input():
        inp = x.detach().requires_grad_(True)
        forward_backward(inp)
        return inp.grad

    def padded(c):
        def run():
            forward_backward(x)
            w = F.pad(conv1.weight.to(dtype), (0, 0, 0, 0, 0, c - 3)).contiguous(memory_format=torch.channels_last)
            shape = torch.empty(batch, c, size, size, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            gx = conv1_backward(caught["gy"], shape, w, input_grad=True, weight_grad=False)[0]
            return gx[:, :3].contiguous(memory_format=torch.channels_last)
        return run

    def stem(how):
        net = copy.deepcopy(model)
        use_fast_input_grad(net, how)

        def run():
            inp = x.detach().requires_grad_(True)
            forward_backward(inp, net)
            return inp.grad
        return run
    subpixel = stem("subpixel")
    rows = []
    for name, fn in (("natural (weight gradients)", natural), ("+ input grad, autograd", autograd_input),
                     ("+ input grad, 4-channel padded dgrad", padded(4)),
                     ("+ input grad, 8-channel padded dgrad", padded(8)),
                     ("+ input grad, StemConv2d sub-pixel", subpixel),
                     ("+ input grad, StemConv2d padded", stem("padded"))):
        model.zero_grad(set_to_none=True)
        ms = median_ms(fn, device, reps, warmup=3)
        rows.append({"case": name, "ms": ms})
        print(f"  whole step {name:40s} {ms:8.3f} ms", flush=True)
    g_auto, g8, gs = autograd_input(), padded(8)(), subpixel()
    rows.append({"sign_agreement_autograd_vs_padded8": float((g_auto.sign() == g8.sign()).float().mean()),
                 "sign_agreement_autograd_vs_subpixel": float((g_auto.sign() == gs.sign()).float().mean())})
    print(f"  sign(input grad) agreement with autograd: 8-channel padded "
          f"{rows[-1]['sign_agreement_autograd_vs_padded8']:.6f}, sub-pixel "
          f"{rows[-1]['sign_agreement_autograd_vs_subpixel']:.6f}")
    return rows


def profile_steps(device, batch, size, precision, steps):
    """Top kernels by CUDA time of one eager natural step against one eager free-4 replay."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device, generator=g).permute(0, 3, 1, 2)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    out = {}
    for name, cls, extra in (("natural", NaturalTrainer, {}),
                             ("free-4", FreeAdversarialTrainer, dict(replays=4, epsilon=4 / 255, step_size=4 / 255))):
        model = create_model("resnet50", 1000).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        t = cls(model, opt, mean=MEAN, std=STD, precision=precision, channels_last=True, **extra)
        for _ in range(3):
            t.train_batch(x, y)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                t.train_batch(x, y)
        per = steps * (extra.get("replays", 1))
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        out[name] = {e.key: getattr(e, key) / per / 1000 for e in prof.key_averages()
                     if e.key and not e.key.startswith(("aten::", "ProfilerStep", "cuda", "Optimizer", "autograd"))}
    keys = set(out["natural"]) | set(out["free-4"])
    diff = sorted(((out["free-4"].get(k, 0) - out["natural"].get(k, 0), k) for k in keys), reverse=True)
    total = {n: sum(v.values()) for n, v in out.items()}
    print(f"  kernel time per step: natural {total['natural']:.2f} ms, free-4 replay {total['free-4']:.2f} ms")
    rows = []
    for d, k in diff[:15]:
        print(f"  {d:+8.3f} ms  natural {out['natural'].get(k, 0):7.3f}  free {out['free-4'].get(k, 0):7.3f}  {k[:110]}")
        rows.append({"kernel": k, "natural_ms": out["natural"].get(k, 0), "free_ms": out["free-4"].get(k, 0)})
    return {"kernel_ms_per_step": total, "largest_differences": rows}


@guarded
def main(argv=None):
    p = parser(__doc__, quick="batch 2 at 64 px (the CPU check in CI)")
    args = parse(p, argv)
    device, gpu = args.device, args.device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    batch, size = (2, 64) if args.quick else (256, 224)
    dtype, precision = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    print(f"conv1 of ResNet-50, batch {batch} at {size}px, {dtype}", flush=True)
    conv = conv1_timings(device, batch, size, dtype, 3 if args.quick else 20)
    print("whole ResNet-50 forward and backward", flush=True)
    steps = step_timings(device, batch, size, dtype, 3 if args.quick else 10)
    print("profile: one natural step against one free-4 replay", flush=True)
    prof = profile_steps(device, batch, size, precision, 1 if args.quick else 3)
    if args.json:
        write_json(args.json, device, {"batch_size": batch, "image_size": size, "precision": precision},
                   conv1=conv, whole_step=steps, profile=prof)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

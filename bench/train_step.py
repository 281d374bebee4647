"""Training throughput of free-m against natural training, PGD-7, FGSM-RS and
the paper's own loop: one process, one model, one batch, one device.

    python bench/train_step.py [--device cuda|cpu] [--model resnet50|preact_resnet18|wide_resnet32_10]
                               [--batch-size B] [--precision fp32,bf16] [--quick] [--no-compile] [--json PATH]

Every method trains the same architecture from the same initial weights on
the same synthetic uint8 NHWC batch already on the device (loading is out of
the picture; bench/loader.py measures it). After warm-up, a method's steps
are timed with CUDA events (wall clock on CPU) and one synchronise at each
end. Rates are images per second of optimizer steps: for free-m one replay
of a batch of B images counts B ("image-replays/s"), for PGD-7 and FGSM-RS
one attacked-and-trained batch counts B.

The official loop is the paper's ImageNet code (main_free.py) reproduced:
fp32, eager, delta as a leaf tensor with requires_grad, unfused
sign/add/clamp, and .item() plus accuracy on every replay.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from freeadv_fast import FastTrainer, FreeAdversarialTrainer, NaturalTrainer, PGDTrainer
from freeadv_fast.models import create_model
from provenance import device_name, provenance

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EPS = 4 / 255
IMAGENET_TRAIN, CIFAR_TRAIN = 1_281_167, 50_000
# the paper's runs, for the time-to-robust-model projection
PAPER_RUNS = {"resnet50": ("ImageNet ResNet-50 free-4, 90 epochs-equivalent", IMAGENET_TRAIN, 90, 4,
                           "2 days on 4 P100s (paper abstract)"),
              "wide_resnet32_10": ("CIFAR-10 WRN-32-10 free-8, 205 epochs-equivalent", CIFAR_TRAIN, 205, 8,
                                   "785 minutes (paper, Table 1)")}


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, steps):
        """Seconds for ``steps`` calls of ``fn``, synchronised only at the ends."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t0


def official_free_step(model, optimizer, x, y, noise, mean, std, replays, step, eps):
    """One minibatch of the paper's main_free.py, as written there."""
    x = x.float() / 255
    n = x.shape[0]
    for _ in range(replays):
        noise_batch = noise[0:n].clone().requires_grad_(True)
        in1 = x + noise_batch
        in1.clamp_(0, 1.0)
        in1.sub_(mean).div_(std)
        output = model(in1)
        loss = F.cross_entropy(output, y)
        prec1 = (output.argmax(1) == y).float().mean()
        optimizer.zero_grad()
        loss.backward()
        pert = step * torch.sign(noise_batch.grad)
        noise[0:n] += pert.data
        noise.clamp_(-eps, eps)
        optimizer.step()
        loss.item(), prec1.item()  # the official loop logs both every replay


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, choices=["resnet50", "preact_resnet18", "wide_resnet32_10"])
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--precision", default=None, help="comma-separated: fp32,bf16 (default both on GPU, fp32 on CPU)")
    p.add_argument("--quick", action="store_true", help="few steps, small batch (the CPU run in CI)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench/train_step.py: --device cuda asked for, but torch sees no GPU\n")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model_name = args.model or ("resnet50" if gpu else "preact_resnet18")
    size = args.image_size or (224 if model_name == "resnet50" else 32)
    batch = args.batch_size or (8 if args.quick else (256 if model_name == "resnet50" else 128))
    precisions = (args.precision or ("fp32,bf16" if gpu else "fp32")).split(",")
    compile_variants = [False] if (args.no_compile or (args.quick and not gpu)) else [False, True]
    warmup, steps = (1, 2) if args.quick else (5, 20)
    if gpu:
        torch.backends.cudnn.benchmark = True
    classes = 1000 if model_name == "resnet50" else 10

    torch.manual_seed(0)
    base = create_model(model_name, classes).to(device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device, generator=g)
    x = x.permute(0, 3, 1, 2)  # NHWC storage, as DALI delivers it
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    timer = Timer(device)
    records = []
    print(f"{device_name(device)}; {model_name} at {size}px, batch {batch}; torch {torch.__version__}", flush=True)

    def measure(name, make_step, images_per_call, **info):
        model = copy.deepcopy(base)
        if info.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        step = make_step(model, optimizer)
        for _ in range(warmup):
            step()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timer(step, steps)
        rate = images_per_call * steps / seconds
        record = {"method": name, "images_per_s": rate, "seconds": seconds, "steps": steps,
                  "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if gpu else None, **info}
        records.append(record)
        mem = f"{record['peak_memory_gib']:.1f} GiB" if gpu else ""
        print(f"  {name:<28} {rate:10.1f} images/s  {mem}", flush=True)
        del model, optimizer, step
        if gpu:
            torch.cuda.empty_cache()

    def engine(cls, **kw):
        def make(model, optimizer):
            trainer = cls(model, optimizer, mean=MEAN, std=STD, **kw)
            return lambda: trainer.train_batch(x, y)
        return make

    for precision in precisions:
        cl = gpu  # channels_last on GPUs, where it pays
        common = dict(precision=precision, channels_last=cl)
        measure(f"natural {precision}", engine(NaturalTrainer, **common), batch, precision=precision,
                channels_last=cl, replays=1, compile=False)
        for m in (4, 8):
            for comp in compile_variants:
                name = f"free-{m} {precision}" + (" compile" if comp else "")
                measure(name, engine(FreeAdversarialTrainer, replays=m, epsilon=EPS, step_size=EPS, compile=comp,
                                     **common), batch * m, precision=precision, channels_last=cl, replays=m,
                        compile=comp)
        measure(f"pgd-7 {precision}", engine(PGDTrainer, steps=7, epsilon=EPS, step_size=EPS / 4, **common), batch,
                precision=precision, channels_last=cl, replays=1, compile=False, attack_steps=7)
        measure(f"fgsm-rs {precision}", engine(FastTrainer, epsilon=EPS, **common), batch, precision=precision,
                channels_last=cl, replays=1, compile=False, attack_steps=1)

    def official(model, optimizer):
        noise = torch.zeros(x.shape, device=device)
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        return lambda: official_free_step(model, optimizer, x, y, noise, mean, std, 4, EPS, EPS)
    measure("official free-4 fp32", official, batch * 4, precision="fp32", channels_last=False, replays=4,
            compile=False)

    summary = summarize(records, model_name, precisions)
    for line in summary["lines"]:
        print(line)
    if args.json:
        meta = {**provenance(device), "model": model_name, "image_size": size, "batch_size": batch,
                "warmup": warmup, "steps": steps, "quick": args.quick}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"meta": meta, "records": records, "ratios": summary["ratios"], "projections": summary["projections"]}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def summarize(records, model_name, precisions):
    by = {r["method"]: r for r in records}
    ratios, lines, projections = {}, ["", "ratios:"], []
    for precision in precisions:
        natural = by[f"natural {precision}"]["images_per_s"]
        for m in (4, 8):
            for suffix in ("", " compile"):
                free = by.get(f"free-{m} {precision}{suffix}")
                if free is None:
                    continue
                key = f"free-{m} {precision}{suffix}"
                ratios[f"{key} / natural"] = free["images_per_s"] / natural
                ratios[f"{key} / official free-4 fp32"] = free["images_per_s"] / by["official free-4 fp32"][
                    "images_per_s"]
        free4 = by[f"free-4 {precision}"]["images_per_s"]
        # per epoch-equivalent, free-m takes one replay step per image; PGD-7 one attacked step per image
        ratios[f"pgd-7 / free-4 cost per epoch-equivalent ({precision})"] = free4 / by[f"pgd-7 {precision}"][
            "images_per_s"]
        ratios[f"fgsm-rs / free-4 cost per epoch-equivalent ({precision})"] = free4 / by[f"fgsm-rs {precision}"][
            "images_per_s"]
    for k, v in ratios.items():
        lines.append(f"  {k:<52} {v:6.2f}")
    if model_name in PAPER_RUNS:
        what, n, epochs, m, paper = PAPER_RUNS[model_name]
        best = max((r for r in records if r["method"].startswith(f"free-{m} ")), key=lambda r: r["images_per_s"])
        hours = n * epochs / best["images_per_s"] / 3600
        projections.append({"run": what, "method": best["method"], "hours_one_device": hours,
                            "hours_four_devices_ideal": hours / 4, "paper": paper})
        lines.append(f"projected: {what} with {best['method']}: {hours:.1f} h on one device, {hours / 4:.1f} h on "
                     f"four (ideal scaling); the paper: {paper}")
    return {"ratios": ratios, "lines": lines, "projections": projections}


if __name__ == "__main__":
    sys.exit(main())

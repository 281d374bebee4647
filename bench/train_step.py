"""Training throughput of free-m against natural training, PGD-7, FGSM-RS and
the paper's own loop: one process, one model, one batch, one device.

    python bench/train_step.py [--device cuda|cpu] [--model resnet50|preact_resnet18|wide_resnet32_10]
                               [--batch-size B] [--precision fp32,bf16] [--quick] [--steps N]
                               [--variants eager,graph,compile,compile+graph] [--methods ...]
                               [--compile-mode default|max-autotune-no-cudagraphs] [--json PATH]
                               [--stem-input-grad autograd,padded,subpixel]

Every method trains the same architecture from the same initial weights on
the same synthetic uint8 NHWC batch already on the device (loading is out of
the picture; bench/loader.py measures it). After warm-up, a method's steps
are timed with CUDA events (wall clock on CPU) and one synchronise at each
end. Rates are images per second of optimizer steps: for free-m one replay
of a batch of B images counts B ("image-replays/s"), for PGD-7 and FGSM-RS
one attacked-and-trained batch counts B.

The official loop is the paper's ImageNet code (main_free.py) reproduced:
fp32, eager, delta as a leaf tensor with requires_grad, unfused
sign/add/clamp, and .item() plus accuracy on every replay. Two stronger
baselines are what a user adds in five lines: the same loop with bf16
autocast and channels_last, and that loop with the model under
torch.compile (its compile time is recorded).

Variants of our engine: eager, ``graph`` (whole steps as CUDA graphs,
--cuda-graph), ``compile`` (torch.compile of the model and the fused update,
in --compile-mode) and ``compile+graph``; "first call" records the first
step's time, which for compiled variants is mostly compiling.
"""
from __future__ import annotations

import copy
import gc
import sys

import torch
import torch.nn.functional as F

from common import (InputError, best_step_rates, device_name, elapsed_s, guarded, parse, parser,
                    positive, read_json, wall_clock, write_json)
from freeadv_fast import FastTrainer, FreeAdversarialTrainer, NaturalTrainer, PGDTrainer
from freeadv_fast.cli import comma_list
from freeadv_fast.data.imagenet import MEAN, STD
from freeadv_fast.models import create_model
from freeadv_fast.stem import INPUT_GRADS

EPS = 4 / 255
IMAGENET_TRAIN, CIFAR_TRAIN = 1_281_167, 50_000
# the paper's runs, for the time-to-robust-model projection
PAPER_RUNS = {"resnet50": ("ImageNet ResNet-50 free-4, 90 epochs-equivalent", IMAGENET_TRAIN, 90, 4,
                           "2 days on 4 P100s (paper abstract)"),
              "wide_resnet32_10": ("CIFAR-10 WRN-32-10 free-8, 205 epochs-equivalent", CIFAR_TRAIN, 205, 8,
                                   "785 minutes (paper, Table 1)")}


def official_free_step(model, optimizer, x, y, noise, mean, std, replays, step, eps, amp_dtype=None):
    """One minibatch of the paper's main_free.py, as written there (with
    ``amp_dtype``: the same under autocast, what a user adds first)."""
    x = x.float() / 255
    n = x.shape[0]
    for _ in range(replays):
        noise_batch = noise[0:n].clone().requires_grad_(True)
        in1 = x + noise_batch
        in1.clamp_(0, 1.0)
        in1.sub_(mean).div_(std)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(in1)
        loss = F.cross_entropy(output.float(), y)
        prec1 = (output.argmax(1) == y).float().mean()
        optimizer.zero_grad()
        loss.backward()
        pert = step * torch.sign(noise_batch.grad)
        noise[0:n] += pert.data
        noise.clamp_(-eps, eps)
        optimizer.step()
        loss.item(), prec1.item()  # the official loop logs both every replay


# other ImageNet runs the projection of a phased preset is set beside (as the issue tracker quotes them)
OTHER_IMAGENET_RUNS = ("the paper's free-4, 90 epochs: 2 days on 4 P100s", "Fast-AT's free run: 52 h",
                       "Fast-AT's FGSM run: 12 h")
METHOD_NAMES = ("natural", "free-4", "free-8", "pgd-7", "fgsm-rs", "official")
VARIANTS = ("eager", "graph", "compile", "compile+graph")  # how each method's step runs (main's `known`)
PROJECTED_METHOD = {"free": "free-{replays}", "fast": "fgsm-rs", "natural": "natural", "pgd": "pgd-7"}


def project(preset: str, files) -> dict:
    """The wall time of an ImageNet preset with phases on one device, from
    measured step rates at each phase's image size (results of this script,
    one file per size): a phase of E epochs takes E x 1,281,167 images (image-
    replays for free-m) at the best rate measured for its method and size."""
    from freeadv_fast.config import build_config
    from freeadv_fast.phases import parse as parse_phases
    cfg = build_config(preset=preset)
    if cfg.dataset != "imagenet":
        raise InputError(f"--project {preset}: not an ImageNet preset (it trains {cfg.dataset}); the projection "
                         "counts ImageNet's images")
    if not files:  # "no free-4 rate in the results given" said this less plainly
        raise InputError(f"--project {preset} needs --results FILE ...: bench/train_step.py results measured at "
                         "the preset's image sizes")
    for f in files:
        model = read_json(f, "a bench/train_step.py result")["meta"].get("model")
        if model != cfg.arch:
            raise InputError(f"--project {preset} trains {cfg.arch}, but {f} measured {model}")
    phases = parse_phases(cfg.phases or [f"{cfg.epochs}:{cfg.image_size or 224}"], epochs=cfg.epochs,
                          batch_size=cfg.batch_size)
    kind = PROJECTED_METHOD[cfg.method].format(replays=cfg.replays)
    measured = best_step_rates(files, (kind,))
    rows, total, start = [], 0.0, 0.0
    for p in phases:
        if kind not in measured.get(p.image_size, {}):
            raise InputError(f"--project: no {kind} rate at {p.image_size} px in the results given")
        m = measured[p.image_size][kind]
        hours = (p.until - start) * IMAGENET_TRAIN / m["images_per_s"] / 3600
        rows.append({"until": p.until, "image_size": p.image_size, "batch_size": p.batch_size,
                     "measured_batch": m["batch_size"], "method": m["method"], "images_per_s": m["images_per_s"],
                     "hours": hours, "file": m["file"]})
        total, start = total + hours, p.until
    return {"preset": preset, "method": kind, "phases": rows, "hours_one_device": total, "others": OTHER_IMAGENET_RUNS}


def print_projection(doc):
    print(f"projected {doc['preset']} ({doc['method']}) on one device:")
    for r in doc["phases"]:
        batch = "" if r["measured_batch"] == r["batch_size"] else f" (measured at batch {r['measured_batch']})"
        print(f"  until epoch {r['until']:g}: {r['image_size']} px, batch {r['batch_size']}: {r['method']} at "
              f"{r['images_per_s']:.0f}/s{batch} -> {r['hours']:.2f} h")
    print(f"  total {doc['hours_one_device']:.2f} h on one device, data loading not counted; beside: "
          + "; ".join(doc["others"]))


@guarded
def main(argv=None):
    p = parser(__doc__, quick="few steps, small batch (the CPU run in CI)", several=True,
               precision="comma-separated: fp32,bf16 (default both on GPU, fp32 on CPU)")
    p.add_argument("--project", metavar="PRESET", help="print the projected wall time of a preset with phases "
                   "(e.g. imagenet-fast-free4-eps4) from --results files, measuring nothing")
    p.add_argument("--results", nargs="+", default=[], metavar="FILE", help="with --project: results of this "
                   "script, one per image size of the preset's phases")
    p.add_argument("--model", default=None, choices=["resnet50", "preact_resnet18", "wide_resnet32_10"])
    p.add_argument("--batch-size", type=positive(int))
    p.add_argument("--image-size", type=positive(int))
    p.add_argument("--variants", type=comma_list(choices=VARIANTS, distinct=True),
                   help="comma-separated subset of " + ",".join(VARIANTS) + " (default: eager,graph on a GPU, eager "
                        "on CPU; compiling costs minutes)")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compile variants and of the compiled official loop")
    p.add_argument("--steps", type=positive(int), help="timed calls per variant (default 20; --quick 2)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES), type=comma_list(choices=METHOD_NAMES, distinct=True),
                   help="comma-separated subset of " + ",".join(METHOD_NAMES))
    p.add_argument("--stem-input-grad", default="autograd",
                   type=comma_list(choices=("autograd", *INPUT_GRADS), distinct=True),
                   help="comma-separated: how free-m makes its input gradient, each measured (autograd, "
                        + ", ".join(INPUT_GRADS) + "; freeadv_fast/stem.py); rows other than autograd's are "
                        "named 'stem-<how>'")
    args = parse(p, argv)
    if args.results and not args.project:  # read by the projection alone: nothing would look at them
        p.error("--results is read by --project PRESET; add it (or leave --results out)")
    if args.project:
        doc = project(args.project, args.results)
        print_projection(doc)
        if args.json:
            write_json(args.json, args.device, {"command_kind": "projection"}, projection=doc)
        return 0
    device = args.device
    gpu = device.type == "cuda"
    model_name = args.model or ("resnet50" if gpu else "preact_resnet18")
    size = args.image_size or (224 if model_name == "resnet50" else 32)
    batch = args.batch_size or (8 if args.quick else (256 if model_name == "resnet50" else 128))
    precisions = args.precision or (["fp32", "bf16"] if gpu else ["fp32"])
    methods = set(args.methods)
    known = {"eager": ("", {}), "graph": (" graph", dict(cuda_graph=True)),
             "compile": (" compile", dict(compile=args.compile_mode)),
             "compile+graph": (" compile+graph", dict(compile=args.compile_mode, cuda_graph=True))}
    chosen = args.variants or (["eager", "graph"] if gpu else ["eager"])
    if not gpu and (graphed := [v for v in chosen if "graph" in v]):  # they ran eagerly, recorded as graphed
        raise InputError(f"--variants {','.join(graphed)}: CUDA graphs need a CUDA device, not {device}")
    variants = [known[v] for v in chosen]
    stems = args.stem_input_grad
    compiling = any("compile" in v for v in chosen)
    # a captured step needs 3 eager warm-up steps and the capture: 5 calls reach the steady state
    warmup, steps = (1 if args.quick else 5), args.steps or (2 if args.quick else 20)
    if gpu:
        torch.backends.cudnn.benchmark = True
    classes = 1000 if model_name == "resnet50" else 10

    torch.manual_seed(0)
    base = create_model(model_name, classes).to(device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device, generator=g)
    x = x.permute(0, 3, 1, 2)  # NHWC storage, as DALI delivers it
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    records = []

    def save():
        """The summary, and the JSON so far: a run cut short by a time limit keeps what it measured."""
        summary = summarize(records, model_name)
        if args.json:
            write_json(args.json, device, {"model": model_name, "image_size": size, "batch_size": batch,
                                           "warmup": warmup, "steps": steps, "quick": args.quick},
                       records=records, ratios=summary["ratios"], projections=summary["projections"])
        return summary
    print(f"{device_name(device)}; {model_name} at {size}px, batch {batch}; torch {torch.__version__}", flush=True)

    def measure(name, make_step, images_per_call, **info):
        model = copy.deepcopy(base)
        if info.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        # fused SGD with the LR in a device tensor: what --cuda-graph steps with, so every variant steps alike
        lr = torch.tensor(0.01, device=device) if gpu else 0.01
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, fused=gpu or None)

        if gpu:  # from the first call: a captured step's memory is allocated in its capture, then held by
            torch.cuda.reset_peak_memory_stats(device)  # the graph's pool without counting as allocated

        def first_call():
            step = make_step(model, optimizer)
            step()
            return step
        step, first_call_s = wall_clock(first_call, device)  # compile time, for compiled variants
        for _ in range(warmup - 1):
            step()
        seconds = elapsed_s(step, device, steps)
        rate = images_per_call * steps / seconds
        record = {"method": name, "images_per_s": rate, "seconds": seconds, "steps": steps,
                  "first_call_s": first_call_s,
                  "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if gpu else None,
                  "peak_from_first_call": gpu, **info}
        records.append(record)
        mem = f"{record['peak_memory_gib']:.1f} GiB" if gpu else ""
        print(f"  {name:<34} {rate:10.1f} images/s  {mem}  (first call {first_call_s:.1f} s)", flush=True)
        save()  # after the line: a results file that cannot be written ends the run with its figure printed
        del model, optimizer, step
        gc.collect()  # a trainer and its step graph refer to each other: free the graph's memory pool now
        if gpu:
            torch.cuda.empty_cache()

    def engine(cls, **kw):
        def make(model, optimizer):
            trainer = cls(model, optimizer, mean=MEAN, std=STD, **kw)
            return lambda: trainer.train_batch(x, y)
        return make

    def safely(*a, **kw):
        try:
            measure(*a, **kw)
        except InputError:  # the results file cannot be written: not the variant's failure, the run's end
            raise
        except Exception as exc:  # one variant that fails is reported; the others still run
            print(f"  {a[0]:<34} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            records.append({"method": a[0], "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()

    for precision in precisions:
        cl = gpu  # channels_last on GPUs, where it pays
        common = dict(precision=precision, channels_last=cl)
        for suffix, extra in variants:
            info = dict(precision=precision, channels_last=cl, compile=extra.get("compile", False),
                        cuda_graph=extra.get("cuda_graph", False))
            if "natural" in methods:
                safely(f"natural {precision}{suffix}", engine(NaturalTrainer, **common, **extra), batch, replays=1,
                       **info)
            for m, stem in ((m, stem) for m in (4, 8) for stem in stems):
                if f"free-{m}" in methods:
                    named = f"free-{m} {precision}{suffix}" + ("" if stem == "autograd" else f" stem-{stem}")
                    safely(named, engine(FreeAdversarialTrainer, replays=m, epsilon=EPS, step_size=EPS,
                                         stem_input_grad=stem, **common, **extra),
                           batch * m, replays=m, stem_input_grad=stem, **info)
            if "pgd-7" in methods:
                safely(f"pgd-7 {precision}{suffix}", engine(PGDTrainer, steps=7, epsilon=EPS, step_size=EPS / 4,
                                                          **common, **extra), batch, replays=1, attack_steps=7, **info)
            if "fgsm-rs" in methods:
                safely(f"fgsm-rs {precision}{suffix}", engine(FastTrainer, epsilon=EPS, **common, **extra), batch,
                       replays=1, attack_steps=1, **info)

    def official(amp_dtype=None, compile_mode=None, channels_last=False):
        def make(model, optimizer):
            noise = torch.zeros(x.shape, device=device)
            mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
            xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
            run = torch.compile(model, mode=compile_mode) if compile_mode else model
            return lambda: official_free_step(run, optimizer, xs, y, noise, mean, std, 4, EPS, EPS, amp_dtype)
        return make
    if "official" in methods:
        if "eager" in chosen:
            safely("official free-4 fp32", official(), batch * 4, precision="fp32", channels_last=False, replays=4,
                   compile=False, cuda_graph=False)
            if gpu:
                safely("official free-4 bf16 channels_last", official(torch.bfloat16, channels_last=True),
                       batch * 4, precision="bf16", channels_last=True, replays=4, compile=False, cuda_graph=False)
        if gpu and compiling:
            safely("official free-4 bf16 channels_last compile",
                   official(torch.bfloat16, args.compile_mode, channels_last=True), batch * 4, precision="bf16",
                   channels_last=True, replays=4, compile=args.compile_mode, cuda_graph=False)

    summary = save()
    for line in summary["lines"]:
        print(line)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def summarize(records, model_name):
    """Ratios of free-m against natural training (same variant), against the
    official loops, and the cost of PGD-7 and FGSM-RS per epoch-equivalent."""
    by = {r["method"]: r["images_per_s"] for r in records if "images_per_s" in r}
    ratios, lines, projections = {}, ["", "ratios:"], []
    officials = [k for k in by if k.startswith("official")]
    for name, rate in by.items():
        if not name.startswith("free-"):
            continue
        kind, rest = name.split(" ", 1)  # "free-4", "bf16 graph"
        natural_rest = rest.split(" stem-")[0]  # a stem-<how> row against the same variant of natural
        natural = by.get(f"natural {natural_rest}")
        if natural:
            ratios[f"{name} / natural {natural_rest}"] = rate / natural
        if kind == "free-4":
            for official in officials:
                ratios[f"{name} / {official}"] = rate / by[official]
            for attack in ("pgd-7", "fgsm-rs"):
                if f"{attack} {rest}" in by:
                    # per epoch-equivalent free-m takes one replay step per image, PGD-7 one attacked step
                    ratios[f"{attack} / free-4 cost per epoch-equivalent ({rest})"] = rate / by[f"{attack} {rest}"]
    for k, v in ratios.items():
        lines.append(f"  {k:<64} {v:7.3f}")  # 3 places: targets such as 0.95 sit in the third
    if model_name in PAPER_RUNS:
        what, n, epochs, m, paper = PAPER_RUNS[model_name]
        candidates = [r for r in records if r["method"].startswith(f"free-{m} ") and "images_per_s" in r]
        if candidates:
            best = max(candidates, key=lambda r: r["images_per_s"])
            hours = n * epochs / best["images_per_s"] / 3600
            projections.append({"run": what, "method": best["method"], "hours_one_device": hours,
                                "hours_four_devices_ideal": hours / 4, "paper": paper})
            lines.append(f"projected: {what} with {best['method']}: {hours:.1f} h on one device, {hours / 4:.1f} h "
                         f"on four (ideal scaling); the paper: {paper}")
    return {"ratios": ratios, "lines": lines, "projections": projections}


if __name__ == "__main__":
    sys.exit(main())

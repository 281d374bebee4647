"""The paper's central comparison, measured in one run: natural training,
free-m, PGD-k and FGSM-RS trained on the same data, model, precision and
budget, then attacked with the same PGD (and CW) attacks.

    python bench/compare.py --data DIR [--dataset cifar10|tiny-imagenet|fashion-mnist] [--device cuda|cpu]
                            [--quick] [--json PATH] [--out DIR]

Budget convention ("epochs-equivalent", as in the paper and Fast-AT): every
method gets E epochs of the training set. Natural training, PGD-k and
FGSM-RS make E passes; free-m makes ceil(E / m) passes of m replays, so it
takes as many optimizer steps as natural training. All share one LR schedule
(one-cycle by default, Fast-AT's) counted in optimizer steps.

Training time is the wall clock of the trainer's passes alone (a CUDA
synchronise at each end), not of the evaluation: in-memory datasets (CIFAR,
Fashion-MNIST) are decoded before it starts; image folders (Tiny-ImageNet)
are decoded by their loader during the passes, as in a real run.

Writes the JSON (every figure, with provenance) and beside it, under the same
name, a markdown table (.md) and a plot (.png: robust accuracy against
training time, one point per method). ``--quick``: a small CNN on a subset, a few minutes on two
CPU cores, for CI.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from common import device_name, parse, parser, wall_clock, write_json
from freeadv_fast.config import ConfigError, RunConfig, check
from freeadv_fast.data import DATASETS
from freeadv_fast.data.datasets import build_data
from freeadv_fast.data.errors import DataError
from freeadv_fast.evaluate import attack_name, evaluate
from freeadv_fast.methods import METHODS
from freeadv_fast.run import build_trainer

# the datasets with comparison settings: (arch, epochs, batch, train subset, eval samples, eval steps) of a
# full run and of --quick, each in its dataset's spec (DatasetSpec.compare)
COMPARABLE = {name: spec for name, spec in DATASETS.items() if spec.compare}


def parse_args(argv):
    p = parser(__doc__, quick="small model and subset: minutes on 2 CPU cores",
               precision="default: bf16 on a GPU, fp32 on a CPU",
               json="results file (default: runs/compare-<dataset>-<time>/compare.json)")
    p.add_argument("--data", help="dataset folder (fashion-mnist: default the Debian package's)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(COMPARABLE))
    p.add_argument("--data-name", help="how the data is named in the results (default: the dataset's name; e.g. "
                                       "'CIFAR-10 (JPEG q75 copy)')")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--arch")
    p.add_argument("--epochs", type=float, help="epochs-equivalent budget of every method")
    p.add_argument("--replays", type=int, default=8, help="m of free-m")
    p.add_argument("--pgd-steps", type=int, default=7, help="k of PGD-k training")
    p.add_argument("--epsilon", help="L-inf budget (default 8/255; fashion-mnist 0.1)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=0.2, help="peak LR of every method (Fast-AT's 0.2)")
    p.add_argument("--free-lr", type=float, help="peak LR of free-m only (default: --lr); free-m takes m steps "
                                                 "in a row on each batch and can diverge where the others do not")
    p.add_argument("--schedule", default="onecycle")
    p.add_argument("--train-subset", type=int, help="train on this many images (0: all)")
    p.add_argument("--eval-samples", type=int, help="held-out images attacked (0: all)")
    p.add_argument("--eval-steps", help="PGD / CW steps, comma-separated")
    p.add_argument("--eval-step-size", help="default epsilon / 4")
    p.add_argument("--loader", default="auto", help="image folders: dali, torch or auto")
    p.add_argument("--cuda-graph", action="store_true", help="capture every method's training step as a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile every method's model")
    p.add_argument("--seed", type=int, default=0)
    args = parse(p, argv)
    arch, epochs, batch, subset, samples, steps = COMPARABLE[args.dataset].compare["quick" if args.quick else "full"]
    args.arch = args.arch or arch
    args.epsilon = args.epsilon or COMPARABLE[args.dataset].epsilon
    args.epochs = args.epochs or epochs
    args.batch_size = args.batch_size or batch
    args.train_subset = subset if args.train_subset is None else args.train_subset
    args.eval_samples = samples if args.eval_samples is None else args.eval_samples
    try:
        args.eval_steps = [int(s) for s in (args.eval_steps or steps).split(",")]
        args.methods = args.methods.split(",")
        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}: choose from {', '.join(METHODS)}")
    except ValueError as exc:
        p.error(str(exc))
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    args.json = args.json or Path("runs") / f"compare-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}" / "compare.json"
    return args


def config_for(args, method):
    """One method's settings: everything but the method (and its own step size) is shared."""
    return check(RunConfig(dataset=args.dataset, data=args.data, arch=args.arch, method=method, replays=args.replays,
                           pgd_steps=args.pgd_steps, epsilon=args.epsilon, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.free_lr if method == "free" and args.free_lr
                           else args.lr, schedule=args.schedule, momentum=0.9,
                           weight_decay=5e-4, precision=args.precision, channels_last=args.device.type == "cuda",
                           loader=args.loader, train_subset=args.train_subset, seed=args.seed,
                           cuda_graph=args.cuda_graph, compile=args.compile,
                           eval_step_size=args.eval_step_size))


def run_method(args, method, data, log):
    cfg = config_for(args, method)
    trainer, model, passes, replays = build_trainer(cfg, data, args.device)
    label = METHODS[method].title(cfg)
    log(f"== {label}: {passes} passes x {len(data.train)} batches x {replays} replay(s), eps {cfg.epsilon:.4g}, "
        f"step {cfg.step_size:.4g}")
    records = []

    def on_log(r):
        records.append(r)
        log(f"   pass {r['epoch'] + 1}/{passes} batch {r['batch']}: loss {r['loss']:.3f} acc {r['acc']:.3f}")

    _, seconds = wall_clock(lambda: trainer.fit(data.train, passes, log_every=max(1, len(data.train) // 2),
                                                on_log=on_log), args.device)
    images = passes * getattr(data.train, "num_samples", len(data.train) * cfg.batch_size)
    log(f"   trained in {seconds:.1f} s; evaluating on {args.eval_samples or 'all'} held-out images")
    t0 = time.perf_counter()
    result = evaluate(model, data.val, mean=data.mean, std=data.std, epsilon=cfg.epsilon,
                      step_size=cfg.eval_step_size, steps=tuple(args.eval_steps), losses=("ce", "cw"),
                      limit=args.eval_samples, precision=cfg.precision, seed=args.seed)
    robust = result[attack_name("ce", args.eval_steps[0])]
    log(f"   clean {result['clean_top1']:.1%}, {attack_name('ce', args.eval_steps[0]).upper()} {robust:.1%} "
        f"({time.perf_counter() - t0:.0f} s)")
    return {"method": method, "label": label, "replays": replays, "passes": passes,
            "optimizer_steps": trainer.step, "train_seconds": seconds, "lr": cfg.lr,
            "images_per_s": images * replays / seconds, "step_size": cfg.step_size,
            "final_train_loss": records[-1]["loss"] if records else None, "eval": result}


def markdown(rows, attack_keys):
    head = ["method", "train time", "clean"] + [k.upper() for k in attack_keys]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["eval"]

        def cell(key):
            lo, hi = e[key + "_ci95"]
            return f"{e[key]:.1%} [{lo:.1%}, {hi:.1%}]"
        lines.append(f"| {r['label']} | {r['train_seconds'] / 60:.1f} min | {cell('clean_top1')} | "
                     + " | ".join(cell(k) for k in attack_keys) + " |")
    return "\n".join(lines)


def plot(rows, key, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        minutes, acc = r["train_seconds"] / 60, r["eval"][key]
        lo, hi = r["eval"][key + "_ci95"]
        ax.errorbar([minutes], [100 * acc], yerr=[[100 * (acc - lo)], [100 * (hi - acc)]], fmt="o", capsize=3)
        ax.annotate(r["label"], (minutes, 100 * acc), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel(f"{key.upper()} accuracy (%)")
    ax.set_xlim(left=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    try:
        cfg = config_for(args, "natural")
        t0 = time.perf_counter()
        data = build_data(cfg, device=args.device)
    except (ConfigError, DataError) as exc:
        log(f"compare.py: error: {exc}")
        return 2
    data_name = args.data_name or COMPARABLE[args.dataset].title
    log(f"{data_name}: {data.train.num_samples} training images ({time.perf_counter() - t0:.1f} s to load), "
        f"{args.arch}, {args.epochs:g} epochs-equivalent, batch {args.batch_size}, {args.precision}, "
        f"on {args.device}")
    rows = [run_method(args, method, data, log) for method in args.methods]
    attack_keys = [attack_name(loss, s) for loss in ("ce", "cw") for s in args.eval_steps]
    meta = {"quick": args.quick, "dataset": args.dataset, "data": data_name,
            "train_images": data.train.num_samples, "arch": args.arch, "epochs_equivalent": args.epochs,
            "batch_size": args.batch_size, "precision": args.precision, "lr": args.lr,
            "free_lr": args.free_lr or args.lr, "schedule": args.schedule, "cuda_graph": args.cuda_graph,
            "compile": args.compile,
            "epsilon": cfg.epsilon, "eval_step_size": cfg.eval_step_size,
            "eval_steps": args.eval_steps, "eval_samples": rows[0]["eval"]["samples"]}
    by = {r["method"]: r for r in rows}
    summary = {}
    main_attack = attack_keys[0]
    if "free" in by and "pgd" in by:
        summary["free_time_over_pgd_time"] = by["free"]["train_seconds"] / by["pgd"]["train_seconds"]
        summary["free_minus_pgd_robust"] = by["free"]["eval"][main_attack] - by["pgd"]["eval"][main_attack]
    if "free" in by and "natural" in by:
        summary["free_time_over_natural_time"] = by["free"]["train_seconds"] / by["natural"]["train_seconds"]
        summary["free_minus_natural_robust"] = by["free"]["eval"][main_attack] - by["natural"]["eval"][main_attack]
    write_json(args.json, args.device, meta, compare=rows, summary=summary)
    table = markdown(rows, attack_keys)
    args.json.with_suffix(".md").write_text(table + "\n")
    plot(rows, main_attack, args.json.with_suffix(".png"),
         f"{data_name}, {args.arch}, {args.epochs:g} epochs-eq., eps {args.epsilon} ({device_name(args.device)})")
    print(table)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    log(f"wrote {args.json} and its .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

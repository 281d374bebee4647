"""The paper's central comparison, measured in one run: natural training,
free-m, PGD-k and FGSM-RS trained on the same data, model and precision,
then attacked with the same attacks.

    python bench/compare.py --data DIR [--dataset cifar10|tiny-imagenet|fashion-mnist] [--device cuda|cpu]
                            [--recipe fast-at|equal-steps] [--sweep-replays 2,4,8,10] [--frontier]
                            [--quick] [--json PATH]

What each method trains for is a recipe:

* ``fast-at`` (the default): each method at the recipe "Fast is better than
  free"'s CIFAR-10 scripts publish (RECIPES below): natural, FGSM-RS and
  PGD-7 15 epochs at peak LR 0.2, free-8 10 passes of 8 replays at 0.04, its
  x + delta kept in the pixel range (``pixel_mode="project"``), as those
  scripts do.
* ``equal-steps``: every method E epochs-equivalent (--epochs): free-m makes
  ceil(E / m) passes of m replays, as many optimizer steps as natural
  training, all at --lr (--free-lr for free-m).

``--sweep-replays 2,4,8,10`` adds free-m at each m on one epochs-equivalent
budget (--sweep-epochs, default the fast-at free-8's 80): the paper's m
table. ``--frontier`` adds each method at three budgets (FRONTIER), for
robust accuracy against training time. Every row records its recipe, passes,
optimizer steps, LR, step size, pixel mode and its whole configuration, so
rows of runs split over several GPU sessions can be merged by
``bench/report.py --merge``. A row whose whole configuration an earlier row
of the run already trained (the frontier's middle budgets are the recipe's;
the sweep's m = 8 is the recipe's free-8) is that row again, marked
``same_run_as``, not trained twice. The recipes' peak LRs are for batch 128
and scale linearly with --batch-size. --quick scales every budget by
--budget-scale.

Evaluation: the PGD and CW attacks of --eval-steps (one start each), and
PGD with restarts (--restart-steps, --restarts: Fast-AT's PGD-50 with 10
restarts) on --eval-samples held-out images (0: all).

Training time is the wall clock of the trainer's passes alone (a CUDA
synchronise at each end), not of the evaluation: in-memory datasets (CIFAR,
Fashion-MNIST) are decoded before it starts; image folders (Tiny-ImageNet)
are decoded by their loader during the passes, as in a real run.

Writes the JSON (every figure, with provenance) and beside it, under the same
name, a markdown table (.md) and a plot (.png: robust accuracy against
training time, a line per method; with a sweep, a second plot of accuracy
against m), so a --json named .md or .png is refused, as is one onto a file
that is not a JSON results file. ``--quick``: a small CNN on a subset with the dataset's quick
budgets (CIFAR-10: 4/15 of each recipe's), for CI: with the sweep and the
frontier about 3 minutes on two CPU cores (194 s in CI's run at a9a14d8).
Models are channels_last on every device (faster for the small CNN on two
CPU cores too, timed ad hoc).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from common import (NOT_WRITTEN, InputError, device_name, guarded, parse, parser, positive, replaces,
                    unwritable, wall_clock, write_json, write_text, wrote)
from freeadv_fast.cli import comma_list
from freeadv_fast.config import ConfigError, RunConfig, check, pixel_value
from freeadv_fast.data import DATASETS
from freeadv_fast.data.datasets import build_data
from freeadv_fast.data.tensors import TensorBatches
from freeadv_fast.evaluate import attack_name, evaluate
from freeadv_fast.methods import METHODS
from freeadv_fast.run import build_trainer

# "Fast is better than free"'s CIFAR-10 scripts (fast_adversarial, CIFAR10/): per method, its budget
# (epochs-equivalent, or passes for free-m), peak LR and step; one-cycle LR, batch 128, SGD 0.9 / 5e-4.
# At another --batch-size the peak LR scales linearly with the batch (RECIPE_BATCH).
RECIPE_BATCH = 128
RECIPES = {
    "fast-at": {"natural": dict(epochs=15, lr=0.2),
                "fast": dict(epochs=15, lr=0.2, step_size="10/255"),
                "pgd": dict(epochs=15, lr=0.2, step_size="2/255"),
                "free": dict(passes=10, lr=0.04, pixel_mode="project")},
    "equal-steps": {},  # --epochs, --lr and --free-lr for every method
}
# each method at three budgets (epochs-equivalent; free-m: passes), for the robustness-against-time frontier
FRONTIER = {"natural": [dict(epochs=5), dict(epochs=15)],
            "fast": [dict(epochs=5), dict(epochs=15), dict(epochs=30)],
            "pgd": [dict(epochs=5), dict(epochs=10), dict(epochs=15)],
            "free": [dict(passes=4), dict(passes=10), dict(passes=20)]}

# held-out images in memory are attacked in batches of at least this many (small_cnn_bn's forward and
# input-gradient backward on our 2 CPU cores: 100 gave 1.3x the images/s of 25, and 250 was as fast as 100
# or faster in 4 of 5 timings, which vary by 20% from run to run; every sample's attack is its own, so the
# batch changes only the random starts)
EVAL_BATCH = 250
# the datasets with comparison settings: (arch, epochs, batch, train subset, eval samples, eval steps) of a
# full run and of --quick, each in its dataset's spec (DatasetSpec.compare)
COMPARABLE = {name: spec for name, spec in DATASETS.items() if spec.compare}
# the PGD / CW steps of the one-start attacks: one named twice would run twice, for one column
eval_steps = comma_list(int, minimum=1, distinct=True)


def parse_args(argv):
    p = parser(__doc__, quick="small model and subset: minutes on 2 CPU cores",
               precision="default: bf16 on a GPU, fp32 on a CPU",
               json="results file (default: runs/compare-<dataset>-<time>/compare.json)")
    p.add_argument("--data", help="dataset folder (fashion-mnist: default the Debian package's)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(COMPARABLE))
    p.add_argument("--data-name", help="how the data is named in the results (default: the dataset's name; e.g. "
                                       "'CIFAR-10 (JPEG q75 copy)')")
    p.add_argument("--recipe", default="fast-at", choices=list(RECIPES),
                   help="what each method trains for (default fast-at: each at its published recipe)")
    p.add_argument("--methods", default=",".join(METHODS),
                   type=comma_list(choices=METHODS, distinct=True, empty_ok=True),
                   help="comma-separated subset of " + ",".join(METHODS) + " for the recipe rows ('' for none)")
    p.add_argument("--sweep-replays", type=comma_list(int, minimum=1, distinct=True), default=[],
                   help="also free-m at each m (comma-separated) on --sweep-epochs")
    p.add_argument("--sweep-epochs", type=positive(), help="epochs-equivalent of every m of the sweep (default: the "
                                                      "fast-at free-8's 80, times --budget-scale)")
    p.add_argument("--frontier", action="store_true", help="also each method at three budgets (FRONTIER)")
    p.add_argument("--frontier-methods", default=",".join(FRONTIER),
                   type=comma_list(choices=FRONTIER, distinct=True, empty_ok=True),
                   help="the methods of the frontier (comma-separated; one GPU run may not hold all four)")
    p.add_argument("--budget-scale", type=positive(), help="multiplies every recipe, sweep and frontier budget (passes "
                                                      "round up; default 1, --quick the dataset's quick epochs / 15)")
    p.add_argument("--arch")
    p.add_argument("--epochs", type=positive(), help="equal-steps: epochs-equivalent budget of every method")
    p.add_argument("--replays", type=positive(int), default=8, help="m of free-m")
    p.add_argument("--pgd-steps", type=positive(int), default=7, help="k of PGD-k training")
    p.add_argument("--epsilon", help="L-inf budget (default 8/255; fashion-mnist 0.1)")
    p.add_argument("--batch-size", type=positive(int))
    p.add_argument("--lr", type=positive(), help="equal-steps: peak LR of every method (default Fast-AT's 0.2)")
    p.add_argument("--free-lr", type=positive(), help="equal-steps: peak LR of free-m only (default: --lr); free-m "
                                                 "takes m steps in a row on each batch and can diverge where the "
                                                 "others do not")
    p.add_argument("--schedule", default="onecycle")
    p.add_argument("--train-subset", type=positive(int, zero=True), help="train on this many images (0: all)")
    p.add_argument("--eval-samples", type=positive(int, zero=True), help="held-out images attacked (0: all)")
    p.add_argument("--eval-steps", type=eval_steps, help="PGD / CW steps of the one-start attacks, comma-separated")
    p.add_argument("--restart-steps", type=positive(int), help="steps of the PGD with restarts (default 50)")
    p.add_argument("--restarts", type=positive(int), help="restarts of that PGD (default 10; --quick 1; 1: none)")
    p.add_argument("--eval-step-size", help="default epsilon / 4")
    p.add_argument("--loader", default="auto", help="image folders: dali, nvjpeg, torch or auto")
    p.add_argument("--cuda-graph", action="store_true", help="capture every method's training step as a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile every method's model")
    p.add_argument("--seed", type=positive(int, zero=True), default=0)
    args = parse(p, argv)
    if args.seed > 2 ** 32 - 1:  # what a run's seed may be (config.check): torch.manual_seed overflowed
        p.error(f"--seed must be at most {2 ** 32 - 1}, got {args.seed}")
    for flag, given, needed in (("--sweep-epochs", args.sweep_epochs is not None, "--sweep-replays"),
                                ("--frontier-methods", args.frontier_methods != list(FRONTIER), "--frontier")):
        if given and not getattr(args, needed[2:].replace("-", "_")):  # it would change nothing
            p.error(f"{flag} is read by the rows of {needed}, which is not given: add it (or leave {flag} out)")
    if args.recipe != "equal-steps":  # the published recipes set each method's budget and LR
        given = [flag for flag in ("--epochs", "--lr", "--free-lr") if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            p.error(f"{', '.join(given)}: for --recipe equal-steps only; --recipe {args.recipe} trains each method at "
                    "its published budget and LR (scale the budgets with --budget-scale)")
    elif args.lr is None:
        args.lr = 0.2
    arch, epochs, batch, subset, samples, steps = COMPARABLE[args.dataset].compare["quick" if args.quick else "full"]
    defaults = dict(arch=arch, epsilon=COMPARABLE[args.dataset].epsilon, epochs=epochs, batch_size=batch,
                    train_subset=subset, eval_samples=samples, budget_scale=epochs / 15 if args.quick else 1.0,
                    restart_steps=50, restarts=1 if args.quick else 10)
    for name, value in defaults.items():  # a flag given as 0 is refused by its type, never replaced
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eval_steps = args.eval_steps or eval_steps(steps)
    if not (args.methods or args.sweep_replays or args.frontier and args.frontier_methods):
        p.error("nothing to run: no --methods, --sweep-replays or --frontier (with --frontier-methods)")
    for flag, text in (("--epsilon", args.epsilon), ("--eval-step-size", args.eval_step_size)):
        try:
            zero = text is not None and pixel_value(text) == 0
        except ConfigError as exc:
            p.error(f"{flag}: {exc}")
        if zero:  # the attacks would not move the images: every robust accuracy would be the clean one
            p.error(f"{flag} {text}: must be above 0, or the attacks leave the images as they are and every robust "
                    "accuracy is the clean accuracy")
    if args.sweep_epochs is None:
        args.sweep_epochs = 80 * args.budget_scale
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    args.json = args.json or Path("runs") / f"compare-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}" / "compare.json"
    problem = beside_problem(args.json, sweep=bool(args.sweep_replays))
    if problem:
        p.error(f"--json {args.json}: {problem}")
    return args


def beside(path: Path, sweep=True) -> dict:
    """The files write_outputs writes beside the results file at ``path``
    (the sweep plot where ``sweep`` is not False)."""
    files = {"table": path.with_suffix(".md"), "plot": path.with_suffix(".png")}
    if sweep is not False:
        files["sweep plot"] = path.with_name(path.stem + "-sweep.png")
    return files


# how this script's own table and plots begin: a file beside the results file that begins otherwise is someone's
# (notes, a figure), kept as not_results keeps a file that is not a results file
TABLE_HEAD = b"| method | group | passes | train time | clean |"
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def not_ours(what: str, path: Path) -> str | None:
    """Why the file at ``path`` is not an earlier run's ``what`` (table or
    plot) and must not be replaced, or None (also where there is no file)."""
    if not path.is_file() or not path.stat().st_size:
        return None
    with open(path, "rb") as f:
        head = f.read(4096)
    # matplotlib names itself in a text chunk right after the PNG header
    ours = head.startswith(TABLE_HEAD) if what == "table" else head.startswith(PNG_HEAD) and b"Matplotlib" in head
    return None if ours else f"exists and is not a bench/compare.py {what}: not replaced, name another file"


def beside_problem(path: Path, sweep=True) -> str | None:
    """Why the table and plot(s) written beside the results file at ``path``
    cannot be (one of them would be the results file itself, cannot be
    written, or would replace a file that is not an earlier run's), or None:
    said before anything is trained, not after. ``sweep``: whether the run
    has a sweep (None: not known yet); a run without one refuses a sweep plot
    of an earlier run, which would stand beside results it does not show."""
    for what, other in beside(path, sweep).items():
        same = other.name.lower() == path.name.lower() or other.resolve() == path.resolve() or (
            other.exists() and path.exists() and os.path.samefile(other, path))
        if same:
            return (f"the {what} is written beside the results file as {other.name}, which is the results file "
                    "itself: name the results file .json")
        problem = unwritable(other) or not_ours(what, other)
        if problem:
            return f"its {what} {other} {problem}"
    stale = beside(path)["sweep plot"]
    if sweep is False and (stale.exists() or stale.is_symlink()):
        return (f"{stale} is an earlier run's sweep plot, and this run has no sweep: it would stand beside results "
                "it does not show; move it away or name another file")
    return None


def written(path: Path, sweep: bool) -> str:
    """The files write_outputs wrote, for the last line of a run."""
    return ", ".join(map(str, [path, *beside(path, sweep).values()]))


def row_specs(args) -> list[dict]:
    """Every row to train: its group (the recipe, "sweep" or "frontier"), its
    method and what differs from the shared settings (epochs-equivalent, LR,
    step size, pixel mode, m)."""
    def fast_at_row(group, method, budget):
        """A method at the fast-at recipe with ``budget`` (epochs, or free-m's
        passes) scaled by --budget-scale, free-m's passes rounded up to whole ones."""
        spec = RECIPES["fast-at"][method]
        epochs = (math.ceil(budget["passes"] * args.budget_scale) * args.replays if "passes" in budget
                  else max(1.0, round(budget["epochs"] * args.budget_scale, 3)))
        return dict(group=group, method=method, epochs=epochs, lr=recipe_lr(spec), step_size=spec.get("step_size"),
                    pixel_mode=spec.get("pixel_mode"), replays=args.replays)

    def recipe_lr(spec):
        return spec["lr"] * args.batch_size / RECIPE_BATCH  # meta's recipe_lr_scale

    rows = []
    for method in args.methods:
        if args.recipe == "equal-steps":
            lr = args.free_lr if method == "free" and args.free_lr is not None else args.lr
            rows.append(dict(group="equal-steps", method=method, epochs=args.epochs, lr=lr, replays=args.replays))
        else:
            rows.append(fast_at_row(args.recipe, method, RECIPES[args.recipe][method]))
    free = RECIPES["fast-at"]["free"]
    for m in args.sweep_replays:  # whole passes, so that the row says what it trains (and can equal another)
        rows.append(dict(group="sweep", method="free", epochs=math.ceil(args.sweep_epochs / m) * m, lr=recipe_lr(free),
                         pixel_mode=free["pixel_mode"], replays=m))
    if args.frontier:
        rows += [fast_at_row("frontier", method, b) for method in args.frontier_methods for b in FRONTIER[method]]
    return rows


def config_for(args, method, *, epochs, lr, step_size=None, pixel_mode=None, replays=None,
               **_):
    """One row's settings: everything but the method and what its row sets is shared."""
    return check(RunConfig(dataset=args.dataset, data=args.data, arch=args.arch, method=method,
                           replays=replays or args.replays, pgd_steps=args.pgd_steps, epsilon=args.epsilon,
                           step_size=step_size, pixel_mode=pixel_mode, epochs=epochs,
                           batch_size=args.batch_size, lr=lr, schedule=args.schedule, momentum=0.9,
                           weight_decay=5e-4, precision=args.precision, channels_last=True,
                           loader=args.loader, train_subset=args.train_subset, seed=args.seed,
                           cuda_graph=args.cuda_graph, compile=args.compile,
                           eval_step_size=args.eval_step_size,
                           # the evaluation this script runs (its restarts are --restarts, beside these)
                           final_eval_samples=args.eval_samples, final_eval_steps=list(args.eval_steps)))


def run_row(args, spec, cfg, data, log):
    trainer, model, passes, replays = build_trainer(cfg, data, args.device)
    label = METHODS[cfg.method].title(cfg)
    log(f"== {label} ({spec['group']}): {passes} passes x {len(data.train)} batches x {replays} replay(s), "
        f"{cfg.epochs:g} epochs-equivalent, LR {cfg.lr:g}, eps {cfg.epsilon:.4g}, step {cfg.step_size:.4g}")
    records = []

    def on_log(r):
        records.append(r)
        log(f"   pass {r['epoch'] + 1}/{passes} batch {r['batch']}: loss {r['loss']:.3f} acc {r['acc']:.3f}")

    _, seconds = wall_clock(lambda: trainer.fit(data.train, passes, log_every=max(1, len(data.train) // 2),
                                                on_log=on_log), args.device)
    images = passes * getattr(data.train, "num_samples", len(data.train) * cfg.batch_size)
    held_out = getattr(data.val, "num_samples", None)
    evaluating = f"{args.eval_samples or 'all'} held-out images"
    if held_out is not None and (args.eval_samples == 0 or args.eval_samples >= held_out):  # all: how many
        evaluating = f"all {held_out} held-out images" + (
            f" (--eval-samples {args.eval_samples}: the test set has no more)" if args.eval_samples > held_out else "")
    log(f"   trained in {seconds:.1f} s; evaluating on {evaluating}")
    t0 = time.perf_counter()
    common = dict(mean=data.mean, std=data.std, epsilon=cfg.epsilon, step_size=cfg.eval_step_size,
                  limit=args.eval_samples, precision=cfg.precision, seed=args.seed)
    val = data.val
    if isinstance(val, TensorBatches) and val.batch_size < EVAL_BATCH:
        val = val.rebatched(EVAL_BATCH)
    result = evaluate(model, val, steps=tuple(args.eval_steps), losses=("ce", "cw"), **common)
    if args.restarts > 1:
        restarted = evaluate(model, val, steps=(args.restart_steps,), restarts=args.restarts, **common)
        result.update({k: v for k, v in restarted.items() if k.startswith("pgd-")})
    robust = result[attack_name("ce", args.eval_steps[0])]
    log(f"   clean {result['clean_top1']:.1%}, {attack_name('ce', args.eval_steps[0]).upper()} {robust:.1%} "
        f"({time.perf_counter() - t0:.0f} s)")
    return {"group": spec["group"], "method": cfg.method, "label": label, "replays": replays, "passes": passes,
            "epochs_equivalent": cfg.epochs, "optimizer_steps": trainer.step, "train_seconds": seconds,
            "lr": cfg.lr, "step_size": cfg.step_size, "pixel_mode": cfg.pixel_mode,
            "images_per_s": images * replays / seconds,
            "final_train_loss": records[-1]["loss"] if records else None, "eval": result,
            "config": cfg.to_dict()}


def attack_keys(rows) -> list[str]:
    """The attacks every row was evaluated with, one-start PGD and CW first
    (rows that were not all evaluated alike cannot share a table)."""
    keys = [k for k in rows[0]["eval"] if (k.startswith("pgd-") or k.startswith("cw-")) and not k.endswith("_ci95")]
    for r in rows:
        missing = [k for k in ["clean_top1", *keys] if k not in r["eval"] or k + "_ci95" not in r["eval"]]
        if missing:
            raise InputError(f"row {r['label']!r} has no {', '.join(missing)}: rows evaluated differently cannot "
                             "share a table")
    return sorted(keys, key=lambda k: ("x" in k, k.split("-")[0] != "pgd", int(k.split("-")[1].split("x")[0])))


def markdown(rows, keys):
    head = ["method", "group", "passes", "train time", "clean"] + [k.upper() for k in keys]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["eval"]

        def cell(key):
            lo, hi = e[key + "_ci95"]
            return f"{e[key]:.1%} [{lo:.1%}, {hi:.1%}]"
        group = r.get("group", "-") + (f" (= {r['same_run_as']})" if "same_run_as" in r else "")
        lines.append(f"| {r['label']} | {group} | {r['passes']} | {r['train_seconds'] / 60:.1f} min | "
                     f"{cell('clean_top1')} | " + " | ".join(cell(k) for k in keys) + " |")
    return "\n".join(lines)


def _errorbar(ax, xs, rows, metric, label):
    acc = [100 * r["eval"][metric] for r in rows]
    err = [[100 * (r["eval"][metric] - r["eval"][metric + "_ci95"][0]) for r in rows],
           [100 * (r["eval"][metric + "_ci95"][1] - r["eval"][metric]) for r in rows]]
    ax.errorbar(xs, acc, yerr=err, fmt="o-", capsize=3, label=label)


def _figure(draw, path, xlabel, ylabel, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    earlier = replaces(path)
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise InputError(f"{path}: cannot be written ({exc.strerror or exc}); {NOT_WRITTEN}") from None
    finally:
        plt.close(fig)
    wrote(path, earlier)


def _nothing(ax, text):
    """An empty plot that says why it is empty, not a blank frame that looks like a failed run."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def plot(rows, key, path, title):
    """Robust accuracy against training time, one line (by time) per method label."""
    by_label: dict = {}
    for r in rows:
        if r.get("group") != "sweep" and "same_run_as" not in r:
            by_label.setdefault(r["label"], []).append(r)

    def draw(ax):
        for label, group in by_label.items():
            group = sorted(group, key=lambda r: r["train_seconds"])
            _errorbar(ax, [r["train_seconds"] / 60 for r in group], group, key, label)
        if not by_label:  # a sweep-only run: its rows are in the sweep plot
            _nothing(ax, f"no recipe or frontier rows: the sweep's rows are in {beside(path)['sweep plot'].name}")
        ax.set_xlim(left=0)
    _figure(draw, path, "training time (minutes)", f"{key.upper()} accuracy (%)", title)


def plot_sweep(rows, key, path, title):
    """Clean and robust accuracy of free-m against m (the sweep's rows)."""
    sweep = sorted((r for r in rows if r.get("group") == "sweep"), key=lambda r: r["replays"])

    def draw(ax):
        for metric, name in (("clean_top1", "clean"), (key, key.upper())):
            if sweep:
                _errorbar(ax, [r["replays"] for r in sweep], sweep, metric, name)
        if not sweep:  # the rows before the sweep's: an earlier run's sweep plot is not left standing meanwhile
            _nothing(ax, "no sweep row measured yet")
    _figure(draw, path, "m (replays of each minibatch)", "accuracy (%)", title)


def summarize(rows, key) -> dict:
    """Ratios the issue tracker asks about, between the recipe rows."""
    by = {r["method"]: r for r in rows if r.get("group") in RECIPES}
    summary = {}
    for a, b in (("free", "pgd"), ("free", "natural"), ("fast", "free")):
        if a in by and b in by:
            summary[f"{a}_time_over_{b}_time"] = by[a]["train_seconds"] / by[b]["train_seconds"]
            summary[f"{a}_minus_{b}_robust"] = by[a]["eval"][key] - by[b]["eval"][key]
    return summary


def write_outputs(path: Path, rows, meta, device, title, sweep=None):
    """The JSON, and beside it the .md table, the .png plot and, where the
    run has a sweep (``sweep``; default: where a row is the sweep's), the
    sweep plot: every file or none refused (beside_problem) before the first
    is written."""
    keys = attack_keys(rows)
    main_key = next((k for k in keys if "x" in k), keys[0])  # the restarted PGD when there is one
    summary = summarize(rows, main_key)
    table = markdown(rows, keys)
    sweep = any(r.get("group") == "sweep" for r in rows) if sweep is None else sweep
    files = beside(path, sweep)
    try:
        problem = beside_problem(path, sweep)  # again: a file may have appeared there while training
        if problem:
            raise InputError(f"{path}: {problem}; {NOT_WRITTEN}")
        write_json(path, device, meta, compare=rows, summary=summary)
        write_text(files["table"], table + "\n")
        plot(rows, main_key, files["plot"], title)
        if sweep:
            plot_sweep(rows, main_key, files["sweep plot"], title)
    except InputError:
        print(table, flush=True)  # the figures, which the file that failed would have held
        raise
    return table, summary


@guarded
def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    specs = row_specs(args)
    configs = [config_for(args, **spec) for spec in specs]  # every row's settings checked before any trains
    cfg = configs[0]  # the data and the evaluation, which every row shares
    t0 = time.perf_counter()
    data = build_data(cfg, device=args.device)
    data_name = args.data_name or COMPARABLE[args.dataset].title
    log(f"{data_name}: {data.train.num_samples} training images ({time.perf_counter() - t0:.1f} s to load), "
        f"{args.arch}, batch {args.batch_size}, {args.precision}, on {args.device}; {len(specs)} runs")
    rows = []
    meta = {"quick": args.quick, "dataset": args.dataset, "data": data_name,
            "train_images": data.train.num_samples, "arch": args.arch, "recipe": args.recipe,
            "recipe_lr_scale": args.batch_size / RECIPE_BATCH, "budget_scale": args.budget_scale,
            "batch_size": args.batch_size, "precision": args.precision, "schedule": args.schedule, "cuda_graph": args.cuda_graph,
            "compile": args.compile, "epsilon": cfg.epsilon, "eval_step_size": cfg.eval_step_size,
            "eval_steps": args.eval_steps, "restart_steps": args.restart_steps, "restarts": args.restarts}
    if args.recipe == "equal-steps":  # the recipes' budgets and LRs are each row's own
        meta.update(epochs_equivalent=args.epochs, lr=args.lr, free_lr=args.lr if args.free_lr is None else args.free_lr)
    title = f"{data_name}, {args.arch}, eps {args.epsilon} ({device_name(args.device)})"
    trained: dict[str, dict] = {}  # a row's whole configuration -> the row that trained it
    for spec, row_cfg in zip(specs, configs):  # the JSON grows row by row: a run cut short keeps what it measured
        key = json.dumps(row_cfg.to_dict(), sort_keys=True, default=str)
        if key in trained:  # e.g. the frontier's 15 epochs of PGD-7 are the recipe's: trained once
            first = trained[key]
            log(f"== {first['label']} ({spec['group']}): the same run as its {first['group']} row, not trained again")
            rows.append({**first, "group": spec["group"], "same_run_as": first["group"]})
        else:
            rows.append(trained.setdefault(key, run_row(args, spec, row_cfg, data, log)))
        meta["eval_samples"] = rows[0]["eval"]["samples"]
        table, summary = write_outputs(args.json, rows, meta, args.device, title, sweep=bool(args.sweep_replays))
    print(table)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    log(f"wrote {written(args.json, bool(args.sweep_replays))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

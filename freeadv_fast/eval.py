"""python -m freeadv_fast.eval: clean and adversarial accuracy of a checkpoint.

    python -m freeadv_fast.eval CHECKPOINT [DATASET] [--data DIR] [--attack pgd|cw|autoattack]
        [--steps 10,50,100] [--restarts R] [--epsilon 4/255] [--step-size 1/255] [--limit N]
        [--json PATH] [--gpus N | --cpu [--nproc N]]

Prints clean top-1/top-5 and each attack's accuracy with its 95% confidence
interval, as a table and (--json) as JSON. Defaults follow the checkpoint's
training epsilon and dataset and the paper's evaluation: PGD-10/50/100 with
step 1/255 on ImageNet, PGD-20/100 with step 2/255 on CIFAR.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import distributed
from .checkpoint import CheckpointError, read_checkpoint
from .cli import ArgumentParser, check_writable_file, int_at_least, pixel
from .config import DATASETS, ConfigError, RunConfig, check
from .data.datasets import build_data, take
from .evaluate import evaluate
from .models import create_model
from .report import format_table
from .run import USER_ERRORS

PROG = "python -m freeadv_fast.eval"
PAPER_EVAL = {"imagenet": ([10, 50, 100], 1 / 255), "cifar10": ([20, 100], 2 / 255),
              "cifar100": ([20, 100], 2 / 255)}


def steps_list(text):
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"steps must be positive integers, got {text!r}")
    return steps


def parser():
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("dataset", nargs="?", help=f"one of {', '.join(DATASETS)} (default: the checkpoint's)")
    p.add_argument("--data")
    p.add_argument("--attack", choices=["pgd", "cw", "autoattack"], action="append",
                   help="repeatable (default: pgd)")
    p.add_argument("--steps", type=steps_list)
    p.add_argument("--restarts", type=int_at_least(1), default=1)
    p.add_argument("--epsilon", type=pixel)
    p.add_argument("--step-size", type=pixel)
    p.add_argument("--limit", type=int_at_least(0), default=0,
                   help="evaluate N held-out images, a fixed random sample of the split (0: all)")
    p.add_argument("--batch-size", type=int_at_least(1))
    p.add_argument("--precision")
    p.add_argument("--json", type=Path)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", type=int_at_least(1))
    where.add_argument("--cpu", action="store_true")
    p.add_argument("--nproc", type=int_at_least(1))
    return p


def settings(args) -> dict:
    state = read_checkpoint(args.checkpoint)
    saved = {k: v for k, v in state.get("config", {}).items() if k in RunConfig.keys()}
    if "arch" not in saved:
        raise CheckpointError(f"checkpoint {args.checkpoint} does not say which architecture it holds")
    cfg = RunConfig(**saved)
    overrides = {k: v for k, v in dict(dataset=args.dataset, data=args.data, batch_size=args.batch_size,
                                       precision=args.precision).items() if v is not None}
    cfg = check(dataclasses.replace(cfg, **overrides))
    steps, step = PAPER_EVAL.get(cfg.dataset, (cfg.final_eval_steps, cfg.eval_step_size))
    epsilon = args.epsilon if args.epsilon is not None else cfg.epsilon
    if not 0 <= epsilon <= 1:
        raise ConfigError(f"--epsilon must be between 0 and 1 (the pixel range), got {epsilon:g}")
    if args.step_size is not None and not 0 <= args.step_size <= 1:
        raise ConfigError(f"--step-size must be between 0 and 1 (the pixel range), got {args.step_size:g}")
    if args.json is not None:  # before the evaluation, not after it
        check_writable_file(args.json, "--json")
    if args.step_size is None and args.epsilon is not None and cfg.dataset not in PAPER_EVAL:
        step = epsilon / 4
    return {"config": cfg.to_dict(), "epsilon": epsilon, "step_size": step if args.step_size is None else args.step_size,
            "steps": args.steps or steps, "attacks": args.attack or ["pgd"], "restarts": args.restarts,
            "limit": args.limit, "seed": args.seed, "checkpoint": str(args.checkpoint),
            "json": str(args.json) if args.json else None}


def eval_worker(job: dict, cpu: bool):
    try:
        d = distributed.setup(cpu=cpu)
        status = _evaluate(job, d)
    except USER_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        status = 2
    finally:
        try:
            distributed.teardown()
        except Exception:  # a broken group: exiting is what matters
            pass
    if status:
        sys.exit(status)


def _evaluate(job, d) -> int:
    cfg = RunConfig(**job["config"])
    data = build_data(cfg, d.rank, d.world_size, d.device)
    state = read_checkpoint(job["checkpoint"])
    model = create_model(cfg.arch, data.num_classes, data.in_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {job['checkpoint']} does not fit {cfg.arch} with {data.num_classes} "
                              f"classes: {str(exc).splitlines()[0]}") from None
    model.to(d.device).eval()
    limit = -(-job["limit"] // d.world_size) if job["limit"] else 0
    losses = [{"pgd": "ce", "cw": "cw"}[a] for a in job["attacks"] if a != "autoattack"]
    if d.is_main:
        print(f"evaluating {job['checkpoint']} ({cfg.arch}) on {cfg.dataset}: eps {job['epsilon']:.4g}, "
              f"step {job['step_size']:.4g}, steps {job['steps']}, restarts {job['restarts']}, "
              f"{d.world_size} process(es)", file=sys.stderr, flush=True)
    result = evaluate(model, data.val, mean=data.mean, std=data.std, epsilon=job["epsilon"],
                      step_size=job["step_size"], steps=tuple(job["steps"]), losses=tuple(losses) or ("ce",),
                      restarts=job["restarts"], limit=limit, precision=cfg.precision, seed=job["seed"])
    if not losses:  # autoattack only: keep clean accuracy, drop the PGD defaults
        result = {k: v for k, v in result.items() if not k.startswith(("pgd-", "cw-"))}
    if "autoattack" in job["attacks"]:
        result.update(autoattack(model, data, cfg, job, limit, d))
    if d.is_main:
        result["checkpoint"], result["dataset"], result["arch"] = job["checkpoint"], cfg.dataset, cfg.arch
        print(format_table(result, f"{cfg.arch} on {cfg.dataset}"), flush=True)
        if job["json"]:
            Path(job["json"]).parent.mkdir(parents=True, exist_ok=True)
            Path(job["json"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def autoattack(model, data, cfg, job, limit, d) -> dict:
    """The standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) via torchattacks."""
    import torchattacks  # main() checked that it is installed

    from . import attacks

    class PixelModel(torch.nn.Module):  # AutoAttack perturbs [0, 1] pixels; the model wants normalized input
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model((pixels - mean) / std)

    mean = torch.tensor(data.mean, device=d.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=d.device).view(1, -1, 1, 1)
    attack = torchattacks.AutoAttack(PixelModel().eval(), norm="Linf", eps=job["epsilon"], version="standard",
                                     n_classes=data.num_classes, seed=job["seed"])
    counts = torch.zeros(2, dtype=torch.float64, device=d.device)
    for x, y in take(data.val, limit):
        x, y = x.to(d.device), y.to(d.device)
        adv = attack(x.float() / 255 if x.dtype == torch.uint8 else x.float(), y)
        hits = attacks.correct(model, adv, y, mean=data.mean, std=data.std)[1]
        counts += torch.tensor([len(y), int(hits.sum())], dtype=torch.float64, device=d.device)
    n, hits = distributed.all_reduce_sum(counts).tolist()
    return {"autoattack": hits / n if n else float("nan"),
            "autoattack_ci95": list(attacks.wilson_interval(int(hits), int(n)))}


def main(argv=None) -> int:
    from .train import plan_processes
    args = parser().parse_args(argv)
    try:
        nproc, cpu = plan_processes(args)
        job = settings(args)
        if "autoattack" in job["attacks"]:
            try:
                import torchattacks  # noqa: F401
            except ImportError:
                raise ConfigError("--attack autoattack needs torchattacks: pip install torchattacks") from None
        try:
            return distributed.launch(eval_worker, nproc, job, cpu)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    except USER_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the workers' own handlers are in place (start-up)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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

import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import distributed, messages
from .checkpoint import CheckpointError, not_a_results_file, read_checkpoint, write_result
from .cli import ArgumentParser, add_config_flags, check_writable_file, config_flags, int_at_least, use_log_level
from .config import ConfigError, RunConfig, check, without_moot_settings
from .data import DATASETS
from .data.datasets import build_data, take
from .evaluate import evaluate, non_finite_weight
from .models import create_model
from .report import format_table
from .run import USER_ERRORS, check_class_names, phase_configs

PROG = "python -m freeadv_fast.eval"
# the run settings this command takes, and the flags they go by here
FLAGS = {"data": "data", "batch_size": "batch-size", "precision": "precision", "epsilon": "epsilon",
         "eval_step_size": "step-size", "final_eval_steps": "steps", "eval_restarts": "restarts",
         "final_eval_samples": "limit", "seed": "seed"}


def parser():
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="Unless given, settings are the checkpoint's; the attack is the dataset's paper "
                              "evaluation (or epsilon / 4 steps), with 1 restart on the whole split, seed 0.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("dataset", nargs="?", help=f"one of {', '.join(DATASETS)} (default: the checkpoint's)")
    p.add_argument("--attack", choices=["pgd", "cw", "autoattack"], action="append",
                   help="repeatable (default: pgd)")
    p.add_argument("--json", type=Path)
    p.add_argument("--log-level", choices=messages.LEVELS, help="what is said on stderr (default: info)")
    add_config_flags(p, skip=set(RunConfig.keys()) - set(FLAGS), rename=FLAGS, show_defaults=False)
    for action in p._actions:  # training's default is not this command's (settings() below)
        if action.dest == "eval_step_size":
            action.help = "attack step (default: the dataset's paper evaluation's, else epsilon / 4)"
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", type=int_at_least(1))
    where.add_argument("--cpu", action="store_true")
    p.add_argument("--nproc", type=int_at_least(1))
    return p


def settings(args) -> dict:
    """The checkpoint's run settings with the given flags over them, checked
    as training checks them; the attack follows the dataset's paper
    evaluation unless the flags say otherwise."""
    state = read_checkpoint(args.checkpoint)
    saved = {k: v for k, v in state.get("config", {}).items() if k in RunConfig.keys()}
    if "arch" not in saved:
        raise CheckpointError(f"checkpoint {args.checkpoint} does not say which architecture it holds")
    given = config_flags(args)
    if args.dataset is not None:
        given["dataset"] = args.dataset
        trained_on = saved.get("dataset")
        if args.dataset != trained_on and args.dataset in DATASETS:
            messages.info(f"the checkpoint was trained on {trained_on}; evaluating it on {args.dataset}, with "
                          f"{args.dataset}'s normalisation and labels")
            if not DATASETS[args.dataset].resizable:  # the training run's sizes do not apply here
                saved = {k: v for k, v in saved.items() if k not in ("image_size", "source_size", "phases")}
            saved.pop("data", None)  # the training run's folder holds the other dataset: --data says where this is
    cfg = RunConfig(**without_moot_settings(saved))
    own = dict(eval_restarts=1, final_eval_samples=0, seed=0)  # this command's defaults, not the run's
    cfg = check(dataclasses.replace(cfg, **{**own, **given}), names={k: f"--{v}" for k, v in FLAGS.items()})
    paper = DATASETS[cfg.dataset].eval_attack
    steps, step = paper if paper else (cfg.final_eval_steps, cfg.eval_step_size)
    if "eval_step_size" in given:
        step = cfg.eval_step_size
    elif "epsilon" in given and not paper:
        step = cfg.epsilon / 4
    if cfg.epsilon == 0:
        messages.info("epsilon 0: the attacks cannot change an image, so their accuracy is clean accuracy")
    if args.json is not None:  # before the evaluation, not after it
        check_writable_file(args.json, "--json")
        if args.json.exists() and args.json.resolve() == args.checkpoint.resolve():
            raise ConfigError(f"--json {args.json} is the checkpoint being evaluated; not overwriting it")
        problem = not_a_results_file(args.json)
        if problem:
            raise ConfigError(f"--json {args.json} {problem}; not overwriting it")
    return {"config": cfg, "epsilon": cfg.epsilon, "step_size": step,
            "steps": cfg.final_eval_steps if "final_eval_steps" in given else steps, "attacks": args.attack or ["pgd"],
            "restarts": cfg.eval_restarts, "limit": cfg.final_eval_samples, "seed": cfg.seed,
            "checkpoint": str(args.checkpoint), "json": str(args.json) if args.json else None}


def eval_worker(job: dict, cpu: bool):
    try:
        d = distributed.setup(cpu=cpu)
        status = _evaluate(job, d)
    except USER_ERRORS as exc:
        messages.error(f"{PROG}: error: {exc}")
        status = 2
    except KeyboardInterrupt:  # each worker of --nproc N gets the terminal's Ctrl-C: one line from rank 0
        if distributed.launch_env()[0] == 0:
            messages.error(f"{PROG}: interrupted")
        status = 130
    finally:
        try:
            distributed.teardown()
        except Exception:  # a broken group: exiting is what matters
            pass
    if status:
        sys.exit(status)


def _evaluate(job, d) -> int:
    cfg = phase_configs(job["config"])[-1]  # a run with phases ends at its last phase's image size
    data = build_data(cfg, d.rank, d.world_size, d.device)
    state = read_checkpoint(job["checkpoint"])
    model = create_model(cfg.arch, data.num_classes, data.in_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        why = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(f"checkpoint {job['checkpoint']} does not fit {cfg.arch} with {data.num_classes} "
                              f"classes ({cfg.dataset}): {why[:300]}") from None
    check_class_names(f"checkpoint {job['checkpoint']}", state.get("config", {}).get("class_names"),
                      getattr(data.val, "classes", None), cfg.data or cfg.dataset)
    bad = non_finite_weight(model)
    if bad is not None:
        raise CheckpointError(f"checkpoint {job['checkpoint']} holds non-finite weights (NaN or inf, in {bad}): its "
                              "accuracies would mean nothing")
    model.to(d.device).eval()
    limit = -(-job["limit"] // d.world_size) if job["limit"] else 0
    losses = [{"pgd": "ce", "cw": "cw"}[a] for a in job["attacks"] if a != "autoattack"]
    if d.is_main:  # the settings of the attacks that run: AutoAttack alone runs no PGD
        runs = [f"step {job['step_size']:.4g}, steps {job['steps']}, restarts {job['restarts']}"] if losses else []
        runs += ["AutoAttack (standard)"] if "autoattack" in job["attacks"] else []
        messages.info(f"evaluating {job['checkpoint']} ({cfg.arch}) on {cfg.dataset}: eps {job['epsilon']:.4g}, "
                      f"{', '.join(runs)}, {d.world_size} process(es)")
    result = evaluate(model, data.val, mean=data.mean, std=data.std, epsilon=job["epsilon"],
                      step_size=job["step_size"], steps=tuple(job["steps"]) if losses else (),
                      losses=tuple(losses) or ("ce",), restarts=job["restarts"], limit=limit, precision=cfg.precision,
                      seed=job["seed"])
    if not losses:  # autoattack only: clean accuracy here, no PGD run, nor its settings recorded
        result = {k: v for k, v in result.items() if k not in ("step_size", "restarts")}
    if "autoattack" in job["attacks"]:
        result.update(autoattack(model, data, cfg, job, limit, d))
    if d.is_main:
        result["checkpoint"], result["dataset"], result["arch"] = job["checkpoint"], cfg.dataset, cfg.arch
        print(format_table(result, f"{cfg.arch} on {cfg.dataset}"), flush=True)
        if job["json"]:
            try:
                write_result(job["json"], json.dumps(result, indent=1) + "\n")
            except OSError as exc:  # the table above holds the figures
                raise ConfigError(f"--json {job['json']} could not be written ({exc.strerror}); the results are "
                                  "the table above") from None
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
    use_log_level(args.log_level)
    try:
        distributed.launch_env()
        nproc, cpu = plan_processes(args)
        job = settings(args)
        if job["config"].batch_size % nproc:  # said once here, not by every worker
            raise ConfigError(f"batch size {job['config'].batch_size} is not divisible by the {nproc} processes")
        if job["limit"] % nproc:  # every process attacks its share, rounded up
            messages.info(f"--limit {job['limit']} over {nproc} processes: up to {-(-job['limit'] // nproc) * nproc} "
                          "images are evaluated (a multiple of the process count)")
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
        messages.error(f"{PROG}: error: {exc}")
        return 2
    except KeyboardInterrupt:  # before the workers' own handlers are in place (start-up)
        messages.error(f"{PROG}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""python -m freeadv_fast.train: free adversarial training (and its baselines) from the command line.

    python -m freeadv_fast.train [--gpus N | --cpu [--nproc N]] [DATASET] [options]

DATASET is one of freeadv_fast.data.DATASETS (imagenet, cifar10, cifar100,
tiny-imagenet, fashion-mnist, synthetic, digits). Without one, the
embedded default runs: natural and free training of a small CNN on
scikit-learn's handwritten digits (shipped inside that package), then PGD on
both, and the comparison (under a minute on 2 CPU cores).

Settings are merged: defaults <- preset (--preset, or the dataset's paper
preset) <- --config FILE.yaml <- flags. The effective configuration is printed
and saved as config.yaml in the run directory (--out). Under torchrun each
process is one rank; otherwise --gpus N (or --cpu --nproc N) starts the
workers itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from . import distributed, messages
from .cli import ArgumentParser, add_config_flags, check_writable_dir, config_flags, int_at_least, use_log_level
from .config import EMBEDDED_DEFAULT, PRESETS, ConfigError, build_config, to_yaml
from .data import DATASETS
from .run import USER_ERRORS, phase_configs, resolve_resume, train_worker

PROG = "python -m freeadv_fast.train"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="presets: " + ", ".join(PRESETS) + ". Every setting is a flag; a preset (--preset, or "
                              "the dataset's) replaces the defaults it names.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", type=int_at_least(1),
                       help="start N workers, one per GPU (default: 1 if there is a GPU)")
    where.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    p.add_argument("--nproc", type=int_at_least(1), help="with --cpu: the number of processes")
    p.add_argument("dataset", nargs="?", metavar="DATASET", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--preset", help="a named paper setting (see below)")
    p.add_argument("--config", type=Path, help="a YAML file of settings")
    p.add_argument("--resume", help="auto (the run directory's last checkpoint) or a checkpoint path")
    p.add_argument("--log-level", choices=messages.LEVELS, help="what is said on stderr (default: info)")
    add_config_flags(p, skip=("dataset",))
    return p


def plan_processes(args) -> tuple[int, bool]:
    """(processes on this machine, cpu?) from --gpus / --cpu / --nproc."""
    if args.nproc and not args.cpu:
        raise ConfigError("--nproc goes with --cpu (on GPUs use --gpus N)")
    if distributed.under_torchrun():
        extra = [f"--{flag} {n}" for flag, n in (("gpus", args.gpus), ("nproc", args.nproc)) if n and n > 1]
        if extra:  # each process torchrun started would otherwise be one rank of one, the flag unread
            raise ConfigError(f"{' '.join(extra)}: RANK and WORLD_SIZE are set, so torchrun (or a leftover "
                              "environment) started this process as one rank; torchrun's --nproc-per-node sets the "
                              "processes (or unset RANK and WORLD_SIZE)")
        return 1, args.cpu or not torch.cuda.is_available()
    if args.cpu:
        return args.nproc or 1, True
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.gpus:
        if args.gpus > available:
            hidden = os.environ.get("CUDA_VISIBLE_DEVICES")  # the machine may have more than this process sees
            where = f" visible to this process (CUDA_VISIBLE_DEVICES={hidden[:80]!r})" if hidden is not None else ""
            raise ConfigError(f"--gpus {args.gpus} asked for, but this machine has {available} GPU(s){where}"
                              + ("; use --cpu to run on the CPU" if not available else ""))
        return args.gpus, False
    return 1, available == 0


# what a run (or the demo) leaves in its directory: any of them there means another run would be overwritten
RUN_FILES = ("config.yaml", "comparison.json", "final.json", "metrics.jsonl", "checkpoint-last.pt",
             "checkpoint-last.pt.prev", "checkpoint-best.pt")


def check_out_dir(out: Path, resume):
    """Refuses an --out that holds a run this command would not continue:
    without --resume, or resuming a checkpoint from elsewhere into it."""
    check_writable_dir(out, "--out")
    if resume == "auto" or not (out.is_dir() and any((out / f).exists() for f in RUN_FILES)):
        return
    if resume is None:
        raise ConfigError(f"{out} holds another run; continue it with --resume auto or choose another --out")
    if Path(resume).absolute().parent != out.absolute():
        raise ConfigError(f"{out} holds another run, which resuming {resume} there would overwrite; choose another "
                          "--out (or --resume auto to continue that run)")


# the folders the image-folder layouts read (Data in README.md); a run directory in one becomes a class of images
DATA_SPLITS = ("train", "val", "test")


def check_out_outside_data(out: Path, data):
    """Refuses an --out inside a split folder of --data: the run's folder
    would be read as a class without images by every later run and eval."""
    if data is None:
        return
    out, data = out.resolve(), Path(data).resolve()
    for split in DATA_SPLITS:
        if out == data / split or (data / split) in out.parents:
            raise ConfigError(f"--out {out} is inside the data's {split}/ folder ({data / split}): the run's folder "
                              "would be read as a class of images; choose an --out outside it")


def latest_runs(cfg) -> list[Path]:
    """Run directories that the default --out made for this dataset and method, newest first."""
    runs = Path("runs")
    found = [p for p in runs.glob(f"{cfg.dataset}-{cfg.method}-*") if (p / "checkpoint-last.pt").exists()
             or (p / "checkpoint-last.pt.prev").exists()] if runs.is_dir() else []
    return sorted(found, key=lambda p: p.name, reverse=True)


def run_training(cfg, resume, nproc, cpu) -> int:
    world = distributed.launch_env()[1] if distributed.under_torchrun() else nproc
    for phase in phase_configs(cfg):  # every phase's batch, said once here rather than by every worker
        if phase.batch_size % world:
            raise ConfigError(f"batch size {phase.batch_size} is not divisible by the {world} worker processes")
    if cfg.sync_batchnorm and cpu and world > 1:
        raise ConfigError("--sync-batchnorm needs GPUs: torch's SyncBatchNorm runs on CUDA only")
    path = resolve_resume(cfg, resume, world)
    DATASETS[cfg.dataset].check(cfg)  # the data's layout, before any worker starts
    try:
        return distributed.launch(train_worker, nproc, cfg, str(path) if path else None, cpu)
    except SystemExit as exc:  # a single in-process worker
        return exc.code if isinstance(exc.code, int) else 1


def run_demo(cfg, args, nproc, cpu) -> int:
    """The embedded default: natural vs free training on digits, PGD on both."""
    out = Path(cfg.out)
    first = distributed.launch_env()[0] == 0
    results = {}
    for method in ("natural", "free"):
        sub = build_config(dataset=cfg.dataset, preset=args.preset or "digits-demo", file=args.config,
                           flags={**config_flags(args), "method": method, "out": str(out / method)})
        messages.info(f"\n=== {method} training ({out / method})")
        if first:
            check_out_dir(out / method, args.resume)
        if not (args.resume and (out / method / "final.json").exists()):
            status = run_training(sub, args.resume, nproc, cpu)
            if status:
                return status
        if not first:  # under torchrun, rank 0 writes the comparison
            continue
        results[method] = json.loads((out / method / "final.json").read_text())
    if not first:
        return 0
    steps = cfg.final_eval_steps[-1]
    key = f"pgd-{steps}"
    comparison = {m: {"clean_acc": r["clean_top1"], "robust_acc": r[key], "clean_acc_ci95": r["clean_top1_ci95"],
                      "robust_acc_ci95": r[key + "_ci95"], "samples": r["samples"]} for m, r in results.items()}
    comparison["attack"] = {"name": key, "epsilon": cfg.epsilon, "step_size": cfg.eval_step_size, "steps": steps,
                            "restarts": cfg.eval_restarts, "dataset": cfg.dataset}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    n, f = comparison["natural"], comparison["free"]
    print(f"\n{cfg.dataset}, {key} at eps {cfg.epsilon:.4g} on {f['samples']} held-out images:\n"
          f"  {'':8} {'clean':>8} {'robust':>8}\n"
          f"  {'natural':8} {n['clean_acc']:8.4f} {n['robust_acc']:8.4f}\n"
          f"  {'free-' + str(cfg.replays):8} {f['clean_acc']:8.4f} {f['robust_acc']:8.4f}\n"
          f"free training: {f['robust_acc'] - n['robust_acc']:+.4f} robust accuracy for "
          f"{f['clean_acc'] - n['clean_acc']:+.4f} clean accuracy; {out / 'comparison.json'}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    use_log_level(args.log_level)
    try:
        rank, torchrun_world, _ = distributed.launch_env()
        nproc, cpu = plan_processes(args)
        demo = args.dataset is None and args.preset is None and args.config is None
        if demo and args.method is not None:  # the demo trains both of its methods whatever --method says
            raise ConfigError(f"the embedded default compares natural and free training, so --method {args.method} "
                              f"would be ignored; name the dataset to train one method ({PROG} {EMBEDDED_DEFAULT} "
                              f"--method {args.method})")
        dataset = EMBEDDED_DEFAULT if demo else args.dataset
        cfg = build_config(dataset=dataset, preset=args.preset, file=args.config, flags=config_flags(args))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if cfg.out is None and args.resume == "auto":  # a new default directory holds nothing to continue
            runs = [] if demo else latest_runs(cfg)
            newest = f" (the newest of the {len(runs)} {cfg.method} run(s) of {cfg.dataset} in runs/: {runs[0]})" \
                if runs else ""
            raise ConfigError(f"--resume auto continues the run in --out; give --out DIR{newest}")
        if cfg.out is None:
            if torchrun_world > 1:  # every node must write to the same run directory
                raise ConfigError("under torchrun, give --out DIR (the same on every node)")
            cfg.out = f"runs/demo-{stamp}" if demo else f"runs/{cfg.dataset}-{cfg.method}-{stamp}"
            args.out = cfg.out
        first = rank == 0  # under torchrun, the other ranks stay quiet
        if first:
            check_out_dir(Path(cfg.out), args.resume)
            check_out_outside_data(Path(cfg.out), cfg.data)
            messages.info(f"configuration ({'embedded default: natural and free' if demo else cfg.method} training):\n"
                          + "".join(f"  {line}\n" for line in to_yaml(cfg).splitlines()))
        if demo:
            return run_demo(cfg, args, nproc, cpu)
        return run_training(cfg, args.resume, nproc, cpu)
    except USER_ERRORS as exc:
        messages.error(f"{PROG}: error: {exc}")
        return 2
    except KeyboardInterrupt:  # before the workers' own handlers are in place (start-up)
        messages.error(f"{PROG}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

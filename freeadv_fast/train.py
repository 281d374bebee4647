"""python -m freeadv_fast.train: free adversarial training (and its baselines) from the command line.

    python -m freeadv_fast.train [--gpus N | --cpu [--nproc N]] [DATASET] [options]

DATASET is imagenet, cifar10, cifar100, synthetic or digits. Without one, the
embedded default runs: natural and free training of a small CNN on
scikit-learn's handwritten digits (shipped inside that package), then PGD on
both, and the comparison (a few minutes on 2 CPU cores).

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

from . import distributed
from .cli import ArgumentParser, check_writable_dir, int_at_least, pixel
from .config import DATASETS, EMBEDDED_DEFAULT, PRESETS, ConfigError, build_config, to_yaml
from .data.errors import DataError
from .run import USER_ERRORS, resolve_resume, train_worker

PROG = "python -m freeadv_fast.train"


positive_int, nonnegative_int = int_at_least(1), int_at_least(0)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="presets: " + ", ".join(PRESETS))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", type=positive_int, help="start N workers, one per GPU (default: 1 if there is a GPU)")
    where.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    p.add_argument("--nproc", type=positive_int, help="with --cpu: the number of processes")
    p.add_argument("dataset", nargs="?", metavar="DATASET", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data", help="dataset folder")
    p.add_argument("--arch")
    p.add_argument("--method", help="free, natural, pgd or fast")
    p.add_argument("--replays", type=positive_int, help="m of free-m")
    p.add_argument("--epsilon", type=pixel, help="L-inf budget in pixel units, e.g. 4/255")
    p.add_argument("--step-size", type=pixel)
    p.add_argument("--pgd-steps", type=positive_int, help="attack steps of PGD training")
    p.add_argument("--epochs", type=float, help="natural-training epochs (free-m makes ceil(E/m) passes)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", help="step, multistep, cosine, onecycle or constant")
    p.add_argument("--precision", help="fp32, bf16 or fp16")
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--compile-mode", help="with --compile: default or max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graph", action="store_true", default=None,
                   help="capture each training step as a CUDA graph (full batches on one GPU; else eager, said once)")
    p.add_argument("--pixel-mode", help="clamp_input (the paper's code as it ran), clamp_input_strict or project")
    p.add_argument("--loader", help="dali or torch (image folders)")
    p.add_argument("--workers", type=nonnegative_int, help="loader worker threads/processes per rank")
    p.add_argument("--preset", choices=None, help="a named paper setting (see below)")
    p.add_argument("--config", type=Path, help="a YAML file of settings")
    p.add_argument("--out", help="run directory (default runs/<dataset>-<method>-<time>)")
    p.add_argument("--resume", help="auto (the run directory's last checkpoint) or a checkpoint path")
    p.add_argument("--eval-every", type=nonnegative_int, help="passes between held-out evaluations (0: off)")
    p.add_argument("--seed", type=nonnegative_int)
    p.add_argument("--train-subset", type=nonnegative_int, metavar="N",
                   help="train on N images of the training split (a fixed random subset; 0: all)")
    return p


FLAG_KEYS = ("data", "arch", "method", "replays", "epsilon", "step_size", "pgd_steps", "epochs", "batch_size", "lr",
             "schedule", "precision", "channels_last", "compile", "compile_mode", "cuda_graph", "pixel_mode",
             "loader", "workers", "out", "eval_every", "seed", "train_subset")


def plan_processes(args) -> tuple[int, bool]:
    """(processes on this machine, cpu?) from --gpus / --cpu / --nproc."""
    if args.nproc and not args.cpu:
        raise ConfigError("--nproc goes with --cpu (on GPUs use --gpus N)")
    if distributed.under_torchrun():
        return 1, args.cpu or not torch.cuda.is_available()
    if args.cpu:
        return args.nproc or 1, True
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.gpus:
        if args.gpus > available:
            raise ConfigError(f"--gpus {args.gpus} asked for, but this machine has {available} GPU(s)"
                              + ("; use --cpu to train on the CPU" if not available else ""))
        return args.gpus, False
    return 1, available == 0


def check_out_dir(out: Path, resume):
    check_writable_dir(out, "--out")
    if resume is None and out.exists() and any((out / f).exists() for f in ("config.yaml", "comparison.json")):
        raise ConfigError(f"{out} holds another run; continue it with --resume auto or choose another --out")


def precheck_data(cfg):
    """The data's layout, checked before any worker starts (cheap checks only)."""
    from .data import cifar, fashion_mnist, tiny_imagenet
    from .data.folder import find_split, scan_image_folder
    if cfg.dataset in ("cifar10", "cifar100"):
        if cfg.data is None:
            raise DataError(f"{cfg.dataset} needs --data DIR")
        cifar.find_root(cfg.data, cfg.dataset)
    elif cfg.dataset == "tiny-imagenet":
        if cfg.data is None:
            raise DataError("tiny-imagenet needs --data DIR (holding train/<wnid>/ and val/)")
        tiny_imagenet.find_root(cfg.data)
    elif cfg.dataset == "fashion-mnist":
        fashion_mnist.find_root(cfg.data)
    elif cfg.dataset == "imagenet":
        if cfg.data is None:
            raise DataError("imagenet needs --data DIR (holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
        for split in ("train", "val"):
            scan_image_folder(find_split(cfg.data, split), check=False)


def run_training(cfg, resume, nproc, cpu) -> int:
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed.under_torchrun() else nproc
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {world} worker processes")
    path = resolve_resume(cfg, resume)
    precheck_data(cfg)
    try:
        return distributed.launch(train_worker, nproc, cfg.to_dict(), str(path) if path else None, cpu)
    except SystemExit as exc:  # a single in-process worker
        return exc.code if isinstance(exc.code, int) else 1


def run_demo(cfg, args, nproc, cpu) -> int:
    """The embedded default: natural vs free training on digits, PGD on both."""
    out = Path(cfg.out)
    first = int(os.environ.get("RANK", 0)) == 0
    results = {}
    for method in ("natural", "free"):
        sub = build_config(dataset=cfg.dataset, preset=args.preset or "digits-demo", file=args.config,
                           flags={**flags_of(args), "method": method, "out": str(out / method)})
        print(f"\n=== {method} training ({out / method})", file=sys.stderr, flush=True)
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


def flags_of(args) -> dict:
    return {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        nproc, cpu = plan_processes(args)
        demo = args.dataset is None and args.preset is None and args.config is None
        dataset = EMBEDDED_DEFAULT if demo else args.dataset
        cfg = build_config(dataset=dataset, preset=args.preset, file=args.config, flags=flags_of(args))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        torchrun_world = int(os.environ.get("WORLD_SIZE", 1)) if distributed.under_torchrun() else 1
        if cfg.out is None:
            if torchrun_world > 1:  # every node must write to the same run directory
                raise ConfigError("under torchrun, give --out DIR (the same on every node)")
            cfg.out = f"runs/demo-{stamp}" if demo else f"runs/{cfg.dataset}-{cfg.method}-{stamp}"
            args.out = cfg.out
        first = int(os.environ.get("RANK", 0)) == 0  # under torchrun, the other ranks stay quiet
        if first:
            check_out_dir(Path(cfg.out), args.resume)
            print(f"configuration ({'embedded default: natural and free' if demo else cfg.method} training):\n"
                  + "".join(f"  {line}\n" for line in to_yaml(cfg).splitlines()), file=sys.stderr, flush=True)
        if demo:
            return run_demo(cfg, args, nproc, cpu)
        return run_training(cfg, args.resume, nproc, cpu)
    except USER_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the workers' own handlers are in place (start-up)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

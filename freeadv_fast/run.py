"""One training run on one process (rank): data, model, trainer, the pass loop
with progress, periodic evaluation, logs, checkpoints and the final
evaluation. ``python -m freeadv_fast.train`` starts one of these per device.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from . import distributed, messages
from .checkpoint import CheckpointError, check_world, find_resumable, load_checkpoint, read_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, to_yaml
from .data.datasets import build_data, forget_scans
from .data.errors import DataError
from .evaluate import EvaluationStopped, NothingEvaluated, attack_name, evaluate
from .models import create_model
from .phases import parse as parse_phases, pass_ends, phase_of
from .scheduler import build_schedule, passes_for
from .methods import METHODS
from .trainer import NonFiniteError


class OutOfMemory(RuntimeError):
    """The GPU cannot hold a step at this batch and image size; the message says which and how to lower it."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, OutOfMemory, distributed.LaunchError)


def out_of_memory(exc: Exception, cfg: RunConfig, now: RunConfig, phase: int, phases: int, world: int,
                  device) -> OutOfMemory:
    """The one-line refusal for a CUDA out-of-memory error: the phase, the
    batch per GPU, the memory asked for against what is free."""
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(exc))
    where = f"phase {phase + 1}/{phases}: " if cfg.phases else ""
    decoder = "in DataLoader worker" in str(exc)  # the nvjpeg loader's decoding processes use the GPU too
    text = (f"out of GPU memory ({where}{now.image_size or 'default'} px images, batch {now.batch_size // world} "
            f"per GPU): {'a decoding process' if decoder else 'a step'} asked for "
            f"{asked.group(1) if asked else 'more memory'}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        text += f" with {free / 2**30:.2f} GiB of {total / 2**30:.1f} GiB free"
    lower = "that phase's batch in --phases" if cfg.phases else "--batch-size"
    if decoder:
        lower = f"--decode-processes (each holds a CUDA context and its batches), {lower}"
    return OutOfMemory(f"{text}. Lower {lower} (the LR follows a phase's batch) or the image size, or use more "
                       f"GPUs; {_kept(cfg)}")


def host_out_of_memory(exc: Exception) -> str | None:
    """The one-line refusal for a failed host-memory allocation (torch's CPU
    allocator raises a plain RuntimeError), or None for any other error."""
    found = re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", str(exc))
    if not isinstance(exc, RuntimeError) or not found:
        return None
    return (f"out of host memory: a tensor of {int(found.group(1)) / 2**30:.1f} GiB was asked for; lower "
            "--batch-size or the image size")


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes the current batch's
    replays, writes a checkpoint and stops."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


# what a run writes only after its first checkpoint
RESULT_FILES = ("final.json", "checkpoint-best.pt", "checkpoint-best.pt.prev", "checkpoint-last.pt.prev")


def resolve_resume(cfg: RunConfig, resume, world: int = 1) -> Path | None:
    """The checkpoint to resume from: PATH as given, or for ``auto`` the run
    directory's newest readable one (falling back to the previous checkpoint
    when the last is truncated or corrupted), or None to start afresh. Reads
    it once, before any worker starts, refusing an unreadable one or one
    written by a different run (check_same_run)."""
    if resume is None:
        return None
    if resume == "auto":
        path, state, problems = find_resumable(Path(cfg.out) / "checkpoint-last.pt")
        for problem in problems:
            messages.warning(f"skipping a checkpoint: {problem}")
        if path is None:
            if problems:
                raise CheckpointError(f"no readable checkpoint in {cfg.out} to resume from")
            # a run that got this far wrote a checkpoint-last.pt; without it, starting afresh would overwrite them
            results = [f for f in RESULT_FILES if (Path(cfg.out) / f).exists()]
            if results:
                raise ConfigError(f"{cfg.out} holds a run's results ({', '.join(results)}) but no checkpoint-last.pt "
                                  "to continue it from: starting afresh there would overwrite them; choose another "
                                  "--out")
            messages.info(f"no checkpoint in {cfg.out} yet: starting from scratch")
            return None
    else:
        path = Path(resume)
        state = read_checkpoint(path)
        check_not_behind_last(path, state, Path(cfg.out))
    saved = state.get("config", {})
    for key in ("arch", "dataset", "method"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise CheckpointError(f"checkpoint {path} is from a {key} {saved[key]!r} run, not {getattr(cfg, key)!r}")
    check_same_run(saved, cfg, path)
    check_world(path, state, world)  # said once here, not by every worker
    return path


def check_not_behind_last(path: Path, state: dict, out: Path):
    """Refuses to resume an older checkpoint of --out's run (its best, its
    .prev) into that run: its first checkpoint would replace the newer
    checkpoint-last.pt, and the next one the .prev that kept it."""
    last = out / "checkpoint-last.pt"
    if path.absolute().parent != out.absolute() or not last.is_file() or path.resolve() == last.resolve():
        return
    try:
        newer = read_checkpoint(last).get("step", 0)
    except CheckpointError:  # a damaged last checkpoint holds nothing to lose
        return
    if newer > state.get("step", 0):
        raise ConfigError(f"{path} (step {state.get('step', 0)}) is older than {last} (step {newer}): resuming it in "
                          f"{out} would replace that run's newer checkpoints; resume it with another --out")


def fault_injection(rank: int):
    """TEST-ONLY hook for the fault tests; never set it otherwise. With
    ``FREEADV_FAULT_INJECT=R:S`` in the environment, rank R kills itself
    (SIGKILL, no cleanup) after its first batch that reaches optimizer step
    S, in a job's first round only (``TORCHELASTIC_RESTART_COUNT`` unset or
    0), so torchrun's restart round runs clean. (That count is per node:
    with several nodes, rank R may fail again on a node whose count stayed
    0.) Returns a per-batch check, or None when unset."""
    spec = os.environ.get("FREEADV_FAULT_INJECT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    try:
        target_rank, step = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ConfigError(f"FREEADV_FAULT_INJECT={spec[:40]!r} is not RANK:STEP (a test-only hook: unset it)") from None
    if rank != target_rank:
        return None

    def check(trainer):
        if trainer.step >= step:
            messages.warning(f"FREEADV_FAULT_INJECT: rank {rank} kills itself at step {trainer.step}")
            os.kill(os.getpid(), signal.SIGKILL)
    return check


# a full disk, a read-only or vanished output: the run stops cleanly, naming the cause
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
                 errno.ENOTDIR, errno.EISDIR, errno.EFBIG}


def _kept(cfg) -> str:
    last = Path(cfg.out) / "checkpoint-last.pt"
    return f"the last good checkpoint, {last}, is kept" if last.exists() else "no checkpoint had been written"


LOCK_NAME = ".lock"
_held_lock: list[int] = []


def hold_run_lock(out: Path):
    """Rank 0 holds an exclusive lock on the run directory while it trains: a
    second start into the same --out (the command run twice, a --resume auto
    in another terminal) would interleave its checkpoints and metrics with
    this one's. A POSIX record lock: it goes with the process, however it
    ends, and forked loader processes do not inherit it, so a crashed run
    never leaves its directory locked (and torchrun's restarts find it free).
    Closing any other descriptor of the file in this process would drop the
    lock: nothing else here opens it."""
    if _held_lock:
        return
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # an unwritable folder is named where the run first writes
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without locks: run as before
            return
        raise ConfigError(f"{out} is in use by another training process{f' (pid {holder})' if holder else ''}; "
                          "wait for it to end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_lock.append(fd)


def release_run_lock():
    while _held_lock:
        os.close(_held_lock.pop())


def train_worker(cfg: RunConfig, resume: str | None, cpu: bool):
    """Entry point of every rank. User errors exit with status 2 and one line."""
    try:
        d = distributed.setup(cpu=cpu)
    except RuntimeError as exc:
        messages.error(f"freeadv_fast.train: error: {exc}")
        sys.exit(2)
    try:
        status = _train(cfg, d, resume)
    except USER_ERRORS as exc:
        messages.error(f"freeadv_fast.train: error: {exc}")
        status = 2
    except KeyboardInterrupt:  # before training installed its stop handler: nothing to save yet
        messages.error(f"freeadv_fast.train: rank {d.rank}: interrupted during start-up")
        status = 130
    except NonFiniteError as exc:
        messages.error(f"freeadv_fast.train: rank {d.rank}: training diverged, stopping: {exc}; {_kept(cfg)}")
        status = 3
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        messages.error(f"freeadv_fast.train: error: rank {d.rank}: cannot write the run's files{where}: "
            f"{exc.strerror or exc}; {_kept(cfg)}")
        status = 2
    except Exception as exc:
        if host_out_of_memory(exc):
            messages.error(f"freeadv_fast.train: error: rank {d.rank}: {host_out_of_memory(exc)}; {_kept(cfg)}")
            status = 2
        elif d.distributed and distributed.is_peer_failure(exc):
            first = str(exc).strip().splitlines()[0]
            messages.error(f"freeadv_fast.train: rank {d.rank}: another process failed, stopping ({first})")
            status = 1
        else:
            raise
    finally:
        release_run_lock()
        try:
            distributed.teardown()
        except Exception:  # the group may be broken already; exiting is what matters
            pass
        distributed.release_groups()
    if status:
        sys.exit(status)


# what a resumed run must share with the run that wrote the checkpoint: the
# perturbation buffer, the batch order and the LR schedule depend on them
SAME_RUN_KEYS = ("dataset", "data", "arch", "method", "replays", "batch_size", "image_size", "source_size",
                 "phases", "train_subset", "epochs", "schedule", "milestones", "seed", "epsilon", "step_size",
                 "pixel_mode", "pgd_steps", "synthetic_batches")
# settings that only some runs read: a change elsewhere changes nothing
USED_BY = {"pgd_steps": lambda cfg: cfg.method == "pgd", "synthetic_batches": lambda cfg: cfg.dataset == "synthetic",
           # a choice of free training's alone (PGD-k's and FGSM-RS's checkpoints once recorded clamp_input)
           "pixel_mode": lambda cfg: len(METHODS[cfg.method].pixel_modes) > 1}
# may change on resuming (a lower LR to finish, another precision), but the run's record must say so
SAID_RUN_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "precision", "eval_step_size", "eval_steps",
                 "final_eval_steps", "eval_restarts")


def check_same_run(saved: dict, cfg: RunConfig, path) -> None:
    def norm(key, value):
        return str(Path(value).resolve()) if key == "data" and value else value
    changed = [f"{k.replace('_', '-')} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in SAME_RUN_KEYS
               if k in saved and norm(k, saved[k]) != norm(k, getattr(cfg, k)) and USED_BY.get(k, bool)(cfg)]
    if changed:
        raise ConfigError(f"{path} was written by a different run: {', '.join(changed)}; free training's "
                          "perturbation buffer, the attack, the batch order and the LR schedule depend on these. "
                          "Resume with the same settings, or start a new run with another --out")
    said = [f"{k.replace('_', '-')} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in SAID_RUN_KEYS
            if k in saved and saved[k] != getattr(cfg, k)]
    if said:
        messages.info(f"resuming {path} with settings that differ from its run's: {', '.join(said)} (from here "
                      "on; config.yaml records the new ones)")


def apply_changed_settings(trainer, saved: dict, cfg: RunConfig) -> None:
    """The optimizer settings a resumed run changed (check_same_run said which):
    loading the checkpoint had put the saved ones back. A new LR scales the
    rest of the schedule (phases' batch scaling included)."""
    group_values = {k: getattr(cfg, k) for k in ("momentum", "weight_decay", "nesterov")
                    if k in saved and saved[k] != getattr(cfg, k)}
    lr_scale = cfg.lr / saved["lr"] if isinstance(saved.get("lr"), (int, float)) and saved["lr"] > 0 else 1.0
    if group_values or lr_scale != 1.0:
        trainer.retune(lr_scale=lr_scale, **group_values)


def check_class_names(path, trained, here, what) -> None:
    """CheckpointError unless the class names ``here`` are those the run of
    checkpoint ``path`` trained with (``trained``; None for runs on data of
    fixed classes): a renamed, added or removed class folder shifts every
    label after it."""
    if not (isinstance(trained, list) and isinstance(here, list)) or trained == here:
        return
    i = next((i for i, (a, b) in enumerate(zip(trained, here)) if a != b), min(len(trained), len(here)))
    theirs, ours = (f"{n[i]!r}" if i < len(n) else "nothing" for n in (trained, here))
    raise CheckpointError(f"{path} was trained on other class folders than {what} has (label {i} was {theirs}, here "
                          f"it is {ours}): its labels would mean other classes")


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl. A crash in the middle of an
    append leaves a partial last line: resuming is what that case needs, so
    the line is dropped (and said); damage anywhere else is an error."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == len(lines):
                messages.warning(f"{path}: dropped its last line, cut short (a crash while it was written)")
                path.write_text("".join(json.dumps(r) + "\n" for r in records))
                break
            raise CheckpointError(f"{path}: line {number} is not a JSON record; fix or remove the file") from None
        records.append(record)
    return records


def drop_records_after(path: Path, records: list[dict], step: int) -> list[dict]:
    """The records up to the resumed checkpoint's ``step``: those after it came
    from an attempt that crashed before its next checkpoint, whose steps the
    resumed run trains again (kept, they would count them twice)."""
    kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > step)]
    if len(kept) < len(records):
        messages.info(f"{path}: dropped {len(records) - len(kept)} record(s) after step {step}, written by the "
                      "attempt that stopped before its next checkpoint (those steps are trained again)")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


def phase_ends(cfg: RunConfig, replays: int, passes: int) -> list[int]:
    """The pass count at which each phase ends ([passes]: one phase)."""
    if not cfg.phases:
        return [passes]
    return pass_ends(parse_phases(cfg.phases, epochs=cfg.epochs, batch_size=cfg.batch_size), replays)


def phase_configs(cfg: RunConfig) -> list[RunConfig]:
    """The run's phases as configs of one image size each (freeadv_fast/phases.py);
    a run without phases is one phase."""
    if not cfg.phases:
        return [cfg]
    return [dataclasses.replace(cfg, image_size=p.image_size, batch_size=p.batch_size, source_size=p.source_size)
            for p in parse_phases(cfg.phases, epochs=cfg.epochs, batch_size=cfg.batch_size)]


def check_image_size(arch: str, size: int, data):
    """Refuses images the architecture's downsampling would shrink to nothing,
    before training (a forward pass of the model on the meta device: no memory,
    no arithmetic, a fraction of a second for ResNet-50)."""
    with torch.device("meta"):
        probe = create_model(arch, data.num_classes, data.in_channels).eval()
        try:
            probe(torch.empty(1, data.in_channels, size, size))
        except RuntimeError as exc:
            raise ConfigError(f"{size} px images are too small for {arch} ({str(exc).splitlines()[0]}); "
                              "use larger images (--image-size) or another --arch") from None


def build_trainer(cfg: RunConfig, data, device, dist=None, phase_data=None):
    """(trainer, model, passes, replays) for ``cfg`` on ``data``: the model on
    ``device`` (wrapped in DDP when ``dist`` is distributed), SGD, the LR
    schedule over the whole run and the method's trainer. With phases,
    ``phase_data`` holds each phase's Data: the schedule spans their passes,
    each phase's steps at the LR scaled by its batch size."""
    for size in sorted({d.image_size for d in phase_data or [data]} - {None}):
        check_image_size(cfg.arch, size, data)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, data.num_classes, data.in_channels).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist is not None:
        model = distributed.wrap_model(model, dist, sync_batchnorm=cfg.sync_batchnorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    method = METHODS[cfg.method]
    replays = method.replays(cfg)
    passes = passes_for(cfg.epochs, replays)
    if cfg.phases:
        starts, total, done = [], 0, 0
        for end, d in zip(phase_ends(cfg, replays, passes), phase_data):
            starts.append(total)
            total += (end - done) * len(d.train) * replays
            done = end
        schedule = build_schedule(cfg.schedule, optimizer, steps_per_pass=total, passes=1, replays=replays,
                                  milestones=cfg.milestones, phase_starts=starts,
                                  phase_scales=[c.batch_size / cfg.batch_size for c in phase_configs(cfg)])
    else:
        steps_per_pass = len(data.train) * replays
        total = steps_per_pass * passes
        schedule = build_schedule(cfg.schedule, optimizer, steps_per_pass=steps_per_pass, passes=passes,
                                  replays=replays, milestones=cfg.milestones)
    # milestones are optimizer steps: a run shortened from a preset's, or milestones given in epochs, would
    # otherwise train at one LR throughout without a word
    if cfg.schedule != "multistep" and cfg.milestones:
        messages.say_once(f"note: milestones {cfg.milestones} apply to the multistep schedule only; the {cfg.schedule} "
                          "schedule ignores them")
    elif cfg.schedule == "multistep" and max(cfg.milestones) >= total:
        late = [m for m in cfg.milestones if m >= total]
        messages.say_once(f"note: milestone(s) {late} come at or after the run's last optimizer step ({total} steps "
                          "in all): the LR never falls there (milestones count optimizer steps, not epochs)")
    rank = dist.rank if dist is not None else 0
    common = dict(mean=data.mean, std=data.std, precision=cfg.precision, channels_last=cfg.channels_last,
                  compile=cfg.compile and cfg.compile_mode, cuda_graph=cfg.cuda_graph, scheduler=schedule,
                  seed=cfg.seed + rank, max_bad_steps=cfg.max_bad_steps)
    return method.trainer(model, optimizer, **method.trainer_args(cfg), **common), model, passes, replays


def tensorboard_writer(out: Path, resumed_step: int | None = None):
    """Writes each metrics record's numbers to TensorBoard under <out>/tensorboard
    (as "train/loss", "eval/clean_top1", ...), at the record's optimizer step;
    a resumed run hides what a crashed attempt wrote after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=None if resumed_step is None else resumed_step + 1)

    def write(record):
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("time", "step"):
                writer.add_scalar(f"{record['type']}/{key}", value, record["step"], walltime=record["time"])
        writer.flush()
    return write


def _train(cfg: RunConfig, d: distributed.Dist, resume) -> int:
    out = Path(cfg.out)
    if d.is_main and out.is_dir():  # before anything here reads or repairs the run's files
        hold_run_lock(out)
    torch.manual_seed(cfg.seed)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    forget_scans()
    phase_cfgs = phase_configs(cfg)
    phase_data = [build_data(c, d.rank, d.world_size, d.device) for c in phase_cfgs]
    for c, p in zip(phase_cfgs, phase_data):
        images = getattr(p.train, "num_samples", None)
        if images is not None and images < c.batch_size:  # a pass of one short batch, at an LR meant for more
            raise DataError(f"the training split has {images} images, fewer than one batch of {c.batch_size}: "
                            "lower --batch-size (or train on more images)")
    trainer, model, passes, replays = build_trainer(cfg, phase_data[0], d.device, d, phase_data)
    ends = phase_ends(cfg, replays, passes)
    phase = phase_of(ends, trainer.epoch)  # 0 here; set again after a resume
    data = phase_data[phase]

    state = {**cfg.to_dict(), "best_robust": -1.0}  # stored in every checkpoint
    names = getattr(data.train, "classes", None)
    if isinstance(names, list):  # an image folder's class names, which eval checks its labels against
        state["class_names"] = names
    path = Path(resume) if resume else None  # already resolved by resolve_resume
    if path is not None:
        saved = load_checkpoint(path, trainer)
        check_class_names(path, saved.get("class_names"), state.get("class_names"), cfg.data or cfg.dataset)
        apply_changed_settings(trainer, saved, cfg)
        # the score of the weights in this folder's checkpoint-best.pt; resumed into a new folder, which has
        # none, the best is chosen among this run's evaluations (the old score would keep worse weights there)
        has_best = distributed.from_rank0(lambda: (out / "checkpoint-best.pt").is_file())  # rank 0's folder
        state["best_robust"] = saved.get("best_robust", -1.0) if has_best else -1.0
        phase = phase_of(ends, trainer.epoch)
        data = phase_data[phase]
        if d.is_main and trainer.epoch >= passes:  # stopped during (or before) the final evaluation
            messages.info(f"resumed from {path}: its training is complete ({passes} passes, step {trainer.step}); "
                          "running the final evaluation")
        elif d.is_main:
            messages.info(f"resumed from {path}: pass {trainer.epoch + 1}/{passes}, "
                f"batch {trainer.batch_in_epoch}, step {trainer.step}")

    metrics_file = out / "metrics.jsonl"
    history: list[dict] = []
    if d.is_main and metrics_file.exists():
        history = read_metrics(metrics_file)
        if path is not None:
            history = drop_records_after(metrics_file, history, trainer.step)

    board = tensorboard_writer(out, trainer.step if path is not None else None) if cfg.tensorboard and d.is_main \
        else None

    def write_metrics(record):
        record = {"time": time.time(), **record}
        history.append(record)
        if d.is_main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if board is not None:
            board(record)

    bar = None
    pass_records: list[dict] = []  # this pass's train records, for its summary line

    fault = fault_injection(d.rank)

    def on_batch(n):
        nonlocal bar
        if fault is not None:
            fault(trainer)
        if not d.is_main:
            return
        if bar is None:  # the first batch of a pass (or of a resumed one)
            from tqdm import tqdm
            batch = phase_cfgs[phase].batch_size
            images_per_pass = getattr(data.train, "num_samples", len(data.train) * batch)
            done = min(images_per_pass, (trainer.batch_in_epoch - 1) * batch)
            bar = tqdm(total=images_per_pass, initial=done, unit="img", desc=f"pass {trainer.epoch + 1}/{passes}",
                       file=sys.stderr, mininterval=1.0, dynamic_ncols=True, leave=False)
        bar.update(n * d.world_size)

    def phase_info():
        info = {"image_size": data.image_size, "batch_size": phase_cfgs[phase].batch_size}
        return {**info, "phase": phase + 1} if cfg.phases else info

    def on_log(record):
        record = {"type": "train", **record, "images_per_s": record["samples_per_s"] / replays,
                  "progress": record["epoch"] + record["batch"] / max(1, len(data.train)), **phase_info()}
        pass_records.append(record)
        write_metrics(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}", lr=f"{record['lr']:.3g}",
                            refresh=False)

    def periodic_eval(epoch):
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None
        summary = trainer.log_record()
        if summary["samples"]:
            on_log(summary)
        if d.is_main:  # the whole pass (since the resumed batch, after a resume), not its last log interval
            n = sum(r["samples"] for r in pass_records)
            seconds = sum(r["samples"] / r["samples_per_s"] for r in pass_records if r["samples"])
            loss, acc = (sum(r[k] * r["samples"] for r in pass_records if r["samples"]) / n if n else math.nan
                         for k in ("loss", "acc"))
            messages.info(f"pass {epoch}/{passes}: loss {loss:.4f}, train acc {acc:.4f}, "
                f"{n / seconds / replays if seconds > 0 else 0:.0f} images/s, lr {trainer.last_step_lr():.4g}")
        pass_records.clear()
        if cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == passes):
            try:  # a stop request is answered within one batch's attacks here too, not after the evaluation
                result = evaluate(model, data.val, mean=data.mean, std=data.std, epsilon=cfg.epsilon,
                                  step_size=cfg.eval_step_size, steps=(cfg.eval_steps,), restarts=cfg.eval_restarts,
                                  limit=-(-cfg.eval_samples // d.world_size), precision=cfg.precision, seed=cfg.seed,
                                  should_stop=lambda: bool(stop.signum))
            except EvaluationStopped:  # the pass's checkpoint follows; the next batch's stop check ends training
                if d.is_main:
                    messages.info(f"  the evaluation after pass {epoch} was stopped by a stop request")
                return
            except DataError as exc:  # unusable held-out data: raised once the pass's checkpoint is written (every
                # rank raises NothingEvaluated; another rank's loader error would leave the others waiting)
                if d.distributed and not isinstance(exc, NothingEvaluated):
                    raise
                held_out_error.append(DataError(f"{exc} (in the evaluation after pass {epoch}; that pass's "
                                                f"checkpoint is written: fix the held-out data, then --resume auto)"))
                return
            attack = attack_name("ce", cfg.eval_steps, cfg.eval_restarts)
            robust = result[attack]
            write_metrics({"type": "eval", "step": trainer.step, "epoch": epoch, **result, **phase_info()})
            if d.is_main:
                messages.info(f"  eval on {result['samples']} held-out images: clean {result['clean_top1']:.4f}, "
                    f"{attack.upper()} {robust:.4f} (eps {cfg.epsilon:.4g})")
                from .report import plot_curves
                plot_curves(history, out / "curves.png")
            if robust > state["best_robust"]:
                state["best_robust"] = robust
                save_checkpoint(out / "checkpoint-best.pt", trainer, config=state)

    stop = StopRequest()
    batches_since_check = [0]
    held_out_error: list[DataError] = []

    def should_stop():
        if held_out_error:
            raise held_out_error[0]
        if not d.distributed:
            return bool(stop.signum)
        batches_since_check[0] += 1
        if batches_since_check[0] < cfg.log_every:
            return False
        batches_since_check[0] = 0  # ranks agree at log intervals only: one small all-reduce, no per-batch sync
        flag = torch.tensor([float(stop.signum)], device=d.device)
        return bool(distributed.all_reduce_sum(flag).item())

    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        hold_run_lock(out)
        (out / "config.yaml").write_text(to_yaml(cfg))
        spans = list(zip([0] + ends, ends, phase_data))
        steps = sum((e - s) * len(p.train) for s, e, p in spans) * replays
        batches = " + ".join(f"{e - s} x {len(p.train)}" for s, e, p in spans)
        messages.info(f"{cfg.method} training of {cfg.arch} on {cfg.dataset}: {passes} passes ({batches} batches) x "
            f"{replays} replay(s) = {steps} optimizer steps, {d.world_size} process(es) on {d.device.type}; run "
            f"directory {out}")
    completed, resumed_at = True, trainer.step
    while completed and trainer.epoch < passes:
        phase = phase_of(ends, trainer.epoch)
        data = phase_data[phase]
        first_pass = ends[phase - 1] if phase else 0
        if cfg.phases and d.is_main:
            now = phase_cfgs[phase]
            source = f" crops of images resized to {now.source_size}" if now.source_size else ""
            messages.info(f"phase {phase + 1}/{len(ends)}: {data.image_size} px{source}, batch {now.batch_size}, "
                          f"passes {first_pass + 1}-{ends[phase]}")
        if phase and trainer.epoch == first_pass and trainer.batch_in_epoch == 0:
            trainer.start_phase()
        try:
            completed = trainer.fit(data.train, ends[phase], log_every=cfg.log_every, on_log=on_log,
                                    checkpoint_path=out / "checkpoint-last.pt", checkpoint_every=cfg.checkpoint_every,
                                    should_stop=should_stop, config=state, on_batch=on_batch,
                                    on_pass_end=periodic_eval)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, cfg, phase_cfgs[phase], phase, len(ends), d.world_size, d.device) from None
        if trainer.epoch >= ends[phase]:  # the phase is over: its loaders' workers can go (the last phase's
            # held-out loader serves the final evaluation)
            for loader in (data.train, data.val) if phase + 1 < len(ends) else (data.train,):
                if hasattr(loader, "close"):
                    loader.close()
    if bar is not None:
        bar.close()
    if not completed:
        if d.is_main:
            name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
            messages.warning(f"stopped by {name} at pass {trainer.epoch + 1}, batch {trainer.batch_in_epoch}; "
                f"checkpoint written to {out / 'checkpoint-last.pt'}. Resume with the same command plus --resume auto "
                f"(and --out {out})")
        return 128 + stop.signum if stop.signum else 1
    if held_out_error:  # after the last pass's checkpoint
        raise held_out_error[0]
    if trainer.step == resumed_at:  # a finished run's checkpoint resumed into a new --out: this run's own copy
        save_checkpoint(out / "checkpoint-last.pt", trainer, config=state)
    try:
        final = final_evaluation(cfg, model, data, d, should_stop=lambda: bool(stop.signum))
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(exc, cfg, phase_cfgs[-1], len(ends) - 1, len(ends), d.world_size, d.device) from None
    except EvaluationStopped:
        if d.is_main:
            last = out / "checkpoint-last.pt"
            messages.warning(f"stopped by {signal.Signals(stop.signum).name} during the final evaluation; training "
                f"is complete and saved in {last}. Evaluate it with: python -m freeadv_fast.eval {last} (or run the "
                f"same command plus --resume auto, and --out {out}, for the run's own final evaluation and final.json)")
        return 128 + stop.signum
    if d.is_main:
        (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
        from .report import format_table
        messages.info(format_table(final, f"final evaluation ({cfg.method}, eps {cfg.epsilon:.4g})"))
        if not (out / "checkpoint-best.pt").exists():  # no periodic evaluation ran
            shutil.copyfile(out / "checkpoint-last.pt", out / "checkpoint-best.pt")
    return 0


def final_evaluation(cfg, model, data, d, should_stop=None) -> dict:
    limit = -(-cfg.final_eval_samples // d.world_size) if cfg.final_eval_samples else 0
    return evaluate(model, data.val, mean=data.mean, std=data.std, epsilon=cfg.epsilon,
                    step_size=cfg.eval_step_size, steps=tuple(cfg.final_eval_steps), restarts=cfg.eval_restarts,
                    limit=limit, precision=cfg.precision, seed=cfg.seed, should_stop=should_stop)


__all__ = ["USER_ERRORS", "build_trainer", "resolve_resume", "train_worker"]

"""Checkpoints: everything a run needs to continue exactly where it stopped.

One file holds the model, optimizer, scheduler and scaler states, the pass
and step counters, the run's config, and for EVERY rank its perturbation
buffer and random-number-generator states (free training's delta is per
shard, so each rank resumes with its own).

* Atomic: written to a temp file in the same folder, fsynced, then renamed
  over the old one, whose previous version is kept as ``<name>.prev``; a
  crash or a full disk at any moment leaves a complete checkpoint.
* Checked: the state is stored as bytes with their SHA-256, verified on
  load, so a truncated or bit-flipped file is reported, not half-read.
* Safe: read with ``weights_only=True`` (plain tensors and containers only),
  so loading never runs code from the file.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import random
import stat
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import distributed

FORMAT = "freeadv_fast.checkpoint/2"
ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or for another run."""


def rng_states(device: torch.device) -> dict:
    """This process's RNG states, as plain types and tensors (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device):
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def previous_of(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(data: bytes, path, *, keep_previous: bool = True) -> Path:
    """Writes ``data`` to ``path`` so that readers see a complete old or new
    file; the replaced file survives as ``<path>.prev``. A symbolic link's
    target is what is replaced; a directory never is."""
    path = Path(path)
    if path.is_dir() or not path.name or str(path).endswith(os.sep):
        raise ValueError(f"{str(path)!r} is a directory, not a file name: name a file (e.g. {path / 'checkpoint.pt'})")
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():  # a device or a pipe: renaming it away would break the system
        raise ValueError(f"{str(path)!r} is a device or a pipe, not a file: name a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:  # mkstemp's 0600 would have replaced a shared file's mode: the old file's, else what open() gives
        os.fchmod(fd, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def not_a_results_file(path) -> str | None:
    """Why the existing file at ``path`` must not be replaced by a JSON results
    file, or None: anything but one JSON document (a checkpoint, JSON lines
    such as a run's metrics.jsonl, notes) is someone's data."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.stat().st_size > 64 * 2 ** 20:
        return "exists and is too large to be a results file"
    try:
        text = path.read_bytes().decode()
        document = json.loads(text) if text.strip() else {"meta": None}
    except (UnicodeDecodeError, ValueError):
        return "exists and is not a JSON results file (one JSON document)"
    # a notebook or a package.json is one JSON document too: only the shapes written here are replaced
    if not (isinstance(document, dict) and RESULT_KEYS & set(document)):
        return ("exists and is not a results file of this project (a JSON object with one of "
                f"{', '.join(sorted(RESULT_KEYS))})")
    return None


# a benchmark's meta, an evaluation's (eval --json, a run's final.json), the demo's comparison.json
RESULT_KEYS = {"meta", "clean_top1", "attack"}


def write_result(path, text: str) -> Path:
    """Writes a results file (JSON, a table) whole or not at all. A path that
    exists and is not a regular file (/dev/stdout, a pipe) is written
    through, never replaced; a symbolic link's target is what is replaced."""
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, "w") as f:
            f.write(text)
        return path
    return atomic_write(text.encode(), path.resolve(), keep_previous=False)


def atomic_save(obj, path, *, keep_previous: bool = True) -> Path:
    """torch.save of ``obj`` wrapped with its SHA-256, written atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    outer = io.BytesIO()
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, outer)
    return atomic_write(outer.getvalue(), path, keep_previous=keep_previous)


def check_replaceable(path) -> None:
    """ValueError unless ``path`` and its ``.prev`` are absent or torch
    archives: a save moves the old file to .prev and the next one replaces
    that, so notes saved over twice were gone. Also says a directory or a
    device is no file name, before any work is done for it."""
    path = Path(path)
    if path.is_dir() or not path.name or str(path).endswith(os.sep):
        raise ValueError(f"{str(path)!r} is a directory, not a file name: name a file (e.g. {path / 'checkpoint.pt'})")
    for p in (path.resolve() if path.is_symlink() else path, previous_of(path)):
        if p.exists() and not p.is_file():
            raise ValueError(f"{str(p)!r} is a device or a pipe, not a file: name a file")
        if p.is_file() and p.stat().st_size:
            with open(p, "rb") as f:
                if f.read(4) != ZIP_MAGIC:
                    raise ValueError(f"{str(p)!r} exists and is not a checkpoint (not a torch archive): a checkpoint "
                                     "saved there would replace it; name another file")


def save_checkpoint(path, trainer, *, config=None) -> Path | None:
    """Collective: every rank calls it; rank 0 writes one file holding every
    rank's delta and RNG states. Returns the path on rank 0, else None."""
    check_replaceable(path)
    config = builtin_scalars(config)
    if config is not None and (not isinstance(config, dict) or _unloadable(config, tensors=False)):
        raise ValueError("config must be a dict of plain values (str, numbers, bools, None, lists, dicts): a "
                         f"checkpoint holding anything else could not be read back safely; got {config!r:.80}")
    rank_state = {**trainer.rank_state(), "rng": rng_states(trainer.device)}
    ranks = distributed.all_gather_object(rank_state)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    state = {**saveable_state(trainer), "ranks": ranks, "config": config or {}}
    return atomic_save(state, path)


def saveable_state(trainer) -> dict:
    """``trainer.state_dict()``, refused now if a checkpoint of it could not be
    written or read back (not when the run needs the file to resume)."""
    scheduler = trainer.scheduler
    if scheduler is not None and not all(callable(getattr(scheduler, f, None))
                                         for f in ("state_dict", "load_state_dict")):
        raise TypeError(f"the scheduler ({type(scheduler).__name__}) has no state_dict()/load_state_dict(): a "
                        "checkpoint could not keep its place in the schedule (use a torch.optim.lr_scheduler one)")
    state = builtin_scalars(trainer.state_dict())
    odd = _unloadable(state)
    if odd is not None:
        raise ValueError(f"the trainer's state holds {odd}: a checkpoint holding it could not be read back (only "
                         "tensors, numbers, strings and containers are loaded); a schedule's LR factor that is an "
                         "object keeps its attributes in the state: use a function, or plain numbers in it")
    return state


def _unloadable(value, where="", *, tensors=True) -> str | None:
    """Where in ``value`` something lies that a weights_only load refuses (and
    what it is), or None; with ``tensors=False`` plain values alone (a config:
    str keys, no tensors; numpy's float64, a float subclass, is not plain)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str if not tensors else (str, int)):
                return f"a key of type {type(k).__name__} in {where or 'it'}"
            found = _unloadable(v, f"{where}.{k}" if where else str(k), tensors=tensors)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((f for i, v in enumerate(value) if (f := _unloadable(v, f"{where}[{i}]", tensors=tensors))),
                    None)
    plain = (str, int, float, bool) + ((bytes, torch.Size) if tensors else ())
    if value is None or type(value) in plain or tensors and isinstance(value, torch.Tensor):
        return None
    return f"a {type(value).__module__}.{type(value).__qualname__} at {where}"


def builtin_scalars(value):
    """``value`` with numpy scalars (an LR from np.linspace, say) as Python
    numbers: a weights_only load refuses them, so the checkpoint holding
    one could never be read back."""
    if isinstance(value, dict):
        return {k: builtin_scalars(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [builtin_scalars(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value.item() if isinstance(value, np.generic) else value


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path) -> dict:
    """The checkpoint's contents, after checking its SHA-256, refusing anything
    but plain tensors and containers."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give a checkpoint file in it "
                              f"(e.g. {path / 'checkpoint-last.pt'})")
    if path.exists() and not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a device or a pipe, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:  # every torch.save since torch 1.6 writes a zip archive
            raise CheckpointError(f"{path} is not a freeadv_fast checkpoint (not a file torch.save wrote)")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
        # said in our words: torch's advice (weights_only=False) would run the file's code
        raise CheckpointError(f"{path} is not a freeadv_fast checkpoint: it holds objects other than tensors "
                              "and containers, which are not loaded (that could run code from the file)") from exc
    except Exception as exc:  # truncation, zip errors
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    written = outer.get("format") if isinstance(outer, dict) else None
    if isinstance(written, str) and written.startswith(FORMAT.rsplit("/", 1)[0] + "/") and written != FORMAT:
        # ours, from another version: "not a freeadv_fast checkpoint" would send the user looking for another file
        raise CheckpointError(f"checkpoint {path} was written in format {written[:60]!r} by another version of "
                              f"freeadv_fast; this one reads {FORMAT!r} only (use the version that wrote it)")
    if not isinstance(outer, dict) or written != FORMAT or not isinstance(outer.get("payload"), bytes):
        raise CheckpointError(f"{path} is not a freeadv_fast checkpoint")
    if hashlib.sha256(outer["payload"]).hexdigest() != outer.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted (SHA-256 mismatch)")
    try:
        state = torch.load(io.BytesIO(outer["payload"]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False, which would run its code
        raise CheckpointError(f"cannot read checkpoint {path}: its state holds objects other than tensors and "
                              "containers, which are not loaded (that could run code from the file)") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)
            and isinstance(state.get("config", {}), dict) and isinstance(state.get("ranks", []), list)):
        raise CheckpointError(f"{path} is not a freeadv_fast checkpoint (no model state, or a config or ranks "
                              "of the wrong kind)")
    return state


def find_resumable(path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest readable checkpoint among ``path`` and ``path.prev``, its
    contents, and why each newer one was passed over."""
    problems = []
    for candidate in (Path(path), previous_of(path)):
        if not candidate.exists():
            continue
        try:
            return candidate, read_checkpoint(candidate), problems
        except CheckpointError as exc:
            problems.append(str(exc))
    return None, None, problems


def check_world(path, state: dict, world_size: int) -> list:
    """The per-process states of a checkpoint (read_checkpoint's ``state``),
    one for each of ``world_size`` processes: each resumes its own delta."""
    ranks = state.get("ranks")
    if not ranks:
        raise CheckpointError(f"checkpoint {path} holds no process states (delta, random generators) to resume")
    if len(ranks) != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {len(ranks)} process(es) but this run has "
                              f"{world_size}: each process resumes its own perturbation buffer")
    return ranks


def load_checkpoint(path, trainer, *, rank: int | None = None, world_size: int | None = None) -> dict:
    """Restores ``trainer`` (and this process's RNGs) from ``path``; returns the
    checkpoint's config. Each rank takes its own delta, so the world size must
    be the one the checkpoint was written with."""
    state = read_checkpoint(path)
    if rank is None:
        dist_on = torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist_on else 0
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if world_size is None:  # a rank alone: its delta is one of how many?
        raise ValueError(f"rank {rank} given without world_size: give both (or neither, for this process's)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    ranks = check_world(path, state, world_size)
    # a load that fails half-way is undone: all or nothing, this process's delta and RNGs included
    backup = copy.deepcopy(trainer.state_dict()), copy.deepcopy(trainer.rank_state()), rng_states(trainer.device)
    try:
        trainer.load_state_dict(state)
        trainer.load_rank_state(ranks[rank])
        set_rng_states(ranks[rank]["rng"], trainer.device)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        trainer.load_state_dict(backup[0])
        trainer.load_rank_state(backup[1])
        set_rng_states(backup[2], trainer.device)
        why = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) else _first_line(exc)
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({type(trainer.optimizer).__name__}"
                              f"): {why}") from exc
    return state.get("config", {})

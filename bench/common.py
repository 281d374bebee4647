"""What the benchmark scripts share, so they take arguments, time and record
results one way (``python bench/x.py`` puts bench/ on the path: ``import common``):
``parser``/``parse`` (--device, --quick, --precision, --json), the timers
``wall_clock``, ``elapsed_s``, ``median_ms`` and ``in_graph_ms``, and
``provenance``/``write_json`` (every results file's "meta"), ``read_json``,
and ``guarded``: a main whose bad input (``InputError``, a configuration or
data error, a results file that cannot be written) ends in one line and
status 2, as argparse's own errors do. ``parse`` refuses a --json that
cannot be written or that would replace someone's data (not_results) before
anything is measured.

Kernels are timed by median_ms, not triton.testing.do_bench (it flushes L2
before each call and picks its repetitions by time) or torch.utils.benchmark
(host clock over blocks of calls): either would shift the committed figures.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from freeadv_fast.checkpoint import not_a_results_file, write_result
from freeadv_fast.cli import ArgumentParser, comma_list
from freeadv_fast.common import PRECISIONS
from freeadv_fast.config import ConfigError
from freeadv_fast.data.errors import DataError


class InputError(Exception):
    """Bad input a script names in one line: a results file it cannot use,
    a value its flags let through."""


def guarded(main):
    """``main(argv)`` with every InputError, ConfigError and DataError said in
    one line on stderr (status 2) instead of a traceback, and Ctrl-C (or
    gpu_check.sh's time limit, which sends SIGINT) in one line, status 130."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        name = Path(sys.argv[0]).name
        try:
            return main(argv)
        except (InputError, ConfigError, DataError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
            return 130
    return run


def positive(kind=float, zero=False):
    """An argparse type: a finite number > 0 (>= 0 with ``zero``)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else 'positive'}, got {text}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def named_twice(flag: str, values) -> str | None:
    """Why a list flag's values cannot be used, or None: a value named twice
    would be measured twice, two rows of one thing in the tables."""
    twice = sorted({str(v) for i, v in enumerate(values) if v in values[:i]})
    return f"{flag}: {', '.join(twice)} named twice" if twice else None


def _device(text: str) -> torch.device:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: choose cpu, cuda or cuda:N")
    return torch.device(text)


def parser(doc: str, *, device=True, quick=None, precision=None, several=False, json="write the results here"):
    """A parser described by ``doc``'s first paragraph with --device (a
    torch.device) and --json (a Path), and --quick and --precision where
    their help is given (``several``: a comma-separated list). The script
    fills in the defaults that depend on the device."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p._negative_number_matcher = ArgumentParser.NEGATIVE_NUMBER  # '--epsilon -8/255' is a value (refused as one)
    if device:
        p.add_argument("--device", type=_device, metavar="cpu|cuda[:N]",
                       default="cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    if precision and several:
        p.add_argument("--precision", type=comma_list(choices=PRECISIONS, distinct=True), metavar="{" + ",".join(PRECISIONS) + "}[,...]", help=precision)
    elif precision:
        p.add_argument("--precision", choices=list(PRECISIONS), help=precision)
    if json:
        p.add_argument("--json", type=Path, metavar="PATH", help=json)
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if getattr(args, "device", None) is not None and args.device.type == "cuda" and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: --device {args.device} asked for, but torch sees no GPU\n")
    if getattr(args, "json", None) is not None:
        problem = not_results(args.json)
        if problem:  # said now, not after the minutes of measuring that would go to it
            p.error(f"--json {args.json}: {problem}")
    return args


def not_results(path: Path) -> str | None:
    """Why a JSON results file cannot be written at ``path``, or None: it
    cannot be written (unwritable), or an existing file there is not a JSON
    results file (notes, a checkpoint, a run's metrics.jsonl) and would be lost."""
    problem = unwritable(path)
    if problem:
        return problem
    problem = not_a_results_file(path)
    return f"{problem}: not replaced, name another file" if problem else None


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (its folders made as needed), or None."""
    if path.is_dir():
        return "is a directory"
    if path.exists() and not path.is_file():  # a device or a pipe (/dev/stdout): written through, not replaced
        return None if os.access(path, os.W_OK) else "is not writable"
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_clock(fn, device: torch.device):
    """``(fn(), seconds)`` on the host's clock, the device synchronised at both
    ends so that all the work fn queued counts and none queued before it."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def elapsed_s(fn, device: torch.device, calls: int = 1) -> float:
    """Seconds for ``calls`` calls of fn back to back, synchronised only at
    the ends: CUDA events on a GPU (the device's time), the wall clock on a CPU."""
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if not cuda:
        return time.perf_counter() - t0
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of one call (the upper median for an even ``reps``),
    each timed alone, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median_high(elapsed_s(fn, device) for _ in range(reps)) * 1e3


def in_graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Milliseconds per call with ``calls`` calls captured in one CUDA graph:
    the op's time inside a captured training step, launch cost gone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs one eager call on a side stream first
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return elapsed_s(graph.replay, torch.device("cuda"), reps) * 1e3 / (reps * calls)


def cpu_name() -> str:
    """The host CPU's model (/proc/cpuinfo), else its architecture: CPU
    results differ by model (another vector unit rounds otherwise, and a
    short training run then ends elsewhere), so a result names it."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    model = model or platform.processor() or platform.machine()
    return model if "CPU" in model else f"{model} CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def _version(name: str):
    try:
        return __import__(name).__version__
    except Exception:
        return None


def _first_line(*cmd):
    try:
        out = subprocess.check_output(cmd, cwd=Path(__file__).parent, text=True, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return None
    return (out.strip().splitlines() or [None])[0]


def provenance(device: torch.device) -> dict:
    """Where and how a result was measured: the fields every results file's "meta" starts with."""
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": _version("triton"), "cuda": torch.version.cuda,
            "driver": _first_line("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
            if device.type == "cuda" else None,
            # a copy of the tree run elsewhere (the GPU machine) may carry a stale .git: the caller names the commit
            "git_commit": os.environ.get("FREEADV_GIT_COMMIT") or _first_line("git", "rev-parse", "HEAD"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: Path, device: torch.device, meta: dict | None = None, **body) -> dict:
    """Writes ``{"meta": provenance(device) | meta, **body}`` to ``path`` (a
    key of ``meta`` overrides provenance's in place) and returns it."""
    doc = {"meta": {**provenance(device), **(meta or {})}, **body}
    write_text(path, json.dumps(doc, indent=1) + "\n", results=True)
    return doc


def write_text(path: Path, text: str, *, results: bool = False):
    """Writes ``path`` whole or not at all (checkpoint.write_result): a failed
    write never leaves half a results file in place of the old one, and is an
    InputError naming the file and the OS's reason (a full disk), not a
    traceback. ``results``: a JSON results file, which never replaces a file
    that is not one (not_results)."""
    problem = (not_results if results else unwritable)(path)
    if problem:
        raise InputError(f"{path}: {problem}; {NOT_WRITTEN}")
    earlier = replaces(path)
    try:
        write_result(path, text)
    except OSError as exc:
        raise InputError(f"{path}: cannot be written ({exc.strerror or exc}); {NOT_WRITTEN}") from None
    wrote(path, earlier)


# the files this process wrote: rewriting one of them (a run that saves after every row) replaces nothing of
# anyone's, so only the first write over a file that was already there is said
_WRITTEN: set = set()


def replaces(path) -> str | None:
    """What an earlier file at ``path`` was, said in a few words, or None
    where writing there replaces nothing this process did not write."""
    path = Path(path)
    if os.path.realpath(path) in _WRITTEN or not path.is_file() or not path.stat().st_size:
        return None
    try:
        return f"it held results of {str(json.loads(path.read_text())['meta']['date'])[:10]}"
    except Exception:  # a table, a plot, results without a date: still an earlier run's output
        return "it was there before this run"


def wrote(path, earlier: str | None):
    """Records that this process wrote ``path``, saying what it replaced
    (``earlier``, from replaces): no results file goes without a word."""
    _WRITTEN.add(os.path.realpath(path))
    if earlier:
        print(f"{Path(sys.argv[0]).name}: replaced {path}: {earlier}", file=sys.stderr, flush=True)


# what a write that failed after the measuring says: nothing measured is in the file
NOT_WRITTEN = "not written: the figures measured are in the output above"


def read_json(path, what: str, keys=()) -> dict:
    """A results file as a dict with a "meta" dict and ``keys``; anything else
    (missing, unreadable, not JSON, another kind of result) is an InputError
    naming the file and ``what`` it should have been."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not {what}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not JSON ({exc}); expected {what}") from None
    missing = ["meta"] if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict) else \
        [k for k in keys if k not in doc]
    if missing:
        raise InputError(f"{path}: not {what} (no {', '.join(repr(k) for k in missing)})")
    return doc


def best_step_rates(files, kinds) -> dict:
    """{image size: {kind: {"images_per_s", "method", "batch_size", "file"}}}:
    the fastest variant of each method kind ("natural", "free-4", ...) in
    bench/train_step.py results, per image size."""
    best: dict = {}
    for f in files:
        doc = read_json(f, "a bench/train_step.py result", ("records",))
        size, batch = doc["meta"].get("image_size"), doc["meta"].get("batch_size")
        if not isinstance(size, int) or not isinstance(batch, int) or not isinstance(doc["records"], list) or \
                not all(isinstance(r, dict) and isinstance(r.get("method"), str) for r in doc["records"]):
            raise InputError(f"{f}: not a bench/train_step.py result (its meta names no image_size and batch_size, "
                             "or its records no methods)")
        for r in doc["records"]:
            kind = r["method"].split(" ")[0]
            if kind in kinds and "images_per_s" in r:
                now = best.setdefault(size, {}).get(kind)
                if now is None or r["images_per_s"] > now["images_per_s"]:
                    best[size][kind] = {"images_per_s": r["images_per_s"], "method": r["method"],
                                        "batch_size": batch, "file": Path(f).name}
    return best

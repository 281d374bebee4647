"""Run configuration: defaults, paper presets (data, not code), YAML files and
flags merged in that order, every value checked before anything starts.

An unknown key -- in a preset, a YAML file or a flag -- is an error, never
ignored. Pixel values (epsilon, step size) accept fractions like ``4/255``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import yaml

METHODS = ("free", "natural", "pgd", "fast")
DATASETS = ("imagenet", "cifar10", "cifar100", "tiny-imagenet", "fashion-mnist", "synthetic", "digits")
EMBEDDED_DEFAULT = "digits"


class ConfigError(ValueError):
    """A configuration value or combination that cannot run; the message names it."""


def pixel_value(text) -> float:
    """``0.03``, ``8/255`` or ``8 / 255`` as a float; never inf, and never a
    nonzero value that rounds to 0."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ConfigError(f"not a number or fraction: {text!r}")
    try:
        exact = Fraction(str(text).replace(" ", ""))
        value = float(exact)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"not a number or fraction: {text!r}") from None
    except OverflowError:
        raise ConfigError(f"{text!r} is too large for a float") from None
    if exact != 0 and value == 0:
        raise ConfigError(f"{text!r} is too small: it rounds to 0 as a float")
    if not math.isfinite(value):
        raise ConfigError(f"not a finite number: {text!r}")
    return value


@dataclass
class RunConfig:
    dataset: str = EMBEDDED_DEFAULT
    data: str | None = None
    arch: str | None = None  # None: the dataset's default
    method: str = "free"
    replays: int = 4
    epsilon: float = 4 / 255
    step_size: float | None = None  # None: free: epsilon; pgd: 2.5 * eps / steps; fast: 1.25 * eps
    pgd_steps: int = 7  # PGD training's attack steps
    pixel_mode: str = "clamp_input"
    epochs: float = 90.0  # natural-training epochs; free-m makes ceil(epochs / m) passes
    batch_size: int = 256  # global, over every process
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "step"  # step (official: /10 every ceil(30/m) passes), multistep, cosine, onecycle, constant
    milestones: list = field(default_factory=list)  # multistep: optimizer steps
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # default or max-autotune-no-cudagraphs
    cuda_graph: bool = False  # capture whole steps as CUDA graphs (freeadv_fast/graphs.py)
    loader: str = "auto"
    workers: int | None = None
    image_size: int | None = None
    sync_batchnorm: bool = False
    out: str | None = None
    eval_every: int = 1  # passes; 0 turns periodic evaluation off
    eval_samples: int = 1000  # held-out images for the periodic evaluation
    eval_steps: int = 10  # PGD steps of the periodic evaluation
    final_eval_steps: list = field(default_factory=lambda: [10])
    final_eval_samples: int = 0  # 0: the whole validation split
    eval_restarts: int = 1
    eval_step_size: float | None = None  # None: epsilon / 4
    log_every: int = 50  # batches between metric reads
    checkpoint_every: int = 0  # batches; 0: once per pass
    max_bad_steps: int = 10  # consecutive non-finite losses that stop a run
    seed: int = 0
    train_subset: int = 0  # train on this many images of the training split (a fixed random subset); 0: all
    synthetic_classes: int = 1000
    synthetic_batches: int = 50

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]

    def to_dict(self):
        return dataclasses.asdict(self)


# The paper's settings. Epochs are natural-training epochs (the step budget).
PRESETS: dict[str, dict] = {
    "imagenet-free4-eps4": dict(dataset="imagenet", arch="resnet50", method="free", replays=4, epsilon="4/255",
                                step_size="4/255", batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                schedule="step", epochs=90, eval_samples=1000,
                                final_eval_steps=[10, 50, 100], eval_step_size="1/255"),
    "imagenet-free4-eps2": dict(dataset="imagenet", arch="resnet50", method="free", replays=4, epsilon="2/255",
                                step_size="2/255", batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                schedule="step", epochs=90, eval_samples=1000,
                                final_eval_steps=[10, 50, 100], eval_step_size="1/255"),
    # the official TensorFlow CIFAR code: 80k replay steps, lr /10 at 40k and 60k
    "cifar10-free8": dict(dataset="cifar10", arch="wide_resnet32_10", method="free", replays=8, epsilon="8/255",
                          step_size="8/255", batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
                          schedule="multistep", milestones=[40000, 60000], epochs=205,
                          final_eval_steps=[20, 100], eval_step_size="2/255"),
    "cifar100-free8": dict(dataset="cifar100", arch="wide_resnet32_10", method="free", replays=8, epsilon="8/255",
                           step_size="8/255", batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
                           schedule="multistep", milestones=[40000, 60000], epochs=205,
                           final_eval_steps=[20, 100], eval_step_size="2/255"),
    # Wong et al.'s fast recipe: PreActResNet-18, FGSM-RS, one-cycle LR, mixed precision
    "cifar10-fast": dict(dataset="cifar10", arch="preact_resnet18", method="fast", epsilon="8/255",
                         step_size="10/255", batch_size=128, lr=0.2, momentum=0.9, weight_decay=5e-4,
                         schedule="onecycle", epochs=15, precision="bf16", final_eval_steps=[20, 100],
                         eval_step_size="2/255"),
    # the embedded default: scikit-learn's digits, a few minutes on 2 CPU cores
    "digits-demo": dict(dataset="digits", arch="small_cnn", method="free", replays=4, epsilon=0.15, step_size=0.15,
                        batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, schedule="onecycle",
                        epochs=80, eval_every=5, eval_samples=449, eval_steps=10, final_eval_steps=[20],
                        final_eval_samples=0, eval_step_size=0.0375, log_every=10, precision="fp32"),
}
DATASET_PRESET = {"imagenet": "imagenet-free4-eps4", "cifar10": "cifar10-free8", "cifar100": "cifar100-free8",
                  "digits": "digits-demo"}
DEFAULT_ARCH = {"imagenet": "resnet50", "cifar10": "wide_resnet32_10", "cifar100": "wide_resnet32_10",
                "tiny-imagenet": "preact_resnet18", "fashion-mnist": "small_cnn", "synthetic": "resnet50",
                "digits": "small_cnn"}


def _apply(cfg: RunConfig, values: dict, source: str) -> RunConfig:
    known = set(RunConfig.keys())
    unknown = sorted(set(values) - known)
    if unknown:
        names = (k if k.isidentifier() else repr(k) for k in unknown)  # one line, whatever the key holds
        raise ConfigError(f"{source}: unknown key(s) {', '.join(names)}")
    return dataclasses.replace(cfg, **values)


def load_yaml(path) -> dict:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (a binary file?)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: keys must be setting names, got {bad[0]!r}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def build_config(*, dataset=None, preset=None, file=None, flags=None) -> RunConfig:
    """defaults <- preset (named, or the dataset's) <- YAML file <- flags; then checked."""
    cfg = RunConfig()
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_values = load_yaml(file) if file else {}
    dataset = dataset or flags.get("dataset") or file_values.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise ConfigError(f"dataset must be a string, got {dataset!r} ({type(dataset).__name__})")
    if preset is None and dataset in DATASET_PRESET:
        preset = DATASET_PRESET[dataset]
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        cfg = _apply(cfg, PRESETS[preset], f"preset {preset}")
    cfg = _apply(cfg, file_values, f"config file {file}")
    cfg = _apply(cfg, flags, "flags")
    if dataset:
        cfg.dataset = dataset
    return check(cfg)


_PIXEL_FIELDS = ("epsilon", "step_size", "eval_step_size")  # numbers or fractions like 8/255
# what a value of each declared type may be (bool is an int in Python, never a number here)
_TYPE_CHECKS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _check_types(cfg: RunConfig):
    """Every value against its declared type (flags, YAML and presets alike);
    the message names the setting, the value and what is allowed."""
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        ok, what = zip(*(_TYPE_CHECKS[k] for k in kinds if k != "None"))
        if not any(check_one(value) for check_one in ok):
            allowed = " or ".join(what) + (" (or null)" if "None" in kinds else "")
            raise ConfigError(f"{f.name.replace('_', '-')} must be {allowed}, got {value!r} "
                              f"({type(value).__name__})")


def check(cfg: RunConfig) -> RunConfig:
    """Normalizes values (fractions, defaults that depend on others) and
    raises ConfigError naming the first problem."""
    from .models import ARCHITECTURES
    from .ops import PIXEL_MODES
    from .scheduler import SCHEDULES
    from .trainer import COMPILE_MODES, PRECISIONS
    for name in _PIXEL_FIELDS:
        value = getattr(cfg, name)
        if value is not None:
            try:
                setattr(cfg, name, pixel_value(value))
            except ConfigError as exc:
                raise ConfigError(f"{name.replace('_', '-')}: {exc}") from None
    if isinstance(cfg.final_eval_steps, int) and not isinstance(cfg.final_eval_steps, bool):
        cfg.final_eval_steps = [cfg.final_eval_steps]
    _check_types(cfg)
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    cfg.arch = cfg.arch or DEFAULT_ARCH[cfg.dataset]
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {cfg.arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}")
    for name, choices in (("precision", PRECISIONS), ("pixel_mode", PIXEL_MODES), ("schedule", SCHEDULES),
                          ("loader", ("auto", "dali", "torch")), ("compile_mode", COMPILE_MODES)):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"unknown {name} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    if not isinstance(cfg.replays, int) or cfg.replays < 1:
        raise ConfigError(f"replays must be an integer >= 1, got {cfg.replays!r}")
    if cfg.method != "free":
        cfg.replays = 1
    cfg.epsilon = pixel_value(cfg.epsilon)
    if not 0 <= cfg.epsilon <= 1:
        raise ConfigError(f"epsilon must be between 0 and 1 (the pixel range), got {cfg.epsilon:g}")
    if cfg.step_size is None:
        cfg.step_size = {"free": cfg.epsilon, "pgd": 2.5 * cfg.epsilon / cfg.pgd_steps,
                         "fast": 1.25 * cfg.epsilon, "natural": 0.0}[cfg.method]
    cfg.step_size = pixel_value(cfg.step_size)
    if not 0 <= cfg.step_size <= 1:
        raise ConfigError(f"step size must be between 0 and 1 (the pixel range), got {cfg.step_size:g}")
    cfg.eval_step_size = pixel_value(cfg.eval_step_size) if cfg.eval_step_size is not None else cfg.epsilon / 4
    for name in ("batch_size", "pgd_steps", "eval_samples", "eval_steps", "eval_restarts", "log_every",
                 "max_bad_steps", "synthetic_classes", "synthetic_batches"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("eval_every", "checkpoint_every", "final_eval_samples", "seed", "train_subset"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
    if not (isinstance(cfg.epochs, (int, float)) and cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        raise ConfigError(f"epochs must be positive, got {cfg.epochs!r}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr!r}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight-decay must be >= 0, got {cfg.weight_decay!r}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("nesterov needs a momentum above 0 (got momentum 0)")
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in cfg.milestones):
        raise ConfigError(f"milestones must be positive integers (optimizer steps), got {cfg.milestones!r}")
    for name in ("image_size", "workers"):
        value = getattr(cfg, name)
        if value is not None and value < (1 if name == "image_size" else 0):
            raise ConfigError(f"{name.replace('_', '-')} must be {'positive' if name == 'image_size' else '>= 0'}, "
                              f"got {value!r}")
    for name in ("data", "out"):
        value = getattr(cfg, name)
        if value == "":
            raise ConfigError(f"{name} must not be empty (leave it out for the default)")
        if value is not None and ("\0" in value or any(len(part.encode()) > 255 for part in value.split("/"))):
            raise ConfigError(f"{name} {value[:80]!r} cannot be a path (a NUL byte, or a name over 255 bytes)")
    if cfg.schedule == "multistep" and not cfg.milestones:
        raise ConfigError("the multistep schedule needs milestones (optimizer steps)")
    if not all(isinstance(s, int) and s >= 1 for s in cfg.final_eval_steps):
        raise ConfigError(f"final-eval-steps must be positive integers, got {cfg.final_eval_steps!r}")
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

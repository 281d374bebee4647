"""Run configuration: defaults, paper presets (data, not code), YAML files and
flags merged in that order, every value checked before anything starts.

``RunConfig`` is the one list of settings: each field's help, allowed values
and lower bound are its metadata, from which the command-line flags
(freeadv_fast/cli.py) and ``check`` are made. An unknown key -- in a preset,
a YAML file or a flag -- is an error, never ignored. Pixel values (epsilon,
step size) accept fractions like ``4/255``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import yaml

from .common import COMPILE_MODES, PRECISIONS
from .data import DATASETS
from .data.folder import LOADERS
from .methods import METHODS
from .messages import say_once
from .models import ARCHITECTURES
from .ops import PIXEL_MODES
from .phases import PhaseError, parse as parse_phases, pass_ends
from .scheduler import SCHEDULES

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


def setting(default=None, help="", *, choices=None, noun=None, min=None, max=None, pixel=False, factory=None,
            strings=False):
    """A RunConfig field: its default and the metadata its flag and its check
    are made from (``choices``: a callable giving the allowed names; ``noun``:
    what messages call one of them; ``strings``: a list flag of strings, not integers)."""
    meta = dict(help=help, choices=choices, noun=noun, min=min, max=max, pixel=pixel, strings=strings)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dataset: str = setting(EMBEDDED_DEFAULT, "the dataset", choices=lambda: DATASETS)
    data: str | None = setting(None, "dataset folder")
    arch: str | None = setting(None, "model architecture (default: the dataset's)", choices=lambda: sorted(ARCHITECTURES),
                                noun="architecture")
    method: str = setting("free", "training method", choices=lambda: METHODS)
    replays: int = setting(4, "m of free-m: replays of each minibatch", min=1)
    epsilon: float = setting(4 / 255, "L-inf budget in pixel units, e.g. 4/255", pixel=True)
    step_size: float | None = setting(None, "attack step in pixel units (default: the method's rule)", pixel=True)
    pgd_steps: int = setting(7, "attack steps of PGD training", min=1)
    pixel_mode: str | None = setting(None, "how free training's perturbation meets the pixel range: clamp_input "
                                     "(its default: the paper's code as it ran), clamp_input_strict or project "
                                     "(PGD-k and FGSM-RS always project)", choices=lambda: PIXEL_MODES)
    epochs: float = setting(90.0, "natural-training epochs (free-m makes ceil(E/m) passes)")
    batch_size: int = setting(256, "global batch size, over every process", min=1)
    lr: float = setting(0.1, "peak learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(1e-4, "SGD weight decay")
    nesterov: bool = setting(False, "Nesterov momentum")
    schedule: str = setting("step", "LR schedule counted in optimizer steps (step: the official /10 every "
                            "ceil(30/m) passes)", choices=lambda: SCHEDULES)
    milestones: list = setting(help="multistep: optimizer steps at which the LR falls tenfold", factory=list, min=1)
    precision: str = setting("fp32", "arithmetic precision", choices=lambda: PRECISIONS)
    channels_last: bool = setting(False, "channels_last memory format")
    compile: bool = setting(False, "torch.compile the model and the perturbation update")
    compile_mode: str = setting("default", "with --compile: the compile mode", choices=lambda: COMPILE_MODES)
    cuda_graph: bool = setting(False, "capture each training step as a CUDA graph (full batches on one GPU; "
                               "else eager, said once)")
    loader: str = setting("auto", "image-folder loader", choices=lambda: LOADERS)
    workers: int | None = setting(None, "loader worker threads/processes per rank", min=0)
    decode_processes: int = setting(0, "nvjpeg loader: processes per rank that each decode and augment whole "
                                    "batches on the GPU with a decoder of their own (0: the training process "
                                    "decodes)", min=0)
    image_size: int | None = setting(None, "training image size of image folders (default: the dataset's)", min=1)
    source_size: int | None = setting(None, "image folders: resize the shorter side to this before the "
                                      "random-resized crop (default: crop the full image)", min=1)
    phases: list = setting(help="progressive resizing: phases UNTIL:SIZE[:BATCH[:SOURCE]], comma-separated (train "
                           "at SIZE px, global batch BATCH, from images resized to SOURCE, until epoch UNTIL; the "
                           "last UNTIL is --epochs)", factory=list, strings=True)
    sync_batchnorm: bool = setting(False, "synchronize batch-norm statistics across processes")
    out: str | None = setting(None, "run directory (default runs/<dataset>-<method>-<time>)")
    eval_every: int = setting(1, "passes between held-out evaluations (0: off)", min=0)
    eval_samples: int = setting(1000, "held-out images of the periodic evaluation", min=1)
    eval_steps: int = setting(10, "PGD steps of the periodic evaluation", min=1)
    final_eval_steps: list = setting(help="PGD steps of the final evaluation, comma-separated",
                                     factory=lambda: [10], min=1)
    final_eval_samples: int = setting(0, "held-out images of the final evaluation (0: the whole split)", min=0)
    eval_restarts: int = setting(1, "random restarts of every evaluation attack", min=1)
    eval_step_size: float | None = setting(None, "evaluation attack step (default: epsilon / 4)", pixel=True)
    log_every: int = setting(50, "batches between metric reads", min=1)
    checkpoint_every: int = setting(0, "batches between checkpoints (0: once per pass)", min=0)
    max_bad_steps: int = setting(10, "consecutive non-finite losses that stop a run", min=1)
    tensorboard: bool = setting(False, "also write the metrics to TensorBoard, in <out>/tensorboard (pip install "
                                "'freeadv_fast[tensorboard]')")
    # every random stream's seed (common.stream_seed) stays within torch's 64 bits
    seed: int = setting(0, "random seed", min=0, max=2**32 - 1)
    train_subset: int = setting(0, "train on N images of the training split (a fixed random subset; 0: all)", min=0)
    synthetic_classes: int = setting(1000, "synthetic data: classes", min=1)
    synthetic_batches: int = setting(50, "synthetic data: batches per pass", min=1)

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
    # "Fast is better than free"'s ImageNet phases (its ImageNet/ configs): 128 px crops of images resized to
    # 160 until epoch 6, 224 px until 12, 288 px until 15, for their FGSM-RS and for free-4 with the same
    # 15 epochs of optimizer steps. The batch sizes per phase, the one-cycle peak LR 0.2 at batch 256 (scaled
    # with each phase's batch) and weight decay 1e-4 are ours, not read off their configs.
    **{f"imagenet-fast-{name}-eps{eps}": dict(
        dataset="imagenet", arch="resnet50", epsilon=f"{eps}/255", epochs=15, batch_size=256, lr=0.2,
        momentum=0.9, weight_decay=1e-4, schedule="onecycle", precision="bf16", channels_last=True,
        phases=["6:128:256:160", "12:224:256", "15:288:128"], eval_samples=1000,
        final_eval_steps=[10, 50], eval_step_size="1/255", **method)
       for name, method in (("free4", dict(method="free", replays=4)), ("fgsm", dict(method="fast")))
       for eps in (2, 4)},
    # the embedded default: scikit-learn's digits, under a minute on 2 CPU cores
    "digits-demo": dict(dataset="digits", arch="small_cnn", method="free", replays=4, epsilon=0.15, step_size=0.15,
                        batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, schedule="onecycle",
                        epochs=80, eval_every=5, eval_samples=449, eval_steps=10, final_eval_steps=[20],
                        final_eval_samples=0, eval_step_size=0.0375, log_every=10, precision="fp32"),
}

def _apply(cfg: RunConfig, values: dict, source: str) -> RunConfig:
    known = set(RunConfig.keys())
    unknown = sorted(set(values) - known)
    if unknown:
        names = (k if k.isidentifier() else repr(k) for k in unknown)  # one line, whatever the key holds
        raise ConfigError(f"{source}: unknown key(s) {', '.join(names)}")
    return dataclasses.replace(cfg, **values)


class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: ``1e-3`` (no dot)
    is the number a user wrote, not the string YAML 1.1 makes of it; a key
    given twice in one mapping is refused (PyYAML keeps the last one, so a
    pasted-in line would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            # merged keys (<<: *anchor) may be overridden: that is what merging is for
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise _DuplicateKey(f"key {key_node.value!r} is given twice (lines {seen[key_node.value]} and "
                                        f"{line}); keep one")
                seen[key_node.value] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _float(loader, node):
    value = loader.construct_yaml_float(node)
    text = loader.construct_scalar(node)
    # 1e400 overflows to inf: kept as written, so the setting's check names the number the user wrote
    return text if math.isinf(value) and "inf" not in text.lower() else value


_Loader.add_constructor("tag:yaml.org,2002:float", _float)


def load_yaml(path) -> dict:
    path = Path(path)
    try:
        values = yaml.load(path.read_text(), Loader=_Loader) or {}
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
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    if not values:  # an unsaved or truncated file, most likely: the run would silently be the defaults'
        say_once(f"note: config file {path} holds no settings")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: keys must be setting names, got {bad[0]!r}")
    named = {}
    for key in values:  # batch-size and batch_size are one setting: which would win is an accident
        other = named.setdefault(key.replace("-", "_"), key)
        if other != key:
            raise ConfigError(f"config file {path}: {other} and {key} are the same setting; keep one")
    return {k.replace("-", "_"): v for k, v in values.items()}


def build_config(*, dataset=None, preset=None, file=None, flags=None) -> RunConfig:
    """defaults <- preset (named, or the dataset's) <- YAML file <- flags; then checked."""
    cfg = RunConfig()
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_values = load_yaml(file) if file else {}
    dataset = dataset or flags.get("dataset") or file_values.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise ConfigError(f"dataset must be a string, got {dataset!r} ({type(dataset).__name__})")
    if preset is None and dataset in DATASETS:
        preset = DATASETS[dataset].preset
    if dataset is None and preset is None and file is not None:
        say_once(f"note: no dataset named (DATASET, --preset or dataset: in {file}): training {RunConfig.dataset} "
                 "with the defaults of every setting the file and flags leave out, not with its preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        made_for = PRESETS[preset].get("dataset")
        if dataset is not None and made_for not in (None, dataset):
            say_once(f"note: preset {preset} was made for {made_for}; training {dataset} with its settings")
        cfg = _apply(cfg, PRESETS[preset], f"preset {preset}")
    cfg = _apply(cfg, file_values, f"config file {file}")
    cfg = _apply(cfg, flags, "flags")
    if dataset:
        cfg.dataset = dataset
    method = _method_named(cfg.method)
    if file_values.get("pixel_mode") is not None and "pixel_mode" not in flags and method is not None \
            and len(method.pixel_modes) < 2:  # a config.yaml from before the mode was free training's alone
        say_once(f"note: pixel_mode {file_values['pixel_mode']} in {file} does not apply to {cfg.method} training "
                 f"({'it always projects' if method.pixel_modes else 'it has no perturbation'}); left out")
        cfg.pixel_mode = None
    return check(cfg)


def _method_named(name):
    """The method called ``name``, or None for anything else (check() names it)."""
    return METHODS.get(name) if isinstance(name, str) else None


def without_moot_settings(saved: dict) -> dict:
    """A checkpoint's config without a pixel mode its method has no choice of:
    runs of every method recorded one before it was free training's alone."""
    method = _method_named(saved.get("method"))
    if method is not None and len(method.pixel_modes) < 2:
        return {k: v for k, v in saved.items() if k != "pixel_mode"}
    return saved


# what a value of each declared type may be (bool is an int in Python, never a number here)
_TYPE_CHECKS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def _check_field(f, value):
    """One value against its field's declared type, choices and bounds;
    the message names the setting, the value and what is allowed."""
    kinds = [k.strip() for k in str(f.type).split("|")]
    if value is None and "None" in kinds:
        return
    ok, what = zip(*(_TYPE_CHECKS[k] for k in kinds if k != "None"))
    if not any(check_one(value) for check_one in ok):
        allowed = " or ".join(what) + (" (or null)" if "None" in kinds else "")
        raise ConfigError(f"{flag_name(f.name)} must be {allowed}, got {value!r} ({type(value).__name__})")
    choices, low = f.metadata.get("choices"), f.metadata.get("min")
    if choices is not None and value not in choices():
        noun = f.metadata.get("noun") or f.name.replace("_", " ")
        raise ConfigError(f"unknown {noun} {value!r}: choose one of {', '.join(choices())}")
    if low is not None:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in items):
            what = "positive" if low == 1 else "non-negative" if low == 0 else f">= {low}"
            what = f"{what} integers" if isinstance(value, list) else f"a {what} integer"
            raise ConfigError(f"{flag_name(f.name)} must be {what}, got {value!r}")
    high = f.metadata.get("max")
    if high is not None and any(v > high for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{flag_name(f.name)} must be at most {high}, got {value!r}")


def check(cfg: RunConfig, names: dict | None = None) -> RunConfig:
    """Normalizes values (fractions, defaults that depend on others) and
    raises ConfigError naming the first problem (a setting by its entry in
    ``names``, when a command spells it otherwise)."""
    names = names or {}
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.metadata.get("pixel") and value is not None:
            try:
                setattr(cfg, f.name, pixel_value(value))
            except ConfigError as exc:
                raise ConfigError(f"{flag_name(f.name)}: {exc}") from None
    if isinstance(cfg.final_eval_steps, int) and not isinstance(cfg.final_eval_steps, bool):
        cfg.final_eval_steps = [cfg.final_eval_steps]
    if cfg.arch is None and cfg.dataset in DATASETS:
        cfg.arch = DATASETS[cfg.dataset].default_arch
    for f in fields(RunConfig):
        _check_field(f, getattr(cfg, f.name))
    if not cfg.final_eval_steps:  # the final evaluation would attack nothing and report clean accuracy alone
        raise ConfigError(f"{names.get('final_eval_steps', 'final-eval-steps')} must name at least one step count")
    unique = list(dict.fromkeys(cfg.final_eval_steps))
    if unique != cfg.final_eval_steps:  # each attack would run twice, the second result replacing the first
        say_once(f"note: {names.get('final_eval_steps', 'final-eval-steps')} {','.join(map(str, cfg.final_eval_steps))}"
                 f" names a step count twice; running {','.join(map(str, unique))}")
        cfg.final_eval_steps = unique
    method = METHODS[cfg.method]
    cfg.replays = method.replays(cfg)
    if cfg.step_size is None:
        cfg.step_size = pixel_value(method.default_step_size(cfg))
    if cfg.pixel_mode is not None and not method.pixel_modes:
        say_once(f"note: {names.get('pixel_mode', 'pixel-mode')} {cfg.pixel_mode} is ignored: {cfg.method} training "
                 "has no perturbation")
    elif cfg.pixel_mode is not None and cfg.pixel_mode not in method.pixel_modes:
        raise ConfigError(f"{names.get('pixel_mode', 'pixel-mode')} {cfg.pixel_mode}: {cfg.method} training keeps "
                          f"its perturbation by {' or '.join(method.pixel_modes)} only (the pixel mode is free "
                          "training's choice)")
    if not method.pixel_modes:  # what the run uses, as config.yaml and the checkpoints record it
        cfg.pixel_mode = None
    elif cfg.pixel_mode is None:
        cfg.pixel_mode = method.pixel_modes[0]
    if cfg.eval_step_size is None:
        cfg.eval_step_size = cfg.epsilon / 4
    for f in fields(RunConfig):
        if f.metadata.get("pixel") and not 0 <= getattr(cfg, f.name) <= 1:
            raise ConfigError(f"{names.get(f.name, f.name.replace('_', ' '))} must be between 0 and 1 (the pixel "
                              f"range), got {getattr(cfg, f.name):g}")
    if cfg.epsilon >= 0.5:  # 1 is a likely slip for 1/255
        say_once(f"note: epsilon {cfg.epsilon:.4g} is half the pixel range or more, so the attack may turn an image "
                 "into almost any other (budgets in use: 2/255 to 16/255 for photos, 0.3 for digits); pixel values are "
                 "fractions of the range, e.g. 8/255")
    # a step of 0 never moves the perturbation: the training would be natural training at an adversarial
    # method's cost, the evaluation's robust accuracy the clean accuracy
    step_name, eval_name = names.get("step_size", "step size"), names.get("eval_step_size", "eval step size")
    if cfg.epsilon > 0 and cfg.step_size == 0 and pixel_value(method.default_step_size(cfg)) > 0:  # it steps
        raise ConfigError(f"{step_name} 0 with epsilon {cfg.epsilon:.4g}: the perturbation would never move, and "
                          f"{cfg.method} training would be natural training at a higher cost")
    if cfg.epsilon > 0 and cfg.eval_step_size == 0:
        raise ConfigError(f"{eval_name} 0 with epsilon {cfg.epsilon:.4g}: the evaluation's attack would never move, "
                          "and its robust accuracy would be the clean accuracy")
    if not cfg.epochs > 0:
        raise ConfigError(f"epochs must be positive, got {cfg.epochs!r}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr!r}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight-decay must be >= 0, got {cfg.weight_decay!r}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("nesterov needs a momentum above 0 (got momentum 0)")
    for name in ("data", "out"):
        value = getattr(cfg, name)
        if value == "":
            raise ConfigError(f"{name} must not be empty (leave it out for the default)")
        if value is not None and ("\0" in value or any(len(part.encode()) > 255 for part in value.split("/"))):
            raise ConfigError(f"{name} {value[:80]!r} cannot be a path (a NUL byte, or a name over 255 bytes)")
        if value is not None:  # '~' from a YAML file made a folder named '~'; a relative data folder saved in
            # config.yaml and checkpoints named another folder when eval or --resume ran elsewhere
            value = os.path.expanduser(value)
            setattr(cfg, name, os.path.abspath(value) if name == "data" else value)
    spec = DATASETS[cfg.dataset]
    if cfg.data is not None and not spec.reads_data:  # e.g. `train --data DIR` without the dataset's name
        readers = ", ".join(n for n, s in DATASETS.items() if s.reads_data)
        raise ConfigError(f"{names.get('data', 'data')} {cfg.data}: {cfg.dataset} reads no data folder (its images "
                          f"come with it); name the dataset that folder holds ({readers})")
    ignored = [f"{flag_name(k)} {v}" for k, v, default in (("loader", cfg.loader, "auto"), ("workers", cfg.workers, None),
                                                           ("decode_processes", cfg.decode_processes, 0)) if v != default]
    if ignored and not spec.in_folders:  # a user tuning the loader of a dataset that has none would see no effect
        say_once(f"note: {', '.join(ignored)}: only image folders read during training have a loader; "
                 f"{cfg.dataset} has none (its images are on the device), so this is ignored")
    if cfg.train_subset and cfg.dataset == "synthetic":
        say_once(f"note: train-subset {cfg.train_subset} is ignored: synthetic data has no training split to take it "
                 "from (synthetic-batches sets a pass)")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard: the tensorboard package is not installed "
                          "(pip install 'freeadv_fast[tensorboard]')")
    if cfg.schedule == "multistep" and not cfg.milestones:
        raise ConfigError("the multistep schedule needs milestones (optimizer steps)")
    if (cfg.image_size is not None or cfg.source_size is not None) and not DATASETS[cfg.dataset].resizable:
        raise ConfigError(f"image-size and source-size apply to datasets whose loader resizes ({_resizable()}); "
                          f"{cfg.dataset} is held at one size")
    if cfg.phases:
        _check_phases(cfg)
    return cfg


def _resizable() -> str:
    return ", ".join(n for n, spec in DATASETS.items() if spec.resizable)


def _check_phases(cfg: RunConfig):
    """Normalizes the phases to UNTIL:SIZE:BATCH[:SOURCE] strings (how configs
    and checkpoints keep them) and refuses what cannot run."""
    try:
        phases = parse_phases(cfg.phases, epochs=cfg.epochs, batch_size=cfg.batch_size)
        pass_ends(phases, cfg.replays)
    except PhaseError as exc:
        raise ConfigError(f"phases: {exc}") from None
    if not DATASETS[cfg.dataset].resizable:
        raise ConfigError(f"phases: {cfg.dataset} is held at one image size; phases need a dataset whose loader "
                          f"resizes ({_resizable()})")
    if cfg.schedule == "step":
        raise ConfigError("phases: the step schedule counts passes of one length; use onecycle, cosine, multistep "
                          "or constant with phases")
    if cfg.image_size is not None or cfg.source_size is not None:
        raise ConfigError("phases set each phase's image and source size: leave out image-size and source-size")
    cfg.phases = [p.text() for p in phases]


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

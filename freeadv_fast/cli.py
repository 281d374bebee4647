"""What the commands share: one-line argument errors, typed arguments, the
flags generated from ``RunConfig`` and checks of output paths."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import MISSING, fields
from pathlib import Path

from . import messages
from .config import ConfigError, RunConfig, flag_name, pixel_value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, with status 2."""

    # argparse takes '-1/255' or '-1e-3' for an option and says "expected one
    # argument"; read as values, the flag's own type names what is wrong.
    NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(/\d+\.?\d*)?$")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def pixel(text):
    """A pixel value: a number or a fraction such as 4/255."""
    try:
        return pixel_value(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def comma_list(kind=str, *, minimum=None, choices=None, distinct=False, empty_ok=False):
    """An argparse type: a comma-separated list (spaces around items allowed),
    each item converted by ``kind`` and at least ``minimum`` or one of
    ``choices``; ``distinct``: an item named twice is refused (a benchmark
    would measure it twice); ``empty_ok``: '' is the empty list. An empty
    item ('32,,48') is refused: it is a typo, not a value."""
    def parse(text):
        if not text.strip():
            if empty_ok:
                return []
            raise argparse.ArgumentTypeError("empty: name at least one")
        items = [v.strip() for v in text.split(",")]
        if "" in items:
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}")
        try:
            values = [kind(v) for v in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {parse.__name__}: {text!r}") from None
        if choices is not None and (unknown := [v for v in values if v not in choices]):
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}: choose from "
                                             f"{', '.join(map(str, choices))}")
        if minimum is not None and min(values) < minimum:
            raise argparse.ArgumentTypeError(f"each must be >= {minimum}, got {text!r}")
        if distinct and (twice := sorted({str(v) for i, v in enumerate(values) if v in values[:i]})):
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} named twice")
        return values
    parse.__name__ = "integers" if kind is int else "numbers" if kind is float else "names"
    return parse


def _flag_type(f):
    kinds = str(f.type)
    low = f.metadata.get("min")
    if f.metadata.get("pixel"):
        return pixel
    if kinds == "list":
        return comma_list(empty_ok=True) if f.metadata.get("strings") else comma_list(int, minimum=low or 0)
    if kinds.startswith("int"):
        return int_at_least(low) if low is not None else int
    return float if kinds.startswith("float") else str


def add_config_flags(parser, *, skip=(), rename=None, show_defaults=True):
    """One flag per RunConfig field (but ``skip``), typed and documented from
    the field's metadata; ``rename`` maps a field to another flag name. A
    flag left out stays None: the preset, the YAML file or the default holds."""
    rename = rename or {}
    for f in fields(RunConfig):
        if f.name in skip:
            continue
        name = rename.get(f.name, flag_name(f.name))
        flag = "--" + name
        default = f.default_factory() if f.default is MISSING else f.default
        help = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices is not None:
            help += f" (one of {', '.join(choices())})"
        if show_defaults and default not in (None, [], ""):
            shown = ",".join(map(str, default)) if isinstance(default, list) else f"{default:.4g}" \
                if isinstance(default, float) else default
            help += f"; default {shown}"
        if str(f.type) == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(flag, dest=f.name, type=_flag_type(f), metavar=name.upper().replace("-", "_"),
                                help=help)


def config_flags(args) -> dict:
    """The RunConfig settings given as flags."""
    return {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}


def use_log_level(level: str | None):
    """--log-level for this process and the workers it starts."""
    if level:
        os.environ["FREEADV_LOG_LEVEL"] = level
    messages.set_level(level)
    inherited = os.environ.get("FREEADV_LOG_LEVEL")
    if not level and inherited and inherited.lower() not in messages.LEVELS:  # else silently info
        messages.warning(f"FREEADV_LOG_LEVEL={inherited[:40]!r} is not one of {', '.join(messages.LEVELS)}: using info")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _usable(path, what: str) -> Path:
    """``path`` as a Path the OS accepts (no NUL byte, no name over the limit), else ConfigError."""
    try:
        path = Path(path)
        path.exists()
        return path
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{what} {str(path)[:80]!r} cannot be used as a path ({why})") from None


def check_writable_dir(path, what: str):
    """Refuses, before any work starts, a directory that cannot be made or written to."""
    path = _usable(path, what)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory")
    for part in (path, *path.absolute().parents):
        if part.is_symlink() and not part.exists():
            raise ConfigError(f"{what} {path} cannot be made: {part} is a symbolic link to nothing (dangling, or a "
                              "loop)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{what} {path} cannot be made: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written: {base} is not writable (read-only?)")


def check_writable_file(path, what: str):
    """Refuses, before any work starts, a file path that cannot be written
    (a directory, a path under a file, an unwritable folder)."""
    path = _usable(path, what)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} cannot be written")
    check_writable_dir(path.parent, f"{what}'s folder")

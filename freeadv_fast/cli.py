"""What the commands share: one-line argument errors, typed arguments."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import ConfigError, pixel_value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, with status 2."""

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

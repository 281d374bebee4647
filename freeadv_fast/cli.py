"""What the commands share: one-line argument errors, typed arguments."""
from __future__ import annotations

import argparse

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

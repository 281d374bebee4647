"""What the package says, through stdlib ``logging`` (the ``freeadv_fast``
logger): plain lines on stderr, info and up by default, and on ranks other
than 0 only warnings and errors, so N processes do not say everything N
times. ``FREEADV_LOG_LEVEL`` (the commands' ``--log-level``) sets the level in
every worker process; an application may configure the logger as it likes."""
from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
logger = logging.getLogger("freeadv_fast")


class _Stderr(logging.Handler):
    """Writes to the sys.stderr of the moment (tests and tqdm replace it)."""

    def emit(self, record):
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _rank0_or_warning(record) -> bool:
    return os.environ.get("RANK", "0").strip().lstrip("0") == "" or record.levelno >= logging.WARNING  # '00' is 0


def set_level(level: str | None = None):
    """``level`` (one of LEVELS), else $FREEADV_LOG_LEVEL, else info."""
    level = level or os.environ.get("FREEADV_LOG_LEVEL") or "info"
    logger.setLevel(level.upper() if level.lower() in LEVELS else logging.INFO)


if not logger.handlers:
    _handler = _Stderr()
    _handler.addFilter(_rank0_or_warning)
    logger.addHandler(_handler)
    logger.propagate = False
    set_level()

info, warning, error = logger.info, logger.warning, logger.error
_said: set[str] = set()


def say_once(message: str):
    """A note (a fallback, a changed setting) said the first time it comes up."""
    if message not in _said:
        _said.add(message)
        logger.info(f"freeadv_fast: {message}")

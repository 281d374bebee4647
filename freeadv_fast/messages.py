"""Notes for the user that must be said, but only once per process."""
from __future__ import annotations

import sys

_said: set[str] = set()


def say_once(message: str):
    """Prints ``freeadv_fast: message`` to stderr the first time it is asked for."""
    if message not in _said:
        _said.add(message)
        print(f"freeadv_fast: {message}", file=sys.stderr, flush=True)

"""Loads the compiled extension (freeadv_fast._C) if it was built.

A pure-Python install (``FREEADV_NO_EXT=1``) or a failed load leaves the torch
and Triton backends; that is said once, here, at import.
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (the extension links against libtorch: load it first)


class ExtensionWarning(UserWarning):
    """The compiled extension is missing; slower backends are used."""


try:
    from . import _C  # type: ignore[attr-defined]
    load_error: str | None = None
except ImportError as exc:
    _C = None
    if os.environ.get("FREEADV_NO_EXT") == "1":
        load_error = "built without it (FREEADV_NO_EXT=1)"
    else:
        load_error = str(exc) or type(exc).__name__
    warnings.warn(f"freeadv_fast: compiled extension not available ({load_error}); "
                  "using the torch and triton backends", ExtensionWarning, stacklevel=2)


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def cuda_archs() -> list[int]:
    """The sm_XY the CUDA kernels were built for, as integers (75, 80, ...)."""
    if not with_cuda():
        return []
    return [int(a) for a in str(_C.cuda_archs).split("_") if a]

"""Loads the compiled extension (freeadv_fast._C) if it was built.

A pure-Python install (``FREEADV_NO_EXT=1``) or a failed load leaves the torch
and Triton backends; that is said once, here, at import. No ``_C`` file
beside the package is said as such; a file that is there but does not load
keeps its real error (an undefined symbol: built against another torch).
"""
from __future__ import annotations

import glob
import importlib
import importlib.machinery
import os
import warnings

import torch  # noqa: F401  (the extension links against libtorch: load it first)

BUILD = "`make env` in a checkout, or `pip install --no-build-isolation .` (CUDA_HOME set for the CUDA kernels)"


class ExtensionWarning(UserWarning):
    """The compiled extension is missing; slower backends are used."""


def _load():
    """(module, None, None), or (None, why, the warning) where the why
    completes "the compiled extension freeadv_fast._C ..."."""
    here = os.path.dirname(os.path.abspath(__file__))
    present = [f for f in (os.path.join(here, "_C" + s) for s in importlib.machinery.EXTENSION_SUFFIXES)
               if os.path.exists(f)]
    try:
        # import_module, not `from . import _C`: that one reports a missing
        # submodule as a circular import of the half-initialised package
        return importlib.import_module(__package__ + "._C"), None, None
    except ImportError as exc:
        if present:  # the real error is the news: an undefined symbol, a missing library
            why = f"failed to load from {present[0]} ({type(exc).__name__}: {exc})"
            hint = f"Rebuild it against the installed torch: {BUILD}."
        elif os.environ.get("FREEADV_NO_EXT") == "1":
            why, hint = "is not built: this is a pure-Python install (FREEADV_NO_EXT=1)", ""
        else:
            other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(here, "_C.*"))
                           if p.endswith((".so", ".pyd")))
            why = (f"is not built for this Python ({', '.join(other)} in {here}; this Python loads "
                   f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]})" if other
                   else f"is not built/installed (no _C*.so in {here})")
            hint = f"Build it with {BUILD}."
        return None, why, f"freeadv_fast: the compiled extension freeadv_fast._C {why}; " \
                          f"using the torch and triton backends. {hint}".rstrip()


_C, load_error, _message = _load()
if _message:
    warnings.warn(_message, ExtensionWarning, stacklevel=2)


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def cuda_archs() -> list[int]:
    """The sm_XY the CUDA kernels were built for, as integers (75, 80, ...)."""
    if not with_cuda():
        return []
    return [int(a) for a in str(_C.cuda_archs).split("_") if a]

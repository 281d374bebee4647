"""Which implementations of the perturbation op can run here, and choosing one.

``torch``  the reference (freeadv_fast/ops/reference.py), always there.
``cpp``    C++ for CPU tensors (csrc/), when the extension is built.
``cuda``   CUDA C++ (kernels/perturb.cu), when the extension was built with
           CUDA for an architecture this GPU can run.
``triton`` Triton (kernels/triton_perturb.py) on GPUs of compute capability
           7.0 and up, or on CPU tensors when TRITON_INTERPRET=1 was set
           before import.

Every backend is one op of the same schema (csrc/ops.cpp)::

    (Tensor x, Tensor(a!) delta, Tensor? grad, Tensor(b!)? out, Tensor step, Tensor eps,
     Tensor mean, Tensor std, float lo, float hi, int pixel_mode, bool update) -> ()

``freeadv_fast::perturb`` (cpp and cuda: the dispatcher picks by device),
``freeadv_fast::triton_perturb``, and ``reference.perturb`` for torch.
What runs on a device is decided once per (backend, device) and cached: an op
call with a resolved backend is one dict lookup.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _ext
from . import reference

BACKENDS = ("torch", "cpp", "cuda", "triton")

try:
    from ..kernels import triton_perturb as _triton
    triton_error: str | None = None
except Exception as exc:  # no triton (macOS, Windows) or a broken install
    _triton = None
    triton_error = f"{type(exc).__name__}: {exc}"

# backend -> the op it runs, for the backends this process has at all
OPS: dict[str, Callable] = {"torch": reference.perturb}
if _ext.available():
    OPS["cpp"] = torch.ops.freeadv_fast.perturb.default
    if _ext.with_cuda():
        OPS["cuda"] = OPS["cpp"]
if _triton is not None:
    OPS["triton"] = torch.ops.freeadv_fast.triton_perturb.default

_available: dict[torch.device, tuple[str, ...]] = {}
# (backend as asked, device as given) -> (backend, op); devices whose meaning
# can change (an index-less "cuda" is the current GPU) are keyed by their index
_resolved: dict[tuple, tuple[str, Callable]] = {}


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run on the given device."""


def _device(device) -> torch.device:
    """``device`` as a torch.device; an index-less "cuda" is the current GPU."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists every device type there is
        raise ValueError(f"not a device: {device!r:.80}") from None
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cuda_runs_on(device: torch.device) -> bool:
    archs = _ext.cuda_archs()
    if not archs or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor >= min(archs)  # newer GPUs JIT the embedded PTX


def _find_backends(device: torch.device) -> tuple[str, ...]:
    names = []
    if device.type == "cuda":
        if _cuda_runs_on(device):
            names.append("cuda")
        if _triton is not None and (_triton.INTERPRETED or torch.cuda.get_device_capability(device)[0] >= 7):
            names.append("triton")
        names.append("torch")
    elif device.type == "cpu":
        if _ext.available():
            names.append("cpp")
        names.append("torch")
        if _triton is not None and _triton.INTERPRETED:
            names.append("triton")
    else:
        names.append("torch")
    return tuple(names)


def _backends_of(device: torch.device) -> tuple[str, ...]:
    names = _available.get(device)
    if names is None:
        names = _available[device] = _find_backends(device)
    return names


def available_backends(device=None) -> list[str]:
    """Backends usable in this process for ``device`` (default: the current
    GPU if there is one, else the CPU), in the order ``backend="auto"``
    prefers them; on CPU, interpreted Triton comes last and auto never picks it.
    Found once per device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return list(_backends_of(_device(device)))


def backend_op(backend: str, device) -> tuple[str, Callable]:
    """``(name, op)``: the backend ``backend`` ("auto" or a name) means on
    ``device`` and the op it runs. Checked once per (backend, device), then
    a dict lookup: no capability query, no list."""
    try:
        hit = _resolved.get((backend, device))
    except TypeError:  # unhashable: not a name
        raise ValueError(f"unknown backend {backend!r:.80}: choose auto, {', '.join(BACKENDS)}") from None
    if hit is None:
        hit = _resolve(backend, device)
    return hit


def resolve_backend(backend: str, device) -> str:
    """The backend name ``backend`` ("auto" or a name) means on ``device``;
    raises BackendUnavailableError if it cannot run there."""
    return backend_op(backend, device)[0]


def _resolve(backend, device) -> tuple[str, Callable]:
    dev = _device(device)
    usable = _backends_of(dev)
    if backend == "auto":
        name = usable[0]
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose auto, {', '.join(BACKENDS)}")
    elif backend not in usable:
        why = {
            "cpp": f"the compiled extension freeadv_fast._C {_ext.load_error}" if not _ext.available()
            else "the C++ backend serves CPU tensors only",
            "cuda": "the extension was built without CUDA" if not _ext.with_cuda()
            else "the CUDA backend needs a GPU the extension was built for",
            "triton": f"triton is not importable ({triton_error})" if _triton is None
            else "Triton needs a GPU (compute capability >= 7.0), or TRITON_INTERPRET=1 set before import "
                 "for CPU tensors",
        }.get(backend, "")
        raise BackendUnavailableError(
            f"backend {backend!r} is not available for {dev.type} tensors: {why} "
            f"(available: {', '.join(usable)})")
    else:
        name = backend
    hit = (name, OPS[name])
    _resolved[backend, dev] = hit
    if dev == torch.device(device):  # not an index-less "cuda", whose GPU may change
        _resolved[backend, device] = hit
    return hit

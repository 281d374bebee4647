"""Which implementations of the perturbation op can run here, and choosing one.

``torch``  the reference (freeadv_fast/ops/reference.py), always there.
``cpp``    C++ for CPU tensors (csrc/), when the extension is built.
``cuda``   CUDA C++ (kernels/perturb.cu), when the extension was built with
           CUDA for an architecture this GPU can run.
``triton`` Triton (kernels/triton_perturb.py) on GPUs of compute capability
           7.0 and up, or on CPU tensors when TRITON_INTERPRET=1 was set
           before import.
"""
from __future__ import annotations

import torch

from .. import _ext

BACKENDS = ("torch", "cpp", "cuda", "triton")

try:
    from ..kernels import triton_perturb as _triton
    triton_error: str | None = None
except Exception as exc:  # no triton (macOS, Windows) or a broken install
    _triton = None
    triton_error = f"{type(exc).__name__}: {exc}"


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run on the given device."""


def _cuda_runs_on(device: torch.device) -> bool:
    archs = _ext.cuda_archs()
    if not archs or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor >= min(archs)  # newer GPUs JIT the embedded PTX


def available_backends(device=None) -> list[str]:
    """Backends usable in this process for ``device`` (default: the current
    GPU if there is one, else the CPU), in the order ``backend="auto"``
    prefers them; on CPU, interpreted Triton comes last and auto never picks it.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
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
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose auto, {', '.join(BACKENDS)}")
    usable = available_backends(device)
    if backend not in usable:
        why = {
            "cpp": f"the compiled extension is not loaded ({_ext.load_error})" if not _ext.available()
            else "the C++ backend serves CPU tensors only",
            "cuda": "the extension was built without CUDA" if not _ext.with_cuda()
            else "the CUDA backend needs a GPU the extension was built for",
            "triton": f"triton is not importable ({triton_error})" if _triton is None
            else "Triton needs a GPU (compute capability >= 7.0), or TRITON_INTERPRET=1 set before import "
                 "for CPU tensors",
        }.get(backend, "")
        raise BackendUnavailableError(
            f"backend {backend!r} is not available for {device.type} tensors: {why} "
            f"(available: {', '.join(usable)})")
    return backend

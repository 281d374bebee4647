"""Public perturbation ops: checks, layouts, and the call into a backend.

Every backend is one op of one schema (see backends.py), called the same
way. The kernels (C++, CUDA, Triton) want every tensor in one dense layout:
delta's (contiguous NCHW or channels_last). Inputs in another layout are
copied into it first and outputs copied back: slower, never wrong.
"""
from __future__ import annotations

import math
import numbers
import weakref

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..common import check_pixel_range, check_uint8_range
from . import reference
from .backends import backend_op

PIXEL_MODES = reference.PIXEL_MODES
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_X_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MODE_IDS = {mode: i for i, mode in enumerate(PIXEL_MODES)}
_constants: dict = {}
# (number or tuple of numbers as given, channels, device, positive, signed) -> its tensor in _constants
_checked: dict = {}
_NUMBERS = (float, int)
_PARAM_NAMES = {"step_size": "step", "epsilon": "eps", "mean": "mean", "std": "std"}
# id(tensor) -> (weakref, version, level, values) of a tensor whose values were read and checked, or made
# from checked values; level: 0 finite, 1 also non-negative, 2 also positive (what a rule needs, _level)
_vetted: dict = {}


def check_mode(mode):
    if mode not in PIXEL_MODES:
        raise ValueError(f"unknown pixel mode {mode!r}: choose one of {', '.join(PIXEL_MODES)}")


def _check_pair(x, delta, grad=None, pixel_range=(0.0, 1.0)):
    for name, t in (("x", x), ("delta", delta), ("grad", grad)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if delta.requires_grad and torch.is_grad_enabled():
        raise ValueError("delta requires grad: it is updated in place from the input gradient, never "
                         "differentiated through (pass delta.detach(), or a buffer made without requires_grad)")
    if x.dim() < 2:
        raise ValueError(f"x must have a channel dimension (dim 1), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be uint8 or floating point, got {x.dtype}")
    if delta.dtype != torch.float32:
        raise TypeError(f"delta must be float32 (pixel units), got {delta.dtype}")
    if delta.shape != x.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} does not match x shape {tuple(x.shape)}; "
                         "for a smaller last batch pass the leading slice delta[:len(x)]")
    for name, t in (("delta", delta), ("grad", grad)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if grad is not None:
        if grad.shape != x.shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} does not match x shape {tuple(x.shape)}")
        if grad.dtype not in _GRAD_DTYPES:
            raise TypeError(f"grad must be float32, bfloat16 or float16, got {grad.dtype}")
    check_uint8_range(x, pixel_range)
    # x in delta's memory moves with the update: the torch backend reads it again for the input, the kernels
    # read it once, so each would give its own answer
    if _overlaps(x, delta):
        raise ValueError("x shares memory with delta: the update would move the clean images too")


def _check_writable(name, t):
    """A tensor written in place whose elements share memory (an expanded
    view: stride 0) would take every write at once; torch's copy_ named
    neither the argument nor the fix."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} is an expanded view (stride 0 along a dimension of size > 1): its elements share "
                         f"memory, so it cannot be written in place; pass a tensor of its own ({name}.clone())")


def _overlaps(a, b) -> bool:
    """Whether ``a`` and ``b`` may share memory: their spans (first to last
    byte) in one storage overlap. Unknown while tracing: taken as no."""
    if not (a.numel() and b.numel()) or torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    ptr = a.untyped_storage().data_ptr()
    if not ptr or ptr != b.untyped_storage().data_ptr():  # 0: no memory (meta tensors)
        return False
    spans = [(t.storage_offset() * t.element_size(),
              (t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size())
             for t in (a, b)]
    return spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def _check_out_dtype(dtype):
    dtype = dtype or torch.float32
    if dtype not in _GRAD_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def _level(values) -> int:
    """What ``values`` satisfy: -1 not all finite, 0 finite, 1 also non-negative, 2 also positive."""
    if not all(math.isfinite(v) for v in values):
        return -1
    return 2 if all(v > 0 for v in values) else 1 if all(v >= 0 for v in values) else 0


def _version(t):
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter: it is taken as unchanged
        return None


def _remember(t: torch.Tensor, level: int, values=None) -> torch.Tensor:
    key = id(t)

    def forget(ref, key=key):
        if _vetted.get(key, (None,))[0] is ref:
            del _vetted[key]
    _vetted[key] = (weakref.ref(t, forget), _version(t), level, values)
    return t


def _vetted_entry(t: torch.Tensor):
    hit = _vetted.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == _version(t):
        return hit
    return None


def vouch(t: torch.Tensor) -> torch.Tensor:
    """``t``, made on the device from checked values so that it is finite and
    non-negative (a checked step size times 0 or 1, or times 1.25), taken by
    channel_param as it is: reading it back would synchronise the device on
    every training step."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return t
    return _remember(t, 1)


_F32 = torch.finfo(torch.float32)


def check_values(value, name: str, *, positive=False, signed=False):
    """The values of a number, a sequence of numbers or a tensor, checked
    (finite; non-negative, positive with ``positive``, of any sign with
    ``signed``) and named when wrong; None for a tensor that cannot be read
    here (while tracing or capturing a CUDA graph). A tensor is read once per
    tensor and version (one sync on a device): the trainer's constants and
    the tensors it passes each step are never read again."""
    need = 2 if positive else 0 if signed else 1
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
            return None
        hit = _vetted_entry(value)
        if hit is not None and hit[2] >= need:
            return hit[3]
        if value.is_complex():
            raise TypeError(f"{name} must hold real numbers, got a {value.dtype} tensor")
        if value.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor: it has no values")
        if value.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        values = tuple(value.detach().to("cpu", torch.float64).reshape(-1).tolist())
    else:
        items = value if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, numbers.Real) or isinstance(v, torch.Tensor) and v.numel() == 1 for v in items):
            raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got {value!r:.80}")
        try:
            values = tuple(float(v) for v in items)
        except OverflowError:  # an int beyond float's range
            values = (math.inf,)
    # the kernels compute in float32: 1e300 would be inf there, a std of 1e-300 zero
    bad = [v for v in values if not abs(v) <= _F32.max or (v < _F32.tiny if positive else v < 0 and not signed)]
    if bad:
        rule = " and positive" if positive else "" if signed else " and non-negative"
        where = " in float32, as the kernels compute" if math.isfinite(bad[0]) and bad[0] > 0 or bad[0] < 0 \
            and signed else ""
        raise ValueError(f"{name} must be finite{rule}{where}, got {bad[0]}")
    if isinstance(value, torch.Tensor):
        _remember(value, _level(values), values)
    return values


def channel_param(value, name: str, channels: int, device, *, positive=False, signed=False) -> torch.Tensor:
    """A scalar, sequence or tensor as a contiguous float32 tensor of one value
    per channel on ``device`` -- the form the kernels take. Values are
    checked (check_values: finite; non-negative, positive with ``positive``,
    of any sign with ``signed``: a mean in a pixel range below 0). Python
    numbers are cached, so a training loop makes each constant once; a
    tensor is read once per tensor and version, so the constants made here
    and what is made from a checked tensor are not read again."""
    tracing = torch.compiler.is_compiling() or is_in_torch_dispatch_mode()  # no real tensors from a cache
    if isinstance(value, torch.Tensor):
        hit = None
        if not tracing:  # the trace of a trainer's step holds tensors checked when it ran eagerly
            hit = _vetted_entry(value)
            if hit is None or hit[2] < (2 if positive else 0 if signed else 1):
                check_values(value, name, positive=positive, signed=signed)
                hit = _vetted_entry(value)
        if (value.dtype == torch.float32 and value.dim() == 1 and value.shape[0] == channels
                and value.device == device and not value.requires_grad and value.is_contiguous()):
            return value  # what channel_param made (the trainer's constants): nothing to do
        t = value.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() not in (1, channels):
            raise ValueError(f"{name} has {t.numel()} values; expected 1 or {channels} (one per channel)")
        t = t.expand(channels).contiguous() if t.numel() == 1 else t.contiguous()
        return _remember(t, hit[2]) if hit is not None else t  # made from checked values: not read again
    fast_key = None
    if not tracing and (type(value) in _NUMBERS or type(value) is tuple and all(type(v) in _NUMBERS for v in value)):
        fast_key = (value, channels, device, positive, signed)
        hit = _checked.get(fast_key)
        if hit is not None:  # these very numbers were checked and made before
            return hit
    values = check_values(value, name, positive=positive, signed=signed)
    if len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} values; expected 1 or {channels} (one per channel)")
    values = values * channels if len(values) == 1 else values
    device = torch.device(device)
    if tracing:
        return torch.tensor(values, dtype=torch.float32, device=device)
    key = (values, device)
    if key not in _constants:
        _constants[key] = _remember(torch.tensor(values, dtype=torch.float32, device=device), _level(values),
                                    values)
    if fast_key is not None:
        _checked[fast_key] = _constants[key]
    return _constants[key]


def layout_of(t: torch.Tensor):
    """The dense memory format of ``t`` (contiguous or channels_last), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _in_layout(t, fmt):
    if t is None or t.is_contiguous(memory_format=fmt):
        return t
    return t.contiguous(memory_format=fmt)


def _run_kernel(op, x, delta, grad, out, *, step, eps, mean, std, lo, hi, mode, update):
    """Runs the fused op ``op`` (a backend's, from backend_op) with every
    tensor brought into delta's dense layout. ``step, eps, mean, std`` are
    per-channel tensors from channel_param."""
    fmt = layout_of(delta) or torch.contiguous_format
    work_delta = _in_layout(delta, fmt)
    if x.dtype not in (torch.uint8, torch.float32):
        x = x.float()  # exactly what the reference does
    x = _in_layout(x, fmt)
    grad = _in_layout(grad, fmt)
    work_out = out
    if out is not None and not out.is_contiguous(memory_format=fmt):
        work_out = torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=fmt)
    op(x, work_delta, grad, work_out, step, eps, mean, std, lo, hi, _MODE_IDS[mode], update)
    if update and work_delta is not delta:  # read only otherwise (and an expanded delta cannot be written)
        delta.copy_(work_delta)
    if work_out is not out:
        out.copy_(work_out)


def _params(x, **values):
    """Checks the named scalar/per-channel values and returns them as tensors."""
    C, dev = x.shape[1], x.device
    return {_PARAM_NAMES[k]: channel_param(v, k, C, dev, positive=k == "std", signed=k == "mean")
            for k, v in values.items()}


def _new_out(x, delta, out, out_dtype, memory_format):
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a tensor, got {type(out).__name__}")
        if out.shape != x.shape or out.device != x.device:
            raise ValueError(f"out must have x's shape {tuple(x.shape)} and device {x.device}, "
                             f"got {tuple(out.shape)} on {out.device}")
        _check_out_dtype(out.dtype)
        _check_writable("out", out)
        # the kernels write out after delta, element by element: out in delta's memory would overwrite it
        if _overlaps(out, delta):
            raise ValueError("out shares memory with delta: the input would overwrite the perturbation")
        return out
    if memory_format not in (None, torch.contiguous_format, torch.channels_last) or (
            memory_format == torch.channels_last and x.dim() != 4):
        raise ValueError(f"memory_format must be None, torch.contiguous_format or (for 4-D x) "
                         f"torch.channels_last, got {memory_format} for x of shape {tuple(x.shape)}")
    fmt = memory_format or layout_of(delta) or torch.contiguous_format
    return torch.empty(x.shape, dtype=_check_out_dtype(out_dtype), device=x.device, memory_format=fmt)


def make_input(x, delta, *, mean, std, pixel_range=(0.0, 1.0), mode="clamp_input", out_dtype=None,
               memory_format=None, out=None, backend="auto"):
    """``normalize(clamp(x + delta, lo, hi))`` as the model's input.

    ``out_dtype`` (default float32) may be bfloat16 or float16;
    ``memory_format`` defaults to delta's layout. ``delta`` may be a leading
    slice of a larger buffer.
    """
    check_mode(mode)
    lo, hi = check_pixel_range(pixel_range)
    _check_pair(x, delta, pixel_range=(lo, hi))
    result = _new_out(x, delta, out, out_dtype, memory_format)
    p = _params(x, mean=mean, std=std)
    _, op = backend_op(backend, x.device)
    # step and eps are not read without an update
    _run_kernel(op, x, delta, None, result, step=p["mean"], eps=p["mean"], lo=lo, hi=hi, mode=mode, update=False,
                **p)
    return result


def update_delta_(delta, grad, x, *, step_size, epsilon, pixel_range=(0.0, 1.0), mode="clamp_input",
                  backend="auto"):
    """``delta <- clip(delta + step * sign(grad) [* mask], -eps, eps)`` in place
    (see reference.update_delta_ for both modes); returns delta."""
    check_mode(mode)
    lo, hi = check_pixel_range(pixel_range)
    if grad is None:
        raise TypeError("update_delta_ needs grad, the input gradient")
    _check_pair(x, delta, grad, (lo, hi))
    _check_writable("delta", delta)
    p = _params(x, step_size=step_size, epsilon=epsilon)
    _, op = backend_op(backend, x.device)
    # mean and std are not read without an output
    _run_kernel(op, x, delta, grad, None, mean=p["eps"], std=p["eps"], lo=lo, hi=hi, mode=mode, update=True, **p)
    return delta


def update_and_make_input_(delta, grad, x, *, step_size, epsilon, mean, std, pixel_range=(0.0, 1.0),
                           mode="clamp_input", out_dtype=None, memory_format=None, out=None, backend="auto"):
    """update_delta_ and make_input in one pass over memory; returns the next model input."""
    check_mode(mode)
    lo, hi = check_pixel_range(pixel_range)
    if grad is None:  # inp.grad of an input that never required grad: the update would be skipped
        raise TypeError("update_and_make_input_ needs grad, the input gradient")
    _check_pair(x, delta, grad, (lo, hi))
    _check_writable("delta", delta)
    result = _new_out(x, delta, out, out_dtype, memory_format)
    p = _params(x, step_size=step_size, epsilon=epsilon, mean=mean, std=std)
    _, op = backend_op(backend, x.device)
    _run_kernel(op, x, delta, grad, result, lo=lo, hi=hi, mode=mode, update=True, **p)
    return result


def random_init_(delta, x, *, epsilon, pixel_range=(0.0, 1.0), mode="clamp_input", generator=None,
                 backend="auto"):
    """Uniform start in [-eps, eps] (projected into the pixel range in "project"
    mode), for PGD restarts and FGSM-RS; returns delta.

    The random draw is torch's, so every backend gives the same start for the
    same generator state; only the projection runs in the chosen backend.
    """
    check_mode(mode)
    lo, hi = check_pixel_range(pixel_range)
    _check_pair(x, delta, pixel_range=(lo, hi))
    _check_writable("delta", delta)
    eps = _params(x, epsilon=epsilon)["eps"]
    _, op = backend_op(backend, x.device)
    delta.uniform_(-1.0, 1.0, generator=generator).mul_(reference.per_channel(eps, delta))
    if mode not in reference.CLAMPING_MODES:  # nothing to fuse without a projection
        # with no gradient the update is only the clip (a no-op here) and the projection
        _run_kernel(op, x, delta, None, None, step=eps, eps=eps, mean=eps, std=eps, lo=lo, hi=hi, mode=mode,
                    update=True)
    return delta

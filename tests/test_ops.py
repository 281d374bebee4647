"""Every backend of the perturbation ops against the reference (the spec)."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import backend_params
from hypothesis import given, settings
from hypothesis import strategies as st

import freeadv_fast.ops as ops
from freeadv_fast.data.imagenet import MEAN, STD
from freeadv_fast.ops import reference

EPS = 8 / 255
STEP = 2 / 255
SHAPES = [(5, 3, 7, 9), (1, 3, 4, 4), (4, 3, 16, 16)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


BACKENDS = list(backend_params())


def batch(shape, x_dtype=torch.uint8, layout="nchw", device="cpu", grad_dtype=torch.float32, seed=0, eps=EPS):
    """x, delta, grad with the edge cases planted: x at lo and hi, delta at
    +-eps and 0, zero and NaN gradients."""
    g = torch.Generator().manual_seed(seed)
    if x_dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        x.view(-1)[::6] = 0
        x.view(-1)[1::6] = 255
    else:
        x = torch.rand(shape, generator=g)
        x.view(-1)[::6] = 0.0
        x.view(-1)[1::6] = 1.0
        x = x.to(x_dtype)
    delta = (torch.rand(shape, generator=g) * 2 - 1) * eps
    delta.view(-1)[::7] = eps
    delta.view(-1)[3::7] = -eps
    delta.view(-1)[5::17] = 0.0
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[::5] = 0.0
    grad.view(-1)[2::13] = float("nan")
    fmt = LAYOUTS[layout]
    return tuple(t.to(device).contiguous(memory_format=fmt) for t in (x, delta, grad.to(grad_dtype)))


def ulp(t: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of dtype at the magnitude of t (computed in float64)."""
    mant, min_exp = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}[dtype]
    a = t.double().abs().clamp_min(2.0 ** min_exp)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def assert_output_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    else:
        diff = (out.double() - ref.double()).abs()
        assert bool((diff <= ulp(ref, out.dtype)).all()), f"max diff {diff.max().item()} exceeds one ulp"


def assert_delta_matches(delta, ref, mode):
    if mode in reference.CLAMPING_MODES:  # bit-exact by contract
        assert torch.equal(delta, ref), f"max diff {(delta - ref).abs().max().item()}"
    else:
        torch.testing.assert_close(delta, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.PIXEL_MODES)
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_update_delta_matches_reference(device, backend, mode, x_dtype, layout, shape):
    x, delta, grad = batch(shape, x_dtype, layout, device)
    expected = reference.update_delta_(delta.clone(), grad, x, step_size=STEP, epsilon=EPS, mode=mode)
    got = ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=EPS, mode=mode, backend=backend)
    assert got is delta
    assert_delta_matches(delta, expected, mode)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.PIXEL_MODES)
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_make_input_matches_reference(device, backend, mode, x_dtype, layout, out_dtype):
    x, delta, _ = batch((5, 3, 7, 9), x_dtype, layout, device)
    before = delta.clone()
    out = ops.make_input(x, delta, mean=MEAN, std=STD, mode=mode, out_dtype=out_dtype, backend=backend)
    expected = reference.make_input(x, delta, mean=MEAN, std=STD, mode=mode, out_dtype=out_dtype)
    assert_output_close(out, expected)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])  # defaults to delta's layout
    assert torch.equal(delta, before)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.PIXEL_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=str)
def test_update_and_make_input_matches_reference(device, backend, mode, layout, grad_dtype, out_dtype):
    x, delta, grad = batch((5, 3, 7, 9), torch.uint8, layout, device, grad_dtype)
    ref_delta = delta.clone()
    expected = reference.update_and_make_input_(ref_delta, grad, x, step_size=STEP, epsilon=EPS, mean=MEAN, std=STD,
                                                mode=mode, out_dtype=out_dtype)
    out = ops.update_and_make_input_(delta, grad, x, step_size=STEP, epsilon=EPS, mean=MEAN, std=STD, mode=mode,
                                     out_dtype=out_dtype, backend=backend)
    assert_delta_matches(delta, ref_delta, mode)
    assert_output_close(out, expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliced_delta_updates_only_its_slice(device, backend, layout):
    x, _, grad = batch((3, 3, 6, 5), torch.uint8, layout, device)
    _, buffer, _ = batch((8, 3, 6, 5), torch.uint8, layout, device, seed=1)
    untouched = buffer[3:].clone()
    expected = reference.update_delta_(buffer[:3].clone(), grad, x, step_size=STEP, epsilon=EPS)
    out = ops.update_and_make_input_(buffer[:3], grad, x, step_size=STEP, epsilon=EPS, mean=MEAN, std=STD,
                                     backend=backend)
    assert torch.equal(buffer[:3], expected)
    assert torch.equal(buffer[3:], untouched)
    assert_output_close(out, reference.make_input(x, expected, mean=MEAN, std=STD))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.PIXEL_MODES)
def test_per_channel_step_and_epsilon(device, backend, mode):
    x, delta, grad = batch((4, 3, 5, 5), torch.float32, "nhwc", device, eps=6 / 255)
    eps = torch.tensor([2 / 255, 4 / 255, 6 / 255])
    step = (1 / 255, 3 / 255, 0.0)
    expected = reference.update_delta_(delta.clone(), grad, x, step_size=step, epsilon=eps, mode=mode)
    ops.update_delta_(delta, grad, x, step_size=step, epsilon=eps, mode=mode, backend=backend)
    assert_delta_matches(delta, expected, mode)
    for c in range(3):
        assert delta[:, c].abs().max() <= eps[c] + 1e-7


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.PIXEL_MODES)
def test_zero_epsilon_zero_and_nan_gradients(device, backend, mode):
    x, delta, grad = batch((2, 3, 4, 4), torch.uint8, "nchw", device)
    ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=0.0, mode=mode, backend=backend)
    assert torch.equal(delta, torch.zeros_like(delta))
    x, delta, _ = batch((2, 3, 4, 4), torch.uint8, "nchw", device)
    before = delta.clone()
    nan_and_zero = torch.full_like(delta, float("nan"))
    nan_and_zero.view(-1)[::2] = 0.0
    ops.update_delta_(delta, nan_and_zero, x, step_size=STEP, epsilon=EPS, mode="clamp_input", backend=backend)
    assert torch.equal(delta, before)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_other_strides_and_out_layouts_take_the_slow_path(device, backend):
    x, delta, grad = batch((3, 3, 8, 6), torch.uint8, "nchw", device)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, odd strides
    grad_t = grad.transpose(2, 3).contiguous().transpose(2, 3)
    ref_delta = delta.clone()
    expected = reference.update_and_make_input_(ref_delta, grad, x, step_size=STEP, epsilon=EPS, mean=MEAN, std=STD)
    out = torch.empty(x.shape, device=device).contiguous(memory_format=torch.channels_last)
    got = ops.update_and_make_input_(delta, grad_t, x_t, step_size=STEP, epsilon=EPS, mean=MEAN, std=STD, out=out,
                                     backend=backend)
    assert got is out
    assert torch.equal(delta, ref_delta)
    assert_output_close(out, expected)
    # a delta that is itself not dense is updated in place too
    big = torch.zeros(3, 3, 8, 12, device=device)
    view = big[..., ::2]
    view.copy_(ref_delta)
    ops.update_delta_(view, grad, x, step_size=STEP, epsilon=EPS, backend=backend)
    assert torch.equal(view, reference.update_delta_(ref_delta.clone(), grad, x, step_size=STEP, epsilon=EPS))
    assert torch.equal(big[..., 1::2], torch.zeros_like(view))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_half_precision_and_float64_x_are_read_like_the_reference(device, backend):
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x, delta, grad = batch((2, 3, 5, 4), dtype, "nchw", device)
        expected = reference.update_delta_(delta.clone(), grad, x, step_size=STEP, epsilon=EPS)
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=EPS, backend=backend)
        assert torch.equal(delta, expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.PIXEL_MODES)
def test_random_init_is_the_same_start_for_every_backend(device, backend, mode):
    x, delta, _ = batch((4, 3, 6, 6), torch.uint8, "nhwc", device)
    ref = reference.random_init_(delta.clone(), x, epsilon=EPS, mode=mode,
                                 generator=torch.Generator(device).manual_seed(3))
    ops.random_init_(delta, x, epsilon=EPS, mode=mode, generator=torch.Generator(device).manual_seed(3),
                     backend=backend)
    torch.testing.assert_close(delta, ref, atol=1e-6, rtol=0)
    assert delta.abs().max() <= EPS + 1e-7
    assert delta.std() > EPS / 4  # actually random, not zeros
    if mode == "project":
        a = reference.pixels(x) + delta
        assert a.min() >= 0 and a.max() <= 1


def test_reference_semantics_by_hand():
    """Pins the spec with values worked out on paper."""
    x = torch.tensor([0.5, 0.5, 1.0, 0.0, 0.5, 0.98]).view(1, 6, 1, 1)
    delta = torch.tensor([0.0, 0.04, 0.0, 0.0, 0.0, 0.03]).view(1, 6, 1, 1)
    grad = torch.tensor([1.0, 1.0, 1.0, -1.0, float("nan"), 1.0]).view(1, 6, 1, 1)
    d = reference.update_delta_(delta.clone(), grad, x, step_size=0.03, epsilon=0.05)
    # step; clipped to eps; ON hi: the paper's mask lets it through; on lo too; NaN; x+delta>hi: masked
    assert d.flatten().tolist() == pytest.approx([0.03, 0.05, 0.03, -0.03, 0.0, 0.03])
    d = reference.update_delta_(delta.clone(), grad, x, step_size=0.03, epsilon=0.05, mode="clamp_input_strict")
    # the strict mask: no gradient on either bound
    assert d.flatten().tolist() == pytest.approx([0.03, 0.05, 0.0, 0.0, 0.0, 0.03])
    d = reference.update_delta_(delta.clone(), grad, x, step_size=0.03, epsilon=0.05, mode="project")
    # project mode: no mask, then x + delta is kept inside [0, 1]
    assert d.flatten().tolist() == pytest.approx([0.03, 0.05, 0.0, 0.0, 0.0, 0.02])
    out = reference.make_input(x, delta, mean=0.5, std=0.25)
    assert out.flatten().tolist() == pytest.approx([0.0, 0.16, 2.0, -2.0, 0.0, 2.0])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_arguments_are_named(device, backend):
    x, delta, grad = batch((2, 3, 4, 4), device=device)
    kw = dict(step_size=STEP, epsilon=EPS, backend=backend)
    with pytest.raises(ValueError, match="pixel mode"):
        ops.update_delta_(delta, grad, x, mode="clip", **kw)
    with pytest.raises(ValueError, match="delta shape"):
        ops.update_delta_(delta[:1], grad, x, **kw)
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative, got -1.0"):
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=-1.0, backend=backend)
    with pytest.raises(ValueError, match="step_size must be finite and non-negative, got inf"):
        ops.update_delta_(delta, grad, x, step_size=math.inf, epsilon=EPS, backend=backend)
    with pytest.raises(ValueError, match="std must be finite and positive"):
        ops.make_input(x, delta, mean=MEAN, std=(0.2, 0.0, 0.2), backend=backend)
    with pytest.raises(ValueError, match="mean must be finite"):
        ops.make_input(x, delta, mean=(0.5, math.inf, 0.5), std=STD, backend=backend)
    for mean in ("0.5", None, np.array(MEAN)):  # a string is not parsed; an array is not one number
        with pytest.raises(TypeError, match="mean must be a number, a sequence of numbers or a tensor"):
            ops.make_input(x, delta, mean=mean, std=STD, backend=backend)
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        ops.make_input(x.tolist(), delta, mean=MEAN, std=STD, backend=backend)
    with pytest.raises(TypeError, match="update_delta_ needs grad"):
        ops.update_delta_(delta, None, x, **kw)
    with pytest.raises(ValueError, match="delta requires grad"):  # every backend alike, not only torch's
        ops.update_delta_(delta.clone().requires_grad_(True), grad, x, **kw)
    for pixel_range in ((0, 0.5, 1), "01", (0, math.nan)):
        with pytest.raises(ValueError, match="pixel_range must be two finite numbers"):
            ops.update_delta_(delta, grad, x, pixel_range=pixel_range, **kw)
    with pytest.raises(ValueError, match="expected 1 or 3"):
        ops.make_input(x, delta, mean=(0.5, 0.5), std=STD, backend=backend)
    with pytest.raises(TypeError, match="grad must be"):
        ops.update_delta_(delta, grad.to(torch.int32), x, **kw)
    with pytest.raises(TypeError, match="delta must be float32"):
        ops.update_delta_(delta.double(), grad, x, **kw)
    with pytest.raises(ValueError, match="lo < hi"):
        ops.update_delta_(delta, grad, x, pixel_range=(1.0, 0.0), **kw)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_calls_every_backend_misread_quietly_are_refused_before_a_write(device, backend):
    """update_and_make_input_ with grad None (inp.grad of an input that
    never required grad) left delta unmoved and returned the clean input;
    uint8 x under pixel_range (0, 255) was read as x / 255 against 0-255
    mean/std (-1.98 for a pixel of 128); x in delta's memory gave each
    backend its own answer."""
    x, delta, grad = batch((2, 3, 4, 4), device=device)
    before = delta.clone()
    kw = dict(step_size=STEP, epsilon=EPS, mean=MEAN, std=STD, backend=backend)
    with pytest.raises(TypeError, match="update_and_make_input_ needs grad"):
        ops.update_and_make_input_(delta, None, x, **kw)
    wide, norm = dict(pixel_range=(0, 255), backend=backend), dict(mean=127.5, std=64.0)  # all in 0-255 units
    move = dict(step_size=2.0, epsilon=8.0)
    for call in (lambda: ops.make_input(x, delta, **norm, **wide),
                 lambda: ops.update_delta_(delta, grad, x, **move, **wide),
                 lambda: ops.update_and_make_input_(delta, grad, x, **move, **norm, **wide),
                 lambda: ops.random_init_(delta, x, epsilon=8.0, **wide)):
        with pytest.raises(ValueError, match=r"uint8 images are read as x / 255, pixels in \[0, 1\], but pixel_range "
                                             r"is \(0.0, 255.0\)"):
            call()
    assert torch.equal(delta, before)
    buffer = torch.cat([delta, delta]) + 0.5
    for xs in (buffer[:2], buffer.view(-1)[1:delta.numel() + 1].view(delta.shape)):  # delta itself, or shifted
        with pytest.raises(ValueError, match="x shares memory with delta"):
            ops.update_and_make_input_(buffer[:2], grad, xs, **kw)
        with pytest.raises(ValueError, match="x shares memory with delta"):
            ops.random_init_(buffer[:2], xs, epsilon=EPS, backend=backend)
    assert torch.equal(buffer, torch.cat([before, before]) + 0.5)
    ops.update_delta_(buffer[:2], grad, buffer[2:], step_size=STEP, epsilon=EPS, backend=backend)  # apart: fine
    # an expanded (stride-0) delta or out ended in torch's copy_ error, naming neither
    shared = torch.zeros((1, *x.shape[1:]), device=device).expand(x.shape)
    for name, call in [("delta", lambda: ops.update_delta_(shared, grad, x, step_size=STEP, epsilon=EPS,
                                                           backend=backend)),
                       ("delta", lambda: ops.update_and_make_input_(shared, grad, x, **kw)),
                       ("delta", lambda: ops.random_init_(shared, x, epsilon=EPS, backend=backend)),
                       ("out", lambda: ops.make_input(x, delta, mean=MEAN, std=STD, out=shared, backend=backend))]:
        with pytest.raises(ValueError, match=f"{name} is an expanded view"):
            call()
    ops.make_input(x, shared, mean=MEAN, std=STD, backend=backend)  # read only: an expanded delta is fine


def test_tensor_values_are_checked_once_per_tensor_and_version(monkeypatch):
    """A tensor epsilon, step size or std is checked like a number (it was
    taken unread: NaN, negative or 0 gave NaN or a flipped ball), read once
    per tensor and version, so a loop that passes the same tensors (the
    trainer's constants) never reads them again."""
    x, delta, grad = batch((2, 3, 4, 4))
    before = delta.clone()
    kw = dict(step_size=STEP, epsilon=EPS)
    for name, value, message in [
            ("epsilon", torch.tensor(math.nan), "epsilon must be finite and non-negative, got nan"),
            ("epsilon", torch.tensor([0.1, math.inf, 0.1]), "epsilon must be finite"),
            ("step_size", torch.tensor(-0.5), "step_size must be finite and non-negative, got -0.5"),
            ("epsilon", torch.tensor(0.1, device="meta"), "epsilon is a meta tensor")]:
        with pytest.raises(ValueError, match=message):
            ops.update_delta_(delta, grad, x, **{**kw, name: value})
        with pytest.raises(ValueError, match=message):
            ops.random_init_(delta.clone(), x, epsilon=value) if name == "epsilon" else ops.update_and_make_input_(
                delta, grad, x, mean=MEAN, std=STD, **{**kw, name: value})
    with pytest.raises(ValueError, match="std must be finite and positive, got 0.0"):
        ops.make_input(x, delta, mean=MEAN, std=torch.tensor([0.2, 0.0, 0.2]))
    with pytest.raises(TypeError, match="epsilon must hold real numbers"):
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=torch.tensor(0.1 + 0j))
    assert torch.equal(delta, before)  # nothing was written by a refused call

    eps = torch.tensor(EPS)
    made = ops.channel_param(STEP, "step_size", 3, "cpu")
    ops.update_delta_(delta, grad, x, step_size=made, epsilon=eps)  # eps read here, made never

    def no_read(*args, **kwargs):
        raise AssertionError("a checked tensor was read again")
    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    ops.update_delta_(delta, grad, x, step_size=made, epsilon=eps)
    ops.update_delta_(delta, grad, x, step_size=ops.vouch(made * 1.25), epsilon=eps)
    monkeypatch.undo()
    eps.fill_(-1.0)  # a new version is read again
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative, got -1.0"):
        ops.update_delta_(delta, grad, x, step_size=made, epsilon=eps)
    # a checked mean below 0 is no epsilon
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative, got -0.5"):
        ops.update_delta_(delta, grad, x, step_size=STEP,
                          epsilon=ops.channel_param(-0.5, "mean", 3, "cpu", signed=True))


def test_outputs_layouts_backends_and_devices_torch_would_misread_are_named():
    x, delta, grad = batch((2, 3, 4, 4))
    for fmt, shape in ((torch.preserve_format, (2, 3, 4, 4)), (torch.channels_last, (2, 3, 16)), ("nhwc", (2, 3, 16))):
        with pytest.raises(ValueError, match="memory_format must be None, torch.contiguous_format or"):
            ops.make_input(x.reshape(shape), delta.reshape(shape), mean=MEAN, std=STD, memory_format=fmt)
    before = delta.clone()
    for out in (delta, delta.view(-1)[:x.numel()].view(x.shape)):  # the input written over the perturbation
        with pytest.raises(ValueError, match="out shares memory with delta"):
            ops.update_and_make_input_(delta, grad, x, step_size=STEP, epsilon=EPS, mean=MEAN, std=STD, out=out)
    assert torch.equal(delta, before)
    buffer = torch.cat([delta, delta])  # out in the half delta does not hold was refused as sharing its memory
    out = ops.make_input(x, buffer[:2], mean=MEAN, std=STD, out=buffer[2:])
    torch.testing.assert_close(out, ops.reference.make_input(x, delta, mean=MEAN, std=STD), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative, got inf"):
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=10 ** 400)  # beyond float: OverflowError before
    with pytest.raises(ValueError, match="unknown backend \\['cpp'\\]"):
        ops.make_input(x, delta, mean=MEAN, std=STD, backend=["cpp"])
    with pytest.raises(ValueError, match="not a device: 'gpu0'"):
        ops.available_backends("gpu0")


def test_unavailable_backend_is_a_clear_error():
    x, delta, grad = batch((2, 3, 4, 4))
    with pytest.raises(ops.BackendUnavailableError, match="'cuda' is not available for cpu tensors"):
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=EPS, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=EPS, backend="numba")


def test_available_backends_on_cpu():
    names = ops.available_backends("cpu")
    assert names[0] == ("cpp" if "cpp" in names else "torch")
    assert "torch" in names and "cuda" not in names
    assert ops.resolve_backend("auto", torch.device("cpu")) == names[0]
    names.append("mine")  # a copy: the cached list is not the caller's
    assert ops.available_backends("cpu") == names[:-1]


def test_a_resolved_backend_is_a_lookup_without_capability_queries(monkeypatch):
    from freeadv_fast.ops import backends
    x, delta, grad = batch((2, 3, 4, 4))
    names = ["auto", *ops.available_backends("cpu")]
    for backend in names:  # the first call per (backend, device) resolves it
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=EPS, backend=backend)

    def asked(*args, **kwargs):
        raise AssertionError("resolved again")
    for obj, name in ((backends, "_resolve"), (backends, "_find_backends"), (backends, "_device"),
                      (torch.cuda, "get_device_capability"), (torch.cuda, "is_available")):
        monkeypatch.setattr(obj, name, asked)
    for backend in names:
        expected = reference.update_delta_(delta.clone(), grad, x, step_size=STEP, epsilon=EPS)
        ops.update_delta_(delta, grad, x, step_size=STEP, epsilon=EPS, backend=backend)
        assert torch.equal(delta, expected)
        assert ops.resolve_backend(backend, x.device) == (names[1] if backend == "auto" else backend)


# the schema of freeadv_fast::perturb (csrc/ops.cpp): every backend's op takes these
PERTURB_SCHEMA = ("(Tensor x, Tensor(a!) delta, Tensor? grad, Tensor(b!)? out, Tensor step, Tensor eps, Tensor mean, "
                  "Tensor std, float lo, float hi, int pixel_mode, bool update) -> ()")


def test_every_backend_is_one_op_of_the_compiled_ops_schema():
    import inspect

    from freeadv_fast.ops import backends
    assert set(backends.OPS) >= set(ops.available_backends("cpu"))
    for name, op in backends.OPS.items():
        if name == "torch":  # a Python function with the same arguments
            args = torch._C.parse_schema("freeadv_fast::perturb" + PERTURB_SCHEMA).arguments
            assert list(inspect.signature(op).parameters) == [a.name for a in args]
        else:
            schema = str(op._schema)
            assert schema[schema.index("("):] == PERTURB_SCHEMA, name
            assert schema.startswith({"triton": "freeadv_fast::triton_perturb("}.get(name, "freeadv_fast::perturb("))


def bad_direct_calls(device, backend):
    """(the argument the refusal must name, a direct torch.ops call with a
    tensor the kernel would misread)."""
    from freeadv_fast.ops import backends
    x, delta, grad = batch((2, 3, 4, 4), device=device)
    p = ops.channel_param(0.1, "p", 3, device)
    op = backends.OPS[backend]
    calls = [("grad", lambda: op(x, delta, grad[:1].expand_as(grad), None, p, p, p, p, 0.0, 1.0, 0, True)),
             ("mode", lambda: op(x, delta, grad, None, p, p, p, p, 0.0, 1.0, 3, True)),
             # the CUDA op crashed on the next-but-one call once: a view first (no new tensor, no kernel run
             # before the call), then a fresh tensor, tells a message printing the device from the rest
             ("step", lambda: op(x, delta, grad, None, p[:2], p, p, p, 0.0, 1.0, 0, True)),
             ("step", lambda: op(x, delta, grad, None, torch.full((2,), 0.1, device=device), p, p, p, 0.0, 1.0, 0,
                                 True)),
             ("eps", lambda: op(x, delta, grad, None, p, p.double(), p, p, 0.0, 1.0, 0, True)),
             ("std", lambda: op(x, delta, grad, None, p, p, p, p[:1].expand(3), 0.0, 1.0, 0, True))]
    if torch.device(device).type == "cuda":  # messages that print a device, from both kinds of check
        calls += [("grad", lambda: op(x, delta, grad.cpu(), None, p, p, p, p, 0.0, 1.0, 0, True)),
                  ("mean", lambda: op(x, delta, grad, None, p, p, p.cpu(), p, 0.0, 1.0, 0, True))]
    return calls


def check_direct_calls(device, backend, say=lambda line: None):
    for i, (name, call) in enumerate(bad_direct_calls(device, backend)):
        say(f"call {i}: a bad {name}")
        with pytest.raises(RuntimeError, match=rf"freeadv perturb: [^:]*\b{name}\b"):  # Triton names all 4 params
            call()


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_direct_op_calls_are_checked(device, backend):
    """A direct torch.ops call with a tensor the kernel would misread is
    refused. On a GPU the calls run in a process of their own, which names
    the call if one crashes it (the CUDA op once did, on a 2-value step)."""
    if torch.device(device).type == "cuda":
        out = subprocess.run([sys.executable, "-X", "faulthandler", __file__, device, backend], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, f"status {out.returncode} after:\n{out.stdout}\n{out.stderr[-4000:]}"
        return
    check_direct_calls(device, backend)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 4), hw=st.lists(st.integers(1, 9), min_size=0, max_size=2),
       mode=st.sampled_from(ops.PIXEL_MODES), u8=st.booleans(), seed=st.integers(0, 2**16),
       eps=st.sampled_from([0.0, 1 / 255, 8 / 255, 0.3]))
def test_compiled_cpu_backend_matches_reference_on_any_shape(n, c, hw, mode, u8, seed, eps):
    backend = ops.available_backends("cpu")[0]
    shape = (n, c, *hw)
    x, delta, grad = batch(shape, torch.uint8 if u8 else torch.float32, seed=seed, eps=eps)
    ref_delta = delta.clone()
    mean, std = tuple(0.1 * i for i in range(c)), tuple(0.2 + 0.1 * i for i in range(c))
    expected = reference.update_and_make_input_(ref_delta, grad, x, step_size=eps / 3, epsilon=eps, mean=mean,
                                                std=std, mode=mode)
    out = ops.update_and_make_input_(delta, grad, x, step_size=eps / 3, epsilon=eps, mean=mean, std=std, mode=mode,
                                     backend=backend)
    assert_delta_matches(delta, ref_delta, mode)
    assert_output_close(out, expected)
    assert not math.isnan(out.sum().item())


if __name__ == "__main__":  # test_direct_op_calls_are_checked on a GPU: python tests/test_ops.py DEVICE BACKEND
    check_direct_calls(*sys.argv[1:], say=lambda line: print(line, flush=True))
    print("every call refused")

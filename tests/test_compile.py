"""The fused ops inside torch.compile: no graph breaks, same numbers as eager."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import freeadv_fast.ops as ops
from conftest import backend_params

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def replay_loop(model, x, y, delta, params, backend, replays, loss_fn=None, update_fn=None):
    """m replays of one minibatch, Algorithm 1 style, with pluggable (compiled) pieces."""
    loss_fn = loss_fn or (lambda inp, y: F.cross_entropy(model(inp), y))
    update_fn = update_fn or (lambda delta, g, x: ops.update_and_make_input_(
        delta, g, x, step_size=params["step_size"], epsilon=params["epsilon"], mean=params["mean"],
        std=params["std"], backend=backend))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inp = ops.make_input(x, delta, mean=params["mean"], std=params["std"], backend=backend)
    losses = []
    for _ in range(replays):
        inp.requires_grad_(True)
        loss = loss_fn(inp, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        inp = update_fn(delta, inp.grad, x)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("device,backend", list(backend_params(skip_interpreted_triton=True)))
def test_compiled_replay_step_matches_eager(device, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).to(device)
    compiled_model = copy.deepcopy(model)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, device=device)
    y = torch.randint(0, 4, (6,), device=device)
    params = {k: ops.channel_param(v, k, 3, device, positive=k == "std")
              for k, v in dict(step_size=2 / 255, epsilon=8 / 255, mean=MEAN, std=STD).items()}

    delta_eager = torch.zeros(6, 3, 8, 8, device=device)
    losses_eager = replay_loop(model, x, y, delta_eager, params, backend, replays=3)

    def update(delta, g, x):
        return ops.update_and_make_input_(delta, g, x, step_size=params["step_size"], epsilon=params["epsilon"],
                                          mean=params["mean"], std=params["std"], backend=backend)

    # fullgraph=True: any graph break around the custom ops is an error
    update_c = torch.compile(update, fullgraph=True)
    loss_c = torch.compile(lambda inp, y: F.cross_entropy(compiled_model(inp), y), fullgraph=True)
    delta_c = torch.zeros(6, 3, 8, 8, device=device)
    losses_c = replay_loop(compiled_model, x, y, delta_c, params, backend, replays=3, loss_fn=loss_c,
                           update_fn=update_c)

    torch.testing.assert_close(losses_c, losses_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_c, delta_eager, atol=1e-6, rtol=0)
    assert delta_c.abs().max() > 0  # the perturbation actually moved
    for p_c, p_e in zip(compiled_model.parameters(), model.parameters()):
        torch.testing.assert_close(p_c, p_e, atol=1e-5, rtol=1e-5)


def test_fake_tensor_tracing_keeps_shapes():
    """The registered fake/meta kernels let the ops trace without real data."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4, dtype=torch.uint8)
        delta = torch.empty(2, 3, 4, 4)
        grad = torch.empty(2, 3, 4, 4, dtype=torch.bfloat16)
        # Triton too: its op has a fake kernel like the C++ one's Meta kernel (the interpreter needs real memory)
        for backend in ops.available_backends("cpu"):
            out = ops.update_and_make_input_(delta, grad, x, step_size=0.1, epsilon=0.1, mean=MEAN, std=STD,
                                             out_dtype=torch.bfloat16, backend=backend)
            assert out.shape == x.shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_backend_first_resolved_inside_a_compiled_function_does_not_break_the_graph(backend, monkeypatch):
    from freeadv_fast.ops import backends
    monkeypatch.setattr(backends, "_resolved", {})  # nothing resolved yet
    monkeypatch.setattr(backends, "_available", {})
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    delta = torch.rand(2, 3, 4, 4) * 0.1
    f = torch.compile(lambda x, d: ops.make_input(x, d, mean=MEAN, std=STD, backend=backend), fullgraph=True)
    out = f(x, delta)
    torch.testing.assert_close(out, ops.reference.make_input(x, delta, mean=MEAN, std=STD), atol=1e-6, rtol=0)
    assert backends._resolved[backend, x.device][0] == (ops.available_backends("cpu")[0] if backend == "auto"
                                                          else backend)


def test_the_ops_compile_whole_with_dynamic_shapes():
    """dynamic=True makes the pixel range's floats symbolic: math.isfinite in
    its check broke every op's graph ('torch.* op returned non-Tensor')."""
    def f(delta, grad, x):
        inp = ops.update_and_make_input_(delta, grad, x, step_size=2 / 255, epsilon=8 / 255, mean=MEAN, std=STD)
        return inp, ops.make_input(x, delta, mean=0.5, std=0.25, pixel_range=(0.0, 1.0))
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (4, 6):  # a second batch size: the same symbolic graph
        x = torch.randint(0, 256, (n, 3, 5, 5), dtype=torch.uint8)
        grad, delta = torch.randn(n, 3, 5, 5), torch.zeros(n, 3, 5, 5)
        expected_delta = delta.clone()
        got, expected = compiled(delta, grad, x), f(expected_delta, grad, x)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert torch.equal(delta, expected_delta)

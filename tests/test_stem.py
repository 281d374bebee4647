"""Free-m's input gradient from the stem convolution's own backward
(freeadv_fast/stem.py) against autograd's."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from freeadv_fast import FreeAdversarialTrainer
from freeadv_fast.models import create_model
from freeadv_fast.stem import INPUT_GRADS, StemConv2d, stem_conv, subpixel_input_grad, use_fast_input_grad
from helpers import EPS, MEAN, STD, STEP, sgd, small_cnn, toy_data


def grads(model, x, y, precision=None):
    """(input gradient, weight gradients) of one cross-entropy backward."""
    inp = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = nn.functional.cross_entropy(model(inp).float(), y)
    loss.backward()
    return inp.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18", "resnet50"])
def test_the_stem_gradients_are_autograds(arch, channels_last):
    """Every way of INPUT_GRADS: the input gradient equal to rounding of the
    largest terms (float32 sums in another order), the weight and bias
    gradients as autograd's, the layout and dtype of the input kept."""
    torch.manual_seed(0)
    model = small_cnn() if arch == "small_cnn" else create_model(arch, 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    size = 32 if arch == "resnet50" else 16
    x = torch.randn(4, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 5, (4,))
    gx, gw = grads(model, x, y)
    for how in INPUT_GRADS:
        fast = copy.deepcopy(model)
        assert use_fast_input_grad(fast, how) and type(stem_conv(fast)) is StemConv2d
        got_x, got_w = grads(fast, x, y)
        assert got_x.dtype == x.dtype and got_x.is_contiguous(memory_format=fmt), how
        torch.testing.assert_close(got_x, gx, rtol=1e-4, atol=1e-5 * gx.abs().max().item(),
                                   msg=lambda m, how=how: f"{how}: {m}")
        for a, b in zip(got_w, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", list(INPUT_GRADS))
def test_under_autocast_the_stem_gradients_are_autograds(how):
    """bf16 autocast: the operands cast as autocast casts conv2d's, the
    gradients returned in the dtypes of the input, weight and bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    gx, gw = grads(model, x, y, "bf16")
    fast = copy.deepcopy(model)
    use_fast_input_grad(fast, how)
    got_x, got_w = grads(fast, x, y, "bf16")
    assert got_x.dtype == torch.float32 and [g.dtype for g in got_w] == [g.dtype for g in gw]
    assert (got_x.sign() == gx.sign()).float().mean() > 0.99
    torch.testing.assert_close(got_x, gx, rtol=2 ** -6, atol=1e-2 * gx.abs().max().item())
    for a, b in zip(got_w, gw):
        torch.testing.assert_close(a, b, rtol=2 ** -6, atol=1e-3 * b.abs().max().item())


@pytest.mark.parametrize("kernel,stride,padding", [(7, 2, 3), (3, 1, 1), (4, 4, 0), (2, 3, 1), (5, 3, 4), (1, 2, 0)])
@pytest.mark.parametrize("size", [(9, 9), (16, 13)])
def test_the_subpixel_gradient_is_autograds_for_any_stride_kernel_and_padding(kernel, stride, padding, size):
    """Exact in float64: the same products, summed in another order. The
    cases include a stride above the kernel (phases with no tap), padding
    above the kernel and sizes the stride does not divide."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, bias=False).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    gy = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, gy)
    got = subpixel_input_grad(conv.weight.detach(), gy, conv.stride, conv.padding, tuple(x.shape))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", list(INPUT_GRADS))
def test_free_training_with_the_stem_gradient_follows_autograd(how):
    x, y = toy_data()
    runs = {}
    for choice in ("autograd", how):
        model = small_cnn()
        t = FreeAdversarialTrainer(model, sgd(model), replays=3, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                   stem_input_grad=choice)
        for _ in range(3):
            t.train_batch(x, y)
        runs[choice] = (t.delta.clone(), [p.detach().clone() for p in model.parameters()])
        assert (type(stem_conv(model)) is StemConv2d) == (choice == how)
    delta_a, weights_a = runs["autograd"]
    delta_p, weights_p = runs[how]
    # the same sums in another order: the signs agree wherever the gradient is not within rounding of zero
    assert (delta_a == delta_p).float().mean() > 0.99
    for a, p in zip(weights_a, weights_p):
        torch.testing.assert_close(a, p, rtol=1e-3, atol=1e-4)


def test_what_comes_before_the_stem_is_carried_by_autograd():
    """The stem's backward makes d loss / d (its input); autograd takes it on
    through what the model does to the image first."""
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            return self.net(x * 2 - 0.5)
    torch.manual_seed(0)
    model = Shifted()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 5, (4,))
    gx, _ = grads(model, x, y)
    use_fast_input_grad(model, "subpixel")
    got, _ = grads(model, x, y)
    torch.testing.assert_close(got, gx, rtol=1e-4, atol=1e-5 * gx.abs().max().item())


def test_the_swapped_stem_keeps_its_state_and_copies_and_pickles_as_itself():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_fast_input_grad(model, "subpixel")
    assert model.state_dict().keys() == before.keys()
    for name, m in (("deepcopy", copy.deepcopy(model)), ("pickle", pickle.loads(pickle.dumps(model)))):
        conv = stem_conv(m)
        assert type(conv) is StemConv2d and conv.input_grad == "subpixel", name
    use_fast_input_grad(model, "autograd")  # undone: the plain backward again
    assert stem_conv(model).input_grad == "autograd"


def test_a_model_without_a_plain_stem_falls_back_to_autograd(capsys):
    class MyConv(nn.Conv2d):  # a forward of its own: not ours to replace
        def forward(self, x):
            return super().forward(x) * 2
    model = nn.Sequential(MyConv(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 3, 8, 8))
    t = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                               stem_input_grad="subpixel")
    assert type(model[0]) is MyConv and "comes from autograd" in capsys.readouterr().err
    t.train_batch(torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,)))
    assert t.delta.abs().max() > 0


def test_autograd_is_the_default_and_other_choices_are_refused():
    model = small_cnn()
    FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    assert type(stem_conv(model)) is nn.Conv2d
    with pytest.raises(ValueError, match="stem_input_grad"):
        FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                               stem_input_grad="fast")


@pytest.mark.parametrize("how", list(INPUT_GRADS))
def test_the_stem_traces_whole_for_torch_compile(how):
    """One graph, forward and backward (AOTAutograd, no code generation:
    what --compile's tracing needs), with autograd's gradients."""
    torch.manual_seed(0)
    model = small_cnn()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 5, (4,))
    gx, gw = grads(model, x, y)
    use_fast_input_grad(model, how)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got_x, got_w = grads(compiled, x, y)
    torch.testing.assert_close(got_x, gx, rtol=1e-4, atol=1e-5 * gx.abs().max().item())
    for a, b in zip(got_w, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

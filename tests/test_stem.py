"""Free-m's input gradient from the stem convolution's output gradient
(freeadv_fast/stem.py) against autograd's."""
import pytest
import torch
import torch.nn as nn

from freeadv_fast import FreeAdversarialTrainer
from freeadv_fast.models import create_model
from freeadv_fast.stem import INPUT_GRADS, StemInputGrad, stem_conv, subpixel_input_grad
from helpers import EPS, MEAN, STD, STEP, sgd, small_cnn, toy_data


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18", "resnet50"])
def test_the_stem_gradient_is_autograds(arch, channels_last):
    """Every way of INPUT_GRADS, from the one backward that autograd's
    input gradient comes from."""
    torch.manual_seed(0)
    model = small_cnn() if arch == "small_cnn" else create_model(arch, 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    size = 32 if arch == "resnet50" else 16
    x = torch.randn(4, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 5, (4,))
    stems = {how: StemInputGrad(stem_conv(model), how) for how in INPUT_GRADS}
    inp = x.clone().requires_grad_(True)
    for stem in stems.values():
        stem.expect(inp)
    nn.functional.cross_entropy(model(inp), y).backward()
    for how, stem in stems.items():
        got = stem.input_grad(inp)
        assert got.shape == inp.shape and got.dtype == inp.dtype and got.is_contiguous(memory_format=fmt), how
        # float32 sums in another order: equal to rounding of the largest terms
        torch.testing.assert_close(got, inp.grad, rtol=1e-4, atol=1e-5 * inp.grad.abs().max().item(),
                                   msg=lambda m, how=how: f"{how}: {m}")
        assert stem.input_grad(inp) is None  # used once; the next step catches its own


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
    torch.testing.assert_close(subpixel_input_grad(conv, gy, tuple(x.shape)), expected, rtol=0, atol=1e-12)


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
        assert (t._stem is not None) == (choice == how)
    delta_a, weights_a = runs["autograd"]
    delta_p, weights_p = runs[how]
    # the same sums in another order: the signs agree wherever the gradient is not within rounding of zero
    assert (delta_a == delta_p).float().mean() > 0.99
    for a, p in zip(weights_a, weights_p):
        torch.testing.assert_close(a, p, rtol=1e-3, atol=1e-4)


def test_a_stem_that_does_not_take_the_input_falls_back_to_autograd(capsys):
    class Shifted(nn.Module):  # the input is changed before the first convolution sees it
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            return self.net(x * 2)
    x, y = toy_data()
    model = Shifted()
    t = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                               stem_input_grad="padded")
    t.train_batch(x, y)
    assert t._stem is None and "comes from autograd" in capsys.readouterr().err
    t.train_batch(x, y)
    assert t.delta.abs().max() > 0


def test_autograd_is_the_default_and_other_choices_are_refused():
    model = small_cnn()
    t = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    assert t._stem is None
    with pytest.raises(ValueError, match="stem_input_grad"):
        FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                               stem_input_grad="fast")

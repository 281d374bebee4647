"""Free-m's input gradient from the stem convolution's output gradient
(freeadv_fast/stem.py) against autograd's."""
import pytest
import torch
import torch.nn as nn

from freeadv_fast import FreeAdversarialTrainer
from freeadv_fast.models import create_model
from freeadv_fast.stem import StemInputGrad, stem_conv
from helpers import EPS, MEAN, STD, STEP, sgd, small_cnn, toy_data


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18", "resnet50"])
def test_the_padded_stem_gradient_is_autograds(arch, channels_last):
    torch.manual_seed(0)
    model = small_cnn() if arch == "small_cnn" else create_model(arch, 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    size = 64 if arch == "resnet50" else 16
    x = torch.randn(4, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 5, (4,))
    stem = StemInputGrad(stem_conv(model))
    inp = x.clone().requires_grad_(True)
    stem.expect(inp)
    nn.functional.cross_entropy(model(inp), y).backward()
    got = stem.input_grad(inp)
    assert got.shape == inp.shape and got.dtype == inp.dtype and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, inp.grad, rtol=1e-4, atol=1e-7)
    assert stem.input_grad(inp) is None  # used once; the next step catches its own


def test_free_training_with_the_padded_stem_follows_autograd():
    x, y = toy_data()
    runs = {}
    for choice in ("autograd", "padded"):
        model = small_cnn()
        t = FreeAdversarialTrainer(model, sgd(model), replays=3, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                   stem_input_grad=choice)
        for _ in range(3):
            t.train_batch(x, y)
        runs[choice] = (t.delta.clone(), [p.detach().clone() for p in model.parameters()])
        assert (t._stem is not None) == (choice == "padded")
    delta_a, weights_a = runs["autograd"]
    delta_p, weights_p = runs["padded"]
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

"""Attacks: cross-checked against torchattacks' independent PGD, and their invariants."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from freeadv_fast import attacks
from freeadv_fast.data.digits import MEAN, STD, digits_split
from freeadv_fast.data.errors import DataError

EPS, STEP = 0.1, 0.02


@pytest.fixture(scope="module")
def digits_model():
    """A small CNN trained naturally on the embedded digits (about 97% clean)."""
    (x, y), (xt, yt) = digits_split()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    inp = (x.float() / 255 - MEAN[0]) / STD[0]
    for _ in range(15):
        for i in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(inp[i]), y[i]).backward()
            opt.step()
    model.eval()
    xt, yt = xt[:200], yt[:200]
    assert attacks.clean_accuracy(model, xt, yt, mean=MEAN, std=STD) > 0.9
    return model, xt, yt


def robust(model, x, y, x_adv):
    return attacks.correct(model, x_adv, y, mean=MEAN, std=STD)[1].float().mean().item()


def test_pgd_agrees_with_torchattacks(digits_model):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits_model

    class PixelModel(nn.Module):  # torchattacks attacks [0, 1] input; it normalizes inside
        def forward(self, pixels):
            return model((pixels - MEAN[0]) / STD[0])

    theirs = torchattacks.PGD(PixelModel().eval(), eps=EPS, alpha=STEP, steps=10, random_start=False)(
        x.float() / 255, y)
    ours = attacks.pgd(model, x, y, epsilon=EPS, step_size=STEP, steps=10, random_start=False, mean=MEAN, std=STD)
    with torch.no_grad():
        pred_theirs = PixelModel()(theirs).argmax(1)
        pred_ours = PixelModel()(ours).argmax(1)
    assert torch.equal(pred_ours, pred_theirs)
    assert (ours - theirs).abs().max() < 1e-5
    clean = attacks.clean_accuracy(model, x, y, mean=MEAN, std=STD)
    assert (pred_ours == y).float().mean() < clean - 0.2  # the attack does bite


def test_examples_stay_in_the_ball_and_the_pixel_range(digits_model):
    model, x, y = digits_model
    for loss in ("ce", "cw"):
        adv = attacks.pgd(model, x, y, epsilon=EPS, step_size=STEP, steps=5, loss=loss, mean=MEAN, std=STD,
                          generator=torch.Generator().manual_seed(0))
        assert (adv - x.float() / 255).abs().max() <= EPS + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1


def test_more_restarts_never_raise_robust_accuracy(digits_model):
    model, x, y = digits_model
    accs = []
    for restarts in (1, 2, 4):
        adv = attacks.pgd(model, x, y, epsilon=EPS / 2, step_size=STEP / 2, steps=3, restarts=restarts, mean=MEAN,
                          std=STD, generator=torch.Generator().manual_seed(3))
        accs.append(robust(model, x, y, adv))
    assert accs[0] >= accs[1] >= accs[2]


def test_zero_epsilon_gives_clean_accuracy_and_cw_and_fgsm_attack(digits_model):
    model, x, y = digits_model
    clean = attacks.clean_accuracy(model, x, y, mean=MEAN, std=STD)
    adv = attacks.pgd(model, x, y, epsilon=0.0, step_size=STEP, steps=5, mean=MEAN, std=STD)
    assert robust(model, x, y, adv) == pytest.approx(clean)
    cw = attacks.pgd(model, x, y, epsilon=EPS, step_size=STEP, steps=10, loss="cw", mean=MEAN, std=STD,
                     random_start=False)
    fgsm = attacks.fgsm(model, x, y, epsilon=EPS, mean=MEAN, std=STD)
    assert robust(model, x, y, cw) < clean - 0.2
    assert robust(model, x, y, fgsm) < clean


def test_confidence_interval():
    lo, hi = attacks.wilson_interval(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert attacks.wilson_interval(0, 10)[0] == 0.0


def test_attack_and_evaluation_arguments_are_named(digits_model):
    from freeadv_fast.evaluate import evaluate
    digits_model, x, y = digits_model
    x, y = x[:8], y[:8]
    kw = dict(epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    for bx, by, message in [(x.float(), y, "outside the pixel range"),  # 0..255 floats, not pixels in [0, 1]
                            (x, y[:7], "one class index per image")]:
        with pytest.raises(ValueError, match=message):
            attacks.pgd(digits_model, bx, by, steps=2, **kw)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        attacks.pgd(digits_model, x, y, steps=2.5, **kw)
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative"):
        attacks.fgsm(digits_model, x, y, epsilon=-1, mean=MEAN, std=STD)
    for extra, message in [(dict(losses="ce"), "losses a sequence of names"), (dict(steps=2), "steps must be"),
                           (dict(limit=-1), "limit must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            evaluate(digits_model, [(x, y)], **{**kw, **extra})
    with pytest.raises(DataError, match="held no image"):
        evaluate(digits_model, [], **kw)
    # numbers that make an attack a no-op or a unit mistake (8 meaning 8/255) would report garbage
    for extra, message in [(dict(step_size=0), "step_size 0 with epsilon > 0"),
                           (dict(epsilon=8), "epsilon 8 is more than the pixel range's width 1"),
                           (dict(step_size=2), "step_size 2 is more than the pixel range's width")]:
        with pytest.raises(ValueError, match=message):
            attacks.pgd(digits_model, x, y, steps=2, **{**kw, **extra})
        with pytest.raises(ValueError, match=message):
            evaluate(digits_model, [(x, y)], **{**kw, **extra})
    attacks.pgd(digits_model, x, y, steps=2, **{**kw, "epsilon": 0, "step_size": 0})  # no attack, as asked
    for extra, message in [(dict(seed=2 ** 70), "seed must be below 2\\*\\*64"), (dict(seed="a"), "seed must be"),
                           (dict(restarts=0), "restarts must be")]:
        with pytest.raises(ValueError, match=message):
            evaluate(digits_model, [(x, y)], **{**kw, **extra})
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        attacks.clean_accuracy(digits_model, x, y, mean=MEAN, std=STD, batch_size=0)
    with pytest.raises(ValueError, match="successes must be in"):
        attacks.wilson_interval(5, 3)
    broken = copy.deepcopy(digits_model)
    next(broken.parameters()).data.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite weights \(NaN or inf, in 0.weight\)"):
        evaluate(broken, [(x, y)], **kw)


def test_labels_model_outputs_and_batches_an_attack_would_misread_are_named():
    """Labels beyond the model's logits ended in an IndexError (a device-side
    assert on a GPU) in pgd, and counted as wrong in correct/clean_accuracy;
    they, and the other batches below, are named first. evaluate() given a
    Dataset's (image, label) items ended in len() of a 0-d tensor, and x as
    a list in 'list' object has no attribute 'to'."""
    from freeadv_fast.evaluate import evaluate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=g), torch.tensor([0, 3, 9, 1])
    model(x.float())  # materialize the lazy layer
    kw = dict(epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    for labels in (torch.tensor([0, 3, 10, 1]), torch.tensor([0, -1, 9, 1])):
        calls = [lambda: attacks.pgd(model, x, labels, steps=1, **kw),
                 lambda: attacks.pgd(model, x, labels, steps=1, loss="cw", **kw),
                 lambda: attacks.pgd(model, x, labels, steps=0, **kw),
                 lambda: attacks.correct(model, x, labels, mean=MEAN, std=STD),
                 lambda: attacks.clean_accuracy(model, x, labels, mean=MEAN, std=STD),
                 lambda: evaluate(model, [(x, labels)], steps=(1,), **kw)]
        for call in calls:
            with pytest.raises(DataError, match=r"y holds class indices from -?\d+ to \d+, but the model gives 10 "
                                                 r"logits per image \(classes 0 to 9\)"):
                call()
    with pytest.raises(ValueError, match=r"for 4 images it returned shape \(4, 1, 8, 8\)"):
        attacks.pgd(nn.Identity(), x, y, steps=1, **kw)
    with pytest.raises(DataError, match="only 1 logit"):
        attacks.correct(nn.Sequential(nn.Flatten(), nn.Linear(64, 1)), x, y * 0, mean=MEAN, std=STD)
    nan = x.float() / 255
    nan[1, 0, 2, 2] = math.nan
    for call, error, message in [
            (lambda: attacks.pgd(model, nan, y, steps=1, **kw), ValueError, "x holds NaN pixels"),
            (lambda: attacks.pgd(model, x.flatten(), y, steps=1, **kw), ValueError, "x must be a batch of images"),
            (lambda: attacks.pgd(model, x, y, steps=1, **{**kw, "epsilon": torch.tensor(8.0)}), ValueError,
             "epsilon 8.0 is more than the pixel range's width 1"),  # a tensor went unchecked
            (lambda: attacks.pgd(model, x, y, steps=1, **{**kw, "epsilon": torch.tensor(math.nan)}), ValueError,
             "epsilon must be finite"),
            (lambda: attacks.correct(model, x, y[:3], mean=MEAN, std=STD), ValueError, "one class index per image"),
            (lambda: attacks.correct(model, x.float(), y, mean=MEAN, std=STD), ValueError, "outside the pixel range"),
            (lambda: attacks.correct(model, x, y, mean=MEAN, std=STD, topk=(0,)), ValueError, "topk must be"),
            (lambda: attacks.correct(model, x, y, mean=MEAN, std=STD, topk=5), ValueError, "topk must be"),
            (lambda: attacks.clean_accuracy(model, x[:0], y[:0], mean=MEAN, std=STD), ValueError, "holds no image"),
            (lambda: attacks.clean_accuracy(model, x.tolist(), y, mean=MEAN, std=STD), TypeError, "a batch is"),
            (lambda: evaluate(model, 5, **kw), TypeError, "batches must be an iterable of \\(x, y\\) batches"),
            (lambda: evaluate(model, [x], **kw), ValueError, "each batch must be an \\(x, y\\) pair, got Tensor"),
            (lambda: evaluate(model, list(zip(x, y)), **kw), ValueError, "single images, e.g. a Dataset given"),
            (lambda: evaluate(model, [(x.tolist(), y)], **kw), TypeError, "a batch is \\(x, y\\) tensors")]:
        with pytest.raises(error, match=message):
            call()
    assert attacks.clean_accuracy(model, x, y, mean=MEAN, std=STD) in (0, 0.25, 0.5, 0.75, 1)


def test_pgd_inside_no_grad_attacks_and_uint8_labels_take_the_cw_margin():
    """Inside a caller's torch.no_grad() it ended in autograd's 'does not
    require grad'; uint8 labels (accepted everywhere else) failed in gather."""
    from helpers import MEAN as RGB_MEAN, STD as RGB_STD, small_cnn, toy_data
    model = small_cnn().eval()
    x, y = toy_data(n=6)
    kw = dict(epsilon=8 / 255, step_size=2 / 255, steps=2, mean=RGB_MEAN, std=RGB_STD, random_start=False)
    free = attacks.pgd(model, x, y, **kw)
    with torch.no_grad():
        assert torch.equal(attacks.pgd(model, x, y, **kw), free)
    assert torch.equal(attacks.pgd(model, x, y.to(torch.uint8), loss="cw", **kw),
                       attacks.pgd(model, x, y, loss="cw", **kw))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="pgd needs input gradients"):
        attacks.pgd(model, x, y, **kw)


def test_accuracies_ask_the_model_in_eval_mode_and_leave_its_modes_as_they_were():
    """correct() and clean_accuracy() on a model left in training mode judged
    each slice by its own BatchNorm statistics (the accuracy depended on the
    batch size) and moved the running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.LazyLinear(10))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        model(x)  # LazyLinear's shape, and running statistics that differ from any batch's
        model[1].running_mean.add_(0.3)
    y = model.eval()((x - 0.5) / 0.25).argmax(1)  # what it predicts in eval mode: 100% by construction
    model.train()
    model[4].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    for batch_size in (4, 16):
        assert attacks.clean_accuracy(model, x, y, mean=0.5, std=0.25, batch_size=batch_size) == 1.0
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""The trainers against plain PyTorch loops written like the papers' code."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

import freeadv_fast.ops as ops
import freeadv_fast.trainer as trainer_module
from freeadv_fast import FastTrainer, FreeAdversarialTrainer, NaturalTrainer, PGDTrainer
from freeadv_fast.data import TensorBatches
from freeadv_fast.scheduler import build_schedule, passes_for
from helpers import EPS, MEAN, STD, STEP, clamp_with_mask, sgd, small_cnn, toy_data

CPU_BACKENDS = ops.available_backends("cpu")


def batches(x, y, sizes):
    i = 0
    for s in sizes:
        yield x[i:i + s], y[i:i + s]
        i += s


def official_free_loop(model, opt, data, *, replays, eps, step, epochs, mask="inclusive"):
    """The paper's official ImageNet loop (main_free.py), in plain PyTorch:
    a leaf noise tensor, autograd through clamp and normalization,
    delta += step * sign(grad), clip of the whole buffer. The clamp's gradient
    mask at the bounds is ``mask`` ("inclusive": torch 1.x, as the paper ran)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    global_noise = None
    for _ in range(epochs):
        for x, y in data():
            # as torchvision's ToTensor did it for that code: x / 255 on the CPU, correctly rounded
            # (torch's CUDA division by a number multiplies by its rounded reciprocal)
            x = (x.cpu().float() / 255).to(x.device)
            mean, std = mean.to(x.device), std.to(x.device)
            if global_noise is None:
                global_noise = torch.zeros_like(x)
            n = x.shape[0]
            for _ in range(replays):
                noise = global_noise[:n].clone().requires_grad_(True)
                in1 = x + noise
                in1 = clamp_with_mask(in1, 0, 1.0, mask)
                in1 = in1.sub(mean).div(std)
                loss = F.cross_entropy(model(in1), y)
                opt.zero_grad()
                loss.backward()
                global_noise[:n] += step * torch.sign(noise.grad)
                global_noise.clamp_(-eps, eps)
                opt.step()
    return global_noise


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mask,pixel_mode", [("inclusive", "clamp_input"), ("strict", "clamp_input_strict")])
def test_free_training_equals_the_official_loop(backend, channels_last, mask, pixel_mode):
    x, y = toy_data()
    sizes = [8, 8, 5]  # a partial last batch
    data = lambda: batches(x, y, sizes)  # noqa: E731
    ref_model = small_cnn()
    model = copy.deepcopy(ref_model)
    ref_delta = official_free_loop(ref_model, sgd(ref_model), data, replays=3, eps=EPS, step=STEP, epochs=2,
                                   mask=mask)

    trainer = FreeAdversarialTrainer(model, sgd(model), replays=3, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     channels_last=channels_last, backend=backend, pixel_mode=pixel_mode)
    for _ in range(2):
        for xb, yb in data():
            stats = trainer.train_batch(xb, yb)
    assert trainer.step == 2 * 3 * 3
    assert stats["samples"] == 5 and torch.isfinite(stats["loss"])
    torch.testing.assert_close(trainer.delta, ref_delta, atol=1e-6, rtol=0)
    assert trainer.delta.abs().max() > 0 and trainer.delta.abs().max() <= EPS + 1e-7
    for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)  # BatchNorm running stats too


def test_the_clamp_mask_decides_whether_black_and_white_pixels_are_perturbed():
    """x = 0 or 255 with delta = 0 sits on a bound: the paper's (inclusive)
    mask moves it, the strict one never does."""
    x, y = toy_data()
    moved = {}
    for mode in ("clamp_input", "clamp_input_strict"):
        model = small_cnn()
        trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN,
                                         std=STD, pixel_mode=mode)
        trainer.train_batch(x, y)
        moved[mode] = trainer.delta[:, :, 0, :].abs().max().item()  # the row of zeros
    assert moved["clamp_input"] > 0 and moved["clamp_input_strict"] == 0


def test_project_mode_keeps_the_perturbed_image_in_range():
    x, y = toy_data()
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=4, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     pixel_mode="project")
    trainer.train_batch(x, y)
    adv = x.float() / 255 + trainer.delta
    assert adv.min() >= -1e-6 and adv.max() <= 1 + 1e-6
    assert trainer.delta.abs().max() > 0


def test_a_larger_batch_grows_the_buffer_keeping_old_values():
    x, y = toy_data(n=12)
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    trainer.train_batch(x[:4], y[:4])
    old = trainer.delta.clone()
    trainer.delta  # noqa: B018
    grown_from = trainer._delta_for(x)  # what the next, larger batch will start from
    assert grown_from.shape[0] == 12
    torch.testing.assert_close(grown_from[:4], old)
    assert grown_from[4:].abs().max() == 0
    with pytest.raises(ValueError, match="one image size"):
        trainer.train_batch(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), y[:2])


def test_compiled_trainer_matches_eager():
    x, y = toy_data()
    eager_model = small_cnn()
    compiled_model = copy.deepcopy(eager_model)
    kw = dict(replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    eager = FreeAdversarialTrainer(eager_model, sgd(eager_model), **kw)
    compiled = FreeAdversarialTrainer(compiled_model, sgd(compiled_model), compile=True, **kw)
    for xb, yb in batches(x, y, [8, 8]):
        eager.train_batch(xb, yb)
        compiled.train_batch(xb, yb)
    torch.testing.assert_close(compiled.delta, eager.delta, atol=1e-6, rtol=0)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_the_replay_loop_never_waits_for_the_device(monkeypatch):
    x, y = toy_data()
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=3, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     precision="bf16")
    trainer.train_batch(x, y)  # first call: buffers and constants

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync inside the training loop")
    # labels on the host are read there each batch, before their copy to the device: no device waits,
    # but on a CPU this proxy cannot tell host tensors from the device's
    checked = []
    monkeypatch.setattr(trainer_module, "check_labels", lambda labels, classes: checked.append(labels))
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    stats = trainer.train_batch(x, y)
    monkeypatch.undo()
    assert len(checked) == 1 and checked[0] is y
    assert torch.isfinite(stats["loss"])
    record = trainer.log_record()  # the sync happens here, at log time
    assert record["samples"] == 2 * 3 * len(x) and 0 <= record["acc"] <= 1 and record["step"] == 6


def test_fp16_skipped_step_leaves_delta_and_weights_unchanged():
    x, y = toy_data(n=8)
    model = small_cnn(batchnorm=False)
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=1, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     precision="fp16")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # fp16 gradients overflow: a skipped step
    before = copy.deepcopy(model.state_dict())
    trainer.train_batch(x, y)
    assert trainer.scaler.get_scale() < 2.0 ** 120  # the scaler saw the overflow and backed off
    assert trainer.delta.abs().max() == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.train_batch(x, y)
    assert trainer.delta.abs().max() > 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bf16_channels_last_trains():
    x, y = toy_data()
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     precision="bf16", channels_last=True)
    first = trainer.train_batch(x, y)["loss"]
    for _ in range(10):
        last = trainer.train_batch(x, y)["loss"]
    assert trainer.delta.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(last) and last < first


def plain_attack_loop(model, opt, data, *, eps, step, steps, seed):
    """k-step PGD (Madry et al.) / FGSM-RS (Wong et al.) training in plain PyTorch."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    for x, y in data():
        x = x.float() / 255
        delta = torch.empty_like(x).uniform_(-1.0, 1.0, generator=g) * eps
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta - mean) / std), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        loss = F.cross_entropy(model((x + delta - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["pgd", "fast"])
def test_attack_trainers_follow_their_update_rules(method):
    x, y = toy_data()
    data = lambda: batches(x, y, [8, 8, 5])  # noqa: E731
    ref_model = small_cnn()
    model = copy.deepcopy(ref_model)
    if method == "pgd":
        plain_attack_loop(ref_model, sgd(ref_model), data, eps=EPS, step=2 / 255, steps=3, seed=7)
        trainer = PGDTrainer(model, sgd(model), steps=3, epsilon=EPS, step_size=2 / 255, mean=MEAN, std=STD, seed=7)
    else:
        plain_attack_loop(ref_model, sgd(ref_model), data, eps=EPS, step=1.25 * EPS, steps=1, seed=7)
        trainer = FastTrainer(model, sgd(model), epsilon=EPS, mean=MEAN, std=STD, seed=7)
    for xb, yb in data():
        trainer.train_batch(xb, yb)
    assert trainer.step == 3
    for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


def test_natural_trainer_is_plain_training():
    x, y = toy_data()
    ref_model = small_cnn()
    model = copy.deepcopy(ref_model)
    opt = sgd(ref_model)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    trainer = NaturalTrainer(model, sgd(model), mean=MEAN, std=STD)
    for xb, yb in batches(x, y, [8, 8, 5]):
        loss = F.cross_entropy(ref_model((xb.float() / 255 - mean) / std), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.train_batch(xb, yb)
    for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_logged_images_per_second_leave_out_evaluation_and_checkpoints(tmp_path):
    """A pass-end hook (a held-out evaluation) that takes 1 s must not show in
    the next pass's first logged rate: that rate is training time alone."""
    import time
    x, y = toy_data(n=16)
    model = small_cnn()
    trainer = NaturalTrainer(model, sgd(model), mean=MEAN, std=STD)
    for read_after in (False, True):  # the metrics read (reset) before the evaluation, as run.py does, or after
        trainer.epoch = 0
        records = []

        def evaluation(_):
            time.sleep(1.0)
            if read_after:
                records.append(trainer.log_record())
        trainer.fit(list(batches(x, y, [8, 8])), 2, log_every=2, on_log=records.append, on_pass_end=evaluation,
                    checkpoint_path=tmp_path / "ck.pt")
        train = [r for r in records if r["samples"]]
        assert [r["epoch"] for r in train] == [0, 1], records
        seconds = [r["samples"] / r["samples_per_s"] for r in train]
        assert 0 < seconds[1] < 0.5, seconds  # the pass's own two batches, not the second of sleep before them


def test_the_scheduler_counts_replay_steps_and_the_epoch_convention():
    assert passes_for(90, 4) == 23 and passes_for(90, 1) == 90 and passes_for(10, 8) == 2
    x, y = toy_data(n=16)
    model = small_cnn()
    opt = sgd(model, lr=0.1)
    loader = TensorBatches(x, y, batch_size=8)  # 2 batches per pass
    replays = 4
    schedule = build_schedule("step", opt, steps_per_pass=len(loader) * replays, passes=16, replays=replays)
    assert isinstance(schedule, LambdaLR)
    assert schedule.lr_lambdas[0].keywords["every_steps"] == math.ceil(30 / 4) * 2 * 4
    trainer = FreeAdversarialTrainer(model, opt, replays=replays, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     scheduler=schedule)
    lrs = []
    trainer.fit(loader, passes=9, log_every=1, on_log=lambda r: lrs.append((r["epoch"], r["lr"])))
    assert trainer.step == 9 * 2 * 4
    # a record's lr is its last step's: the LR falls after 8 passes (16 batches), at the 17th record
    assert [lr for _, lr in lrs] == pytest.approx([0.1] * 16 + [0.01] * 2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)



def test_a_log_record_gives_the_lr_its_last_step_used_with_any_scheduler():
    """The record's lr was the group's LR after the schedule had moved on (a
    phase's last record showed the next phase's LR, a one-cycle run's last
    summary 'lr 0'); a scheduler without get_last_lr is read before it steps."""
    class Halving:  # a plain object with step(), as the trainer accepts
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            for group in self.optimizer.param_groups:
                group["lr"] /= 2

    class InPlace(Halving):  # torch < 2.10's get_last_lr held the group's LR tensor itself (as under graphs)
        def get_last_lr(self):
            return [group["lr"] for group in self.optimizer.param_groups]

        def step(self):
            for group in self.optimizer.param_groups:
                group["lr"].mul_(0.5)

    x, y = toy_data(n=12)
    for make in (Halving, lambda opt: LambdaLR(opt, lambda step: 0.5 ** step), InPlace):
        model = small_cnn()
        opt = sgd(model, lr=0.1)
        if make is InPlace:
            opt.param_groups[0]["lr"] = torch.tensor(0.1)
        trainer = FreeAdversarialTrainer(model, opt, replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                         scheduler=make(opt))
        lrs = []
        trainer.fit(TensorBatches(x, y, batch_size=4), passes=1, log_every=1, on_log=lambda r: lrs.append(r["lr"]))
        assert lrs == pytest.approx([0.1 / 2, 0.1 / 8, 0.1 / 32])  # the second replay of each batch: 2nd, 4th, 6th
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 64) and trainer.last_step_lr() == lrs[-1]

@pytest.mark.parametrize("name", ["cosine", "onecycle", "multistep", "constant"])
def test_schedules_have_their_shape(name):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = build_schedule(name, opt, steps_per_pass=10, passes=10, milestones=[40, 60])
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    if name == "cosine":
        assert lrs[0] == 1.0 and lrs[50] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    elif name == "onecycle":
        assert 0 < lrs[0] < 0.05 and max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 39 and lrs[-1] < 0.05
    elif name == "multistep":
        assert lrs[39] == 1.0 and lrs[40] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01)
    else:
        assert set(lrs) == {1.0}


@pytest.mark.parametrize("name", ["step", "cosine", "onecycle", "multistep", "constant"])
def test_a_schedule_writes_a_tensor_lr_in_place_and_checkpoints_as_plain_numbers(name):
    """The CUDA-graph case: the LR is a 0-dim tensor a captured graph reads; the schedule fills it in place from
    float base LRs. Its state is plain numbers (weights_only) and a resumed schedule goes on with the same LRs."""
    def make():
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=torch.tensor(0.5))
        return opt, build_schedule(name, opt, steps_per_pass=10, passes=10, replays=4, milestones=[40, 60])
    opt, s = make()
    lr = opt.param_groups[0]["lr"]
    assert all(type(b) is float for b in s.base_lrs)
    lrs = []
    for step in range(100):
        if step == 37:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": s.state_dict()}, buf)
        lrs.append(lr.clone())
        opt.step()
        s.step()
    assert opt.param_groups[0]["lr"] is lr
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt, s = make()
    opt.load_state_dict(state["opt"])
    s.load_state_dict(state["sched"])
    assert s.last_epoch == 37
    for step in range(37, 100):
        assert torch.equal(opt.param_groups[0]["lr"], lrs[step]), step
        opt.step()
        s.step()


def test_bad_arguments_are_named():
    model = small_cnn()
    with pytest.raises(ValueError, match="replays"):
        FreeAdversarialTrainer(model, sgd(model), replays=0, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative"):
        FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=-1, step_size=STEP, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="precision"):
        FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                               precision="fp8")
    with pytest.raises(ops.BackendUnavailableError):
        FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                               backend="cuda")


def test_what_a_step_would_misread_is_refused_before_any_state_changes():
    """Arguments and batches a step would misread are named at the call that got them, the
    trainer untouched: no optimizer step, no grown perturbation buffer."""
    model = small_cnn()
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        FreeAdversarialTrainer(model, sgd(small_cnn()), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    for kw, message in [(dict(std=(0.2, 0.0, 0.2)), "std must be finite and positive"),
                        (dict(mean=float("nan")), "mean must be finite"),
                        (dict(max_bad_steps=0), "max_bad_steps must be an integer >= 1"),
                        (dict(seed=1.5), "seed must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            FreeAdversarialTrainer(model, sgd(model), **{**dict(replays=2, epsilon=EPS, step_size=STEP, mean=MEAN,
                                                                std=STD), **kw})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        NaturalTrainer(model, "sgd", mean=MEAN, std=STD)
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    x, y = toy_data(n=4)
    before = copy.deepcopy(model.state_dict())
    for bx, by, message in [(x[:0], y[:0], "non-empty batch"),
                            (x, y[:3], "one class index per image"),
                            (x, F.one_hot(y, 5).float(), "one class index per image"),
                            (x.permute(0, 2, 3, 1), y, "images are N, C, H, W"),
                            (x.float(), y, r"outside the pixel range \[0, 1\]")]:  # 0..255 as floats
        with pytest.raises(ValueError, match=message):
            trainer.train_batch(bx, by)
    assert trainer.step == 0 and trainer.delta is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="passes must be an integer >= 0"):
        trainer.fit([(x, y)], 1.5)
    for hook in ("on_log", "should_stop", "on_batch", "on_pass_end"):  # they failed after a batch had trained
        with pytest.raises(TypeError, match=f"{hook} must be a function"):
            trainer.fit([(x, y)], 1, log_every=1, **{hook: True})
        assert trainer.step == 0
    from freeadv_fast.data.errors import DataError
    with pytest.raises(DataError, match="the loader gave no batch in pass 1"):
        trainer.fit([], 1)
    with pytest.raises(ValueError, match=r"got x of shape \(3, 8, 8\) and one label: single images"):
        trainer.fit(torch.utils.data.TensorDataset(x, y), 1)  # a Dataset, not batches
    with torch.no_grad(), pytest.raises(RuntimeError, match="train_batch needs gradients"):
        trainer.train_batch(x, y)
    assert trainer.step == 0
    # a mean below 0 is valid in a pixel range below 0
    signed = NaturalTrainer(model, sgd(model), mean=(-0.2, 0.0, 0.1), std=STD, pixel_range=(-1.0, 1.0))
    signed.train_batch(x.float() / 255 * 2 - 1, y)
    assert signed.step == 1


def trainers(model):
    """One trainer of each built-in method on ``model``."""
    kw = dict(mean=MEAN, std=STD)
    return [FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, **kw),
            NaturalTrainer(model, sgd(model), **kw),
            PGDTrainer(model, sgd(model), steps=2, epsilon=EPS, step_size=STEP, **kw),
            FastTrainer(model, sgd(model), epsilon=EPS, **kw)]


def test_labels_outside_the_models_classes_are_refused_before_any_state_changes():
    """Labels beyond the model's logits ended in cross-entropy's IndexError
    (a device-side assert on a GPU) after the forward had moved BatchNorm's
    statistics; they are named first, on every batch of host labels."""
    from freeadv_fast.data.errors import DataError
    x, y = toy_data(n=4)  # 5 classes, as small_cnn has
    model = small_cnn()
    model[1].eval()  # a frozen BatchNorm stays frozen through the first batch's look at the model's output
    before = copy.deepcopy(model.state_dict())
    for trainer in trainers(model):
        for labels in (torch.tensor([0, 1, 2, 5]), torch.tensor([0, -1, 2, 3]), torch.tensor([0, 9, 2, 3]).byte()):
            with pytest.raises(DataError, match=r"y holds class indices from -?\d+ to \d+, but the model gives 5 "
                                                 r"logits per image \(classes 0 to 4\)"):
                trainer.train_batch(x, labels)
        assert trainer.step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model[1].training
    trainer.train_batch(x, y)
    with pytest.raises(DataError, match="y holds class indices from 0 to 7"):  # a later batch, too
        trainer.train_batch(x, torch.tensor([0, 7, 2, 3]))


class _Output(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.net, self.make = small_cnn(), make

    def forward(self, inp):
        return self.make(self.net(inp), inp)


@pytest.mark.parametrize("make,message", [
    (lambda logits, inp: (logits, logits), "returned a tuple"),  # Inception-style auxiliary outputs
    (lambda logits, inp: logits[:, :1], "only 1 logit"),  # cross-entropy of one class is 0 whatever the image
    (lambda logits, inp: logits[:, 0], r"returned shape \(2,\)"),
    (lambda logits, inp: inp, r"returned shape \(2, 3, 8, 8\)"),  # a segmentation-style output
    (lambda logits, inp: logits[:1], r"returned shape \(1, 5\)")])
def test_a_model_output_cross_entropy_would_misread_is_named(make, message):
    model = _Output(make)
    trainer = NaturalTrainer(model, sgd(model), mean=MEAN, std=STD)
    x, y = toy_data(n=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        trainer.train_batch(x, y)
    assert trainer.step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tensor_budgets_and_other_constructor_arguments_are_named():
    model = small_cnn()
    kw = dict(replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    for extra, message in [(dict(epsilon=torch.tensor(math.nan)), "epsilon must be finite and non-negative, got nan"),
                           (dict(step_size=torch.tensor([0.1, -0.1, 0.1])), "step_size must be finite and non-neg"),
                           (dict(std=torch.tensor(0.0)), "std must be finite and positive, got 0.0"),
                           (dict(epsilon=torch.tensor(0.1, device="meta")), "epsilon is a meta tensor"),
                           (dict(epsilon=8), "epsilon 8 is more than the pixel range's width 1"),  # 8 meaning 8/255
                           (dict(step_size=torch.tensor(2.0)), "step_size 2.0 is more than the pixel range's width"),
                           (dict(replays=True), "replays must be an integer >= 1, got True"),
                           (dict(seed=2 ** 70), r"seed must be below 2\*\*64")]:
        with pytest.raises(ValueError, match=message):
            FreeAdversarialTrainer(model, sgd(model), **{**kw, **extra})
    with pytest.raises(ValueError, match="epsilon must be finite and non-negative, got -0.5"):
        PGDTrainer(model, sgd(model), steps=1, epsilon=torch.tensor(-0.5), step_size=STEP, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="epsilon 4 is more than the pixel range's width 2"):
        FastTrainer(model, sgd(model), epsilon=4, mean=MEAN, std=STD, pixel_range=(-1.0, 1.0))
    for opt, key in [(torch.optim.SGD(model.parameters(), lr=math.nan), "lr"),
                     (torch.optim.SGD(model.parameters(), lr=0.1, momentum=math.nan), "momentum"),
                     (torch.optim.SGD(model.parameters(), lr=torch.tensor(math.inf)), "lr")]:
        with pytest.raises(ValueError, match=f"the optimizer's {key} is .*: it must be finite"):
            NaturalTrainer(model, opt, mean=MEAN, std=STD)
    x, y = toy_data(n=4)
    trainer = FreeAdversarialTrainer(model, sgd(model), **kw)
    nan = x.float() / 255
    nan[0, 0, 0, 0] = math.nan  # passes a range check: NaN compares false both ways
    for bx, message in [(nan, "x holds NaN pixels"), (x.to("meta"), "x is a meta tensor")]:
        with pytest.raises(ValueError, match=message):
            trainer.train_batch(bx, y)
    with pytest.raises(ValueError, match=r"each batch must be an \(x, y\) pair, got Tensor"):
        trainer.fit([x], 1)  # was unpacked into its first two images: "too many values to unpack"
    assert trainer.step == 0 and trainer.delta is None
    # a checked tensor budget trains, and is not read again (no sync per step on a GPU)
    ok = FreeAdversarialTrainer(model, sgd(model), **{**kw, "epsilon": torch.tensor(EPS)})
    ok.train_batch(x, y)
    assert ok.step == 2 and 0 < ok.delta.abs().max() <= EPS + 1e-7


@pytest.mark.parametrize("method", ["fast", "free-fp16"])
def test_derived_step_sizes_are_not_read_back(method, monkeypatch):
    """FGSM-RS's 1.25 eps and fp16 free-m's step times "did the scaler step"
    are made on the device each step from checked values: checking them
    again would read them back, a sync per step on a GPU."""
    import freeadv_fast.ops.perturb as perturb
    model = small_cnn(batchnorm=False)
    if method == "fast":
        trainer = FastTrainer(model, sgd(model), epsilon=EPS, mean=MEAN, std=STD)
    else:
        trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN,
                                         std=STD, precision="fp16")
    x, y = toy_data(n=4)
    trainer.train_batch(x, y)

    def read(value, name, **rule):
        raise AssertionError(f"{name} was read again")
    monkeypatch.setattr(perturb, "check_values", read)
    trainer.train_batch(x, y)
    assert trainer.step == (2 if method == "fast" else 4)


def test_schedule_arguments_are_named():
    model = small_cnn()
    opt = sgd(model)
    for kw, error, message in [(dict(replays=0), ValueError, "replays must be an integer >= 1, got 0"),  # was 1/0
                               (dict(steps_per_pass=1.5), ValueError, "steps_per_pass must be an integer >= 1"),
                               (dict(passes=math.nan), ValueError, "passes must be an integer >= 1"),
                               (dict(warmup_passes=math.nan), ValueError, "warmup_passes must be a finite number"),
                               (dict(warmup_passes=-1), ValueError, "warmup_passes must be a finite number >= 0"),
                               (dict(milestones=["a"]), ValueError, "milestones must be optimizer steps"),
                               (dict(optimizer="sgd"), TypeError, "optimizer must be a torch.optim.Optimizer")]:
        args = {**dict(optimizer=opt, steps_per_pass=10, passes=2, milestones=[5]), **kw}
        with pytest.raises(error, match=message):
            build_schedule("multistep", args.pop("optimizer"), **args)
    assert build_schedule("multistep", opt, steps_per_pass=10, passes=2, milestones=[5.0, "8"]).lr_lambdas[0](9) \
        == pytest.approx(0.01)  # numbers and numerals of steps are steps, as before
    for args, message in [((math.inf, 1), "epochs must be a positive finite number, got inf"),  # was OverflowError
                          ((math.nan, 1), "epochs must be a positive finite number"),
                          (("90", 1), "epochs must be a positive finite number, got '90'"),
                          ((90, 2.5), "replays must be an integer >= 1, got 2.5")]:
        with pytest.raises(ValueError, match=message):
            passes_for(*args)


def test_settings_that_would_train_silently_on_nothing_are_refused():
    """Each was accepted and trained: a perturbation that never moves, a
    schedule of another optimizer, frozen weights, uint8 images in a range
    they are not read in, a string flag that is true."""
    model = small_cnn()
    common = dict(epsilon=EPS, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="step_size 0 with epsilon 0.03137: the perturbation would never move"):
        FreeAdversarialTrainer(model, sgd(model), replays=2, step_size=0.0, **common)
    with pytest.raises(ValueError, match="step_size 0 with epsilon"):
        PGDTrainer(model, sgd(model), steps=2, step_size=0.0, **common)
    other = torch.optim.lr_scheduler.StepLR(sgd(small_cnn()), 1)
    with pytest.raises(ValueError, match="scheduler was built for another optimizer"):
        NaturalTrainer(model, sgd(model), mean=MEAN, std=STD, scheduler=other)
    opt = sgd(model)
    with pytest.raises(TypeError, match="ReduceLROnPlateau steps on a metric"):
        NaturalTrainer(model, opt, mean=MEAN, std=STD, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    frozen = small_cnn()
    params = list(frozen.parameters())
    for p in params[1:]:
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        NaturalTrainer(frozen, torch.optim.SGD(params[1:], lr=0.1), mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="channels_last must be True or False, got 'no'"):
        NaturalTrainer(model, sgd(model), mean=MEAN, std=STD, channels_last="no")
    with pytest.raises(TypeError, match="random_start must be True or False"):
        PGDTrainer(model, sgd(model), steps=1, step_size=EPS, random_start="no", **common)
    wide = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=8.0, step_size=8.0, mean=(125.0,) * 3,
                                  std=(63.0,) * 3, pixel_range=(0, 255))
    x, y = toy_data(n=4)
    with pytest.raises(ValueError, match=r"uint8 images are read as x / 255, pixels in \[0, 1\], but pixel_range"):
        wide.train_batch(x, y)  # it trained on x / 255 with a budget of 8 of 255
    wide.train_batch(x.float(), y)  # floats in that range are its pixels
    assert wide.step == 2
    with pytest.raises(ValueError, match=r"mean \(125.3, 123.0, 113.9\) lies outside the pixel range \[0, 1\]"):
        NaturalTrainer(model, sgd(model), mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7))  # 0-255 units
    from freeadv_fast.data.errors import DataError
    natural = NaturalTrainer(model, sgd(model), mean=MEAN, std=STD)
    with pytest.raises(DataError, match="it is an iterator, spent after one pass"):
        natural.fit((b for b in [(x, y)]), 2)  # a generator: 'an empty loader' misled
    from freeadv_fast.evaluate import evaluate
    with pytest.raises(TypeError, match="progress must be a function or None, got int"):  # after the attacks
        evaluate(model, [(x, y)], mean=MEAN, std=STD, epsilon=EPS, step_size=STEP, steps=(1,), progress=3)


def test_training_a_model_left_in_eval_mode_is_said_once(capfd, monkeypatch):
    from freeadv_fast import messages
    monkeypatch.setattr(messages, "_said", set())  # not said already by another test in this process
    model = small_cnn().eval()  # after an attack or an evaluation: BatchNorm would stay frozen
    trainer = NaturalTrainer(model, sgd(model), mean=MEAN, std=STD)
    trainer.train_batch(*toy_data(n=4))
    assert "the model is in eval mode" in capfd.readouterr().err


def test_values_and_models_that_pass_a_first_look_but_train_on_garbage_are_refused_before_any_change():
    """Each of these trained, evaluated or grew state before it failed: a
    0-255 mean as a tensor (the range check skipped tensors; evaluate and
    the attacks had none), a std that is 0 in float32, epsilons of another
    count than the means (refused at the first batch, after the perturbation
    buffer grew), a model that returns a tuple only while training
    (GoogLeNet's aux logits: a traceback after BatchNorm had moved)."""
    import torch.nn as nn

    from freeadv_fast import attacks
    from freeadv_fast.evaluate import evaluate
    model = small_cnn()
    x, y = toy_data(n=4)
    wide_mean, wide_std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    attack = dict(epsilon=EPS, step_size=STEP)
    for call in [lambda: NaturalTrainer(model, sgd(model), mean=torch.tensor(wide_mean), std=STD),
                 lambda: evaluate(model, [(x, y)], mean=wide_mean, std=wide_std, steps=(1,), **attack),
                 lambda: attacks.pgd(model.eval(), x, y, mean=torch.tensor(wide_mean), std=STD, steps=1, **attack),
                 lambda: attacks.correct(model, x, y, mean=wide_mean, std=wide_std)]:
        with pytest.raises(ValueError, match=r"mean \(125.3, 123.0, 113.9\) lies outside the pixel range \[0, 1\]"):
            call()
    model.train()
    with pytest.raises(ValueError, match="std must be finite and positive in float32, as the kernels compute, got 1e-300"):
        ops.make_input(x, torch.zeros(x.shape), mean=MEAN, std=1e-300)
    with pytest.raises(ValueError, match="mean must be finite in float32, as the kernels compute, got -1e"):
        ops.make_input(x, torch.zeros(x.shape), mean=-1e300, std=STD)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        evaluate(lambda inp: model(inp), [(x, y)], mean=MEAN, std=STD, steps=(1,), **attack)
    with pytest.raises(ValueError, match="the same count for all: got 2 for epsilon, 3 for mean, 3 for std"):
        FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=(EPS, EPS), step_size=STEP, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="got 2 for step_size, 3 for mean"):
        PGDTrainer(model, sgd(model), steps=1, epsilon=EPS, step_size=(STEP, STEP), mean=MEAN, std=STD)

    class AuxWhileTraining(nn.Module):  # torchvision's GoogLeNet / Inception v3 with aux_logits=True
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, inp):
            logits = self.net(inp)
            return (logits, logits) if self.training else logits

    aux = AuxWhileTraining()
    before = copy.deepcopy(aux.state_dict())
    for trainer in (FreeAdversarialTrainer(aux, sgd(aux), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD),
                    NaturalTrainer(aux, sgd(aux), mean=MEAN, std=STD)):
        with pytest.raises(ValueError, match="for 2 images it returned a tuple"):
            trainer.train_batch(x, y)
    assert aux.training and all(torch.equal(before[k], v) for k, v in aux.state_dict().items())


def test_batches_and_models_refused_before_the_first_step_changes_anything():
    """Integer images other than uint8 and per-channel values of the wrong
    count grew free training's perturbation buffer before the refusal; a
    1-image batch through BatchNorm1d failed mid-forward, after earlier
    BatchNorm layers moved; a model whose output ignores its input took
    optimizer steps with a perturbation that never moved (free) or ended in
    autograd's 'appears to not have been used in the graph' (PGD, FGSM-RS)."""
    import torch.nn as nn

    x, y = toy_data(n=4)
    model = small_cnn()
    free = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    free.train_batch(x[:2], y[:2])
    with pytest.raises(TypeError, match="x must be uint8 or floating-point images, got torch.int64"):
        free.train_batch(x.long(), y)  # a larger batch: the buffer grew to 4 images before
    assert free.delta.shape[0] == 2
    one_channel = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    gray = FreeAdversarialTrainer(one_channel, sgd(one_channel), replays=2, epsilon=(EPS,) * 3, step_size=STEP,
                                  mean=0.5, std=0.25)
    with pytest.raises(ValueError, match="epsilon has 3 values"):
        gray.train_batch(x[:, :1], y)
    assert gray.delta is None

    class Head(nn.Module):  # BatchNorm2d, then a flat BatchNorm1d
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 5))

        def forward(self, inp):
            return self.head(self.features(inp))

    class Detached(nn.Module):  # a frozen backbone run without gradients, a trainable head
        def __init__(self):
            super().__init__()
            self.backbone, self.head = small_cnn(classes=8), nn.Linear(8, 5)

        def forward(self, inp):
            with torch.no_grad():
                features = self.backbone(inp)
            return self.head(features)

    for net, batch, message in [(Head(), (x[:1], y[:1]), "a batch of 1 image: the model's BatchNorm1d"),
                                (Detached(), (x, y), "the model's output does not depend on its input")]:
        for make in (lambda m: FreeAdversarialTrainer(m, sgd(m), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN,
                                                      std=STD),
                     lambda m: PGDTrainer(m, sgd(m), steps=1, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD),
                     lambda m: FastTrainer(m, sgd(m), epsilon=EPS, mean=MEAN, std=STD)):
            before = copy.deepcopy(net.state_dict())
            trainer = make(net)
            with pytest.raises(ValueError, match=message):
                trainer.train_batch(*batch)
            assert trainer.step == 0 and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    detached = Detached()
    NaturalTrainer(detached, sgd(detached), mean=MEAN, std=STD).train_batch(x, y)  # natural training needs no input grad
    # weights of another dtype ended in conv's 'Input type (float) and bias type (double)', or fp16's unscaling error
    for dtype, precision in [(torch.float64, "fp32"), (torch.bfloat16, "fp32"), (torch.float16, "fp16")]:
        net = small_cnn().to(dtype)
        with pytest.raises(TypeError, match=f"parameters are {str(dtype)[6:]} with precision '{precision}'"):
            NaturalTrainer(net, sgd(net), mean=MEAN, std=STD, precision=precision)
    signal = nn.Sequential(nn.Conv1d(3, 4, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"channels_last applies to 4-D image batches \(N, C, H, W\), got x of shape "
                                         r"\(4, 3, 8\)"):  # torch's 'required rank 4 tensor to use channels_last'
        NaturalTrainer(signal, sgd(signal), mean=MEAN, std=STD, channels_last=True).train_batch(x[..., 0], y)
    bf16 = small_cnn().to(torch.bfloat16)  # all in bfloat16 under bf16 autocast: it trains
    NaturalTrainer(bf16, sgd(bf16), mean=MEAN, std=STD, precision="bf16").train_batch(x, y)

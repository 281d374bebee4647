"""Whole training steps as CUDA graphs (--cuda-graph): step for step what
eager training gives, for every method; fallbacks said once."""
import copy
import subprocess
import sys

import pytest
import torch

from freeadv_fast import FastTrainer, FreeAdversarialTrainer, NaturalTrainer, PGDTrainer
from freeadv_fast.scheduler import build_schedule
from helpers import EPS, MEAN, STD, STEP, small_cnn, toy_data

METHODS = {
    "natural": (NaturalTrainer, {}),
    "free": (FreeAdversarialTrainer, dict(replays=3, epsilon=EPS, step_size=STEP)),
    "pgd": (PGDTrainer, dict(steps=3, epsilon=EPS, step_size=STEP / 2)),
    "fast": (FastTrainer, dict(epsilon=EPS)),
}


def make_trainer(method, model, device, **kw):
    cls, args = METHODS[method]
    # the optimizer a captured step needs, given to both sides: LR in a device tensor, fused SGD
    lr = torch.tensor(0.05, device=device) if device == "cuda" else 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4,
                          fused=True if device == "cuda" else None)
    # the LR changes every step: the graph must see each value
    schedule = build_schedule("onecycle", opt, steps_per_pass=40, passes=1)
    return cls(model, opt, mean=MEAN, std=STD, scheduler=schedule, seed=3, **args, **kw)


def train(trainer, batches):
    return [trainer.train_batch(x, y)["loss"].clone() for x, y in batches]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_graphed_training_equals_eager_training_step_for_step(method, precision):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    x, y = toy_data(n=37)
    x, y = x.cuda(), y.cuda()
    # five full batches (3 eager warm-up steps, the capture, replays) and a partial one (eager)
    batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 35, 7)] + [(x[35:], y[35:])]
    model = small_cnn().cuda()
    eager = make_trainer(method, copy.deepcopy(model), "cuda", precision=precision, channels_last=True)
    graphed = make_trainer(method, copy.deepcopy(model), "cuda", precision=precision, channels_last=True,
                           cuda_graph=True)
    assert graphed.cuda_graph
    for (xb, yb) in batches * 2:  # the partial batch between full ones: eager, then back to the graph
        loss_e = eager.train_batch(xb, yb)["loss"]
        loss_g = graphed.train_batch(xb, yb)["loss"]
        assert torch.equal(loss_e, loss_g), (loss_e.item(), loss_g.item())
    assert graphed._graph is not None and graphed._graph.graph is not None, "nothing was captured"
    for (k, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(a, b), f"{k}: max diff {(a.float() - b.float()).abs().max().item()}"
    if method == "free":
        assert torch.equal(eager.delta, graphed.delta) and graphed.delta.abs().max() > 0
    assert eager.step == graphed.step
    assert float(eager.optimizer.param_groups[0]["lr"]) == float(graphed.optimizer.param_groups[0]["lr"])
    assert eager.metrics.compute() | {"samples_per_s": 0} == graphed.metrics.compute() | {"samples_per_s": 0}


@pytest.mark.gpu
def test_a_graphed_checkpoint_resumes_into_eager_training_unchanged(tmp_path):
    from freeadv_fast.checkpoint import load_checkpoint, save_checkpoint
    x, y = toy_data(n=28)
    batches = [(x[i:i + 7].cuda(), y[i:i + 7].cuda()) for i in range(0, 28, 7)]
    model = small_cnn().cuda()
    graphed = make_trainer("free", copy.deepcopy(model), "cuda", cuda_graph=True)
    train(graphed, batches * 2)
    save_checkpoint(tmp_path / "c.pt", graphed)
    eager = make_trainer("free", copy.deepcopy(model), "cuda")
    load_checkpoint(tmp_path / "c.pt", eager)
    assert torch.equal(eager.delta, graphed.delta) and eager.step == graphed.step
    assert torch.equal(torch.stack(train(eager, batches)), torch.stack(train(graphed, batches)))


@pytest.mark.gpu
def test_fp16_says_once_that_it_runs_eagerly(capfd):
    model = small_cnn().cuda()
    trainer = make_trainer("natural", model, "cuda", precision="fp16", cuda_graph=True)
    assert not trainer.cuda_graph
    assert "fp16 training runs eagerly" in capfd.readouterr().err


def test_on_cpu_the_graph_option_is_said_not_to_apply_and_training_is_eager(capfd):
    x, y = toy_data(n=14)
    model = small_cnn()
    a = make_trainer("free", copy.deepcopy(model), "cpu", cuda_graph=True)
    b = make_trainer("free", copy.deepcopy(model), "cpu")
    assert not a.cuda_graph
    assert "applies to CUDA devices; on cpu training runs eagerly" in capfd.readouterr().err
    assert torch.equal(torch.stack(train(a, [(x, y)] * 2)), torch.stack(train(b, [(x, y)] * 2)))


def test_the_cli_flag_on_cpu_says_once_and_trains(tmp_path):
    cmd = [sys.executable, "-m", "freeadv_fast.train", "--cpu", "digits", "--epochs", "4", "--cuda-graph",
           "--eval-every", "0", "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("--cuda-graph applies to CUDA devices") == 1

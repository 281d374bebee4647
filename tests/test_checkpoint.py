"""Checkpoints: exact resume, atomic writes, refusing hostile or foreign files."""
import os
import stat

import pytest
import torch

from dist_workers import run
from freeadv_fast import FreeAdversarialTrainer, PGDTrainer, load_checkpoint, save_checkpoint
from freeadv_fast.checkpoint import FORMAT, CheckpointError, atomic_save, read_checkpoint
from freeadv_fast.data import TensorBatches
from freeadv_fast.scheduler import build_schedule
from helpers import EPS, MEAN, STD, STEP, sgd, small_cnn, toy_data


def weights(path):
    return torch.load(path, weights_only=True)


def test_resuming_mid_run_gives_the_uninterrupted_result(tmp_path):
    for mode in ("full", "interrupt", "resume"):
        run(mode, str(tmp_path), dropout=0.2)
    full, resumed = weights(tmp_path / "model-full.pt"), weights(tmp_path / "model-resume.pt")
    interrupted = weights(tmp_path / "model-interrupt.pt")
    assert not torch.equal(full["0.weight"], interrupted["0.weight"])  # the interruption did cut the run short
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert torch.equal(weights(tmp_path / "delta-full-rank0.pt"), weights(tmp_path / "delta-resume-rank0.pt"))


def make_pgd(seed=0):
    model = small_cnn(seed=seed)
    opt = sgd(model)
    sched = build_schedule("cosine", opt, steps_per_pass=3, passes=2)
    return PGDTrainer(model, opt, steps=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD, scheduler=sched,
                      seed=5)


def test_pgd_resume_restores_the_attack_generator_and_schedule(tmp_path):
    x, y = toy_data(n=24)
    loader = TensorBatches(x, y, batch_size=8, seed=1)
    full = make_pgd()
    full.fit(loader, 2)
    first = make_pgd()
    first.fit(loader, 2, checkpoint_path=tmp_path / "c.pt", should_stop=lambda: first.step == 4)
    second = make_pgd(seed=9)  # different initial weights: everything must come from the checkpoint
    load_checkpoint(tmp_path / "c.pt", second)
    assert second.scheduler.last_epoch == 4 and second.epoch == 1 and second.batch_in_epoch == 1
    second.fit(loader, 2)
    for p, q in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(p, q)


def test_a_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    x, y = toy_data(n=8)
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    trainer.train_batch(x, y)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, trainer, config={"arch": "small_cnn", "replays": 2})
    good = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    trainer.train_batch(x, y)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, trainer)
    monkeypatch.undo()
    assert path.read_bytes() == good  # the previous checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and no temp file is left
    state = read_checkpoint(path)
    assert state["config"] == {"arch": "small_cnn", "replays": 2} and state["step"] == 2
    assert state["ranks"][0]["delta"].shape == x.shape


class Payload:
    """A pickle gadget: unpickling it calls print (it could call anything)."""

    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def test_hostile_truncated_and_foreign_checkpoints_are_refused(tmp_path, capsys):
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": FORMAT, "payload": Payload()}, hostile)
    with pytest.raises(CheckpointError, match="holds objects other than tensors and containers"):
        load_checkpoint(hostile, trainer)
    assert "code from a checkpoint ran" not in capsys.readouterr().out

    good = tmp_path / "good.pt"
    trainer.train_batch(*toy_data(n=8))
    save_checkpoint(good, trainer)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(truncated, trainer)

    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a freeadv_fast checkpoint"):
        load_checkpoint(plain, trainer)
    with pytest.raises(CheckpointError, match="written by 1 process"):
        load_checkpoint(good, trainer, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 0 given without world_size"):  # it said 'rank must be in [0, None)'
        load_checkpoint(good, trainer, rank=0)
    other = small_cnn(classes=7)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(good, FreeAdversarialTrainer(other, sgd(other), replays=2, epsilon=EPS, step_size=STEP,
                                                     mean=MEAN, std=STD))
    with pytest.raises(CheckpointError, match="written by 'free' training"):
        load_checkpoint(good, make_pgd())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", trainer)


def test_saving_never_replaces_a_folder_or_a_link_and_a_failed_load_changes_nothing(tmp_path):
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    trainer.train_batch(*toy_data(n=8))
    folder = tmp_path / "runs"
    (folder / "keep").mkdir(parents=True)
    with pytest.raises(ValueError, match="is a directory, not a file name"):
        save_checkpoint(folder, trainer)
    assert (folder / "keep").is_dir() and not (tmp_path / "runs.prev").exists()
    with pytest.raises(ValueError, match="config must be a dict of plain values"):
        save_checkpoint(tmp_path / "c.pt", trainer, config={"when": object()})
    target = tmp_path / "real.pt"
    (tmp_path / "link.pt").symlink_to(target)
    save_checkpoint(tmp_path / "link.pt", trainer)  # the link's target is written; the link stays a link
    assert (tmp_path / "link.pt").is_symlink() and read_checkpoint(target)["step"] == trainer.step
    other = small_cnn()
    adam = FreeAdversarialTrainer(other, torch.optim.Adam(other.parameters()), replays=2, epsilon=EPS,
                                  step_size=STEP, mean=MEAN, std=STD)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit this model/optimizer \(Adam\)"):
        load_checkpoint(target, adam)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items()) and adam.step == 0
    # a device or a pipe is never renamed away and replaced by a file
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a device or a pipe, not a file"):
        save_checkpoint(fifo, trainer)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and not (tmp_path / "fifo.prev").exists()


def test_a_load_that_fails_in_the_per_process_state_changes_nothing(tmp_path):
    model = small_cnn()
    trainer = FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    trainer.train_batch(*toy_data(n=8))
    save_checkpoint(tmp_path / "c.pt", trainer)
    state = read_checkpoint(tmp_path / "c.pt")
    del state["ranks"][0]["rng"]  # the weights load, then this process's RNG states do not
    atomic_save(state, tmp_path / "bad.pt")
    fresh = small_cnn()
    other = FreeAdversarialTrainer(fresh, sgd(fresh), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing 'rng'"):
        load_checkpoint(tmp_path / "bad.pt", other)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and other.step == 0
    with pytest.raises(ValueError, match="the trainer state lacks optimizer"):
        other.load_state_dict({k: v for k, v in trainer.state_dict().items() if k != "optimizer"})
    for key, value in (("step", 1.5), ("epoch", "2"), ("batch_in_epoch", -1)):  # were taken as they were
        with pytest.raises(ValueError, match=f"the trainer state's {key} must be an integer >= 0"):
            other.load_state_dict({**trainer.state_dict(), key: value})
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and other.step == 0


@pytest.mark.parametrize("written", ["freeadv_fast.checkpoint/1", "freeadv_fast.checkpoint/3"])
def test_a_checkpoint_of_another_format_version_is_named_as_such(tmp_path, written):
    """It was called "not a freeadv_fast checkpoint", which sent the user looking for another file."""
    path = tmp_path / "old.pt"
    torch.save({"format": written, "sha256": "0" * 64, "payload": b"abc", "model": {}}, path)
    with pytest.raises(CheckpointError, match=f"written in format '{written}' by another version of freeadv_fast; "
                                              f"this one reads '{FORMAT}' only"):
        read_checkpoint(path)


def test_numpy_scalars_are_saved_as_numbers_and_foreign_files_are_not_replaced(tmp_path):
    import numpy as np
    from freeadv_fast.checkpoint import not_a_results_file, write_result
    model = small_cnn()
    opt = sgd(model)
    trainer = FreeAdversarialTrainer(model, opt, replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD)
    trainer.train_batch(*toy_data(n=8))
    for group in opt.param_groups:  # a hand-written schedule from np.linspace: saved, then never loadable
        group["lr"] = np.linspace(0.05, 0, 10)[1]
    save_checkpoint(tmp_path / "c.pt", trainer, config={"lr": np.float64(0.1), "sizes": [np.int64(3)]})
    again = small_cnn()
    load_checkpoint(tmp_path / "c.pt", FreeAdversarialTrainer(again, sgd(again), replays=2, epsilon=EPS,
                                                              step_size=STEP, mean=MEAN, std=STD))
    assert read_checkpoint(tmp_path / "c.pt")["config"] == {"lr": 0.1, "sizes": [3]}
    # saved over twice, notes became the .prev and then were replaced
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(ValueError, match="exists and is not a checkpoint"):
        save_checkpoint(notes, trainer)
    (tmp_path / "d.pt.prev").write_text("someone's")
    with pytest.raises(ValueError, match=r"d\.pt\.prev' exists and is not a checkpoint"):
        trainer.fit([toy_data(n=8)], 3, checkpoint_path=tmp_path / "d.pt")  # before any batch trains
    assert notes.read_text() == "precious" and trainer.step == 2
    # one JSON document is not enough to be replaced by results: a notebook is one too
    (tmp_path / "a.ipynb").write_text('{"cells": [], "nbformat": 4}')
    assert "not a results file of this project" in not_a_results_file(tmp_path / "a.ipynb")
    results = tmp_path / "r.json"
    results.write_text('{"meta": {}, "records": []}')
    results.chmod(0o664)
    assert not_a_results_file(results) is None
    write_result(results, "{}")  # replaced in place, keeping its mode (mkstemp's 0600 replaced it)
    assert stat.S_IMODE(results.stat().st_mode) == 0o664


def test_a_state_no_load_could_read_back_is_refused_before_training_and_saving(tmp_path):
    """A schedule whose LR factor is an object holding a numpy table saved
    checkpoints that could never be loaded (torch's advice to load unsafely
    came with the error), and a scheduler without state_dict() failed at the
    first checkpoint, after a pass had trained."""
    import numpy as np
    from torch.optim.lr_scheduler import LambdaLR

    class Table:  # the LR factor per step, precomputed
        def __init__(self, n):
            self.table = np.linspace(1.0, 0.0, n)

        def __call__(self, step):
            return float(self.table[min(step, len(self.table) - 1)])

    class Warmup:  # steps, but keeps no state
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            pass

    x, y = toy_data(n=8)
    for make, message in [(lambda opt: LambdaLR(opt, Table(10)), r"a numpy.ndarray at scheduler.lr_lambdas\[0\].table"),
                          (Warmup, r"the scheduler \(Warmup\) has no state_dict\(\)")]:
        model = small_cnn()
        opt = sgd(model)
        trainer = FreeAdversarialTrainer(model, opt, replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                         scheduler=make(opt))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises((ValueError, TypeError), match=message):
            trainer.fit(TensorBatches(x, y, batch_size=4), passes=1, checkpoint_path=tmp_path / "c.pt")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and trainer.step == 0
        with pytest.raises((ValueError, TypeError), match=message):
            save_checkpoint(tmp_path / "c.pt", trainer)
        assert not (tmp_path / "c.pt").exists()


def test_a_checkpoint_of_another_optimizer_or_schedule_is_refused_and_changes_nothing(tmp_path):
    """An Adam checkpoint loaded into an SGD trainer replaced its groups (a
    KeyError 'momentum' at the next step); a scheduled run's checkpoint in a
    trainer without a schedule froze the LR, and the reverse restarted it."""
    from torch.optim.lr_scheduler import LambdaLR

    def trainer(optimizer="sgd", scheduled=True):
        model = small_cnn()
        opt = sgd(model) if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-3)
        return FreeAdversarialTrainer(model, opt, replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                      scheduler=LambdaLR(opt, lambda s: 0.5 ** s) if scheduled else None)

    x, y = toy_data(n=4)
    for saved_kind, loaded_kind, message in [
            (dict(optimizer="adam"), {}, "written with a Adam optimizer, this trainer has SGD"),
            ({}, dict(scheduled=False), "with an LR schedule, and this trainer has none"),
            (dict(scheduled=False), {}, "without an LR schedule, and this trainer has one")]:
        saved = trainer(**saved_kind)
        saved.train_batch(x, y)
        save_checkpoint(tmp_path / "c.pt", saved)
        loaded = trainer(**loaded_kind)
        groups = [dict(g) for g in loaded.optimizer.param_groups]
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "c.pt", loaded)
        assert loaded.step == 0 and loaded.delta is None
        assert [dict(g) for g in loaded.optimizer.param_groups] == groups
        (tmp_path / "c.pt").unlink()


def test_retune_changes_the_optimizer_settings_and_scales_the_rest_of_the_schedule():
    """A resumed run's new LR, momentum, weight decay and Nesterov were said and
    recorded but loading the checkpoint had put the saved ones back."""
    from torch.optim.lr_scheduler import LambdaLR
    model = small_cnn()
    opt = sgd(model, lr=0.1)
    trainer = FreeAdversarialTrainer(model, opt, replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                     scheduler=LambdaLR(opt, lambda s: 0.5 ** s))
    x, y = toy_data(n=4)
    trainer.train_batch(x, y)  # 2 steps: the LR now 0.1 / 4
    trainer.retune(lr_scale=0.5, momentum=0.5, nesterov=True, weight_decay=0.0)
    group = opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.5, True, 0.0)
    assert group["lr"] == pytest.approx(0.05 / 4)
    lrs = []
    trainer.fit(TensorBatches(x, y, batch_size=4), passes=1, log_every=1, on_log=lambda r: lrs.append(r["lr"]))
    assert lrs == pytest.approx([0.05 / 8])  # the third and fourth steps at half the schedule
    assert group["lr"] == pytest.approx(0.05 / 16)

"""Fault injection: dying workers, torchrun's elastic restarts, full disks,
damaged and hostile checkpoints, NaN batches. Each checks that nothing is
lost beyond the last checkpoint."""
import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from freeadv_fast import FreeAdversarialTrainer, save_checkpoint
from freeadv_fast.checkpoint import FORMAT, CheckpointError, find_resumable, previous_of, read_checkpoint
from freeadv_fast.trainer import NonFiniteError
from helpers import EPS, MEAN, STD, STEP, sgd, small_cnn, toy_data
from test_cli import cli, config_file


def children(pid, marker):
    """PIDs of the processes whose parent is ``pid`` and whose command line has ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and marker in cmdline:
            found.append(int(entry))
    return sorted(found)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def weights(path):
    return read_checkpoint(path)["model"]


def test_a_killed_worker_stops_the_other_quickly_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--cpu", "--nproc", "2", "digits", "--epochs", "16", "--config",
            config_file(tmp_path, eval_every=0, checkpoint_every=2), "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "freeadv_fast.train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "checkpoint-last.pt").exists(), proc)
        workers = children(proc.pid, "spawn_main")
        assert len(workers) == 2
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        kill_tree(proc)
    assert time.time() - killed_at < 60  # bounded: no hang
    assert proc.returncode != 0
    assert "rank 1 was killed by SIGKILL" in err
    assert "rank 0: another process failed, stopping" in err and "Traceback" not in err
    saved = read_checkpoint(out / "checkpoint-last.pt")  # a complete checkpoint survived
    assert saved["step"] > 0 and len(saved["ranks"]) == 2
    resumed = cli(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoint-last.pt'}" in resumed.stderr
    assert read_checkpoint(out / "checkpoint-last.pt")["epoch"] == 4


def kill_tree(proc):
    """No process of a failed test may outlive it."""
    for pid in children(proc.pid, "freeadv_fast"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def torchrun(args, max_restarts=0, **env):
    """The training command under torchrun: one node, two CPU processes (gloo)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT", "FREEADV_FAULT_INJECT")},
           "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                             "--nproc-per-node", "2", "--max-restarts", str(max_restarts), "-m", "freeadv_fast.train",
                             *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        kill_tree(proc)


def test_torchrun_restarts_after_a_killed_worker_from_the_last_checkpoint_to_the_same_weights(tmp_path):
    # 2 passes x 22 batches x 4 replays; a checkpoint every 4 batches (16 steps): rank 1 dies at step 40,
    # after the checkpoint of step 32, once (round 0 only); torchrun restarts both workers, which resume
    common = ["--cpu", "digits", "--epochs", "8", "--config", config_file(tmp_path, eval_every=0, checkpoint_every=4),
              "--resume", "auto"]
    reference = torchrun([*common, "--out", tmp_path / "reference"])
    log = finish(reference)
    assert reference.returncode == 0, log[-3000:]
    out = tmp_path / "elastic"
    elastic = torchrun([*common, "--out", out], max_restarts=1, FREEADV_FAULT_INJECT="1:40")
    log = finish(elastic)
    assert elastic.returncode == 0, log[-5000:]
    assert "FREEADV_FAULT_INJECT: rank 1 kills itself at step 40" in log
    assert f"resumed from {out / 'checkpoint-last.pt'}: pass 1/2, batch 8, step 32" in log, log[-5000:]
    a, b = read_checkpoint(out / "checkpoint-last.pt"), read_checkpoint(tmp_path / "reference" / "checkpoint-last.pt")
    assert a["step"] == b["step"] == 176
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for r in (0, 1):  # and each rank's perturbation buffer
        assert torch.equal(a["ranks"][r]["delta"], b["ranks"][r]["delta"])


def trainer_for_tests(**kw):
    model = small_cnn()
    return FreeAdversarialTrainer(model, sgd(model), replays=2, epsilon=EPS, step_size=STEP, mean=MEAN, std=STD,
                                  **kw)


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = trainer_for_tests()
    x, y = toy_data(n=8)
    path = tmp_path / "ckpt.pt"
    trainer.train_batch(x, y)
    save_checkpoint(path, trainer)
    trainer.train_batch(x, y)
    save_checkpoint(path, trainer)
    assert read_checkpoint(previous_of(path))["step"] == 2 and read_checkpoint(path)["step"] == 4
    good = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    trainer.train_batch(x, y)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, trainer)
    monkeypatch.undo()
    assert path.read_bytes() == good and read_checkpoint(path)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.prev"]  # no temp file left


def test_damaged_checkpoints_are_detected_and_auto_resume_falls_back(tmp_path, capsys):
    out = tmp_path / "run"
    ok = cli("--cpu", "digits", "--epochs", "8", "--config", config_file(tmp_path, eval_every=0), "--out", out)
    assert ok.returncode == 0, ok.stderr
    last = out / "checkpoint-last.pt"
    prev_step = read_checkpoint(previous_of(last))["step"]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted|cannot read"):
        read_checkpoint(last)
    assert find_resumable(last)[0] == previous_of(last)
    resumed = cli("--cpu", "digits", "--epochs", "8", "--config", config_file(tmp_path, eval_every=0), "--out", out,
                  "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping a checkpoint" in resumed.stderr and f"resumed from {previous_of(last)}" in resumed.stderr
    assert prev_step < read_checkpoint(last)["step"]

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(truncated)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo code from a checkpoint ran",))


def test_a_malicious_pickle_inside_a_valid_checksum_is_refused(tmp_path, capfd):
    import hashlib
    inner = io.BytesIO()
    torch.save({"model": Payload()}, inner)
    payload = inner.getvalue()
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(path)
    assert "code from a checkpoint ran" not in capfd.readouterr().out


class NanAt:
    """Float batches in pixel units; batch ``bad`` (every batch after the
    first when None: a first batch with NaN pixels is refused as bad input)
    holds a NaN."""

    def __init__(self, bad=None, batches=6):
        self.x, self.y = toy_data(n=8 * batches)
        self.bad, self.batches = bad, batches

    def __iter__(self):
        for b in range(self.batches):
            x = self.x[8 * b:8 * (b + 1)].float() / 255
            if b == self.bad or self.bad is None and b > 0:
                x[0, 0, 3, 3] = float("nan")
            yield x, self.y[8 * b:8 * (b + 1)]


def test_a_nan_batch_stops_training_before_the_checkpoint_is_overwritten(tmp_path):
    trainer = trainer_for_tests()
    path = tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteError, match="weights became NaN/Inf"):
        trainer.fit(NanAt(bad=3), passes=1, checkpoint_path=path, checkpoint_every=1)
    saved = read_checkpoint(path)
    assert saved["step"] == 3 * 2  # every batch before the NaN one is kept
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_persistent_nan_losses_under_fp16_stop_after_the_configured_streak(tmp_path):
    trainer = trainer_for_tests(precision="fp16", max_bad_steps=3)
    # batches 1-3 of 2 replays each are NaN by the check after batch 3 (below the limit of 3 after batch 1)
    with pytest.raises(NonFiniteError, match="NaN/Inf for 6 optimizer steps in a row"):
        trainer.fit(NanAt(bad=None), passes=1, log_every=2)
    # the scaler skipped every NaN step: the weights stay finite
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

"""The distributed path on CPU with gloo: our launcher and torchrun (two
"nodes" on 127.0.0.1), DDP equal to one process, resume with two processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dist_workers import run
from freeadv_fast import distributed

WORKERS = Path(__file__).parent / "dist_workers.py"


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_model(a, b, exact=False):
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_two_processes_equal_one_on_the_whole_batch_and_resume_exactly(tmp_path):
    single, multi, resumed = tmp_path / "single", tmp_path / "multi", tmp_path / "resumed"
    for d in (single, multi, resumed):
        d.mkdir()
    run("full", str(single))
    assert distributed.launch(run, 2, "full", str(multi)) == 0
    for mode in ("full", "interrupt", "resume"):  # dropout: the ranks' RNG states must be restored too
        assert distributed.launch(run, 2, mode, str(resumed), 0.2) == 0
    # no BatchNorm: the mean loss over the global batch is the mean of the ranks' means, so DDP's averaged
    # gradient is the single-process gradient, and each rank's delta is its half of the single delta
    assert_same_model(load(multi / "model-full.pt"), load(single / "model-full.pt"))
    halves = [load(multi / f"delta-full-rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), load(single / "delta-full-rank0.pt"), atol=1e-6, rtol=0)
    assert not torch.equal(load(resumed / "model-interrupt.pt")["0.weight"], load(resumed / "model-full.pt")["0.weight"])
    assert_same_model(load(resumed / "model-resume.pt"), load(resumed / "model-full.pt"), exact=True)
    for r in (0, 1):
        assert torch.equal(load(resumed / f"delta-resume-rank{r}.pt"), load(resumed / f"delta-full-rank{r}.pt"))


def fails_while_its_peer_hangs(ready: str, status: int):
    """Rank 0 ignores SIGTERM and never returns, like a rank stuck in a collective; rank 1 then exits with
    ``status``."""
    if os.environ["RANK"] == "0":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(ready).touch()
        while True:
            time.sleep(0.1)
    while not Path(ready).exists():
        time.sleep(0.1)
    sys.exit(status)


def test_the_launcher_returns_the_first_failure_and_kills_a_stuck_peer(tmp_path, capfd):
    start = time.monotonic()
    # 2, a user error on rank 1 only: its status, not that of rank 0 which failed after it
    assert distributed.launch(fails_while_its_peer_hangs, 2, str(tmp_path / "ready"), 2, grace_s=1) == 2
    assert time.monotonic() - start < 60
    err = capfd.readouterr().err
    assert "freeadv_fast: rank 0 did not stop within 2 s of rank 1's failure; killed" in err
    assert "rank 1" not in err.replace("rank 1's failure", "")  # status 2: the worker said why itself


def test_torchrun_with_two_nodes_on_localhost(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    run("full", str(single))
    port = str(distributed.free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                               str(WORKERS), "full", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out
    assert_same_model(load(tmp_path / "model-full.pt"), load(single / "model-full.pt"))


def test_a_restarted_round_gets_a_fresh_store_despite_the_previous_rounds_keys(monkeypatch):
    """torchrun keeps its store across restarts; the previous round's announcement (its store's server died with
    it) must be passed over, not connected to, and none of the old keys may be seen."""
    import datetime
    import threading
    import time
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    agent.set(distributed.STORE_KEY, f"{distributed.free_port()} stale")  # round 0's, its server is gone
    timeout = datetime.timedelta(seconds=30)
    got = {}
    follower = threading.Thread(target=lambda: got.update(store=distributed.round_store(1, timeout, probe_s=0.5)))
    follower.start()
    time.sleep(1.0)  # rank 1 meets the stale announcement first
    leader = distributed.round_store(0, timeout)
    follower.join(timeout=30)
    assert not follower.is_alive()
    leader.set("hello", "from rank 0")
    assert got["store"].get("hello") == b"from rank 0"
    assert leader.num_keys() == 2  # nonce and hello: nothing of an earlier round

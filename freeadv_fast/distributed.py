"""One process per device: setup under torchrun or our own launcher, DDP.

Under ``torchrun`` (any number of nodes) the environment names this
process's rank, and each restart round's group gets a fresh store (see
``round_store``); ``launch`` starts N local workers itself with the same
environment (env:// rendezvous), so the training code is identical either way. GPUs use
NCCL; CPU processes (``cpu=True``, how CI tests this path) use gloo.
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
import multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from . import messages


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


class LaunchError(ValueError):
    """The launch environment (torchrun's variables) is incomplete or broken: a user error."""


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun's variables give them,
    checked: a stray RANK left in a shell would otherwise make a silent
    rank 1 of 1 that writes no run files and checks no run directory, and a
    broken one a traceback or a rank waiting for peers that never come."""
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if name in os.environ:
            try:
                values[name] = int(os.environ[name])
            except ValueError:
                raise LaunchError(f"{name}={os.environ[name]!r} in the environment is not an integer") from None
    if ("RANK" in values) != ("WORLD_SIZE" in values):
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in values else ("WORLD_SIZE", "RANK")
        raise LaunchError(f"{have} is set in the environment but {lack} is not (a leftover of another launch?): "
                          f"unset {have}, or launch with torchrun")
    rank, world, local = values.get("RANK", 0), values.get("WORLD_SIZE", 1), values.get("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LaunchError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} in the environment: the world size "
                          "must be 1 or more, the rank in [0, world size) and the local rank 0 or more")
    if world > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in values):
        raise LaunchError(f"WORLD_SIZE={world} but MASTER_ADDR or MASTER_PORT is not set: the processes could not "
                          "find each other (torchrun sets both)")
    return rank, world, local


def setup(cpu: bool = False, timeout_s: float = 600.0) -> Dist:
    """Joins the process group named by the environment (if any) and picks
    this process's device: cuda:LOCAL_RANK, or the CPU when ``cpu`` or
    there is no GPU."""
    rank, world, local = launch_env()
    use_cuda = not cpu and torch.cuda.is_available()
    # FREEADV_SHARE_GPU=1: every local rank on cuda:0 with gloo (NCCL refuses two ranks on one device); how a
    # one-GPU machine tests the multi-process path, never a way to train
    shared = use_cuda and os.environ.get("FREEADV_SHARE_GPU") == "1"
    if use_cuda:
        if local >= torch.cuda.device_count() and not shared:
            raise RuntimeError(f"LOCAL_RANK {local} but this node has only {torch.cuda.device_count()} GPU(s)")
        index = 0 if shared else local
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = round_store(rank, timeout) if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None
        nccl = use_cuda and not shared
        dist.init_process_group("nccl" if nccl else "gloo", timeout=timeout,
                                **({"store": store, "rank": rank, "world_size": world} if store is not None
                                   else {"init_method": "env://"}),
                                **({"device_id": device} if nccl else {}))
    return Dist(rank, world, local, device)


STORE_KEY = "freeadv_fast/process_group_store"


def round_store(rank: int, timeout: datetime.timedelta, probe_s: float = 2.0) -> dist.Store:
    """A fresh key-value store for this round's process group, under torchrun.

    torchrun's agent hosts one store (MASTER_ADDR:MASTER_PORT) for the whole
    job and keeps it across ``--max-restarts`` rounds, so a group built on it
    with ``env://`` reads the previous round's keys: a restarted gloo worker
    connects to the dead worker's address and fails ("Connection refused")
    or hangs until the group timeout. (torch prefixes nothing per round;
    TORCHELASTIC_RESTART_COUNT is per node, so it cannot name the round.)

    Here rank 0 starts a new store on a free port on its node (MASTER_ADDR)
    and announces "PORT NONCE" through the agent's store; the other ranks
    take an announcement only once the store at that port answers with that
    nonce, so a stale one (its server died with the previous round) is
    retried until rank 0's arrives, within ``timeout``."""
    addr, agent_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(addr, agent_port, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(addr, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = uuid.uuid4().hex
        store.set("nonce", nonce)
        agent.set(STORE_KEY, f"{store.port} {nonce}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, nonce = agent.get(STORE_KEY).decode().split()
        try:
            with socket.create_connection((addr, int(port)), timeout=probe_s):  # a dead one: refused, quietly
                pass
            store = dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=probe_s))
            if store.get("nonce").decode() == nonce:
                store.set_timeout(timeout)
                return store
        except (OSError, RuntimeError, ValueError):  # DistStoreError/DistNetworkError: a dead (stale) or foreign port
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: rank 0 announced no reachable process-group store on {addr} "
                               f"within {timeout.total_seconds():.0f} s")
        time.sleep(0.1)


def teardown():
    """Leaves the process group together with the other ranks: a rank that
    destroys its group while a peer still talks to it can abort the peer."""
    if dist.is_initialized():
        try:
            if dist.get_world_size() > 1:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn, nproc: int, port: int, args):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        release_groups()


def release_groups():
    """Frees what still holds a process group (a DDP model in a reference
    cycle) while the interpreter is whole: left to interpreter shutdown, gloo's
    threads are destroyed during finalization and the process can abort with
    "terminate called without an active exception" after its work is done."""
    gc.collect()


def launch(fn, nproc: int, *args, grace_s: float = 60.0) -> int:
    """Runs ``fn(*args)`` in ``nproc`` fresh processes on this machine, with the
    environment torchrun would give them, and returns the exit status of the
    worker that failed first (0 when all succeeded). SIGTERM and SIGINT are
    passed on to the workers, so they can checkpoint; if one worker fails the
    others get ``grace_s`` seconds to notice, are then terminated, and are
    killed after ``grace_s`` more (a rank stuck in a collective ignores
    SIGTERM). ``fn`` must be importable (a module-level function).

    Not torch's elastic_launch: it logs every worker failure, a clean exit 2
    included, with a traceback, so a user error loses its one line; muting its
    loggers also hides a crashed worker's traceback, and it leaves its own
    SIGTERM/SIGINT handlers installed in the caller."""
    if nproc == 1:
        fn(*args)
        return 0
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, fn, nproc, port, args)) for r in range(nproc)]
    for p in procs:
        p.start()

    def forward(signum, frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first = failed_at = None
    killed = set()
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
            if first is None:
                first = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
                failed_at = time.monotonic()
            waited = time.monotonic() - failed_at if first is not None else 0
            for rank, p in enumerate(procs):
                if p.is_alive() and waited > 2 * grace_s:
                    p.kill()
                    killed.add(rank)
                elif p.is_alive() and waited > grace_s:
                    p.terminate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.exitcode for p in procs]
    for rank, code in enumerate(codes):
        if rank in killed:
            msg = f"rank {rank} did not stop within {2 * grace_s:g} s of rank {first}'s failure; killed"
        elif code < 0:
            msg = f"rank {rank} was killed by {signal.Signals(-code).name}"
        elif code not in (0, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM):  # 2: it said why; 130/143: stopped
            msg = f"rank {rank} failed (exit status {code})"
        else:
            continue
        messages.error(f"freeadv_fast: {msg}")
    if first is None:
        return 0
    return codes[first] if codes[first] > 0 else 128 - codes[first]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process died or hung."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "timed out"))


def wrap_model(model: torch.nn.Module, d: Dist, *, sync_batchnorm: bool = False) -> torch.nn.Module:
    """DistributedDataParallel over the process group (the model unchanged when
    there is one process)."""
    if not d.distributed:
        return model
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (a list of one when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(make):
    """``make()`` run on rank 0 only and its result given to every rank (an
    exception on rank 0 is raised on every rank, so none is left waiting)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except Exception as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t

"""Where and how a benchmark result was measured: device, versions, commit, command, date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def version(name: str):
    try:
        return __import__(name).__version__
    except Exception:
        return None


def driver():
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       text=True).strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def git_commit():
    # a copy of the tree run elsewhere (the GPU machine) may carry a stale .git: the caller then names the commit
    if os.environ.get("FREEADV_GIT_COMMIT"):
        return os.environ["FREEADV_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(device: torch.device) -> dict:
    """The fields every results file carries."""
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": version("triton"), "cuda": torch.version.cuda,
            "driver": driver() if device.type == "cuda" else None, "git_commit": git_commit(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

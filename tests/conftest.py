import os
import tarfile
from pathlib import Path

import pytest
import torch

# Triton decides at import whether to interpret, so this must come before
# freeadv_fast (and its Triton kernels) is imported anywhere in the tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# GPU cases are collected on every machine so a CPU run lists them as skipped
GPU_BACKENDS_WITHOUT_GPU = ("cuda", "triton", "torch")


def backend_params(skip_interpreted_triton=False):
    """pytest params (device, backend) for every backend of every device;
    the CUDA ones carry the gpu mark."""
    import freeadv_fast.ops as ops
    for backend in ops.available_backends("cpu"):
        if not (skip_interpreted_triton and backend == "triton"):
            yield pytest.param("cpu", backend, id=f"cpu-{backend}")
    gpu_backends = ops.available_backends("cuda") if torch.cuda.is_available() else GPU_BACKENDS_WITHOUT_GPU
    for backend in gpu_backends:
        yield pytest.param("cuda", backend, id=f"cuda-{backend}", marks=pytest.mark.gpu)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SHARED_DATASETS = Path(os.environ.get("FREEADV_SHARED_DATASETS",
                                      Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))


def extracted(tmp_path_factory, tarball: str) -> Path:
    """The folder a shared dataset archive was unpacked into (once per session);
    skips the test when ../shared/datasets (or $FREEADV_SHARED_DATASETS) lacks it."""
    archive = SHARED_DATASETS / tarball
    if not archive.is_file():
        pytest.skip(f"real data not here: {archive} (the project's ../shared/datasets)")
    target = tmp_path_factory.getbasetemp() / tarball.split(".")[0]
    if not target.exists():
        tmp = target.with_name(target.name + ".partial")
        tmp.mkdir()
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory):
    return extracted(tmp_path_factory, "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="session")
def tiny_imagenet_20(tmp_path_factory):
    return extracted(tmp_path_factory, "tiny-imagenet-20.tar.gz") / "tiny-imagenet-20"

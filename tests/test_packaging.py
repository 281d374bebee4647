"""The build and install paths: no extension, pure-Python install, arch checks."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURELIB = sysconfig.get_paths()["purelib"]


def run_python(code, cwd, env=None, flags=()):
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def package_without_the_extension(tmp_path) -> Path:
    """The checkout's package copied without its _C*.so (kernels/ where an
    install puts it): a folder for PYTHONPATH."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "freeadv_fast", site / "freeadv_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    shutil.copytree(ROOT / "kernels", site / "freeadv_fast" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def run_without_the_checkout(code, site, cwd, env=None):
    # -S: no .pth files, so no editable install of the checkout either
    return run_python(code, cwd, flags=["-S"], env={"PYTHONPATH": os.pathsep.join([str(site), PURELIB]),
                                                    "TRITON_INTERPRET": "0", **(env or {})})


def test_without_the_extension_the_torch_backend_works_and_it_is_said_once_plainly(tmp_path):
    site = package_without_the_extension(tmp_path)
    result = run_without_the_checkout("""
        import torch
        import freeadv_fast
        import freeadv_fast.ops as ops
        print(freeadv_fast.__file__)
        print(ops.available_backends("cpu"))
        x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        delta = torch.zeros(2, 3, 4, 4)
        out = ops.make_input(x, delta, mean=0.5, std=0.25)
        print(out.shape)
        try:
            ops.make_input(x, delta, mean=0.5, std=0.25, backend="cpp")
        except ops.BackendUnavailableError as e:
            print("error:", e)
    """, site, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1] == "['torch']"
    assert "torch.Size([2, 3, 4, 4])" in result.stdout
    missing = f"is not built/installed (no _C*.so in {site / 'freeadv_fast'})"
    assert f"error: backend 'cpp' is not available for cpu tensors: the compiled extension freeadv_fast._C {missing}" \
        in result.stdout
    warning = (f"freeadv_fast: the compiled extension freeadv_fast._C {missing}; using the torch and triton "
               "backends. Build it with `make env` in a checkout, or `pip install --no-build-isolation .`")
    assert warning in result.stderr and result.stderr.count("compiled extension") == 1
    assert "circular import" not in result.stderr


def test_an_extension_that_is_there_but_does_not_load_keeps_its_error(tmp_path):
    site = package_without_the_extension(tmp_path)
    so = site / "freeadv_fast" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    so.write_bytes(b"not an ELF file")  # stands in for an undefined symbol or a missing library
    result = run_without_the_checkout("import freeadv_fast.ops as ops; print(ops.available_backends('cpu'))",
                                      site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "['torch']" in result.stdout
    assert f"the compiled extension freeadv_fast._C failed to load from {so} (ImportError: " in result.stderr
    assert "Rebuild it against the installed torch" in result.stderr
    assert result.stderr.count("compiled extension") == 1


def test_pure_python_install_with_freeadv_no_ext(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "FREEADV_NO_EXT": "1"})
    assert build.returncode == 0, build.stderr
    assert not list(target.glob("freeadv_fast/_C*.so"))
    assert (target / "freeadv_fast" / "kernels" / "triton_perturb.py").exists()
    result = run_python("""
        import freeadv_fast, freeadv_fast.ops as ops
        print(freeadv_fast.__file__)
        print(ops.available_backends("cpu"))
    """, cwd=tmp_path, flags=["-S"],  # -S: no .pth files, so no editable install of the checkout either
                        env={"PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
                             "FREEADV_NO_EXT": "1", "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout
    assert "['torch']" in result.stdout
    assert ("the compiled extension freeadv_fast._C is not built: this is a pure-Python install (FREEADV_NO_EXT=1)"
            in result.stderr)


@pytest.mark.skipif(not shutil.which("nvcc") and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="no CUDA toolkit on this machine")
def test_an_arch_the_toolkit_cannot_build_is_refused_with_a_hint(tmp_path):
    nvcc_version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    if "release 13." not in nvcc_version:
        pytest.skip("the sm_60 refusal is specific to CUDA 13")
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TORCH_CUDA_ARCH_LIST": "6.0"})
    assert result.returncode != 0
    assert "sm_60" in result.stderr and "CUDA 12 toolkit" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_sdist_holds_every_file_a_build_needs_whatever_this_machine_found(tmp_path):
    """The sdist held only the sources setup.py configured on the machine
    that made it: never csrc/perturb.h (a build of it stopped at 'perturb.h:
    No such file'), CMakeLists.txt or the tests' helpers; with FREEADV_NO_EXT=1
    no C++ at all, and without nvcc no kernels/perturb.cu."""
    import tarfile
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = [f for f in tracked.stdout.splitlines() if (ROOT / f).is_file()]
    need = {f for f in files
            if f.startswith(("csrc/", "kernels/", "tests/", "freeadv_fast/"))
            or f in ("CMakeLists.txt", "Makefile", "setup.py", "pyproject.toml", "README.md")}
    for flag in ("FREEADV_NO_EXT", "FREEADV_NO_CUDA"):  # no extension; a CPU-only one (as where no nvcc is)
        src, out = tmp_path / flag / "src", tmp_path / flag / "dist"
        for f in files:  # a copy without build outputs (an old egg-info's SOURCES.txt would fill the gaps)
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
        made = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=src,
                              capture_output=True, text=True, timeout=120, env={**os.environ, flag: "1"})
        assert made.returncode == 0, made.stderr
        with tarfile.open(next(out.glob("*.tar.gz"))) as tar:
            held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        assert not need - held, f"{flag}=1: the sdist lacks {sorted(need - held)}"
        assert not [f for f in held if f.endswith((".so", ".pyc"))], "build outputs in the sdist"

"""Build of freeadv_fast and its one compiled extension, freeadv_fast._C.

* nvcc found (CUDA_HOME or PATH): a CUDA extension, CPU + CUDA code.
* otherwise, or FREEADV_NO_CUDA=1: a CPU-only C++ extension.
* FREEADV_NO_EXT=1: no extension at all (torch and Triton backends only).

CUDA architectures come from TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX"); by default
every architecture the toolkit supports from sm_75 up, plus PTX of the newest.
The extension needs torch at build time, so build with
``pip install --no-build-isolation .`` (or ``pip wheel --no-build-isolation``).
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get("FREEADV_NO_EXT", "0") == "1"
MIN_DEFAULT_ARCH = 75


def fail(message):
    sys.exit(f"\nfreeadv_fast build error: {message}\n")


def find_nvcc():
    """nvcc of the CUDA toolkit to build with, or None for a CPU-only build.

    The toolkit root is CUDA_HOME, else torch's guess, else /usr/local/cuda;
    it must hold bin/nvcc and include/cuda_runtime.h (an nvcc wrapper script
    in /usr/local/bin makes torch guess /usr/local, which is not a toolkit).
    """
    if os.environ.get("FREEADV_NO_CUDA", "0") == "1":
        return None
    from torch.utils import cpp_extension

    def is_toolkit(root):
        return root and all(os.path.exists(os.path.join(root, p)) for p in ("bin/nvcc", "include/cuda_runtime.h"))

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit and not is_toolkit(explicit):
        fail(f"CUDA_HOME={explicit} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h); point it at "
             "the toolkit root whose lib64 holds libcudart.so, or set FREEADV_NO_CUDA=1 for a CPU-only build")
    for root in (explicit, cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if is_toolkit(root):
            root = os.path.realpath(root)
            cpp_extension.CUDA_HOME = root  # what CUDAExtension compiles and links against
            os.environ["CUDA_HOME"] = root
            return os.path.join(root, "bin", "nvcc")
    return None


def toolkit(nvcc):
    """(CUDA version string, set of sm numbers this nvcc can build)."""
    version = re.search(r"release (\d+\.\d+)", subprocess.check_output([nvcc, "--version"], text=True)).group(1)
    listing = subprocess.check_output([nvcc, "--list-gpu-arch"], text=True)
    return version, {int(n) for n in re.findall(r"compute_(\d+)\b", listing)}


def cuda_archs(nvcc):
    """The -gencode flags and the list of sm numbers, from TORCH_CUDA_ARCH_LIST or the default."""
    version, supported = toolkit(nvcc)
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if requested:
        archs, ptx = [], set()
        for item in re.split(r"[;,\s]+", requested):
            m = re.fullmatch(r"(?:sm_)?(\d+)\.?(\d)?([af]?)(\+PTX)?", item, re.IGNORECASE)
            if not m:
                fail(f"cannot read {item!r} in TORCH_CUDA_ARCH_LIST (write e.g. \"8.0;9.0+PTX\")")
            sm = int(m.group(1) + (m.group(2) or ""))
            if sm not in supported:
                hint = ("CUDA 13 dropped Maxwell, Pascal and Volta (sm_50-sm_72): for a P100 (sm_60) or V100 "
                        "build with a CUDA 12 toolkit, e.g. CUDA_HOME=/usr/local/cuda-12.8 and a CUDA 12 build of "
                        "torch" if sm < 75 else "use a toolkit that supports it")
                fail(f"TORCH_CUDA_ARCH_LIST asks for sm_{sm}, which nvcc {version} at {nvcc} cannot build "
                     f"(it builds sm_{min(supported)} to sm_{max(supported)}); {hint}.")
            archs.append((sm, m.group(3).lower()))
            if m.group(4):
                ptx.add(sm)
    else:
        archs = [(sm, "") for sm in sorted(supported) if sm >= MIN_DEFAULT_ARCH]
        ptx = {archs[-1][0]}
    flags = []
    for sm, suffix in archs:
        flags.append(f"-gencode=arch=compute_{sm}{suffix},code=sm_{sm}{suffix}")
        if sm in ptx:
            flags.append(f"-gencode=arch=compute_{sm}{suffix},code=compute_{sm}{suffix}")
    return version, flags, sorted({sm for sm, _ in archs})


def extensions():
    if NO_EXT:
        print("freeadv_fast: FREEADV_NO_EXT=1, building without the compiled extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        fail("building the extension needs torch installed in the build environment: use "
             "`pip install --no-build-isolation .` (or set FREEADV_NO_EXT=1 for a pure-Python install)")
    sources = ["csrc/ops.cpp", "csrc/perturb_cpu.cpp", "csrc/module.cpp"]
    cxx = ["-O3"]  # the -std= torch needs is added by BuildExtension
    nvcc = find_nvcc()
    if nvcc is None:
        print("freeadv_fast: no nvcc found (CUDA_HOME), building the CPU-only extension")
        ext = CppExtension("freeadv_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           depends=["csrc/perturb.h"], extra_compile_args={"cxx": cxx})
    else:
        version, gencode, archs = cuda_archs(nvcc)
        print(f"freeadv_fast: building the CUDA extension with nvcc {version} for "
              + ", ".join(f"sm_{a}" for a in archs))
        defines = ["-DFREEADV_WITH_CUDA", f"-DFREEADV_CUDA_ARCHS={'_'.join(map(str, archs))}"]
        threads = str(min(4, os.cpu_count() or 1))
        # kernel tuning knobs (-DFREEADV_X_PACK_BYTES=..., see kernels/perturb.cu); for measuring, not shipping
        tuning = [f for f in os.environ.get("FREEADV_KERNEL_FLAGS", "").split() if f.startswith("-DFREEADV_")]
        ext = CUDAExtension("freeadv_fast._C", sources + ["kernels/perturb.cu"],
                            include_dirs=[os.path.join(ROOT, "csrc")], depends=["csrc/perturb.h"],
                            extra_compile_args={"cxx": cxx + defines,
                                                "nvcc": ["-O3", "--threads", threads] + defines + tuning
                                                + gencode})
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())

    class BuildExt(base):
        """Objects in one folder for every build: the editable install (which setuptools would compile
        in a temporary folder) and a later `pip wheel .` share them, and ninja recompiles only what
        changed, its command line included (CI's wheel no longer compiles the kernels again: 3 minutes
        on 2 cores)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "ext")

    return [ext], {"build_ext": BuildExt}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["freeadv_fast", "freeadv_fast.*"]) + ["freeadv_fast.kernels"],
    package_dir={"freeadv_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

# freeadv_fast -- quickstart: `make demo` and `make test`. Every target
# bootstraps .venv once; running it again does not reinstall anything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch this project is developed and tested against; the package itself
# accepts any torch >= 2.6 (pyproject.toml).
TORCH_PIN ?= torch==2.14.1
# A CUDA toolkit (CUDA_HOME, the nvcc on the PATH, or /usr/local/cuda) gives
# the CUDA extension, else a CPU one. The root is the folder whose lib64 holds
# libcudart.so; an nvcc wrapper script on the PATH is looked through.
ifeq ($(CUDA_HOME),)
CUDA_HOME := $(shell for d in "$$(dirname "$$(command -v nvcc 2>/dev/null)")/.." /usr/local/cuda; do \
	[ -e "$$d/lib64/libcudart.so" ] && [ -x "$$d/bin/nvcc" ] && { cd "$$d" && pwd -P; break; }; done)
endif
export CUDA_HOME
NVCC := $(if $(CUDA_HOME),$(CUDA_HOME)/bin/nvcc,)
EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h kernels/*.cu)

.PHONY: env demo test test-gpu gpu-check wheel cmake-test bench-kernels clean

$(VENV)/.deps: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)" setuptools wheel ninja pybind11
	@touch $@

$(VENV)/.built: $(VENV)/.deps $(EXT_SOURCES)
	@echo "== building freeadv_fast._C$(if $(CUDA_HOME), with CUDA from $(CUDA_HOME),) (minutes on 2 cores: with CUDA, nvcc builds the kernels for every architecture it has)"
	@$(PY) -m pip install -q --no-build-isolation -e ".[dev,dali]" || { \
		echo "== the build failed (above). Disk, memory and the kernel log, then one serial retry (MAX_JOBS=1):"; \
		df -h . "$${TMPDIR:-/tmp}"; free -m; dmesg 2>/dev/null | tail -n 5; \
		MAX_JOBS=1 $(PY) -m pip install --no-build-isolation -e ".[dev,dali]"; }
	@touch $@

## env: the virtual environment with the package and its compiled extension
env: $(VENV)/.built

## demo: the embedded default -- natural vs free training on scikit-learn's
## digits, then PGD on both (under a minute on 2 CPU cores)
demo: env
	$(PY) -m freeadv_fast.train $(DEMO_ARGS)

## test: build, then the whole test suite (GPU tests are skipped without a GPU)
test: env
	$(PY) -m pytest

## test-gpu: the GPU-marked tests; uses a system python whose torch sees a GPU
## (building the extension against it), else .venv
test-gpu:
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "== using $(PYTHON) (torch with CUDA)"; \
		$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e . && $(PYTHON) -m pytest -m gpu; \
	else \
		$(MAKE) env && $(PY) -m pytest -m gpu; \
	fi

## gpu-check: every GPU check in one command, kept to GPU_CHECK_BUDGET (480 s; what does not fit is listed):
## build for this GPU, GPU tests, kernel and train-step benchmarks; writes
## bench/results/*-<gpu>.json and bench/results/gpu-check-<gpu>/ (logs). Uses
## the system python, whose torch must see a GPU.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

## wheel: dist/freeadv_fast-*.whl with the compiled extension inside
wheel: env
	$(PY) -m pip wheel . --no-build-isolation --no-deps -w dist

## cmake-test: the standalone CMake build against libtorch, and its CTest
cmake-test: env
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-Dpybind11_DIR="$$($(PY) -m pybind11 --cmakedir)" -DPython_EXECUTABLE=$(abspath $(PY)) \
		$(if $(NVCC),-DCMAKE_CUDA_COMPILER=$(NVCC) -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME),-DFREEADV_CUDA=OFF)
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

## bench-kernels: the fused-kernel microbenchmark on this machine's device
bench-kernels: env
	$(PY) bench/kernels.py

clean:
	rm -rf build dist *.egg-info freeadv_fast/_C*.so

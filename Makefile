# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The venv sees the system site-packages so that a GPU machine reuses its preinstalled CUDA torch and triton;
# torch and triton are installed only when none is importable.
PYTHON ?= python3
VENV ?= .venv
# A python3 that is itself a venv holding torch (a GPU image's, say) is used as it is: a venv made from it
# would see the base interpreter's packages, not its own.
IN_TORCH_VENV := $(shell $(PYTHON) -c "import sys, torch; print(int(sys.prefix != sys.base_prefix))" 2>/dev/null)
ifeq ($(IN_TORCH_VENV),1)
PY := $(PYTHON)
else
PY := $(VENV)/bin/python
endif
# A CPU build of torch keeps a cold set-up small; set TORCH_SPEC to pick another build.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.6
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)
# What the demo needs besides torch: tqdm and matplotlib (pyproject's dependencies and `demo` extra), and
# ninja to build ampclip._C. What the tests need on top (pyproject's `test` extra; zclip and timm come
# without their dependencies, below). Both are installed next to the torch that is there, pinned to its exact
# version as pip knows it (a CUDA wheel from PyPI is 2.14.1 to pip and 2.14.1+cu130 to torch.__version__):
# no framework may swap it. `make demo` installs the first list only: the second brings transformers,
# lightning and their dependencies, gigabytes the demo does not use.
DEMO_DEPS := ninja tqdm matplotlib
DEMO_IMPORTS := ninja, tqdm, matplotlib
TEST_DEPS := "pytest>=8" numpy hypothesis pytest-benchmark tensorboard \
	"transformers>=5,<6" "accelerate>=1,<2" "lightning>=2,<3"
TEST_IMPORTS := pytest, numpy, hypothesis, pytest_benchmark, tensorboard, transformers, accelerate, lightning
TORCH_PIN = $$($(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))")

.PHONY: setup demo test test-gpu cuda-check bench bench-host env clean

setup: $(VENV)/.built $(VENV)/.test-deps

$(VENV)/.deps: Makefile
	mkdir -p $(VENV)
	$(PY) -c "import sys" 2>/dev/null || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import $(DEMO_IMPORTS)" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN) $(DEMO_DEPS)
	touch $@

# triton for the Triton backend's tests (on CPU tensors under TRITON_INTERPRET=1; a CUDA build of torch
# brings its own). The baselines of the adaptive-clipping parity tests, without their dependencies: zclip
# needs torch only, and timm's agc.py too (timm's torchvision wheel may not load beside this torch). Tests
# skip without them. The integration tests also run against accelerate 1.15 (in build/, no dependencies): it
# clips through torch's clip_grad_norm_, where 1.16 and newer call get_total_norm and clip_grads_with_norm_.
$(VENV)/.test-deps: $(VENV)/.deps
	$(PY) -c "import $(TEST_IMPORTS)" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN) $(TEST_DEPS)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)" || \
		echo "triton unavailable: the Triton backend is skipped"
	$(PY) -c "import zclip" 2>/dev/null || $(PY) -m pip install -q --no-deps zclip || \
		echo "zclip unavailable: the ZClip parity tests are skipped"
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('timm') is None)" || \
		$(PY) -m pip install -q --no-deps timm || echo "timm unavailable: the AGC parity tests are skipped"
	test -d build/accelerate-1.15 || $(PY) -m pip install -q --target build/accelerate-1.15 --no-deps \
		"accelerate==1.15.0" || echo "accelerate 1.15 unavailable: its integration run is skipped"
	touch $@

# AMPCLIP_STRICT_BUILD=1: a kernel that no longer compiles fails here, instead of installing without it
# (which a plain pip install does) and skipping its tests.
$(VENV)/.built: $(VENV)/.deps pyproject.toml setup.py $(EXT_SOURCES)
	AMPCLIP_STRICT_BUILD=1 $(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

demo: $(VENV)/.built
	$(PY) -m ampclip demo

test: setup
	$(PY) -m pytest -q

# The GPU suite runs the Triton kernels compiled: tests/conftest.py turns the interpreter on unless told.
test-gpu: setup
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu

# The compiled entries under a second Python, 3.12 (where bad input once crashed the process): a venv of its
# own with torch (for 3.12 pip takes PyPI's CUDA wheel; only its CPU part runs), the extension built without its
# CUDA kernels in a copy of the sources under build/ (the main venv's in-place build stays as it is), then the
# entry tests and the bad-input tests of every layer.
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
VENV312 ?= .venv312
COPY312 := build/py312
ENTRY_TESTS := tests/test_compiled_entries.py tests/test_tensor_kinds.py tests/test_extreme_norms.py \
	tests/test_backends.py tests/test_faults.py tests/test_unitwise_ops.py tests/test_functional.py
.PHONY: test-py312
test-py312:
	@test -n "$(PY312)" || { echo "test-py312 needs a python3.12 (set PY312=/path/to/python3.12)"; exit 1; }
	$(PY312) -c "import sys" && { test -x $(VENV312)/bin/python || $(PY312) -m venv $(VENV312); }
	$(VENV312)/bin/python -c "import torch, pytest, numpy, hypothesis" 2>/dev/null || \
		$(VENV312)/bin/python -m pip install -q "$(TORCH_SPEC)" pytest numpy hypothesis
	rm -rf $(COPY312) && mkdir -p $(COPY312)
	tar --exclude=./build --exclude='./.venv*' --exclude=./.git --exclude='*.so' -cf - . | tar -xf - -C $(COPY312)
	cd $(COPY312) && AMPCLIP_SKIP_CUDA_BUILD=1 AMPCLIP_STRICT_BUILD=1 \
		$(abspath $(VENV312))/bin/python -m pip install -q -e . --no-build-isolation --no-deps
	cd $(COPY312) && $(abspath $(VENV312))/bin/python -m pytest -q -p no:cacheprovider $(ENTRY_TESTS) \
		-k "entries or kinds or extreme or bad or refused or rejected or expanded"

# Compile proof of every GPU kernel without a GPU:
# * the CUDA C++ kernels: nvcc builds csrc/cuda/*.cu for sm_80 and sm_90 against torch's headers, prints
#   registers / shared memory / spills per kernel and fails on any warning or spill (scripts/cuda_check.py;
#   needs nvcc and a python with torch, not the built package);
# * the Triton kernels: every specialisation the triton backend can launch, compiled to cubins for sm_80 and
#   sm_90 by Triton's own ptxas (scripts/triton_check.py), with the venv's triton, and with the oldest one
#   supported, TRITON_MIN_SPEC, installed into $(TRITON_MIN_DIR) (pip --target, no dependencies), for
#   TRITON_MIN_ARCHS: sm_90, the GPU that runs it here (an H200), which keeps CI's wall time in bounds;
#   TRITON_MIN_ARCHS=80,90 compiles both.
TRITON_MIN_SPEC ?= triton==3.6.0
TRITON_MIN_DIR ?= build/$(subst ==,-,$(TRITON_MIN_SPEC))
TRITON_MIN_ARCHS ?= 90

$(TRITON_MIN_DIR)/.installed:
	$(PY) -m pip install -q --target $(TRITON_MIN_DIR) --no-deps "$(TRITON_MIN_SPEC)"
	touch $@

cuda-check: $(TRITON_MIN_DIR)/.installed
	@$(PY) -c "import torch, triton" 2>/dev/null || { echo "cuda-check needs a python with torch and triton: run make setup, or pass PYTHON=/path/to/venv/bin/python"; exit 1; }
	$(PY) scripts/cuda_check.py
	$(PY) scripts/triton_check.py
	PYTHONPATH=$(abspath $(TRITON_MIN_DIR)) $(PY) scripts/triton_check.py --arch $(TRITON_MIN_ARCHS)

# BENCH_RUNS runs of the harness (pytest-benchmark), then the report: ratios inside each run, medians over runs.
BENCH_RUNS ?= 3
BENCH_ARGS ?=
BENCH_OUT ?= benchmarks/results/$(shell date +%Y-%m-%d)

bench: setup
	mkdir -p $(BENCH_OUT)
	for i in $$(seq 1 $(BENCH_RUNS)); do \
		$(PY) -m pytest benchmarks -p no:cacheprovider -v --benchmark-json=$(BENCH_OUT)/run-$$i.json $(BENCH_ARGS) \
			|| exit 1; \
	done
	$(PY) -m benchmarks.report $(BENCH_OUT)/run-*.json --out $(BENCH_OUT) --docs docs/benchmarks.md

# The host path of a clip (benchmarks/test_host_path.py): the cost per gradient of FusedClipper.clip_, the drop-in
# and a scaler step beside [p.grad for p in params]; on a CPU with the Triton launches replaced by no-ops.
bench-host: setup
	mkdir -p $(BENCH_OUT)
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks/test_host_path.py -p no:cacheprovider -q -s \
		--benchmark-json=$(BENCH_OUT)/host-path.json | tee $(BENCH_OUT)/host-path.txt

env: $(VENV)/.built
	$(PY) -m ampclip env

clean:
	rm -rf build *.egg-info ampclip/*.so $(VENV)

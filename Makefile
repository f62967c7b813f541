# `make test` and `make demo` work on a fresh machine: each creates .venv, installs torch
# (the CPU build TORCH_VERSION unless the venv already has a torch), builds nflux against it
# and runs. Override PYTHON, VENV or TORCH_VERSION on the command line.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: test demo install cuda-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q "pybind11>=2.12" "scikit-build-core>=0.10" ninja "cmake>=3.18" numpy pytest "safetensors>=0.4" "scikit-learn>=1.1" matplotlib
	$(BIN)/pip install -q --no-build-isolation -e .

test: install cuda-check
	$(BIN)/python -m pytest -q tests

# Every CUDA source must compile with the machine's nvcc even where no GPU (or CUDA torch) is.
cuda-check:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/cuda/*.cu >/dev/null 2>&1; then \
	  mkdir -p .nvcc-check && for f in csrc/cuda/*.cu; do \
	    echo "nvcc $$f (sm_80, sm_90)"; \
	    nvcc -std=c++17 -O2 -I csrc/include $(CUDA_ARCHS) -c $$f -o .nvcc-check/$$(basename $$f).o || exit 1; \
	  done; \
	else echo "cuda-check: no nvcc or no .cu files, skipped"; fi

# The main job: train the default flow (NSF) on the embedded two-moons data; writes config,
# checkpoints, metrics.jsonl, metrics.json (test NLL), samples.png and loss.png to runs/demo.
demo: install
	$(BIN)/nflux train nsf --data moons --out runs/demo

bench: install
	$(BIN)/pip install -q zuko==1.6.0 && $(BIN)/pip install -q --no-deps nflows==0.14
	$(BIN)/python benchmarks/bench_rq_spline.py

clean:
	rm -rf build .nvcc-check runs

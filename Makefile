# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ddgpipe demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check ddgpipe tests
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check ddgpipe tests

bench: $(STAMP)
	$(BIN)/ddgpipe bench --model resnet20 --batch-size 128 --stages 2 --steps 30 --out runs/bench

clean:
	rm -rf $(VENV) runs

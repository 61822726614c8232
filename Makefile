# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test` (every test, lint included).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Which torch build to install. The default is the CPU wheel that lies on this machine kind's disk.
# On a CUDA cluster, e.g.: make install TORCH_SPEC='torch==2.13.0' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

DATA ?= $(if $(wildcard ../shared/data/ucm-captions/dataset.json),../shared/data/ucm-captions,)
STORE ?= ./store
OUT ?= ./demo-out
EPOCHS ?= 3
PYTEST_ARGS ?=
# Two pytest workers: most of the suite waits on processes starting (Ray, Prefect, interpreters), so two share
# two cores well. Each worker may start its own two-node Ray cluster (tests/conftest.py). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
# torch's OpenMP threads spin at barriers by default; on a shared or oversubscribed CPU (Ray workers, loaders,
# CI) that costs ~10x per training step. Passive waiting is the right default everywhere we run.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test lint demo bench describe clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# pip byte-compiles what it installs (half the install time). Keep it: with PYTHONDONTWRITEBYTECODE set (as
# on this machine kind) Python never writes .pyc files itself, so without them every process - each Ray worker,
# each CLI run - compiles torch, ray and prefect from source again (the suite took 26 instead of 18 minutes).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC) $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

describe: install
	$(BIN)/ssjdn data describe $(or $(DATA),../shared/data/ucm-captions)

demo: install
	$(BIN)/ssjdn demo $(if $(DATA),--data $(DATA),) --store $(STORE) --out $(OUT) --epochs $(EPOCHS)

bench: install
	$(BIN)/python -m benchmarks.run_all --out bench-out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

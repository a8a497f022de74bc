# tec-pipeline: set-up, tests, reproduction, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEC := $(VENV)/bin/tec
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: install test test-fast lint fashion-mnist clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed fashion-mnist

# The embedded default data set is Debian's dataset-fashion-mnist (IDX files).
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing at $(FMNIST_DIR): install the Debian package dataset-fashion-mnist as root," \
		     "or pass FMNIST_DIR=/dir/with/idx.gz files"; exit 1; \
	fi

# Tests run on TEST_WORKERS pytest-xdist processes, each with one compute thread (tests/conftest.py); worksteal
# rebalances when one worker's share runs long. 3 on 2 cores: many tests wait on the processes they start (torch
# imports, torchrun, dask, moto), and a third worker fills those waits (measured 10 min 12 s against 11 min 11 s
# for 2 workers and 18 min for 1). TEST_WORKERS=0 runs them in-process.
TEST_WORKERS ?= 3
PYTEST_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

test: install
	$(PY) -m pytest -q tests $(PYTEST_XDIST) --durations=15

test-fast: install
	$(PY) -m pytest -q tests -m "not slow" $(PYTEST_XDIST)

lint: install
	$(VENV)/bin/ruff check tec_pipeline stages cli.py tests

clean:
	rm -rf $(VENV) runs
include recipes.mk
include reproduce.mk
include study.mk

# Benchmarks (README "Performance"): cached vs online stage 2, stage 1 vs a bare forward, codecs, attention
# targets, stage-2 memory. On a GPU: make bench BENCH_PRESET=base BENCH_ARGS="--device cuda".
BENCH_PRESET ?= tiny
BENCH_ARGS ?=
BENCH_JSON ?= runs/bench/bench.json
.PHONY: bench
bench: install
	$(TEC) bench --preset $(BENCH_PRESET) $(BENCH_ARGS) --json $(BENCH_JSON)

# One unattended GPU run (≤ 8 min on one GPU): stage-1 bare vs end-to-end at preset base, bf16 vs fp32 targets,
# cached vs online stage 2, into one JSON file.
GPU_CHECK_JSON ?= runs/gpu-check.json
.PHONY: gpu-check
gpu-check: install
	timeout 480 $(PY) -m tec_pipeline.bench.gpu_check --device cuda --out $(GPU_CHECK_JSON)

# tec-pipeline: set-up, tests, reproduction, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEC := $(VENV)/bin/tec
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: install test lint fashion-mnist clean

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

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check tec_pipeline stages cli.py tests

clean:
	rm -rf $(VENV) runs
include recipes.mk
include reproduce.mk

# Two commands that work on a fresh machine: `make run` and `make test`.
# Both create .venv and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/mnist.yaml
DATA ?= ../shared/data
ARGS ?=

.PHONY: run test lint install clean

$(BIN)/fl-lightning: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned to the builds this machine holds on disk (no multi-GB download)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/fl-lightning

run: install
	$(BIN)/fl-lightning run $(CONFIG) data.root=$(DATA) $(ARGS)

test: install
	$(BIN)/ruff check fl_lightning tests benchmarks
	$(BIN)/mypy fl_lightning
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check fl_lightning tests benchmarks
	$(BIN)/ruff format --check fl_lightning tests benchmarks
	$(BIN)/mypy fl_lightning

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

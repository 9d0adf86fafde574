# The two commands a newcomer needs: `make demo` and `make test`.
# TORCH pins the torch build installed before the project (pip would otherwise pick its own).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/selma run --config tiny --run-dir runs/demo

test: setup
	$(BIN)/python -m pytest

clean-runs:
	rm -rf runs/

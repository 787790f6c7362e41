# Two entry points, each sets itself up on a fresh machine:
#   make demo   runs the main job (python -m mope.demo: MoPE vs equal-size LoRA on the real MiniLM)
#   make test   runs ruff and the test suite
# torch is installed first, pinned, so that no CUDA build is pulled in on a CPU machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mope.demo

lint: $(STAMP)
	$(BIN)/ruff check mope tests examples benchmarks
	$(BIN)/ruff format --check mope tests examples benchmarks

test: lint
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

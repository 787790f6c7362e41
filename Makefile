# Two entry points, each sets itself up on a fresh machine:
#   make demo   runs the main job (python -m mope.demo: MoPE vs equal-size LoRA on the real MiniLM)
#   make test   runs ruff, the docs build (warnings are errors) and the whole test suite (what CI runs)
#   make test-fast  the tests not marked slow (the slow ones start a subprocess: accelerate/DDP runs,
#               examples and benchmarks as scripts), i.e. .venv/bin/python -m pytest -n 2 -q -m "not slow"
#               (see tests/README.md)
#   make docs   builds the docs site into site/ (preview: .venv/bin/mkdocs serve)
#   make bench  runs the speed benchmarks (run alone: training step, memory, inference, layer loops,
#               soft merging; ~16 min)
# torch is installed first, pinned, so that no CUDA build is pulled in on a CPU machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint docs bench setup clean

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
	$(BIN)/ruff check mope tests examples benchmarks docs/_ext
	$(BIN)/ruff format --check mope tests examples benchmarks docs/_ext

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/inference_time.py
	$(BIN)/python benchmarks/layer_time.py
	$(BIN)/python benchmarks/soft_merge.py

test: lint docs
	$(BIN)/python -m pytest -n 2 -q

.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site

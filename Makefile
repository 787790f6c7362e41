# Two entry points, each sets itself up on a fresh machine:
#   make demo   runs the main job (python -m mope.demo: MoPE vs equal-size LoRA on the real MiniLM)
#   make test   runs ruff, the docs build (warnings are errors) and the whole test suite (what CI runs)
#   make test-fast  the tests not marked slow (the slow ones start a subprocess: accelerate/DDP runs,
#               examples and benchmarks as scripts), i.e. .venv/bin/python -m pytest -n 2 -q -m "not slow"
#               (see tests/README.md)
#   make test-oldest  runs the core tests in a fresh .venv-oldest that has only the core dependencies
#               (no extras), pinned to the lowest supported versions (.ci/oldest-constraints.txt)
#   make docs   builds the docs site into site/ (preview: .venv/bin/mkdocs serve)
#   make bench  runs the speed benchmarks (run alone: training step, memory, inference, layer loops,
#               soft merging; ~16 min)
# torch is installed first, pinned, so nothing else pulls in another torch (this project's machines serve its CPU wheel).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

# The lowest supported versions: a fresh venv with the core only (torch, peft, transformers,
# safetensors and what they pull in; none of mope's extras), the test files that need no extra.
OLDEST_VENV := .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST_CONSTRAINTS := .ci/oldest-constraints.txt
# tests that need an extra (train, cli, plots, trl): left out of test-oldest
EXTRAS_TESTS := --ignore=tests/cli --ignore=tests/training --ignore=tests/integrations \
	--ignore=tests/analysis/test_plots.py --ignore=tests/test_benchmarks.py --ignore=tests/test_quantized_base.py \
	--ignore=tests/test_multidomain_study.py --ignore=tests/test_demo.py \
	--deselect "tests/test_examples.py::test_example_runs[plot_routing.py]" \
	--deselect "tests/test_examples.py::test_example_runs[trl_sft.py]"

.PHONY: demo test test-oldest lint docs bench setup clean debian-data

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

# The Debian packages the multi-domain data reads (fortunes, manpages, manpages-dev): installed when
# run as root (as CI is); elsewhere a note, and the tests that read them skip saying so.
debian-data: $(STAMP)
	$(BIN)/python -c "from mope.training.multidomain import ensure_packages; ensure_packages()" \
		|| echo "note: the multi-domain data's Debian packages are missing; their tests will skip"

test: lint docs debian-data
	$(BIN)/python -m pytest -n 2 -q

.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

$(OLDEST_STAMP): pyproject.toml $(OLDEST_CONSTRAINTS)
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/python -m pip install --quiet --upgrade pip
	$(OLDEST_BIN)/python -m pip install --quiet $(TORCH)
	$(OLDEST_BIN)/python -m pip install --quiet -c $(OLDEST_CONSTRAINTS) -e . pytest pytest-xdist
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_BIN)/python -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in ('torch', 'peft', 'transformers', 'safetensors')))"
	$(OLDEST_BIN)/python -c "import importlib.util as u, sys; x = [n for n in ('matplotlib', 'datasets') if u.find_spec(n)]; sys.exit(f'extras installed in $(OLDEST_VENV): {x}' if x else 0)"
	$(OLDEST_BIN)/python -m pytest -n 2 -q $(EXTRAS_TESTS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache .ruff_cache site

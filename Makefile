# prunekit: `make demo` runs the default experiment on real MNIST, `make test` runs the test suite.
# Both create the virtual environment and install everything themselves. torch is always pinned: an unpinned
# torch would pull the multi-gigabyte CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: venv demo lint test test-fast bench results mnist clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

mnist: venv
	$(BIN)/prunekit data fetch mnist

demo: mnist
	$(BIN)/prunekit run configs/quickstart.yaml

# the import layers and the dead-code check (pyproject.toml: [tool.importlinter], [tool.vulture]), then the tests
lint: venv
	$(BIN)/lint-imports
	$(BIN)/vulture

test: mnist lint
	$(BIN)/python -m pytest -q

test-fast: venv lint
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python bench/bench_masked_step.py

# docs/results.md from the results stores of the MNIST experiments (run them first; see docs/*.md for commands)
RESULT_STORES ?= runs runs_incop runs_seed002
results: venv
	$(BIN)/prunekit results $(RESULT_STORES) --out docs/results.md

clean:
	rm -rf $(VENV) runs .pytest_cache

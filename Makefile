# The two set-up commands of the README. Each creates .venv on first use and installs the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow benchmarks coverage mutation planted-bugs clean

$(BIN)/timm-exits: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[demo,dev]'
	touch $@

demo: $(BIN)/timm-exits
	$(BIN)/timm-exits demo

test: $(BIN)/timm-exits
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/timm-exits
	$(BIN)/python -m pytest -q -m slow

benchmarks: $(BIN)/timm-exits
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/loss_study.py
	$(BIN)/python benchmarks/flops.py
	$(BIN)/python benchmarks/early_exit.py
	$(BIN)/python benchmarks/train_step.py

coverage: $(BIN)/timm-exits
	$(BIN)/python benchmarks/coverage.py

# How strong the suite is (docs/testing.md); neither runs in CI.
mutation: $(BIN)/timm-exits
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut export-cicd-stats

planted-bugs: $(BIN)/timm-exits
	$(BIN)/python benchmarks/planted_bugs.py

clean:
	rm -rf $(VENV) build *.egg-info mutants

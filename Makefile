# The two set-up commands of the README. Each creates .venv on first use and installs the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The suite at the lowest release of every dependency pyproject.toml declares (.ci/lowest.txt), in a venv of its own
LOWEST := .venv-lowest

.PHONY: demo test test-lowest test-slow benchmarks coverage mutation planted-bugs clean

$(BIN)/timm-exits: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[demo,dev]'
	touch $@

demo: $(BIN)/timm-exits
	$(BIN)/timm-exits demo

test: $(BIN)/timm-exits
	$(BIN)/python -m pytest -q

$(LOWEST)/bin/timm-exits: pyproject.toml .ci/lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet -c .ci/lowest.txt -e '.[demo,dev]'
	touch $@

test-lowest: $(LOWEST)/bin/timm-exits
	$(LOWEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|timm|fvcore|numpy) '
	$(LOWEST)/bin/python -m pytest -q

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
	rm -rf $(VENV) $(LOWEST) build *.egg-info mutants

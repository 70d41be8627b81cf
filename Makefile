# The two set-up commands of the README. Each creates .venv on first use and installs what it needs:
# `make demo` the package and the demo's extra, `make test` the dev extra on top. pip speaks (no --quiet):
# the first install downloads torch, and minutes without a line look like a hang.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The suite at the lowest release of every dependency pyproject.toml declares (.ci/lowest.txt), in a venv of its own
LOWEST := .venv-lowest

.PHONY: demo test lint test-lowest test-slow benchmarks coverage mutation planted-bugs clean

$(VENV)/.demo-installed: pyproject.toml
	@echo "make: creating $(VENV); installing timm-exits and the demo's extra (torch, torchvision, timm, fvcore, scikit-learn, matplotlib)."
	@echo "make: on Linux, PyPI's torch wheel also brings NVIDIA's CUDA libraries (3.2 GB of 5.8): README.md says how to avoid them."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[demo]'
	touch $@

$(VENV)/.dev-installed: $(VENV)/.demo-installed
	@echo "make: installing the test set (pytest, onnx, onnxscript, lightning, mutmut) into $(VENV)."
	$(BIN)/python -m pip install -e '.[demo,dev]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/timm-exits demo

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

# ruff with the rules pyproject.toml selects ([tool.ruff.lint]): the same verdict on every ruff release
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .

$(LOWEST)/bin/timm-exits: pyproject.toml .ci/lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	@echo "make: installing every dependency at the lowest release pyproject.toml declares (.ci/lowest.txt) into $(LOWEST)."
	$(LOWEST)/bin/python -m pip install -c .ci/lowest.txt -e '.[demo,dev]'
	touch $@

test-lowest: $(LOWEST)/bin/timm-exits
	$(LOWEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|timm|fvcore|numpy) '
	$(LOWEST)/bin/python -m pytest -q

test-slow: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m slow

benchmarks: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/loss_study.py
	$(BIN)/python benchmarks/flops.py
	$(BIN)/python benchmarks/early_exit.py
	$(BIN)/python benchmarks/train_step.py

# tools/ holds the scripts that measure the suite itself: which models wrap (writes docs/coverage.md), planted bugs.
coverage: $(VENV)/.dev-installed
	$(BIN)/python tools/coverage.py

# How strong the suite is (docs/testing.md); neither runs in CI.
# One torch thread per mutmut child: two children of two OpenMP threads each on two cores ran the same
# 38 tests in 182 s instead of 24 s (threads spinning against each other), which made the run take hours.
mutation: $(VENV)/.dev-installed
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut export-cicd-stats

planted-bugs: $(VENV)/.dev-installed
	$(BIN)/python tools/planted_bugs.py

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info mutants

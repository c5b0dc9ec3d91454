# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo    the embedded demo: a LLaVA-NeXT-shaped model built offline, HiRED at 4 budgets
#   make test    the test suite
# Both create .venv on first use: torch only when the venv lacks it (TORCH picks the build;
# torch==2.13.0 is a CPU wheel on the project's machines), then tokendrop with its test extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test
demo: $(VENV)/.ready
	$(BIN)/tokendrop demo $(ARGS)

test: $(VENV)/.ready
	$(BIN)/pytest -q

$(VENV)/.ready: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

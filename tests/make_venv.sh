#!/bin/sh
# Make a test venv from its lock: make_venv.sh UV VENV LOCK PYTHON [MODULES]
# VENV is made anew (any old one removed) with PYTHON and holds exactly what LOCK pins (uv pip
# sync: nothing else, nothing seen from another venv), then tokendrop itself, editable, without
# dependencies and without build isolation (its build backend, setuptools and wheel, is pinned
# in LOCK too). uv takes its indexes, find-links and cache from the environment (the Makefile's
# UV_* exports); it hardlinks files from a cache on the same filesystem, so venvs that pin the
# same release of a package share its files on disk.
# Where torchvision is locked but cannot import (the CUDA build, the only one on the project
# machines' package mirror, beside CPU torch: the vLLM venv), it gets the import shim of
# tests/vllm_plugin/torchvision_shim.py.
# Last, the venv must import MODULES (default: transformers and what the tests' conftest
# imports), or the set-up fails there, naming the venv.
set -eu
uv=$1 venv=$2 lock=$3 python=$4 modules=${5:-transformers, tokendrop.presets}
start=$(date +%s)
rm -rf "$venv"
"$uv" venv --quiet --python "$python" "$venv"
"$uv" pip sync --quiet --python "$venv/bin/python" "$lock"
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps --no-build-isolation --editable .
if grep -q "^torchvision==" "$lock" && ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp tests/vllm_plugin/torchvision_shim.py "$site/_tokendrop_torchvision_shim.py"
    echo "import _tokendrop_torchvision_shim; _tokendrop_torchvision_shim.install()" > "$site/_tokendrop_torchvision_shim.pth"
fi
if ! "$venv/bin/python" -c "import $modules"; then
    echo "make_venv.sh: $venv (from $lock) cannot import $modules: see the error above" >&2
    exit 1
fi
"$venv/bin/python" -c "import transformers; print('$venv: transformers', transformers.__version__, 'from $lock')"
echo "$venv: made in $(($(date +%s) - start)) s"

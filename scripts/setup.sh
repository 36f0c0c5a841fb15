#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: a virtual environment at .venv with the project
# and its test, serve and client extras. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this is the CPU build; on a CUDA host install the matching CUDA build of
# torch 2.13.0 before running this script (see README).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"

#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: a virtual environment at .venv with the project
# and its test, serve and client extras. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The runtime's fused CPU attention op (sparrow/csrc) is compiled on first use and needs a C++
# compiler; install g++ only when none is there and we may (root, or sudo without a password).
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="-"; fi
  if [ "$SUDO" != "-" ] && command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q g++
  else
    echo "setup: no C++ compiler and no way to install one: the runtime will use its torch attention" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this is the CPU build; on a CUDA host install the matching CUDA build of
# torch 2.13.0 before running this script (see README).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Triton serving and the gRPC client: the serve extra (nvidia-pytriton 0.7.0 = Triton Inference Server
# 2.51 with the Python backend) and the client extra (tritonclient[grpc] 2.51.0). tritonclient declares
# protobuf<5 while onnx (test extra) needs protobuf>=6.31, so no single resolve holds both: install the
# extras, then put back the protobuf onnx needs (pip warns about tritonclient's pin; its gRPC code runs on
# it, which tests/test_serving.py checks against a real server).
.venv/bin/python -m pip install -q -e ".[serve,client]"
.venv/bin/python -m pip install -q "protobuf>=6.31.1"

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
# Triton serving and the gRPC client: the serve extra (nvidia-pytriton 0.7.0 = Triton Inference Server
# 2.51 with the Python backend) and the client extra (tritonclient[grpc] 2.51.0). tritonclient declares
# protobuf<5 while onnx (test extra) needs protobuf>=6.31, so no single resolve holds both: install the
# extras, then put back the protobuf onnx needs (pip warns about tritonclient's pin; its gRPC code runs on
# it, which tests/test_serving.py checks against a real server).
.venv/bin/python -m pip install -q -e ".[serve,client]"
.venv/bin/python -m pip install -q "protobuf>=6.31.1"

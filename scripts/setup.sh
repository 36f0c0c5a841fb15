#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: a virtual environment at .venv with the project
# and its test, serve, client and load extras. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# System packages are installed only when missing and only when we may (root, or sudo without a password).
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="-"; fi
apt_install() {  # apt_install PACKAGE WHAT-IS-LOST-WITHOUT-IT
  if [ "$SUDO" != "-" ] && command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$1"
  else
    echo "setup: $1 is missing and cannot be installed here: $2" >&2
  fi
}
# The runtime's fused CPU attention op (sparrow/csrc) is compiled on first use and needs a C++ compiler.
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  apt_install g++ "the runtime will use its torch attention"
fi
# perf_analyzer (`sparrow-client load`; the binary comes in the tritonclient 2.51 wheel) links libb64.
if ! /sbin/ldconfig -p 2>/dev/null | grep 'libb64\.so\.0d' >/dev/null; then  # no -q: pipefail and SIGPIPE
  apt_install libb64-0d "perf_analyzer will not start (sparrow-client load)"
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
# The load extra: nvidia-cuda-runtime-cu12 (libcudart.so.12, which perf_analyzer links; no GPU needed) and
# matplotlib for the load report's plot.
.venv/bin/python -m pip install -q -e ".[serve,client,load]"
.venv/bin/python -m pip install -q "protobuf>=6.31.1"

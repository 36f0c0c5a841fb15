#!/usr/bin/env bash
# The main job on the embedded demo model: set up, build, serve over Triton, ask over gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
# 1. Build what runs without a GPU (checkpoints, ONNX, manifest). Exit 3 means "prepared": the
#    TensorRT engine build itself is left for a GPU host (runs/engines/demo/build_engines.sh).
set +e
.venv/bin/sparrow build --recipe engines/demo.yaml --out runs/engines/demo
rc=$?
set -e
[ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || exit "$rc"
# 2. A demo video and its ground truth (runs/sample.json).
.venv/bin/sparrow demo video --seed 7 --out runs/sample.mp4
# 3. Serve what was built on a real Triton server (Python backend on CPU): the manifest gives the target
#    converted back from the TensorRT-LLM checkpoint, the draft, the vision encoder's ONNX file (ONNX
#    Runtime) and the limits; every artifact is re-hashed before the server starts.
.venv/bin/sparrow serve --engines runs/engines/demo --grpc-port 8001 --http-port 8000 --metrics-port 8002 \
  --work-dir runs/serve > runs/serve.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  if .venv/bin/sparrow-client health --retries 0 >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "sparrow serve exited; see runs/serve.log" >&2; exit 1; fi
  sleep 1
done
# 4. Ask over gRPC, the answer streamed as it is decoded: the sample's question, then a caption.
question=$(.venv/bin/python -c 'import json; print(json.load(open("runs/sample.json"))["question"])')
.venv/bin/sparrow-client infer --video runs/sample.mp4 --prompt "$question" --stream
.venv/bin/sparrow-client infer --video runs/sample.mp4 --prompt "describe the video ." --stream

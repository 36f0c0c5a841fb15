#!/usr/bin/env bash
# The main job on the embedded demo model: set up, make a sample video, answer its question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
.venv/bin/sparrow demo video --seed 7 --out runs/sample.mp4
.venv/bin/sparrow generate --video runs/sample.mp4
.venv/bin/sparrow generate --video runs/sample.mp4 --prompt "describe the video ."

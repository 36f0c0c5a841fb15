"""The vision encoder as its own serving step (Triton's `vision_encoder` model): patches -> visual embeddings.

Two implementations behind one call, `encoder(pixel_values [N, D] float32, grid_thw [3] int64) -> [M, H]`:
- `OnnxVisionEncoder`: a build's `vision/encoder.onnx` in ONNX Runtime on CPU (what `sparrow serve --engines`
  runs; the build checked it against torch);
- `TorchVisionEncoder`: the target's own vision tower in torch, for a target with no exported encoder (the
  embedded demo pair served without a build, Qwen2.5-VL and LLaVA-OneVision, whose ONNX export is not written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


class OnnxVisionEncoder:
    def __init__(self, onnx_path: str | Path, target_dir: str | Path):
        import onnxruntime as ort

        vision = json.loads((Path(target_dir) / "config.json").read_text())["vision_config"]
        self.merge = int(vision["spatial_merge_size"])
        opts = ort.SessionOptions()
        # ONNX Runtime ignores OMP_NUM_THREADS; the server's thread budget (start_server threads=) goes through it
        opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
        self.session = ort.InferenceSession(os.fspath(onnx_path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        from .convert.onnx_vision import graph_inputs

        pos, frames = graph_inputs(self.merge, torch.from_numpy(grid_thw.reshape(1, 3)))  # [N, 2], [N]
        return self.session.run(None, {"pixel_values": pixel_values.astype(np.float32, copy=False),
                                       "position_ids": pos.numpy(), "frame_ids": frames.numpy()})[0]


class TorchVisionEncoder:
    def __init__(self, target_dir: str | Path):
        from .target import Target

        self.target = Target.load(target_dir)

    @torch.inference_mode()
    def __call__(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        inputs = {"pixel_values_videos": torch.from_numpy(pixel_values),
                  "video_grid_thw": torch.from_numpy(grid_thw.reshape(1, 3))}  # [N, D], [1, 3]
        return self.target.visual_features(inputs).float().numpy()


def load_vision_encoder(onnx_path: str | None, target_dir: str | Path):
    """ONNX Runtime on `onnx_path` when given, else the target's tower in torch."""
    return OnnxVisionEncoder(onnx_path, target_dir) if onnx_path else TorchVisionEncoder(target_dir)

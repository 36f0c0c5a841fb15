"""vision_encoder: patches `pixel_values` [N, D] + `grid_thw` [3] -> visual `embeddings` [N / merge^2, H]
(sparrow.vision_encoder: the build's ONNX file in ONNX Runtime, or the target's tower in torch)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from sparrow import serving
        from sparrow.vision_encoder import load_vision_encoder

        cfg = json.loads(args["model_config"])
        self.s = serving
        self.respond = serving.Responder(pb_utils, "vision_encoder")
        self.encode = load_vision_encoder(serving.param(cfg, "vision_onnx") or None, serving.param(cfg, "target_dir"))

    def _one(self, request):
        get = lambda name: self.s.input_array(pb_utils, request, name)  # noqa: E731
        embeds = self.encode(get("pixel_values"), get("grid_thw"))  # [M, H]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("embeddings", np.ascontiguousarray(embeds, dtype=np.float32))])

    def execute(self, requests):
        return [self.respond(self._one, r) for r in requests]

    def finalize(self):
        self.respond.close()

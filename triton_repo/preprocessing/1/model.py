"""preprocessing: `video` bytes (decoded with sparrow.video.decode) or raw `frames`, sampled to `num_frames`
when given -> the video's patches `pixel_values` [N, D] and `grid_thw` [3] (the target's processor layout,
sparrow.processing.video_patches); the prompt is checked."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        from sparrow import serving
        from sparrow.processing import VisionSpec, video_patches

        self.s = serving
        self.spec = VisionSpec.from_model_dir(serving.param(cfg, "target_dir"))
        self.video_patches = video_patches
        self.respond = serving.Responder(pb_utils, "preprocessing")
        self.max_bytes = int(serving.param(cfg, "max_video_bytes"))
        self.max_frames = int(serving.param(cfg, "max_frames"))
        self.max_chars = int(serving.param(cfg, "max_prompt_chars"))

    def _one(self, request):
        s = self.s
        get = lambda name: s.input_array(pb_utils, request, name)  # noqa: E731 - None: not sent
        prompt = s.check_prompt(s.one_string(get("prompt"), "prompt"), self.max_chars)
        num_frames = s.one_value(get("num_frames"), "num_frames", 0)
        video, frames = get("video"), get("frames")
        if (video is None) == (frames is None):
            raise s.RequestError("send exactly one of `video` (a whole file, BYTES) or `frames` "
                                 f"(UINT8 [N, H, W, 3]); got {'both' if video is not None else 'neither'}")
        if frames is not None:
            frames = s.check_frames(frames, num_frames, self.max_bytes, self.max_frames)
        elif video.size != 1:
            raise s.RequestError(f"video must hold exactly one element (a whole file), got shape {list(video.shape)}")
        else:
            frames = s.decode_video(bytes(video.reshape(-1)[0]), num_frames, self.max_bytes, self.max_frames)
        patches = self.video_patches(frames, self.spec)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("pixel_values", patches.pixel_values.numpy()),  # [N, D] float32
            pb_utils.Tensor("grid_thw", patches.grid_thw.numpy()),  # [3] int64
            pb_utils.Tensor("prompt_checked", np.array([prompt.encode("utf-8")], dtype=np.object_))])

    def execute(self, requests):
        return [self.respond(self._one, r) for r in requests]

    def finalize(self):
        self.respond.close()

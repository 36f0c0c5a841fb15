"""sparrow_llm: the demo target on sparrow.runtime.Runtime with the Sparrow draft.

strategy "sparrow": sparrow.speculative.generate_speculative with a chain of `draft_len` drafted tokens;
strategy "ar": sparrow.generate.generate_ar (exact autoregressive). Greedy; both give the same tokens.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        from sparrow import serving
        from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
        from sparrow.draft import Draft
        from sparrow.generate import generate_ar
        from sparrow.runtime import Runtime
        from sparrow.speculative import TokenTree, generate_speculative
        from sparrow.target import Target

        self.s = serving
        self.respond = serving.Responder(pb_utils, "sparrow_llm")
        self.generate_ar, self.generate_speculative = generate_ar, generate_speculative
        self.tree = TokenTree.chain(int(serving.param(cfg, "draft_len")))
        self.max_len = int(serving.param(cfg, "max_len"))
        self.max_tokens_limit = int(serving.param(cfg, "max_tokens_limit"))
        target = Target.load(DEMO_TARGET_DIR)
        self.runtime = Runtime(target, max_len=self.max_len)
        self.draft = Draft.load(DEMO_DRAFTS["sparrow"], target.model)
        # warm up at load (first-use costs such as building the runtime's CPU attention op), so the
        # first request is not the one that pays them
        generate_speculative(self.runtime, self.draft, np.zeros((4, 64, 64, 3), np.uint8), "warm up", self.tree,
                             max_new_tokens=2, min_new_tokens=2)
        self.metrics = serving.DecodeMetrics(pb_utils)  # after the warm-up, which it does not count

    def _one(self, request):
        s = self.s
        get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
        frames = get("frames")
        prompt = s.one_string(get("prompt"), "prompt")
        strategy = s.check_strategy(s.one_string(get("strategy"), "strategy"))
        max_tokens = s.check_max_tokens(s.one_int(get("max_tokens"), "max_tokens"), self.max_tokens_limit)
        try:
            prepared = self.runtime.prepare(frames, prompt)  # checked here, then reused by the decoder
        except ValueError as e:  # TargetError: empty prompt, bad frames, too many frames
            raise s.RequestError(str(e)) from e
        need = prepared.input_ids.shape[1] + max_tokens + self.tree.size + 1
        if need > self.max_len:
            raise s.RequestError(f"request too long: {need} positions (prompt, video and max_tokens) "
                                 f"> {self.max_len} the server holds; send fewer frames or a smaller video")
        if strategy == "ar":
            res = self.generate_ar(self.runtime, frames, prompt, max_new_tokens=max_tokens, prepared=prepared)
        else:
            res = self.generate_speculative(self.runtime, self.draft, frames, prompt, self.tree,
                                            max_new_tokens=max_tokens, prepared=prepared)
        self.metrics.observe(res.stats)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("token_ids", np.asarray(res.token_ids, dtype=np.int32)),
            pb_utils.Tensor("stats", np.array([json.dumps(res.stats).encode("utf-8")], dtype=np.object_))])

    def execute(self, requests):
        return [self.respond(self._one, r) for r in requests]

    def finalize(self):
        self.metrics.close()
        self.respond.close()

"""postprocessing: one streamed response of sparrow_llm -> its text piece (sparrow.serving.text_piece:
decode the prefix with the target's tokenizer, send the difference); token ids and stats pass through.
A cancelled request marks its id for sparrow_llm (sparrow.serving.CancelFlags)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import json

        import transformers
        from sparrow import serving

        cfg = json.loads(args["model_config"])
        self.s = serving
        self.respond = serving.Responder(pb_utils, "postprocessing")
        self.cancel_flags = serving.CancelFlags(serving.param(cfg, "cancel_dir"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(serving.param(cfg, "target_dir"))
        # the same decode as sparrow.generate's answer text
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731

    def _one(self, request):
        # the ensemble's client is gone: tell sparrow_llm to stop decoding. This request is still answered
        # as usual (the ensemble drops the response): an error here leaves the ensemble request in flight
        # for ever in Triton 2.51 (seen: shutdown then waits its whole exit timeout)
        if request.is_cancelled():
            self.cancel_flags.mark(request.request_id())
        get = lambda name: self.s.input_array(pb_utils, request, name)  # noqa: E731
        new, stats = get("new_ids").reshape(-1), get("stats_in")
        final = bool(self.s.one_string(stats, "stats"))  # only the last response carries statistics
        piece = self.s.text_piece(self.decode, get("prior_ids").reshape(-1).tolist(), new.tolist(), final)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text", np.array([piece.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("token_ids", new.astype(np.int32)),
            pb_utils.Tensor("stats", stats)])

    def execute(self, requests):
        return [self.respond(self._one, r) for r in requests]

    def finalize(self):
        self.respond.close()

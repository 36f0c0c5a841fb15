"""postprocessing: token ids -> text with the target's tokenizer (the same decode as sparrow.generate)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import transformers
        from sparrow import serving
        from sparrow.demo.model import DEMO_TARGET_DIR

        self.s = serving
        self.respond = serving.Responder(pb_utils, "postprocessing")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET_DIR)

    def _one(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "token_ids").as_numpy().reshape(-1).tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_))])

    def execute(self, requests):
        return [self.respond(self._one, r) for r in requests]

    def finalize(self):
        self.respond.close()

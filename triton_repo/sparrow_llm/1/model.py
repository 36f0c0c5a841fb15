"""sparrow_llm (decoupled): the served target (`target_dir`: the embedded demo target, or an engine directory's
reference/target) on sparrow.runtime.Runtime, or with `trtllm_engine` set (`--backend tensorrt_llm`) on its
TensorRT-LLM engine through sparrow.runtime_trtllm.TrtLlmRuntime, with its Sparrow draft (`draft_dir`, torch),
prefilled from the vision_encoder's embeddings (sparrow.target.Target.prepare_embedded).

speculative=true (default): sparrow.speculative.generate_speculative with a chain of `draft_len` drafted
tokens; speculative=false: sparrow.generate.generate_ar. Greedy at temperature 0 (both give the same
tokens); temperature > 0 samples (rejection sampling on the chain), seeded by `seed`.
Streams one response per committed batch of tokens through the decoders' `on_tokens` hook, which also
checks between draft/verify steps whether the client cancelled, and stops decoding if so.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        import torch

        from sparrow import serving
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
        self.default_max_tokens = int(serving.param(cfg, "default_max_tokens"))
        self.cancel_flags = serving.CancelFlags(serving.param(cfg, "cancel_dir"))
        self.torch = torch
        target = Target.load(serving.param(cfg, "target_dir"))
        engine = serving.param(cfg, "trtllm_engine")
        if engine:
            from sparrow.runtime_trtllm import TrtLlmRuntime

            self.runtime = TrtLlmRuntime(target, engine, max_len=self.max_len)
        else:
            self.runtime = Runtime(target, max_len=self.max_len)
        self.draft = Draft.load(serving.param(cfg, "draft_dir"), target.model)
        window = int(serving.param(cfg, "window"))
        if window and window != self.draft.cfg.window:  # 0: the draft's own (no engine directory)
            raise RuntimeError(f"the engine directory says window {window}; the draft at "
                               f"{serving.param(cfg, 'draft_dir')} was trained with {self.draft.cfg.window}")
        # warm up at load (first-use costs such as building the runtime's CPU attention op), so the
        # first request is not the one that pays them
        generate_speculative(self.runtime, self.draft, np.zeros((4, 64, 64, 3), np.uint8), "warm up", self.tree,
                             max_new_tokens=2, min_new_tokens=2)
        self.metrics = serving.DecodeMetrics(pb_utils)  # after the warm-up, which it does not count

    def _stream(self, request, sender):
        s = self.s
        get = lambda name: s.input_array(pb_utils, request, name)  # noqa: E731 - None: not sent
        embeds, grid = get("embeddings"), get("grid_thw")  # [M, H] float32, [3] int64
        prompt = s.one_string(get("prompt"), "prompt")
        max_tokens = s.check_max_tokens(s.one_value(get("max_tokens"), "max_tokens", self.default_max_tokens),
                                        self.max_tokens_limit)
        temperature = s.check_temperature(s.one_value(get("temperature"), "temperature", 0.0))
        seed = s.one_value(get("seed"), "seed", 0)
        speculative = bool(s.one_value(get("speculative"), "speculative", True))
        t0 = time.perf_counter()
        try:
            prepared = self.runtime.target.prepare_embedded(prompt, self.torch.from_numpy(embeds), grid)
        except ValueError as e:  # TargetError: empty prompt, embeddings that do not fit the grid
            raise s.RequestError(str(e)) from e
        need = prepared.input_ids.shape[1] + max_tokens + self.tree.size + 1
        if need > self.max_len:
            raise s.RequestError(f"request too long: {need} positions (prompt, video and max_tokens) "
                                 f"> {self.max_len} the server holds; send fewer frames or a smaller video")
        strategy = "sparrow" if speculative else "ar"
        request_id = request.request_id()
        self.cancel_flags.clear(request_id)  # a mark left from an earlier stream with this id
        sent: list[int] = []  # every token streamed so far: the next piece's prior_ids
        first_token_s = None

        def on_tokens(chunk: list[int]) -> None:
            nonlocal first_token_s
            # the client closed its stream (called directly, or through the ensemble): stop before the next step
            if request.is_cancelled() or self.cancel_flags.is_marked(request_id):
                raise s.Cancelled()
            if first_token_s is None:
                first_token_s = time.perf_counter() - t0
            elif speculative:  # every chunk after the first is one draft/verify step's commit
                self.metrics.observe_step(strategy, len(chunk))
            sender.send(self._response(chunk, sent, ""))
            sent.extend(chunk)

        kw = dict(max_new_tokens=max_tokens, temperature=temperature, seed=seed, on_tokens=on_tokens,
                  prepared=prepared)
        try:
            if speculative:
                res = self.generate_speculative(self.runtime, self.draft, None, prompt, self.tree, **kw)
            else:
                res = self.generate_ar(self.runtime, None, prompt, **kw)
        finally:
            self.cancel_flags.clear(request_id)
        res.stats["first_token_s"] = round(first_token_s, 4)
        self.metrics.observe(res.stats)
        return self._response([], sent, json.dumps(res.stats))  # the last response: no tokens, the statistics

    @staticmethod
    def _response(new: list[int], prior: list[int], stats: str):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("token_ids", np.asarray(new, dtype=np.int32)),  # [n] this response's tokens
            pb_utils.Tensor("prior_ids", np.asarray(prior, dtype=np.int32)),  # [m] every token before them
            pb_utils.Tensor("stats", np.array([stats.encode("utf-8")], dtype=np.object_))])

    def execute(self, requests):
        for request in requests:
            self.respond.stream(self._stream, request)
        return None  # decoupled: responses went out through each request's sender

    def finalize(self):
        self.metrics.close()
        self.respond.close()

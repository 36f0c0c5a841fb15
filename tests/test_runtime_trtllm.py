"""sparrow.runtime_trtllm (the `--backend tensorrt_llm` target) on an Executor that keeps TensorRT-LLM's contract
on the demo target in transformers: TensorRT-LLM cannot be installed here, so this checks our side of the
contract (prompt-table ids, the M-RoPE table, extra ids, which output rows belong to which tokens, rollback by
leaving tokens out), not TensorRT-LLM itself."""

import json
from types import SimpleNamespace

import pytest
import torch

from sparrow.benchmarks.speedup import bench_videos
from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
from sparrow.draft import Draft
from sparrow.generate import generate_ar
from sparrow.runtime_trtllm import TrtLlmRuntime, hidden_output_name, mrope_cos_sin
from sparrow.serving import OUTPUTS_FILE
from sparrow.speculative import TokenTree, generate_speculative
from sparrow.target import Target, TargetError


def contract_bindings(model):
    """The parts of `tensorrt_llm.bindings.executor` TrtLlmRuntime uses, with the documented behaviour of a
    context request: token ids >= vocab size read rows of the request's prompt table, context token s is rotated
    by row s of its M-RoPE table, and each requested additional output returns one row per context token."""
    lm = model.model.language_model
    text = model.config.text_config
    half = (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) // 2
    requests = []

    class Executor:
        def __init__(self, engine_dir, model_type, config):
            self.known = {o.name for o in config.additional_model_outputs}
            self.responses = {}

        def enqueue_request(self, request):
            requests.append(request)
            self.responses[len(requests)] = self._run(request)
            return len(requests)

        def await_responses(self, request_id):
            return [self.responses.pop(request_id)]

        @torch.inference_mode()
        def _run(self, request):
            ids = torch.tensor(request.input_token_ids)  # [S]
            table = request.prompt_tuning_config.embedding_table  # [M, H]
            assert request.prompt_tuning_config.input_token_extra_ids == [request.prompt_tuning_config
                                                                          .input_token_extra_ids[0]] * len(ids)
            visual = ids >= text.vocab_size
            embeds = lm.embed_tokens(ids.clamp(max=text.vocab_size - 1))  # [S, H]
            embeds[visual] = table[ids[visual] - text.vocab_size].to(embeds.dtype)
            rot = request.mrope_config.mrope_rotary_cos_sin.reshape(-1, half, 2)[:len(ids)]  # [S, half, 2]
            cos, sin = (torch.cat([rot[..., i], rot[..., i]], -1)[None].to(embeds.dtype) for i in (0, 1))  # [1, S, D]
            h = embeds[None]  # [1, S, H]
            hidden = [h]
            for layer in lm.layers:
                h = layer(h, position_embeddings=(cos, sin))
                hidden.append(h)
            hidden[-1] = lm.norm(h)
            outputs = []
            for o in request.output_config.additional_model_outputs:
                assert o.name in self.known and o.gather_context
                outputs.append(SimpleNamespace(name=o.name, output=hidden[int(o.name.rsplit("_", 1)[1])][0]))
            result = SimpleNamespace(additional_outputs=outputs, output_token_ids=[[0]])
            return SimpleNamespace(has_error=lambda: False, error_msg="", result=result)

    def config(**kwargs):
        return SimpleNamespace(**kwargs)

    def request(input_token_ids, max_tokens, streaming, sampling_config, output_config, prompt_tuning_config,
                mrope_config):
        assert max_tokens == 1 and not streaming
        return SimpleNamespace(input_token_ids=list(input_token_ids), output_config=output_config,
                               prompt_tuning_config=prompt_tuning_config, mrope_config=mrope_config)

    return SimpleNamespace(
        Executor=Executor, ModelType=SimpleNamespace(DECODER_ONLY="decoder_only"), Request=request,
        ExecutorConfig=config, KvCacheConfig=config, SamplingConfig=config,
        OutputConfig=lambda additional_model_outputs: SimpleNamespace(
            additional_model_outputs=additional_model_outputs),
        AdditionalModelOutput=lambda name, gather_context: SimpleNamespace(name=name, gather_context=gather_context),
        PromptTuningConfig=lambda table, extra: SimpleNamespace(embedding_table=table, input_token_extra_ids=extra),
        MropeConfig=lambda cos_sin, delta: SimpleNamespace(mrope_rotary_cos_sin=cos_sin, mrope_position_deltas=delta),
        requests=requests)


def engine_dir(tmp_path, layers=(1, 2, 4)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / OUTPUTS_FILE).write_text(json.dumps({"hidden_layers": list(layers), "dtype": "float32"}))
    return tmp_path


@pytest.fixture(scope="module")
def demo():
    target = Target.load(DEMO_TARGET_DIR)
    return target, {name: Draft.load(path, target.model) for name, path in DEMO_DRAFTS.items()}


def test_mrope_table_matches_transformers_rotary(demo):
    target, _ = demo
    frames, prompt = bench_videos(512, 1)[0]
    p = target.prepare(frames, prompt)
    positions, delta = target.positions(p)  # [3, 1, T]
    t, extra = positions.shape[-1], 7
    text = target.model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    table = mrope_cos_sin(positions[:, 0], delta, head_dim, text.rope_parameters["rope_theta"],
                          text.rope_parameters["mrope_section"], 2048).reshape(2048, head_dim // 2, 2)
    after = (torch.arange(t, t + extra) + delta).expand(3, 1, extra)  # text tokens after the prompt
    cos, sin = target.model.model.language_model.rotary_emb(torch.zeros(1), torch.cat([positions, after], -1))
    torch.testing.assert_close(table[:t + extra, :, 0], cos[0, :, :head_dim // 2].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(table[:t + extra, :, 1], sin[0, :, :head_dim // 2].float(), atol=1e-5, rtol=0)
    with pytest.raises(TargetError, match="mrope_section"):
        mrope_cos_sin(positions[:, 0], delta, head_dim, 1e4, [8, 8, 8], 2048)


def test_speculative_and_ar_on_the_contract_equal_transformers_generate(demo, tmp_path):
    target, drafts = demo
    bindings = contract_bindings(target.model)
    runtime = TrtLlmRuntime(target, engine_dir(tmp_path), max_len=2048, bindings=bindings)
    for frames, prompt in bench_videos(512, 2):
        p = target.prepare(frames, prompt)
        hf = target.model.generate(input_ids=p.input_ids, **p.model_inputs, do_sample=False, max_new_tokens=32)
        expect = hf[0, p.input_ids.shape[1]:].tolist()
        for name, draft in drafts.items():
            res = generate_speculative(runtime, draft, frames, prompt, TokenTree.chain(5), max_new_tokens=32)
            assert res.token_ids == expect, name
            assert res.stats["mean_accepted_length"] > 1.5, name  # drafted tokens were accepted, not only bonus ones
        assert generate_ar(runtime, frames, prompt, max_new_tokens=32).token_ids == expect
    # one KV-reuse key per sequence: every request carried its sequence's own id, and sequences differ
    keys = [r.prompt_tuning_config.input_token_extra_ids[0] for r in bindings.requests]
    assert len(set(keys)) == 2 * (len(drafts) + 1)


def test_refusals_name_the_problem(demo, tmp_path):
    target, drafts = demo
    bindings = contract_bindings(target.model)
    with pytest.raises(TargetError, match=f"no {OUTPUTS_FILE}"):
        TrtLlmRuntime(target, tmp_path, max_len=2048, bindings=bindings)
    with pytest.raises(TargetError, match="final hidden state"):
        TrtLlmRuntime(target, engine_dir(tmp_path / "a", (1, 2)), max_len=2048, bindings=bindings)
    frames, prompt = bench_videos(512, 1)[0]
    runtime = TrtLlmRuntime(target, engine_dir(tmp_path / "b", (1, 4)), max_len=2048, bindings=bindings)
    with pytest.raises(TargetError, match=r"not \[2\]"):
        generate_speculative(runtime, drafts["sparrow"], frames, prompt, TokenTree.chain(3), max_new_tokens=8)
    runtime = TrtLlmRuntime(target, engine_dir(tmp_path / "c"), max_len=2048, bindings=bindings)
    with pytest.raises(TargetError, match="chains only"):
        generate_speculative(runtime, drafts["sparrow"], frames, prompt, TokenTree.spine(3, 2), max_new_tokens=8)


def test_absent_tensorrt_llm_is_a_clear_error(demo, tmp_path):
    with pytest.raises(ImportError, match="needs TensorRT-LLM"):
        TrtLlmRuntime(demo[0], engine_dir(tmp_path), max_len=2048)


def test_engine_builder_names_the_hidden_outputs(demo_build, tmp_path):
    import subprocess
    import sys

    from sparrow.convert.trtllm_engine import parse_layers

    assert parse_layers("1,2", 4) == [1, 2, 4] and parse_layers("0,4", 4) == [0, 4]
    with pytest.raises(ValueError, match=r"out of range.*0\.\.4"):
        parse_layers("1,5", 4)
    assert hidden_output_name(2) == "sparrow_hidden_2"
    run = lambda *a: subprocess.run([sys.executable, "-m", "sparrow.convert.trtllm_engine", *a],  # noqa: E731
                                    capture_output=True, text=True)
    missing = run(str(tmp_path), str(tmp_path / "out"), "--layers", "1")
    assert missing.returncode != 0 and "not a TensorRT-LLM checkpoint" in missing.stderr
    absent = run(str(demo_build[0] / "trtllm" / "target"), str(tmp_path / "out"), "--layers", "1,2")
    assert absent.returncode != 0 and "TensorRT-LLM is not installed" in absent.stderr

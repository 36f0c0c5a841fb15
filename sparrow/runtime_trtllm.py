"""The target on TensorRT-LLM (GPU hosts): the runtime interface of `runtime.Runtime` (prepare, prefill,
step, keep/truncate) over TensorRT-LLM's Executor API, for sparrow_llm's `--backend tensorrt_llm`.

Written against the public Executor bindings (`tensorrt_llm.bindings.executor`, TensorRT-LLM 1.x) and never
run: TensorRT-LLM cannot be installed on the machines this project is built on (README, "What was verified").
The bookkeeping (token ids, prompt table, M-RoPE table, which rows are whose) is tested here against the torch
runtime through `tests/test_runtime_trtllm.py`'s executor built on transformers; TensorRT-LLM itself is not.

How the draft/verify loop maps onto the Executor:
- the target engine (`python -m sparrow.convert.trtllm_engine`) carries the residual stream at the draft's
  target layers as extra outputs `sparrow_hidden_{k}` (k: the transformers `hidden_states` index, 0 = the
  embeddings, num_layers = after the final norm); every request asks for them over its context
  (AdditionalModelOutput(name, gather_context=True)).
- every forward, prefill or verify, is one context request over the whole sequence so far (prompt with the
  visual tokens as prompt-table ids, committed tokens, new tokens), max_tokens=1. KV-cache block reuse turns
  the part an earlier request already saw into cache hits, so a verify computes the new tokens and at most one
  partly filled block before them. Rejected tokens are rolled back for free: they are not in the next
  request, and a block is reused only for an exact token prefix. Every token carries the sequence's own
  extra id (PromptTuningConfig's input_token_extra_ids, the reuse key for prompt-table tokens), so one
  sequence reuses only its own blocks and a prefill always computes, and returns, every prompt row.
- logits of the new positions come from the final hidden state through the target's LM head here: the engine
  is built without gather_context_logits, which would materialise vocabulary-wide logits for every visual token.
- chains only: a context request has no tree mask (`--tree-width` > 1 is refused on this backend).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .serving import OUTPUTS_FILE
from .target import Prompt, StepOutput, Target, TargetError

HIDDEN_OUTPUT = "sparrow_hidden_{}"



def hidden_output_name(layer: int) -> str:
    """The engine output holding transformers' `hidden_states[layer]` (one row per context token)."""
    return HIDDEN_OUTPUT.format(layer)


def executor_module():
    """`tensorrt_llm.bindings.executor`, or an ImportError that says what to install."""
    try:
        from tensorrt_llm.bindings import executor
    except ImportError as e:
        raise ImportError("the tensorrt_llm backend needs TensorRT-LLM (pip install tensorrt_llm on a CUDA host, "
                          f"see its install guide); importing it failed: {e}") from e
    return executor


def mrope_cos_sin(positions: torch.Tensor, delta: int, head_dim: int, theta: float, section: list[int],
                  max_positions: int) -> torch.Tensor:
    """TensorRT-LLM's per-request M-RoPE table: for sequence index s < max_positions and rotary pair j, (cos, sin)
    of the angle position[axis(j), s] * theta^(-2j / head_dim), where pair j takes its position from the
    temporal, height or width axis by `section` (pairs per axis, as transformers' `mrope_section`).
    The engine looks a context token up by its index in the sequence; every request here is a context request
    over prompt + tokens after it, so indices past the prompt hold their own text position, s + delta on
    all three axes (where a generation step would put them too).

    positions: `[3, T]` M-RoPE positions of the prompt. Returns `[max_positions * head_dim]` float32."""
    half = head_dim // 2
    if sum(section) != half:
        raise TargetError(f"mrope_section {section} must sum to head_dim / 2 = {half}")
    t = positions.shape[1]
    if t > max_positions:
        raise TargetError(f"prompt of {t} positions > max_position_embeddings {max_positions}")
    axis = torch.repeat_interleave(torch.arange(len(section)) % 3, torch.tensor(section))  # [half]
    full = (torch.arange(max_positions, dtype=torch.float64) + delta).expand(3, -1).clone()  # [3, S]
    full[:, :t] = positions.to(torch.float64)
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)  # [half]
    angles = full[axis].T * inv_freq  # [S, half]: pair j rotates by its own axis' position
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [S, half, 2]
    return table.reshape(-1).to(torch.float32)


@dataclass
class TrtLlmState:
    ids: list[int]  # the sequence as the engine sees it: visual tokens as prompt-table ids (>= vocab size)
    prompt_length: int
    pos_delta: int
    table: torch.Tensor | None  # [M, H] visual embeddings: the request's prompt table
    cos_sin: torch.Tensor | None  # [max_positions * head_dim] M-RoPE table (Qwen2-VL family)
    seq_id: int  # this sequence's KV-reuse key: its blocks are reused by its own later requests only

    @property
    def length(self) -> int:
        return len(self.ids)


class TrtLlmRuntime:
    def __init__(self, target: Target, engine_dir: str | Path, max_len: int, bindings=None):
        """`target`: the reference Hugging Face target (tokenizer, positions, LM head); `engine_dir`: the
        TensorRT-LLM target engine built by `sparrow.convert.trtllm_engine`. `bindings`: the Executor API
        (default `tensorrt_llm.bindings.executor`; tests pass one with the same contract on transformers)."""
        self.tle = tle = bindings if bindings is not None else executor_module()
        self.target = target
        self.tokenizer = target.tokenizer
        self.eos_token_ids = target.eos_token_ids
        self.num_layers = target.num_layers
        self.max_len = max_len
        self.engine_dir = Path(engine_dir)
        self.lm_head = target.model.lm_head
        text = target.model.config.text_config
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.rope = text.rope_parameters
        self.max_positions = text.max_position_embeddings
        self.sequences = itertools.count(1)
        self.hidden_layers, dtype = engine_outputs(self.engine_dir)
        self.engine_dtype = getattr(torch, dtype)  # the prompt table must be in the engine's dtype
        if self.num_layers not in self.hidden_layers:
            raise TargetError(f"the target engine in {engine_dir} does not output the final hidden state "
                              f"(layer {self.num_layers}), which the logits are computed from: rebuild it")
        self.executor = tle.Executor(
            self.engine_dir, tle.ModelType.DECODER_ONLY,
            tle.ExecutorConfig(max_beam_width=1, kv_cache_config=tle.KvCacheConfig(enable_block_reuse=True),
                               additional_model_outputs=[tle.AdditionalModelOutput(hidden_output_name(k), True)
                                                         for k in self.hidden_layers]))

    def prepare(self, frames, prompt: str) -> Prompt:
        return self.target.prepare(frames, prompt)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, layers: tuple[int, ...] = ()) -> tuple[TrtLlmState, StepOutput]:
        ids = prompt.input_ids[0].clone()  # [T]
        table = self.target.prompt_visual_features(prompt)  # [M, H]
        ids[prompt.visual_mask] = self.target.vocab_size + torch.arange(table.shape[0])  # prompt-table rows, in order
        positions, delta = self.target.positions(prompt)
        cos_sin = None
        if self.target.arch != "llava_onevision":
            cos_sin = mrope_cos_sin(positions[:, 0], delta, self.head_dim, self.rope["rope_theta"],
                                    list(self.rope["mrope_section"]), self.max_positions)
        state = TrtLlmState(ids.tolist(), len(ids), delta, table.to(self.engine_dtype), cos_sin,
                            next(self.sequences))
        hidden = self._forward(state, len(ids), layers)
        return state, StepOutput(self.lm_head(hidden[self.num_layers][:, -1:]), {k: hidden[k] for k in layers})

    @torch.inference_mode()
    def step(self, state: TrtLlmState, tokens: torch.Tensor, tree_mask: torch.Tensor | None = None,
             depths: torch.Tensor | None = None, layers: tuple[int, ...] = ()) -> StepOutput:
        """T new tokens `[1, T]` after the sequence: a chain (a tree needs a mask a context request cannot take)."""
        if tree_mask is not None:
            raise TargetError("the tensorrt_llm backend verifies chains only (a token tree needs an attention "
                              "mask that TensorRT-LLM's context requests do not take); use a chain draft")
        if state.length + tokens.shape[1] > self.max_len:
            raise TargetError(f"sequence of {state.length + tokens.shape[1]} tokens > max_len {self.max_len}")
        state.ids.extend(int(t) for t in tokens[0])
        hidden = self._forward(state, tokens.shape[1], layers)
        return StepOutput(self.lm_head(hidden[self.num_layers]), {k: hidden[k] for k in layers})

    def truncate(self, state: TrtLlmState, length: int) -> None:
        if length < state.prompt_length:
            raise TargetError(f"cannot truncate to {length}: the prompt is {state.prompt_length} tokens")
        del state.ids[length:]

    def keep(self, state: TrtLlmState, start: int, indices: list[int]) -> None:
        """After a chain verify from `start`: keep its first len(indices) tokens (nothing to move: the next
        request simply leaves the rest out)."""
        if list(indices) != list(range(len(indices))):
            raise TargetError(f"the tensorrt_llm backend keeps chain prefixes only, got path {indices}")
        self.truncate(state, start + len(indices))

    def _forward(self, state: TrtLlmState, n: int, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """One context request over the whole sequence: hidden states `[1, n, H]` of its last `n` tokens at
        `layers` and the last layer (the logits' input; the caller applies the LM head only where it needs
        logits: a prefill's last row, not every visual token)."""
        tle = self.tle
        wanted = sorted(set(layers) | {self.num_layers})
        missing = [k for k in wanted if k not in self.hidden_layers]
        if missing:
            raise TargetError(f"the target engine in {self.engine_dir} outputs hidden layers {self.hidden_layers}, "
                              f"not {missing}: rebuild it with those layers (`--layers`)")
        outputs = [tle.AdditionalModelOutput(hidden_output_name(k), True) for k in wanted]
        extra = {"prompt_tuning_config": tle.PromptTuningConfig(state.table, [state.seq_id] * state.length)}
        if state.cos_sin is not None:
            extra["mrope_config"] = tle.MropeConfig(state.cos_sin, state.pos_delta)
        request = tle.Request(state.ids, max_tokens=1, streaming=False,
                              sampling_config=tle.SamplingConfig(beam_width=1),
                              output_config=tle.OutputConfig(additional_model_outputs=outputs), **extra)
        request_id = self.executor.enqueue_request(request)
        (response,) = self.executor.await_responses(request_id)
        if response.has_error():
            raise RuntimeError(f"TensorRT-LLM refused the target request: {response.error_msg}")
        got = {o.name: torch.as_tensor(o.output) for o in response.result.additional_outputs}
        hidden = {}
        for k in wanted:
            name = hidden_output_name(k)
            if name not in got:
                raise RuntimeError(f"TensorRT-LLM returned no {name!r} for the target request")
            rows = got[name].reshape(-1, got[name].shape[-1])  # [computed context tokens, H]
            if rows.shape[0] < n:
                raise RuntimeError(f"{name}: {rows.shape[0]} context rows for {n} new tokens")
            hidden[k] = rows[-n:][None].to(self.lm_head.weight.device, self.lm_head.weight.dtype)  # [1, n, H]
        return hidden


def engine_outputs(engine_dir: str | Path) -> tuple[list[int], str]:
    """The hidden-state layers the target engine in `engine_dir` outputs and its dtype (`sparrow_outputs.json`)."""
    path = Path(engine_dir) / OUTPUTS_FILE
    if not path.is_file():
        raise TargetError(f"{engine_dir} has no {OUTPUTS_FILE}: build the target engine with "
                          "`python -m sparrow.convert.trtllm_engine` (plain trtllm-build engines lack the hidden "
                          "states the draft reads)")
    record = json.loads(path.read_text())
    return sorted(int(k) for k in record["hidden_layers"]), record["dtype"]

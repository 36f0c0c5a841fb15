"""The target runtime: a Hugging Face Vid-LLM's own layers over a KV cache the runtime owns.

The decoder layers, norms and rotary embeddings are transformers' own modules (so the model is
exactly the one its weights define); the cache (`kv_cache.SlotKVCache`) and the attention
(`attention.runtime_attention`, registered with transformers' attention interface) are ours:
preallocated, written in place, rolled back by length, GQA read natively, each KV block read once
for all query rows; on CPU the text linears of short steps run the C++ small-M kernel
(`small_m_linears`). Same interface as `target.Target`: prefill, step (1..K+1 tokens or a token
tree, hidden states of chosen layers out), truncate; a TensorRT-LLM backend plugs in here too.
"""

from __future__ import annotations

import os
import resource
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import runtime_attention
from .kv_cache import SlotKVCache
from .target import Prompt, StepOutput, Target, TargetError

ATTN_NAME = "sparrow_runtime"
SMALL_M = 16  # rows up to which float32 CPU text linears use the C++ small-M kernel (decode, verify, trees)
LINEAR_BACKENDS = ("auto", "torch", "cpp")


def _small_m_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() <= SMALL_M * self.in_features and x.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.ops.sparrow.small_linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def small_m_linears(modules: list[torch.nn.Module]) -> int:
    """Route the nn.Linear layers under `modules` through `sparrow::small_linear` (`csrc/linear.cpp`) for
    inference calls of at most SMALL_M rows; prefill chunks stay on F.linear. Returns how many were routed.

    `SPARROW_LINEAR=torch` leaves them alone, `cpp` requires the op; by default float32 CPU layers are
    routed where the op builds. Why: the BLAS path runs a 6-row verify step's products at a third of
    the speed of a 1-row decode step's, the C++ loop at about the same (both read the weights once).
    """
    choice = os.environ.get("SPARROW_LINEAR", "").strip().lower() or "auto"
    if choice not in LINEAR_BACKENDS:
        raise ValueError(f"SPARROW_LINEAR must be one of {', '.join(LINEAR_BACKENDS)}, got {choice!r}")
    linears = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear)]
    if choice == "torch" or not linears:
        return 0
    from . import attention_cpp

    if choice == "auto":
        w = linears[0].weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not attention_cpp.available():
            return 0
    attention_cpp.load()
    for m in linears:
        m.forward = types.MethodType(_small_m_forward, m)
    return len(linears)


@dataclass
class RuntimeState:
    slot: int
    pos_delta: int  # rotary position of cache slot i (i >= prompt length) is i + pos_delta
    prompt_length: int
    cache: SlotKVCache

    @property
    def length(self) -> int:
        return self.cache.lengths[self.slot]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Runtime:
    def __init__(self, target: Target, max_len: int = 32768, slots: int = 1, prefill_chunk: int = 4096):
        """Takes over `target`'s model: its text layers attend through the runtime's cache from now on."""
        from transformers import AttentionInterface

        self.target = target
        model = target.model
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        text = model.config.text_config
        AttentionInterface.register(ATTN_NAME, runtime_attention)
        self.lm.config._attn_implementation = ATTN_NAME
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache = SlotKVCache(text.num_hidden_layers, slots, text.num_key_value_heads, head_dim, max_len,
                                 dtype=model.dtype, device=model.device)
        self.prefill_chunk = prefill_chunk
        small_m_linears([self.lm, self.lm_head])
        self.num_layers = target.num_layers
        self.tokenizer = target.tokenizer
        self.eos_token_ids = target.eos_token_ids

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def prepare(self, frames, prompt: str) -> Prompt:
        return self.target.prepare(frames, prompt)

    # ---- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompt: Prompt, layers: tuple[int, ...] = (), slot: int = 0) -> tuple[RuntimeState, StepOutput]:
        """Prefill in chunks (bounded memory). Logits of the last position only; hidden states of all."""
        embeds, positions, delta = self._prompt_embeddings(prompt)  # [1, T, H], [3, 1, T] or [1, T]
        t = embeds.shape[1]
        self.cache.truncate(slot, 0)
        state = RuntimeState(slot, delta, t, self.cache)
        hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        last = None
        for c0 in range(0, t, self.prefill_chunk):
            c1 = min(t, c0 + self.prefill_chunk)
            out = self._forward([slot], embeds[:, c0:c1], positions[..., c0:c1], None, layers)
            for layer in layers:
                hidden[layer].append(out.hidden_states[layer])
            last = out.last_hidden_state[:, -1:]
        logits = self.lm_head(last)  # [1, 1, V]
        return state, StepOutput(logits, {k: torch.cat(v, dim=1) for k, v in hidden.items()})

    def _prompt_embeddings(self, prompt: Prompt):
        ids = prompt.input_ids.to(self.target.model.device)
        embeds = self.lm.embed_tokens(ids)  # [1, T, H]
        feats = self.target.prompt_visual_features(prompt).to(embeds.dtype)  # [M, H]
        positions, delta = self.target.positions(prompt)
        embeds[0, prompt.visual_mask.to(embeds.device)] = feats
        return embeds, positions, delta

    # ---- decode / verify ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, state: RuntimeState, tokens: torch.Tensor, tree_mask: torch.Tensor | None = None,
             depths: torch.Tensor | None = None, layers: tuple[int, ...] = ()) -> StepOutput:
        """T new tokens `[1, T]` after the cache: a chain, or a tree (tree_mask `[T, T]`, depths `[T]`)."""
        return self.step_batch([state], tokens, tree_mask, depths, layers)

    @torch.inference_mode()
    def step_batch(self, states: list[RuntimeState], tokens: torch.Tensor, tree_mask: torch.Tensor | None = None,
                   depths: torch.Tensor | None = None, layers: tuple[int, ...] = ()) -> StepOutput:
        """Several sequences, each at its own length, T new tokens each: tokens `[B, T]`."""
        b, t = tokens.shape
        if b != len(states):
            raise TargetError(f"{b} token rows for {len(states)} sequences")
        if tree_mask is not None and tree_mask.shape != (t, t):
            raise TargetError(f"tree_mask must be [{t}, {t}], got {list(tree_mask.shape)}")
        if depths is None:
            depths = torch.arange(t)
        dev = self.target.model.device
        base = torch.tensor([s.length + s.pos_delta for s in states], device=dev)
        positions = base[:, None] + depths.to(dev)[None]  # [B, T]
        if self.target.arch != "llava_onevision":
            positions = positions[None].expand(3, b, t)  # text tokens: one position on all three M-RoPE axes
        embeds = self.lm.embed_tokens(tokens.to(dev))  # [B, T, H]
        out = self._forward([s.slot for s in states], embeds, positions, tree_mask, layers)
        return StepOutput(self.lm_head(out.last_hidden_state), {k: out.hidden_states[k] for k in layers})

    def truncate(self, state: RuntimeState, length: int) -> None:
        if length < state.prompt_length:
            raise TargetError(f"cannot truncate to {length}: the prompt is {state.prompt_length} tokens")
        self.cache.truncate(state.slot, length)

    def keep(self, state: RuntimeState, start: int, indices: list[int]) -> None:
        """After a tree verify from `start`: keep the accepted nodes' K/V, in path order."""
        if start < state.prompt_length:
            raise TargetError(f"cannot rewrite the cache before the prompt's end ({state.prompt_length})")
        self.cache.keep(state.slot, start, indices)

    def _forward(self, slots, embeds, positions, tail_mask, layers):
        t = embeds.shape[1]
        if tail_mask is None:
            tail_mask = torch.ones(t, t, dtype=torch.bool).tril_()
        plan = self.cache.begin(slots, t, tail_mask.to(embeds.device))
        out = self.lm(inputs_embeds=embeds, position_ids=positions, cache=self.cache, use_cache=True,
                      output_hidden_states=bool(layers), sparrow_plan=plan)
        self.cache.commit()
        return out

"""Decoding strategies over a `Target` (stock HF cache) or a `Runtime` (owned cache). `ar` is exact."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .runtime import Runtime
from .target import Prompt, Target


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature). logits: [V]."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def hold_eos(logits: torch.Tensor, index: torch.Tensor, min_new_tokens: int, eos: set[int]) -> torch.Tensor:
    """transformers' `min_new_tokens`: end-of-turn is impossible before that many new tokens.

    logits `[N, V]`, row i choosing output token number `index[i]` (0-based); returns a copy if held.
    """
    held = index.to(logits.device) < min_new_tokens  # [N]
    if not eos or not bool(held.any()):
        return logits
    logits = logits.clone()
    logits[held.nonzero()[:, :1], torch.tensor(sorted(eos), device=logits.device)] = float("-inf")
    return logits


def check_lengths(max_new_tokens: int, min_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must lie in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")


def generate_ar(target: Target | Runtime, frames: np.ndarray, prompt: str, max_new_tokens: int = 64,
                temperature: float = 0.0, seed: int = 0, min_new_tokens: int = 0,
                on_tokens: Callable[[list[int]], None] | None = None,
                prepared: Prompt | None = None) -> GenerationResult:
    """Plain autoregressive decoding: one target step per token, stopping at end-of-turn.

    `on_tokens` (streaming) is called with each committed token as soon as it is decided.
    `prepared`: `target.prepare(frames, prompt)` already done by the caller (not repeated).
    """
    check_lengths(max_new_tokens, min_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    p = prepared if prepared is not None else target.prepare(frames, prompt)
    state, out = target.prefill(p)
    t1 = time.perf_counter()
    tokens: list[int] = []
    while True:
        logits = hold_eos(out.logits[0, -1:], torch.tensor([len(tokens)]), min_new_tokens, target.eos_token_ids)
        tok = _pick(logits[0], temperature, gen)
        tokens.append(tok)
        if on_tokens is not None:
            on_tokens([tok])
        if tok in target.eos_token_ids or len(tokens) == max_new_tokens:
            break
        out = target.step(state, torch.tensor([[tok]]))
    t2 = time.perf_counter()
    decode_s = t2 - t1
    stats = {"strategy": "ar", "prompt_tokens": int(p.input_ids.shape[1]),
             "visual_tokens": int(p.visual_mask.sum()), "new_tokens": len(tokens),
             "prefill_s": round(t1 - t0, 4), "decode_s": round(decode_s, 4),
             "tokens_per_s": round(len(tokens) / decode_s, 2) if decode_s > 0 else None,
             "target_steps": len(tokens) - 1}
    text = target.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return GenerationResult(tokens, text, stats)

"""`sparrow eval target`: question-answer accuracy on fresh demo videos, with and without the frames."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from .demo.data import DEFAULT_FRAMES, DEFAULT_SIDE, make_example
from .processing import VisionSpec, build_batch

EVAL_SEED_BASE = 2_000_000_000  # training draws seeds below 1e9, so these videos are never trained on


@dataclass
class EvalResult:
    videos: int
    accuracy: float
    blank_accuracy: float
    by_kind: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def answer(model, tokenizer, spec: VisionSpec, frames, prompt: str, max_new_tokens: int = 4) -> str:
    inputs = build_batch(tokenizer, spec, [(frames, prompt, None)])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def eval_target(model, tokenizer, videos: int = 200, seed: int = 0, num_frames: int = DEFAULT_FRAMES,
                side: int = DEFAULT_SIDE, progress: bool = True) -> EvalResult:
    spec = VisionSpec.from_config(model.config.vision_config)
    model.eval()
    hits, blank_hits, per_kind = 0, 0, {}
    for i in tqdm(range(videos), desc="eval target", disable=not progress):
        s = EVAL_SEED_BASE + seed * 100_000 + i
        ex = make_example(s, task="question", num_frames=num_frames, side=side)
        ok = answer(model, tokenizer, spec, ex.frames, ex.prompt) == ex.answer
        blank = make_example(s, task="question", num_frames=num_frames, side=side, blank=True)
        hits += ok
        blank_hits += answer(model, tokenizer, spec, blank.frames, blank.prompt) == blank.answer
        n, k = per_kind.get(ex.kind, (0, 0))
        per_kind[ex.kind] = (n + 1, k + ok)
    return EvalResult(videos, hits / videos, blank_hits / videos,
                      {k: ok / n for k, (n, ok) in sorted(per_kind.items())})

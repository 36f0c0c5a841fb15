"""`sparrow eval target`: question-answer accuracy on fresh demo videos, with and without the frames."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from .demo.data import DEFAULT_FRAMES, DEFAULT_SIDE, make_example
from .demo.text import attribute_index, questions
from .demo.world import frames_for_visual_tokens, make_scene
from .processing import VisionSpec, build_batch

EVAL_SEED_BASE = 2_000_000_000  # training draws seeds below 1e9, so these videos are never trained on


def eval_seed(seed: int, i: int) -> int:
    """The i-th video of evaluation set `seed`: accuracy and binding checks read the same videos."""
    return EVAL_SEED_BASE + seed * 100_000 + i


def trained_with_echo(model_dir) -> bool:
    """Whether a target directory's model was trained on echoed answers (its `training.json`), so it is
    asked and scored in that form; directories without the record (any HF model) get one-word answers."""
    import json
    from pathlib import Path

    record = Path(model_dir) / "training.json"
    return bool(record.is_file() and json.loads(record.read_text()).get("config", {}).get("echo_answers", False))


@dataclass
class EvalResult:
    videos: int
    accuracy: float
    blank_accuracy: float
    by_kind: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def answer(model, tokenizer, spec: VisionSpec, frames, prompt: str, max_new_tokens: int = 8) -> str:
    inputs = build_batch(tokenizer, spec, [(frames, prompt, None)])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def eval_target(model, tokenizer, videos: int = 200, seed: int = 0, num_frames: int = DEFAULT_FRAMES,
                side: int = DEFAULT_SIDE, progress: bool = True, echo: bool = False) -> EvalResult:
    """`echo`: the model was trained on answers that name the asked shape first (`questions`)."""
    spec = VisionSpec.from_config(model.config.vision_config)
    model.eval()
    hits, blank_hits, per_kind = 0, 0, {}
    for i in tqdm(range(videos), desc="eval target", disable=not progress):
        s = eval_seed(seed, i)
        ex = make_example(s, task="question", num_frames=num_frames, side=side, echo=echo)
        ok = answer(model, tokenizer, spec, ex.frames, ex.prompt) == ex.answer
        blank = make_example(s, task="question", num_frames=num_frames, side=side, blank=True, echo=echo)
        hits += ok
        blank_hits += answer(model, tokenizer, spec, blank.frames, blank.prompt) == blank.answer
        n, k = per_kind.get(ex.kind, (0, 0))
        per_kind[ex.kind] = (n + 1, k + ok)
    return EvalResult(videos, hits / videos, blank_hits / videos,
                      {k: ok / n for k, (n, ok) in sorted(per_kind.items())})


@dataclass
class BindingResult:
    """Does the answer follow the asked shape? Each video of two or more shapes is asked the colour
    (when it appears) of each of its shapes in turn."""
    videos: int  # videos of two or more shapes
    changed: int  # of those, videos where not every asked shape got the same answer
    accuracy: float  # over all the (video, shape) questions asked

    def to_json(self) -> dict:
        return asdict(self)


def eval_binding(model, tokenizer, videos: int = 80, seed: int = 0, num_frames: int = DEFAULT_FRAMES,
                 side: int = DEFAULT_SIDE, progress: bool = True, echo: bool = False) -> BindingResult:
    """A model that answers by the question's type alone gives one answer per video whatever shape is
    asked; accuracy alone hides that, since one shape's colour is often right by luck."""
    spec = VisionSpec.from_config(model.config.vision_config)
    model.eval()
    multi, changed, hits, asked = 0, 0, 0, 0
    for i in tqdm(range(videos), desc="eval binding", disable=not progress):
        if len(make_scene(eval_seed(seed, i)).shapes) < 2:  # skip before rendering and encoding the video
            continue
        ex = make_example(eval_seed(seed, i), task="question", num_frames=num_frames, side=side)
        qs = [q for q in questions(ex.scene, echo) if q.kind == "colour_appear"]
        got = [answer(model, tokenizer, spec, ex.frames, q.question) for q in qs]
        multi += 1
        # an echoed answer names the asked shape, so compare the colour alone
        changed += len({g.split()[attribute_index(g)] if g else g for g in got}) > 1
        hits += sum(g == q.answer for g, q in zip(got, qs))
        asked += len(qs)
    return BindingResult(multi, changed, hits / max(asked, 1))


@dataclass
class CaptionResult:
    """Captions of long videos against the ground truth, word by word from the start: a target that never
    saw long videos wrote a first clause there and then repeated fragments, which no short-video
    question shows."""
    videos: int
    visual_tokens: int
    prefix_share: float  # mean share of the ground-truth caption's words matched before the first difference
    exact: float  # share of captions equal to the ground truth

    def to_json(self) -> dict:
        return asdict(self)


def eval_captions(model, tokenizer, videos: int = 8, visual_tokens: int = 25600, seed: int = 0,
                  progress: bool = True) -> CaptionResult:
    spec = VisionSpec.from_config(model.config.vision_config)
    model.eval()
    frames, side = frames_for_visual_tokens(visual_tokens)
    shares, exact = [], 0
    for i in tqdm(range(videos), desc=f"eval captions at {visual_tokens} visual tokens", disable=not progress):
        ex = make_example(eval_seed(seed, i), task="caption", num_frames=frames, side=side)
        want = ex.answer.split()
        got = answer(model, tokenizer, spec, ex.frames, ex.prompt, max_new_tokens=len(want) + 8).split()
        same = next((j for j, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        shares.append(same / len(want))
        exact += got == want
    return CaptionResult(videos, visual_tokens, sum(shares) / videos, exact / videos)

"""Demo examples: a scene rendered, round-tripped through H.264 like a real upload, plus one prompt.

Training, evaluation and the draft's data generation all draw examples here, so the target sees
at train time exactly the pixels PyAV gives at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..video import decode, encode
from .text import CAPTION_PROMPT, caption, clause, sample_question, shape_prompt
from .world import Scene, blank_like, make_scene, render

DEFAULT_FRAMES = 32
DEFAULT_SIDE = 64


@dataclass
class Example:
    scene: Scene
    frames: np.ndarray  # [N, H, W, 3] uint8, decoded from mp4
    prompt: str
    answer: str
    kind: str  # "caption" or a question kind
    shape: str | None = None  # the kind of shape a question asks about


def make_example(seed: int, task: str = "mixed", num_frames: int = DEFAULT_FRAMES,
                 side: int = DEFAULT_SIDE, blank: bool = False, n_shapes: int | None = None,
                 echo: bool = False) -> Example:
    """task: "caption", "question", "mixed" (half each, chosen by the seed) or "shape" (one shape,
    drawn by the seed, described by its kind: "describe the square ." -> its clause); `echo`: answers
    about one shape name it first (`questions`)."""
    if task not in ("caption", "question", "mixed", "shape"):
        raise ValueError(f"task must be caption, question, mixed or shape, got {task!r}")
    rng = np.random.default_rng([seed, 7])
    scene = make_scene(seed, n_shapes)
    frames = render(scene, num_frames, side, side)
    if blank:
        frames = blank_like(frames)
    frames = decode(encode(frames))
    if task == "shape":
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        return Example(scene, frames, shape_prompt(shape.kind), clause(shape), "shape", shape.kind)
    if task == "caption" or (task == "mixed" and rng.random() < 0.5):
        return Example(scene, frames, CAPTION_PROMPT, caption(scene), "caption")
    qa = sample_question(scene, rng, echo)
    return Example(scene, frames, qa.question, qa.answer, qa.kind, qa.shape)

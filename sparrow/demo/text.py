"""What is said about a demo scene: captions, questions and answers, all from its event log."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import COLOURS, DIRECTIONS, KINDS, Scene, Shape

NUMBERS = ("one", "two", "three", "four")
CAPTION_PROMPT = "describe the video ."
QUESTION_KINDS = ("colour_appear", "colour_end", "direction", "count", "first")


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str
    shape: str | None = None  # the kind of shape asked about, for questions about one shape


def clause(shape: Shape) -> str:
    """What one shape does: 'a red square appears and moves left , then turns blue .'."""
    words = f"a {shape.colour} {shape.kind} appears and moves {shape.direction}"
    if shape.new_colour is not None:
        words += f" , then turns {shape.new_colour}"
    if shape.disappear is not None:
        words += " , then disappears"
    return words + " ."


def caption(scene: Scene) -> str:
    """One clause per shape, in order of appearance: 'a red square appears and moves left , ...'."""
    return " ".join(clause(s) for s in scene.shapes)


def shape_prompt(kind: str) -> str:
    """Ask for one shape's clause by its kind: every word of the answer is about the asked shape."""
    return f"describe the {kind} ."


def questions(scene: Scene, echo: bool = False) -> list[QA]:
    """Every question the scene answers, one word each; with `echo`, a question about one shape is
    answered by its kind, then the word ("square red ."): the word that needs the video is predicted at
    the kind token itself, whose own embedding carries the kind. (A model trained on "the square is red ."
    did not carry the kind even one token on: it was not decodable at the "is" position, README.)"""
    def say(kind: str, word: str) -> str:
        return f"{kind} {word} ." if echo else word

    out = [
        QA("count", "how many shapes are there ?", NUMBERS[len(scene.shapes) - 1]),
        QA("first", "which shape appears first ?", scene.shapes[0].kind),
    ]
    for s in scene.shapes:
        out.append(QA("colour_appear", f"what colour is the {s.kind} when it appears ?", say(s.kind, s.colour),
                      s.kind))
        out.append(QA("colour_end", f"what colour is the {s.kind} at the end ?", say(s.kind, s.final_colour),
                      s.kind))
        out.append(QA("direction", f"which way does the {s.kind} move ?", say(s.kind, s.direction), s.kind))
    return out


def attribute_index(answer: str) -> int:
    """Word index of what the video tells in an answer from `questions`: a one-word answer itself, or
    the word after the kind in an echoed one ("square red ." -> 1)."""
    return 1 if answer.endswith(" .") and len(answer.split()) == 3 else 0


def sample_question(scene: Scene, rng: np.random.Generator, echo: bool = False) -> QA:
    """A question drawn with its kind uniform, so no kind dominates training or evaluation."""
    qs = questions(scene, echo)
    kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    pool = [q for q in qs if q.kind == kind]
    return pool[int(rng.integers(len(pool)))]


def vocabulary() -> list[str]:
    """Every word the demo task can produce, in a fixed order (the tokenizer's ids follow it)."""
    words = [".", ",", "?", "a", "and", "then", "the", "is", "it", "at", "end", "when", "what",
             "which", "how", "many", "are", "there", "way", "does", "shape", "shapes", "first",
             "colour", "appears", "moves", "move", "turns", "disappears", "describe", "video"]
    words += list(KINDS) + list(COLOURS) + list(DIRECTIONS) + list(NUMBERS)
    assert len(set(words)) == len(words), "duplicate word in the demo vocabulary"
    return words

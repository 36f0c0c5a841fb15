import numpy as np
import pytest

from sparrow.demo.text import CAPTION_PROMPT, NUMBERS, caption, questions, vocabulary
from sparrow.demo.tokenizer import build_tokenizer, save_tokenizer
from sparrow.demo.world import (BACKGROUND, COLOURS, KINDS, Scene, blank_like, frames_for_visual_tokens,
                                make_scene, render)


def test_scene_is_deterministic_and_valid():
    for seed in range(200):
        a, b = make_scene(seed), make_scene(seed)
        assert a.to_json() == b.to_json()
        assert 1 <= len(a.shapes) <= 4
        assert len({s.kind for s in a.shapes}) == len(a.shapes)  # "the square" is unambiguous
        times = [s.appear for s in a.shapes]
        assert times == sorted(times) and times[0] == 0.0
        assert all(t2 - t1 >= 0.1 - 1e-9 for t1, t2 in zip(times, times[1:]))
        assert Scene.from_json(a.to_json()).to_json() == a.to_json()
    assert {len(make_scene(s).shapes) for s in range(200)} == {1, 2, 3, 4}


def test_render_shows_each_shape_in_its_colour_and_place():
    for seed in range(30):
        scene = make_scene(seed)
        n, side = 40, 96
        frames = render(scene, n, side, side)
        assert frames.shape == (n, side, side, 3) and frames.dtype == np.uint8
        for i in range(n):
            t = (i + 0.5) / n
            for s in filter(lambda s: s.visible(t), scene.shapes):
                cx, cy = s.centre(t)
                px = frames[i, int(cy * side), int(cx * side)]
                assert tuple(px) == COLOURS[s.colour_at(t)], (seed, i, s.kind)
        # before the second shape appears, only the first one is drawn
        if len(scene.shapes) > 1:
            first_frame = frames[0].reshape(-1, 3)
            colours = {tuple(c) for c in np.unique(first_frame, axis=0)}
            assert colours == {BACKGROUND, COLOURS[scene.shapes[0].colour]}


def test_blank_frames_carry_no_content():
    f = render(make_scene(1), 8, 32, 32)
    b = blank_like(f)
    assert b.shape == f.shape and np.all(b == BACKGROUND)


def test_caption_and_answers_follow_the_event_log():
    scene = make_scene(3)
    text = caption(scene)
    assert text.count(" appears and moves ") == len(scene.shapes)
    for s in scene.shapes:
        assert f"a {s.colour} {s.kind} appears and moves {s.direction}" in text
        assert (f"then turns {s.new_colour}" in text) == (s.new_colour is not None)
    qa = {q.question: q.answer for q in questions(scene)}
    assert qa["how many shapes are there ?"] == NUMBERS[len(scene.shapes) - 1]
    assert qa["which shape appears first ?"] == scene.shapes[0].kind
    for s in scene.shapes:
        assert qa[f"which way does the {s.kind} move ?"] == s.direction
        assert qa[f"what colour is the {s.kind} at the end ?"] == s.final_colour


def test_answers_depend_on_the_video():
    # across scenes, every question kind takes many answers: a model that ignores frames must guess
    answers = {}
    for seed in range(300):
        for q in questions(make_scene(seed)):
            answers.setdefault(q.kind, []).append(q.answer)
    for kind, vals in answers.items():
        top = max(vals.count(v) for v in set(vals)) / len(vals)
        assert len(set(vals)) >= 4 and top < 0.4, kind


@pytest.mark.parametrize("n", [256, 1024, 4096, 16384, 25600])
def test_visual_token_sizing(n):
    frames, side = frames_for_visual_tokens(n)
    tokens = frames // 2 * (side // 16) ** 2
    assert abs(tokens - n) / n < 0.05
    assert side % 16 == 0 and frames % 2 == 0


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    for seed in range(20):
        scene = make_scene(seed)
        for text in [caption(scene)] + [q.question + " " + q.answer for q in questions(scene)]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    assert set(vocabulary()) <= set(tok.get_vocab())
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user <|vision_start|><|video_pad|><|vision_end|>describe the video ."
                    "<|im_end|><|im_start|>assistant ")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|video_pad|>")) == 1
    assert tok.unk_token_id not in ids


def test_kinds_and_colours():
    assert len(COLOURS) == 8 and len(KINDS) >= 4


def test_training_labels_follow_the_scene():
    """The target's auxiliary labels: per visual token, the covering shape's class, its direction (only
    after the shape's first temporal patch) and its colour when it appeared; background is ignored."""
    from sparrow.demo.model import demo_config
    from sparrow.processing import VisionSpec
    from sparrow.train_target import IGNORE, cell_targets, scene_targets

    spec = VisionSpec.from_config(demo_config().vision_config)
    for seed in range(20):
        scene = make_scene(seed)
        cells = cell_targets(scene, 16, 64, spec).reshape(8, 16)  # [T', h * w]
        direction, colour = (x.reshape(8, 16) for x in scene_targets(scene, cells, 8))
        assert ((cells == 0) == (colour == IGNORE)).all()
        for s in scene.shapes:
            on = (cells > 0) & ((cells - 1) // len(COLOURS) == KINDS.index(s.kind))
            assert on.any(), (seed, s.kind)
            first = np.argmax(on.any(axis=1))
            assert (colour[on] == list(COLOURS).index(s.colour)).all()
            assert (direction[first][on[first]] == IGNORE).all()
            assert (direction[first + 1:][on[first + 1:]] == ["left", "right", "up", "down"].index(s.direction)).all()

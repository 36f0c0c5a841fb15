import numpy as np
import pytest

from sparrow.demo.text import CAPTION_PROMPT, NUMBERS, attribute_index, caption, questions, vocabulary
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


def test_shape_description_is_the_asked_shapes_clause():
    from sparrow.demo.data import make_example

    asked = set()
    for seed in range(40):
        ex = make_example(seed, "shape", num_frames=4, side=32)
        (shape,) = [s for s in ex.scene.shapes if s.kind == ex.shape]
        assert ex.prompt == f"describe the {shape.kind} ." and ex.kind == "shape"
        assert ex.answer.startswith(f"a {shape.colour} {shape.kind} appears and moves {shape.direction}")
        assert ex.answer in caption(ex.scene) and ex.answer.count(" .") == 1
        asked.add(ex.scene.shapes.index(shape))
    assert asked == {0, 1, 2, 3}  # not always the first shape: the kind word picks it
    with pytest.raises(ValueError, match="shape"):
        make_example(0, "describe")


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
    first = build_tokenizer(text_first=True)
    first.save_pretrained(tmp_path / "first")
    first = AutoTokenizer.from_pretrained(tmp_path / "first")
    assert first.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user describe the video .<|vision_start|><|video_pad|><|vision_end|>"
        "<|im_end|><|im_start|>assistant ")
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


def test_cell_labels_match_a_per_cell_count():
    """`cell_targets` against the rule counted cell by cell: the shape covering most of a 16x16 cell (at
    least a fifth of it, the lowest class on a tie) in the first frame of its temporal patch."""
    from sparrow.demo.model import demo_config
    from sparrow.demo.world import object_classes
    from sparrow.processing import VisionSpec
    from sparrow.train_target import cell_targets

    spec = VisionSpec.from_config(demo_config().vision_config)
    for seed, (frames, side) in zip(range(12), [(16, 64), (7, 64), (4, 128)] * 4):
        scene = make_scene(seed)
        got = cell_targets(scene, frames, side, spec).reshape(-1, side // 16, side // 16)  # [T', h, w]
        classes = object_classes(scene, frames, side, side)  # [N, H, W]
        assert got.shape[0] == -(-frames // 2)
        for t in range(got.shape[0]):
            for y in range(side // 16):
                for x in range(side // 16):
                    cell = classes[2 * t, 16 * y:16 * y + 16, 16 * x:16 * x + 16].reshape(-1)
                    counts = np.bincount(cell, minlength=33)[1:]
                    want = 1 + int(counts.argmax()) if counts.max() * 5 >= 256 else 0
                    assert got[t, y, x] == want, (seed, t, y, x)


def test_binding_targets_name_the_words_shape_cells():
    """Each supervised word of a caption or question points at the cells of the shape it is about: those
    showing its first colour for that colour and its kind, those showing its final colour for that one,
    all of them for its direction. Counting and "which first" are not about one shape."""
    from sparrow.demo.data import make_example
    from sparrow.demo.model import demo_config
    from sparrow.demo.tokenizer import build_tokenizer
    from sparrow.processing import VisionSpec
    from sparrow.train_target import bind_targets, cell_targets

    spec, tok = VisionSpec.from_config(demo_config().vision_config), build_tokenizer()
    question_spans = {"colour_appear": "appear", "colour_end": "end", "direction": "all"}
    caption_spans = {"a": "appear", "moves": "all", "turns": "end"}
    spans_seen = set()
    for seed in range(40):
        ex = make_example(seed, "mixed", num_frames=16, side=64)
        cells = cell_targets(ex.scene, 16, 64, spec)
        words = ex.answer.split()
        assert len(tok(ex.answer, add_special_tokens=False)["input_ids"]) == len(words)  # a token a word
        pairs = bind_targets(ex, cells)
        if ex.kind in ("count", "first"):
            assert pairs == []
        for i, idx in pairs:
            if ex.kind == "caption":
                kind = ex.scene.shapes[words[:i].count(".")].kind
                span = "appear" if words[i] == kind else caption_spans[words[i - 1]]
            else:
                kind, span = ex.shape, question_spans[ex.kind]
            shape = next(s for s in ex.scene.shapes if s.kind == kind)
            on = (cells > 0) & ((cells - 1) // len(COLOURS) == KINDS.index(kind))  # [T' * h * w]
            shows = {colour: on & ((cells - 1) % len(COLOURS) == list(COLOURS).index(colour)) for colour in COLOURS}
            expect = {"all": on, "appear": shows[shape.colour], "end": shows[shape.final_colour]}[span]
            assert np.array_equal(idx, np.flatnonzero(expect)), (seed, i, span)
            spans_seen.add(span)
        if ex.kind == "caption":
            assert len(pairs) >= 3 * len(ex.scene.shapes) - 3  # colour, kind, direction of (nearly) all
    assert spans_seen == {"appear", "end", "all"}


def test_binding_loss_is_the_layers_own_attention():
    """The binding loss recomputes one head's attention rows from the layer's inputs; it must equal
    -log(attention mass on the word's cells) read from transformers' eager attention weights."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from sparrow.demo.data import make_example
    from sparrow.demo.model import demo_config
    from sparrow.demo.tokenizer import build_tokenizer
    from sparrow.processing import VisionSpec, build_batch
    from sparrow.train_target import AttentionInputs, bind_targets, cell_targets

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(demo_config(tok)).eval()
    model.set_attn_implementation("eager")
    spec = VisionSpec.from_config(model.config.vision_config)
    examples = [make_example(seed, "mixed", num_frames=16, side=64) for seed in (3, 4, 5, 6)]
    binds = [bind_targets(ex, cell_targets(ex.scene, 16, 64, spec)) for ex in examples]
    assert sum(map(len, binds)) > 4
    batch = build_batch(tok, spec, [(ex.frames, ex.prompt, ex.answer) for ex in examples])
    layer, head = 3, 1
    inputs = AttentionInputs(model.model.language_model.layers[layer].self_attn)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss = inputs.bind_loss(head, batch, binds, model.config.video_token_id)
    expect = []  # [examples], each the mean over its words
    for b, pairs in enumerate(binds):
        answer = int((batch["labels"][b] != -100).nonzero()[0])
        video = int((batch["input_ids"][b] == model.config.video_token_id).nonzero()[0])
        if pairs:
            expect.append(torch.stack([-out.attentions[layer][b, head, answer + i - 1, video + cells].sum().log()
                                       for i, cells in pairs]).mean())
    torch.testing.assert_close(loss, torch.stack(expect).mean(), rtol=1e-4, atol=1e-5)


def test_probe_loss_is_zero_not_nan_without_labels_and_tiny_videos_are_validated():
    import torch

    from sparrow.train_target import IGNORE, TargetTrainConfig, _probe_ce

    logits = torch.randn(5, 4, requires_grad=True)
    none = _probe_ce(logits, torch.full((5,), IGNORE))
    none.backward()
    assert float(none) == 0.0 and torch.equal(logits.grad, torch.zeros(5, 4))
    some = torch.tensor([IGNORE, 2, IGNORE, 0, IGNORE])
    torch.testing.assert_close(_probe_ce(logits, some), torch.nn.functional.cross_entropy(logits[[1, 3]], some[[1, 3]]))
    with pytest.raises(ValueError, match="tiny_video"):
        TargetTrainConfig(tiny_steps=10, tiny_video=(4, 20))
    with pytest.raises(ValueError, match="shape_share"):
        TargetTrainConfig(shape_share=1.5)


def test_copy_stage_batches_ask_for_one_shape_on_tiny_videos():
    """The copy stage's steps: every example "describe the <kind> ." on a tiny video; afterwards the usual mix."""
    from sparrow.demo.model import demo_config
    from sparrow.demo.tokenizer import build_tokenizer
    from sparrow.processing import VisionSpec
    from sparrow.train_target import TargetTrainConfig, _batch

    tok = build_tokenizer()
    spec = VisionSpec.from_config(demo_config(tok).vision_config)
    cfg = TargetTrainConfig(copy_steps=2, batch_size=6, long_every=0)
    asks = [f"describe the {k} ." for k in KINDS]
    copy, _ = _batch(cfg, tok, spec, 1)
    assert all(any(a in tok.decode(ids) for a in asks) for ids in copy["input_ids"])
    assert all(t * h * w // 4 == 8 for t, h, w in copy["video_grid_thw"].tolist())  # 4 frames at 32 px
    after, _ = _batch(cfg, tok, spec, 2)
    assert not any(any(a in tok.decode(ids) for a in asks) for ids in after["input_ids"])
    assert all(t * h * w // 4 > 8 for t, h, w in after["video_grid_thw"].tolist())
    with pytest.raises(ValueError, match="copy_steps"):
        TargetTrainConfig(copy_steps=-1)


def test_echo_answers_name_the_asked_shape_before_its_attribute():
    """With `echo`, a question about one shape is answered "<kind> <word> ." (the same word as
    the one-word answer); the binding supervision points at that word; questions about the scene are as before."""
    from sparrow.demo.data import make_example
    from sparrow.demo.model import demo_config
    from sparrow.demo.tokenizer import build_tokenizer
    from sparrow.processing import VisionSpec
    from sparrow.train_target import bind_targets, cell_targets

    for seed in range(6):
        scene = make_scene(seed)
        for plain, echo in zip(questions(scene), questions(scene, echo=True)):
            assert (plain.kind, plain.question, plain.shape) == (echo.kind, echo.question, echo.shape)
            if plain.shape is None:
                assert echo.answer == plain.answer
            else:
                assert echo.answer == f"{plain.shape} {plain.answer} ."
            assert echo.answer.split()[attribute_index(echo.answer)] == plain.answer
            assert attribute_index(plain.answer) == 0
    tok = build_tokenizer()
    spec = VisionSpec.from_config(demo_config(tok).vision_config)
    pointed = 0
    for seed in range(12):
        ex = make_example(seed, "question", num_frames=16, echo=True)
        assert len(tok(ex.answer, add_special_tokens=False)["input_ids"]) == len(ex.answer.split())
        for i, cells in bind_targets(ex, cell_targets(ex.scene, 16, 64, spec)):
            assert ex.answer.split()[i] == ex.answer.split()[-2] and len(cells)
            pointed += 1
    assert pointed > 3


def test_a_target_trained_on_echoed_answers_is_scored_in_that_form(tmp_path):
    import json

    from sparrow.evaluate import trained_with_echo

    assert not trained_with_echo(tmp_path)  # no record: a plain HF directory
    (tmp_path / "training.json").write_text(json.dumps({"config": {"echo_answers": True}}))
    assert trained_with_echo(tmp_path)
    (tmp_path / "training.json").write_text(json.dumps({"config": {"seed": 0}}))
    assert not trained_with_echo(tmp_path)

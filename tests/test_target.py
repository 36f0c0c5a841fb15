import json

import numpy as np
import pytest
import torch

import tiny_models
from sparrow.demo.world import make_scene, render
from sparrow.generate import generate_ar
from sparrow.target import Target, TargetError

ARCHS = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
PROMPT = "describe the video ."


@pytest.fixture(scope="module", params=ARCHS)
def target(request, tmp_path_factory):
    path = tiny_models.build(request.param, tmp_path_factory.mktemp(request.param))
    t = Target.load(path)
    assert t.arch == request.param
    return t


@pytest.fixture(scope="module")
def frames():
    # 6 temporal patches over a 3x4 merged grid: more temporal than spatial positions, where a
    # wrong decode offset shows (transformers' rope_deltas disagrees with its own forward there)
    return render(make_scene(2), 12, 48, 64)  # [12, 48, 64, 3]


def test_ar_equals_hf_generate(target, frames):
    for seed in range(3):
        f = render(make_scene(seed), 4 + 8 * seed, 48, 64)
        p = target.prepare(f, PROMPT)
        res = generate_ar(target, f, PROMPT, max_new_tokens=16)
        ref = target.model.generate(input_ids=p.input_ids, **p.model_inputs, max_new_tokens=16, do_sample=False)
        assert res.token_ids == ref[0, p.input_ids.shape[1]:].tolist()


def test_cached_steps_match_a_full_forward(target, frames):
    """Prefill + step over new tokens gives the logits of one uncached forward over everything."""
    p = target.prepare(frames, PROMPT)
    state, first = target.prefill(p)
    new = torch.tensor([[10, 11, 12]])
    out = target.step(state, new)
    ids = torch.cat([p.input_ids, new], dim=1)
    inputs = dict(p.model_inputs)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 3, dtype=torch.int)], 1)
    with torch.inference_mode():
        full = target.model(input_ids=ids, **inputs).logits
    torch.testing.assert_close(out.logits, full[:, -3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first.logits, full[:, :-3], atol=1e-4, rtol=1e-4)


def test_truncate_and_tree_verify(target, frames):
    p = target.prepare(frames, PROMPT)
    state, _ = target.prefill(p, layers=(1, target.num_layers))
    n0 = state.length
    chain_a = target.step(state, torch.tensor([[10, 11, 12]]), layers=(1, 2))
    assert set(chain_a.hidden) == {1, 2} and chain_a.hidden[1].shape == (1, 3, target.hidden_size)
    target.truncate(state, n0)
    assert state.length == n0 and state.cache.get_seq_length() == n0
    again = target.step(state, torch.tensor([[10, 11, 12]]), layers=(1, 2))
    torch.testing.assert_close(again.logits, chain_a.logits)
    torch.testing.assert_close(again.hidden[2], chain_a.hidden[2])
    target.truncate(state, n0 + 1)
    chain_b = target.step(state, torch.tensor([[13]]))  # the branch 10 -> 13
    target.truncate(state, n0)
    # tree: root 10 with children 11 and 13, and 12 under 11
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    out = target.step(state, torch.tensor([[10, 11, 13, 12]]), tree_mask=tree, depths=torch.tensor([0, 1, 1, 2]))
    torch.testing.assert_close(out.logits[:, [0, 1, 3]], chain_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:, 2], chain_b.logits[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(TargetError, match="cannot truncate"):
        target.truncate(state, p.input_ids.shape[1] - 1)


def test_visual_mask_marks_video_positions(target, frames):
    p = target.prepare(frames, PROMPT)
    ids = p.input_ids[0]
    assert torch.equal(p.visual_mask, ids == target.video_token_id)
    assert p.visual_mask.sum() > 0 and (~p.visual_mask).sum() > 5


def test_bad_requests_are_named(target, frames):
    with pytest.raises(TargetError, match="prompt is empty"):
        target.prepare(frames, "  ")
    with pytest.raises(TargetError, match="uint8"):
        target.prepare(frames.astype(np.float32), PROMPT)
    with pytest.raises(TargetError, match="too many frames"):
        target.prepare(np.zeros((target.max_frames + 1, 16, 16, 3), np.uint8), PROMPT)


def test_load_errors(tmp_path):
    with pytest.raises(TargetError, match="no config.json"):
        Target.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TargetError, match="unsupported model_type 'bert'"):
        Target.load(tmp_path)

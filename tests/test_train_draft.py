"""`train_draft`: the data shards (short and long videos), the two phases, resuming, --init."""

import json

import pytest
import torch

import tiny_models
from sparrow.demo.world import make_scene, render
from sparrow.draft import Draft, DraftConfig
from sparrow.draft_data import DraftDataConfig, record
from sparrow.generate import generate_ar
from sparrow.runtime import Runtime
from sparrow.target import Target
from sparrow.train_draft import DraftTrainConfig, backward_batches, make_batch, train_draft

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return Target.load(tiny_models.build("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl")))


def _cfg(target, **kw) -> DraftTrainConfig:
    draft = DraftConfig(hidden_size=64, vocab_size=target.vocab_size, feature_layers=LAYERS, num_heads=4,
                        num_kv_heads=2, intermediate_size=128, window=8, glimpses=4, glimpse_layer=2)
    data = DraftDataConfig(examples=6, shard_size=3, frames=(8,), max_new_tokens=10, feature_layers=LAYERS,
                           long_examples=3, long_videos=((12, 64),), long_min_new_tokens=8)
    base = dict(draft=draft, data=data, steps=4, batch_size=2, holdout=2, long_steps=3, long_batch_size=2,
                long_holdout=1, checkpoint_every=2)
    return DraftTrainConfig(**{**base, **kw})


def test_record_holds_end_of_turn_like_generate(target):
    """A long-video record's answer is the target's greedy answer with end-of-turn held back."""
    runtime = Runtime(target, max_len=512)
    frames = render(make_scene(5), 12, 64, 64)
    cfg = DraftDataConfig(examples=1, max_new_tokens=12, feature_layers=LAYERS, long_examples=0)
    for hold in (0, 9):
        rec = record(runtime, frames, "describe the video .", cfg, torch.float32, min_new_tokens=hold)
        ref = generate_ar(runtime, frames, "describe the video .", 12, min_new_tokens=hold)
        assert rec["ids"][rec["prompt_len"]:].tolist() == ref.token_ids


def test_two_phases_train_on_long_videos_and_resume(target, tmp_path):
    cfg = _cfg(target)
    rec = train_draft(target, cfg, tmp_path / "data", tmp_path / "work", tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "data").glob("*.pt")) == [
        "long_0000.pt", "shard_0000.pt", "shard_0001.pt"]
    long_recs = torch.load(tmp_path / "data" / "long_0000.pt", weights_only=True)
    assert all(int(r["visual"].sum()) == 6 * 16 for r in long_recs)  # 12 frames at 64 px
    assert all(len(r["ids"]) - r["prompt_len"] >= 8 for r in long_recs)  # end-of-turn held back
    assert "holdout_long" in rec and len(rec["holdout_long"]["step_accuracy"]) == 5
    ckpt = torch.load(tmp_path / "work" / "draft_ckpt.pt", weights_only=False)
    assert ckpt["step"] == cfg.steps + cfg.long_steps
    saved = json.loads((tmp_path / "out" / "training.json").read_text())
    assert saved["config"]["long_steps"] == 3
    # a finished run resumes to nothing: same weights out
    again = train_draft(target, cfg, tmp_path / "data", tmp_path / "work", tmp_path / "out2", progress=False)
    assert again["holdout"] == rec["holdout"]
    with pytest.raises(ValueError, match="another training run"):
        train_draft(target, _cfg(target, long_lr=1e-4), tmp_path / "data", tmp_path / "work", None, progress=False)


def test_init_skips_phase_one(target, tmp_path):
    cfg = _cfg(target)
    train_draft(target, cfg, tmp_path / "data", tmp_path / "w1", tmp_path / "first", progress=False)
    rec = train_draft(target, cfg, tmp_path / "data", tmp_path / "w2", tmp_path / "second", progress=False,
                      init=tmp_path / "first")
    assert rec["init"] == str(tmp_path / "first") and rec["init_training"]["config"] == json.loads(json.dumps(cfg.to_json()))
    assert torch.load(tmp_path / "w2" / "draft_ckpt.pt", weights_only=False)["step"] == cfg.steps + cfg.long_steps
    assert [e["step"] for e in rec["log"]] == []  # only phase 2 ran: 3 steps, no 50-step log line
    first, second = Draft.load(tmp_path / "first", target.model), Draft.load(tmp_path / "second", target.model)
    assert not torch.equal(first.q.weight, second.q.weight)  # phase 2 trained on from the first's weights
    with pytest.raises(ValueError, match="starts phase 2"):
        train_draft(target, _cfg(target, long_steps=0), tmp_path / "data", tmp_path / "w4", None,
                    progress=False, init=tmp_path / "first")
    other = DraftConfig(**{**first.cfg.to_json(), "window": 4})
    with pytest.raises(ValueError, match="another config"):
        train_draft(target, _cfg(target, draft=other), tmp_path / "data", tmp_path / "w3", None,
                    progress=False, init=tmp_path / "first")


@pytest.mark.parametrize("attend", ["window", "prefix"])
def test_micro_batches_add_up_to_the_whole_batch(target, attend):
    """Phase 2 trains long and short records as separate micro-batches: same loss and gradients as
    one batch padded to the longest record."""
    runtime = Runtime(target, max_len=512)
    data = DraftDataConfig(examples=1, max_new_tokens=8, feature_layers=LAYERS, long_examples=0)
    recs = [record(runtime, render(make_scene(s), n, 64, 64), "describe the video .", data, torch.float32)
            for s, n in ((1, 24), (2, 24), (3, 8), (4, 8), (5, 8))]
    cfg = _cfg(target).draft
    cfg = DraftConfig(**{**cfg.to_json(), "attend": attend, "glimpses": 0 if attend == "prefix" else 4})
    torch.manual_seed(0)
    draft = Draft.for_target(cfg, target.model).float()

    def grads(groups):
        draft.zero_grad()
        total = backward_batches(draft, [make_batch(g, cfg, 3) for g in groups], 3)
        return total, [p.grad.clone() for p in draft.parameters() if p.grad is not None]

    whole, g_whole = grads([recs])
    split, g_split = grads([recs[:2], recs[2:]])
    assert split == pytest.approx(whole, rel=1e-5)
    for a, b in zip(g_whole, g_split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_long_config_is_validated():
    with pytest.raises(ValueError, match="long_videos"):
        DraftDataConfig(long_examples=2, long_videos=((12, 60),))
    with pytest.raises(ValueError, match="long_min_new_tokens"):
        DraftDataConfig(long_examples=2, long_min_new_tokens=100)
    with pytest.raises(ValueError, match="long_holdout"):
        DraftTrainConfig(data=DraftDataConfig(examples=10, long_examples=2), holdout=2, long_holdout=2)

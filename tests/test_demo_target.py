"""The embedded demo target: loads from the package, is exact under AR decoding, and reads the video."""

import json
import math
import re
import subprocess
import sys

import pytest

from sparrow.demo.data import make_example
from sparrow.demo.model import DEMO_TARGET_DIR
from sparrow.demo.text import attribute_index
from sparrow.demo.world import COLOURS, DIRECTIONS, KINDS
from sparrow.evaluate import eval_seed, eval_target, trained_with_echo
from sparrow.generate import generate_ar
from sparrow.processing import build_batch
from sparrow.target import Target


@pytest.fixture(scope="module")
def target():
    return Target.load(DEMO_TARGET_DIR)


def test_ar_greedy_equals_transformers_generate_over_many_videos(target):
    for i in range(24):
        ex = make_example(3_000_000_000 + i, task="caption" if i % 2 else "question")
        res = generate_ar(target, ex.frames, ex.prompt, max_new_tokens=48)
        inputs = build_batch(target.tokenizer, target.spec, [(ex.frames, ex.prompt, None)])
        ref = target.model.generate(**inputs, max_new_tokens=48, do_sample=False)
        assert res.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist(), i


def test_eval_cli_reports_accuracy_and_binding():
    """`sparrow eval target --binding N`: the binding check asks every shape of the videos of 2+ shapes."""
    from sparrow.demo.world import make_scene
    from sparrow.evaluate import EVAL_SEED_BASE

    out = subprocess.run([sys.executable, "-m", "sparrow.cli", "eval", "target", "--videos", "3", "--binding", "6",
                          "--json"], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["videos"] == 3 and 0 <= res["accuracy"] <= 1 and 0 <= res["blank_accuracy"] <= 1
    multi = sum(len(make_scene(EVAL_SEED_BASE + i).shapes) > 1 for i in range(6))
    bind = res["binding"]
    assert bind["videos"] == multi > 0 and 0 <= bind["changed"] <= multi and 0 <= bind["accuracy"] <= 1


def test_model_reads_the_video(target):
    """Real frames must beat blank frames clearly: the answers come from the video, not a prior.

    The issue's quality bar (>= 90% on 200 videos, blank < 40%) is reported by `sparrow eval target`
    and recorded in README; here a smaller, other set of videos with some slack.
    """
    res = eval_target(target.model, target.tokenizer, videos=60, seed=3, progress=False,
                      echo=trained_with_echo(DEMO_TARGET_DIR))
    assert res.accuracy >= 0.85, res
    assert res.blank_accuracy < 0.4, res


def test_long_video_stays_usable(target):
    """At ~25k visual tokens the caption follows the caption grammar (not just in-vocabulary words) past its
    first sentence: the stage-1 target wrote one clause there and then ended or repeated fragments; the
    long-video stage is what carries it on."""
    ex = make_example(5, task="caption", num_frames=200, side=256)
    res = generate_ar(target, ex.frames, ex.prompt, max_new_tokens=32)
    assert res.stats["visual_tokens"] == 25600
    clause = rf"a ({'|'.join(COLOURS)}) ({'|'.join(KINDS)}) appears and moves ({'|'.join(DIRECTIONS)})"
    assert re.match(rf"{clause}[^.]* \. {clause}", res.text), res.text


def test_caption_eval_scores_captions_word_by_word_from_the_start(target):
    """The score is the share of the ground truth's words matched before the first difference (recomputed here
    from `generate`); at 1,024 visual tokens the target gets well past the first clause (0.48 over these three
    videos; a model blind to the video misses the first colour, under 0.1). The CLI names a video size it
    cannot make before any answering."""
    from sparrow.demo.world import frames_for_visual_tokens
    from sparrow.evaluate import answer, eval_captions

    res = eval_captions(target.model, target.tokenizer, videos=3, visual_tokens=1024, seed=4, progress=False)
    frames, side = frames_for_visual_tokens(1024)
    shares = []
    for i in range(3):
        ex = make_example(eval_seed(4, i), task="caption", num_frames=frames, side=side)
        got = answer(target.model, target.tokenizer, target.spec, ex.frames, ex.prompt, 40).split()
        want = ex.answer.split()
        same = 0
        while same < min(len(got), len(want)) and got[same] == want[same]:
            same += 1
        shares.append(same / len(want))
    assert res.prefix_share == pytest.approx(sum(shares) / 3) and res.prefix_share >= 0.3, res
    err = subprocess.run([sys.executable, "-m", "sparrow.cli", "eval", "target", "--captions", "2",
                          "--caption-visual-tokens", "4"], capture_output=True, text=True, timeout=60)
    assert err.returncode != 0 and "--caption-visual-tokens" in err.stderr and "at least 16" in err.stderr
    err = subprocess.run([sys.executable, "-m", "sparrow.cli", "eval", "target", "--videos", "0"], capture_output=True,
                         text=True, timeout=60)
    assert err.returncode != 0 and "--videos must be >= 1" in err.stderr


def test_cli_demo_video_and_generate(tmp_path):
    video = tmp_path / "v.mp4"
    cli = [sys.executable, "-m", "sparrow.cli"]
    subprocess.run(cli + ["demo", "video", "--seed", "11", "--out", str(video)], check=True, capture_output=True)
    meta = json.loads(video.with_suffix(".json").read_text())
    assert meta["visual_tokens"] == 256 and meta["question"]
    out = subprocess.run(cli + ["generate", "--video", str(video), "--json"], check=True, capture_output=True,
                         text=True)
    res = json.loads(out.stdout)
    assert set(res) == {"text", "token_ids", "stats"} and res["stats"]["tokens_per_s"] > 0
    # the question asks for a colour; the answer has the form of the ground truth's (the asked kind, then
    # the colour, for a target trained on echoed answers) with a colour word where the attribute goes
    assert meta["question"].startswith("what colour")
    got, want, at = res["text"].split(), meta["answer"].split(), attribute_index(meta["answer"])
    assert len(got) == len(want) and got[at] in COLOURS, res["text"]
    assert got[:at] + got[at + 1:] == want[:at] + want[at + 1:], res["text"]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    err = subprocess.run(cli + ["generate", "--video", str(bad), "--prompt", "describe the video ."],
                         capture_output=True, text=True)
    assert err.returncode != 0 and "cannot open video" in err.stderr


def test_cli_train_target_fine_tune_stage_from_a_config(tmp_path):
    """`sparrow train target --config` runs a recipe stage from JSON settings: here two steps of
    binding-supervised fine-tuning from the embedded target, saved as a loadable model; unknown
    settings are named."""
    from sparrow.demo.model import DEMO_TARGET_DIR

    cli = [sys.executable, "-m", "sparrow.cli", "train", "target", "--work-dir", str(tmp_path / "work")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 2, "bind_wieght": 1.0}))
    err = subprocess.run(cli + ["--config", str(bad), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert err.returncode != 0 and "bind_wieght" in err.stderr
    cfg = tmp_path / "stage.json"
    cfg.write_text(json.dumps({"init": str(DEMO_TARGET_DIR), "long_stage": None, "steps": 2, "batch_size": 2,
                               "easy_steps": 0, "long_every": 0, "warmup": 1, "lr": 1e-5, "bind_weight": 1.0,
                               "eval_videos": 2, "shape_share": 0.5, "tiny_steps": 1, "tiny_video": [4, 32]}))
    out = subprocess.run(cli + ["--config", str(cfg), "--out", str(tmp_path / "out"), "--json"], check=True,
                         capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["config"]["bind_weight"] == 1.0 and len(rec["loss_every_100"]) == 1
    assert rec["config"]["tiny_video"] == [4, 32] and all(math.isfinite(x) for x in rec["loss_every_100"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())  # fp16 weights, said so in every config
    assert saved["dtype"] == saved["text_config"]["dtype"] == saved["vision_config"]["dtype"] == "float16"


def test_default_recipe_is_the_embedded_targets_two_stages():
    """`sparrow train target` at its defaults runs the two stages the embedded weights were made with (their
    records; they ran as two commands before the long-video stage was folded in). Stage 1 evaluated every
    500 steps, the default now every 1,000: evaluation reads the model and changes no weight."""
    from dataclasses import replace

    from sparrow.train_target import TargetTrainConfig

    default = TargetTrainConfig()
    first = replace(default, long_stage=None)
    stage1 = json.loads((DEMO_TARGET_DIR / "training_stage1.json").read_text())["config"]
    want = json.loads(json.dumps({k: v for k, v in first.to_json().items() if k != "long_stage"}))
    assert {k for k in want if want[k] != stage1[k]} == {"eval_every"} and set(want) == set(stage1)
    stage2 = json.loads((DEMO_TARGET_DIR / "training.json").read_text())["config"]
    long = json.loads(json.dumps(default.long_stage.config(first, init="runs/x/stage1").to_json()))
    assert long.pop("long_stage") is None and long.pop("init") == "runs/x/stage1"
    assert long == {k: v for k, v in stage2.items() if k != "init"} and long["steps"] == 60


def test_long_stage_settings_are_validated_and_round_trip():
    from sparrow.train_target import LongVideoStage, TargetTrainConfig

    cfg = TargetTrainConfig(long_stage=LongVideoStage(steps=7, long_videos=((8, 64),)))
    assert TargetTrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert TargetTrainConfig.from_json({"long_stage": None}).long_stage is None
    with pytest.raises(ValueError, match="long_stage setting.*stpes"):
        TargetTrainConfig.from_json({"long_stage": {"stpes": 3}})
    with pytest.raises(ValueError, match="long_stage needs"):
        LongVideoStage(long_every=0)


def test_cli_train_target_runs_both_stages_in_one_command_and_resumes(tmp_path):
    """The long-video stage starts from the first stage's saved model, in the same command; the record keeps
    both stages; a second call finds both finished and trains nothing."""
    cli = [sys.executable, "-m", "sparrow.cli", "train", "target", "--work-dir", str(tmp_path / "work"),
           "--out", str(tmp_path / "out"), "--json"]
    recipe = tmp_path / "tiny.json"
    tiny_stage = {"steps": 2, "warmup": 1, "long_videos": [[4, 32]]}
    recipe.write_text(json.dumps({"steps": 3, "batch_size": 2, "easy_steps": 1, "copy_steps": 1, "warmup": 1,
                                  "eval_videos": 2, "long_stage": tiny_stage}))
    run = subprocess.run(cli + ["--config", str(recipe)], check=True, capture_output=True, text=True)
    rec = json.loads(run.stdout.strip().splitlines()[-1])
    first, last = rec["stages"]
    assert first["config"]["steps"] == 3 and first["config"]["long_stage"] is None
    assert last["config"]["init"] == str(tmp_path / "work" / "stage1") and last["config"]["long_videos"] == [[4, 32]]
    assert last["config"]["aux_weight"] == 0.0 and last["config"]["copy_steps"] == 0
    assert rec["config"]["long_stage"]["steps"] == 2 and "long videos" in run.stderr
    assert rec["train_seconds"] == pytest.approx(first["train_seconds"] + last["train_seconds"], abs=0.11)
    assert json.loads((tmp_path / "out" / "training.json").read_text()) == rec
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "stage1" / "model.safetensors").is_file()
    again = subprocess.run(cli + ["--config", str(recipe)], check=True, capture_output=True, text=True)
    assert "resuming from step 3" in again.stdout and "resuming from step 2" in again.stdout
    assert json.loads(again.stdout.strip().splitlines()[-1])["stages"][0]["final_loss"] == first["final_loss"]

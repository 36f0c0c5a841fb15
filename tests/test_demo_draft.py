"""The embedded demo drafts: lossless against transformers generate, and drafts that get accepted."""

import json
import subprocess
import sys

import pytest

from sparrow import attention_cpp
from sparrow.benchmarks.speedup import bench_videos
from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
from sparrow.draft import Draft
from sparrow.runtime import Runtime
from sparrow.speculative import TokenTree, generate_speculative
from sparrow.target import Target


@pytest.fixture(scope="module")
def setup():
    reference = Target.load(DEMO_TARGET_DIR)
    target = Target.load(DEMO_TARGET_DIR)
    drafts = {name: Draft.load(path, target.model) for name, path in DEMO_DRAFTS.items()}
    return reference, Runtime(target, max_len=1200), drafts


@pytest.mark.parametrize("tree", [TokenTree.chain(5), TokenTree.spine(4, 2)], ids=["chain", "tree"])
def test_embedded_drafts_are_lossless_and_accepted(setup, tree):
    reference, runtime, drafts = setup
    accepted = {name: [] for name in drafts}
    for frames, prompt in bench_videos(512, 4):
        p = reference.prepare(frames, prompt)
        hf = reference.model.generate(input_ids=p.input_ids, **p.model_inputs, do_sample=False, max_new_tokens=40)
        expect = hf[0, p.input_ids.shape[1]:].tolist()
        for name, draft in drafts.items():
            res = generate_speculative(runtime, draft, frames, prompt, tree, max_new_tokens=40)
            assert res.token_ids == expect, name
            accepted[name].append(res.stats["mean_accepted_length"])
    for name, values in accepted.items():
        assert sum(values) / len(values) > 2.0, (name, values)  # trained drafts, not random ones


def test_cli_generate_strategies_agree(tmp_path):
    video = tmp_path / "v.mp4"
    cli = [sys.executable, "-m", "sparrow.cli"]
    subprocess.run(cli + ["demo", "video", "--seed", "12", "--out", str(video)], check=True, capture_output=True)
    outs = {}
    for strategy in ("ar", "sparrow", "eagle"):
        run = subprocess.run(cli + ["generate", "--video", str(video), "--prompt", "describe the video .",
                                    "--strategy", strategy, "--json"], check=True, capture_output=True, text=True)
        outs[strategy] = json.loads(run.stdout)
    assert outs["sparrow"]["token_ids"] == outs["ar"]["token_ids"] == outs["eagle"]["token_ids"]
    assert outs["sparrow"]["stats"]["mean_accepted_length"] > 1.5
    err = subprocess.run(cli + ["generate", "--video", str(video), "--prompt", "describe the video .",
                                "--strategy", "sparrow", "--tree-width", "2", "--temperature", "0.7"],
                         capture_output=True, text=True)
    assert err.returncode != 0 and "chains only" in err.stderr


def test_bench_speedup_rows(tmp_path):
    """The speedup benchmark end to end at a small size: strategies (the speculative one at two draft
    lengths) timed in one process, peak RSS from their own, speedups against ar's row, greedy equality
    with ar, the files."""
    from sparrow.benchmarks import speedup

    cfg = speedup.SpeedupBenchConfig(visual_tokens=(256,), strategies=("ar", "sparrow", "hf"), videos=2,
                                     max_new_tokens=8, draft_len=(1, 4))
    rows = speedup.run_bench(cfg, progress=False)
    assert [(r["strategy"], r["draft_len"]) for r in rows] == [("ar", None), ("sparrow", 1), ("sparrow", 4),
                                                                ("hf", None)]
    ar, sp1, sp, hf = rows
    assert ar["speedup_vs_ar"] == 1.0 and ar["mean_accepted_length"] is None
    assert sp["speedup_vs_ar"] == pytest.approx(sp["tokens_per_s"] / ar["tokens_per_s"], abs=1e-3)
    # transformers' generate shares the process with the runtime, on an untouched copy of the target
    assert all(r["lossless"] and r["new_tokens"] == 16 and r["videos"] == 2 for r in rows)
    assert sp["mean_accepted_length"] >= 1 and sp["draft_ms_per_step"] > 0 and sp["verify_ms_per_step"] > 0
    assert 1 <= sp1["mean_accepted_length"] <= 2  # K = 1: one drafted token and the target's own per verify
    assert sp["sample_text"] == ar["sample_text"] == hf["sample_text"] != ""
    assert all(r["peak_rss_mb"] > 100 for r in rows) and ar["prefill_s"] > 0 and hf["prefill_s"] is None
    speedup.write(rows, cfg, tmp_path / "speedup.json")
    written = json.loads((tmp_path / "speedup.json").read_text())
    assert [(r["strategy"], r["draft_len"]) for r in written] == [(r["strategy"], r["draft_len"]) for r in rows]
    md = (tmp_path / "speedup.md").read_text()
    assert "| 256 | sparrow | 1 |" in md and "| 256 | sparrow | 4 |" in md and "| 256 | ar | - |" in md
    assert (tmp_path / "speedup.png").stat().st_size
    with pytest.raises(ValueError, match="at least 1, got 0"):
        speedup.SpeedupBenchConfig(draft_len=(5, 0))
    with pytest.raises(ValueError, match="branch 001 hangs off 00,"):
        speedup.SpeedupBenchConfig(draft_len=("1+001",))
    assert speedup.SpeedupBenchConfig(draft_len=("5", "4+1/10")).draft_len == (5, "4+1/10")


def test_bench_options_default_to_their_configs():
    """Each bench option's default is its config field's, and building the parser imports no torch."""
    code = """
import dataclasses, json, sys
from sparrow.cli import build_parser
from sparrow.benchmarks import acceptance, draft_round, runtime, serving, speedup
parser = build_parser()
out = {'torch': 'torch' in sys.modules}
for cmd, cls in [('runtime', runtime.RuntimeBenchConfig), ('speedup', speedup.SpeedupBenchConfig),
                 ('acceptance', acceptance.AcceptanceBenchConfig), ('draft-round', draft_round.DraftRoundBenchConfig),
                 ('serving', serving.ServingBenchConfig)]:
    args = vars(parser.parse_args(['bench', cmd]))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out[cmd] = {k: [list(v) if isinstance(v, tuple) else v,
                    list(fields[k].default) if isinstance(fields[k].default, tuple) else fields[k].default]
                for k, v in args.items() if k in fields and fields[k].default is not dataclasses.MISSING}
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    assert out.pop("torch") is False
    assert out["speedup"]["videos"] == [12, 12] and len(out["speedup"]) >= 6
    for cmd, pairs in out.items():
        assert pairs and all(parsed == default for parsed, default in pairs.values()), (cmd, pairs)
    shown = subprocess.run([sys.executable, "-m", "sparrow.cli", "bench", "speedup", "--help"], capture_output=True,
                           text=True, check=True).stdout
    assert "(default: 1024,4096,16384,25600)" in " ".join(shown.split()) and "(default: 12)" in shown


def test_train_draft_options_state_the_recipe_defaults():
    """`sparrow train draft` with no flags trains the recipe of the config dataclasses (its parser, kept
    torch-free, states their defaults again: this holds the two together)."""
    import dataclasses

    from sparrow.cli import build_parser
    from sparrow.draft import DraftConfig
    from sparrow.draft_data import DraftDataConfig
    from sparrow.train_draft import DraftTrainConfig

    args = vars(build_parser().parse_args(["train", "draft"]))
    checked = 0
    for cls, names in [(DraftConfig, ("attend", "window", "glimpses", "glimpse_layer")),
                       (DraftTrainConfig, ("steps", "batch_size", "mtp_steps", "long_steps", "seed")),
                       (DraftDataConfig, ("examples", "long_examples"))]:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name in names:
            assert args[name] == defaults[name], (cls.__name__, name)
            checked += 1
    assert checked == 11 and args["long_videos"] is None  # None: DraftDataConfig's own default sizes


def test_bench_acceptance_rows(tmp_path):
    """The ablation/lossless table end to end at a small size: one row per named draft and tree, every
    output compared with transformers' generate, the recipe columns read from each draft's config."""
    from sparrow.benchmarks import acceptance

    cfg = acceptance.AcceptanceBenchConfig(drafts=dict(DEMO_DRAFTS), visual_tokens=256, videos=2, max_new_tokens=8,
                                           min_new_tokens=8, draft_len=(5, "3+1/10/01"))
    rows = acceptance.run_bench(cfg, progress=False)
    assert [(r["draft"], r["draft_len"], r["tree_nodes"]) for r in rows] == [
        (name, k, n) for name in DEMO_DRAFTS for k, n in ((5, 5), ("3+1/10/01", 6))]
    assert all(r["lossless_videos"] == 2 for r in rows)
    by_name = {r["draft"]: r for r in rows if r["draft_len"] == 5}
    sparrow, eagle = by_name["sparrow"], by_name["eagle"]
    assert sparrow["videos"] == 2
    assert (sparrow["attend"], sparrow["window"], sparrow["glimpses"]) == ("window", 64, 16)
    assert sparrow["glimpse_layer"] == 2 and eagle["glimpse_layer"] is None and eagle["window"] is None
    assert sparrow["mtp_steps"] == 5 and 1 <= sparrow["mean_accepted_length"] <= 6
    md = acceptance.table(rows)
    assert "| glimpse layer |" in md and "| sparrow | window | 64 | 16 | 2 | 5 |" in md and "| 3+1/10/01 | 6 |" in md
    acceptance.write(rows, cfg, tmp_path / "acc.json")
    assert json.loads((tmp_path / "acc.json").read_text())[0]["config"]["videos"] == 2


def test_bench_draft_round_rows_and_ratios(tmp_path):
    from sparrow.benchmarks import draft_round

    cfg = draft_round.DraftRoundBenchConfig(visual_tokens=(256, 1024), videos=1, rounds=2, max_new_tokens=8)
    rows = draft_round.run_bench(cfg, progress=False)
    keys = {(r["visual_tokens"], r["strategy"], r["weights_warmed"]) for r in rows}
    assert keys == {(n, s, w) for n in (256, 1024) for s, w in (("sparrow", False), ("eagle", False),
                                                                 ("sparrow", True))}
    for r in rows:
        base = next(b for b in rows if b["visual_tokens"] == 256 and b["strategy"] == r["strategy"]
                    and b["weights_warmed"] == r["weights_warmed"])
        assert r["ratio_vs_smallest"] == pytest.approx(r["draft_ms_per_round"] / base["draft_ms_per_round"], abs=1e-3)
        assert r["draft_ms_per_round"] > 0 and r["verify_ms_per_round"] > 0 and r["mean_accepted_length"] >= 1
    assert "| 1024 | sparrow | yes |" in draft_round.table(rows)
    draft_round.write(rows, cfg, tmp_path / "round.json")
    written = json.loads((tmp_path / "round.json").read_text())
    assert [{k: r[k] for k in rows[0]} for r in written] == rows
    assert written[0]["machine"]["cpu_model"] and written[0]["config"]["videos"] == 1
    if attention_cpp.compiler() is not None:  # the op's own CPU detection (compiler builtins) as the witness
        kernel = attention_cpp.isa("auto")
        assert written[0]["machine"]["vector_isa"] == {"portable": "other"}.get(kernel, kernel)
    with pytest.raises(ValueError, match="strategies"):
        draft_round.DraftRoundBenchConfig(strategies=("ar",))
    with pytest.raises(ValueError, match="rounds"):
        draft_round.DraftRoundBenchConfig(rounds=0)

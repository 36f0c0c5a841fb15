"""convert/: recipe validation, TensorRT-LLM checkpoint layout + round trip, ONNX parity, incremental build."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import tiny_models
from sparrow.convert import build as build_mod
from sparrow.convert import trtllm_checkpoint as ck
from sparrow.convert.recipe import RecipeError, load_recipe
from sparrow.demo.model import DEMO_TARGET_DIR
from sparrow.target import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "engines" / "demo.yaml"


@pytest.fixture(scope="module", params=["qwen2_vl", "llava_onevision"])
def tiny(request, tmp_path_factory):
    return request.param, tiny_models.build(request.param, tmp_path_factory.mktemp(request.param))


def _recipe(tmp_path, **over):
    import yaml

    raw = yaml.safe_load(DEMO_RECIPE.read_text())
    raw["target"]["path"] = str(DEMO_TARGET_DIR)
    raw["draft"]["path"] = str(DEMO_TARGET_DIR.parent / "demo_draft")
    for key, value in over.items():
        section, field = key.split("__")
        raw[section][field] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("over, message", [
    ({"target__path": "/nonexistent/model"}, "does not exist"),
    ({"target__architecture": "gpt2"}, "unknown architecture 'gpt2'"),
    ({"target__architecture": "llava_onevision"}, "holds a 'qwen2_vl' model"),
    ({"draft__window": 32}, "does not fit the draft"),
    ({"engine__max_input_len": 64}, "does not fit engine.max_input_len"),
    ({"engine__backend": "onnxruntime"}, "not supported by the onnxruntime backend"),
    ({"engine__dtype": "int3"}, "not supported by the tensorrt_llm backend"),
    ({"engine__tensor_parallel": 3}, "does not divide"),
    ({"serve__instances": 0}, "serve.instances must be a positive integer"),
])
def test_recipe_errors_name_the_problem(tmp_path, over, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(tmp_path, **over))


def test_demo_recipe_is_valid():
    r = load_recipe(DEMO_RECIPE)
    assert r.architecture == "qwen2_vl" and r.window == 64 and r.engine.dtype == "float16"
    for template in ("qwen2-vl-7b", "qwen2.5-vl-7b", "llava-onevision-7b"):
        with pytest.raises(RecipeError, match="does not exist"):  # templates point at /models/...
            load_recipe(ROOT / "engines" / f"{template}.yaml")


def test_checkpoint_layout_and_round_trip_gives_identical_logits(tiny, tmp_path):
    import transformers as tf

    arch, path = tiny
    cfg, ranks = ck.convert(path, tmp_path / "ckpt", tp=1, dtype="float32")
    cfg, ranks = ck.read_checkpoint(tmp_path / "ckpt")
    assert ck.check_layout(cfg, ranks) == 3 + 8 * cfg["num_hidden_layers"]
    qkv = ranks[0]["transformer.layers.0.attention.qkv.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)  # 4 query + 2 KV heads of 16, fused q|k|v
    assert cfg["position_embedding_type"] == ("mrope" if arch == "qwen2_vl" else "rope_gpt_neox")
    if arch == "qwen2_vl":
        assert cfg["rotary_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    src = ck.load_text_weights(path)
    assert torch.equal(ranks[0]["transformer.layers.1.mlp.fc.weight"], src["layers.1.mlp.gate_proj.weight"])
    assert torch.equal(ranks[0]["transformer.layers.1.mlp.gate.weight"], src["layers.1.mlp.up_proj.weight"])

    cls = getattr(tf, ARCHITECTURES[arch])
    ids = torch.randint(8, 60, (1, 16), generator=torch.Generator().manual_seed(0))
    want = cls.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.normal_()
    ck.load_into(model, ck.to_hf(cfg, ranks))
    assert torch.equal(model(input_ids=ids).logits, want)


@pytest.mark.parametrize("tp", [2, 4])  # 4 > 2 KV heads: each KV head is repeated on 2 ranks
def test_tensor_parallel_split_rejoins_exactly(tiny, tp):
    _, path = tiny
    src = ck.load_text_weights(path)
    cfg, ranks = ck.to_trtllm(ck.read_text_config(path), src, tp, "float32")
    ck.check_layout(cfg, ranks)
    assert len(ranks) == tp and cfg["mapping"]["tp_size"] == tp
    q = src["layers.0.self_attn.q_proj.weight"]
    assert torch.equal(ranks[1]["transformer.layers.0.attention.qkv.weight"][: 64 // tp], q[64 // tp: 2 * 64 // tp])
    assert ranks[0]["lm_head.weight"].shape[0] * tp >= cfg["vocab_size"]
    back = ck.to_hf(cfg, ranks)
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_vision_onnx_matches_torch_on_decoded_frames(tmp_path):
    pytest.importorskip("onnxruntime")
    from sparrow.convert import onnx_vision
    from sparrow.demo.world import make_scene, render
    from sparrow.target import Target
    from sparrow.video import decode, encode

    target = Target.load(tiny_models.build("qwen2_vl", tmp_path / "m"))
    visual = target.model.model.visual
    frames = decode(encode(render(make_scene(3), 4, 32, 32)))
    inputs = target.prepare(frames, "what happens?").model_inputs
    onnx_vision.export(visual, inputs["pixel_values_videos"], inputs["video_grid_thw"], tmp_path / "v.onnx")
    assert onnx_vision.check(visual, tmp_path / "v.onnx", inputs["pixel_values_videos"], inputs["video_grid_thw"]) < 1e-4
    other = target.prepare(decode(encode(render(make_scene(4), 8, 48, 48))), "what happens?").model_inputs
    assert other["pixel_values_videos"].shape[0] != inputs["pixel_values_videos"].shape[0]  # a new patch count
    assert onnx_vision.check(visual, tmp_path / "v.onnx", other["pixel_values_videos"], other["video_grid_thw"]) < 1e-4


def test_demo_build_prepares_for_gpu_and_records_everything(demo_build):
    out, code = demo_build
    assert code == build_mod.EXIT_PREPARED  # no TensorRT-LLM here
    m = json.loads((out / "manifest.json").read_text())
    assert {"vision/encoder.onnx", "draft/step.onnx", "trtllm/target/config.json",
            "trtllm/target/rank0.safetensors", "build_engines.sh", "reference/target/config.json",
            "reference/target/model.safetensors", "reference/target/tokenizer.json"} <= set(m["artifacts"])
    v = m["verification"]
    assert v["vision_onnx_max_rel_err"] < 1e-3 and v["draft_onnx_max_rel_err"] < 1e-3
    assert v["target_checkpoint_roundtrip_exact"] is True
    # the CPU reference target is the TensorRT-LLM checkpoint converted back: same logits as the source
    assert v["reference_target_logits_equal"] is True and v["reference_target_logits_max_abs_diff"] == 0.0
    assert m["serve"] == {"target": "reference/target", "draft": "draft", "vision_onnx": "vision/encoder.onnx",
                          "trtllm_engines": "engines", "window": 64, "draft_len": 5, "max_len": 4608,
                          "max_frames": 256, "instances": 1}
    assert m["tools"]["torch"] and m["recipe"]["name"] == "demo" and m["inputs"]["target"]
    script = (out / "build_engines.sh").read_text()
    # the target engine outputs the hidden states the demo draft reads (layers 1, 2, 4)
    assert 'python -m sparrow.convert.trtllm_engine "$HERE/trtllm/target"' in script and "--layers 1,2,4" in script


def test_second_build_is_a_no_op_and_verify_catches_a_modified_file(demo_build, tmp_path, capsys):
    out = tmp_path / "build"  # a copy: the session's build is served by the serving tests
    shutil.copytree(demo_build[0], out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    capsys.readouterr()
    assert build_mod.main(str(DEMO_RECIPE), str(out), None) == build_mod.EXIT_PREPARED
    log = capsys.readouterr().out
    assert log.count("skipped (inputs unchanged)") == 6, log
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name != "manifest.json"]
    assert changed == []
    assert build_mod.main(None, None, str(out)) == build_mod.EXIT_COMPLETE
    with open(out / "draft" / "step.onnx", "ab") as f:
        f.write(b"\0")
    assert build_mod.main(None, None, str(out)) == build_mod.EXIT_VERIFY_FAILED
    assert "modified: draft/step.onnx" in capsys.readouterr().err
    (out / "trtllm" / "target" / "rank0.safetensors").unlink()
    assert build_mod.main(None, None, str(out)) == build_mod.EXIT_VERIFY_FAILED

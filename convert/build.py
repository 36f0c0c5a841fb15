"""`sparrow build`: one recipe -> one output directory of engine artifacts, incrementally.

Steps (each skipped when the hash of its inputs matches the last build and its artifacts are intact):
  validate  -> the recipe (recipe.py)
  vision    -> vision/encoder.onnx, checked in ONNX Runtime against torch on a real decoded video
  target    -> trtllm/target/{config.json, rank*.safetensors}, layout-checked, round-tripped to HF
  draft     -> draft/{draft.safetensors, draft_config.json, step.onnx}, ONNX checked against torch
  reference -> reference/target/: a Hugging Face directory whose text decoder comes back from the TensorRT-LLM
               checkpoint (the inverse converter), logits checked against the source model; with draft/ and
               vision/encoder.onnx it is what `sparrow serve --engines` loads on a machine without TensorRT
  engines   -> build_engines.sh (TensorRT-LLM build API + TensorRT builder); run here only where TensorRT-LLM and a
               GPU are present
`manifest.json` records the recipe, input hashes, tool versions, artifacts + hashes, verification figures and
`serve` (what the server loads, relative to the directory, and its limits); `sparrow build --verify DIR`
re-hashes every artifact against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from .recipe import Recipe

EXIT_COMPLETE = 0
EXIT_VERIFY_FAILED = 1
EXIT_RECIPE_ERROR = 2
EXIT_PREPARED = 3  # artifacts ready; engines left for a GPU host (build_engines.sh)
BUILD_VERSION = 2  # bump when a step's output for the same inputs changes
MANIFEST = "manifest.json"
SCRIPT = "build_engines.sh"
REFERENCE_TARGET = "reference/target"  # the CPU reference target: HF directory from the TensorRT-LLM checkpoint


# ---- hashing --------------------------------------------------------------------------------------
def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Hasher:
    """sha256 of files, cached by (path, size, mtime) in `<out>/.cache/hashes.json` so that a rebuild of
    a 7B model does not re-read 15 GB to find that nothing changed."""

    def __init__(self, cache: Path):
        self.path = cache
        self.memo = json.loads(cache.read_text()) if cache.is_file() else {}

    def file(self, p: Path) -> str:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.memo:
            self.memo[key] = sha256_file(p)
        return self.memo[key]

    def tree(self, root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): self.file(p) for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.memo))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-extensions", "onnxscript",
                 "safetensors", "tensorrt", "tensorrt_llm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---- the steps ------------------------------------------------------------------------------------
class Builder:
    def __init__(self, recipe: Recipe, out: Path, log=print):
        self.r = recipe
        self.out = out
        self.log = log
        self.hasher = Hasher(out / ".cache" / "hashes.json")
        old = out / MANIFEST
        self.manifest = json.loads(old.read_text()) if old.is_file() else {}
        self.manifest.setdefault("steps", {})
        self.manifest.setdefault("verification", {})
        self._target = None

    def target(self):
        if self._target is None:
            from ..target import Target

            self._target = Target.load(self.r.target)  # float32: the ONNX checks compare in fp32
        return self._target

    def _fresh(self, name: str, key: str) -> bool:
        prev = self.manifest["steps"].get(name)
        if not prev or prev.get("key") != key:
            return False
        return all((self.out / a).is_file() and self.hasher.file(self.out / a) == h
                   for a, h in prev.get("artifacts", {}).items())

    def run(self, steps) -> dict:
        from tqdm import tqdm

        bar = tqdm(steps, desc="sparrow build", unit="step", file=sys.stderr, leave=False)
        for i, (name, inputs, fn) in enumerate(bar, 1):
            bar.set_postfix_str(name)
            key = digest({"version": BUILD_VERSION, "step": name, "inputs": inputs})
            if self._fresh(name, key):
                self.log(f"[{i}/{len(steps)}] {name}: skipped (inputs unchanged)")
                continue
            t0 = time.perf_counter()
            artifacts, figures = fn()
            self.manifest["verification"].update(figures)
            self.manifest["steps"][name] = {
                "key": key, "seconds": round(time.perf_counter() - t0, 2),
                "artifacts": {str(a.relative_to(self.out)): self.hasher.file(a) for a in artifacts}}
            self.log(f"[{i}/{len(steps)}] {name}: done in {time.perf_counter() - t0:.1f}s {figures or ''}")
            self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        m = self.manifest
        m["recipe"] = self.r.to_json()
        m["tools"] = tool_versions()
        m["artifacts"] = {a: h for s in m["steps"].values() for a, h in s["artifacts"].items()}
        m["serve"] = serve_block(self.r, m["artifacts"])
        (self.out / MANIFEST).write_text(json.dumps(m, indent=1, sort_keys=True))
        self.hasher.save()

    # each step returns (artifact paths, verification figures)
    def step_vision(self):
        from . import onnx_vision

        t = self.target()
        if t.arch not in onnx_vision.SUPPORTED:
            self.log(f"  vision: ONNX export for {t.arch} is not implemented yet; left out")
            return [], {"vision_onnx": f"not exported ({t.arch})"}
        px, grid = self._verify_patches()
        path = self.out / "vision" / "encoder.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        visual = t.model.model.visual
        onnx_vision.export(visual, px, grid, path)
        err = onnx_vision.check(visual, path, px, grid)
        if err >= 1e-3:
            raise RuntimeError(f"vision ONNX differs from torch: max relative error {err:.2e} (bar 1e-3)")
        return [path], {"vision_onnx_max_rel_err": err, "vision_onnx_patches": int(px.shape[0])}

    def _verify_prompt(self, target):
        from ..demo.world import make_scene, render
        from ..video import decode, encode

        v = self.r.verify
        frames = decode(encode(render(make_scene(v.seed), v.frames, v.side, v.side)))  # real mp4 round trip
        return target.prepare(frames, "describe the video")

    def _verify_patches(self):
        inputs = self._verify_prompt(self.target()).model_inputs
        return inputs["pixel_values_videos"], inputs["video_grid_thw"]

    def step_target(self):
        import torch

        from . import trtllm_checkpoint as ck

        e = self.r.engine
        out = self.out / "trtllm" / "target"
        if out.exists():
            shutil.rmtree(out)
        cfg, ranks = ck.convert(self.r.target, out, e.tensor_parallel, e.dtype)
        back = ck.to_hf(cfg, ranks)
        src = ck.load_text_weights(self.r.target)
        dt = ck.DTYPES[e.dtype]
        exact = set(back) == set(src) and all(torch.equal(back[k], src[k].to(dt)) for k in src)
        if not exact:
            raise RuntimeError("TensorRT-LLM checkpoint does not round-trip to the HF weights")
        return sorted(out.iterdir()), {"target_checkpoint_tensors": sum(len(r) for r in ranks),
                                       "target_checkpoint_roundtrip_exact": exact}

    def step_draft(self):
        from ..draft import Draft
        from . import onnx_draft

        out = self.out / "draft"
        out.mkdir(parents=True, exist_ok=True)
        files = [shutil.copy2(self.r.draft / n, out / n) for n in ("draft.safetensors", "draft_config.json")]
        draft = Draft.load(self.r.draft, self.target().model)
        model = onnx_draft.export(draft, out / "step.onnx")
        err = onnx_draft.check(draft, model)
        if err >= 1e-3:
            raise RuntimeError(f"draft ONNX differs from torch: max relative error {err:.2e} (bar 1e-3)")
        return [Path(f) for f in files] + [out / "step.onnx"], {"draft_onnx_max_rel_err": err}

    def step_reference(self):
        import torch

        from ..target import Target
        from . import trtllm_checkpoint as ck

        out = self.out / REFERENCE_TARGET
        if out.exists():
            shutil.rmtree(out)
        cfg, ranks = ck.read_checkpoint(self.out / "trtllm" / "target")
        files = ck.write_hf(self.r.target, ck.to_hf(cfg, ranks), out)
        src, ref = self.target(), Target.load(out)
        with torch.no_grad():  # the whole model (vision tower included) on the real decoded verify video
            logits = [t.model(input_ids=p.input_ids, **p.model_inputs).logits  # [1, T, V]
                      for t, p in ((src, self._verify_prompt(src)), (ref, self._verify_prompt(ref)))]
        equal = torch.equal(*logits)
        diff = float((logits[0] - logits[1]).abs().max())
        # a checkpoint dtype narrower than the source's (e.g. float16 from bfloat16) cannot give equal logits;
        # the same dtype must, or the converters lost something
        if not equal and all(t.dtype == ck.DTYPES[cfg["dtype"]] for t in ck.load_text_weights(self.r.target).values()):
            raise RuntimeError(f"reference target's logits differ from the source model's (max {diff:.2e})")
        return files, {"reference_target_logits_equal": equal, "reference_target_logits_max_abs_diff": diff}

    def step_engines(self):
        path = self.out / SCRIPT
        path.write_text(build_script(self.r, self.manifest))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return [path], {}


def serve_block(r: Recipe, artifacts: dict) -> dict:
    """What `sparrow serve --engines` loads (paths relative to the build directory) and its limits."""
    e = r.engine
    return {"target": REFERENCE_TARGET, "draft": "draft" if r.draft else None,
            "vision_onnx": "vision/encoder.onnx" if "vision/encoder.onnx" in artifacts else None,
            "trtllm_engines": "engines", "window": r.window, "draft_len": e.max_draft_len,
            "max_len": e.max_seq_len, "max_frames": r.serve.max_frames, "instances": r.serve.instances}


def gpu_toolchain() -> str | None:
    """None where engines can be built here; else why not."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM is not installed"
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT's Python package is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        return "torch is not installed"
    return None


def draft_layers(r: Recipe, last: int) -> tuple[int, ...]:
    """The target hidden-state layers the target engine must output: the draft's and the last one (`last`, the
    logits' input; alone without a draft)."""
    from ..draft import DraftConfig

    if r.draft is None:
        return (last,)
    cfg = DraftConfig.from_json(json.loads((r.draft / "draft_config.json").read_text()))
    return tuple(sorted(set(cfg.target_layers) | {last}))


def build_script(r: Recipe, manifest: dict) -> str:
    """The shell script that turns this output directory into engines on a GPU host."""
    e = r.engine
    text = json.loads((r.target / "config.json").read_text())
    vc = text.get("vision_config", {})
    layers = draft_layers(r, text.get("text_config", text)["num_hidden_layers"])
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by `sparrow build` for recipe {r.name!r}. Run on a GPU host with TensorRT-LLM and",
        "# TensorRT installed, and this project installed (pip install sparrow-trt).",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        "python -c 'import tensorrt_llm' 2>/dev/null ||",
        "  { echo 'TensorRT-LLM not found: pip install tensorrt_llm' >&2; exit 1; }",
        'mkdir -p "$HERE/engines"',
        "# target LLM (tensor-parallel ranks from trtllm/target) with the hidden states the Sparrow draft reads as",
        "# extra outputs; drafted tokens are verified as context requests with KV-cache block reuse",
        'python -m sparrow.convert.trtllm_engine "$HERE/trtllm/target" "$HERE/engines/target" \\',
        f"  --layers {','.join(map(str, layers))} --max-batch-size {e.max_batch_size} "
        f"--max-input-len {e.max_input_len} --max-seq-len {e.max_seq_len} \\",
        f"  --max-num-tokens {e.max_batch_size * e.max_input_len} "
        f"--max-multimodal-len {e.max_batch_size * e.max_input_len}",
    ]
    fp16 = " --fp16" if e.dtype != "float32" else ""
    if "vision/encoder.onnx" in manifest.get("artifacts", {}):
        merge = vc.get("spatial_merge_size", 2) ** 2
        dim = vc.get("in_channels", 3) * vc.get("temporal_patch_size", 2) * vc.get("patch_size", 14) ** 2
        hi, opt = e.max_input_len * merge, min(1024, e.max_input_len) * merge
        shapes = ";".join(f"{n}:{merge}{s},{opt}{s},{hi}{s}" for n, s in
                          (("pixel_values", f"x{dim}"), ("position_ids", "x2"), ("frame_ids", "")))
        lines += ["# vision encoder (dynamic patch count)",
                  f'python -m sparrow.convert.trt_engine "$HERE/vision/encoder.onnx" "$HERE/engines/vision.plan" '
                  f'--shapes "{shapes}"{fp16}']
    if r.draft is not None:
        t = e.max_draft_len + 1
        shapes = ";".join(f"{n}:{s.format(2)},{s.format(t)},{s.format(64)}" for n, s in
                          (("tokens", "1x{}"), ("feats", "1x{}x" + str(text.get("text_config", text)["hidden_size"])),
                           ("positions", "1x{}"), ("mask", "{0}x{0}")))
        lines += ["# Sparrow draft step (the sparrow::TextAnchoredWindowAttention plugin is registered by the builder)",
                  f'python -m sparrow.convert.trt_engine "$HERE/draft/step.onnx" "$HERE/engines/draft.plan" '
                  f'--shapes "{shapes}"{fp16}']
    lines += ['echo "engines written to $HERE/engines"', ""]
    return "\n".join(lines)


def build(recipe: Recipe, out: Path, log=print) -> int:
    """Build (or bring up to date) `out`; returns EXIT_COMPLETE or EXIT_PREPARED."""
    out.mkdir(parents=True, exist_ok=True)
    b = Builder(recipe, out, log)
    h = b.hasher
    target_in = {"tree": h.tree(recipe.target)}
    draft_in = {"tree": h.tree(recipe.draft)} if recipe.draft else None
    steps = [
        ("validate", recipe.to_json(), lambda: ([], {})),
        ("vision", {"target": target_in, "verify": recipe.to_json()["verify"]}, b.step_vision),
        ("target", {"target": target_in, "engine": recipe.to_json()["engine"]}, b.step_target),
    ]
    if draft_in:
        steps.append(("draft", {"target": target_in, "draft": draft_in}, b.step_draft))
    steps.append(("reference", {"target": target_in, "engine": recipe.to_json()["engine"]}, b.step_reference))
    steps.append(("engines", {"recipe": recipe.to_json(), "target": target_in, "draft": draft_in}, b.step_engines))
    b.manifest["inputs"] = {"target": digest(target_in), "draft": digest(draft_in) if draft_in else None}
    b.run(steps)
    b._write_manifest()
    why = gpu_toolchain()
    if why is None:
        log("engines: running build_engines.sh (TensorRT-LLM and a GPU are present)")
        subprocess.run(["bash", str(out / SCRIPT)], check=True)
        return EXIT_COMPLETE
    log(f"prepared for GPU build: {why}. Ran here: validate, vision ONNX, TensorRT-LLM checkpoint, draft ONNX, "
        f"CPU reference target (all verified; `sparrow serve --engines {out}` serves them). "
        f"Left for a GPU host: `bash {out / SCRIPT}` (TensorRT-LLM target engine + TensorRT engines).")
    return EXIT_PREPARED


def verify(out: Path) -> list[str]:
    """Problems found re-hashing `out` against its manifest (empty list: intact)."""
    path = out / MANIFEST
    if not path.is_file():
        return [f"{out} has no {MANIFEST}"]
    manifest = json.loads(path.read_text())
    problems = []
    for rel, want in sorted(manifest.get("artifacts", {}).items()):
        p = out / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
            continue
        if sha256_file(p) != want:
            problems.append(f"modified: {rel}")
    return problems


def main(recipe_path: str | None, out: str | None, verify_dir: str | None) -> int:
    from .recipe import RecipeError, load_recipe

    if verify_dir:
        problems = verify(Path(verify_dir))
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{verify_dir}: " + (f"{len(problems)} problem(s)" if problems else "every artifact matches the manifest"))
        return EXIT_VERIFY_FAILED if problems else EXIT_COMPLETE
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    out_dir = Path(out) if out else recipe.source.parent / "build" / recipe.name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return build(recipe, out_dir)

"""The build recipe: one YAML file per model pair (`engines/*.yaml`).

```yaml
name: demo
target: {path: ../sparrow/assets/demo_target}      # relative paths are relative to the recipe file
draft: {path: ../sparrow/assets/demo_draft}         # optional; window: W (must equal the draft's)
engine: {backend: tensorrt_llm, dtype: float16, tensor_parallel: 1,
         max_batch_size: 4, max_input_len: 4096, max_seq_len: 4608, max_draft_len: 5}
verify: {frames: 8, side: 64, seed: 0}              # the real decoded demo video the ONNX checks run on
serve: {instances: 1, max_frames: 256}              # what `sparrow serve --engines` fills into the Triton configs
```
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..target import ARCHITECTURES

# dtypes each backend builds; the CPU reference artifacts (ONNX Runtime) are always float32.
BACKEND_DTYPES = {
    "tensorrt_llm": ("float16", "bfloat16", "float32"),
    "torch": ("float16", "bfloat16", "float32"),
    "onnxruntime": ("float32",),
}
_TOP_KEYS = {"name", "target", "draft", "engine", "verify", "serve"}


class RecipeError(ValueError):
    """The recipe cannot be built as written; the message names the field and the fix."""


@dataclass
class EngineSpec:
    backend: str = "tensorrt_llm"
    dtype: str = "float16"
    tensor_parallel: int = 1
    max_batch_size: int = 4
    max_input_len: int = 4096
    max_seq_len: int = 4608
    max_draft_len: int = 5


@dataclass
class VerifySpec:
    frames: int = 8
    side: int = 64
    seed: int = 0


@dataclass
class ServeSpec:
    """How `sparrow serve --engines` runs this build (the rest comes from `engine` and the draft)."""
    instances: int = 1  # sparrow_llm model instances, each with its own KV cache of max_seq_len positions
    max_frames: int = 256  # requests with more frames are refused


@dataclass
class Recipe:
    name: str
    source: Path  # the recipe file
    target: Path
    architecture: str
    draft: Path | None = None
    window: int | None = None  # the draft's window W (from its config)
    engine: EngineSpec = field(default_factory=EngineSpec)
    verify: VerifySpec = field(default_factory=VerifySpec)
    serve: ServeSpec = field(default_factory=ServeSpec)

    def to_json(self) -> dict:
        return {"name": self.name, "target": str(self.target), "architecture": self.architecture,
                "draft": str(self.draft) if self.draft else None, "window": self.window,
                "engine": asdict(self.engine), "verify": asdict(self.verify), "serve": asdict(self.serve)}


def _section(raw: dict, key: str, cls, where: Path):
    data = raw.get(key) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: `{key}` must be a mapping, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} in `{key}`; known: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise RecipeError(f"{where}: `{key}`: {e}") from None


def _model_dir(raw: dict, key: str, where: Path, marker: str) -> Path | None:
    spec = raw.get(key)
    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec.get("path"):
        raise RecipeError(f"{where}: `{key}.path` is required (a local directory)")
    path = Path(spec["path"]).expanduser()
    path = (where.parent / path).resolve() if not path.is_absolute() else path
    if not path.is_dir():
        raise RecipeError(f"{where}: {key}.path {spec['path']!r} does not exist (resolved to {path})")
    if not (path / marker).is_file():
        raise RecipeError(f"{where}: {key}.path {path} has no {marker}: not a {key} model directory")
    return path


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; raise RecipeError naming the first problem found."""
    import yaml

    where = Path(path).resolve()
    if not where.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(where.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping with keys {sorted(_TOP_KEYS)}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    if "target" not in raw:
        raise RecipeError(f"{where}: `target` is required")
    engine = _section(raw, "engine", EngineSpec, where)
    verify = _section(raw, "verify", VerifySpec, where)
    serve = _section(raw, "serve", ServeSpec, where)
    for k in ("instances", "max_frames"):
        if not isinstance(getattr(serve, k), int) or getattr(serve, k) < 1:
            raise RecipeError(f"{where}: serve.{k} must be a positive integer, got {getattr(serve, k)!r}")
    target = _model_dir(raw, "target", where, "config.json")
    arch = _architecture(raw["target"], target, where)
    draft = _model_dir(raw, "draft", where, "draft_config.json")
    recipe = Recipe(name=str(raw.get("name") or where.stem), source=where, target=target, architecture=arch,
                    draft=draft, engine=engine, verify=verify, serve=serve)
    _check_engine(recipe, where)
    if draft is not None:
        recipe.window = _check_window(raw["draft"], draft, recipe, where)
    return recipe


def _architecture(spec: dict, target: Path, where: Path) -> str:
    found = json.loads((target / "config.json").read_text()).get("model_type")
    asked = spec.get("architecture", found)
    for name, what in ((asked, "target.architecture"), (found, f"{target}/config.json model_type")):
        if name not in ARCHITECTURES:
            raise RecipeError(f"{where}: unknown architecture {name!r} ({what}); supported: {sorted(ARCHITECTURES)}")
    if asked != found:
        raise RecipeError(f"{where}: target.architecture is {asked!r} but {target} holds a {found!r} model")
    return found


def _check_engine(r: Recipe, where: Path) -> None:
    e = r.engine
    if e.backend not in BACKEND_DTYPES:
        raise RecipeError(f"{where}: unknown engine.backend {e.backend!r}; supported: {sorted(BACKEND_DTYPES)}")
    if e.dtype not in BACKEND_DTYPES[e.backend]:
        raise RecipeError(f"{where}: engine.dtype {e.dtype!r} is not supported by the {e.backend} backend; "
                          f"use one of {list(BACKEND_DTYPES[e.backend])}")
    for k in ("tensor_parallel", "max_batch_size", "max_input_len", "max_seq_len", "max_draft_len"):
        if not isinstance(getattr(e, k), int) or getattr(e, k) < 1:
            raise RecipeError(f"{where}: engine.{k} must be a positive integer, got {getattr(e, k)!r}")
    if e.max_seq_len < e.max_input_len + e.max_draft_len:
        raise RecipeError(f"{where}: engine.max_seq_len ({e.max_seq_len}) must hold max_input_len + max_draft_len "
                          f"({e.max_input_len} + {e.max_draft_len})")
    from .trtllm_checkpoint import read_text_config

    text = read_text_config(r.target)
    tp = e.tensor_parallel
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    if heads % tp or (kv % tp and tp % kv) or text["intermediate_size"] % tp:
        raise RecipeError(f"{where}: engine.tensor_parallel={tp} does not divide the target "
                          f"({heads} query heads, {kv} KV heads, intermediate {text['intermediate_size']})")


def _check_window(spec: dict, draft: Path, r: Recipe, where: Path) -> int:
    cfg = json.loads((draft / "draft_config.json").read_text())
    trained = int(cfg.get("window", 0))
    window = spec.get("window", trained)
    if not isinstance(window, int) or window < 1:
        raise RecipeError(f"{where}: draft.window must be a positive integer, got {window!r}")
    if window != trained:
        raise RecipeError(f"{where}: draft.window={window} does not fit the draft at {draft}, trained with "
                          f"W={trained} (the plugin node bakes W in; retrain or drop the override)")
    reserved = window + int(cfg.get("glimpses", 0)) + r.engine.max_draft_len
    if reserved > r.engine.max_input_len:
        raise RecipeError(f"{where}: draft window W={window} (+ {cfg.get('glimpses', 0)} glimpses + "
                          f"{r.engine.max_draft_len} draft tokens) does not fit engine.max_input_len="
                          f"{r.engine.max_input_len}")
    return window

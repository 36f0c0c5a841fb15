"""Hugging Face Vid-LLM text decoder <-> TensorRT-LLM checkpoint (`config.json` + `rank{r}.safetensors`).

The layout is the one TensorRT-LLM's Qwen model loads (tensorrt_llm/models/qwen: QWenConfig and its HF
converter), learned from its public source, written here without importing it:

    transformer.vocab_embedding.weight                [V, H]        (not split: use_parallel_embedding=false)
    transformer.layers.{l}.input_layernorm.weight     [H]
    transformer.layers.{l}.attention.qkv.weight       [(Hq + 2 Hkv) D / tp, H]   q | k | v of this rank's heads
    transformer.layers.{l}.attention.qkv.bias         [(Hq + 2 Hkv) D / tp]
    transformer.layers.{l}.attention.dense.weight     [H, Hq D / tp]             (o_proj, split on columns)
    transformer.layers.{l}.post_layernorm.weight      [H]
    transformer.layers.{l}.mlp.gate.weight            [I / tp, H]   HF up_proj   (the multiplied branch)
    transformer.layers.{l}.mlp.fc.weight              [I / tp, H]   HF gate_proj (the activated branch)
    transformer.layers.{l}.mlp.proj.weight            [H, I / tp]   HF down_proj (split on columns)
    transformer.ln_f.weight                           [H]
    lm_head.weight                                    [V_pad / tp, H]  (vocab padded to a multiple of tp)

KV heads fewer than tp ranks are repeated so that every rank holds one (as TensorRT-LLM does).
Qwen2-VL / Qwen2.5-VL: position_embedding_type "mrope" with rotary_scaling {type: mrope, mrope_section};
LLaVA-OneVision's Qwen2: "rope_gpt_neox". `to_hf` inverts all of it (tests: a round trip gives
identical logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# model_type -> (TensorRT-LLM architecture, qwen_type, position embedding)
TRTLLM_MODELS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "qwen2_vl", "mrope"),
    # TensorRT-LLM's Qwen2-VL LLM path: the Qwen2.5-VL text decoder has the same layout and M-RoPE.
    "qwen2_5_vl": ("Qwen2VLForConditionalGeneration", "qwen2_vl", "mrope"),
    "llava_onevision": ("Qwen2ForCausalLM", "qwen2_llava_onevision", "rope_gpt_neox"),
}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.")
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
# per-layer HF name (under layers.{l}.) -> TensorRT-LLM name (under transformer.layers.{l}.), split dim or None
_LINEAR = {
    "self_attn.o_proj.weight": ("attention.dense.weight", 1),
    "mlp.up_proj.weight": ("mlp.gate.weight", 0),
    "mlp.gate_proj.weight": ("mlp.fc.weight", 0),
    "mlp.down_proj.weight": ("mlp.proj.weight", 1),
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("post_layernorm.weight", None),
}


class CheckpointError(ValueError):
    """The model directory or checkpoint does not have the expected contents."""


def read_text_config(model_dir: str | Path) -> dict:
    """The text decoder's config (HF 5.x nests it in text_config; older Qwen2-VL files are flat)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = dict(cfg.get("text_config") or {})
    for k, v in cfg.items():
        text.setdefault(k, v)
    text["model_type"] = cfg["model_type"]
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return text


def _rope(text: dict) -> tuple[float, dict | None]:
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    section = params.get("mrope_section") or scaling.get("mrope_section")
    if section is not None:
        return theta, {"type": "mrope", "mrope_section": list(section)}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type in (None, "default"):
        return theta, None
    extra = {k: v for k, v in {**scaling, **params}.items() if k not in ("rope_theta", "rope_type")}
    return theta, {"type": rope_type, **extra}


def trtllm_config(text: dict, tp: int, dtype: str) -> dict:
    """The checkpoint's config.json (QWenConfig fields) for the text decoder."""
    arch, qwen_type, pe = TRTLLM_MODELS[text["model_type"]]
    theta, scaling = _rope(text)
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return {
        "architecture": arch, "qwen_type": qwen_type, "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
        "intermediate_size": text["intermediate_size"], "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"], "num_key_value_heads": text["num_key_value_heads"],
        "head_size": head, "hidden_act": text.get("hidden_act", "silu"), "norm_epsilon": text["rms_norm_eps"],
        "position_embedding_type": pe, "rotary_base": theta, "rotary_scaling": scaling,
        "rotary_embedding_dim": head if pe == "mrope" else None,
        "max_position_embeddings": text["max_position_embeddings"], "seq_length": 8192,
        "attn_bias": True, "mlp_bias": False, "use_logn_attn": False,
        "tie_word_embeddings": bool(text["tie_word_embeddings"]),
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def _text_keys(model_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(every tensor name -> its safetensors file, canonical text-decoder name -> that tensor name)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no *.safetensors weights")
    names = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            names.update({k: f for k in h.keys()})
    prefix = next((p for p in _PREFIXES if f"{p}layers.0.self_attn.q_proj.weight" in names), None)
    if prefix is None:
        raise CheckpointError(f"{model_dir}: no text decoder found (no *layers.0.self_attn.q_proj.weight)")
    wanted = {k[len(prefix):]: k for k in names
              if k.startswith(prefix) and k[len(prefix):].split(".")[0] in ("layers", "embed_tokens", "norm")}
    head = next((k for k in _LM_HEADS if k in names), None)
    if head:
        wanted["lm_head.weight"] = head
    return names, wanted


def load_text_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The text decoder's weights under canonical names: embed_tokens.weight, layers.{l}.*, norm.weight,
    lm_head.weight (the embedding when tied). Reads the safetensors files, never builds the model."""
    from safetensors import safe_open

    names, wanted = _text_keys(Path(model_dir))
    out = {}
    for canon, key in wanted.items():
        with safe_open(str(names[key]), "pt") as h:
            out[canon] = h.get_tensor(key)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def _split(t: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    return [c.contiguous() for c in torch.chunk(t, tp, dim=dim)]


def _kv_repeat(num_kv: int, tp: int) -> int:
    return tp // num_kv if num_kv < tp else 1


def to_trtllm(text: dict, weights: dict[str, torch.Tensor], tp: int = 1,
              dtype: str = "float16") -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Canonical HF text weights -> (config.json, one weight dict per tensor-parallel rank)."""
    cfg = trtllm_config(text, tp, dtype)
    dt = DTYPES[dtype]
    head, kv = cfg["head_size"], cfg["num_key_value_heads"]
    rep = _kv_repeat(kv, tp)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def put(name, tensor, dim):
        parts = _split(tensor.to(dt), tp, dim) if dim is not None else [tensor.to(dt).contiguous()] * tp
        for r in range(tp):
            ranks[r][name] = parts[r]

    for layer in range(cfg["num_hidden_layers"]):
        src, dst = f"layers.{layer}.", f"transformer.layers.{layer}."
        for kind in ("weight", "bias"):
            q = weights[f"{src}self_attn.q_proj.{kind}"]
            k, v = (weights[f"{src}self_attn.{n}_proj.{kind}"] for n in "kv")
            if rep > 1:  # one copy of each KV head per rank that serves it
                k, v = (t.reshape(kv, head, *t.shape[1:]).repeat_interleave(rep, 0).flatten(0, 1) for t in (k, v))
            for r, parts in enumerate(zip(*(_split(t.to(dt), tp, 0) for t in (q, k, v)))):
                ranks[r][f"{dst}attention.qkv.{kind}"] = torch.cat(parts, 0).contiguous()
        for hf_name, (name, dim) in _LINEAR.items():
            put(dst + name, weights[src + hf_name], dim)
    put("transformer.vocab_embedding.weight", weights["embed_tokens.weight"], None)
    put("transformer.ln_f.weight", weights["norm.weight"], None)
    lm = weights["lm_head.weight"].clone()  # may be the embedding itself (tied)
    pad = -lm.shape[0] % tp
    put("lm_head.weight", torch.cat([lm, lm.new_zeros(pad, lm.shape[1])]) if pad else lm, 0)
    return cfg, ranks


def to_hf(cfg: dict, ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `to_trtllm`: rank weights -> canonical HF text weights (rank-joined, unpadded)."""
    tp = cfg["mapping"]["tp_size"]
    if len(ranks) != tp:
        raise CheckpointError(f"config says tp_size={tp} but {len(ranks)} rank files were given")
    head, hq, kv = cfg["head_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rep = _kv_repeat(kv, tp)
    kv_local = kv * rep // tp
    out = {}

    def join(name, dim):
        return ranks[0][name] if dim is None else torch.cat([r[name] for r in ranks], dim)

    for layer in range(cfg["num_hidden_layers"]):
        src, dst = f"transformer.layers.{layer}.", f"layers.{layer}."
        for kind in ("weight", "bias"):
            sizes = [hq // tp * head, kv_local * head, kv_local * head]
            parts = [r[f"{src}attention.qkv.{kind}"].split(sizes, 0) for r in ranks]
            for i, n in enumerate("qkv"):
                t = torch.cat([p[i] for p in parts], 0)
                if n != "q" and rep > 1:  # drop the repeated KV heads
                    t = t.reshape(kv * rep, head, *t.shape[1:])[::rep].flatten(0, 1)
                out[f"{dst}self_attn.{n}_proj.{kind}"] = t.contiguous()
        for hf_name, (name, dim) in _LINEAR.items():
            out[dst + hf_name] = join(src + name, dim)
    out["embed_tokens.weight"] = join("transformer.vocab_embedding.weight", None)
    out["norm.weight"] = join("transformer.ln_f.weight", None)
    out["lm_head.weight"] = join("lm_head.weight", 0)[:cfg["vocab_size"]].contiguous()
    return out


def expected_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key and its per-rank shape, from the documented layout (module docstring)."""
    tp = cfg["mapping"]["tp_size"]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head, hq, kv = cfg["head_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qkv = (hq + 2 * kv * _kv_repeat(kv, tp)) * head // tp
    layout = {"transformer.vocab_embedding.weight": (v, h), "transformer.ln_f.weight": (h,),
              "lm_head.weight": ((v + -v % tp) // tp, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"transformer.layers.{layer}."
        layout.update({p + "input_layernorm.weight": (h,), p + "post_layernorm.weight": (h,),
                       p + "attention.qkv.weight": (qkv, h), p + "attention.qkv.bias": (qkv,),
                       p + "attention.dense.weight": (h, hq * head // tp),
                       p + "mlp.gate.weight": (i // tp, h), p + "mlp.fc.weight": (i // tp, h),
                       p + "mlp.proj.weight": (h, i // tp)})
    return layout


def check_layout(cfg: dict, ranks: list[dict[str, torch.Tensor]]) -> int:
    """Raise CheckpointError unless every rank has exactly the documented keys, shapes and dtype;
    returns the number of tensors checked."""
    want = expected_layout(cfg)
    dt = DTYPES[cfg["dtype"]]
    for r, weights in enumerate(ranks):
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        if missing or extra:
            raise CheckpointError(f"rank {r}: missing {missing[:5]}, unexpected {extra[:5]}")
        bad = [f"{k} {tuple(t.shape)} {t.dtype} (want {want[k]} {dt})" for k, t in weights.items()
               if tuple(t.shape) != want[k] or t.dtype != dt]
        if bad:
            raise CheckpointError(f"rank {r}: wrong shape/dtype: {bad[:5]}")
    return sum(len(w) for w in ranks)


def write_checkpoint(out: str | Path, cfg: dict, ranks: list[dict[str, torch.Tensor]]) -> list[Path]:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    paths = [out / "config.json"]
    for r, weights in enumerate(ranks):
        save_file(weights, str(out / f"rank{r}.safetensors"))
        paths.append(out / f"rank{r}.safetensors")
    return paths


def read_checkpoint(path: str | Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a TensorRT-LLM checkpoint (no config.json)")
    cfg = json.loads((path / "config.json").read_text())
    tp = cfg["mapping"]["tp_size"]
    files = [path / f"rank{r}.safetensors" for r in range(tp)]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{path}: tp_size={tp} but {absent} are missing")
    return cfg, [load_file(str(f)) for f in files]


def convert(model_dir: str | Path, out: str | Path, tp: int = 1, dtype: str = "float16") -> tuple[dict, list]:
    """HF model directory -> TensorRT-LLM checkpoint directory, layout-checked. Returns (config, ranks)."""
    text = read_text_config(model_dir)
    if text["model_type"] not in TRTLLM_MODELS:
        raise CheckpointError(f"{model_dir}: no TensorRT-LLM mapping for model_type {text['model_type']!r}")
    cfg, ranks = to_trtllm(text, load_text_weights(model_dir), tp, dtype)
    check_layout(cfg, ranks)
    write_checkpoint(out, cfg, ranks)
    return cfg, ranks


def write_hf(model_dir: str | Path, weights: dict[str, torch.Tensor], out: str | Path) -> list[Path]:
    """A loadable Hugging Face directory at `out`: `model_dir`'s files (config, tokenizer, preprocessor,
    the vision tower's and any other non-text weights) with its text decoder replaced by `weights`
    (canonical names, e.g. `to_hf` of a checkpoint). Weight files keep the source's names and sharding,
    so a sharded model's index still holds. Returns the files written."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out)
    names, wanted = _text_keys(model_dir)
    replace = {wanted[k]: v for k, v in weights.items() if k in wanted}  # a tied lm_head has no tensor of its own
    if len(replace) != len(wanted):
        raise CheckpointError(f"weights lack {sorted(set(wanted) - set(weights))[:5]} of {model_dir}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix != ".safetensors":
            written.append(Path(shutil.copy2(f, out / f.name)))
    for f in sorted(set(names.values())):
        with safe_open(str(f), "pt") as h:
            tensors = {k: replace[k] if k in replace else h.get_tensor(k) for k in h.keys()}
            meta = h.metadata()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f.name), metadata=meta)
        written.append(out / f.name)
    return written


def load_into(model, weights: dict[str, torch.Tensor]) -> None:
    """Load canonical text weights into a transformers Vid-LLM (its language model and LM head)."""
    lm = model.model.language_model
    own = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    missing, unexpected = lm.load_state_dict(own, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.lm_head.weight.copy_(weights["lm_head.weight"])

"""Build the TensorRT-LLM target engine with the hidden states the Sparrow draft reads as extra outputs.

`trtllm-build` builds engines that output logits only; the draft needs the target's residual stream at a low,
a middle and a high layer (and the glimpse layer). This builds the same engine through TensorRT-LLM's Python
build API with those tensors registered as network outputs named `sparrow_hidden_{k}` (k: the transformers
`hidden_states` index: 0 = embeddings, k = after decoder layer k - 1, num_layers = after the final norm),
which the Executor returns per request (`sparrow.runtime_trtllm`). Run by `build_engines.sh` on a GPU host:

    python -m sparrow.convert.trtllm_engine CHECKPOINT_DIR OUT_DIR --layers 1,2,4 [--max-batch-size ...]

Written to TensorRT-LLM's public build API (`tensorrt_llm.build`, `BuildConfig`, `Module.register_network_output`,
`BuildConfig.enable_debug_output` marking registered outputs); not run here (TensorRT-LLM cannot be installed on
this project's machines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..runtime_trtllm import OUTPUTS_FILE, hidden_output_name


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each within 0..num_layers; the final layer (num_layers, the logits' input) is added."""
    try:
        layers = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"--layers takes comma-separated layer indices, got {text!r}") from None
    bad = sorted(k for k in layers if not 0 <= k <= num_layers)
    if bad:
        raise ValueError(f"layers {bad} out of range: the target has hidden states 0..{num_layers}")
    return sorted(layers | {num_layers})


def mark_hidden_outputs(model, layers: list[int]) -> None:
    """Register `sparrow_hidden_{k}` on the TensorRT-LLM decoder model: the embedding output (k = 0), decoder layer
    k - 1's output, and the final norm's output (k = num_layers)."""
    body = model.transformer
    num_layers = len(body.layers)

    def tap(module, layer: int) -> None:
        forward = module.forward

        def wrapped(*args, **kwargs):
            out = forward(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # decoder layers return (hidden, present) with a cache
            model.register_network_output(hidden_output_name(layer), hidden)
            return out

        module.forward = wrapped

    for k in layers:
        if k == 0:
            tap(body.vocab_embedding, 0)
        elif k == num_layers:
            tap(body.ln_f, k)
        else:
            tap(body.layers[k - 1], k)


def build(checkpoint: Path, out: Path, layers_text: str, limits: dict) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    layers = parse_layers(layers_text, config["num_hidden_layers"])
    try:
        import tensorrt_llm
        from tensorrt_llm import BuildConfig
        from tensorrt_llm.models import QWenForCausalLM
    except ImportError as e:
        sys.exit(f"error: TensorRT-LLM is not installed (pip install tensorrt_llm on a CUDA host): {e}")
    ranks = config.get("mapping", {}).get("world_size", 1)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(ranks):
        model = QWenForCausalLM.from_checkpoint(str(checkpoint), rank=rank)
        mark_hidden_outputs(model, layers)
        build_config = BuildConfig(enable_debug_output=True, **limits)
        # KV-cache block reuse (each verify is a context request over the sequence so far) needs paged context FMHA
        build_config.plugin_config.use_paged_context_fmha = True
        engine = tensorrt_llm.build(model, build_config)
        engine.save(str(out))
        print(f"rank {rank}: engine written to {out}", flush=True)
    (out / OUTPUTS_FILE).write_text(json.dumps({"hidden_layers": layers, "dtype": config["dtype"]}, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sparrow.convert.trtllm_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="TensorRT-LLM checkpoint directory (sparrow build's trtllm/target)")
    p.add_argument("out", type=Path, help="engine output directory")
    p.add_argument("--layers", required=True, help="hidden_states indices the draft reads, e.g. 1,2,4")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-input-len", type=int, default=16384)
    p.add_argument("--max-seq-len", type=int, default=16640)
    p.add_argument("--max-num-tokens", type=int, default=16384)
    p.add_argument("--max-multimodal-len", type=int, default=16384, help="prompt-table rows (visual tokens) in flight")
    a = p.parse_args(argv)
    limits = dict(max_batch_size=a.max_batch_size, max_input_len=a.max_input_len, max_seq_len=a.max_seq_len,
                  max_num_tokens=a.max_num_tokens, max_prompt_embedding_table_size=a.max_multimodal_len)
    if not (a.checkpoint / "config.json").is_file():
        sys.exit(f"error: {a.checkpoint} is not a TensorRT-LLM checkpoint (no config.json)")
    try:
        build(a.checkpoint, a.out, a.layers, limits)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

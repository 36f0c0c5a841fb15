"""Converters and the engine build driver (`sparrow build`), installed as `sparrow.convert`.

- `recipe`: the YAML build recipe, validated with errors that name the problem;
- `trtllm_checkpoint`: HF Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision text decoder <-> TensorRT-LLM
  checkpoint (`config.json` + `rank{r}.safetensors`, fused QKV, tensor-parallel split);
- `onnx_vision`: the vision encoder -> ONNX (dynamic patch count), checked in ONNX Runtime;
- `onnx_draft`: the Sparrow draft's decoder-layer step -> ONNX with the plugin node;
- `build`: the driver (incremental steps, manifest, GPU build script).

TensorRT and TensorRT-LLM are never imported here except to probe for them.
"""

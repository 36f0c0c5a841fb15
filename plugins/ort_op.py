"""ONNX Runtime (CPU) kernel for the `sparrow.TextAnchoredWindowAttention` node.

The kernel is an onnxruntime-extensions Python custom op that runs the torch reference, so ORT,
torch and the Triton kernel share one definition of the operator. onnxruntime-extensions serves
Python ops from its own domain only, so `session()` loads a copy of the model with the sparrow
nodes moved into that domain; the model on disk keeps the `sparrow` domain that TensorRT binds.
Python ops take one fixed type signature: this kernel is fp32 with int64 anchors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
from onnxruntime_extensions import default_opset_domain as extensions_domain

from . import reference
from .node import DOMAIN, OP_TYPE, NodeAttributes
from .onnx_schema import register_schema

_f32, _i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64


@onnx_op(
    op_type=OP_TYPE,
    inputs=[_f32, _f32, _f32, _i64, _f32, _f32, PyCustomOpDef.dt_bool],
    outputs=[_f32],
    attrs={
        "scale": _f32,
        "window": _i64,
        "num_heads": _i64,
        "num_kv_heads": _i64,
        "plugin_namespace": PyCustomOpDef.dt_string,
        "aot": _i64,
    },
)
def _attention(q, k_win, v_win, anchors, k_new, v_new, mask, scale, **_checked_at_load):
    # An exception raised here aborts the whole process (onnxruntime-extensions 0.15), so every
    # check happens in check_model() at load time; ORT itself rejects inputs whose shapes differ
    # from the graph's static dims.
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k_win, v_win, anchors, k_new, v_new, mask)]
    return reference.window_attention(*tensors, float(scale)).numpy()  # [B, Hq, Tq, D]


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    register_schema()
    graph = onnx.shape_inference.infer_shapes(model).graph
    dims = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        shape = info.type.tensor_type.shape
        dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    for init in graph.initializer:
        dims[init.name] = list(init.dims)
    return dims


def check_model(model: onnx.ModelProto) -> None:
    """Validate every sparrow node's attributes against the static dims of its inputs."""
    dims = _static_dims(model)
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        spec = NodeAttributes(
            scale=attrs["scale"],
            window=attrs["window"],
            num_heads=attrs["num_heads"],
            num_kv_heads=attrs["num_kv_heads"],
        )
        q = dims.get(node.input[0]) or [None] * 4
        k_win = dims.get(node.input[1]) or [None] * 4
        spec.check_shapes(num_heads=q[1], num_kv_heads=k_win[1], window=k_win[2])


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose sparrow nodes live in the onnxruntime-extensions domain."""
    ort_model = onnx.ModelProto()
    ort_model.CopyFrom(model)
    moved = 0
    for node in ort_model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            node.domain = extensions_domain()
            moved += 1
    if moved == 0:
        raise ValueError(f"model has no {DOMAIN}.{OP_TYPE} node")
    imports = [op for op in ort_model.opset_import if op.domain != DOMAIN]
    del ort_model.opset_import[:]
    ort_model.opset_import.extend(imports + [onnx.helper.make_opsetid(extensions_domain(), 1)])
    return ort_model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU InferenceSession for an exported model containing sparrow attention nodes."""
    check_model(model)
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(
        for_onnxruntime(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

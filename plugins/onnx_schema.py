"""The ONNX schema of the `sparrow.TextAnchoredWindowAttention` node.

Registered with onnx so that the exporter can build the node and onnx.checker / shape inference
accept models that contain it.
"""

from __future__ import annotations

from onnx import defs

from .node import DOMAIN, DOMAIN_VERSION, INPUTS, OP_TYPE

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
SHAPES = {
    "q": "[B, Hq, Tq, D] queries of the draft's new tokens",
    "k_win": "[B, Hkv, W, D] window keys, ring buffer in slot order",
    "v_win": "[B, Hkv, W, D] window values",
    "anchors": "[B] anchors ever written; valid slots are [0, min(anchors, W))",
    "k_new": "[B, Hkv, Tq, D] keys of the draft's new tokens",
    "v_new": "[B, Hkv, Tq, D] values of the draft's new tokens",
    "mask": "[Tq, Tq] True = may attend (diagonal always on)",
}


def _schema() -> defs.OpSchema:
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    type_of = {"anchors": "I", "mask": "tensor(bool)"}
    return defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        "Sparrow VATA text-anchored window attention (see sparrow.plugins.reference).",
        inputs=[param(name, type_of.get(name, "T"), SHAPES[name]) for name in INPUTS],
        outputs=[param("out", "T", "[B, Hq, Tq, D]")],
        type_constraints=[
            ("T", FLOAT_TYPES, "float types"),
            ("I", ["tensor(int32)", "tensor(int64)"], "index types"),
        ],
        attributes=[
            attr("scale", kind.FLOAT, "softmax scale"),
            attr("window", kind.INT, "W, window slots"),
            attr("num_heads", kind.INT, "Hq"),
            attr("num_kv_heads", kind.INT, "Hkv"),
            attr("plugin_namespace", kind.STRING, "TensorRT plugin namespace"),
            attr("aot", kind.INT, "1: TensorRT uses the plugin's ahead-of-time kernel", required=False),
        ],
    )


def register_schema() -> None:
    """Make the node known to onnx (idempotent)."""
    if not defs.has(OP_TYPE, DOMAIN_VERSION, DOMAIN):
        defs.register_schema(_schema())

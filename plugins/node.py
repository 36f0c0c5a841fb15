"""The exported attention node's identity and attributes, shared by the ONNX exporter, the ONNX
Runtime kernel and the TensorRT plugin so that all three bind to the same name.

TensorRT's ONNX parser maps a node to a plugin when the node's op type is the plugin name and
its string attribute `plugin_namespace` is the plugin namespace; an int attribute `aot` = 1 asks
for the plugin's ahead-of-time implementation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DOMAIN = "sparrow"
DOMAIN_VERSION = 1
OP_TYPE = "TextAnchoredWindowAttention"
PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"
INPUTS = ("q", "k_win", "v_win", "anchors", "k_new", "v_new", "mask")


@dataclass(frozen=True)
class NodeAttributes:
    """Attributes stored on the node: the model constants the kernel is specialised for."""

    scale: float
    window: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite float, got {self.scale}")
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def to_onnx(self) -> dict[str, object]:
        """Node attributes, with the two TensorRT binds the node by."""
        return {**asdict(self), "plugin_namespace": DOMAIN, "aot": 1}

    def check_shapes(self, num_heads: int | None, num_kv_heads: int | None, window: int | None) -> None:
        """Raise if input dims disagree with the attributes the node was exported with; a dim that
        is None (unknown before run time) is not checked."""
        found = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "window": window}
        wrong = {k: (getattr(self, k), v) for k, v in found.items() if v is not None and getattr(self, k) != v}
        if wrong:
            detail = ", ".join(f"{k}: attribute {a} vs input {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"{OP_TYPE} inputs do not match node attributes ({detail})")

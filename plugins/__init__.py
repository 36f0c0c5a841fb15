"""Sparrow's VATA operators for every runtime the project targets.

Two operators, one reference (`reference.py`), one window convention: each sequence's window is
a ring buffer of W slots, `anchors[b]` counts the text anchors ever written to it, and the valid
slots are `[0, min(anchors[b], W))`.

- `window_attention`: the draft's new tokens attend to the valid window slots and to themselves
  (causal or tree mask); torch op `sparrow::text_anchored_window_attention`.
- `handoff`: append accepted text hidden states to the window in place; torch op
  `sparrow::handoff`.

Both ops run the reference on CPU and the Triton kernels (`triton_kernels.py`) on CUDA.
Optional runtimes, imported on demand: `onnx_export` (one custom ONNX node), `ort_op` (ONNX
Runtime CPU kernel for it), `tensorrt_plugin` (TensorRT 10+ plugin for the same node).
"""

from .node import PLUGIN_ID, NodeAttributes
from .ops import causal_mask, handoff, window_attention
from .reference import valid_slots
from .shapes import PluginInputError

__all__ = [
    "PLUGIN_ID",
    "NodeAttributes",
    "PluginInputError",
    "causal_mask",
    "handoff",
    "valid_slots",
    "window_attention",
]

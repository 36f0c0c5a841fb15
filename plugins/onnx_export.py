"""Export modules that call `sparrow::text_anchored_window_attention` to ONNX, the op becoming
one `sparrow.TextAnchoredWindowAttention` node (torch.onnx's dynamo exporter + onnxscript)."""

from __future__ import annotations

import os

import onnx
import onnxscript
import torch

from . import ops  # noqa: F401  (registers torch.ops.sparrow.*)
from .node import DOMAIN, DOMAIN_VERSION, OP_TYPE, NodeAttributes
from .onnx_schema import register_schema


def _static(dim: object, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"{what} must be static to export {OP_TYPE}, got symbolic {dim!r}")
    return dim


def _translate(q, k_win, v_win, anchors, k_new, v_new, mask, scale: float):
    attrs = NodeAttributes(
        scale=float(scale),
        window=_static(k_win.shape[2], "window size W"),
        num_heads=_static(q.shape[1], "query heads Hq"),
        num_kv_heads=_static(k_win.shape[1], "kv heads Hkv"),
    )
    node = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), OP_TYPE)
    return node(q, k_win, v_win, anchors, k_new, v_new, mask, **attrs.to_onnx())


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: str | os.PathLike | None = None,
    *,
    input_names: list[str] | None = None,
    dynamic_shapes: dict | tuple | None = None,
) -> onnx.ModelProto:
    """Export `module(*args)` with each window-attention call as one custom node.

    W, Hq and Hkv become node attributes and must be static; batch and token counts may be
    dynamic. Returns the checked model and saves it to `path` when given.
    """
    register_schema()
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=input_names,
        dynamic_shapes=dynamic_shapes,
        custom_translation_table={torch.ops.sparrow.text_anchored_window_attention.default: _translate},
    )
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model

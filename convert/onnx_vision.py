"""The Qwen2-VL vision encoder -> ONNX with a dynamic patch count, checked in ONNX Runtime.

transformers' forward derives rotary positions and per-frame attention blocks from `grid_thw` with
Python loops (data-dependent shapes), so the exported graph takes them as inputs instead:

    pixel_values [N, C*T*P*P] float32, position_ids [N, 2] int64 (h, w), frame_ids [N] int64
    -> embeddings [N / merge^2, H_text]

`graph_inputs(merge, grid_thw)` computes the two index inputs on the host (cheap integer work); inside the
graph each patch attends to the patches of its own temporal frame, as in transformers. The blocks
reuse the model's own modules (patch embed, norms, qkv, MLP, merger), so the weights are the model's.
Qwen2.5-VL (windowed vision attention) and LLaVA-OneVision (SigLIP) are not exported yet.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("qwen2_vl",)


class VisionGraph(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, position_ids, frame_ids):
        v = self.visual
        h = v.patch_embed(pixel_values)  # [N, E]
        cos, sin = v.rotary_pos_emb(h, position_ids)  # [N, D] each
        cos, sin = cos[:, None].float(), sin[:, None].float()
        mask = frame_ids[:, None] == frame_ids[None, :]  # [N, N]: attention stays within a frame
        n = h.shape[0]
        for blk in v.blocks:
            a = blk.attn
            q, k, val = blk.attn.qkv(blk.norm1(h)).reshape(n, 3, a.num_heads, -1).unbind(1)  # [N, heads, D]
            q, k = (self._rope(t, cos, sin) for t in (q, k))
            q, k, val = (t.transpose(0, 1)[None] for t in (q, k, val))  # [1, heads, N, D]
            out = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, scale=a.scaling)
            h = h + a.proj(out[0].transpose(0, 1).reshape(n, -1))
            h = h + blk.mlp(blk.norm2(h))
        return v.merger(h)

    @staticmethod
    def _rope(x, cos, sin):
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def graph_inputs(merge: int, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [N, 2] and frame_ids [N] for one video's grid `[1, 3]` (t, h, w in patches) and the
    tower's spatial merge size."""
    from transformers.vision_utils import get_vision_position_ids

    pos = get_vision_position_ids(grid_thw, merge)
    t, hh, ww = (int(x) for x in grid_thw[0])
    frames = torch.arange(t).repeat_interleave(hh * ww)
    return pos.long(), frames


def export(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor, path: str | os.PathLike):
    """Export the float32 vision encoder to `path` with the patch count N dynamic."""
    import onnx

    graph = VisionGraph(visual.float()).eval()
    args = (pixel_values.float(), *graph_inputs(visual.spatial_merge_size, grid_thw))
    merge = visual.spatial_merge_size ** 2
    n = torch.export.Dim("n", min=1, max=1 << 20) * merge  # whole merge groups of patches
    dyn = ({0: n}, {0: n}, {0: n})
    with torch.no_grad():
        program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dyn,
                                    input_names=["pixel_values", "position_ids", "frame_ids"],
                                    output_names=["embeddings"])
    model = program.model_proto
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return model


def check(visual: nn.Module, path: str | os.PathLike, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> float:
    """Max relative error of ONNX Runtime against transformers' own vision forward on these patches."""
    import onnxruntime as ort

    with torch.no_grad():
        want = visual.float()(pixel_values.float(), grid_thw=grid_thw).pooler_output
    pos, frames = graph_inputs(visual.spatial_merge_size, grid_thw)
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": pixel_values.float().numpy(), "position_ids": pos.numpy(),
                          "frame_ids": frames.numpy()})[0]
    return float((torch.from_numpy(got) - want).abs().max() / want.abs().max())

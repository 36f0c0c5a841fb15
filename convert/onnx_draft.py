"""The Sparrow draft's one decoder-layer step -> ONNX, its VATA attention as one
`sparrow.TextAnchoredWindowAttention` node (plugins/onnx_export.py), checked in ONNX Runtime
(plugins/ort_op.py runs the node) against torch.

Graph: tokens [1, T] int64, feats [1, T, H], positions [1, T] int64, k_win / v_win [1, Hkv, S, D]
(the window ring's keys/values with the glimpses in front: S = G + W, static), valid [1] int64
(valid slots), mask [T, T] bool -> hidden [1, T, H], logits [1, T, V]. T (draft tokens) is dynamic.
The window's keys/values come from `Draft.kv` once per round (WindowContext does the same), so the
step graph is exactly what runs K times per round.
"""

from __future__ import annotations

import os

import torch
from torch import nn

INPUTS = ["tokens", "feats", "positions", "k_win", "v_win", "valid", "mask"]


class DraftStep(nn.Module):
    def __init__(self, draft):
        super().__init__()
        self.draft = draft

    def forward(self, tokens, feats, positions, k_win, v_win, valid, mask):
        from ..plugins.ops import window_attention

        def attend(q, k, v):
            return window_attention(q, k_win, v_win, valid, k, v, mask)

        h = self.draft.layer(tokens, feats, positions, attend)
        return h, self.draft.logits(h)


def example_inputs(draft, tokens: int = 3, seed: int = 0) -> tuple:
    """A round's inputs: a full window of random anchors (+ glimpses), `tokens` chained draft tokens."""
    cfg = draft.cfg
    g = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    ring = torch.randn(1, cfg.window, h, generator=g)
    ring_pos = torch.arange(cfg.window)[None]
    with torch.no_grad():
        k_win, v_win = draft.kv(ring, ring_pos)
        if cfg.glimpses:
            glimpses = torch.randn(1, cfg.glimpses, h, generator=g)
            kg, vg = draft.kv(glimpses, torch.full((1, cfg.glimpses), cfg.window))
            k_win, v_win = torch.cat([kg, k_win], 2), torch.cat([vg, v_win], 2)
    tok = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g)
    feats = torch.randn(1, tokens, h, generator=g)
    pos = torch.arange(cfg.window + 1, cfg.window + 1 + tokens)[None]
    valid = torch.tensor([k_win.shape[2]])
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    return tok, feats, pos, k_win, v_win, valid, mask


def export(draft, path: str | os.PathLike):
    from ..plugins.onnx_export import export_onnx

    step = DraftStep(draft.float()).eval()
    t = torch.export.Dim("draft_tokens", min=2, max=64)
    dyn = ({1: t}, {1: t}, {1: t}, None, None, None, {0: t, 1: t})
    with torch.no_grad():
        return export_onnx(step, example_inputs(draft), path, input_names=INPUTS, dynamic_shapes=dyn)


def check(draft, model, tokens: int = 4, seed: int = 1) -> float:
    """Max relative error (logits) of ONNX Runtime against torch, at a draft length the export never saw."""
    from ..plugins import ort_op

    args = example_inputs(draft, tokens, seed)
    with torch.no_grad():
        _, want = DraftStep(draft.float()).eval()(*args)
    sess = ort_op.session(model)
    got = sess.run(None, {n: a.numpy() for n, a in zip(INPUTS, args)})[1]
    return float((torch.from_numpy(got) - want).abs().max() / want.abs().max())

"""The `sparrow::` torch custom ops the draft calls: one op per operator on every device.

Window attention runs the project's multi-token attention on CPU (the fused C++ op where it builds,
as the target runtime does; `SPARROW_ATTENTION=torch` forces torch) and the Triton kernel on CUDA;
the handoff a vectorised copy on CPU (held to the reference by tests) and the Triton kernel on CUDA.
The fake implementations carry shapes through torch.export / torch.compile, so both see a single
`sparrow::` node instead of tracing into it.
"""

from __future__ import annotations

import torch

from . import reference
from .shapes import check_attention, check_handoff, check_handoff_counts

ATTENTION_OP = "sparrow::text_anchored_window_attention"
HANDOFF_OP = "sparrow::handoff"


@torch.library.custom_op(ATTENTION_OP, mutates_args=())
def _attention(
    q: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    anchors: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return reference.window_attention(q, k_win, v_win, anchors, k_new, v_new, mask, scale)


@_attention.register_kernel("cuda")
def _attention_cuda(q, k_win, v_win, anchors, k_new, v_new, mask, scale):
    from . import triton_kernels

    return triton_kernels.window_attention(q, k_win, v_win, anchors, k_new, v_new, mask, scale)


@_attention.register_kernel("cpu")
def _attention_cpu(q, k_win, v_win, anchors, k_new, v_new, mask, scale):
    # Every draft step calls this over a few dozen keys, so per-call overhead is the cost: one
    # contiguous [valid window; own tokens] copy per sequence and the runtime's attention, instead of
    # the reference's head expansion and full-width masks.
    from ..attention import cpu_backend
    from ..attention import multi_token_attention as attend

    dims = check_attention(q, k_win, v_win, anchors, k_new, v_new, mask)
    if cpu_backend(q) == "cpp":
        from ..attention_cpp import multi_token_attention as attend
    own = mask | torch.eye(dims.queries, dtype=torch.bool)  # [Tq, Tq]
    out = torch.empty(q.shape, dtype=torch.float32)  # [B, Hq, Tq, D]
    for b, n in enumerate(reference.valid_slots(anchors, dims.window).tolist()):
        k = torch.cat([k_win[b, :, :n], k_new[b]], 1).float()  # [Hkv, n + Tq, D]
        v = torch.cat([v_win[b, :, :n], v_new[b]], 1).float()
        out[b] = attend(q[b].float().contiguous(), k, v, n, own, scale)
    return out.to(q.dtype)


@_attention.register_fake
def _attention_fake(q, k_win, v_win, anchors, k_new, v_new, mask, scale):
    check_attention(q, k_win, v_win, anchors, k_new, v_new, mask)
    return torch.empty_like(q)  # [B, Hq, Tq, D]


@torch.library.custom_op(HANDOFF_OP, mutates_args=("window",))
def _handoff(
    window: torch.Tensor,
    hidden: torch.Tensor,
    accepted: torch.Tensor,
    text_mask: torch.Tensor,
    anchors: torch.Tensor,
) -> torch.Tensor:
    return reference.handoff(window, hidden, accepted, text_mask, anchors)


@_handoff.register_kernel("cuda")
def _handoff_cuda(window, hidden, accepted, text_mask, anchors):
    from . import triton_kernels

    return triton_kernels.handoff(window, hidden, accepted, text_mask, anchors)


@_handoff.register_kernel("cpu")
def _handoff_cpu(window, hidden, accepted, text_mask, anchors):
    # The draft hands off every round, a handful of rows: one index_copy_ per sequence instead of the
    # reference's per-row Python loop.
    dims = check_handoff(window, hidden, accepted, text_mask, anchors)
    counts, starts = check_handoff_counts(accepted, anchors, dims.rows)
    texts = text_mask.sum(1).tolist()  # [B]: all text in a decode round, so no boolean gather there
    ends = []
    for b, (n, start) in enumerate(zip(counts, starts)):
        rows = hidden[b, :n] if texts[b] == dims.rows else hidden[b, :n][text_mask[b, :n]]  # [m, H]
        m = rows.shape[0]
        keep = min(m, dims.window)  # appended in order, so only the last W of them survive
        first = (start + m - keep) % dims.window
        if first + keep <= dims.window:  # no wrap-around: a slice copy
            window[b, first:first + keep] = rows[m - keep:]
        else:
            window[b].index_copy_(0, (start + torch.arange(m - keep, m)) % dims.window, rows[m - keep:])
        ends.append(start + m)
    return torch.tensor(ends, dtype=anchors.dtype)  # [B]


@_handoff.register_fake
def _handoff_fake(window, hidden, accepted, text_mask, anchors):
    check_handoff(window, hidden, accepted, text_mask, anchors)
    return torch.empty_like(anchors)  # [B]


def causal_mask(queries: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The chain mask: draft token i may attend to draft tokens 0..i. [Tq, Tq] bool"""
    return torch.ones(queries, queries, dtype=torch.bool, device=device).tril()


def window_attention(
    q: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    anchors: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """VATA attention of the draft's new tokens over the text-anchor window and themselves.

    q [B, Hq, Tq, D]; k_win, v_win [B, Hkv, W, D] (the window ring buffer, read in slot order);
    anchors [B] running anchor counts (valid slots are [0, min(anchors, W))); k_new, v_new
    [B, Hkv, Tq, D]; tree_mask [Tq, Tq] bool (True = may attend; the diagonal is always on),
    causal when None; scale defaults to D ** -0.5. Returns [B, Hq, Tq, D].
    """
    mask = causal_mask(q.shape[2], q.device) if tree_mask is None else tree_mask
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.sparrow.text_anchored_window_attention(q, k_win, v_win, anchors, k_new, v_new, mask, scale)


def handoff(
    window: torch.Tensor,
    hidden: torch.Tensor,
    accepted: torch.Tensor,
    anchors: torch.Tensor,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append accepted text hidden states to the window ring buffer in place.

    window [B, W, H] (written in place); hidden [B, T, H]; accepted [B] leading rows accepted per
    sequence; anchors [B] running anchor counts; text_mask [B, T] bool, all text when None.
    Returns the new anchor counts [B].
    """
    if text_mask is None:
        text_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # [B, T]
    return torch.ops.sparrow.handoff(window, hidden, accepted, text_mask, anchors)

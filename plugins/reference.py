"""Plain PyTorch reference for VATA's two operators: text-anchored window attention and the
hidden-state handoff into the window ring buffer.

Window convention (shared by both operators and every backend):
- Each sequence owns a ring buffer of W slots. `anchors[b]` counts the text anchors ever written
  to sequence b (monotone, never capped). Slot `i % W` holds anchor number i, so the next write
  goes to slot `anchors[b] % W` and the valid slots are `[0, min(anchors[b], W))`: the ring is
  filled from slot 0 and no slot is ever emptied again.
- Attention reads the window in slot order with no copy or roll. That is exact because every
  anchor lies in the past of every query: no mask separates anchors from one another, so the
  result does not depend on their order. Rotary positions are applied by the draft before it
  writes keys; the operator never sees positions.

The reference computes in fp32 and is written to be obviously correct, not fast.
"""

from __future__ import annotations

import torch

from .shapes import PluginInputError, check_attention, check_handoff, check_handoff_counts


def valid_slots(anchors: torch.Tensor, window: int) -> torch.Tensor:
    """Number of valid window slots per sequence, `min(anchors, W)`: [B]."""
    return anchors.clamp(max=window)


def window_attention(
    q: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    anchors: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Queries attend to the valid window slots and, under `mask | I`, to the draft's own tokens.

    q [B, Hq, Tq, D]; k_win, v_win [B, Hkv, W, D]; anchors [B]; k_new, v_new [B, Hkv, Tq, D];
    mask [Tq, Tq] bool, True = query row may attend to that draft token. A token always attends to
    itself (the diagonal is forced on), so no row is ever empty even with zero anchors.
    Returns [B, Hq, Tq, D] in q's dtype.
    """
    dims = check_attention(q, k_win, v_win, anchors, k_new, v_new, mask)
    b, tq, w = dims.batch, dims.queries, dims.window
    k = torch.cat([k_win, k_new], dim=2).float().repeat_interleave(dims.group, dim=1)  # [B, Hq, W+Tq, D]
    v = torch.cat([v_win, v_new], dim=2).float().repeat_interleave(dims.group, dim=1)  # [B, Hq, W+Tq, D]
    slot_ok = torch.arange(w, device=q.device)[None, :] < valid_slots(anchors, w)[:, None]  # [B, W]
    own_ok = mask | torch.eye(tq, dtype=torch.bool, device=q.device)  # [Tq, Tq]
    allowed = torch.cat([slot_ok[:, None].expand(b, tq, w), own_ok[None].expand(b, tq, tq)], dim=2)  # [B, Tq, W+Tq]
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [B, Hq, Tq, W+Tq]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)  # [B, Hq, Tq, D]


def handoff(
    window: torch.Tensor,
    hidden: torch.Tensor,
    accepted: torch.Tensor,
    text_mask: torch.Tensor,
    anchors: torch.Tensor,
) -> torch.Tensor:
    """Append each sequence's accepted text hidden states to its window ring buffer, in place.

    window [B, W, H] is written in place; hidden [B, T, H] holds the target's hidden states for
    the verified positions, accepted [B] how many leading rows of each sequence were accepted,
    text_mask [B, T] which rows are text (visual rows never enter the draft's window), anchors
    [B] the running anchor counts. Rows are appended in order, so when more than W arrive only
    the last W survive. Returns the new anchor counts [B] (same dtype as anchors);
    `valid_slots(new, W)` gives the new valid lengths.
    """
    dims = check_handoff(window, hidden, accepted, text_mask, anchors)
    check_handoff_counts(accepted, anchors, dims.rows)
    new_anchors = anchors.clone()
    for b in range(dims.batch):
        n = int(accepted[b])
        rows = hidden[b, :n][text_mask[b, :n]]  # [n_text, H]
        for row in rows:
            window[b, int(new_anchors[b]) % dims.window] = row
            new_anchors[b] += 1
    return new_anchors

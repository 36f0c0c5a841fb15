"""Input checks shared by the reference, the Triton launchers and the fake (meta) implementations.

Every backend accepts exactly the same inputs, so the rules live here once and each error names
the problem. The checks read shapes, dtypes and devices only, never tensor values, so they run
unchanged on fake tensors under torch.export / torch.compile and never synchronise a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class PluginInputError(ValueError):
    """Raised when an operator input has the wrong shape, dtype or device."""


@dataclass(frozen=True)
class AttentionDims:
    batch: int
    num_heads: int
    num_kv_heads: int
    queries: int
    window: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class HandoffDims:
    batch: int
    window: int
    hidden: int
    rows: int


def _require(cond: bool, message: str | Callable[[], str]) -> None:
    """Raise with `message` unless `cond`; a callable message is formatted only then (the checks run on
    every draft round, where formatting shapes into strings that are never shown cost more than the op)."""
    if not cond:
        raise PluginInputError(message() if callable(message) else message)


def _rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    _require(t.dim() == rank, lambda: f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    _require(len(set(devices.values())) == 1, lambda: f"all inputs must be on one device, got {devices}")


def check_attention(
    q: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    anchors: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor,
) -> AttentionDims:
    _rank("q", q, 4, "[B, Hq, Tq, D]")
    _rank("k_win", k_win, 4, "[B, Hkv, W, D]")
    _rank("v_win", v_win, 4, "[B, Hkv, W, D]")
    _rank("anchors", anchors, 1, "[B]")
    _rank("k_new", k_new, 4, "[B, Hkv, Tq, D]")
    _rank("v_new", v_new, 4, "[B, Hkv, Tq, D]")
    _rank("mask", mask, 2, "[Tq, Tq]")
    _same_device(q=q, k_win=k_win, v_win=v_win, anchors=anchors, k_new=k_new, v_new=v_new, mask=mask)
    _require(q.dtype in FLOAT_DTYPES, lambda: f"q dtype must be one of {FLOAT_DTYPES}, got {q.dtype}")
    for name, t in (("k_win", k_win), ("v_win", v_win), ("k_new", k_new), ("v_new", v_new)):
        _require(t.dtype == q.dtype, lambda: f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
    _require(anchors.dtype in INDEX_DTYPES, lambda: f"anchors dtype must be int32 or int64, got {anchors.dtype}")
    _require(mask.dtype == torch.bool, lambda: f"mask dtype must be torch.bool, got {mask.dtype}")
    b, hq, tq, d = q.shape
    hkv, w = k_win.shape[1], k_win.shape[2]
    _require(hkv > 0 and hq % hkv == 0, lambda: f"Hq={hq} query heads is not a multiple of Hkv={hkv} kv heads")
    _require(tq > 0, "q has no query tokens (Tq=0)")
    _require(w > 0, "window has no slots (W=0)")
    _require(
        tuple(v_win.shape) == tuple(k_win.shape),
        lambda: f"v_win shape {tuple(v_win.shape)} != k_win shape {tuple(k_win.shape)}",
    )
    _require(
        k_win.shape[0] == b and k_win.shape[3] == d,
        lambda: f"k_win shape {tuple(k_win.shape)} does not match q batch {b} / head dim {d}",
    )
    new_shape = (b, hkv, tq, d)
    _require(tuple(k_new.shape) == new_shape, lambda: f"k_new shape {tuple(k_new.shape)} != expected {new_shape}")
    _require(tuple(v_new.shape) == new_shape, lambda: f"v_new shape {tuple(v_new.shape)} != expected {new_shape}")
    _require(anchors.shape[0] == b, lambda: f"anchors has {anchors.shape[0]} entries, batch is {b}")
    _require(tuple(mask.shape) == (tq, tq), lambda: f"mask shape {tuple(mask.shape)} != (Tq, Tq) = {(tq, tq)}")
    return AttentionDims(batch=b, num_heads=hq, num_kv_heads=hkv, queries=tq, window=w, head_dim=d)


def check_handoff(
    window: torch.Tensor,
    hidden: torch.Tensor,
    accepted: torch.Tensor,
    text_mask: torch.Tensor,
    anchors: torch.Tensor,
) -> HandoffDims:
    _rank("window", window, 3, "[B, W, H]")
    _rank("hidden", hidden, 3, "[B, T, H]")
    _rank("accepted", accepted, 1, "[B]")
    _rank("text_mask", text_mask, 2, "[B, T]")
    _rank("anchors", anchors, 1, "[B]")
    _same_device(window=window, hidden=hidden, accepted=accepted, text_mask=text_mask, anchors=anchors)
    _require(window.dtype in FLOAT_DTYPES, lambda: f"window dtype must be one of {FLOAT_DTYPES}, got {window.dtype}")
    _require(hidden.dtype == window.dtype,
             lambda: f"hidden dtype {hidden.dtype} differs from window dtype {window.dtype}")
    _require(accepted.dtype in INDEX_DTYPES, lambda: f"accepted dtype must be int32 or int64, got {accepted.dtype}")
    _require(anchors.dtype in INDEX_DTYPES, lambda: f"anchors dtype must be int32 or int64, got {anchors.dtype}")
    _require(text_mask.dtype == torch.bool, lambda: f"text_mask dtype must be torch.bool, got {text_mask.dtype}")
    b, w, h = window.shape
    _require(w > 0, "window has no slots (W=0)")
    _require(hidden.shape[0] == b, lambda: f"hidden batch {hidden.shape[0]} != window batch {b}")
    _require(hidden.shape[2] == h, lambda: f"hidden size {hidden.shape[2]} != window hidden size {h}")
    t = hidden.shape[1]
    _require(tuple(text_mask.shape) == (b, t), lambda: f"text_mask shape {tuple(text_mask.shape)} != (B, T) = {(b, t)}")
    _require(accepted.shape[0] == b, lambda: f"accepted has {accepted.shape[0]} entries, batch is {b}")
    _require(anchors.shape[0] == b, lambda: f"anchors has {anchors.shape[0]} entries, batch is {b}")
    return HandoffDims(batch=b, window=w, hidden=h, rows=t)


def check_handoff_counts(accepted: torch.Tensor, anchors: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
    """Value checks (host-side, so not in the fake/meta path): accepted in [0, T], anchors >= 0.
    Returns both as lists."""
    counts, starts = accepted.tolist(), anchors.tolist()
    _require(all(0 <= n <= rows for n in counts), lambda: f"accepted counts {counts} must lie in [0, T={rows}]")
    _require(all(a >= 0 for a in starts), lambda: f"anchor counts {starts} must be non-negative")
    return counts, starts

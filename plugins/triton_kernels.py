"""OpenAI Triton kernels for text-anchored window attention and the hidden-state handoff.

Same semantics and window convention as `reference.py`. The kernels assume contiguous tensors
(the launchers make them so; the draft's window buffers already are) so that a TensorRT AOT
launch, which passes only base pointers and int32 sizes, can call the very same kernel.
Argument order is (input pointers, int32 sizes, output pointers, constexprs): the order the
TensorRT AOT plugin contract fixes.

On a machine without a GPU, set TRITON_INTERPRET=1 before importing this module and pass CPU
tensors: the kernels then run in Triton's interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .shapes import PluginInputError, check_attention, check_handoff

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
# Row tiles hold up to 64 stacked (head, token) query rows: a whole GQA group of a token tree in
# one program, so the window is read once per kv head; window tiles are 64 slots.
MAX_BLOCK_M = 64
BLOCK_N = 64
BLOCK_T = 16
BLOCK_H = 128
BLOCK_ROWS = 16


def pow2_block(n: int, cap: int | None = None) -> int:
    # tl.dot needs every tile side to be a power of two and at least 16.
    block = max(16, triton.next_power_of_2(n))
    return block if cap is None else min(block, cap)


@triton.jit
def _online_softmax_step(q, k_ptrs, v_ptrs, kv_ok, allowed, m_i, l_i, acc, qk_scale,
                         DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k = tl.load(k_ptrs, mask=kv_ok, other=0.0).to(DOT_DTYPE)  # [BLOCK, BLOCK_D]
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0).to(DOT_DTYPE)  # [BLOCK, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK]
    s = tl.where(allowed, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Zero masked entries explicitly: a row whose only allowed keys are still ahead has
    # m_new == -1e30, and exp2(s - m_new) would count its masked keys with weight 1.
    p = tl.where(allowed, tl.math.exp2(s - m_new[:, None]), 0.0)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def window_attention_kernel(
    q_ptr, kw_ptr, vw_ptr, anchors_ptr, kn_ptr, vn_ptr, mask_ptr,
    num_kv_heads, group, queries, window, head_dim,
    out_ptr,
    SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (sequence, kv head, tile of query rows): the rows of all query heads that
    # share a kv head are stacked (row = g * Tq + t) so each window tile is read once for the
    # whole GQA group and every draft token.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < group * queries
    t = rows % queries
    head = kvh * group + rows // queries
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_rows = ((b * num_kv_heads * group + head) * queries + t).to(tl.int64)  # [BLOCK_M]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * head_dim + d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q = q.to(DOT_DTYPE)
    qk_scale = SCALE * LOG2E

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    new_base = (pid_bh * queries).to(tl.int64)
    for j0 in range(0, queries, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        j_ok = j < queries
        tree = tl.load(mask_ptr + t[:, None] * queries + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0)
        allowed = row_ok[:, None] & j_ok[None, :] & ((tree != 0) | (t[:, None] == j[None, :]))  # [BLOCK_M, BLOCK_T]
        offs = (new_base + j)[:, None] * head_dim + d[None, :]
        kv_ok = j_ok[:, None] & d_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(
            q, kn_ptr + offs, vn_ptr + offs, kv_ok, allowed, m_i, l_i, acc, qk_scale, DOT_DTYPE, DOT_PRECISION
        )

    n_valid = tl.minimum(tl.load(anchors_ptr + b), window).to(tl.int32)
    win_base = (pid_bh * window).to(tl.int64)
    for s0 in range(0, n_valid, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        s_ok = s < n_valid
        offs = (win_base + s)[:, None] * head_dim + d[None, :]
        kv_ok = s_ok[:, None] & d_ok[None, :]
        allowed = row_ok[:, None] & s_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(
            q, kw_ptr + offs, vw_ptr + offs, kv_ok, allowed, m_i, l_i, acc, qk_scale, DOT_DTYPE, DOT_PRECISION
        )

    # Padding rows (row_ok False) have l_i == 0; they are never stored, the guard only keeps
    # the division finite.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * head_dim + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def handoff_kernel(
    hidden_ptr, accepted_ptr, text_ptr, anchors_in_ptr,
    rows, window, hidden_size,
    window_ptr, anchors_out_ptr,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One program per (sequence, slice of the hidden size). Only the last W accepted text rows
    # are written, each to its own slot, so programs never race on a slot.
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_acc = tl.minimum(tl.maximum(tl.load(accepted_ptr + b).to(tl.int32), 0), rows)
    start = tl.load(anchors_in_ptr + b)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = h < hidden_size

    n_text = tl.zeros([], dtype=tl.int32)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)
        is_text = (tl.load(text_ptr + b * rows + r, mask=r < n_acc, other=0) != 0).to(tl.int32)
        n_text += tl.sum(is_text, axis=0)
    first_kept = n_text - window

    seen = tl.zeros([], dtype=tl.int32)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
        is_text = (tl.load(text_ptr + b * rows + r, mask=r < n_acc, other=0) != 0).to(tl.int32)
        rank = seen + tl.cumsum(is_text, axis=0) - 1  # rank among accepted text rows
        keep = (is_text != 0) & (rank >= first_kept)
        slot = ((start + rank) % window).to(tl.int64)
        src = (b * rows + r).to(tl.int64)[:, None] * hidden_size + h[None, :]
        dst = (b * window + slot)[:, None] * hidden_size + h[None, :]
        io_ok = keep[:, None] & h_ok[None, :]
        tl.store(window_ptr + dst, tl.load(hidden_ptr + src, mask=io_ok, other=0.0), mask=io_ok)
        seen += tl.sum(is_text, axis=0)

    if pid_h == 0:
        tl.store(anchors_out_ptr + b, start + n_text)


def _check_out(out: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise PluginInputError(
            f"{name} must be {tuple(like.shape)} {like.dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise PluginInputError(f"{name} must be contiguous")


def dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(operand dtype, input_precision) for the kernel's tl.dot calls on `dtype` inputs."""
    if dtype == torch.float32:
        # Without "ieee", fp32 products run in tf32 on NVIDIA GPUs (about 1e-3 relative error).
        return tl.float32, "ieee"
    if dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        # Triton 3.9's CPU interpreter multiplies bf16 tiles as raw 16-bit integers (garbage),
        # so interpreted bf16 tiles are multiplied in fp32; GPUs multiply them in bf16.
        return tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "tf32"


def pipeline_stages(dtype: torch.dtype) -> int:
    # fp32 tiles are twice the bytes: with Triton's default 3 stages a 64-row, D=128 tile set
    # needs 180 KB of shared memory, over an A100's 163 KB; one stage needs 98 KB.
    return 1 if dtype == torch.float32 else 3


def window_attention(
    q: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    anchors: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launch of `reference.window_attention`; writes into `out` when given. [B, Hq, Tq, D]"""
    dims = check_attention(q, k_win, v_win, anchors, k_new, v_new, mask)
    if not math.isfinite(scale):
        raise PluginInputError(f"scale must be finite, got {scale}")
    q, k_win, v_win, anchors, k_new, v_new, mask = (
        t.contiguous() for t in (q, k_win, v_win, anchors, k_new, v_new, mask)
    )
    if out is None:
        out = torch.empty_like(q)  # [B, Hq, Tq, D]
    _check_out(out, q, "out")
    dot_dtype, precision = dot_types(q.dtype)
    block_m = pow2_block(dims.group * dims.queries, MAX_BLOCK_M)
    grid = (dims.batch * dims.num_kv_heads, triton.cdiv(dims.group * dims.queries, block_m))
    window_attention_kernel[grid](
        q, k_win, v_win, anchors, k_new, v_new, mask,
        dims.num_kv_heads, dims.group, dims.queries, dims.window, dims.head_dim,
        out,
        SCALE=float(scale), DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_T=BLOCK_T, BLOCK_D=pow2_block(dims.head_dim),
        num_stages=pipeline_stages(q.dtype),
    )
    return out


def handoff(
    window: torch.Tensor,
    hidden: torch.Tensor,
    accepted: torch.Tensor,
    text_mask: torch.Tensor,
    anchors: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launch of `reference.handoff`: writes `window` in place, returns new anchor counts
    [B] (into `out` when given). Out-of-range accepted counts are clamped to [0, T] here, where
    the reference raises."""
    dims = check_handoff(window, hidden, accepted, text_mask, anchors)
    if not window.is_contiguous():
        raise PluginInputError("window must be contiguous: it is written in place")
    hidden, accepted, text_mask, anchors = (t.contiguous() for t in (hidden, accepted, text_mask, anchors))
    if out is None:
        out = torch.empty_like(anchors)  # [B]
    _check_out(out, anchors, "out")
    grid = (dims.batch, triton.cdiv(dims.hidden, BLOCK_H))
    handoff_kernel[grid](
        hidden, accepted, text_mask, anchors,
        dims.rows, dims.window, dims.hidden,
        window, out,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_H=BLOCK_H,
    )
    return out

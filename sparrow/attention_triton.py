"""OpenAI Triton kernel for the runtime's multi-token decode attention (CUDA).

Same semantics as `attention.multi_token_attention`: T new tokens (decode, chain or tree verify, a
prefill chunk) attend to a slot's cached keys plus the new ones under a `[T, T]` tail mask, with
GQA read natively. One launch serves a ragged batch: every sequence brings its own slot and its
own cached length, so the grid spans (sequence, KV head) pairs and no sequence is padded.

Each program stacks the G query heads of a KV head's group with the T new tokens into one row
tile (row = g * T + t, as `multi_token_attention` stacks them), so each key/value tile is read
once for all G * T rows, and runs an fp32 online softmax over one range of key positions. Long
caches are split over several programs (flash-decoding): each writes a partial output and its
log-sum-exp, and a second kernel combines them, so a batch of a few (sequence, KV head) pairs
still fills the GPU.

The kernels come from `sparrow.plugins.triton_kernels`'s building blocks (online-softmax step,
tile sizes, dot precision), so both attention kernels of the project share one softmax.

Without a GPU, set TRITON_INTERPRET=1 before anything imports triton and pass CPU tensors: the
kernels then run in Triton's interpreter (that is how the tests run them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl

    from .plugins.triton_kernels import (
        BLOCK_N,
        LOG2E,
        MAX_BLOCK_M,
        _online_softmax_step,
        dot_types,
        pipeline_stages,
        pow2_block,
    )
except ImportError:  # a CPU install without triton: importing works, launching raises
    triton = None

# Below this many keys per split, writing and combining the partials (G*T*D floats per split)
# costs more than the extra parallelism buys.
MIN_SPLIT_KEYS = 256
# Programs to aim for per streaming multiprocessor when choosing the split count.
PROGRAMS_PER_SM = 2

if triton is not None:
    # The interpreter replaces kernels at decoration time, so the mode is fixed when this imports.
    INTERPRETED = bool(triton.knobs.runtime.interpret)
    EMPTY: tl.constexpr = tl.constexpr(-1.0e30)  # max / log-sum-exp of rows with no allowed key yet

    @triton.jit
    def _stacked_rows(seq, kvh, pid_m, group, tokens, stride_b, stride_h, stride_t, BLOCK_M: tl.constexpr):
        # Row r of a KV head's tile is query head kvh * group + r // tokens, new token r % tokens.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        t = rows % tokens
        head = kvh * group + rows // tokens
        offs = seq.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + t.to(tl.int64) * stride_t
        return rows, rows < group * tokens, t, offs

    @triton.jit
    def decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, slots_ptr, pasts_ptr,
        out_ptr, part_acc_ptr, part_lse_ptr,
        q_sb, q_sh, q_st, k_ss, k_sh, k_st, v_ss, v_sh, v_st, o_sb, o_sh, o_st,
        num_kv_heads, group, tokens, head_dim, split_len, scale,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    ):
        # Grid (sequence * KV head, row tile, split of the key positions).
        pid_sk = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        seq = pid_sk // num_kv_heads
        kvh = pid_sk % num_kv_heads
        slot = tl.load(slots_ptr + seq).to(tl.int64)
        past = tl.load(pasts_ptr + seq).to(tl.int32)

        rows, row_ok, t, q_offs = _stacked_rows(seq, kvh, pid_m, group, tokens, q_sb, q_sh, q_st, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(q_ptr + q_offs[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
        qk_scale = scale * LOG2E  # the softmax runs in base 2

        m_i = tl.full([BLOCK_M], EMPTY, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        k_base = k_ptr + slot * k_ss + kvh.to(tl.int64) * k_sh
        v_base = v_ptr + slot * v_ss + kvh.to(tl.int64) * v_sh
        lo = pid_s * split_len
        hi = tl.minimum(lo + split_len, past + tokens)  # a short sequence leaves late splits empty
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions in the slot
            n_ok = n < hi
            j = n - past  # index among the new tokens; negative for cached keys, which all rows see
            tail = tl.load(mask_ptr + t[:, None] * tokens + j[None, :],
                           mask=row_ok[:, None] & (n_ok & (j >= 0))[None, :], other=0)  # [BLOCK_M, BLOCK_N]
            allowed = n_ok[None, :] & ((j < 0)[None, :] | (tail != 0))
            n64 = n.to(tl.int64)[:, None]
            m_i, l_i, acc = _online_softmax_step(
                q, k_base + n64 * k_st + d[None, :], v_base + n64 * v_st + d[None, :],
                n_ok[:, None] & d_ok[None, :], allowed, m_i, l_i, acc, qk_scale, DOT_DTYPE, DOT_PRECISION,
            )

        # Rows with no allowed key yet (padding rows, empty splits) have l_i == 0: keep them finite.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        io_ok = row_ok[:, None] & d_ok[None, :]
        if SPLIT:
            part = (pid_sk * tl.num_programs(2) + pid_s).to(tl.int64) * (group * tokens) + rows  # [BLOCK_M]
            tl.store(part_acc_ptr + part[:, None] * head_dim + d[None, :], out, mask=io_ok)
            tl.store(part_lse_ptr + part, tl.where(l_i > 0, m_i + tl.math.log2(l_safe), EMPTY), mask=row_ok)
        else:
            _, _, _, o_offs = _stacked_rows(seq, kvh, pid_m, group, tokens, o_sb, o_sh, o_st, BLOCK_M)
            tl.store(out_ptr + o_offs[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_ok)

    @triton.jit
    def combine_splits_kernel(
        part_acc_ptr, part_lse_ptr, out_ptr,
        o_sb, o_sh, o_st,
        num_kv_heads, group, tokens, head_dim, num_splits,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Grid (sequence * KV head, row tile): weights each split's normalised partial output by
        # 2^(its log-sum-exp - the largest), the exact softmax over the union of the splits' keys.
        pid_sk = tl.program_id(0)
        pid_m = tl.program_id(1)
        seq = pid_sk // num_kv_heads
        kvh = pid_sk % num_kv_heads
        rows, row_ok, _, o_offs = _stacked_rows(seq, kvh, pid_m, group, tokens, o_sb, o_sh, o_st, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        io_ok = row_ok[:, None] & (d < head_dim)[None, :]
        first = pid_sk.to(tl.int64) * num_splits * (group * tokens) + rows  # [BLOCK_M] row of split 0

        lse_max = tl.full([BLOCK_M], EMPTY, dtype=tl.float32)
        for s in range(num_splits):
            lse = tl.load(part_lse_ptr + first + s * (group * tokens), mask=row_ok, other=EMPTY)
            lse_max = tl.maximum(lse_max, lse)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        w_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s in range(num_splits):
            part = first + s * (group * tokens)
            w = tl.math.exp2(tl.load(part_lse_ptr + part, mask=row_ok, other=EMPTY) - lse_max)
            acc += w[:, None] * tl.load(part_acc_ptr + part[:, None] * head_dim + d[None, :], mask=io_ok, other=0.0)
            w_sum += w
        out = acc / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
        tl.store(out_ptr + o_offs[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_ok)


def _check_launchable(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("the CUDA attention kernel needs OpenAI Triton (pip install triton)")
    if device.type == "cuda" and INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 was set when sparrow.attention_triton was imported: "
                           "its kernels are interpreter functions and cannot take CUDA tensors")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the Triton attention kernel runs on CUDA tensors, got {device}; to run it on "
                           "the CPU set TRITON_INTERPRET=1 before importing triton (Triton's interpreter)")


def _auto_splits(device: torch.device, programs: int, max_keys: int) -> int:
    if device.type != "cuda":
        return 1  # the interpreter gains nothing from more programs
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, triton.cdiv(max_keys, MIN_SPLIT_KEYS)))


def _index_tensor(values: Sequence[int] | torch.Tensor, name: str, batch: int, device: torch.device) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.int32).to(device)  # [B]
    if values.shape != (batch,):
        raise ValueError(f"{name} must hold one entry per sequence ({batch}), got shape {tuple(values.shape)}")
    return values


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dim with stride 1 and take every other stride as given.
    return t if t.stride(-1) == 1 else t.contiguous()


def batched_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: Sequence[int] | torch.Tensor, pasts: Sequence[int] | torch.Tensor,
                      tail_mask: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                      num_splits: int | None = None, max_past: int | None = None) -> torch.Tensor:
    """Ragged batch in one launch: sequence b reads slot `slots[b]`, whose first `pasts[b]` positions
    are cached and whose next T positions hold the new tokens' keys and values.

    q `[B, Hq, T, D]` (any strides with a contiguous head dim, e.g. transformers' transposed view);
    k/v_cache `[S, Hkv, Tmax, D]`; tail_mask `[T, T]` bool shared by all sequences. Returns `out`
    `[B, Hq, T, D]`, written in place when given (it may be a transposed view of a `[B, T, Hq, D]`
    buffer). `num_splits` forces the number of key-range splits (None: enough to fill the GPU).
    Lists for slots/pasts are checked on the host; tensors are not (that would synchronise), and
    then the split size needs `max_past` or one `.item()` sync.
    """
    _check_launchable(q.device)
    b, hq, t, d = q.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[-1] != d:
        raise ValueError(f"k/v_cache must both be [S, Hkv, Tmax, {d}], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    _, hkv, tmax, _ = k_cache.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if tail_mask.shape != (t, t):
        raise ValueError(f"tail_mask must be [{t}, {t}], got {tuple(tail_mask.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError("q, k_cache and v_cache must be on one device")
    if isinstance(pasts, torch.Tensor):
        if max_past is None:
            max_past = int(pasts.max())
    else:
        if any(not 0 <= p <= tmax - t for p in pasts):
            raise ValueError(f"every past + T must fit the cache's {tmax} positions, got pasts {list(pasts)}")
        if not isinstance(slots, torch.Tensor) and any(not 0 <= s < k_cache.shape[0] for s in slots):
            raise IndexError(f"slots {list(slots)} out of range 0..{k_cache.shape[0] - 1}")
        max_past = max(pasts, default=0)
    slots_t = _index_tensor(slots, "slots", b, q.device)
    pasts_t = _index_tensor(pasts, "pasts", b, q.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Hq, T, D]
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous head dim")
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    mask = tail_mask.to(device=q.device, dtype=torch.bool).contiguous()  # [T, T]

    g = hq // hkv
    block_m = pow2_block(g * t, MAX_BLOCK_M)
    block_d = pow2_block(d)
    row_tiles = triton.cdiv(g * t, block_m)
    max_keys = max_past + t
    if num_splits is None:
        num_splits = _auto_splits(q.device, b * hkv * row_tiles, max_keys)
    # Whole key tiles per split; rounding up can leave fewer splits than asked for.
    split_len = triton.cdiv(triton.cdiv(max_keys, max(1, num_splits)), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_keys, split_len)
    split = num_splits > 1
    if split:
        part_acc = torch.empty(b * hkv, num_splits, g * t, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b * hkv, num_splits, g * t, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_lse = out  # not touched: SPLIT=False compiles the partial stores out
    dot_dtype, precision = dot_types(q.dtype)
    decode_attention_kernel[(b * hkv, row_tiles, num_splits)](
        q, k_cache, v_cache, mask, slots_t, pasts_t,
        out, part_acc, part_lse,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        hkv, g, t, d, split_len, float(scale),
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d, SPLIT=split,
        num_stages=pipeline_stages(q.dtype),
    )
    if split:
        combine_splits_kernel[(b * hkv, row_tiles)](
            part_acc, part_lse, out, *out.stride()[:3],
            hkv, g, t, d, num_splits,
            BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return out


def multi_token_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: int,
                          tail_mask: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                          num_splits: int | None = None) -> torch.Tensor:
    """One sequence, as `attention.multi_token_attention`: q `[Hq, T, D]`, k/v_cache `[Hkv, >= past + T, D]`
    -> `[Hq, T, D]`."""
    if out is not None:
        out = out[None]  # [1, Hq, T, D]
    return batched_attention(q[None], k_cache[None], v_cache[None], [0], [past], tail_mask, scale,
                             out=out, num_splits=num_splits)[0]


def runtime_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan, scale: float) -> torch.Tensor:
    """The runtime's attention call on CUDA: query `[B, Hq, T, D]`, key/value the cache's
    `[S, Hkv, Tmax, D]` buffers, `plan` a `kv_cache.StepPlan` -> `[B, T, Hq, D]`, as transformers expects."""
    b, hq, t, d = query.shape
    out = torch.empty(b, t, hq, d, dtype=query.dtype, device=query.device)  # [B, T, Hq, D]
    batched_attention(query, key, value, plan.slots, plan.starts, plan.tail_mask, scale, out=out.transpose(1, 2))
    return out

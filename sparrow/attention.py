"""Multi-token decode attention over the runtime's own KV cache.

One query block of T new tokens (1 = decode, K+1 = chain verify, a token tree, or a prefill chunk)
attends to the slot's cached keys plus the new ones under a `[T, T]` tail mask. The G query heads
of a GQA group are stacked into one matrix so each KV head's keys and values are read once for
all query rows and all heads of the group: no `repeat_kv` copy, no concatenated cache.

`multi_token_attention` is the torch implementation (and the semantics). The runtime runs, per
device: on CUDA the Triton kernel (`attention_triton`); on CPU the fused C++ op (`attention_cpp`,
compiled on first use) for every float32 step, prefill chunks included, where it builds and has its
AVX-512 or AVX2 kernel, else this torch implementation; `SPARROW_ATTENTION=torch|cpp` forces one.
"""

from __future__ import annotations

import os

import torch

from .kv_cache import StepPlan

QUERY_BLOCK = 512  # rows per block in long prefill chunks: bounds the score matrix, not the KV reads
BACKENDS = ("auto", "torch", "cpp")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                        tail_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Obviously correct version for one sequence. q `[Hq, T, D]`, k/v `[Hkv, past + T, D]` -> `[Hq, T, D]`."""
    hq, t, _ = q.shape
    g = hq // k.shape[0]
    k = k.repeat_interleave(g, dim=0).float()  # [Hq, past + T, D]
    v = v.repeat_interleave(g, dim=0).float()
    allowed = torch.cat([torch.ones(t, past, dtype=torch.bool), tail_mask.cpu()], dim=1).to(q.device)
    scores = (q.float() @ k.transpose(1, 2)) * scale  # [Hq, T, past + T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


def multi_token_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: int,
                          tail_mask: torch.Tensor, scale: float, block: int = QUERY_BLOCK,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """q `[Hq, T, D]`; k/v_cache `[Hkv, >= past + T, D]` (a view of the slot's buffer) -> `[Hq, T, D]`."""
    hq, t, d = q.shape
    hkv = k_cache.shape[0]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k_cache.shape[1] < past + t:
        raise ValueError(f"cache view holds {k_cache.shape[1]} positions, need past + T = {past + t}")
    g = hq // hkv
    qg = q.view(hkv, g, t, d)  # query head h = kv_head * g + i, as transformers' repeat_kv pairs them
    if out is None:
        out = torch.empty(hq, t, d, dtype=q.dtype, device=q.device)
    out = out.view(hkv, g, t, d)
    # One score buffer for every block, softmax in place: a prefill chunk's blocks are ~200 MB each at
    # 25.6k keys, and a fresh allocation per block costs more in page faults than the matmuls do.
    scratch = torch.empty(hkv * g * min(t, block) * (past + t), dtype=q.dtype, device=q.device)
    for r0 in range(0, t, block):
        r1 = min(t, r0 + block)
        rows = r1 - r0
        n = past + r1  # later new tokens are masked for every row of this block anyway
        keys, values = k_cache[:, :n], v_cache[:, :n]  # [Hkv, n, D] views, no copy
        scores = scratch[:hkv * g * rows * n].view(hkv, g * rows, n)
        torch.matmul(qg[:, :, r0:r1].reshape(hkv, g * rows, d), keys.transpose(1, 2), out=scores)
        scores = scores.view(hkv, g, rows, n).float().mul_(scale)  # [Hkv, G, R, n]
        scores[..., past:].masked_fill_(~tail_mask[r0:r1, :r1], float("-inf"))
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()
        probs = scores.div_(scores.sum(-1, keepdim=True)).to(values.dtype).view(hkv, g * rows, n)
        out[:, :, r0:r1] = torch.matmul(probs, values).view(hkv, g, rows, d)
    return out.view(hq, t, d)


def cpu_backend(query: torch.Tensor) -> str:
    """"cpp" or "torch" for a CPU query `[B, Hq, T, D]`.

    `SPARROW_ATTENTION=torch|cpp` forces one (cpp raises if the op cannot be built); by default
    (`auto`) float32 steps, prefill chunks included, use the fused C++ op when it builds and runs its
    AVX-512 or AVX2 kernel (its portable loops are slower than torch's matmuls), other dtypes the torch
    implementation. A 4,096-token chunk over 8k past keys: AVX-512 0.24 s, AVX2 0.48, torch 0.60.
    """
    choice = os.environ.get("SPARROW_ATTENTION", "").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"SPARROW_ATTENTION must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice != "auto":
        return choice
    if query.dtype != torch.float32:
        return "torch"
    from . import attention_cpp

    return "cpp" if attention_cpp.available() and attention_cpp.isa() in ("avx512", "avx2") else "torch"


def runtime_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      sparrow_plan: StepPlan | None = None, **kwargs):
    """transformers attention-interface entry: key/value are the cache's `[S, Hkv, Tmax, D]` buffers."""
    if sparrow_plan is None:
        raise RuntimeError("the sparrow runtime attention needs a step plan; call it through Runtime")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.is_cuda:
        # Imported here: the Triton kernels are decorated at import, and CPU runs never need them.
        from .attention_triton import runtime_attention as triton_runtime_attention

        return triton_runtime_attention(query, key, value, sparrow_plan, scale), None
    attend = multi_token_attention
    if cpu_backend(query) == "cpp":
        from .attention_cpp import multi_token_attention as attend
    outs = []
    for b, (slot, past) in enumerate(zip(sparrow_plan.slots, sparrow_plan.starts)):
        outs.append(attend(query[b], key[slot], value[slot], past, sparrow_plan.tail_mask, scale))
    return torch.stack(outs).transpose(1, 2), None  # [B, T, Hq, D], as transformers' attention returns

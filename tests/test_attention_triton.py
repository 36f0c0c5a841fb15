"""sparrow.attention_triton: the CUDA decode-attention kernel against the plain reference, run in
Triton's CPU interpreter (on a GPU machine, on the GPU), and compiled to PTX without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before any Triton kernel is decorated: kernels then run in the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="OpenAI Triton is not installed (pip install triton)")

from sparrow import attention, attention_triton  # noqa: E402
from sparrow.attention import reference_attention  # noqa: E402
from sparrow.kv_cache import StepPlan  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
SCALE = 0.3


def _mask(g: torch.Generator, t: int, kind: str) -> torch.Tensor:
    chain = torch.ones(t, t, dtype=torch.bool).tril_()  # [T, T]
    if kind == "chain":
        return chain
    # A token tree as the runtime may see it: each node attends itself and any earlier nodes.
    return (torch.rand(t, t, generator=g) < 0.5).tril_(-1) | torch.eye(t, dtype=torch.bool)


def _cache(g, slots, hkv, tmax, d, live, dtype):
    """K/V buffers `[S, Hkv, Tmax, D]` whose positions past each slot's live length are NaN, so a
    kernel that reads beyond past + T (or another slot) fails."""
    k = torch.randn(slots, hkv, tmax, d, generator=g)
    v = torch.randn(slots, hkv, tmax, d, generator=g)
    for s in range(slots):
        n = live.get(s, 0)
        k[s, :, n:] = v[s, :, n:] = float("nan")
    return k.to(dtype), v.to(dtype)


# (Hq, Hkv, past, T, D, mask): G 1/2/4, pasts 0/1/37/200 (200 spans several 64-key tiles and
# splits), T 1/6/7 (G*T over one 16-row tile at G=4, T=7), D 32/64.
SINGLE_CASES = [
    (2, 2, 0, 1, 32, "chain"),
    (4, 2, 1, 6, 64, "tree"),
    (8, 2, 37, 7, 32, "tree"),
    (4, 1, 200, 7, 64, "chain"),
    (4, 4, 200, 1, 32, "chain"),
    (6, 3, 37, 6, 64, "chain"),
    (8, 2, 0, 7, 64, "tree"),
    (2, 1, 1, 1, 32, "chain"),
    (4, 2, 200, 6, 32, "tree"),
    (4, 1, 37, 1, 64, "chain"),
]


@pytest.mark.parametrize("splits", [None, 3], ids=["auto-splits", "3-splits"])
@pytest.mark.parametrize("case", SINGLE_CASES, ids=lambda c: "Hq{}Hkv{}past{}T{}D{}-{}".format(*c))
def test_one_sequence_matches_reference(case, splits):
    hq, hkv, past, t, d, kind = case
    g = torch.Generator().manual_seed(hq * 1000 + past * 10 + t)
    q = torch.randn(hq, t, d, generator=g)  # [Hq, T, D]
    mask = _mask(g, t, kind)
    k, v = _cache(g, 1, hkv, past + t + 5, d, {0: past + t}, torch.float32)  # [1, Hkv, Tmax, D]
    expected = reference_attention(q, k[0, :, :past + t], v[0, :, :past + t], past, mask, SCALE)
    out = torch.full((hq, t, d), float("nan"), device=DEVICE)  # poisoned: any element left unwritten fails
    attention_triton.multi_token_attention(q.to(DEVICE), k[0].to(DEVICE), v[0].to(DEVICE), past,
                                           mask.to(DEVICE), SCALE, out=out, num_splits=splits)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [None, 4], ids=["auto-splits", "4-splits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_ragged_batch_matches_reference_per_sequence(dtype, splits):
    """Three sequences at different lengths in slots 2, 0, 3 of a 4-slot cache, one launch; with 4
    splits of 64 keys the short sequences leave some splits empty."""
    g = torch.Generator().manual_seed(7)
    hq, hkv, t, d = 4, 2, 7, 64
    slots, pasts = [2, 0, 3], [200, 0, 37]
    q = torch.randn(3, hq, t, d, generator=g).to(dtype)  # [B, Hq, T, D]
    mask = _mask(g, t, "tree")
    k, v = _cache(g, 4, hkv, 210, d, {s: p + t for s, p in zip(slots, pasts)}, dtype)  # [S, Hkv, Tmax, D]
    out = torch.full_like(q, float("nan"), device=DEVICE)  # poisoned
    attention_triton.batched_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slots, pasts, mask.to(DEVICE),
                                       SCALE, out=out, num_splits=splits)
    for b, (s, p) in enumerate(zip(slots, pasts)):
        expected = reference_attention(q[b], k[s, :, :p + t], v[s, :, :p + t], p, mask, SCALE)
        torch.testing.assert_close(out[b].cpu(), expected, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"{b}: {m}")


def test_device_index_tensors_equal_lists():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 2, 6, 32, generator=g).to(DEVICE)  # [B, Hq, T, D]
    k, v = (x.to(DEVICE) for x in _cache(g, 2, 1, 60, 32, {0: 46, 1: 6}, torch.float32))
    mask = _mask(g, 6, "tree").to(DEVICE)
    from_lists = attention_triton.batched_attention(q, k, v, [1, 0], [0, 40], mask, SCALE, num_splits=2)
    from_tensors = attention_triton.batched_attention(q, k, v, torch.tensor([1, 0], device=DEVICE),
                                                      torch.tensor([0, 40], device=DEVICE), mask, SCALE, num_splits=2)
    torch.testing.assert_close(from_tensors, from_lists, atol=0, rtol=0)


def test_runtime_entry_equals_the_cpu_runtime_attention():
    """The CUDA branch of `attention.runtime_attention`: transformers' transposed query view in,
    `[B, T, Hq, D]` out, slots and pasts from the step plan."""
    g = torch.Generator().manual_seed(9)
    b, hq, hkv, t, d = 2, 4, 2, 6, 32
    plan = StepPlan(slots=[1, 0], starts=[37, 1], tail_mask=_mask(g, t, "tree"))
    query = torch.randn(b, t, hq, d, generator=g).transpose(1, 2)  # [B, Hq, T, D], strided like transformers'
    k, v = _cache(g, 2, hkv, 50, d, {1: 37 + t, 0: 1 + t}, torch.float32)  # [S, Hkv, Tmax, D]
    expected, _ = attention.runtime_attention(None, query, k, v, None, scaling=SCALE, sparrow_plan=plan)
    dev_plan = StepPlan(plan.slots, plan.starts, plan.tail_mask.to(DEVICE))
    got = attention_triton.runtime_attention(query.to(DEVICE), k.to(DEVICE), v.to(DEVICE), dev_plan, SCALE)
    assert got.shape == (b, t, hq, d)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named():
    q = torch.zeros(3, 2, 16, device=DEVICE)  # [Hq, T, D]
    kv = torch.zeros(2, 8, 16, device=DEVICE)  # [Hkv, Tmax, D]
    mask = torch.ones(2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        attention_triton.multi_token_attention(q, kv, kv, 0, mask, 1.0)
    with pytest.raises(ValueError, match="must fit the cache"):
        attention_triton.multi_token_attention(q[:2], kv, kv, 7, mask, 1.0)
    with pytest.raises(ValueError, match="tail_mask"):
        attention_triton.multi_token_attention(q[:2], kv, kv, 0, mask[:1], 1.0)


PROBE = """
import json, torch
import triton
from triton.backends.compiler import GPUTarget
from sparrow import attention_triton as at

report = {}
try:
    x = torch.zeros(1, 1, 4)
    at.multi_token_attention(x, x, x, 0, torch.ones(1, 1, dtype=torch.bool), 1.0)
except RuntimeError as exc:
    report["cpu_error"] = str(exc)

ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
sizes = ["num_kv_heads", "group", "tokens", "head_dim"]
report["kernels"] = []
for dtype, d, split in [(torch.float16, 128, True), (torch.bfloat16, 64, False), (torch.float32, 128, False)]:
    dot_dtype, precision = at.dot_types(dtype)
    consts = {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision, "BLOCK_M": at.MAX_BLOCK_M,
              "BLOCK_N": at.BLOCK_N, "BLOCK_D": d, "SPLIT": split}
    sig = {"q_ptr": ty[dtype], "k_ptr": ty[dtype], "v_ptr": ty[dtype], "mask_ptr": "i1", "slots_ptr": "i32",
           "pasts_ptr": "i32", "out_ptr": ty[dtype], "part_acc_ptr": "fp32", "part_lse_ptr": "fp32"}
    sig = {name: "*" + t for name, t in sig.items()}
    strides = [p + s for p in ("q_s", "k_s", "v_s", "o_s") for s in ("b", "h", "t")]
    strides = [s.replace("k_sb", "k_ss").replace("v_sb", "v_ss") for s in strides]
    sig.update({name: "i32" for name in strides + sizes + ["split_len"]})
    sig.update({"scale": "fp32", **{name: "constexpr" for name in consts}})
    src = triton.compiler.ASTSource(fn=at.decode_attention_kernel, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_stages": at.pipeline_stages(dtype)})
    report["kernels"].append({"mma": "mma" in k.asm["ptx"], "shared": k.metadata.shared})
consts = {"BLOCK_M": at.MAX_BLOCK_M, "BLOCK_D": 128}
sig = {"part_acc_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*fp16",
       **{name: "i32" for name in ["o_sb", "o_sh", "o_st"] + sizes + ["num_splits"]},
       **{name: "constexpr" for name in consts}}
triton.compile(triton.compiler.ASTSource(fn=at.combine_splits_kernel, signature=sig, constexprs=consts),
               target=GPUTarget("cuda", 90, 32))
report["combine"] = True
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def probe():
    # A fresh interpreter without TRITON_INTERPRET: this module turned it on, and under it nothing
    # compiles and CPU tensors are accepted.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error(probe):
    assert "TRITON_INTERPRET=1" in probe["cpu_error"] and "CUDA" in probe["cpu_error"]


def test_kernels_compile_to_ptx_for_sm90_without_a_gpu(probe):
    fp16, bf16, fp32 = probe["kernels"]
    # Tensor-core products for 16-bit inputs; fp32 multiplies in IEEE fp32 (FMA, no tf32) for the
    # runtime's 1e-4 parity, in one pipeline stage (as the plugin's kernel) to fit shared memory.
    assert fp16["mma"] and bf16["mma"] and not fp32["mma"]
    assert all(0 < k["shared"] <= 227 * 1024 for k in probe["kernels"]), probe["kernels"]
    assert probe["combine"]

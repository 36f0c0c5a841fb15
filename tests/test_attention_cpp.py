"""The fused C++ CPU ops against plain references (attention, small-M linear), and the runtime's choice of backend."""

import pytest
import torch

from attention_cases import random_tree_mask
from sparrow import attention, attention_cpp
from sparrow.attention import reference_attention

# Where a compiler exists the op must build: a failed build fails these tests rather than skipping them.
pytestmark = pytest.mark.skipif(attention_cpp.compiler() is None, reason="no C++ compiler on this machine")

# auto: AVX-512 where the CPU has it, else AVX2; AVX-512 once more with each of its two layouts forced
# for every row count (rows-in-lanes from 1 row, row tiles for all).
ISAS = ["portable", "avx2", "auto", "avx512-lanes", "avx512-row-tiles"]


@pytest.fixture(params=ISAS)
def isa(request):
    which, _, layout = request.param.partition("-")
    try:
        attention_cpp.isa(which)
    except RuntimeError as e:  # a CPU without AVX2 or AVX-512
        pytest.skip(str(e))
    default = attention_cpp.lanes_min_rows()
    if layout:
        attention_cpp.lanes_min_rows(1 if layout == "lanes" else 1 << 30)
    yield request.param
    attention_cpp.lanes_min_rows(default)
    attention_cpp.isa("auto")


@pytest.mark.parametrize("past", [0, 1, 37, 1000])
@pytest.mark.parametrize("t", [1, 6, 7])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tree", [False, True])
def test_matches_reference(isa, past, t, groups, d, tree):
    g = torch.Generator().manual_seed(past * 100 + t * 10 + groups + d + tree)
    hkv = 2
    q = torch.randn(hkv * groups, t, d, generator=g)
    kbuf = torch.randn(hkv, past + t + 9, d, generator=g)  # a buffer longer than the live part
    vbuf = torch.randn(hkv, past + t + 9, d, generator=g)
    mask = random_tree_mask(t, g) if tree else torch.ones(t, t, dtype=torch.bool).tril_()
    out = torch.full((hkv * groups, t, d), float("nan"))  # poisoned: any element left unwritten fails
    out.copy_(attention_cpp.multi_token_attention(q, kbuf, vbuf, past, mask, d ** -0.5))
    ref = reference_attention(q, kbuf[:, :past + t], vbuf[:, :past + t], past, mask, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("past", [0, 37, 300])
@pytest.mark.parametrize("tree", [False, True])
def test_prefill_chunk_matches_reference(isa, past, tree):
    """Long query blocks (prefill chunks): the rows-in-lanes path skips tail blocks no row of a group
    may see, which must give what computing and masking them gives."""
    g = torch.Generator().manual_seed(past + tree)
    t, hkv, groups, d = 200, 2, 2, 64
    q = torch.randn(hkv * groups, t, d, generator=g)
    k = torch.randn(hkv, past + t, d, generator=g)
    v = torch.randn(hkv, past + t, d, generator=g)
    mask = random_tree_mask(t, g) if tree else torch.ones(t, t, dtype=torch.bool).tril_()
    out = attention_cpp.multi_token_attention(q, k, v, past, mask, d ** -0.5)
    ref = reference_attention(q, k, v, past, mask, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [16, 24, 72])
def test_odd_head_dims_and_strided_views(isa, d):
    """Head dims that are not a multiple of 16 (portable path) and cache views of a bigger buffer."""
    g = torch.Generator().manual_seed(d)
    past, t, hkv, groups = 700, 5, 3, 2
    layers = torch.randn(2, 4, hkv, past + t + 3, d, generator=g)  # [L, S, Hkv, Tmax, D], like SlotKVCache
    k, v = layers[0, 2], layers[1, 1]
    q = torch.randn(1, t, hkv * groups, d, generator=g).transpose(1, 2)[0]  # non-contiguous, as in the runtime
    mask = random_tree_mask(t, g)
    out = attention_cpp.multi_token_attention(q, k, v, past, mask, 0.3)
    ref = reference_attention(q, k[:, :past + t], v[:, :past + t], past, mask, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_large_scores_stay_finite():
    """Online softmax with big logits: no overflow, same answer as the reference."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 6, 128, generator=g) * 30
    k = torch.randn(2, 3000, 128, generator=g) * 30
    v = torch.randn(2, 3000, 128, generator=g)
    mask = torch.ones(6, 6, dtype=torch.bool).tril_()
    out = attention_cpp.multi_token_attention(q, k, v, 2000, mask, 128 ** -0.5)
    ref = reference_attention(q, k[:, :2006], v[:, :2006], 2000, mask, 128 ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_opcheck():
    """Schema, fake (shape) function and dispatcher registration agree with the real kernel."""
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(4, 6, 64, generator=g), torch.randn(2, 300, 64, generator=g),
            torch.randn(2, 300, 64, generator=g), 200, random_tree_mask(6, g), 0.125)
    torch.library.opcheck(attention_cpp.load(), args, test_utils=("test_schema", "test_faketensor"))


def test_rejects_bad_inputs():
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="not a multiple"):
        attention_cpp.multi_token_attention(torch.zeros(3, 2, 16), torch.zeros(2, 8, 16), torch.zeros(2, 8, 16), 3, mask, 1.0)
    with pytest.raises(RuntimeError, match="need past"):
        attention_cpp.multi_token_attention(torch.zeros(2, 2, 16), torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), 3, mask, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        attention_cpp.multi_token_attention(torch.zeros(2, 2, 16, dtype=torch.bfloat16), torch.zeros(2, 8, 16),
                                            torch.zeros(2, 8, 16), 3, mask, 1.0)
    with pytest.raises(RuntimeError, match="isa must be"):
        attention_cpp.isa("sse9")
    with pytest.raises(RuntimeError, match="lanes_min_rows must be positive"):
        attention_cpp.lanes_min_rows(-1)


@pytest.mark.parametrize("env", ["torch", "cpp", ""])
def test_backend_choice(monkeypatch, env):
    monkeypatch.setenv("SPARROW_ATTENTION", env)
    q = torch.zeros(1, 4, 6, 64)
    auto = "cpp" if attention_cpp.isa() in ("avx512", "avx2") else "torch"  # the portable loops lose to torch
    assert attention.cpu_backend(q) == (env or auto)
    attention_cpp.isa("portable")
    try:
        assert attention.cpu_backend(q) == (env or "torch")
    finally:
        attention_cpp.isa("auto")
    assert attention.cpu_backend(q.to(torch.bfloat16)) == ("cpp" if env == "cpp" else "torch")
    assert attention.cpu_backend(torch.zeros(1, 4, 4096, 64)) == (env or auto)  # prefill chunks too


def test_backend_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SPARROW_ATTENTION", "fast")
    with pytest.raises(ValueError, match="SPARROW_ATTENTION"):
        attention.cpu_backend(torch.zeros(1, 4, 6, 64))


@pytest.mark.parametrize("k", [256, 768, 24, 20])  # 24: AVX2 but not AVX-512 chunks, 20: neither (portable)
@pytest.mark.parametrize("n", [256, 62, 3])  # 62, 3: column tails past the tiles
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_matches_linear(isa, k, n, bias):
    attention_cpp.load()
    g = torch.Generator().manual_seed(k + n + bias)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(3, 16, k, generator=g)[:, ::3]  # [3, 6, K], rows not contiguous
    y = torch.ops.sparrow.small_linear(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
    rows = x.reshape(-1, k)  # [18, K]
    alone = torch.cat([torch.ops.sparrow.small_linear(rows[i:i + 1], w, b) for i in range(rows.shape[0])])
    for m in range(1, 10):  # a row's result does not depend on how many rows share the call
        assert torch.equal(torch.ops.sparrow.small_linear(rows[:m], w, b), alone[:m]), m


def test_small_linear_rejects_bad_inputs():
    attention_cpp.load()
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.sparrow.small_linear(torch.zeros(2, 8), torch.zeros(4, 9), None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.sparrow.small_linear(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(4, 8), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.sparrow.small_linear(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(5))


def test_runtime_routes_short_linears(monkeypatch):
    """Small-M routing: short inference calls go to the op, long ones, grad mode and SPARROW_LINEAR=torch do not."""
    from sparrow.runtime import SMALL_M, small_m_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16, bias=False))
    x = torch.randn(SMALL_M + 1, 32)
    with torch.no_grad():
        want = model(x)
    monkeypatch.setenv("SPARROW_LINEAR", "torch")
    assert small_m_linears([model]) == 0
    monkeypatch.setenv("SPARROW_LINEAR", "fast")
    with pytest.raises(ValueError, match="SPARROW_LINEAR"):
        small_m_linears([model])
    monkeypatch.setenv("SPARROW_LINEAR", "")
    assert small_m_linears([model]) == 2
    calls = []
    real = torch.ops.sparrow.small_linear
    monkeypatch.setattr(torch.ops.sparrow, "small_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        torch.testing.assert_close(model(x[:5]), want[:5], atol=1e-5, rtol=1e-5)  # routed
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)  # too many rows: F.linear
    assert calls == [(5, 32), (5, 48)]
    model(x[:5]).sum().backward()  # grad mode: F.linear, so autograd works
    assert len(calls) == 2 and model[0].weight.grad is not None

"""sparrow.plugins: the reference, the Triton kernels (CUDA, or Triton's CPU interpreter), the torch
ops, the ONNX node in ONNX Runtime, and the TensorRT registration's behaviour without TensorRT."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before any Triton kernel is decorated: kernels then run in the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"

from sparrow import plugins  # noqa: E402
from sparrow.plugins import reference  # noqa: E402
from sparrow.plugins.node import DOMAIN, OP_TYPE, NodeAttributes  # noqa: E402
from sparrow.plugins.shapes import PluginInputError  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _attention_inputs(g, b, hq, hkv, tq, w, d, anchors, dtype, mask_kind):
    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(b, hq, tq, d)  # [B, Hq, Tq, D]
    k_win, v_win = randn(b, hkv, w, d), randn(b, hkv, w, d)  # [B, Hkv, W, D]
    k_new, v_new = randn(b, hkv, tq, d), randn(b, hkv, tq, d)  # [B, Hkv, Tq, D]
    if mask_kind == "causal":
        mask = plugins.causal_mask(tq)
    elif mask_kind == "tree":
        # A token tree: each node attends to its ancestors (parents drawn among earlier nodes).
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, tq)]
        mask = torch.zeros(tq, tq, dtype=torch.bool)  # [Tq, Tq]
        for i in range(tq):
            j = parents[i]
            while j >= 0:
                mask[i, j] = True
                j = parents[j]
    else:
        mask = torch.rand(tq, tq, generator=g) < 0.5  # [Tq, Tq], diagonal left random
    return [q, k_win, v_win, torch.tensor(anchors), k_new, v_new, mask]


# (B, Hq, Hkv, Tq, W, D, anchors, dtype, mask): GQA 1/2/4, W not a power of two and larger than
# one 64-slot tile, Tq over one 16-token tile, G*Tq over one 64-row tile, odd head dims, anchors
# of 0, partial, exactly W and past W (wrapped ring).
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, 8, [1], torch.float32, "causal"),
    (3, 4, 2, 5, 37, 24, [0, 20, 100], torch.float32, "random"),
    (2, 8, 2, 17, 100, 40, [100, 63], torch.float32, "tree"),
    (2, 4, 1, 16, 70, 16, [65, 0], torch.float32, "tree"),
    (2, 6, 3, 3, 129, 20, [129, 5], torch.float32, "causal"),
    (2, 4, 4, 7, 50, 32, [49, 250], torch.float16, "tree"),
    (3, 8, 4, 9, 33, 24, [0, 33, 12], torch.bfloat16, "random"),
    (1, 2, 1, 4, 65, 64, [64], torch.bfloat16, "causal"),
]


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton", reason="OpenAI Triton is not installed (pip install triton)")
    from sparrow.plugins import triton_kernels

    return triton_kernels


def _attention_id(c):
    return f"B{c[0]}Hq{c[1]}Hkv{c[2]}Tq{c[3]}W{c[4]}D{c[5]}-{c[7]}-{c[8]}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_attention_id)
def test_attention_kernel_matches_reference(kernels, case):
    *dims, anchors, dtype, mask_kind = case
    seed = _seed()
    args = _attention_inputs(torch.Generator().manual_seed(seed), *dims, anchors, dtype, mask_kind)
    scale = 0.7 / dims[-1] ** 0.5
    expected = reference.window_attention(*args, scale)
    dev = [a.to(DEVICE) for a in args]
    out = torch.full_like(dev[0], float("nan"))  # poisoned: any element left unwritten fails
    kernels.window_attention(*dev, scale, out=out)
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu(), expected, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_attention_id)
def test_cpu_op_matches_reference(case, backend, monkeypatch):
    """The op's CPU kernel (the runtime's multi-token attention, torch or fused C++) == the reference."""
    if backend == "cpp":
        from sparrow import attention_cpp

        if not attention_cpp.available():
            pytest.skip("the C++ attention op does not build here (no compiler)")
    monkeypatch.setenv("SPARROW_ATTENTION", backend)
    *dims, anchors, dtype, mask_kind = case
    seed = _seed()
    args = _attention_inputs(torch.Generator().manual_seed(seed), *dims, anchors, dtype, mask_kind)
    scale = 0.7 / dims[-1] ** 0.5
    out = torch.ops.sparrow.text_anchored_window_attention(*args, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out, reference.window_attention(*args, scale), atol=tol, rtol=tol,
                               msg=lambda m: f"seed {seed}: {m}")


# (B, W, H, T, accepted, anchors): H over one 128-wide tile, T over one 16-row tile, accepted 0
# and T, more text rows than W (only the last W survive), rings already wrapped.
HANDOFF_CASES = [
    (1, 1, 8, 1, [1], [0]),
    (3, 7, 50, 9, [9, 3, 0], [5, 0, 2]),
    (2, 5, 130, 21, [21, 17], [3, 12]),
    (4, 12, 33, 6, [6, 0, 2, 6], [0, 12, 25, 7]),
]


def _handoff_inputs(case, dtype):
    """(seed, window, hidden, text mask, accepted, anchors) of one HANDOFF_CASES row, drawn at random."""
    b, w, h, t, accepted, anchors = case
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    window = torch.randn(b, w, h, generator=g).to(dtype)  # [B, W, H]
    hidden = torch.randn(b, t, h, generator=g).to(dtype)  # [B, T, H]
    text = torch.rand(b, t, generator=g) < 0.7  # [B, T]
    # int32 counts for the last case: kernels must keep the caller's index dtype.
    index_dtype = torch.int32 if case is HANDOFF_CASES[-1] else torch.int64
    return (seed, window, hidden, text, torch.tensor(accepted, dtype=index_dtype),
            torch.tensor(anchors, dtype=index_dtype))


@pytest.mark.parametrize("case", HANDOFF_CASES, ids=lambda c: f"B{c[0]}W{c[1]}H{c[2]}T{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_handoff_kernel_matches_reference(kernels, case, dtype):
    seed, window, hidden, text, accepted, anchors = _handoff_inputs(case, dtype)
    index_dtype = accepted.dtype
    expected_window = window.clone()
    expected = reference.handoff(expected_window, hidden, accepted, text, anchors)
    got_window = window.to(DEVICE)
    out = torch.full_like(anchors, -1, device=DEVICE)  # poisoned
    kernels.handoff(got_window, hidden.to(DEVICE), accepted.to(DEVICE), text.to(DEVICE), anchors.to(DEVICE), out=out)
    assert out.dtype == expected.dtype == index_dtype
    assert out.cpu().tolist() == expected.tolist(), f"seed {seed}"
    assert torch.equal(got_window.cpu(), expected_window), f"seed {seed}"


@pytest.mark.parametrize("case", HANDOFF_CASES, ids=lambda c: f"B{c[0]}W{c[1]}H{c[2]}T{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_handoff_op_matches_reference(case, dtype):
    """The op's CPU kernel (a vectorised copy the draft calls every round) against the row-by-row reference."""
    seed, window, hidden, text, accepted, anchors = _handoff_inputs(case, dtype)
    index_dtype, t = accepted.dtype, hidden.shape[1]
    expected_window, got_window = window.clone(), window.clone()
    expected = reference.handoff(expected_window, hidden, accepted, text, anchors)
    got = torch.ops.sparrow.handoff(got_window, hidden, accepted, text, anchors)
    assert got.dtype == index_dtype and got.tolist() == expected.tolist(), f"seed {seed}"
    assert torch.equal(got_window, expected_window), f"seed {seed}"
    with pytest.raises(PluginInputError, match="accepted counts"):
        torch.ops.sparrow.handoff(got_window, hidden, accepted + t + 1, text, anchors)


def test_reference_handoff_writes_a_ring_in_order():
    window = torch.zeros(1, 3, 1)  # [B, W, H]
    hidden = torch.tensor([[[1.0], [9.0], [2.0], [3.0], [4.0], [8.0]]])  # [B, T, H]
    text = torch.tensor([[True, False, True, True, True, True]])
    new = reference.handoff(window, hidden, torch.tensor([5]), text, torch.tensor([2]))
    # Text rows 1, 2, 3, 4 go to slots 2, 0, 1, 2; row 9 is visual and row 8 was not accepted.
    assert new.tolist() == [6]
    assert window.flatten().tolist() == [2.0, 3.0, 4.0]
    assert reference.valid_slots(new, 3).tolist() == [3]


def test_reference_attention_equals_sdpa_over_the_valid_keys():
    g = torch.Generator().manual_seed(0)
    args = _attention_inputs(g, 2, 4, 2, 5, 9, 16, [4, 30], torch.float32, "tree")
    q, k_win, v_win, anchors, k_new, v_new, mask = args
    out = reference.window_attention(q, k_win, v_win, anchors, k_new, v_new, mask, 0.25)
    for b, n in enumerate([4, 9]):
        k = torch.cat([k_win[b, :, :n], k_new[b]], dim=1).repeat_interleave(2, dim=0)  # [Hq, n+Tq, D]
        v = torch.cat([v_win[b, :, :n], v_new[b]], dim=1).repeat_interleave(2, dim=0)  # [Hq, n+Tq, D]
        allowed = torch.cat([torch.ones(5, n, dtype=torch.bool), mask | torch.eye(5, dtype=torch.bool)], dim=1)
        sdpa = F.scaled_dot_product_attention(q[b], k, v, attn_mask=allowed, scale=0.25)
        torch.testing.assert_close(out[b], sdpa, atol=1e-6, rtol=1e-5)


def test_window_order_does_not_matter_so_the_ring_is_read_in_place():
    g = torch.Generator().manual_seed(1)
    q, k_win, v_win, _, k_new, v_new, mask = _attention_inputs(g, 1, 2, 1, 3, 8, 16, [8], torch.float32, "causal")
    anchors = torch.tensor([8])
    perm = torch.randperm(8, generator=g)
    a = plugins.window_attention(q, k_win, v_win, anchors, k_new, v_new, mask)
    b = plugins.window_attention(q, k_win[:, :, perm], v_win[:, :, perm], anchors, k_new, v_new, mask)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_handoff_then_attention_sees_the_last_w_anchors():
    """Chunks of accepted rows handed off step by step leave a window whose attention equals
    attention over the last W text anchors of the whole history."""
    g = torch.Generator().manual_seed(2)
    w, h = 6, 16
    history = torch.randn(1, 0, h)
    window = torch.zeros(1, w, h)  # [B, W, H]; the keys and values of this test are the hidden states
    anchors = torch.tensor([0])
    for step in range(5):
        rows = torch.randn(1, 4, h, generator=g)  # [B, T, H]
        text = torch.rand(1, 4, generator=g) < 0.8
        accepted = torch.tensor([1 + step % 4])
        anchors = plugins.handoff(window, rows, accepted, anchors, text_mask=text)
        history = torch.cat([history, rows[:, : accepted[0]][text[:, : accepted[0]]][None]], dim=1)
        assert anchors.tolist() == [history.shape[1]]
        q = torch.randn(1, 1, 2, h, generator=g)  # [B, Hq, Tq, D]
        new_kv = torch.randn(1, 1, 2, h, generator=g)  # [B, Hkv, Tq, D]
        kv = window[:, None]  # [B, 1, W, H]
        got = plugins.window_attention(q, kv, kv, anchors, new_kv, new_kv)
        last = history[:, -w:]  # [B, <=W, H]
        keys = torch.cat([last[:, None], new_kv], dim=2)  # [B, 1, n+Tq, H]
        allowed = torch.cat([torch.ones(2, last.shape[1], dtype=torch.bool), plugins.causal_mask(2)], dim=1)
        want = F.scaled_dot_product_attention(q, keys, keys, attn_mask=allowed)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(1, torch.cat([a[1], a[1][:, :1]], 1)),
         "Hq=4 query heads is not a multiple of Hkv=3"),
        (lambda a: a.__setitem__(2, a[2][:, :, :5]), "v_win shape"),
        (lambda a: a.__setitem__(4, a[4].half()), "k_new dtype"),
        (lambda a: a.__setitem__(6, a[6][:2, :2]), "mask shape"),
        (lambda a: a.__setitem__(3, a[3].float()), "anchors dtype"),
    ],
)
def test_bad_attention_inputs_are_named(change, message):
    args = _attention_inputs(torch.Generator().manual_seed(3), 2, 4, 2, 3, 8, 16, [1, 2], torch.float32, "causal")
    change(args)
    with pytest.raises(PluginInputError, match=message):
        reference.window_attention(*args, 0.25)
    meta = [a.to("meta") for a in args]
    with pytest.raises(PluginInputError, match=message):
        torch.ops.sparrow.text_anchored_window_attention(*meta, 0.25)


def test_bad_handoff_inputs_are_named():
    window, hidden = torch.zeros(2, 4, 8), torch.zeros(2, 3, 8)
    text, anchors = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.long)
    with pytest.raises(PluginInputError, match="hidden size 7 != window hidden size 8"):
        reference.handoff(window, torch.zeros(2, 3, 7), torch.tensor([1, 1]), text, anchors)
    with pytest.raises(PluginInputError, match=r"accepted counts \[4, 1\] must lie in \[0, T=3\]"):
        reference.handoff(window, hidden, torch.tensor([4, 1]), text, anchors)


def test_torch_ops_pass_opcheck_and_default_to_causal():
    args = _attention_inputs(torch.Generator().manual_seed(4), 2, 4, 2, 3, 8, 16, [3, 9], torch.float32, "causal")
    torch.library.opcheck(torch.ops.sparrow.text_anchored_window_attention.default, (*args, 0.25))
    without_mask = plugins.window_attention(*args[:6])
    with_causal = torch.ops.sparrow.text_anchored_window_attention(*args, 16**-0.5)  # args[6] is the causal mask
    torch.testing.assert_close(without_mask, with_causal, atol=1e-5, rtol=1e-5)
    text = torch.ones(2, 3, dtype=torch.bool)
    handoff_args = (torch.zeros(2, 4, 8), torch.randn(2, 3, 8), torch.tensor([3, 1]), text, torch.tensor([0, 5]))
    torch.library.opcheck(torch.ops.sparrow.handoff.default, handoff_args)


class _Draft(torch.nn.Module):
    """A draft-shaped module: attention over the window, then the handoff of given states."""

    def forward(self, q, k_win, v_win, anchors, k_new, v_new, window, hidden, accepted):
        out = plugins.window_attention(q, k_win, v_win, anchors, k_new, v_new)
        return out * 2, plugins.handoff(window, hidden, accepted, anchors)


def _draft_args():
    attn = _attention_inputs(torch.Generator().manual_seed(5), 2, 4, 2, 3, 8, 16, [2, 11], torch.float32, "causal")
    return (*attn[:6], torch.zeros(2, 8, 12), torch.randn(2, 3, 12), torch.tensor([3, 2]))


def test_torch_export_and_compile_keep_the_ops():
    exported = torch.export.export(_Draft(), _draft_args())
    graph = str(exported.graph)
    assert "sparrow.text_anchored_window_attention.default" in graph
    assert "sparrow.handoff.default" in graph

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    args = _draft_args()
    compiled = torch.compile(_Draft(), backend=backend, fullgraph=True)
    out, anchors = compiled(*args)
    ref_out, ref_anchors = _Draft()(*_draft_args())
    torch.testing.assert_close(out, ref_out)
    assert anchors.tolist() == ref_anchors.tolist() == [5, 13]
    assert "sparrow.text_anchored_window_attention" in seen and "sparrow.handoff" in seen


class _Attention(torch.nn.Module):
    def forward(self, q, k_win, v_win, anchors, k_new, v_new, mask):
        return plugins.window_attention(q, k_win, v_win, anchors, k_new, v_new, mask) + q


@pytest.fixture(scope="module")
def exported_attention():
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    from sparrow.plugins.onnx_export import export_onnx

    args = _attention_inputs(torch.Generator().manual_seed(6), 2, 4, 2, 4, 10, 16, [3, 20], torch.float32, "tree")
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = ({0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, None)
    names = ["q", "k_win", "v_win", "anchors", "k_new", "v_new", "mask"]
    return export_onnx(_Attention().eval(), tuple(args), dynamic_shapes=dynamic, input_names=names)


def test_onnx_export_is_one_custom_node(exported_attention):
    custom = [n for n in exported_attention.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in custom] == [OP_TYPE]
    attrs = {a.name: a for a in custom[0].attribute}
    assert attrs["window"].i == 10 and attrs["num_heads"].i == 4 and attrs["num_kv_heads"].i == 2
    assert attrs["plugin_namespace"].s == DOMAIN.encode() and attrs["aot"].i == 1
    assert attrs["scale"].f == pytest.approx(0.25)
    assert len(exported_attention.graph.node) <= 2  # the node and the residual Add: nothing inlined


def test_onnx_node_runs_in_onnxruntime_and_matches_torch(exported_attention):
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")
    from sparrow.plugins import ort_op

    session = ort_op.session(exported_attention)
    # A batch size the export never saw: the batch dimension stayed symbolic.
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    args = _attention_inputs(g, 3, 4, 2, 4, 10, 16, [0, 10, 7], torch.float32, "tree")
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    want = _Attention()(*args)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4, f"seed {seed}"


def test_onnxruntime_rejects_a_window_mismatch_at_load(exported_attention):
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")
    from sparrow.plugins import ort_op

    model = type(exported_attention)()
    model.CopyFrom(exported_attention)
    node = next(n for n in model.graph.node if n.domain == DOMAIN)
    next(a for a in node.attribute if a.name == "window").i = 12
    with pytest.raises(ValueError, match="window: attribute 12 vs input 10"):
        ort_op.session(model)


def test_node_attributes_validate():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        NodeAttributes(scale=0.1, window=8, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="window must be positive"):
        NodeAttributes(scale=0.1, window=0, num_heads=4, num_kv_heads=2)


def test_tensorrt_plugin_imports_without_tensorrt_and_says_so():
    from sparrow.plugins import tensorrt_plugin

    if "tensorrt" in sys.modules or _tensorrt_importable():
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be observed")
    assert "tensorrt" not in sys.modules
    with pytest.raises(tensorrt_plugin.TensorRTUnavailable, match="TensorRT is not installed"):
        tensorrt_plugin.register()


def _tensorrt_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


PTX_PROBE = """
import json, torch
from sparrow.plugins.node import NodeAttributes
from sparrow.plugins.tensorrt_plugin import SIZE_ARGS, aot_kernel
attrs = NodeAttributes(scale=0.125, window=256, num_heads=8, num_kv_heads=2)
k = aot_kernel(torch.float16, 64, attrs, arch=90)
entry = k.ptx[k.ptx.index(f".entry {k.name}("):]
print(json.dumps({"params": entry[: entry.index(")")].count(".param"), "sizes": len(SIZE_ARGS),
                  "sm90a": ".target sm_90a" in k.ptx, "mma": "mma" in k.ptx,
                  "threads": k.threads, "shared": k.shared_mem}))
"""


def test_tensorrt_aot_kernel_compiles_to_ptx_without_a_gpu():
    pytest.importorskip("triton", reason="OpenAI Triton is not installed (pip install triton)")
    # A fresh interpreter: this module turned on TRITON_INTERPRET, under which nothing compiles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PTX_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # 7 input pointers, the int32 sizes, the output pointer, then Triton's 2 hidden scratch pointers.
    assert got["params"] == 7 + got["sizes"] + 1 + 2
    assert got["sm90a"] and got["mma"]
    assert got["threads"] % 32 == 0 and 0 < got["shared"] <= 48 * 1024

"""TensorRT 10+ plugin `sparrow::TextAnchoredWindowAttention` (the Quickly Deployable Plugin API,
`tensorrt.plugin`), for the node that `onnx_export` writes.

- shape/dtype function: the output is shaped and typed like q;
- autotune: fp32, fp16 or bf16 activations, int64 anchors, bool mask, linear layout;
- AOT implementation: the Triton kernel of `triton_kernels.py` compiled to PTX and baked into the
  engine, so the engine runs without Python (trtexec, Triton Inference Server's TensorRT backend);
- JIT implementation: the same kernel launched from Python on TensorRT's stream.

`tensorrt` is imported only by `register()`; `aot_kernel()` needs Triton, not TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .node import PLUGIN_ID, NodeAttributes

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SIZE_ARGS = ("num_kv_heads", "group", "queries", "window", "head_dim")
# One pipeline stage keeps shared memory within the 48 KiB a kernel may use without an opt-in
# attribute, which the AOT launch path gives no way to set.
AOT_STAGES = 1
AOT_MAX_SHARED = 48 * 1024


class TensorRTUnavailable(RuntimeError):
    """Raised by `register()` where TensorRT's Python package cannot be imported."""


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel and what TensorRT needs to launch it.

    Launch: grid (B * Hkv, cdiv(group * Tq, block_m)), `threads` threads per block, `shared_mem`
    bytes of shared memory; arguments are the 7 input pointers, the int32 sizes in SIZE_ARGS
    order, then the output pointer.
    """

    name: str
    ptx: str
    threads: int
    shared_mem: int
    block_m: int


def aot_kernel(dtype: torch.dtype, head_dim: int, attrs: NodeAttributes, arch: int | None = None) -> AotKernel:
    """Compile the attention kernel to PTX for `dtype` activations.

    `arch` is the CUDA compute capability as an int (90 = sm_90); None targets the active GPU.
    No GPU is needed when `arch` is given.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_kernels as tk

    if triton.knobs.runtime.interpret:
        raise RuntimeError("cannot compile PTX while TRITON_INTERPRET=1: the kernels are interpreter functions")
    if dtype not in TRITON_TYPES:
        raise ValueError(f"dtype must be one of {list(TRITON_TYPES)}, got {dtype}")
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    ty = TRITON_TYPES[dtype]
    dot_dtype, precision = tk.dot_types(dtype)
    # Tq may be dynamic in an engine, so the row tile is the largest one the launcher uses.
    block_m = tk.MAX_BLOCK_M
    constexprs = {
        "SCALE": attrs.scale, "DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision,
        "BLOCK_M": block_m, "BLOCK_N": tk.BLOCK_N, "BLOCK_T": tk.BLOCK_T, "BLOCK_D": tk.pow2_block(head_dim),
    }
    pointers = {
        "q_ptr": ty, "kw_ptr": ty, "vw_ptr": ty, "anchors_ptr": "i64", "kn_ptr": ty, "vn_ptr": ty, "mask_ptr": "i1",
    }
    signature = {
        **{name: f"*{t}" for name, t in pointers.items()},
        **{name: "i32" for name in SIZE_ARGS},
        "out_ptr": f"*{ty}",
        **{name: "constexpr" for name in constexprs},
    }
    source = triton.compiler.ASTSource(fn=tk.window_attention_kernel, signature=signature, constexprs=constexprs)
    target = None if arch is None else GPUTarget("cuda", arch, 32)
    compiled = triton.compile(source, target=target, options={"num_stages": AOT_STAGES})
    # Triton appends hidden scratch-pointer parameters that TensorRT does not pass; they are
    # harmless only while the kernel asks for no scratch memory.
    if compiled.metadata.global_scratch_size:
        raise RuntimeError(
            f"kernel needs {compiled.metadata.global_scratch_size} B of global scratch; TensorRT AOT cannot supply it"
        )
    if compiled.metadata.shared > AOT_MAX_SHARED:
        raise RuntimeError(
            f"kernel needs {compiled.metadata.shared} B of shared memory for D={head_dim} {dtype}; "
            f"the AOT launch allows {AOT_MAX_SHARED} B (use fp16/bf16 or the JIT implementation)"
        )
    return AotKernel(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        threads=compiled.metadata.num_warps * 32,
        shared_mem=compiled.metadata.shared,
        block_m=block_m,
    )


_registered = False


def register() -> None:
    """Register the plugin with TensorRT's plugin registry (idempotent).

    Call before parsing an ONNX model that holds the node (its op type is the plugin name and its
    `plugin_namespace` attribute the namespace) or before deserialising an engine built with it.
    """
    global _registered
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not installed, so plugin {PLUGIN_ID} cannot be registered: install TensorRT 10.9 or "
            "newer with its Python bindings (`import tensorrt.plugin` must work) on a CUDA host"
        ) from exc
    if _registered:
        return
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    @trtp.register(PLUGIN_ID)
    def _desc(
        q: trtp.TensorDesc, k_win: trtp.TensorDesc, v_win: trtp.TensorDesc, anchors: trtp.TensorDesc,
        k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, mask: trtp.TensorDesc,
        scale: float, window: int, num_heads: int, num_kv_heads: int,
    ) -> trtp.TensorDesc:
        return q.like()  # [B, Hq, Tq, D]

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q, k_win, v_win, anchors, k_new, v_new, mask, outputs) -> list:
        f = "FP32|FP16|BF16"
        return [trtp.AutoTuneCombination(f"{f}, {f}, {f}, INT64, {f}, {f}, BOOL, {f}")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q, k_win, v_win, anchors, k_new, v_new, mask, scale: float, window: int, num_heads: int,
             num_kv_heads: int, outputs, tactic):
        attrs = NodeAttributes(scale=scale, window=window, num_heads=num_heads, num_kv_heads=num_kv_heads)
        head_dim = q.shape_expr[3]
        if not head_dim.is_constant:
            raise ValueError(f"{PLUGIN_ID} needs a static head dim D to compile its kernel")
        kernel = aot_kernel(torch_dtype[q.dtype], head_dim.constant_value(), attrs)
        group = num_heads // num_kv_heads
        queries = q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q.shape_expr[0] * num_kv_heads
        launch.grid_y = trtp.cdiv(queries * group, kernel.block_m)
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared_mem
        sizes = {
            "num_kv_heads": num_kv_heads, "group": group, "queries": queries, "window": window, "head_dim": head_dim,
        }
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(sizes[name]) for name in SIZE_ARGS])
        return kernel.name, kernel.ptx, launch, extra

    @trtp.impl(PLUGIN_ID)
    def _jit(q, k_win, v_win, anchors, k_new, v_new, mask, scale: float, outputs, stream: int) -> None:
        from . import triton_kernels

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            inputs = [torch.as_tensor(t, device="cuda") for t in (q, k_win, v_win, anchors, k_new, v_new, mask)]
            triton_kernels.window_attention(*inputs, scale, out=torch.as_tensor(outputs[0], device="cuda"))

    _registered = True

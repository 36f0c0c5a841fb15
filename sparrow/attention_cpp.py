"""The fused C++ CPU ops: the runtime's multi-token attention (`csrc/multi_token_attention.cpp`),
the draft's one-token step and greedy chain (`csrc/draft_step.cpp`, see `sparrow.draft.Draft.step` and
`Draft.chain`) and small-M linear layers (`csrc/linear.cpp`, see `sparrow.runtime.small_m_linears`).

Compiled on first use with `torch.utils.cpp_extension.load` (a C++ compiler is needed, and ninja,
a dependency of the package; the build is cached under torch's extensions folder, `TORCH_EXTENSIONS_DIR` or
`~/.cache/torch_extensions`, and rebuilt only when the source changes). It registers
`sparrow::multi_token_attention(q, k_cache, v_cache, past, tail_mask, scale)`, the semantics of
`sparrow.attention.multi_token_attention` for float32 CPU tensors: each KV head's keys and values
are read once for all G*T stacked query rows, the cache length is split across threads
(flash-decoding) with a log-sum-exp merge, fp32 online softmax, AVX-512 or AVX2 intrinsics where the
CPU has them and portable loops elsewhere. With AVX-512, steps of `lanes_min_rows()` query rows per KV
head or more (verifies) put the rows in the vector lanes instead of the head dim (no horizontal sums).

`available()` says whether it built (never raises); `load()` builds it or raises `AttentionBuildError`
saying why. `sparrow.attention.runtime_attention` uses it on CPU when it builds and falls back to
the torch implementation otherwise; `SPARROW_ATTENTION=torch|cpp` forces either.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("multi_token_attention.cpp", "draft_step.cpp",
                                                                          "linear.cpp"))
NAME = "sparrow_multi_token_attention"
# -O3 only, no -march: the AVX-512 code is compiled per function (target attributes) and chosen at
# run time from the CPU's flags, so one build is correct on any x86-64 (and on other CPUs the
# portable loops are used).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]  # libgomp.so.1: the same soname as torch's own, so one OpenMP runtime is loaded

_lock = threading.Lock()
_state: dict[str, object] = {}


class AttentionBuildError(RuntimeError):
    """The C++ attention op could not be compiled or loaded."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's binary sits in the venv's bin, often not on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        raise AttentionBuildError("ninja is not installed (`pip install ninja`); SPARROW_ATTENTION=torch uses "
                                  "the torch implementation") from None
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False):
    """Build (first call only) and load the op; returns `torch.ops.sparrow.multi_token_attention`."""
    with _lock:
        if "op" in _state:
            return _state["op"]
        if "error" in _state:
            raise _state["error"]
        try:
            missing = [str(s) for s in SOURCES if not s.is_file()]
            if missing:
                raise AttentionBuildError(f"the C++ sources are missing: {missing} (reinstall the package)")
            if compiler() is None:
                raise AttentionBuildError("no C++ compiler found (install g++, e.g. `apt-get install g++`, "
                                          "or set CXX); SPARROW_ATTENTION=torch uses the torch implementation")
            _ninja_on_path()
            from torch.utils.cpp_extension import load as cpp_load

            try:
                cpp_load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                         is_python_module=False, verbose=verbose)
            except Exception as e:  # compiler errors, missing headers, a bad cached build
                raise AttentionBuildError(f"building {', '.join(s.name for s in SOURCES)} failed: {e}") from e
            torch.library.register_fake("sparrow::multi_token_attention")(_fake)
            _state["op"] = torch.ops.sparrow.multi_token_attention
            return _state["op"]
        except AttentionBuildError as e:
            _state["error"] = e
            raise


def _fake(q, k_cache, v_cache, past, tail_mask, scale):
    """Shape function for tracing (torch.compile, export): the output is a fresh `[Hq, T, D]`."""
    return q.new_empty(q.shape)


def available() -> bool:
    """True when the op is built and loaded (builds it on the first call); never raises."""
    try:
        load()
        return True
    except AttentionBuildError:
        return False


def multi_token_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: int,
                          tail_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[Hq, T, D]`; k/v_cache `[Hkv, >= past + T, D]` (float32, CPU) -> `[Hq, T, D]`."""
    return load()(q, k_cache, v_cache, past, tail_mask, scale)


def isa(which: str = "") -> str:
    """The kernel the op runs for head dims that are multiples of 16: "avx512", "avx2" or "portable".

    `which` = "portable" or "avx2" forces that kernel (raises where the CPU lacks it), "auto" restores
    the choice by CPU flags. `sparrow::small_linear` follows the same setting.
    """
    load()
    return torch.ops.sparrow.multi_token_attention_isa(which)


def lanes_min_rows(rows: int = 0) -> int:
    """With AVX-512, steps of at least this many query rows per KV head (G * T) use the rows-in-lanes
    layout, fewer the row tiles (both in `csrc/multi_token_attention.cpp`). `rows` > 0 sets it (1: always,
    a huge value: never; tests and `benchmarks.attention_op` run both); returns the setting in force."""
    load()
    return torch.ops.sparrow.multi_token_attention_lanes_min_rows(rows)

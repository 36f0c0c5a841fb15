"""The runtime's CPU attention backends side by side: torch implementation against the fused C++ op.

`python -m sparrow.benchmarks.attention_op [--past 1024,4096,25600] [--json OUT]`: the attention
alone, demo-target shapes (2 KV heads, 2 query heads per group, head dim 64, fp32; `--head-dim`), one decode
step (T = 1) and one chain verify (T = K + 1 = 6) per cache length.

`--visual-tokens 1024,4096,25600`: the whole runtime step of the demo target instead (all layers,
the step's Python overhead), the attention backend switched by SPARROW_ATTENTION between calls
on one prefilled cache.

Either way all candidates run in one process, interleaved round by round, so machine noise (this
project's CPU machines are shared) hits them alike; per-call medians in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sparrow import attention_cpp
from sparrow.attention import multi_token_attention


def candidates() -> dict:
    """torch, the C++ op, and with AVX-512 the C++ op held to its row-tile layout ("cpp-row-tiles"), so
    the rows-in-lanes layout it takes for many rows is measured against the one it replaced."""
    fns = {"torch": lambda q, k, v, past, mask, scale: multi_token_attention(q, k, v, past, mask, scale),
           "cpp": attention_cpp.multi_token_attention}
    if attention_cpp.isa() == "avx512":
        fns["cpp-row-tiles"] = lambda *args: row_tiles(attention_cpp.multi_token_attention, *args)
    return fns


def row_tiles(fn, *args):
    """fn(*args) with the C++ op's rows-in-lanes layout switched off."""
    default = attention_cpp.lanes_min_rows()
    attention_cpp.lanes_min_rows(1 << 30)
    try:
        return fn(*args)
    finally:
        attention_cpp.lanes_min_rows(default)


def measure(pasts=(1024, 4096, 25600), ts=(1, 6), kv_heads=2, groups=2, head_dim=64, rounds=15,
            calls=5, threads=2, seed=0) -> list[dict]:
    """Rows: past, T, backend, ms (median over rounds of the mean of `calls` calls)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    fns = candidates()
    rows = []
    for past in pasts:
        tmax = past + max(ts) + 2
        k = torch.randn(kv_heads, tmax, head_dim, generator=g)
        v = torch.randn(kv_heads, tmax, head_dim, generator=g)
        cases = {}
        for t in ts:
            q = torch.randn(kv_heads * groups, t, head_dim, generator=g)
            mask = torch.ones(t, t, dtype=torch.bool).tril_()
            for name, fn in fns.items():
                cases[(t, name)] = (lambda fn=fn, q=q, mask=mask: fn(q, k, v, past, mask, head_dim ** -0.5))
        for (t, name), ms in _interleaved(cases, rounds, calls).items():
            rows.append({"past": past, "T": t, "backend": name, "ms": round(ms, 4)})
    return rows


def _interleaved(cases: dict, rounds: int, calls: int) -> dict:
    """Median ms per call of each case, every case once per round (after one warm-up call each)."""
    for fn in cases.values():
        fn()
    times = {key: [] for key in cases}
    for _ in range(rounds):
        for key, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[key].append((time.perf_counter() - t0) * 1000 / calls)
    return {key: statistics.median(ms) for key, ms in times.items()}


def measure_runtime(visual_tokens=(1024, 4096, 25600), draft_len=5, rounds=15, threads=2) -> list[dict]:
    """Rows: past (context tokens), T, backend, ms of a whole runtime step on the demo target."""
    from sparrow.demo.model import DEMO_TARGET_DIR
    from sparrow.runtime import Runtime
    from sparrow.target import Target

    from .runtime import demo_prompt, start_decoding

    torch.set_num_threads(threads)
    target = Target.load(DEMO_TARGET_DIR)
    rows = []
    previous = os.environ.get("SPARROW_ATTENTION")
    try:
        for n_visual in visual_tokens:
            prompt = demo_prompt(target, n_visual)
            runtime = Runtime(target, max_len=prompt.input_ids.shape[1] + draft_len + 2)
            state, _, run = start_decoding(runtime, prompt)

            def case(backend, t):
                def fn():
                    os.environ["SPARROW_ATTENTION"] = backend.removesuffix("-row-tiles")
                    row_tiles(run, t) if backend.endswith("-row-tiles") else run(t)
                return fn

            backends = ("torch", "cpp") + (("cpp-row-tiles",) if attention_cpp.isa() == "avx512" else ())
            cases = {(t, b): case(b, t) for t in (1, draft_len + 1) for b in backends}
            for (t, b), ms in _interleaved(cases, rounds, 1).items():
                rows.append({"past": state.length, "T": t, "backend": b, "ms": round(ms, 4)})
    finally:
        os.environ.pop("SPARROW_ATTENTION", None)
        if previous is not None:
            os.environ["SPARROW_ATTENTION"] = previous
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["past"], r["T"], r["backend"]): r["ms"] for r in rows}
    pasts = sorted({r["past"] for r in rows})
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    ts = sorted({r["T"] for r in rows})
    t_step, t_verify = ts[0], ts[-1]
    lines = ["| past | backend | " + " | ".join(f"T={t} ms" for t in ts) + f" | T={t_verify} / T={t_step} |",
             "|---" * (3 + len(ts)) + "|"]
    for past in pasts:
        for b in backends:
            cells = " | ".join(f"{by[(past, t, b)]:.3f}" for t in ts)
            lines.append(f"| {past} | {b} | {cells} | {by[(past, t_verify, b)] / by[(past, t_step, b)]:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--past", default="1024,4096,25600", help="cache lengths for the attention alone")
    p.add_argument("--visual-tokens", help="measure whole runtime steps of the demo target at these sizes instead")
    p.add_argument("--head-dim", type=int, default=64, help="head dim for the attention alone (demo target: 64)")
    p.add_argument("--t", default="1,6", help="new tokens per step for the attention alone (6: a K = 5 chain verify)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here (and the table next to it as .md)")
    a = p.parse_args(argv)
    if a.visual_tokens:
        rows = measure_runtime(tuple(int(x) for x in a.visual_tokens.split(",")), rounds=a.rounds, threads=a.threads)
    else:
        rows = measure(tuple(int(x) for x in a.past.split(",")), tuple(int(x) for x in a.t.split(",")),
                       head_dim=a.head_dim, rounds=a.rounds, threads=a.threads)
    print(table(rows))
    if a.json:
        out = Path(a.json)
        what = "runtime step" if a.visual_tokens else f"attention op, head dim {a.head_dim}"
        meta = {"what": what, "threads": a.threads, "rounds": a.rounds, "torch": torch.__version__,
                "isa": attention_cpp.isa()}
        out.write_text(json.dumps([dict(r, **meta) for r in rows], indent=1))
        out.with_suffix(".md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()

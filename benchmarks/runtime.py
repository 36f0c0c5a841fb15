"""`sparrow bench runtime`: the owned-cache runtime against the stock transformers path, side by side.

For each visual-token count, both runtimes prefill the same demo video + question, then time a
one-token decode step and a (K+1)-token verify step (each rolled back after timing, so every
repetition sees the same context). Each (runtime, size) runs in its own process, so its peak RSS
is its own. Runtimes: `hf` (stock transformers), `sparrow-torch` (the owned-cache runtime with its
torch attention, SPARROW_ATTENTION=torch) and `sparrow` (its default: the fused C++ op on CPU).
Rows: visual_tokens, runtime, attention, prefill_s, step_ms, verify_ms, verify_over_step,
peak_rss_mb, context_tokens.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RUNTIMES = ("hf", "sparrow-torch", "sparrow")
ATTENTION_ENV = {"hf": "", "sparrow-torch": "torch", "sparrow": ""}  # SPARROW_ATTENTION per runtime


@dataclass
class RuntimeBenchConfig:
    visual_tokens: tuple[int, ...] = (1024, 4096, 25600)
    draft_len: int = 5
    repeats: int = 7
    model: str | None = None  # None: the embedded demo target
    prefill_chunk: int = 4096
    threads: int = 2

    def __post_init__(self):
        if not self.visual_tokens or min(self.visual_tokens) < 16:
            raise ValueError("visual_tokens must be a non-empty list of counts >= 16")
        if self.draft_len < 1 or self.repeats < 1:
            raise ValueError("draft_len and repeats must be at least 1")


def _timed(fn, repeats: int) -> float:
    """Median milliseconds over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def demo_prompt(target, n_visual: int):
    """The benchmark's input: a demo video with `n_visual` visual tokens and a fixed question."""
    from sparrow.demo.world import frames_for_visual_tokens, make_scene, render

    num_frames, side = frames_for_visual_tokens(n_visual)
    return target.prepare(render(make_scene(1), num_frames, side, side), "describe the video .")


def start_decoding(engine, prompt):
    """Prefill, then one real token in the cache, as during decoding.

    Returns (state, prefill seconds, run): `run(k)` steps k tokens and rolls them back, so every
    call sees the same context.
    """
    import torch

    t0 = time.perf_counter()
    state, out = engine.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    first = int(out.logits[0, -1].argmax())
    engine.step(state, torch.tensor([[first]]))
    base = state.length

    def run(k: int):
        engine.step(state, torch.full((1, k), first))
        engine.truncate(state, base)

    return state, prefill_s, run


def _measure(args) -> dict:
    cfg_json, runtime, n_visual = args
    os.environ["SPARROW_ATTENTION"] = ATTENTION_ENV[runtime]
    import torch

    from sparrow.attention import cpu_backend
    from sparrow.demo.model import DEMO_TARGET_DIR
    from sparrow.runtime import Runtime, peak_rss_mb
    from sparrow.target import Target

    cfg = RuntimeBenchConfig(**cfg_json)
    torch.set_num_threads(cfg.threads)
    target = Target.load(cfg.model or DEMO_TARGET_DIR)
    prompt = demo_prompt(target, n_visual)
    ctx = prompt.input_ids.shape[1] + cfg.draft_len + 2
    engine = target if runtime == "hf" else Runtime(target, max_len=ctx, prefill_chunk=cfg.prefill_chunk)
    attention = (getattr(target.model.config, "_attn_implementation", None) or "default" if runtime == "hf"
                 else cpu_backend(torch.zeros(1, 1, cfg.draft_len + 1, 1, dtype=target.model.dtype)))
    state, prefill_s, run = start_decoding(engine, prompt)
    rss = peak_rss_mb()
    step_ms = _timed(lambda: run(1), cfg.repeats)
    verify_ms = _timed(lambda: run(cfg.draft_len + 1), cfg.repeats)
    return {"visual_tokens": n_visual, "runtime": runtime, "attention": attention, "context_tokens": state.length,
            "prefill_s": round(prefill_s, 3), "step_ms": round(step_ms, 3), "verify_ms": round(verify_ms, 3),
            "verify_over_step": round(verify_ms / step_ms, 3), "peak_rss_mb": round(rss, 1),
            "draft_len": cfg.draft_len}


def run_bench(cfg: RuntimeBenchConfig, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    jobs = [(asdict(cfg), r, n) for n in cfg.visual_tokens for r in RUNTIMES]
    rows = []
    ctx = mp.get_context("spawn")
    for job in tqdm(jobs, desc="bench runtime", disable=not progress):
        with ctx.Pool(1) as pool:  # a fresh process per measurement: clean peak RSS, no shared caches
            rows.append(pool.apply(_measure, (job,)))
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["visual_tokens"], r["runtime"]): r for r in rows}
    lines = ["| visual tokens | runtime | attention | prefill s | step ms | verify ms (K+1) | verify/step | "
             "step speedup vs hf | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = by.get((r["visual_tokens"], "hf"))
        speedup = f"{hf['step_ms'] / r['step_ms']:.2f}x" if hf else "-"
        lines.append(f"| {r['visual_tokens']} | {r['runtime']} | {r.get('attention', '-')} | {r['prefill_s']} | {r['step_ms']} | "
                     f"{r['verify_ms']} | {r['verify_over_step']} | {speedup} | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def machine() -> dict:
    """What a row was measured on: these projects' CPU machines change between sessions (AMD, Intel; AVX2 or
    AVX-512), and a table's numbers mean little without the model and the vector extensions."""
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["cpu_model"] = fields.get("model name", "")
    info["vector_isa"] = "avx512" if {"avx512f", "avx512dq"} <= flags else "avx2" if {"avx2", "fma"} <= flags else "other"
    return info


def write_rows(rows: list[dict], meta: dict, markdown: str, out: str | Path) -> Path:
    """OUT: a JSON list of rows, each with the machine and `meta`; OUT.md: the markdown table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), **meta}
    out.write_text(json.dumps([dict(r, **meta) for r in rows], indent=1))
    out.with_suffix(".md").write_text(markdown + "\n")
    return out


def write(rows: list[dict], cfg: RuntimeBenchConfig, out: str | Path) -> None:
    write_rows(rows, {"repeats": cfg.repeats}, table(rows), out)

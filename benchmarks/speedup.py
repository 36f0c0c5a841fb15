"""`sparrow bench speedup`: ar, eagle and sparrow (and stock transformers generate) on the same videos.

For each visual-token count, each strategy runs in its own process (so its peak RSS is its own) over
the same held-out demo videos with the caption prompt, greedy. Decode throughput excludes prefill
(reported separately, as the paper does). `lossless` compares each strategy's tokens with `ar`'s.
Rows: visual_tokens, strategy, tokens_per_s, speedup_vs_ar, mean_accepted_length, draft_ms_per_step,
verify_ms_per_step, peak_rss_mb, lossless, prefill_s, new_tokens, videos.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .runtime import write_rows

STRATEGIES = ("ar", "eagle", "sparrow", "hf", "hf_lookup")
BENCH_SEED = 3  # held-out videos: evaluation seed range, never used to train the target or the drafts


@dataclass
class SpeedupBenchConfig:
    visual_tokens: tuple[int, ...] = (1024, 4096, 16384, 25600)
    strategies: tuple[str, ...] = ("ar", "eagle", "sparrow", "hf")
    videos: int = 3
    max_new_tokens: int = 48
    # Fixed-length decoding (transformers' min_new_tokens = max_new_tokens), as throughput benchmarks
    # do: every strategy decodes the same number of tokens at every size. 0: stop at end-of-turn.
    min_new_tokens: int | None = None
    draft_len: int = 5
    tree_width: int = 1
    model: str | None = None
    sparrow_draft: str | None = None
    eagle_draft: str | None = None
    threads: int = 2
    prefill_chunk: int = 4096

    def __post_init__(self):
        self.visual_tokens, self.strategies = tuple(self.visual_tokens), tuple(self.strategies)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategies {bad}; choose from {STRATEGIES}")
        if "ar" not in self.strategies:
            raise ValueError("speedups are measured against ar: include it")
        if self.videos < 1 or self.max_new_tokens < 2 or self.draft_len < 1:
            raise ValueError("videos >= 1, max_new_tokens >= 2 and draft_len >= 1 are required")
        if self.min_new_tokens is None:
            self.min_new_tokens = self.max_new_tokens
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must lie in [0, {self.max_new_tokens}]")


def bench_videos(n_visual: int, count: int) -> list:
    from sparrow.demo.text import CAPTION_PROMPT
    from sparrow.demo.world import frames_for_visual_tokens, make_scene, render
    from sparrow.evaluate import eval_seed

    frames, side = frames_for_visual_tokens(n_visual)
    return [(render(make_scene(eval_seed(BENCH_SEED, i)), frames, side, side), CAPTION_PROMPT)
            for i in range(count)]


def _hf_generate(target, frames, prompt, cfg: SpeedupBenchConfig, lookup: bool) -> tuple[list[int], float]:
    """Stock transformers generate; decode time = time(N tokens) - time(1 token), i.e. without prefill."""
    import torch

    p = target.prepare(frames, prompt)
    kw = dict(input_ids=p.input_ids, **p.model_inputs, do_sample=False)
    if lookup:
        kw["prompt_lookup_num_tokens"] = 5
    times = []
    with torch.inference_mode():
        for n in (1, cfg.max_new_tokens):
            t0 = time.perf_counter()
            out = target.model.generate(**kw, max_new_tokens=n, min_new_tokens=min(n, cfg.min_new_tokens))
            times.append(time.perf_counter() - t0)
    return out[0, p.input_ids.shape[1]:].tolist(), max(times[1] - times[0], 1e-9)


def _measure(args) -> dict:
    cfg_json, strategy, n_visual = args
    import torch

    from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
    from sparrow.draft import Draft
    from sparrow.generate import generate_ar
    from sparrow.runtime import Runtime, peak_rss_mb
    from sparrow.speculative import TokenTree, generate_speculative
    from sparrow.target import Target

    cfg = SpeedupBenchConfig(**cfg_json)
    torch.set_num_threads(cfg.threads)
    target = Target.load(cfg.model or DEMO_TARGET_DIR)
    videos = bench_videos(n_visual, cfg.videos)
    tokens, runs, draft = [], [], None
    if strategy.startswith("hf"):
        for frames, prompt in videos:
            toks, decode_s = _hf_generate(target, frames, prompt, cfg, strategy == "hf_lookup")
            tokens.append(toks)
            runs.append({"new_tokens": len(toks), "decode_s": decode_s})
    else:
        longest = max(target.prepare(f, p).input_ids.shape[1] for f, p in videos)
        tree = TokenTree.static(cfg.draft_len, cfg.tree_width)
        runtime = Runtime(target, max_len=longest + cfg.max_new_tokens + tree.size + 1, prefill_chunk=cfg.prefill_chunk)
        if strategy != "ar":
            path = getattr(cfg, f"{strategy}_draft") or DEMO_DRAFTS[strategy]
            draft = Draft.load(path, target.model)
        # untimed warm-up on the first video: first-use costs (the C++ attention op's build, allocator,
        # caches) stay out of the timed runs
        frames, prompt = videos[0]
        if draft is None:
            generate_ar(runtime, frames, prompt, 4)
        else:
            generate_speculative(runtime, draft, frames, prompt, tree, 4)
        for frames, prompt in videos:
            if draft is None:
                res = generate_ar(runtime, frames, prompt, cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
            else:
                res = generate_speculative(runtime, draft, frames, prompt, tree, cfg.max_new_tokens,
                                           min_new_tokens=cfg.min_new_tokens)
            tokens.append(res.token_ids)
            runs.append(res.stats)
    new = sum(r["new_tokens"] for r in runs)
    decode = sum(r["decode_s"] for r in runs)
    text = target.tokenizer.decode(tokens[0], skip_special_tokens=True)
    row = {"visual_tokens": n_visual, "strategy": strategy, "tokens_per_s": round(new / decode, 2),
           "sample_text": text,
           "new_tokens": new, "videos": len(videos), "peak_rss_mb": round(peak_rss_mb(), 1), "tokens": tokens,
           "mean_accepted_length": None, "draft_ms_per_step": None, "verify_ms_per_step": None, "prefill_s": None}
    if not strategy.startswith("hf"):
        row["prefill_s"] = round(sum(r["prefill_s"] for r in runs) / len(runs), 3)
    if draft is not None:
        steps = sum(r["target_steps"] for r in runs)
        row["mean_accepted_length"] = round(sum(r["new_tokens"] - 1 for r in runs) / steps, 3)
        row["draft_ms_per_step"] = round(sum(r["draft_ms_per_step"] * r["target_steps"] for r in runs) / steps, 3)
        row["verify_ms_per_step"] = round(sum(r["verify_ms_per_step"] * r["target_steps"] for r in runs) / steps, 3)
    return row


def run_bench(cfg: SpeedupBenchConfig, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    jobs = [(asdict(cfg), s, n) for n in cfg.visual_tokens for s in cfg.strategies]
    rows = []
    ctx = mp.get_context("spawn")
    for job in tqdm(jobs, desc="bench speedup", disable=not progress):
        with ctx.Pool(1) as pool:  # one process per (size, strategy): its own peak RSS
            rows.append(pool.apply(_measure, (job,)))
    ar = {r["visual_tokens"]: (r["tokens_per_s"], r["tokens"]) for r in rows if r["strategy"] == "ar"}
    for r in rows:
        speed, tokens = ar[r["visual_tokens"]]
        r["speedup_vs_ar"] = round(r["tokens_per_s"] / speed, 3)
        r["lossless"] = r.pop("tokens") == tokens
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| visual tokens | strategy | tokens/s | speedup vs ar | mean accepted length | draft ms/step | "
             "verify ms/step | prefill s | peak RSS MB | lossless |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["visual_tokens"], r["strategy"], r["tokens_per_s"], f"{r['speedup_vs_ar']:.2f}x",
                 r["mean_accepted_length"], r["draft_ms_per_step"], r["verify_ms_per_step"], r["prefill_s"],
                 r["peak_rss_mb"], "yes" if r["lossless"] else "NO"]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in dict.fromkeys(r["strategy"] for r in rows):
        pts = [(r["visual_tokens"], r["speedup_vs_ar"]) for r in rows if r["strategy"] == s]
        ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("decode speedup vs ar (greedy)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("speculative decoding on the demo target (CPU)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write(rows: list[dict], cfg: SpeedupBenchConfig, out: str | Path) -> None:
    """OUT: JSON rows (with machine and config); OUT.md: the table; OUT.png: speedup vs visual tokens."""
    out = write_rows(rows, {"config": asdict(cfg)}, table(rows), out)
    plot(rows, out.with_suffix(".png"))

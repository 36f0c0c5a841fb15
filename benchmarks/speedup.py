"""`sparrow bench speedup`: ar, eagle and sparrow (and stock transformers generate) on the same videos.

For each visual-token count, one process decodes the same held-out demo videos (caption prompt,
greedy) with every strategy, interleaved video by video with the order rotating: this project's CPU
machines are shared and drift by tens of percent within minutes, which strategies timed minutes apart
in separate processes took as differences of their own. Each strategy's peak RSS comes from a fresh
process of its own over the first video. Decode throughput excludes prefill (reported separately, as
the paper does). `lossless` compares each strategy's tokens with `ar`'s. Several draft lengths
(`draft_len=(5, 6, 7)`) time each speculative strategy once per K, side by side in the same process; a
K may be a tree spec with branches (`7+1/01/10`, `sparrow.tree_spec`), to time a tree beside its chain.
Rows: visual_tokens, strategy, draft_len (K or the spec; None for ar and hf), tokens_per_s, speedup_vs_ar,
mean_accepted_length, draft_ms_per_step, verify_ms_per_step, peak_rss_mb, lossless, prefill_s, new_tokens,
videos.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparrow.tree_spec import spec_keys

from .runtime import write_rows

STRATEGIES = ("ar", "eagle", "sparrow", "hf", "hf_lookup")
SPECULATIVE = ("eagle", "sparrow")
BENCH_SEED = 3  # held-out videos: evaluation seed range, never used to train the target or the drafts


@dataclass
class SpeedupBenchConfig:
    visual_tokens: tuple[int, ...] = (1024, 4096, 16384, 25600)
    strategies: tuple[str, ...] = ("ar", "eagle", "sparrow", "hf")
    videos: int = 12  # at 25.6k the accepted length varies a lot by video: 3.28 on the first 6, 2.66 on 24
    max_new_tokens: int = 48
    # Fixed-length decoding (transformers' min_new_tokens = max_new_tokens), as throughput benchmarks
    # do: every strategy decodes the same number of tokens at every size. 0: stop at end-of-turn.
    min_new_tokens: int | None = None
    draft_len: tuple[int | str, ...] = (5,)  # K or a tree spec; several: each speculative strategy once per K
    tree_width: int = 1
    model: str | None = None
    sparrow_draft: str | None = None
    eagle_draft: str | None = None
    threads: int = 2
    prefill_chunk: int = 4096

    def __post_init__(self):
        self.visual_tokens, self.strategies = tuple(self.visual_tokens), tuple(self.strategies)
        self.draft_len = spec_keys(self.draft_len, self.tree_width)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategies {bad}; choose from {STRATEGIES}")
        if "ar" not in self.strategies:
            raise ValueError("speedups are measured against ar: include it")
        if self.videos < 1 or self.max_new_tokens < 2 or not self.draft_len:
            raise ValueError("videos >= 1, max_new_tokens >= 2 and a draft length are required")
        if self.min_new_tokens is None:
            self.min_new_tokens = self.max_new_tokens
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must lie in [0, {self.max_new_tokens}]")

    def entries(self) -> list[tuple[str, int | str | None]]:
        """What is timed: (strategy, K), the speculative strategies once per draft length."""
        return [(s, k) for s in self.strategies for k in (self.draft_len if s in SPECULATIVE else (None,))]


def bench_videos(n_visual: int, count: int) -> list:
    from sparrow.demo.text import CAPTION_PROMPT
    from sparrow.demo.world import frames_for_visual_tokens, make_scene, render
    from sparrow.evaluate import eval_seed

    frames, side = frames_for_visual_tokens(n_visual)
    return [(render(make_scene(eval_seed(BENCH_SEED, i)), frames, side, side), CAPTION_PROMPT)
            for i in range(count)]


def _hf_generate(target, frames, prompt, max_new_tokens: int, min_new_tokens: int,
                 lookup: bool) -> tuple[list[int], float]:
    """Stock transformers generate; decode time = time(N tokens) - time(1 token), i.e. without prefill."""
    import torch

    p = target.prepare(frames, prompt)
    kw = dict(input_ids=p.input_ids, **p.model_inputs, do_sample=False)
    if lookup:
        kw["prompt_lookup_num_tokens"] = 5
    times = []
    with torch.inference_mode():
        for n in (1, max_new_tokens):
            t0 = time.perf_counter()
            out = target.model.generate(**kw, max_new_tokens=n, min_new_tokens=min(n, min_new_tokens))
            times.append(time.perf_counter() - t0)
    return out[0, p.input_ids.shape[1]:].tolist(), max(times[1] - times[0], 1e-9)


def _decoders(cfg: SpeedupBenchConfig, entries: list[tuple[str, int | None]], videos):
    """The loaded target, and (strategy, K) -> decode(frames, prompt, max_new_tokens) -> (token ids, stats
    with new_tokens and decode_s), all on that target (and one runtime) in this process."""
    from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
    from sparrow.draft import Draft
    from sparrow.generate import generate_ar
    from sparrow.runtime import Runtime
    from sparrow.speculative import TokenTree, generate_speculative
    from sparrow.target import Target

    target = Target.load(cfg.model or DEMO_TARGET_DIR)
    # transformers' generate on a copy of its own: the runtime switches its model's attention to its own
    plain = Target.load(cfg.model or DEMO_TARGET_DIR) if any(s.startswith("hf") for s, _ in entries) else None
    longest = max(target.prepare(f, p).input_ids.shape[1] for f, p in videos)
    largest = max(TokenTree.static(k, cfg.tree_width).size for k in cfg.draft_len)
    runtime = Runtime(target, max_len=longest + cfg.max_new_tokens + largest + 1, prefill_chunk=cfg.prefill_chunk)
    drafts = {s: Draft.load(getattr(cfg, f"{s}_draft") or DEMO_DRAFTS[s], target.model)
              for s in dict.fromkeys(s for s, k in entries if k is not None)}

    def decoder(strategy, k):
        if strategy.startswith("hf"):
            def hf(frames, prompt, n):
                toks, decode_s = _hf_generate(plain, frames, prompt, n, cfg.min_new_tokens, strategy == "hf_lookup")
                return toks, {"new_tokens": len(toks), "decode_s": decode_s}
            return hf
        if strategy == "ar":
            def ar(frames, prompt, n):
                res = generate_ar(runtime, frames, prompt, n, min_new_tokens=min(n, cfg.min_new_tokens))
                return res.token_ids, res.stats
            return ar
        draft, tree = drafts[strategy], TokenTree.static(k, cfg.tree_width)

        def speculative(frames, prompt, n):
            res = generate_speculative(runtime, draft, frames, prompt, tree, n, min_new_tokens=min(n, cfg.min_new_tokens))
            return res.token_ids, res.stats
        return speculative

    return target, {e: decoder(*e) for e in entries}


def _time_size(args) -> list[dict]:
    """Every strategy at one size in one process, interleaved video by video (the order rotating), so
    that the machine's drift over the minutes this takes hits them alike: rows without peak RSS."""
    cfg_json, n_visual = args
    import torch

    cfg = SpeedupBenchConfig(**cfg_json)
    torch.set_num_threads(cfg.threads)
    videos = bench_videos(n_visual, cfg.videos)
    entries = cfg.entries()
    target, decode = _decoders(cfg, entries, videos)
    for fn in decode.values():  # untimed warm-up: first-use costs (op builds, allocator, caches) stay out
        fn(*videos[0], 4)
    runs = {e: [] for e in entries}
    for i, (frames, prompt) in enumerate(videos):
        j = i % len(entries)
        for e in entries[j:] + entries[:j]:
            runs[e].append(decode[e](frames, prompt, cfg.max_new_tokens))
    rows = [_row(n_visual, s, k, runs[(s, k)]) for s, k in entries]
    for r in rows:
        r["sample_text"] = target.tokenizer.decode(r["tokens"][0], skip_special_tokens=True)
    return rows


def _row(n_visual: int, strategy: str, k: int | None, runs: list[tuple[list[int], dict]]) -> dict:
    stats = [st for _, st in runs]
    new = sum(st["new_tokens"] for st in stats)
    row = {"visual_tokens": n_visual, "strategy": strategy, "draft_len": k,
           "tokens_per_s": round(new / sum(st["decode_s"] for st in stats), 2),
           "new_tokens": new, "videos": len(runs), "tokens": [toks for toks, _ in runs],
           "mean_accepted_length": None, "draft_ms_per_step": None, "verify_ms_per_step": None, "prefill_s": None}
    if not strategy.startswith("hf"):
        row["prefill_s"] = round(sum(st["prefill_s"] for st in stats) / len(stats), 3)
    if "draft_ms_per_step" in stats[0]:  # the speculative strategies
        steps = sum(st["target_steps"] for st in stats)
        row["mean_accepted_length"] = round(sum(st["new_tokens"] - 1 for st in stats) / steps, 3)
        for key in ("draft_ms_per_step", "verify_ms_per_step"):
            row[key] = round(sum(st[key] * st["target_steps"] for st in stats) / steps, 3)
    return row


def _peak_rss(args) -> float:
    """One strategy (at one K) alone in a fresh process, over the first video: its own peak RSS in MB."""
    cfg_json, strategy, k, n_visual = args
    import torch

    from sparrow.runtime import peak_rss_mb

    cfg = SpeedupBenchConfig(**cfg_json)
    torch.set_num_threads(cfg.threads)
    videos = bench_videos(n_visual, 1)
    _decoders(cfg, [(strategy, k)], videos)[1][(strategy, k)](*videos[0], cfg.max_new_tokens)
    return round(peak_rss_mb(), 1)


def run_bench(cfg: SpeedupBenchConfig, progress: bool = True) -> list[dict]:
    """Per size: one process times all strategies side by side, then one fresh process per strategy
    measures its peak RSS alone (a shared process would report the largest of them for all)."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    rows = []
    with tqdm(total=len(cfg.visual_tokens) * (1 + len(cfg.entries())), desc="bench speedup",
              disable=not progress) as bar:
        for n in cfg.visual_tokens:
            with ctx.Pool(1) as pool:
                timed = pool.apply(_time_size, ((asdict(cfg), n),))
            bar.update()
            for r in timed:
                with ctx.Pool(1) as pool:
                    r["peak_rss_mb"] = pool.apply(_peak_rss, ((asdict(cfg), r["strategy"], r["draft_len"], n),))
                bar.update()
            ar_row = next(r for r in timed if r["strategy"] == "ar")
            speed, tokens = ar_row["tokens_per_s"], ar_row["tokens"]
            for r in timed:
                r["speedup_vs_ar"] = round(r["tokens_per_s"] / speed, 3)
                r["lossless"] = r.pop("tokens") == tokens
            rows.extend(timed)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| visual tokens | strategy | K | tokens/s | speedup vs ar | mean accepted length | draft ms/step | "
             "verify ms/step | prefill s | peak RSS MB | lossless |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["visual_tokens"], r["strategy"], r["draft_len"], r["tokens_per_s"], f"{r['speedup_vs_ar']:.2f}x",
                 r["mean_accepted_length"], r["draft_ms_per_step"], r["verify_ms_per_step"], r["prefill_s"],
                 r["peak_rss_mb"], "yes" if r["lossless"] else "NO"]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    several = len({r["draft_len"] for r in rows if r["draft_len"] is not None}) > 1
    for s, k in dict.fromkeys((r["strategy"], r["draft_len"]) for r in rows):
        pts = [(r["visual_tokens"], r["speedup_vs_ar"]) for r in rows if (r["strategy"], r["draft_len"]) == (s, k)]
        ax.plot(*zip(*pts), marker="o", label=f"{s} K={k}" if several and k is not None else s)
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

"""`sparrow bench serving`: what serving through Triton costs, against in-process decoding.

One process starts the real tritonserver (the `sparrow` ensemble) and loads the same target, runtime
and draft in-process. For each round, each held-out demo video (an mp4) and each strategy, it answers
the caption prompt both ways, back to back, alternating which goes first (so drift and neighbours' load
hit both alike):
- in-process: decode the mp4 and generate, as `sparrow generate` does (`generate_speculative` /
  `generate_ar` on the runtime), no server;
- served: `SparrowClient.stream` over gRPC through preprocessing -> vision_encoder -> sparrow_llm -> postprocessing, until
  the final response.
tokens/s end to end = new tokens / wall time from the request (or the mp4 bytes) to the whole answer
(video decode, prefill and decode included: what a caller waits for); decode tokens/s = the decoder's own
figure (prefill excluded), from each side's stats. Both sides use the same torch thread count.
Rows: one per (strategy, video, round, mode) with every raw figure; the table aggregates medians.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .runtime import write_rows

MODES = ("in_process", "served")


@dataclass
class ServingBenchConfig:
    visual_tokens: int = 1024
    videos: int = 3
    rounds: int = 5
    max_new_tokens: int = 64  # answers stop at end-of-turn (captions run about 50 tokens)
    strategies: tuple[str, ...] = ("sparrow", "ar")
    draft_len: int = 5
    threads: int = 1  # torch threads, in-process and in the server's models alike

    def __post_init__(self):
        self.strategies = tuple(self.strategies)
        if not set(self.strategies) <= {"sparrow", "ar"} or not self.strategies:
            raise ValueError(f"strategies must be among sparrow, ar; got {self.strategies}")
        if self.videos < 1 or self.rounds < 1 or self.max_new_tokens < 1 or self.threads < 1:
            raise ValueError("videos, rounds, max_new_tokens and threads must be at least 1")


def _videos(cfg: ServingBenchConfig) -> list[bytes]:
    """The speedup benchmark's held-out demo videos, as mp4 files (what a client sends)."""
    from sparrow.video import encode

    from .speedup import bench_videos

    return [encode(frames) for frames, _ in bench_videos(cfg.visual_tokens, cfg.videos)]


def run_bench(cfg: ServingBenchConfig) -> list[dict]:
    import torch

    from sparrow.client import SparrowClient
    from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
    from sparrow.demo.text import CAPTION_PROMPT
    from sparrow.draft import Draft
    from sparrow.generate import generate_ar
    from sparrow.runtime import Runtime
    from sparrow.serving import ServeConfig, free_port, start_server
    from sparrow.speculative import TokenTree, generate_speculative
    from sparrow.target import Target
    from sparrow.video import decode

    torch.set_num_threads(cfg.threads)
    videos = _videos(cfg)
    serve_cfg = ServeConfig(draft_len=cfg.draft_len, max_len=cfg.visual_tokens + 1024,
                            max_tokens_limit=max(cfg.max_new_tokens, 64))
    target = Target.load(DEMO_TARGET_DIR)
    runtime = Runtime(target, max_len=serve_cfg.max_len)  # the server's sparrow_llm holds the same
    draft = Draft.load(DEMO_DRAFTS["sparrow"], target.model)
    tree = TokenTree.chain(cfg.draft_len)

    def in_process(video: bytes, strategy: str) -> tuple[float, dict, list[int]]:
        t0 = time.perf_counter()
        frames = decode(video)
        if strategy == "ar":
            res = generate_ar(runtime, frames, CAPTION_PROMPT, cfg.max_new_tokens)
        else:
            res = generate_speculative(runtime, draft, frames, CAPTION_PROMPT, tree, cfg.max_new_tokens)
        return time.perf_counter() - t0, res.stats, res.token_ids

    work = Path(tempfile.mkdtemp(prefix="sparrow-bench-serving-"))
    server = start_server(work, serve_cfg, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          threads=cfg.threads)
    rows = []
    try:
        server.wait_ready()
        with SparrowClient(server.grpc_url, timeout_s=600) as client:
            def served(video: bytes, strategy: str) -> tuple[float, dict, list[int], float | None]:
                ans = client.infer(video, CAPTION_PROMPT, max_tokens=cfg.max_new_tokens,
                                   speculative=strategy == "sparrow")
                return ans.total_s, ans.stats, ans.token_ids, ans.first_piece_s

            for strategy in cfg.strategies:  # untimed warm-up of both paths
                in_process(videos[0], strategy)
                served(videos[0], strategy)
            load_before = os.getloadavg()
            for rnd in range(cfg.rounds):
                for v, video in enumerate(videos):
                    for strategy in cfg.strategies:
                        order = MODES if (rnd + v) % 2 == 0 else MODES[::-1]
                        out = {m: (in_process if m == "in_process" else served)(video, strategy) for m in order}
                        same = out["in_process"][2] == out["served"][2]
                        for m in MODES:
                            wall, stats, tokens = out[m][:3]
                            rows.append({"strategy": strategy, "video": v, "round": rnd, "mode": m,
                                         "first": m == order[0], "new_tokens": len(tokens),
                                         "wall_s": round(wall, 4), "tokens_per_s": round(len(tokens) / wall, 2),
                                         "decode_tokens_per_s": stats["tokens_per_s"],
                                         "prefill_s": stats["prefill_s"],
                                         "first_piece_s": round(out[m][3], 4) if m == "served" else None,
                                         "same_tokens": same})
            load_after = os.getloadavg()
    finally:
        server.stop()
    for r in rows:
        r.update(visual_tokens=cfg.visual_tokens, threads=cfg.threads, cpus=os.cpu_count(),
                 loadavg_1m_before=round(load_before[0], 2), loadavg_1m_after=round(load_after[0], 2))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per strategy: medians of each mode, and served / in-process ratios."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = {m: [r for r in rows if r["strategy"] == strategy and r["mode"] == m] for m in MODES}

        def med(mode: str, key: str) -> float:
            return statistics.median(r[key] for r in mine[mode])

        pairs = [s["tokens_per_s"] / i["tokens_per_s"] for i, s in zip(mine["in_process"], mine["served"])]
        out.append({"strategy": strategy, "requests": len(pairs),
                    "in_process_tokens_per_s": round(med("in_process", "tokens_per_s"), 1),
                    "served_tokens_per_s": round(med("served", "tokens_per_s"), 1),
                    "ratio": round(med("served", "tokens_per_s") / med("in_process", "tokens_per_s"), 3),
                    "median_pair_ratio": round(statistics.median(pairs), 3),
                    "in_process_decode_tokens_per_s": round(med("in_process", "decode_tokens_per_s"), 1),
                    "served_decode_tokens_per_s": round(med("served", "decode_tokens_per_s"), 1),
                    "overhead_ms": round(1000 * (med("served", "wall_s") - med("in_process", "wall_s")), 1),
                    "served_first_piece_s": round(med("served", "first_piece_s"), 4),
                    "same_tokens": all(r["same_tokens"] for r in mine["served"])})
    return out


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"Serving overhead: {r0['visual_tokens']} visual tokens, torch threads {r0['threads']}, {r0['cpus']} CPUs, "
             f"load average (1 min) {r0['loadavg_1m_before']} before / {r0['loadavg_1m_after']} after the timed runs",
             "",
             "| strategy | requests | in-process tok/s | served tok/s | served / in-process | median pair ratio | "
             "decode tok/s in-process | decode tok/s served | overhead ms/request | served first piece s | "
             "same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['strategy']} | {s['requests']} | {s['in_process_tokens_per_s']} | {s['served_tokens_per_s']} | "
                     f"{s['ratio']:.1%} | {s['median_pair_ratio']:.1%} | {s['in_process_decode_tokens_per_s']} | "
                     f"{s['served_decode_tokens_per_s']} | {s['overhead_ms']} | {s['served_first_piece_s']} | "
                     f"{'yes' if s['same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def write(rows: list[dict], cfg: ServingBenchConfig, out: str | Path) -> None:
    write_rows(rows, {"config": asdict(cfg)}, table(rows), out)

"""`sparrow bench draft-round`: a draft round's cost at each video size, side by side in one process.

`bench speedup` runs every size in its own process, so its draft ms/step at two sizes come from two
processes, whose memory layouts and moments on a noisy machine differ. The ratio the issue
bounds (Sparrow's draft round at 25,600 visual tokens against 1,024) is measured here in one process:
the sizes take turns video by video for `rounds` passes, each row's value is the median over passes of
the pass's mean. Rows marked `weights_warmed` decode the same way but read every weight of the fused draft
step right after each verify (outside the draft timer): what is left between sizes then is not the
draft's weights coming back from memory after the verify's sweep over the long cache.
Rows: visual_tokens, strategy, weights_warmed, draft_ms_per_round (= bench speedup's draft_ms_per_step),
ratio_vs_smallest (against the same strategy at the smallest size), verify_ms_per_round,
mean_accepted_length, videos, rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from .runtime import write_rows
from .speedup import bench_videos

STRATEGIES = ("sparrow", "eagle")


@dataclass
class DraftRoundBenchConfig:
    visual_tokens: tuple[int, ...] = (1024, 25600)
    strategies: tuple[str, ...] = STRATEGIES
    videos: int = 2
    rounds: int = 2
    max_new_tokens: int = 48  # every decode runs this long (end-of-turn held back)
    draft_len: int = 5
    warm_check: bool = True  # also Sparrow with its weights read after each verify
    threads: int = 2

    def __post_init__(self):
        self.visual_tokens, self.strategies = tuple(self.visual_tokens), tuple(self.strategies)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ValueError(f"strategies must come from {STRATEGIES}, got {list(self.strategies)}")
        if not self.visual_tokens:
            raise ValueError("name at least one visual-token count")
        if self.videos < 1 or self.rounds < 1 or self.max_new_tokens < 2 or self.draft_len < 1:
            raise ValueError("videos, rounds, draft_len >= 1 and max_new_tokens >= 2 are required")


def run_bench(cfg: DraftRoundBenchConfig, progress: bool = True) -> list[dict]:
    import torch
    from tqdm import tqdm

    from sparrow.demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR
    from sparrow.draft import Draft
    from sparrow.runtime import Runtime
    from sparrow.speculative import TokenTree, generate_speculative
    from sparrow.target import Target

    class WarmingRuntime(Runtime):
        """A runtime whose verify can be followed by a read of every weight a draft's fused step reads."""
        warm: Draft | None = None

        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            if self.warm is not None:
                weights, _ = self.warm._step_args()
                self.checksum = sum(float(torch.sum(w, dtype=torch.float32)) for w in weights)
            return out

    torch.set_num_threads(cfg.threads)
    target = Target.load(DEMO_TARGET_DIR)
    drafts = {s: Draft.load(DEMO_DRAFTS[s], target.model) for s in cfg.strategies}
    videos = {n: bench_videos(n, cfg.videos) for n in cfg.visual_tokens}
    prompts = {n: [target.prepare(f, p) for f, p in vids] for n, vids in videos.items()}
    tree = TokenTree.chain(cfg.draft_len)
    longest = max(p.input_ids.shape[1] for ps in prompts.values() for p in ps)
    runtime = WarmingRuntime(target, max_len=longest + cfg.max_new_tokens + tree.size + 1)
    variants = [(s, False) for s in cfg.strategies] + ([("sparrow", True)] if cfg.warm_check
                                                       and "sparrow" in cfg.strategies else [])

    def decode(n: int, i: int, strategy: str, warmed: bool) -> dict:
        runtime.warm = drafts[strategy] if warmed else None
        frames, prompt = videos[n][i]
        return generate_speculative(runtime, drafts[strategy], frames, prompt, tree, cfg.max_new_tokens,
                                    min_new_tokens=cfg.max_new_tokens, prepared=prompts[n][i]).stats

    for n in cfg.visual_tokens:  # untimed warm-up of every size and variant
        for v in variants:
            decode(n, 0, *v)
    passes = {(n, v): [] for n in cfg.visual_tokens for v in variants}  # per pass: [draft, verify, accepted]
    work = cfg.rounds * len(cfg.visual_tokens) * cfg.videos
    with tqdm(total=work, desc="bench draft-round", disable=not progress) as bar:
        for _ in range(cfg.rounds):
            sums = {k: [0.0, 0.0, 0.0] for k in passes}
            for n in cfg.visual_tokens:
                for i in range(cfg.videos):
                    for v in variants:
                        s = decode(n, i, *v)
                        acc = sums[(n, v)]
                        acc[0] += s["draft_ms_per_step"]
                        acc[1] += s["verify_ms_per_step"]
                        acc[2] += s["mean_accepted_length"]
                    bar.update(1)
            for k, acc in sums.items():
                passes[k].append([x / cfg.videos for x in acc])
    rows = []
    for (n, (strategy, warmed)), got in passes.items():
        draft_ms, verify_ms, accepted = (statistics.median(col) for col in zip(*got))
        rows.append({"visual_tokens": n, "strategy": strategy, "weights_warmed": warmed,
                     "draft_ms_per_round": round(draft_ms, 3), "verify_ms_per_round": round(verify_ms, 3),
                     "mean_accepted_length": round(accepted, 3), "videos": cfg.videos, "rounds": cfg.rounds})
    smallest = min(cfg.visual_tokens)
    base = {(r["strategy"], r["weights_warmed"]): r["draft_ms_per_round"] for r in rows
            if r["visual_tokens"] == smallest}
    for r in rows:
        r["ratio_vs_smallest"] = round(r["draft_ms_per_round"] / base[(r["strategy"], r["weights_warmed"])], 3)
    return rows


def table(rows: list[dict]) -> str:
    keys = ["visual_tokens", "strategy", "weights_warmed", "draft_ms_per_round", "ratio_vs_smallest",
            "verify_ms_per_round", "mean_accepted_length"]
    lines = ["| " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(("yes" if r[k] else "no") if isinstance(r[k], bool) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


def write(rows: list[dict], cfg: DraftRoundBenchConfig, out) -> None:
    write_rows(rows, {"config": asdict(cfg)}, table(rows), out)

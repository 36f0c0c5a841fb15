"""`sparrow bench acceptance`: lossless check against transformers `generate`, and the ablation table.

Every draft runs greedy speculative decoding on the same held-out demo videos; each output is
compared token for token with stock Hugging Face `generate` (greedy) on a separate, untouched copy
of the target. Rows: draft, attend, window, glimpses, glimpse_layer, mtp_steps, train_steps, videos,
lossless_videos, mean_accepted_length, holdout_expected_length and holdout_long_expected_length
(the offline estimates training printed, on held-out short and long-video records), visual_tokens,
draft_len (K, or a tree spec `K+b/b/...`), tree_nodes, min_new_tokens. Several draft lengths or trees
give one row per draft and tree, from the same prefill of each video.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparrow.tree_spec import spec_keys

from .runtime import write_rows
from .speedup import bench_videos


@dataclass
class AcceptanceBenchConfig:
    drafts: dict[str, str] = field(default_factory=dict)  # name -> draft directory
    visual_tokens: int = 1024
    videos: int = 100
    max_new_tokens: int = 48
    min_new_tokens: int = 0  # end-of-turn held back until then (the fixed-length regime of `bench speedup`)
    draft_len: tuple[int | str, ...] = (5,)  # K (chains), or tree specs such as 7+1/01/10 (sparrow.tree_spec)
    model: str | None = None
    threads: int = 2

    def __post_init__(self):
        if not self.drafts:
            raise ValueError("name at least one draft")
        self.drafts = {str(name): str(path) for name, path in dict(self.drafts).items()}  # JSON-ready, Paths too
        self.draft_len = spec_keys(self.draft_len)
        if self.videos < 1 or not self.draft_len:
            raise ValueError("videos must be at least 1, and name at least one draft length")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must lie in [0, {self.max_new_tokens}]")


def run_bench(cfg: AcceptanceBenchConfig, progress: bool = True) -> list[dict]:
    import torch
    from tqdm import tqdm

    from sparrow.demo.model import DEMO_TARGET_DIR
    from sparrow.draft import Draft
    from sparrow.runtime import Runtime
    from sparrow.speculative import TokenTree, generate_speculative
    from sparrow.target import Target

    torch.set_num_threads(cfg.threads)
    path = cfg.model or DEMO_TARGET_DIR
    reference = Target.load(path)  # stock transformers, never touched by the runtime
    target = Target.load(path)
    drafts = {name: Draft.load(d, target.model) for name, d in cfg.drafts.items()}
    videos = bench_videos(cfg.visual_tokens, cfg.videos)
    longest = max(reference.prepare(f, p).input_ids.shape[1] for f, p in videos)
    trees = {k: TokenTree.static(k) for k in cfg.draft_len}
    runtime = Runtime(target, max_len=longest + cfg.max_new_tokens + max(t.size for t in trees.values()) + 1)
    stats = {(name, k): {"lossless": 0, "new": 0, "steps": 0} for name in drafts for k in trees}
    layers = tuple(sorted({i for d in drafts.values() for i in d.cfg.target_layers}))
    for frames, prompt in tqdm(videos, desc="bench acceptance", disable=not progress):
        p = reference.prepare(frames, prompt)
        prefilled = runtime.prefill(p, layers=layers)  # one prefill for every draft: ~9 s each at 25.6k
        with torch.inference_mode():
            hf = reference.model.generate(input_ids=p.input_ids, **p.model_inputs, do_sample=False,
                                          max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
        expect = hf[0, p.input_ids.shape[1]:].tolist()
        for (name, k), s in stats.items():
            res = generate_speculative(runtime, drafts[name], frames, prompt, trees[k], cfg.max_new_tokens,
                                       min_new_tokens=cfg.min_new_tokens, prepared=p, prefilled=prefilled)
            s["lossless"] += res.token_ids == expect
            s["new"] += res.stats["new_tokens"] - 1
            s["steps"] += res.stats["target_steps"]
    rows = []
    for (name, k), s in stats.items():
        draft = drafts[name]
        meta_file = Path(cfg.drafts[name]) / "training.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        window = draft.cfg.window if draft.cfg.attend == "window" else None  # the prefix draft has no window
        rows.append({"draft": name, "attend": draft.cfg.attend, "window": window,
                     "glimpses": draft.cfg.glimpses,
                     "glimpse_layer": draft.cfg.glimpse_layer if draft.cfg.glimpses else None,
                     "mtp_steps": meta.get("config", {}).get("mtp_steps"),
                     "train_steps": meta.get("config", {}).get("steps"), "videos": len(videos),
                     "lossless_videos": s["lossless"], "mean_accepted_length": round(s["new"] / max(s["steps"], 1), 3),
                     "holdout_expected_length": meta.get("holdout", {}).get("expected_accepted_length"),
                     "holdout_long_expected_length": meta.get("holdout_long", {}).get("expected_accepted_length"),
                     "visual_tokens": cfg.visual_tokens, "draft_len": k, "tree_nodes": trees[k].size - 1,
                     "min_new_tokens": cfg.min_new_tokens})
    return rows


def table(rows: list[dict]) -> str:
    keys = ["draft", "attend", "window", "glimpses", "glimpse_layer", "mtp_steps", "train_steps", "draft_len",
            "tree_nodes", "mean_accepted_length", "holdout_expected_length", "holdout_long_expected_length", "lossless_videos",
            "videos"]
    lines = ["| " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[k] is None else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def write(rows: list[dict], cfg: AcceptanceBenchConfig, out: str | Path) -> None:
    write_rows(rows, {"config": asdict(cfg)}, table(rows), out)

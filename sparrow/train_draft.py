"""`sparrow train draft`: train a draft on the target's cached states with multi-token prediction (MTP).

Training-time test: every answer position p starts its own k-step rollout, exactly as inference
drafts after committing p. Step 1 reads the target's fused features at p; step s > 1 reads the
draft's own output of step s - 1 (never the target's), and attends to the anchors a draft at p
would see (the last W text positions up to p, or the whole prefix for EAGLE), the glimpses, and
its own earlier steps of the same rollout. Input tokens along the rollout are the target's: on
the path that gets accepted the draft's tokens equal them, and past the first miss nothing counts.
Every step is supervised against the target's greedy token.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .draft import Draft, DraftConfig, rotate
from .draft_data import DraftDataConfig, build_shards, load_shards
from .target import Target

IGNORE = -100


@dataclass
class DraftTrainConfig:
    draft: DraftConfig = field(default_factory=DraftConfig)
    data: DraftDataConfig = field(default_factory=DraftDataConfig)
    steps: int = 1500  # phase 1; the embedded drafts were trained with these defaults
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    mtp_steps: int = 5  # k: rollout length in training; 1 = single-step training (no MTP)
    holdout: int = 100  # last records of the data, never trained on: validation
    seed: int = 0
    checkpoint_every: int = 250
    # Phase 2 (when the data has long-video records): `long_steps` more steps at a lower rate on
    # batches that are `long_share` long-video records and the rest short ones (so the short-video
    # skill is kept). Its own batch size: an EAGLE draft's batch pads every record to the longest
    # video's positions. Defaults picked on held-out records (README, "Training data and training").
    long_steps: int = 300
    long_batch_size: int = 16
    long_share: float = 0.25
    long_lr: float = 3e-4
    long_holdout: int = 4

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.mtp_steps < 1:
            raise ValueError("steps, batch_size and mtp_steps must be positive")
        if not 0 < self.holdout < self.data.examples:
            raise ValueError(f"holdout must lie in (0, {self.data.examples})")
        if self.long_steps < 0 or self.long_batch_size < 1 or not 0 < self.long_share <= 1 or self.long_lr <= 0:
            raise ValueError("long_steps >= 0, long_batch_size >= 1, long_share in (0, 1] and long_lr > 0 are required")
        if self.data.long_examples and not 0 < self.long_holdout < self.data.long_examples:
            raise ValueError(f"long_holdout must lie in (0, {self.data.long_examples})")
        if self.draft.feature_layers != self.data.feature_layers:
            raise ValueError("the draft's feature_layers must be the ones the data stores")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DraftTrainConfig":
        d = dict(d)
        return cls(draft=DraftConfig(**d.pop("draft")), data=DraftDataConfig(**d.pop("data")), **d)


def make_batch(recs: list[dict], cfg: DraftConfig, k: int) -> dict:
    """Pad records into one MTP batch: anchors `[B, A]`, rollouts `[B, Q, k]`."""
    rows = []
    for r in recs:
        visual, ids = r["visual"], r["ids"]
        t = visual.shape[0]
        rank = torch.cumsum(~visual, 0) - 1  # [T] text index of each position
        anchors = torch.arange(t) if cfg.attend == "prefix" else torch.nonzero(~visual).flatten()  # [A]
        qpos = torch.arange(r["prompt_len"] - 1, t - 1)  # [Q]: rollouts start after each answer position
        steps = qpos[:, None] + torch.arange(1, k + 1)  # [Q, k] position of step s's input token
        labels = torch.where(steps + 1 <= t, ids[(steps + 1).clamp(max=t)], IGNORE)  # [Q, k]
        see = anchors[None] <= qpos[:, None]  # [Q, A]
        if cfg.attend == "window":
            see &= rank[anchors][None] > rank[qpos][:, None] - cfg.window
        rows.append(dict(anchor_pos=anchors, anchor_feats=r["feats"][anchors], qpos=qpos, qfeats=r["feats"][qpos],
                         tokens=ids[steps.clamp(max=t)], labels=labels, see=see,
                         pooled=r["pooled"][cfg.glimpse_layer] if cfg.glimpses else None))
    a_max = max(len(x["anchor_pos"]) for x in rows)
    q_max = max(len(x["qpos"]) for x in rows)

    def pad(key, size, dim, value=0):
        out = []
        for x in rows:
            v = x[key]
            shape = list(v.shape)
            shape[dim] = size - v.shape[dim]
            out.append(torch.cat([v, torch.full(shape, value, dtype=v.dtype)], dim))
        return torch.stack(out)

    see = torch.stack([F.pad(x["see"], (0, a_max - x["see"].shape[1], 0, q_max - x["see"].shape[0]))
                       for x in rows])  # [B, Q, A]
    batch = dict(anchor_pos=pad("anchor_pos", a_max, 0), anchor_feats=pad("anchor_feats", a_max, 0).float(),
                 qpos=pad("qpos", q_max, 0), qfeats=pad("qfeats", q_max, 0).float(),
                 tokens=pad("tokens", q_max, 0), labels=pad("labels", q_max, 0, IGNORE), see=see)
    if cfg.glimpses:
        pooled = torch.stack([x["pooled"] for x in rows]).float()  # [B, P, H]
        batch["glimpses"] = F.adaptive_avg_pool1d(pooled.transpose(1, 2), cfg.glimpses).transpose(1, 2)  # [B, G, H]
    return batch


class RolloutAttention:
    """The draft's attention for all rollouts of a batch at once; one call per rollout step.

    Query (b, q) at step s sees: anchors allowed by `see[b, q]`, the glimpses (rotated to sit
    just before the rollout, as at inference), and steps 1..s of its own rollout.
    """

    def __init__(self, draft: Draft, batch: dict):
        self.draft = draft
        cfg = draft.cfg
        self.group = cfg.num_heads // cfg.num_kv_heads
        fused = draft.features({i: batch["anchor_feats"][:, :, j] for j, i in enumerate(cfg.feature_layers)})
        # keys/values fixed for the whole rollout, expanded to the query heads once
        anchor_k, anchor_v = draft.kv(fused, batch["anchor_pos"])  # [B, Hkv, A, D]
        self.anchor_k, self.anchor_v = self._rep(anchor_k), self._rep(anchor_v)  # [B, Hq, A, D]
        self.see = batch["see"][:, None]  # [B, 1, Q, A]
        self.glimpse_k = self.glimpse_v = None
        if cfg.glimpses:
            g = draft.glimpse_proj(batch["glimpses"])  # [B, G, H]
            kg, vg = draft.kv(g, None)  # [B, Hkv, G, D]
            kg = rotate(kg[:, :, None], batch["qpos"][:, None, :, None], cfg.rope_theta)  # [B, Hkv, Q, G, D]
            self.glimpse_k, self.glimpse_v = self._rep(kg), self._rep(vg)
        self.own_k: list[torch.Tensor] = []
        self.own_v: list[torch.Tensor] = []

    def _rep(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.group, dim=1)  # KV heads -> query heads

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[B, Hq, Q, D]`; this step's own k/v `[B, Hkv, Q, D]` -> `[B, Hq, Q, D]`."""
        self.own_k.append(k)
        self.own_v.append(v)
        scale = q.shape[-1] ** -0.5
        own_k = self._rep(torch.stack(self.own_k, 3))  # [B, Hq, Q, s, D]
        own_v = self._rep(torch.stack(self.own_v, 3))
        parts = [(q @ self.anchor_k.transpose(-1, -2)).masked_fill(~self.see, float("-inf"))]  # [B, Hq, Q, A]
        if self.glimpse_k is not None:
            parts.append(torch.einsum("bhqd,bhqgd->bhqg", q, self.glimpse_k))  # [B, Hq, Q, G]
        parts.append(torch.einsum("bhqd,bhqsd->bhqs", q, own_k))  # [B, Hq, Q, s]
        probs = torch.softmax(torch.cat(parts, -1) * scale, -1)
        a = self.anchor_k.shape[2]
        out = probs[..., :a] @ self.anchor_v
        if self.glimpse_k is not None:
            g = self.glimpse_v.shape[2]
            out = out + probs[..., a:a + g] @ self.glimpse_v
            a += g
        return out + torch.einsum("bhqs,bhqsd->bhqd", probs[..., a:], own_v)


def rollout_logits(draft: Draft, batch: dict, k: int) -> list[torch.Tensor]:
    """Logits `[B, Q, V]` of each of the k rollout steps."""
    attend = RolloutAttention(draft, batch)
    feats = draft.features({i: batch["qfeats"][:, :, j] for j, i in enumerate(draft.cfg.feature_layers)})
    out = []
    for s in range(k):
        feats = draft.layer(batch["tokens"][:, :, s], feats, batch["qpos"] + s + 1, attend)  # [B, Q, H]
        out.append(draft.logits(feats))
    return out


def label_counts(batch: dict) -> torch.Tensor:
    """Labelled positions per rollout step `[k]`."""
    return (batch["labels"] != IGNORE).sum((0, 1))


def mtp_loss(draft: Draft, batch: dict, k: int, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over each step's labels, then over the k steps; and per-step correctness
    `[B, Q, k]` (False where unlabelled). `counts` `[k]`: divide by these label counts instead of this
    batch's own, so micro-batches of one batch add up to the whole batch's loss."""
    counts = label_counts(batch) if counts is None else counts
    losses, correct = [], []
    for s, logits in enumerate(rollout_logits(draft, batch, k)):
        labels = batch["labels"][:, :, s]
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        losses.append(total / counts[s].clamp(min=1))
        correct.append(logits.argmax(-1) == labels)
    return torch.stack(losses).mean(), torch.stack(correct, -1)


def backward_batches(draft: Draft, batches: list[dict], k: int) -> float:
    """Backpropagate one step's micro-batches, each divided by the label counts of all of them, so
    the gradients are those of the one batch they make up. Returns that batch's loss."""
    counts = sum(label_counts(b) for b in batches)  # [k]
    loss = 0.0
    for batch in batches:
        part, _ = mtp_loss(draft, batch, k, counts)
        part.backward()
        loss += part.item()
    return loss


@torch.no_grad()
def evaluate(draft: Draft, recs: list[dict], k: int, batch_size: int = 16) -> dict:
    """Per-step accuracy and the chain's expected accepted length 1 + sum_s P(steps 1..s all right)."""
    draft.eval()
    runs, per_step, n_valid = [], torch.zeros(k), torch.zeros(k)
    for i in range(0, len(recs), batch_size):
        batch = make_batch(recs[i:i + batch_size], draft.cfg, k)
        _, correct = mtp_loss(draft, batch, k)
        valid = batch["labels"][:, :, 0] != IGNORE  # [B, Q]
        runs.append(correct.cumprod(-1)[valid].float())  # [n, k]: steps 1..s all right
        labelled = batch["labels"] != IGNORE
        per_step += correct.sum((0, 1)).float()
        n_valid += labelled.sum((0, 1)).float()
    draft.train()
    runs = torch.cat(runs)
    return {"step_accuracy": [round(float(x), 4) for x in per_step / n_valid.clamp(min=1)],
            "expected_accepted_length": round(1 + float(runs.sum(-1).mean()), 3)}


def _schedule(cfg: DraftTrainConfig):
    """LR multiplier at step s: warm-up + cosine over phase 1, then cosine from long_lr over phase 2."""
    def f(s: int) -> float:
        if s < cfg.steps:
            return min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
        return cfg.long_lr / cfg.lr * 0.5 * (1 + math.cos(math.pi * (s - cfg.steps) / max(1, cfg.long_steps)))
    return f


def _pick_batch(cfg: DraftTrainConfig, step: int, short: list[dict], long: list[dict],
                rng: np.random.Generator) -> list[list[dict]]:
    """One step's records, as micro-batches of like length: padding short records to a long video's
    positions would multiply an EAGLE draft's cost, and the micro-batches add up to the same loss."""
    if step < cfg.steps or not long:
        return [[short[i] for i in rng.choice(len(short), cfg.batch_size)]]
    n_long = max(1, round(cfg.long_batch_size * cfg.long_share))
    groups = [[long[i] for i in rng.choice(len(long), n_long)],
              [short[i] for i in rng.choice(len(short), cfg.long_batch_size - n_long)]]
    return [g for g in groups if g]


def train_draft(target: Target, cfg: DraftTrainConfig, data_dir: str | Path, work_dir: str | Path,
                out: str | Path | None, progress: bool = True, init: str | Path | None = None) -> dict:
    """Phase 1 (`steps`, short videos) then phase 2 (`long_steps`, with long videos, if the data has
    them). `init`: a trained draft directory to start phase 2 from, skipping phase 1."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    short_shards, long_shards = build_shards(target, data_dir, cfg.data)
    recs, long_recs = load_shards(short_shards), load_shards(long_shards)
    train, held = recs[:-cfg.holdout], recs[-cfg.holdout:]
    long_train, long_held = (long_recs[:-cfg.long_holdout], long_recs[-cfg.long_holdout:]) if long_recs else ([], [])
    total = cfg.steps + (cfg.long_steps if long_recs else 0)
    torch.manual_seed(cfg.seed)
    draft = Draft.for_target(cfg.draft, target.model).float().train()
    step, elapsed, log, lineage = 0, 0.0, [], None
    if init is not None:
        if not long_recs or not cfg.long_steps:
            raise ValueError("--init starts phase 2, and this run has none (no long-video records or long_steps 0)")
        start = Draft.load(init, target.model)
        if start.cfg != cfg.draft:
            raise ValueError(f"{init} holds a draft with another config than this run's")
        draft.load_state_dict(start.float().state_dict(), strict=False)
        lineage = {"init": str(init), "init_training": json.loads(Path(init, "training.json").read_text())
                   if Path(init, "training.json").is_file() else None}
        step = cfg.steps
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start_step, schedule = step, _schedule(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(start_step + s))
    ckpt = work / "draft_ckpt.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != cfg.to_json() or state.get("lineage") != lineage:
            raise ValueError(f"{ckpt} was written by another training run (config or --init); use a fresh --work-dir")
        draft.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
    rng = np.random.default_rng([cfg.seed, step])
    bar = tqdm(total=total, initial=step, desc="train draft", disable=not progress)
    t0 = time.perf_counter() - elapsed
    while step < total:
        batches = [make_batch(g, cfg.draft, cfg.mtp_steps) for g in _pick_batch(cfg, step, train, long_train, rng)]
        opt.zero_grad(set_to_none=True)
        loss = backward_batches(draft, batches, cfg.mtp_steps)
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", phase=1 if step <= cfg.steps else 2)
        if step % 50 == 0:
            log.append({"step": step, "loss": round(loss, 4)})
        if step % cfg.checkpoint_every == 0 or step == total or (step > cfg.steps and step % 50 == 0):
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "elapsed": time.perf_counter() - t0, "log": log,
                        "config": cfg.to_json(), "lineage": lineage}, ckpt)
    bar.close()
    k = max(cfg.mtp_steps, 5)
    rec = {"config": cfg.to_json(), "train_seconds": round(time.perf_counter() - t0, 1),
           "final_loss": log[-1]["loss"] if log else None, "holdout": evaluate(draft, held, k), "log": log}
    if long_held:
        rec["holdout_long"] = evaluate(draft, long_held, k, batch_size=2)
    if lineage is not None:
        rec.update(lineage)
    if out is not None:
        draft.save(out, rec)
        Path(out, "training.json").write_text(json.dumps(rec, indent=1))
    return rec

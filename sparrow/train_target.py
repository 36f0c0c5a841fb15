"""`sparrow train target`: train the demo Vid-LLM from scratch on the demo task (CPU, resumable)."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .demo.data import Example, make_example
from .demo.model import demo_config
from .demo.text import attribute_index
from .demo.tokenizer import build_tokenizer
from .demo.world import COLOURS, DIRECTIONS, KINDS, NUM_OBJECT_CLASSES, Scene, object_classes
from .processing import VisionSpec, build_batch


@dataclass
class LongVideoStage:
    """A last stage on long, high-resolution videos, started from the first stage's saved fp16 model with a
    fresh optimizer. The first stage's longest videos have 2,048 visual tokens; a target that never saw more
    repeated clauses when captioning 25,600-token videos (README), which cost the drafts accepted tokens."""

    steps: int = 60
    lr: float = 1e-4
    warmup: int = 5
    # every other step is one video of 16,384 or 25,600 visual tokens; the rest keep the short-video mix
    long_every: int = 2
    long_videos: tuple[tuple[int, int], ...] = ((128, 256), (200, 256))
    checkpoint_every: int = 20

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0 or self.long_every < 1 or not self.long_videos:
            raise ValueError(f"long_stage needs steps >= 1, lr > 0, warmup >= 0, long_every >= 1 and long_videos, "
                             f"got {asdict(self)}")

    def config(self, first: "TargetTrainConfig", init: str) -> "TargetTrainConfig":
        """The stage as a run of its own: the probes are off because they are not saved with the model, so
        they would start here from random weights; the binding head's supervision needs no probe."""
        return replace(first, init=init, steps=self.steps, lr=self.lr, warmup=self.warmup, easy_steps=0,
                       copy_steps=0, long_every=self.long_every, long_videos=self.long_videos, aux_weight=0.0,
                       scene_weight=0.0, checkpoint_every=self.checkpoint_every, long_stage=None)


@dataclass
class TargetTrainConfig:
    seed: int = 0
    # A saved target directory to start from (a fine-tune) instead of random weights.
    init: str = ""
    steps: int = 5000
    batch_size: int = 8
    # Batches are small (8 videos, ~2k tokens): at 1e-3 and above the language model grew massive
    # residual activations within a few hundred steps and settled on ignoring the video.
    lr: float = 6e-4
    # Adam steps on the vision tower are scaled up: its gradients are a small, noisy share of the
    # loss (most caption tokens follow from the text prior), and at one shared rate it lagged far
    # behind the language model, which settled on ignoring the video.
    vision_lr_scale: float = 3.0
    # Auxiliary dense supervision of the vision tower (a linear probe per visual token: which
    # shape and colour fills that 16x16 cell), used only during training; the saved model is the
    # plain Qwen2-VL. Without it the tower learned too slowly for the language model to use it.
    aux_weight: float = 0.3
    # Auxiliary supervision of the language model's visual positions (a linear probe on the output of
    # layer `scene_layer`): for every cell a shape covers, that shape's direction (once it has been seen
    # in an earlier temporal patch) and its colour when it appeared. Without it the model read colours
    # per frame but not motion (direction at chance) nor which colour came first: one answer token per
    # video was too thin a signal for 4 layers to learn to compare a shape across time.
    scene_weight: float = 0.3
    scene_layer: int = 3
    # Attention supervision for binding: one query head of layer `bind_layer`, at every position that
    # predicts a word about one shape (a question's answer; a caption's colour, kind, direction, new
    # colour), is trained to put its attention on that shape's cells; the layer reads the states the
    # scene probe supervises. Without it (and without echoed answers) the model answered with another
    # shape's attribute; as a fine-tune alone it taught the head to look at a shape, not to pick it by the
    # asked kind (README). With echo_answers and the copy stage it is part of the recipe that binds.
    bind_weight: float = 0.3
    bind_layer: int = 3
    bind_head: int = 0
    # The question before the video in the prompt (the saved tokenizer's chat template carries the order,
    # so every user of the model builds prompts the same way): each visual token can see which shape is
    # asked and mark itself, making the binding of the asked kind to its cells a per-cell step. Trained
    # from scratch this way the answers were no better (73.5% against 74.0%, README), so it stays off.
    text_first: bool = False
    # Answers to questions about one shape name it first ("square red ."; `questions`): the word that needs
    # the video is then predicted at the kind token, copied from the prompt, instead of a dozen tokens after
    # the prompt's kind word (which got <= 0.01 attention there).
    echo_answers: bool = True
    # Share of examples that ask for one shape by its kind ("describe the square ." -> that shape's
    # clause). The committed model answers a colour question with the same shape's colour whichever
    # kind is asked (it never uses the kind word); here every answer word depends on the asked kind.
    shape_share: float = 0.0
    warmup: int = 200
    weight_decay: float = 0.05
    frames: tuple[int, ...] = (16, 16, 24, 32)  # varied so the model does not tie itself to one length
    # Curriculum: scenes of 1-2 shapes first. From scratch, the model first learns the text prior
    # and only slowly learns to look; with few shapes any visible object answers the question.
    easy_steps: int = 1400
    # The first `tiny_steps` steps use tiny videos (`tiny_video`: frames, side; 4 frames at 32 px are 8
    # visual tokens), so that heads reading the prompt form before the video's hundreds of keys take
    # every head's attention (then a prompt word gets ~0.001 of it, and so almost no gradient).
    tiny_steps: int = 0
    tiny_video: tuple[int, int] = (4, 32)
    # A copy stage: the first `copy_steps` steps train only "describe the X ." on tiny videos of 1-4 shapes
    # with the probes off, so the answer can only come from reading the prompt's kind word. From scratch
    # and in fine-tunes the kind word was otherwise never read (attention <= 0.01 on it); 600 such steps
    # at 6e-4 taught a fine-tune to read it (P(asked kind) 0.996, README).
    copy_steps: int = 600
    side: int = 64
    # Every `long_every`-th step trains on one long or high-resolution video (frames, side) with as many
    # visual tokens as a whole regular batch, so the model meets the shape sizes and token counts of
    # the long-video benchmarks (256 px, thousands of visual tokens) that 64 px clips never show it.
    long_every: int = 4
    long_videos: tuple[tuple[int, int], ...] = ((64, 128), (16, 256))
    checkpoint_every: int = 100
    eval_every: int = 1000
    eval_videos: int = 40
    # run after `steps` in the same command (None: stop after them)
    long_stage: LongVideoStage | None = field(default_factory=LongVideoStage)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not self.frames or any(f < 2 for f in self.frames):
            raise ValueError(f"frames must be a non-empty list of counts >= 2, got {self.frames}")
        if self.long_every < 0 or any(f < 2 or side % 16 for f, side in self.long_videos):
            raise ValueError(f"long_every must be >= 0 and long_videos (frames >= 2, side a multiple of 16), "
                             f"got {self.long_every}, {self.long_videos}")
        if not 0 <= self.shape_share <= 1:
            raise ValueError(f"shape_share must lie in [0, 1], got {self.shape_share}")
        if self.tiny_steps < 0 or self.copy_steps < 0 or self.tiny_video[0] < 2 or self.tiny_video[1] % 16:
            raise ValueError(f"tiny_steps and copy_steps must be >= 0 and tiny_video (frames >= 2, side a multiple "
                             f"of 16), got {self.tiny_steps}, {self.copy_steps}, {self.tiny_video}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.bind_weight < 0 or self.bind_layer < 0 or self.bind_head < 0:
            raise ValueError(f"bind_weight, bind_layer and bind_head must be >= 0, got "
                             f"{self.bind_weight}, {self.bind_layer}, {self.bind_head}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TargetTrainConfig":
        d = _settings(cls, d, "target training")
        if "frames" in d:
            d["frames"] = tuple(d["frames"])
        if "tiny_video" in d:
            d["tiny_video"] = tuple(d["tiny_video"])
        if d.get("long_stage") is not None:
            d["long_stage"] = LongVideoStage(**_settings(LongVideoStage, d["long_stage"], "long_stage"))
        return cls(**d)


def _settings(cls, d: dict, what: str) -> dict:
    """JSON settings of a config dataclass: unknown names refused, `long_videos` back to the tuples it holds."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} setting(s): {', '.join(sorted(unknown))}")
    d = dict(d)
    if "long_videos" in d:
        d["long_videos"] = tuple(tuple(v) for v in d["long_videos"])
    return d


def _example_seed(cfg: TargetTrainConfig, step: int, j: int) -> int:
    """Deterministic per (seed, step, slot), below 1e9 so evaluation seeds never collide."""
    return int(np.random.default_rng([cfg.seed, step, j]).integers(0, 1_000_000_000))


def cell_targets(scene: Scene, num_frames: int, side: int, spec: VisionSpec) -> np.ndarray:
    """Object class per visual token, in the vision tower's token order: `[T' * side/c * side/c]`.

    A cell is labelled with the shape covering most of it (at least a fifth) in the first frame of
    its temporal patch, else background (0).
    """
    c = spec.cell
    cls = object_classes(scene, num_frames, side, side, range(0, num_frames, spec.temporal_patch_size))  # [T', H, W]
    t, n = cls.shape[0], side // c
    cells = cls.reshape(t, n, c, n, c).transpose(0, 1, 3, 2, 4).reshape(t * n * n, c * c)
    counts = np.zeros((t * n * n, NUM_OBJECT_CLASSES), dtype=np.int64)  # [T' * n * n, classes] pixels per class
    np.add.at(counts, (np.arange(t * n * n)[:, None], cells), 1)
    counts[:, 0] = 0
    # argmax takes the lowest class among equal counts; a cell with no shape pixel fails the fifth
    label = np.where(counts.max(axis=1) * 5 >= c * c, counts.argmax(axis=1), 0)
    return label.astype(np.int64)


IGNORE = -100


def kind_cells(classes: np.ndarray, kind: str) -> np.ndarray:
    """Where a shape of this kind is, from object classes (1 + kind * 8 + colour; 0 background)."""
    return (classes > 0) & ((classes - 1) // len(COLOURS) == KINDS.index(kind))


def scene_targets(scene: Scene, cells: np.ndarray, temporal_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """Per visual token (labels from `cell_targets`): the covering shape's direction and first colour.

    Direction is labelled only after the shape's first temporal patch, since causal attention has
    nothing earlier to compare with there. Cells of no shape are IGNORE.
    """
    t = cells.reshape(temporal_patches, -1)  # [T', h * w]
    direction = np.full(t.shape, IGNORE, dtype=np.int64)
    colour = np.full(t.shape, IGNORE, dtype=np.int64)
    by_kind = {s.kind: s for s in scene.shapes}
    for kind in KINDS:
        on = kind_cells(t, kind)  # [T', h * w]
        if not on.any():
            continue
        shape = by_kind[kind]
        colour[on] = list(COLOURS).index(shape.colour)
        later = on & (np.arange(len(t))[:, None] > np.argmax(on.any(axis=1)))
        direction[later] = list(DIRECTIONS).index(shape.direction)
    return direction.reshape(-1), colour.reshape(-1)


# Which cells a word about one shape is read from: the colour it appears in and its kind from the cells
# showing that colour, its final colour from those showing that one, its direction from all of them.
_CAPTION_SPANS = {"a": "appear", "moves": "all", "turns": "end"}  # keyed by the word before
_QUESTION_SPANS = {"colour_appear": "appear", "colour_end": "end", "direction": "all"}


def bind_targets(ex: Example, cells: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(answer word index, visual-token indices) pairs: which cells the prediction of that word reads.

    A shape's colour is read from the cells that show it, not from one frame: with causal attention a
    cell cannot know it is a shape's last, but every cell after a colour change shows the final one.
    Words whose cells are empty get no pair.
    """
    spans, names = {}, list(COLOURS)
    colour = (cells - 1) % len(COLOURS)  # [T' * h * w], meaningful where a shape is
    for shape in ex.scene.shapes:
        on = kind_cells(cells, shape.kind)  # [T' * h * w]
        if on.any():
            spans[shape.kind] = {"appear": np.flatnonzero(on & (colour == names.index(shape.colour))),
                                 "end": np.flatnonzero(on & (colour == names.index(shape.final_colour))),
                                 "all": np.flatnonzero(on)}
    if ex.kind == "caption":
        words, clause, wanted = ex.answer.split(), 0, []  # (word index, shape kind, span)
        for i, word in enumerate(words):
            span = "appear" if word in KINDS else _CAPTION_SPANS.get(words[i - 1]) if i else None
            if span:
                wanted.append((i, ex.scene.shapes[clause].kind, span))
            clause += word == "."
    else:
        wanted = [(attribute_index(ex.answer), ex.shape, _QUESTION_SPANS[ex.kind])] if ex.kind in _QUESTION_SPANS else []
    return [(i, spans[kind][span]) for i, kind, span in wanted if kind in spans and len(spans[kind][span])]


def _probe_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled rows; zero (not NaN) when a batch has none, as tiny or
    single-temporal-patch videos can (no cell has seen its shape move yet)."""
    if not bool((target != IGNORE).any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)


def _batch(cfg: TargetTrainConfig, tokenizer, spec: VisionSpec, step: int) -> tuple[dict, list[torch.Tensor]]:
    rng = np.random.default_rng([cfg.seed, step, 10_000])
    frames, side, videos = int(rng.choice(cfg.frames)), cfg.side, cfg.batch_size
    copying = step < cfg.copy_steps
    if copying or step < cfg.tiny_steps:
        frames, side = cfg.tiny_video
    elif cfg.long_videos and cfg.long_every and step >= cfg.easy_steps and step % cfg.long_every == 0:
        frames, side = cfg.long_videos[int(rng.integers(len(cfg.long_videos)))]
        videos = 1
    items, cells, directions, colours, binds = [], [], [], [], []
    for j in range(videos):
        n_shapes = int(rng.integers(1, 3)) if step < cfg.easy_steps and not copying else None
        # no draw when off, so the committed recipe's stream of curriculum shape counts stays as it was
        task = "shape" if copying or (cfg.shape_share and rng.random() < cfg.shape_share) else "mixed"
        ex = make_example(_example_seed(cfg, step, j), task, num_frames=frames, side=side, n_shapes=n_shapes,
                          echo=cfg.echo_answers)
        items.append((ex.frames, ex.prompt, ex.answer))
        cells.append(cell_targets(ex.scene, frames, side, spec))
        d, c = scene_targets(ex.scene, cells[-1], -(-frames // spec.temporal_patch_size))
        directions.append(d)
        colours.append(c)
        binds.append(bind_targets(ex, cells[-1]) if cfg.bind_weight else [])
    labels = [torch.from_numpy(np.concatenate(x)) for x in (cells, directions, colours)]  # each [N_visual]
    return build_batch(tokenizer, spec, items), labels + [binds]


class AttentionInputs:
    """What one decoder layer's attention module was last called with (a forward pre-hook)."""

    def __init__(self, attn: torch.nn.Module):
        self.attn, self.hidden, self.rope = attn, None, None
        attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self.hidden, self.rope = kwargs["hidden_states"], kwargs["position_embeddings"]

    def bind_loss(self, head: int, batch: dict, binds: list, video_token_id: int) -> torch.Tensor:
        """-log(the attention mass `head` puts on a word's cells), averaged per example, then over examples.

        Per example first, so that a question's one answer weighs as much as a caption's dozen words: a
        caption names its shapes in order of appearance, a question by kind, and it is the kind that
        the model failed to bind.

        Recomputes the one head's attention rows from the captured inputs, exactly as the layer does
        (projections, M-RoPE, causal softmax), so the gradient reaches the model's own weights.
        """
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        attn, (cos, sin) = self.attn, self.rope  # cos, sin: [B, S, D]
        d, kv_head = attn.head_dim, head // attn.num_key_value_groups
        losses = []
        for b, pairs in enumerate(binds):
            if not pairs:
                continue
            answer = int((batch["labels"][b] != IGNORE).nonzero()[0])
            video = int((batch["input_ids"][b] == video_token_id).nonzero()[0])
            rows = torch.tensor([answer + i - 1 for i, _ in pairs])  # [R] positions predicting the words
            n = int(rows.max()) + 1
            q = attn.q_proj(self.hidden[b, rows]).view(len(rows), -1, d)[:, head]  # [R, D]
            q = q * cos[b, rows] + rotate_half(q) * sin[b, rows]
            k = attn.k_proj(self.hidden[b, :n]).view(n, -1, d)[:, kv_head]  # [n, D]
            k = k * cos[b, :n] + rotate_half(k) * sin[b, :n]
            logits = (q @ k.T) * attn.scaling  # [R, n]
            logits = logits.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
            on = torch.zeros(len(rows), n, dtype=torch.bool)  # [R, n]
            for r, (_, cells) in enumerate(pairs):
                on[r, video + torch.from_numpy(cells)] = True
            losses.append((logits.logsumexp(-1) - logits.masked_fill(~on, float("-inf")).logsumexp(-1)).mean())
        return torch.stack(losses).mean() if losses else torch.zeros(())


def _prefetch(cfg, tokenizer, spec, start: int, q: queue.Queue):
    # PyAV and numpy release the GIL, so rendering the next batch overlaps the training step
    for step in range(start, cfg.steps):
        q.put((step, _batch(cfg, tokenizer, spec, step)))


def _lr(cfg: TargetTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_target(cfg: TargetTrainConfig, work_dir: str | Path, out_dir: str | Path) -> dict:
    """Train the first stage, then the long-video stage if the recipe has one; resumable from work_dir.

    The first stage's model is saved to `work_dir/stage1` (fp16, as any output) and the long-video stage
    starts from it, checkpointing to `work_dir/long_stage`: one command, the same steps as two.
    """
    if cfg.long_stage is None:
        return _train_stage(cfg, work_dir, out_dir)
    first, first_out = replace(cfg, long_stage=None), Path(work_dir) / "stage1"
    first_rec = _train_stage(first, work_dir, first_out)  # a finished stage only re-saves
    last_rec = _train_stage(cfg.long_stage.config(first, str(first_out)), Path(work_dir) / "long_stage", out_dir,
                            desc="train target, long videos")
    seconds = round(first_rec["train_seconds"] + last_rec["train_seconds"], 1)
    record = {"config": cfg.to_json(), "train_seconds": seconds, "final_loss": last_rec["final_loss"],
              "stages": [first_rec, last_rec]}
    (Path(out_dir) / "training.json").write_text(json.dumps(record, indent=1))
    return record


def _train_stage(cfg: TargetTrainConfig, work_dir: str | Path, out_dir: str | Path, desc: str = "train target") -> dict:
    """Train, checkpointing to work_dir (resumed if present); save the fp16 model to out_dir."""
    from transformers import Qwen2VLForConditionalGeneration

    from .evaluate import eval_target

    work_dir, out_dir = Path(work_dir), Path(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.text_first)
    if cfg.init:
        model = Qwen2VLForConditionalGeneration.from_pretrained(cfg.init, dtype=torch.float32)
    else:
        model = Qwen2VLForConditionalGeneration(demo_config(tokenizer))
    spec = VisionSpec.from_config(model.config.vision_config)
    hidden = model.config.text_config.hidden_size
    probe = torch.nn.Linear(hidden, NUM_OBJECT_CLASSES)
    # with binding supervision the probe also reads each cell's kind: the keys the bound head matches
    scene_probe = torch.nn.Linear(hidden, len(DIRECTIONS) + len(COLOURS) + (len(KINDS) if cfg.bind_weight else 0))
    bind_attn = model.model.language_model.layers[cfg.bind_layer].self_attn
    bind_inputs = AttentionInputs(bind_attn) if cfg.bind_weight else None
    vision = [p for n, p in model.named_parameters() if n.startswith("model.visual.")] + list(probe.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    rest += list(scene_probe.parameters())
    opt = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": vision, "scale": cfg.vision_lr_scale}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    ckpt = work_dir / "checkpoint.pt"
    start, history, elapsed = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != cfg.to_json():
            raise ValueError(f"{ckpt} was written with a different config; use another --work-dir")
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        scene_probe.load_state_dict(state["scene_probe"])
        opt.load_state_dict(state["opt"])
        start, history, elapsed = state["step"], state["history"], state["elapsed"]
        print(f"resuming from step {start}")

    q: queue.Queue = queue.Queue(maxsize=2)
    threading.Thread(target=_prefetch, args=(cfg, tokenizer, spec, start, q), daemon=True).start()
    model.train()
    t0 = time.time() - elapsed
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    for step in bar:
        got, (batch, (cells, directions, colours, binds)) = q.get()
        assert got == step
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step) * g["scale"]
        pixels = batch.pop("pixel_values_videos")
        video = model.model.get_video_features(pixels, batch["video_grid_thw"], return_dict=True)
        aux = torch.nn.functional.cross_entropy(probe(torch.cat(video.pooler_output)), cells)
        out = model(**batch, mm_encoder_outputs={"video": video}, output_hidden_states=True)
        lm_loss = out.loss
        visual = out.hidden_states[cfg.scene_layer][batch["input_ids"] == model.config.video_token_id]  # [N_visual, H]
        d, c = len(DIRECTIONS), len(COLOURS)
        scene_logits = scene_probe(visual)  # [N_visual, 4 + 8 (+ 4)]
        scene = _probe_ce(scene_logits[:, :d], directions) + _probe_ce(scene_logits[:, d:d + c], colours)
        if cfg.bind_weight:
            kinds = torch.where(cells > 0, (cells - 1) // c, IGNORE)  # [N_visual]
            scene = scene + _probe_ce(scene_logits[:, d + c:], kinds)
        bind = (bind_inputs.bind_loss(cfg.bind_head, batch, binds, model.config.video_token_id)
                if bind_inputs else torch.zeros(()))
        probes = 0.0 if step < cfg.copy_steps else 1.0
        loss = lm_loss + probes * (cfg.aux_weight * aux + cfg.scene_weight * scene + cfg.bind_weight * bind)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(round(lm_loss.item(), 4))
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}", aux=f"{aux.item():.3f}", scene=f"{scene.item():.3f}",
                        bind=f"{bind.item():.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            res = eval_target(model, tokenizer, videos=cfg.eval_videos, seed=1, progress=False, echo=cfg.echo_answers)
            tqdm.write(f"step {done}: accuracy {res.accuracy:.3f} blank {res.blank_accuracy:.3f} {res.by_kind}")
            model.train()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            torch.save({"model": model.state_dict(), "probe": probe.state_dict(),
                        "scene_probe": scene_probe.state_dict(), "opt": opt.state_dict(), "step": done,
                        "history": history, "elapsed": time.time() - t0, "config": cfg.to_json()}, ckpt)

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    # from_pretrained(dtype=...) of an --init stamps its dtype on the sub-configs too; say what is saved
    for sub in (model.config.text_config, model.config.vision_config):
        sub.dtype = torch.float16
    model.to(torch.float16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"config": cfg.to_json(), "train_seconds": round(time.time() - t0, 1),
              "final_loss": float(np.mean(history[-50:])), "loss_every_100": history[::100]}
    (out_dir / "training.json").write_text(json.dumps(record, indent=1))
    return record

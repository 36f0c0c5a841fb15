"""Frames and prompt -> model inputs, in the exact layout Hugging Face's Qwen2-VL processor produces.

The processor classes of transformers pull in torchvision for video; this module does the same
arithmetic with torch alone, so a server's preprocessing step stays light. A test holds it against
transformers' own image processor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    """How frames become patches for a Qwen2-VL-style vision tower."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"VisionSpec.{name} must be positive, got {getattr(self, name)}")

    @property
    def cell(self) -> int:
        """Pixels per side of the area one visual token covers."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(cls, vision_config, preprocessor: dict | None = None) -> "VisionSpec":
        pre = preprocessor or {}
        return cls(patch_size=int(vision_config.patch_size),
                   temporal_patch_size=int(vision_config.temporal_patch_size),
                   merge_size=int(vision_config.spatial_merge_size),
                   mean=tuple(pre.get("image_mean", CLIP_MEAN)),
                   std=tuple(pre.get("image_std", CLIP_STD)))

    @classmethod
    def from_model_dir(cls, path) -> "VisionSpec":
        """From a Hugging Face directory's config.json (+ preprocessor_config.json), without loading the model
        (Triton's preprocessing patchifies in a process that holds no weights)."""
        import json
        from pathlib import Path
        from types import SimpleNamespace

        path = Path(path)
        vision = json.loads((path / "config.json").read_text())["vision_config"]
        pre = path / "preprocessor_config.json"
        return cls.from_config(SimpleNamespace(**vision), json.loads(pre.read_text()) if pre.is_file() else None)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class VideoPatches:
    pixel_values: torch.Tensor  # [grid_t * grid_h * grid_w, 3 * temporal_patch * patch * patch]
    grid_thw: torch.Tensor  # [3] long: temporal, height, width patch counts
    num_tokens: int = field(default=0)  # visual tokens after the spatial merge


def fit_size(height: int, width: int, spec: VisionSpec) -> tuple[int, int]:
    """Nearest size (at least one cell) whose sides are multiples of the cell."""
    c = spec.cell
    return max(c, round(height / c) * c), max(c, round(width / c) * c)


def patchify(frames: np.ndarray, spec: VisionSpec) -> VideoPatches:
    """uint8 frames `[N, H, W, 3]` (H, W multiples of the cell) -> flattened patches as HF lays them out."""
    n, h, w, c = frames.shape
    if h % spec.cell or w % spec.cell:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {spec.cell}; resize with fit_size first")
    tp, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    # numpy, single-threaded: training patchifies in a data thread, where torch's ops would start a
    # second set of worker threads beside the training step's own (the float32 arithmetic is the same)
    x = frames.astype(np.float32) / np.float32(255.0)  # [N, H, W, 3]
    x = ((x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)).transpose(0, 3, 1, 2)  # [N, 3, H, W]
    if n % tp:  # pad time by repeating the last frame, as the HF processor does
        x = np.concatenate([x, np.repeat(x[-1:], tp - n % tp, axis=0)], axis=0)
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, tp, p, p]
    pixel_values = torch.from_numpy(np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)))
    return VideoPatches(pixel_values, torch.tensor([gt, gh, gw], dtype=torch.long),
                        num_tokens=gt * gh * gw // (m * m))


def video_patches(frames: np.ndarray, spec: VisionSpec) -> VideoPatches:
    """uint8 frames `[N, H, W, 3]` of any size -> patches, resized to the nearest whole cells first."""
    from .video import resize

    h, w = fit_size(frames.shape[1], frames.shape[2], spec)
    return patchify(resize(frames, (h, w)), spec)


def prompt_ids(tokenizer, prompt: str, num_video_tokens: int, video_token_id: int | None = None) -> list[int]:
    """Chat-template a one-video user turn and expand the video placeholder to its token count."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>") if video_token_id is None else video_token_id
    if ids.count(video) != 1:
        raise ValueError("the chat template must place exactly one video placeholder")
    at = ids.index(video)
    return ids[:at] + [video] * num_video_tokens + ids[at + 1:]


def build_batch(tokenizer, spec: VisionSpec, items: list[tuple[np.ndarray, str, str | None]]) -> dict:
    """Right-padded Qwen2-VL model inputs for (frames, prompt, answer-or-None) items.

    With answers, `labels` supervise the answer and the closing <|im_end|> only.
    """
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs, labels, pixels, grids = [], [], [], []
    for frames, prompt, answer in items:
        frames = np.asarray(frames)
        h, w = fit_size(frames.shape[1], frames.shape[2], spec)
        if (h, w) != frames.shape[1:3]:
            from .video import resize
            frames = resize(frames, (h, w))
        patches = patchify(frames, spec)
        ids = prompt_ids(tokenizer, prompt, patches.num_tokens)
        lab = [-100] * len(ids)
        if answer is not None:
            ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
            ids, lab = ids + ans, lab + ans
        seqs.append(ids)
        labels.append(lab)
        pixels.append(patches.pixel_values)
        grids.append(patches.grid_thw)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [B, T]
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "mm_token_type_ids": (input_ids == video_id).int() * 2,  # 0 text, 2 video (HF's convention)
        "pixel_values_videos": torch.cat(pixels),
        "video_grid_thw": torch.stack(grids),  # [B, 3]
    }
    if any(a is not None for _, _, a in items):
        out["labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return out

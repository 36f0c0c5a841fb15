"""Target adapter: a local Hugging Face Vid-LLM (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) behind one interface.

prefill(video + prompt) -> state; step(state, new tokens, optional tree mask) -> logits and hidden
states of chosen layers; truncate(state, length) drops rejected speculative tokens. Batch size 1:
this is the reference path on the stock HF cache (the owned-cache runtime is `runtime.py`'s job).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .processing import VisionSpec, prompt_ids, video_patches
from .video import resize

ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


class TargetError(ValueError):
    """The model directory or the request does not fit the target."""


@dataclass
class Prompt:
    """A video + prompt turned into model inputs."""

    input_ids: torch.Tensor  # [1, T]
    visual_mask: torch.Tensor  # [T] bool, True at visual-token positions
    model_inputs: dict  # what the HF forward needs besides ids (pixels, grids, token types)
    # [M, H] the vision encoder's output when it ran elsewhere (Triton's vision_encoder model); None: the
    # target runs its own vision tower on model_inputs' pixels
    visual_embeds: torch.Tensor | None = None


@dataclass
class TargetState:
    cache: object  # transformers DynamicCache
    length: int  # tokens in the cache
    pos_delta: int  # rotary position of cache slot i (i >= prompt length) is i + pos_delta
    prompt_length: int


@dataclass
class StepOutput:
    logits: torch.Tensor  # [1, T, V]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, T, H]


class Target:
    def __init__(self, model, tokenizer, preprocessor: dict | None = None, max_frames: int = 1024):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.arch = model.config.model_type
        if self.arch not in ARCHITECTURES:
            raise TargetError(f"unsupported architecture {self.arch!r}; supported: {sorted(ARCHITECTURES)}")
        self.preprocessor = preprocessor or {}
        self.max_frames = max_frames
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        self.video_token_id = model.config.video_token_id
        eos = getattr(model.generation_config, "eos_token_id", None) or text.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        if self.arch != "llava_onevision":
            self.spec = VisionSpec.from_config(model.config.vision_config, self.preprocessor)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "Target":
        import transformers

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise TargetError(f"{path} is not a Hugging Face model directory (no config.json)")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type not in ARCHITECTURES:
            raise TargetError(f"{path}: unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
        model = getattr(transformers, ARCHITECTURES[model_type]).from_pretrained(path, dtype=dtype).to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        return cls(model, tokenizer, pre)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- inputs -------------------------------------------------------------------------------
    def prepare(self, frames: np.ndarray, prompt: str) -> Prompt:
        if not isinstance(prompt, str) or not prompt.strip():
            raise TargetError("prompt is empty")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise TargetError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if len(frames) > self.max_frames:
            raise TargetError(f"too many frames: {len(frames)} > {self.max_frames}")
        if self.arch == "llava_onevision":
            pixels, n_visual = self._llava_pixels(frames)
            inputs = {"pixel_values_videos": pixels}
        else:
            patches = video_patches(frames, self.spec)
            inputs = {"pixel_values_videos": patches.pixel_values, "video_grid_thw": patches.grid_thw[None]}
            n_visual = patches.num_tokens
        return self._prompt(prompt, n_visual, inputs)

    def prepare_embedded(self, prompt: str, visual_embeds: torch.Tensor, grid_thw: torch.Tensor) -> Prompt:
        """A prompt whose vision encoder already ran: its embeddings `[M, H]` and the video's patch grid `[3]`
        (t, h, w) from `sparrow.processing.video_patches` (Qwen2-VL family; positions need the grid)."""
        if self.arch == "llava_onevision":
            raise TargetError("precomputed visual embeddings are supported for Qwen2-VL / Qwen2.5-VL targets")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TargetError("prompt is empty")
        grid = torch.as_tensor(grid_thw, dtype=torch.long).reshape(1, 3)  # [1, 3]
        n_visual = int(grid.prod()) // self.spec.merge_size ** 2
        if visual_embeds.ndim != 2 or visual_embeds.shape != (n_visual, self.hidden_size):
            raise TargetError(f"visual embeddings must be [{n_visual}, {self.hidden_size}] for grid "
                              f"{grid[0].tolist()}, got {list(visual_embeds.shape)}")
        p = self._prompt(prompt, n_visual, {"video_grid_thw": grid})
        p.visual_embeds = visual_embeds.to(self.device, self.model.dtype)
        return p

    def _prompt(self, prompt: str, n_visual: int, inputs: dict) -> Prompt:
        ids = torch.tensor([prompt_ids(self.tokenizer, prompt, n_visual, self.video_token_id)])  # [1, T]
        visual = ids[0] == self.video_token_id  # [T]
        if self.arch != "llava_onevision":
            inputs["mm_token_type_ids"] = visual[None].int() * 2  # [1, T]: 0 text, 2 video
        return Prompt(ids, visual, {k: v.to(self.device) for k, v in inputs.items()})

    def prompt_visual_features(self, prompt: Prompt) -> torch.Tensor:
        """The prompt's visual embeddings `[M, H]`, one per placeholder: the ones it carries (vision encoder run
        elsewhere) or the vision tower's on its pixels."""
        feats = prompt.visual_embeds
        if feats is None:
            feats = self.visual_features(prompt.model_inputs)  # [M, H]
        if feats.shape[0] != int(prompt.visual_mask.sum()):
            raise TargetError(f"{feats.shape[0]} visual features for {int(prompt.visual_mask.sum())} placeholders")
        return feats

    def visual_features(self, inputs: dict) -> torch.Tensor:
        """The vision tower on a prompt's pixels -> visual embeddings `[M, H]`, one row per placeholder."""
        model = self.model
        if self.arch == "llava_onevision":
            cfg = model.config
            feats = model.model.get_video_features(
                inputs["pixel_values_videos"], vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
        else:
            feats = torch.cat(model.model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
        return feats.reshape(-1, self.hidden_size)

    def _llava_pixels(self, frames: np.ndarray) -> tuple[torch.Tensor, int]:
        vc = self.model.config.vision_config
        s = vc.image_size
        mean = torch.tensor(self.preprocessor.get("image_mean", (0.5, 0.5, 0.5)))
        std = torch.tensor(self.preprocessor.get("image_std", (0.5, 0.5, 0.5)))
        x = torch.from_numpy(resize(frames, (s, s))).float().div(255.0)  # [N, S, S, 3]
        x = ((x - mean) / std).permute(0, 3, 1, 2)[None]  # [1, N, 3, S, S]
        side = math.ceil(s // vc.patch_size / 2)  # features are 2x2-pooled per frame
        return x.to(self.model.dtype), len(frames) * side * side + 1  # + the trailing newline token

    # ---- forward ------------------------------------------------------------------------------
    def positions(self, prompt: Prompt) -> tuple[torch.Tensor, int]:
        """Rotary positions of the prompt (`[3, 1, T]` M-RoPE, or `[1, T]`) and the decode offset.

        Tokens appended after the prompt continue from its last (text) position, exactly as an
        uncached forward over prompt + new tokens places them; cache slot i sits at i + offset.
        (transformers' `rope_deltas` can disagree with that when a video has more temporal
        patches than spatial ones, so the offset is taken from the positions themselves.)
        """
        ids = prompt.input_ids.to(self.device)
        if self.arch == "llava_onevision":
            return torch.arange(ids.shape[1], device=ids.device)[None], 0
        inputs = prompt.model_inputs
        pos, _ = self.model.model.get_rope_index(ids, inputs["mm_token_type_ids"],
                                                 video_grid_thw=inputs["video_grid_thw"])  # [3, 1, T]
        return pos, int(pos[0, 0, -1]) + 1 - ids.shape[1]

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, layers: tuple[int, ...] = ()) -> tuple[TargetState, StepOutput]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = prompt.input_ids.to(self.device)
        positions, delta = self.positions(prompt)
        extra = {}
        if prompt.visual_embeds is not None:  # transformers inserts precomputed encoder outputs as its own
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            extra["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=[prompt.visual_embeds])}
        out = self.model(input_ids=ids, cache=cache, use_cache=True, output_hidden_states=bool(layers),
                         position_ids=positions, **prompt.model_inputs, **extra)
        state = TargetState(cache=cache, length=ids.shape[1], pos_delta=delta, prompt_length=ids.shape[1])
        return state, self._output(out, layers)

    @torch.inference_mode()
    def step(self, state: TargetState, tokens: torch.Tensor, tree_mask: torch.Tensor | None = None,
             depths: torch.Tensor | None = None, layers: tuple[int, ...] = ()) -> StepOutput:
        """Run T new tokens `[1, T]` after the cache.

        Without tree_mask the tokens are a causal chain. With tree_mask `[T, T]` (bool, True = may
        attend) each token sees the whole cache plus the tree tokens the mask allows, at rotary
        position cache length + depths[i].
        """
        tokens = tokens.to(self.device)
        t = tokens.shape[1]
        if depths is None:
            depths = torch.arange(t)
        pos = (state.length + state.pos_delta + depths.to(self.device)).view(1, 1, t)  # [1, 1, T]
        kwargs = {}
        if tree_mask is not None:
            if tree_mask.shape != (t, t):
                raise TargetError(f"tree_mask must be [{t}, {t}], got {list(tree_mask.shape)}")
            past = torch.ones(t, state.length, dtype=torch.bool, device=self.device)
            kwargs["attention_mask"] = torch.cat([past, tree_mask.to(self.device)], dim=1)[None, None]
        if self.arch == "llava_onevision":
            kwargs["position_ids"] = pos[0]  # [1, T]
        else:
            kwargs["position_ids"] = pos.expand(3, 1, t)  # [3, 1, T]: text tokens share one position
        out = self.model(input_ids=tokens, cache=state.cache, use_cache=True,
                         output_hidden_states=bool(layers), **kwargs)
        state.length += t
        return self._output(out, layers)

    def truncate(self, state: TargetState, length: int) -> None:
        """Drop cached tokens past `length` (rejected speculative tokens)."""
        if not state.prompt_length <= length <= state.length:
            raise TargetError(f"cannot truncate to {length}: cache holds {state.length}, "
                              f"prompt is {state.prompt_length}")
        if length < state.length:
            state.cache.crop(length - state.length)  # transformers 5 takes the negative count
        state.length = length

    def _output(self, out, layers: tuple[int, ...]) -> StepOutput:
        hidden = {}
        if layers:
            hs = out.hidden_states  # embeddings, then one entry per decoder layer
            for layer in layers:
                if not 0 <= layer <= self.num_layers:
                    raise TargetError(f"layer {layer} out of range 0..{self.num_layers}")
                hidden[layer] = hs[layer]
        return StepOutput(out.logits, hidden)

"""The Sparrow draft: one EAGLE-3-style decoder layer over the target's own hidden states.

Input at each draft position: the embedding of a token and a feature vector, either the fusion of
the target's low/middle/high hidden states (the first draft step) or the draft's own previous
output (later steps). Its attention (VATA) reads

- the text anchors: the target's fused hidden states at the last W *text* positions, turned into
  keys/values by the draft's own projections (hidden-state reuse: nothing is recomputed through
  the target, and visual positions never enter the window);
- IVSB glimpses: a fixed number of vectors pooled from the target's intermediate-layer states of
  the visual tokens, computed once per video;
- its own speculative tokens, under a chain or token-tree mask.

So a draft step costs the same at 1k and at 25k visual tokens. `attend="prefix"` is the EAGLE
baseline with the same weights' shape: every prefix position, visual ones included, is an anchor.
Embedding and LM head are the target's, shared and frozen.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import multi_token_attention

ATTEND_MODES = ("window", "prefix")
STEP_BACKENDS = ("auto", "torch", "cpp")
# Rows up to which context_rows_kv uses the fused op: a round's accepted tokens and the glimpses re-rotated
# with them (16 glimpses + up to K + 1 rows; at 16 the 16-glimpse draft always fell back to `kv`).
FUSED_KV_ROWS = 32


def step_backend(weight: torch.Tensor) -> str:
    """"cpp" (the fused `sparrow::draft_step` op) or "torch" (the layer, attending through the context's op).

    `SPARROW_DRAFT=torch|cpp` forces one (cpp raises if the op cannot be built); by default float32
    CPU drafts use the C++ op where it builds.
    """
    choice = os.environ.get("SPARROW_DRAFT", "").strip().lower() or "auto"
    if choice not in STEP_BACKENDS:
        raise ValueError(f"SPARROW_DRAFT must be one of {', '.join(STEP_BACKENDS)}, got {choice!r}")
    if choice != "auto":
        return choice
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "torch"
    from . import attention_cpp

    return "cpp" if attention_cpp.available() else "torch"


@dataclass
class DraftConfig:
    hidden_size: int = 256
    vocab_size: int = 62
    feature_layers: tuple[int, int, int] = (1, 2, 4)  # target hidden_states indices (0 = embeddings)
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    attend: str = "window"  # "window": Sparrow (VATA); "prefix": EAGLE, all positions incl. visual
    window: int = 64  # W text anchors
    glimpses: int = 16  # IVSB glimpse vectors; 0 disables bridging
    glimpse_layer: int = 2  # target hidden_states index the glimpses are pooled from
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        self.feature_layers = tuple(int(x) for x in self.feature_layers)
        if len(self.feature_layers) != 3:
            raise ValueError(f"feature_layers must name 3 target layers (low, mid, high), got {self.feature_layers}")
        if self.attend not in ATTEND_MODES:
            raise ValueError(f"attend must be one of {ATTEND_MODES}, got {self.attend!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide into num_heads, and num_heads into num_kv_heads groups")
        if self.window < 1 or self.glimpses < 0:
            raise ValueError(f"window must be >= 1 and glimpses >= 0, got {self.window}, {self.glimpses}")
        if self.attend == "prefix" and self.glimpses:
            raise ValueError("the prefix (EAGLE) draft sees every visual token already; set glimpses=0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def target_layers(self) -> tuple[int, ...]:
        """Every target hidden-state index the draft reads."""
        extra = (self.glimpse_layer,) if self.glimpses else ()
        return tuple(sorted(set(self.feature_layers + extra)))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DraftConfig":
        return cls(**d)


def _exact_half(w: torch.Tensor) -> torch.Tensor:
    """A float16 copy of float32 `w` if it holds every value exactly, else `w` (detached)."""
    w = w.detach()
    if w.dtype != torch.float32:
        return w
    h = w.to(torch.float16)
    return h if torch.equal(h.to(torch.float32), w) else w


@functools.lru_cache(maxsize=8)
def _inv_freq(d: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # [D/2]


def rope_angles(positions: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[..., T, D]` for positions `[..., T]` (rotate-half layout)."""
    ang = positions.to(torch.float32)[..., None] * _inv_freq(d, theta).to(positions.device)  # [..., T, D/2]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half). x `[..., T, D]`, positions broadcastable to `[..., T]`."""
    return apply_rope(x, *rope_angles(positions, x.shape[-1], theta))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Draft(nn.Module):
    def __init__(self, cfg: DraftConfig, embed: torch.Tensor, lm_head: torch.Tensor, final_norm: nn.Module):
        """embed / lm_head `[V, H]`: the target's weights, shared and frozen; final_norm: the target's."""
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.register_buffer("embed", embed.detach(), persistent=False)
        self.register_buffer("head", lm_head.detach(), persistent=False)
        self.final_norm = final_norm.requires_grad_(False)
        self.fuse = nn.Linear(3 * h, h, bias=False)  # low/mid/high target states -> one feature
        self.inp = nn.Linear(2 * h, h, bias=False)  # [token embedding; feature] -> residual stream
        self.glimpse_proj = nn.Linear(h, h, bias=False) if cfg.glimpses else None
        self.ln_attn = RMSNorm(h, cfg.rms_norm_eps)
        self.ln_mlp = RMSNorm(h, cfg.rms_norm_eps)
        self.q = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.gate = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)

    @classmethod
    def for_target(cls, cfg: DraftConfig, target_model) -> "Draft":
        lm = target_model.model.language_model
        text = target_model.config.text_config
        if cfg.hidden_size != text.hidden_size or cfg.vocab_size != text.vocab_size:
            raise ValueError(f"draft config (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}) does not match the "
                             f"target (hidden {text.hidden_size}, vocab {text.vocab_size})")
        top = max(cfg.target_layers)
        if top > text.num_hidden_layers:
            raise ValueError(f"draft reads target layer {top}; the target has {text.num_hidden_layers}")
        return cls(cfg, lm.embed_tokens.weight, target_model.lm_head.weight, lm.norm)

    # ---- pieces shared by inference and training ------------------------------------------------
    def features(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """Fuse the target's low/mid/high states `[..., T, H]` each -> `[..., T, H]`."""
        return self.fuse(torch.cat([hidden[i].to(self.fuse.weight.dtype) for i in self.cfg.feature_layers], -1))

    def _heads(self, proj: nn.Linear, n: torch.Tensor) -> torch.Tensor:
        b, t, _ = n.shape
        return proj(n).view(b, t, -1, self.cfg.head_dim).transpose(1, 2)  # [B, heads, T, D]

    def kv(self, x: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of residual-stream vectors x `[B, T, H]` -> `[B, Hkv, T, D]` each (rotated if positioned)."""
        n = self.ln_attn(x)
        k, v = self._heads(self.k, n), self._heads(self.v, n)
        if positions is not None:
            k = rotate(k, positions[:, None], self.cfg.rope_theta)
        return k, v

    def context_rows_kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv` of the few rows a draft context takes in each round (x `[1, T, H]` at positions `[1, T]`),
        at inference: the fused `sparrow::draft_kv` op where the draft step runs in C++, else `kv`."""
        if x.shape[1] > FUSED_KV_ROWS or step_backend(self.fuse.weight) != "cpp" or torch.is_grad_enabled():
            return self.kv(x, positions)
        from .attention_cpp import load

        load()
        weights, _ = self._step_args()  # ln_attn, k and v are its 2nd, 4th and 5th
        k, v = torch.ops.sparrow.draft_kv(x[0], positions[0].to(torch.float32), _inv_freq(self.cfg.head_dim,
                                          self.cfg.rope_theta), weights[1], weights[3], weights[4],
                                          self.cfg.rms_norm_eps)  # [Hkv, T, D]
        return k[None], v[None]

    def layer(self, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """One decoder layer over draft tokens `[B, T]` with features `[B, T, H]` at positions `[B, T]`.

        `attend(q [B, Hq, T, D], k [B, Hkv, T, D], v) -> [B, Hq, T, D]` supplies the anchors/glimpses
        and the mask over the draft's own tokens. Returns the output residual stream `[B, T, H]`.
        """
        b, t = tokens.shape
        x = self.inp(torch.cat([F.embedding(tokens, self.embed).to(feats.dtype), feats], -1))  # [B, T, H]
        n = self.ln_attn(x)
        cos, sin = rope_angles(positions[:, None], self.cfg.head_dim, self.cfg.rope_theta)  # [B, 1, T, D]
        q = apply_rope(self._heads(self.q, n), cos, sin)  # [B, Hq, T, D]
        k = apply_rope(self._heads(self.k, n), cos, sin)  # [B, Hkv, T, D]
        x = x + self.o(attend(q, k, self._heads(self.v, n)).transpose(1, 2).reshape(b, t, -1))
        n = self.ln_mlp(x)
        return x + self.down(F.silu(self.gate(n)) * self.up(n))

    def step(self, token: torch.Tensor, feat: torch.Tensor, position: int, ctx, first_pos: int,
             prior: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The layer over one draft token (a 0-d token id, its feature `[1, 1, H]`) of the round at
        `first_pos`, attending to `ctx` and to `prior` (its ancestors' keys/values `[1, Hkv, A, D]`).

        Returns its output `[1, 1, H]`, its own keys/values `[1, Hkv, 1, D]` and its logits `[V]`. On
        CPU in float32 one fused C++ call (`csrc/draft_step.cpp`), else `layer` through `ctx.attend`.
        """
        cfg = self.cfg
        if step_backend(self.fuse.weight) == "cpp":
            from .attention_cpp import load

            load()
            k_ctx, v_ctx = ctx.context_kv(first_pos, prior)  # [Hkv, n + 1, D] each
            x_in = torch.cat([self.embed[token], feat.reshape(-1)])  # [2H]
            weights, final_eps = self._step_args()
            h, k, v, logits = torch.ops.sparrow.draft_step(
                x_in, _inv_freq(cfg.head_dim, cfg.rope_theta), position, k_ctx, v_ctx, weights, cfg.rms_norm_eps,
                final_eps)
            return h.view(1, 1, -1), (k.view(1, -1, 1, cfg.head_dim), v.view(1, -1, 1, cfg.head_dim)), logits
        kept = []
        attend = ctx.attend(first_pos, torch.ones(1, 1, dtype=torch.bool), prior)

        def attend_and_keep(q, k, v):
            kept.append((k, v))
            return attend(q, k, v)

        h = self.layer(token.view(1, 1), feat, torch.tensor([[position]]), attend_and_keep)  # [1, 1, H]
        return h, kept[0], self.logits(h[:, 0])[0]

    def chain(self, token: int, feat: torch.Tensor, first_pos: int, ctx, k: int, hold_eos: int = 0,
              eos: Collection[int] = ()) -> torch.Tensor | None:
        """A greedy chain of k draft tokens after `token` (feature `[1, 1, H]`, at rotary position
        `first_pos`) in one fused C++ call (`sparrow::draft_chain`), end-of-turn excluded from the first
        `hold_eos` of them: what `step` then argmax k times gives, token for token. Returns tokens `[k]`,
        or None where the step runs in torch (the caller then steps in Python)."""
        if step_backend(self.fuse.weight) != "cpp":
            return None
        from .attention_cpp import load

        load()
        k_ctx, v_ctx = ctx.context_kv(first_pos, None, free=k)  # [Hkv, n + k, D] each
        weights, final_eps = self._step_args()
        return torch.ops.sparrow.draft_chain(
            feat.reshape(-1), int(token), k, first_pos, k_ctx, v_ctx, self.embed, _inv_freq(self.cfg.head_dim,
            self.cfg.rope_theta), weights, self.cfg.rms_norm_eps, final_eps, hold_eos, sorted(eos))

    def _step_args(self) -> tuple[list[torch.Tensor], float]:
        """The fused ops' weights, in `csrc/draft_step.cpp`'s order, and the final norm's epsilon. Each
        matrix is a float16 copy where that holds its values exactly (a draft loaded from its float16 file):
        the C++ products then read half the bytes for the same arithmetic, which is what a draft step costs
        after a long verify has evicted its weights from the caches. Rebuilt when a weight changes in place
        (optimisers, load_state_dict: their version counters move)."""
        cache = self.__dict__.get("_step_cache")
        if cache is None:
            mods = (self.inp, self.ln_attn, self.q, self.k, self.v, self.o, self.ln_mlp, self.gate, self.up,
                    self.down, self.final_norm)
            source = [m.weight for m in mods] + [self.head]  # the same tensors until _apply replaces them
        else:
            source = cache[0]
        version = sum(w._version for w in source)
        if cache is None or cache[1] != version:
            eps = getattr(self.final_norm, "variance_epsilon", getattr(self.final_norm, "eps", None))
            if eps is None:
                raise ValueError(f"the target's final norm ({type(self.final_norm).__name__}) names no epsilon; "
                                 "run the draft with SPARROW_DRAFT=torch")
            weights = [_exact_half(w) if w.dim() == 2 else w.detach() for w in source]
            cache = (source, version, weights, float(eps))
            self.__dict__["_step_cache"] = cache
        return cache[2], cache[3]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_step_cache", None)  # .to() / .half() replace the frozen buffers (embed, head)
        return super()._apply(fn, *args, **kwargs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.final_norm(h.to(self.head.dtype)), self.head)  # [B, T, V]

    def glimpse_vectors(self, visual: torch.Tensor) -> torch.Tensor:
        """IVSB: pool intermediate-layer visual states `[B, Nv, H]` (video order) into `[B, G, H]`."""
        g = self.cfg.glimpses
        if visual.shape[1] < g:
            raise ValueError(f"{visual.shape[1]} visual tokens cannot make {g} glimpses")
        pooled = F.adaptive_avg_pool1d(visual.transpose(1, 2).float(), g).transpose(1, 2)  # [B, G, H]
        return self.glimpse_proj(pooled.to(self.glimpse_proj.weight.dtype))

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, out: str | Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        own = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()
               if not k.startswith("final_norm.")}
        save_file(own, str(out / "draft.safetensors"))
        (out / "draft_config.json").write_text(json.dumps(self.cfg.to_json(), indent=1))
        if meta is not None:
            (out / "training.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, target_model) -> "Draft":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = path / "draft_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} holds no draft (no draft_config.json)")
        draft = cls.for_target(DraftConfig.from_json(json.loads(cfg_file.read_text())), target_model)
        weights = {k: v.to(target_model.dtype) for k, v in load_file(str(path / "draft.safetensors")).items()}
        missing, unexpected = draft.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("final_norm.")]
        if missing or unexpected:
            raise ValueError(f"{path}: draft weights do not match its config (missing {missing}, "
                             f"unexpected {unexpected})")
        return draft.to(target_model.dtype).eval()


class WindowContext:
    """Sparrow's draft context for one sequence: the anchor window ring and the glimpses.

    The ring holds fused target features `[1, W, H]`, filled by the `sparrow::handoff` op, and their
    positions; their keys/values are read by `sparrow::text_anchored_window_attention` (plugins/), or
    by the fused draft step straight from the context buffer.
    """

    SPARE = 16  # buffer slots past the glimpses and the window for a round's ancestors (grown on demand)

    def __init__(self, draft: Draft, glimpses: torch.Tensor | None):
        from .plugins import ops  # noqa: F401  registers the sparrow:: ops

        cfg = draft.cfg
        self.draft = draft
        dtype = draft.fuse.weight.dtype
        self.ring = torch.zeros(1, cfg.window, cfg.hidden_size, dtype=dtype)  # [1, W, H]
        self.ring_pos = torch.zeros(1, cfg.window, 1, dtype=torch.float32)  # [1, W, 1]
        self.anchors = torch.zeros(1, dtype=torch.int64)
        self._count = 0  # int(self.anchors), kept host-side
        self.g = 0 if glimpses is None else glimpses.shape[1]
        # Keys/values `[Hkv, G + W + spare, D]`: the glimpses, the ring's slots rotated at their positions
        # (a slot's depend only on its feature and position, so only the slots a handoff writes are
        # recomputed), then scratch for a round's ancestors and the fused step's own key/value. The
        # fused step reads it in place: a draft step copies nothing of its context.
        shape = (cfg.num_kv_heads, self.g + cfg.window + self.SPARE, cfg.head_dim)
        self.k_ctx = torch.zeros(shape, dtype=dtype)
        self.v_ctx = torch.zeros(shape, dtype=dtype)
        self.glimpses = glimpses  # [1, G, H] or None
        if glimpses is not None:
            # The glimpses' keys are rotated anew each round (they sit just before its draft tokens).
            self._glimpse_k, vg = draft.kv(glimpses, None)  # [1, Hkv, G, D] each
            self.v_ctx[:, :self.g] = vg[0]
        self._glimpse_pos = None  # first_pos of the round the glimpse keys are rotated for

    def extend(self, feats: torch.Tensor, positions: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Hand off accepted positions: feats `[1, T, H]`, positions `[1, T]`, text_mask `[1, T]`."""
        from .plugins.ops import handoff

        before = self._count
        self.anchors = handoff(self.ring, feats.to(self.ring.dtype), torch.tensor([feats.shape[1]]), self.anchors,
                               text_mask)
        self._count = int(self.anchors)
        w, written = self.draft.cfg.window, self._count - before
        kept = min(written, w)  # of more than W new rows only the last W stay
        if not kept:
            return
        first = (before + written - kept) % w  # ring slot of the first row kept
        slots = slice(first, first + kept) if first + kept <= w else (first + torch.arange(kept)) % w
        # their positions by plain indexing, not a second op call (the op's dispatch costs more than this)
        pos = (positions[0] if written == feats.shape[1] else positions[text_mask])[-kept:].to(torch.float32)
        self.ring_pos[0, slots, 0] = pos
        rows = self.ring[:, slots]  # [1, kept, H]
        if self.g:
            # The next round's glimpse keys in the same call: they sit just before its draft tokens, i.e.
            # at the last position handed off (`_rotate_glimpses` redoes it for any other round start).
            rows = torch.cat([rows, self.glimpses.to(rows.dtype)], 1)  # [1, kept + G, H]
            pos = torch.cat([pos, pos[-1:].expand(self.g)])
        k, v = self.draft.context_rows_kv(rows, pos[None])  # [1, Hkv, kept (+ G), D]
        self.k_ctx[:, self.g:self.g + w][:, slots] = k[0, :, :kept]
        self.v_ctx[:, self.g:self.g + w][:, slots] = v[0, :, :kept]
        if self.g:
            self.k_ctx[:, :self.g] = k[0, :, kept:]
            self._glimpse_pos = int(pos[-1]) + 1

    def attend(self, first_pos: int, mask: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The attention callable for draft tokens of the round at `first_pos`.. under `mask` `[T, T]` over
        themselves; `prior`: keys/values `[1, Hkv, A, D]` of earlier draft tokens they all see (ancestors)."""
        from .plugins.ops import window_attention

        self._rotate_glimpses(first_pos)
        w = self.draft.cfg.window
        k_win, v_win = self.k_ctx[None, :, :self.g + w], self.v_ctx[None, :, :self.g + w]  # [1, Hkv, G + W, D]
        valid = self.anchors.clamp(max=w) + self.g  # [1]
        if prior is not None:  # ancestors join the window's valid slots: every new token sees them
            n = int(valid)
            k_win, v_win = torch.cat([k_win[:, :, :n], prior[0]], 2), torch.cat([v_win[:, :, :n], prior[1]], 2)
            valid = valid + prior[0].shape[2]

        def fn(q, k, v):
            return window_attention(q, k_win, v_win, valid, k, v, mask)

        return fn

    def context_kv(self, first_pos: int, prior: tuple[torch.Tensor, torch.Tensor] | None = None, free: int = 1):
        """What one draft token of the round at `first_pos` attends besides itself, as keys/values
        `[Hkv, n + free, D]` (views of the context buffer): the glimpses, the valid window slots, `prior`
        (its ancestors, written into the scratch) and `free` positions the fused ops write the new tokens'
        keys/values into (one for a step, K for a chain)."""
        self._rotate_glimpses(first_pos)
        n = self.g + min(self._count, self.draft.cfg.window)
        a = 0 if prior is None else prior[0].shape[2]
        if n + a + free > self.k_ctx.shape[1]:  # a deeper tree than the buffer has room for
            grow = n + a + free + self.SPARE - self.k_ctx.shape[1]
            self.k_ctx = F.pad(self.k_ctx, (0, 0, 0, grow))
            self.v_ctx = F.pad(self.v_ctx, (0, 0, 0, grow))
        if a:
            self.k_ctx[:, n:n + a] = prior[0][0]
            self.v_ctx[:, n:n + a] = prior[1][0]
        return self.k_ctx[:, :n + a + free], self.v_ctx[:, :n + a + free]

    def _rotate_glimpses(self, first_pos: int) -> None:
        """Glimpse keys rotated at `first_pos - 1`, just before the round's draft tokens: they summarise the
        whole video, not a place in it. `extend` leaves them ready for the round that follows it."""
        if self.g and self._glimpse_pos != first_pos:
            kg = rotate(self._glimpse_k, torch.full((self.g,), first_pos - 1), self.draft.cfg.rope_theta)
            self.k_ctx[:, :self.g] = kg[0]
            self._glimpse_pos = first_pos


class PrefixContext:
    """The EAGLE baseline's draft context: keys/values of every prefix position, visual ones included."""

    def __init__(self, draft: Draft, max_len: int):
        cfg = draft.cfg
        self.draft = draft
        shape = (cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=draft.fuse.weight.dtype)  # [Hkv, Tmax, D], written in place
        self.v = torch.zeros(shape, dtype=draft.fuse.weight.dtype)
        self.length = 0

    def extend(self, feats: torch.Tensor, positions: torch.Tensor, text_mask: torch.Tensor | None = None) -> None:
        k, v = self.draft.context_rows_kv(feats, positions)  # [1, Hkv, T, D]
        t = k.shape[2]
        if self.length + t > self.k.shape[1]:
            raise ValueError(f"draft prefix cache full: {self.length} + {t} > {self.k.shape[1]}")
        self.k[:, self.length:self.length + t] = k[0]
        self.v[:, self.length:self.length + t] = v[0]
        self.length += t

    def attend(self, first_pos: int, mask: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None = None):
        """As `WindowContext.attend`, over the whole prefix."""
        def fn(q, k, v):
            t = k.shape[2]
            if prior is not None:
                k, v = torch.cat([prior[0], k], 2), torch.cat([prior[1], v], 2)  # [1, Hkv, A + T, D]
            past = self.length + k.shape[2] - t
            end = past + t
            if end > self.k.shape[1]:
                raise ValueError(f"draft prefix cache full: {end} > {self.k.shape[1]}")
            self.k[:, self.length:end] = k[0]  # scratch past the prefix, overwritten next call
            self.v[:, self.length:end] = v[0]
            scale = q.shape[-1] ** -0.5
            return multi_token_attention(q[0], self.k, self.v, past, mask | torch.eye(t, dtype=torch.bool),
                                         scale)[None]

        return fn

    def context_kv(self, first_pos: int, prior: tuple[torch.Tensor, torch.Tensor] | None = None, free: int = 1):
        """As `WindowContext.context_kv`: the prefix, `prior` and the free positions, written in the
        scratch past the prefix, `[Hkv, n + free, D]`."""
        n = self.length + (prior[0].shape[2] if prior is not None else 0)
        if n + free > self.k.shape[1]:
            raise ValueError(f"draft prefix cache full: {n + free} > {self.k.shape[1]}")
        if prior is not None:
            self.k[:, self.length:n] = prior[0][0]
            self.v[:, self.length:n] = prior[1][0]
        return self.k[:, :n + free], self.v[:, :n + free]

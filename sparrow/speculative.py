"""Speculative decoding on the target runtime: draft a token tree, verify it in one target forward.

A chain of K tokens is the tree whose every node has one child, so chain and tree share one loop:

    draft:   the draft layer runs once per inner node, parents first, over that node's token and
             feature, attending to its context (Sparrow's text-anchor window and glimpses, or
             EAGLE's whole prefix) and to its ancestors' keys/values kept from when they ran
    verify:  one target forward over [last committed token, drafted nodes] with the ancestor mask
    accept:  greedy: walk the tree along the target's argmax; sampling (chains): accept d with
             probability min(1, p(d) / q(d)), resample a rejection from normalise(max(p - q, 0))
    commit:  keep the accepted path's K/V (rollback by length, or a small in-place gather for a
             tree), hand its target hidden states to the draft's context

Greedy output is token-for-token the target's own greedy output; sampled output follows the
target's distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .draft import Draft, PrefixContext, WindowContext
from .generate import GenerationResult, _pick, check_lengths, hold_eos
from .runtime import Runtime, RuntimeState
from .target import Prompt, StepOutput
from .tree_spec import base_paths, tree_paths

if TYPE_CHECKING:
    from .runtime_trtllm import TrtLlmRuntime, TrtLlmState


@dataclass(frozen=True)
class TokenTree:
    """A static draft tree. Node 0 is the root (the last committed token, already known)."""

    parents: tuple[int, ...]  # parents[i] < i; parents[0] = -1
    ranks: tuple[int, ...]  # node i holds its parent's ranks[i]-th most likely draft token

    @classmethod
    def chain(cls, k: int) -> "TokenTree":
        return cls.from_paths(base_paths(k))

    @classmethod
    def from_paths(cls, paths: list[tuple[int, ...]]) -> "TokenTree":
        """Medusa-style paths of child ranks, e.g. [(0,), (1,), (0, 0)]; every prefix must be listed."""
        index = {(): 0}
        parents, ranks = [-1], [0]
        for path in sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p)):
            if not path or path[:-1] not in index:
                raise ValueError(f"tree path {path} has no parent path {path[:-1]} listed")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
            ranks.append(path[-1])
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def spine(cls, k: int, width: int = 2) -> "TokenTree":
        """The top-1 chain of depth k, with the next `width - 1` alternatives hung off every level."""
        return cls.from_paths(base_paths(k, width))

    @classmethod
    def static(cls, k: int | str, width: int = 1) -> "TokenTree":
        """A chain of K when width is 1, else the top-`width` spine tree of depth K; K may be a spec with
        branches, `K+b/b/...` (`sparrow.tree_spec`)."""
        return cls.from_paths(tree_paths(k, width))

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.size - 1))

    def depths(self) -> torch.Tensor:
        d = [0] * self.size
        for i in range(1, self.size):
            d[i] = d[self.parents[i]] + 1
        return torch.tensor(d)  # [N]

    def mask(self) -> torch.Tensor:
        """Ancestor mask `[N, N]`: node i may attend node j iff j is i or one of its ancestors."""
        m = torch.eye(self.size, dtype=torch.bool)
        for i in range(1, self.size):
            m[i] |= m[self.parents[i]]
        return m

    def ancestors(self, i: int) -> list[int]:
        """Node i's ancestors, root first."""
        line = []
        while self.parents[i] >= 0:
            i = self.parents[i]
            line.append(i)
        return line[::-1]

    def children(self) -> list[dict[int, int]]:
        """children()[i] maps rank -> child node."""
        out: list[dict[int, int]] = [{} for _ in range(self.size)]
        for i in range(1, self.size):
            out[self.parents[i]][self.ranks[i]] = i
        return out


def new_context(draft: Draft, hidden: dict[int, torch.Tensor], visual_mask: torch.Tensor, max_len: int):
    """The draft's context after the target's prefill: window + glimpses (Sparrow) or whole prefix (EAGLE)."""
    t = visual_mask.shape[0]
    feats = draft.features({i: hidden[i] for i in draft.cfg.feature_layers})  # [1, T, H]
    positions = torch.arange(t)[None]  # [1, T]
    if draft.cfg.attend == "prefix":
        ctx = PrefixContext(draft, max_len)
        ctx.extend(feats, positions)
        return ctx, feats
    glimpses = None
    if draft.cfg.glimpses:
        glimpses = draft.glimpse_vectors(hidden[draft.cfg.glimpse_layer][:, visual_mask])  # [1, G, H]
    ctx = WindowContext(draft, glimpses)
    ctx.extend(feats, positions, ~visual_mask[None])
    return ctx, feats


@torch.inference_mode()
def draft_tree(draft: Draft, ctx, tree: TokenTree, root: int, root_feat: torch.Tensor, root_pos: int,
               temperature: float = 0.0, gen: torch.Generator | None = None, first_index: int = 0,
               min_new_tokens: int = 0, eos: Collection[int] = ()):
    """Fill the tree's tokens, parents before children. The draft layer runs once per node that has
    children, over that node alone, attending to its context and its ancestors: a node's output
    depends only on its own input and its ancestors' keys/values, which are kept from when they ran,
    so no node is computed twice. Returns tokens `[N]` and, when sampling, the draft's probabilities
    `[N, V]` (row i: the distribution node i's token was drawn from).

    The root's children are output token number `first_index`: where that number is below
    `min_new_tokens` the target holds end-of-turn back, so the draft must not propose it (a drafted
    end-of-turn there is a certain rejection, and the rest of its branch with it).

    A greedy chain is one `Draft.chain` call (the K steps and their argmaxes in C++) where the draft's
    step runs in C++; the loop below is for trees, sampling and the torch step."""
    tokens = torch.zeros(tree.size, dtype=torch.long)  # [N]
    tokens[0] = root
    if tree.is_chain and temperature == 0:
        chain = draft.chain(root, root_feat, root_pos, ctx, tree.size - 1, min_new_tokens - first_index, eos)
        if chain is not None:
            tokens[1:] = chain
            return tokens, None
    depths = tree.depths().tolist()
    feats = {0: root_feat.reshape(1, 1, -1)}  # node -> its input feature [1, 1, H]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # node -> its keys, values [1, Hkv, 1, D]
    probs = torch.zeros(tree.size, draft.cfg.vocab_size) if temperature > 0 else None
    for i, children in enumerate(tree.children()):
        if not children:
            continue
        line = tree.ancestors(i)
        prior = tuple(torch.cat([kv[a][j] for a in line], 2) for j in (0, 1)) if line else None  # [1, Hkv, A, D]
        h, kv[i], logits = draft.step(tokens[i], feats[i], root_pos + depths[i], ctx, root_pos, prior)
        if first_index + depths[i] < min_new_tokens:
            for e in eos:  # in place on the step's own logits: hold_eos's copy costs 15x more per step
                logits[e] = float("-inf")
        if temperature > 0:
            q = torch.softmax(logits.float() / temperature, -1)
            (child,) = children.values()  # sampling drafts are chains
            tokens[child] = torch.multinomial(q, 1, generator=gen)
            probs[child] = q
        else:
            top = torch.topk(logits, max(children) + 1).indices
            for rank, child in children.items():
                tokens[child] = top[rank]
        for child in children.values():
            feats[child] = h
    return tokens, probs


def accept_greedy(tree: TokenTree, tokens: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], int]:
    """Follow the target's argmax `logits [N, V]` down the tree. Returns the accepted path (node
    indices from the root) and the target's next token after it."""
    best = logits.argmax(-1).tolist()
    children = tree.children()
    path = [0]
    while True:
        nxt = best[path[-1]]
        child = next((c for c in children[path[-1]].values() if int(tokens[c]) == nxt), None)
        if child is None:
            return path, nxt
        path.append(child)


def accept_sampled(tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                   gen: torch.Generator) -> tuple[list[int], int]:
    """Rejection sampling on a chain: tokens `[N]` (0 = root), q `[N, V]` draft probabilities (row i
    drew token i), p `[N, V]` target probabilities (row i: the distribution after node i)."""
    path = [0]
    for i in range(1, tokens.shape[0]):
        d = int(tokens[i])
        if torch.rand((), generator=gen) * q[i, d] <= p[i - 1, d]:  # accept with min(1, p/q)
            path.append(i)
            continue
        residual = (p[i - 1] - q[i]).clamp_(min=0)
        return path, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return path, int(torch.multinomial(p[-1], 1, generator=gen))


@torch.inference_mode()  # else the draft's fusion and context keys/values record autograd graphs every round
def generate_speculative(runtime: Runtime | TrtLlmRuntime, draft: Draft, frames: np.ndarray, prompt: str,
                         tree: TokenTree, max_new_tokens: int = 64, temperature: float = 0.0,
                         seed: int = 0, min_new_tokens: int = 0,
                         on_tokens: Callable[[list[int]], None] | None = None,
                         prepared: Prompt | None = None,
                         prefilled: tuple[RuntimeState | TrtLlmState, StepOutput] | None = None) -> GenerationResult:
    """Speculative decoding of one request; `on_tokens` (streaming) gets each step's committed tokens;
    `prepared`: `runtime.prepare(frames, prompt)` already done by the caller (not repeated);
    `prefilled`: `runtime.prefill(prepared, layers)` already done, with at least the draft's layers: its
    slot is cut back to the prompt first, so one prefill serves several decodes (stats' prefill_s is then
    the time to set up the draft's context only)."""
    check_lengths(max_new_tokens, min_new_tokens)
    if temperature > 0 and not tree.is_chain:
        raise ValueError("sampling (temperature > 0) verifies chains only; use a chain draft")
    gen = torch.Generator().manual_seed(seed)
    eos = runtime.eos_token_ids
    t0 = time.perf_counter()
    p = prepared if prepared is not None else runtime.prepare(frames, prompt)
    layers = draft.cfg.target_layers
    if prefilled is None:
        state, out = runtime.prefill(p, layers=layers)
    else:
        state, out = prefilled
        missing = sorted(set(layers) - set(out.hidden))
        if missing:
            raise ValueError(f"the prefill holds no hidden states of target layers {missing}, which the draft reads")
        runtime.truncate(state, state.prompt_length)
    ctx, feats = new_context(draft, out.hidden, p.visual_mask, runtime.max_len)
    tokens = [_pick(hold_eos(out.logits[0, -1:], torch.tensor([0]), min_new_tokens, eos)[0], temperature, gen)]
    root_feat, root_pos = feats[:, -1:], state.length  # the root token sits at cache index root_pos
    if on_tokens is not None:
        on_tokens(tokens[:])
    t1 = time.perf_counter()
    steps, draft_s, verify_s = 0, 0.0, 0.0
    mask, depths = tree.mask(), tree.depths()
    while tokens[-1] not in eos and len(tokens) < max_new_tokens:
        ta = time.perf_counter()
        drafted, q = draft_tree(draft, ctx, tree, tokens[-1], root_feat, root_pos, temperature, gen,
                                len(tokens), min_new_tokens, eos)
        tb = time.perf_counter()
        start = state.length
        out = runtime.step(state, drafted[None], None if tree.is_chain else mask, depths, layers=layers)
        verify_s += time.perf_counter() - tb
        draft_s += tb - ta
        steps += 1
        logits = hold_eos(out.logits[0], len(tokens) + depths, min_new_tokens, eos)  # node i picks token len + depth
        if temperature > 0:
            target_p = torch.softmax(logits.float() / temperature, -1)  # [N, V]
            path, nxt = accept_sampled(drafted, q, target_p, gen)
        else:
            path, nxt = accept_greedy(tree, drafted, logits)
        runtime.keep(state, start, path)
        feats = draft.features({i: out.hidden[i][:, path] for i in draft.cfg.feature_layers})  # [1, P, H]
        ctx.extend(feats, (start + torch.arange(len(path)))[None], torch.ones(1, len(path), dtype=torch.bool))
        root_feat, root_pos = feats[:, -1:], state.length
        committed = len(tokens)
        for tok in drafted[path[1:]].tolist() + [nxt]:
            tokens.append(tok)
            if tok in eos or len(tokens) == max_new_tokens:
                break
        if on_tokens is not None:
            on_tokens(tokens[committed:])
    t2 = time.perf_counter()
    decode_s = t2 - t1
    stats = {"strategy": "eagle" if draft.cfg.attend == "prefix" else "sparrow",
             "prompt_tokens": int(p.input_ids.shape[1]), "visual_tokens": int(p.visual_mask.sum()),
             "new_tokens": len(tokens), "prefill_s": round(t1 - t0, 4), "decode_s": round(decode_s, 4),
             "tokens_per_s": round(len(tokens) / decode_s, 2) if decode_s > 0 else None,
             "target_steps": steps, "tree_nodes": tree.size - 1,
             "mean_accepted_length": round((len(tokens) - 1) / steps, 3) if steps else None,
             "draft_ms_per_step": round(1000 * draft_s / steps, 3) if steps else None,
             "verify_ms_per_step": round(1000 * verify_s / steps, 3) if steps else None}
    text = runtime.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return GenerationResult(tokens, text, stats)

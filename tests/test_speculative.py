"""Sparrow / EAGLE drafts and speculative decoding on the runtime: lossless, rollback, handoff, sampling."""

import pytest
import torch

import tiny_models
from sparrow.demo.world import make_scene, render
from sparrow.draft import Draft, DraftConfig
from sparrow.draft_data import DraftDataConfig, record
from sparrow.generate import generate_ar
from sparrow.runtime import Runtime
from sparrow.speculative import (TokenTree, accept_greedy, accept_sampled, draft_tree, generate_speculative,
                                 new_context)
from sparrow.target import Target
from sparrow.train_draft import make_batch, mtp_loss, rollout_logits
from sparrow.tree_spec import spec_key, spec_keys

PROMPT = "describe the video ."
LAYERS = (1, 2, 3)  # the tiny targets have 3 decoder layers


def target_dir(target):
    return target.model.config._name_or_path


def _frames(seed, n=16):
    return render(make_scene(seed), n, 64, 64)  # [n, 64, 64, 3]: n/2 * 16 visual tokens


def _cfg(tok_count, **kw):
    base = dict(hidden_size=64, vocab_size=tok_count, feature_layers=LAYERS, num_heads=4, num_kv_heads=2,
                intermediate_size=128, window=8, glimpses=4, glimpse_layer=2)
    return DraftConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_models.build("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))
    target = Target.load(path)  # stays a stock transformers model: the reference
    runtime = Runtime(Target.load(path), max_len=512)
    data = DraftDataConfig(examples=8, feature_layers=LAYERS, max_new_tokens=24, long_examples=0)
    recs = [record(runtime, _frames(s), PROMPT, data, torch.float32) for s in range(8)]
    return target, runtime, recs


@pytest.fixture(scope="module", params=["window", "prefix"])
def trained(request, tiny):
    """A draft of each kind trained for a few steps; returns it with its first and last losses."""
    target, _, recs = tiny
    cfg = _cfg(target.vocab_size, **({"glimpses": 0} if request.param == "prefix" else {}), attend=request.param)
    torch.manual_seed(0)
    draft = Draft.for_target(cfg, target.model).float().train()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    batch = make_batch(recs, cfg, 3)
    losses = []
    for _ in range(60):
        loss, _ = mtp_loss(draft, batch, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return draft.eval(), losses


def test_training_step_decreases_loss(trained):
    _, losses = trained
    # the tiny random target's LM head has small weights, so no draft can reach a low loss; it must drop
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]


@pytest.mark.parametrize("tree", [TokenTree.chain(4), TokenTree.spine(3, 3)], ids=["chain", "tree"])
def test_greedy_speculative_equals_transformers_generate(tiny, trained, tree):
    target, runtime, _ = tiny
    draft, _ = trained
    accepted = 0.0
    for seed in (11, 12, 13):
        f = _frames(seed, 8 + 4 * (seed % 3))
        p = target.prepare(f, PROMPT)
        hf = target.model.generate(input_ids=p.input_ids, **p.model_inputs, max_new_tokens=24, do_sample=False)
        res = generate_speculative(runtime, draft, f, PROMPT, tree, max_new_tokens=24)
        assert res.token_ids == hf[0, p.input_ids.shape[1]:].tolist()
        accepted += res.stats["mean_accepted_length"]
    assert accepted / 3 > 1.2, "the trained draft should get tokens accepted, so acceptance paths run"


def test_training_rollout_matches_inference_draft(tiny, trained):
    """Training-time test computes exactly what inference computes for the same rollout."""
    target, _, recs = tiny
    draft, _ = trained
    k, r = 3, recs[0]
    layers = draft.cfg.target_layers
    batch = make_batch([r], draft.cfg, k)
    with torch.no_grad():
        train_logits = rollout_logits(draft, batch, k)  # k x [1, Q, V]
    # inference: context from the prompt's states, then hand off answer positions up to p
    runtime = Runtime(Target.load(target_dir(target)), max_len=512)
    frames = _frames(0)
    p = runtime.prepare(frames, PROMPT)
    state, out = runtime.prefill(p, layers=layers)
    ctx, _ = new_context(draft, out.hidden, p.visual_mask, 512)
    n_prompt = p.input_ids.shape[1]
    feats = {}
    for q in range(3):  # the first three rollouts: p = prompt end - 1, then two answer positions
        pos = n_prompt - 1 + q
        if q:
            step = runtime.step(state, r["ids"][pos:pos + 1][None], layers=layers)
            f = draft.features(step.hidden)
            ctx.extend(f, torch.tensor([[pos]]), torch.ones(1, 1, dtype=torch.bool))
            feats[pos] = f
        else:
            feats[pos] = draft.features(out.hidden)[:, -1:]
        tokens, h = r["ids"][pos + 1:pos + 1 + k], feats[pos]
        chain = torch.ones(k, k, dtype=torch.bool).tril()
        hs = [h[:, 0]]
        with torch.no_grad():
            for s in range(k):
                out_h = draft.layer(tokens[None, :s + 1], torch.stack(hs, 1), (pos + 1 + torch.arange(s + 1))[None],
                                    ctx.attend(pos + 1, chain[:s + 1, :s + 1]))
                hs.append(out_h[:, -1])
                torch.testing.assert_close(draft.logits(out_h[:, -1])[0], train_logits[s][0, q], atol=2e-4, rtol=1e-4)


def test_window_never_holds_visual_positions(tiny, trained):
    target, runtime, _ = tiny
    draft, _ = trained
    if draft.cfg.attend != "window":
        pytest.skip("only the Sparrow draft has a text-anchor window")
    p = runtime.prepare(_frames(3), PROMPT)
    _, out = runtime.prefill(p, layers=draft.cfg.target_layers)
    ctx, feats = new_context(draft, out.hidden, p.visual_mask, 512)
    text_pos = torch.nonzero(~p.visual_mask).flatten()
    held = ctx.ring_pos[0, :, 0].long()
    valid = int(ctx.anchors.clamp(max=draft.cfg.window))
    assert valid == min(len(text_pos), draft.cfg.window)
    assert set(held[:valid].tolist()) == set(text_pos[-valid:].tolist())  # the last W text positions, no visual one
    for slot in range(valid):
        torch.testing.assert_close(ctx.ring[0, slot], feats[0, held[slot]])
    # visual states reach the draft only through the glimpse layer: poison every other layer's visual rows
    poisoned = {i: h.clone() for i, h in out.hidden.items()}
    for i in draft.cfg.feature_layers:
        if i != draft.cfg.glimpse_layer:
            poisoned[i][:, p.visual_mask] = float("nan")
    ctx2, _ = new_context(draft, poisoned, p.visual_mask, 512)
    tree = TokenTree.chain(3)
    root_feat = feats[:, -1:]
    a, _ = _draft(draft, ctx, tree, root_feat, p)
    b, _ = _draft(draft, ctx2, tree, root_feat, p)
    assert torch.equal(a, b)


def _draft(draft, ctx, tree, root_feat, p):
    return draft_tree(draft, ctx, tree, 5, root_feat, p.input_ids.shape[1])


def test_draft_step_cost_does_not_grow_with_video(tiny, trained):
    """The window draft attends to W + G keys whatever the video length; EAGLE's context grows."""
    target, runtime, _ = tiny
    draft, _ = trained
    sizes = []
    for n in (8, 32):
        p = runtime.prepare(_frames(4, n), PROMPT)
        _, out = runtime.prefill(p, layers=draft.cfg.target_layers)
        ctx, _ = new_context(draft, out.hidden, p.visual_mask, 512)
        sizes.append(ctx.length if draft.cfg.attend == "prefix" else ctx.ring.shape[1] + ctx.glimpses.shape[1])
    if draft.cfg.attend == "prefix":
        assert sizes[1] - sizes[0] == (32 - 8) // 2 * 16
    else:
        assert sizes[0] == sizes[1] == draft.cfg.window + draft.cfg.glimpses


def test_tree_rollback_keeps_the_accepted_path(tiny):
    """After a tree verify, keeping a path leaves the cache as if only that path had been run."""
    target, _, _ = tiny
    rt = Runtime(Target.load(target_dir(target)), max_len=512, slots=2)
    p = rt.prepare(_frames(5), PROMPT)
    a, _ = rt.prefill(p, slot=0)
    b, _ = rt.prefill(p, slot=1)
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (1, 0), (1, 1)])  # nodes: 0 root, 1, 2, 3:(0,0), 4:(1,0), 5:(1,1)
    tokens = torch.tensor([[7, 9, 10, 11, 12, 13]])
    start = a.length
    rt.step(a, tokens, tree.mask(), tree.depths())
    path = [0, 2, 5]
    rt.keep(a, start, path)
    rt.step(b, tokens[:, path])
    assert a.length == b.length == start + 3
    nxt = torch.tensor([[20]])
    torch.testing.assert_close(rt.step(a, nxt).logits, rt.step(b, nxt).logits, atol=1e-5, rtol=1e-5)


def test_token_tree_shapes():
    chain = TokenTree.chain(3)
    assert chain.is_chain and chain.size == 4
    assert torch.equal(chain.mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    tree = TokenTree.spine(2, 2)  # root, (0), (1), (0,0), (0,1)
    assert tree.parents == (-1, 0, 0, 1, 1) and tree.depths().tolist() == [0, 1, 1, 2, 2]
    assert tree.mask()[3].tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="no parent"):
        TokenTree.from_paths([(0, 0)])


def test_tree_specs_name_chains_spines_and_branches():
    assert TokenTree.static(4) == TokenTree.chain(4) == TokenTree.static("4")
    assert TokenTree.chain(4).parents == (-1, 0, 1, 2, 3) and TokenTree.chain(4).ranks == (0,) * 5
    assert TokenTree.static(3, 2) == TokenTree.spine(3, 2)
    tree = TokenTree.static("3+1/10/01")  # root, (0), (1), (0,0), (0,1), (1,0), (0,0,0)
    assert tree == TokenTree.from_paths([(0,), (0, 0), (0, 0, 0), (1,), (1, 0), (0, 1)])
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 3) and tree.ranks == (0, 0, 1, 0, 1, 0, 0)
    assert TokenTree.static("2+1", 2) == TokenTree.spine(2, 2)  # a branch the spine holds already
    assert spec_key("7") == 7 and spec_key(" 7+1/01 ") == "7+1/01"
    assert spec_keys("5") == (5,) and spec_keys([5, "4+1"]) == (5, "4+1")
    for spec, match in [("0", "at least 1"), ("x", "expected K"), ("3+", "no branches"), ("3+1/a", "'a' is not"),
                        ("2+0001", "hangs off 000"), ("2+11", "hangs off 1,")]:
        with pytest.raises(ValueError, match=match):
            TokenTree.static(spec)
    with pytest.raises(ValueError, match="width must be at least 1"):
        TokenTree.static(3, 0)


def test_accept_greedy_walks_the_target_argmax():
    tree = TokenTree.spine(2, 2)  # root, a=(0), b=(1), (0,0), (0,1)
    tokens = torch.tensor([0, 4, 5, 6, 7])
    logits = torch.full((5, 10), -1.0)
    logits[0, 5] = logits[2, 9] = 1.0  # the target picks node 2's token, then 9 (no such child)
    assert accept_greedy(tree, tokens, logits) == ([0, 2], 9)
    logits[0, 5], logits[0, 4], logits[1, 7] = -1.0, 1.0, 1.0
    assert accept_greedy(tree, tokens, logits)[0] == [0, 1, 4]


def test_rejection_sampling_follows_the_target_distribution():
    """Joint law of two generated tokens equals the target's p(t1) p(t2 | t1) (chi-square, V = 4)."""
    v, n = 4, 40_000
    g = torch.Generator().manual_seed(0)
    p1 = torch.softmax(torch.randn(v, generator=g) * 1.5, 0)
    p2 = torch.softmax(torch.randn(v, v, generator=g) * 1.5, 1)  # p2[t1] = p(t2 | t1)
    q1 = torch.softmax(torch.randn(v, generator=g) * 1.5, 0)
    q2 = torch.softmax(torch.randn(v, v, generator=g) * 1.5, 1)
    counts = torch.zeros(v, v)
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=g))
        d2 = int(torch.multinomial(q2[d1], 1, generator=g))
        tokens = torch.tensor([0, d1, d2])
        q = torch.stack([torch.zeros(v), q1, q2[d1]])
        p = torch.stack([p1, p2[d1], torch.full((v,), 1.0 / v)])
        path, nxt = accept_sampled(tokens, q, p, g)
        if len(path) == 1:  # t1 resampled; t2 comes from the next round's target
            t1, t2 = nxt, int(torch.multinomial(p2[nxt], 1, generator=g))
        elif len(path) == 2:
            t1, t2 = d1, nxt
        else:
            t1, t2 = d1, d2
        counts[t1, t2] += 1
    expected = n * p1[:, None] * p2
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_sampling_runs_end_to_end_and_rejects_trees(tiny, trained):
    _, runtime, _ = tiny
    draft, _ = trained
    f = _frames(21)
    a = generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(3), max_new_tokens=16, temperature=0.8, seed=1)
    b = generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(3), max_new_tokens=16, temperature=0.8, seed=1)
    assert a.token_ids == b.token_ids and 1 <= len(a.token_ids) <= 16
    with pytest.raises(ValueError, match="chains only"):
        generate_speculative(runtime, draft, f, PROMPT, TokenTree.spine(2), temperature=0.8)


def test_ar_and_speculative_agree_on_the_runtime(tiny, trained):
    _, runtime, _ = tiny
    draft, _ = trained
    f = _frames(30, 24)
    ar = generate_ar(runtime, f, PROMPT, max_new_tokens=30)
    assert generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(5), 30).token_ids == ar.token_ids


def test_one_prefill_serves_several_decodes(tiny, trained):
    """A prefill handed in (`prefilled`) is cut back to the prompt before each decode: the same tokens and
    accepted lengths as decodes that prefill themselves, however long the decode before it ran."""
    _, runtime, _ = tiny
    draft, _ = trained
    f = _frames(32, 24)
    p = runtime.prepare(f, PROMPT)
    own = [generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(k), 30, min_new_tokens=30, prepared=p)
           for k in (5, 2)]
    prefilled = runtime.prefill(p, layers=LAYERS)
    for res, k in zip(own, (5, 2)):
        again = generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(k), 30, min_new_tokens=30,
                                     prepared=p, prefilled=prefilled)
        assert again.token_ids == res.token_ids and len(again.token_ids) == 30
        assert again.stats["target_steps"] == res.stats["target_steps"]
    with pytest.raises(ValueError, match=r"target layers \[3\]"):
        generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(5), 30, prepared=p,
                             prefilled=runtime.prefill(p, layers=(1, 2)))


def test_min_new_tokens_matches_transformers(tiny, trained):
    """Fixed-length decoding (end-of-turn held back) stays lossless, as transformers' min_new_tokens."""
    target, runtime, _ = tiny
    draft, _ = trained
    f = _frames(31)
    p = target.prepare(f, PROMPT)
    hf = target.model.generate(input_ids=p.input_ids, **p.model_inputs, max_new_tokens=30, min_new_tokens=30,
                               do_sample=False)[0, p.input_ids.shape[1]:].tolist()
    assert len(hf) == 30 and not set(hf[:-1]) & runtime.eos_token_ids
    assert generate_ar(runtime, f, PROMPT, max_new_tokens=30, min_new_tokens=30).token_ids == hf
    for tree in (TokenTree.chain(4), TokenTree.spine(3, 2)):
        assert generate_speculative(runtime, draft, f, PROMPT, tree, 30, min_new_tokens=30).token_ids == hf
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate_ar(runtime, f, PROMPT, max_new_tokens=5, min_new_tokens=6)


def test_draft_never_proposes_a_held_back_end_of_turn(tiny, trained, monkeypatch):
    """Where the target holds end-of-turn back (min_new_tokens) the draft does not propose it, even a draft
    that would put it first everywhere; past min_new_tokens it does; decoding stays lossless."""
    target, runtime, _ = tiny
    draft, _ = trained
    (eos,) = runtime.eos_token_ids
    step = draft.step

    def eos_first(*args, **kwargs):
        h, kv, logits = step(*args, **kwargs)
        logits = logits.clone()
        logits[eos] += 1e4
        return h, kv, logits

    monkeypatch.setattr(draft, "step", eos_first)
    monkeypatch.setattr(draft, "chain", lambda *a, **k: None)  # chains step in Python too; the fused chain's
    # hold is tested on the op (test_fused_draft_chain_equals_steps)
    p = runtime.prepare(_frames(33), PROMPT)
    state, out = runtime.prefill(p, layers=draft.cfg.target_layers)
    ctx, feats = new_context(draft, out.hidden, p.visual_mask, 512)
    chain, _ = draft_tree(draft, ctx, TokenTree.chain(4), 5, feats[:, -1:], state.length, first_index=7,
                          min_new_tokens=9, eos=frozenset({eos}))  # nodes 1, 2 are outputs 7, 8: held
    assert eos not in chain[1:3].tolist() and chain[3:].tolist() == [eos, eos]
    spine = TokenTree.spine(3, 2)
    tokens, _ = draft_tree(draft, ctx, spine, 5, feats[:, -1:], state.length, first_index=0, min_new_tokens=30,
                           eos=frozenset({eos}))
    assert eos not in tokens.tolist()
    f = _frames(34)
    q = target.prepare(f, PROMPT)
    hf = target.model.generate(input_ids=q.input_ids, **q.model_inputs, max_new_tokens=30, min_new_tokens=30,
                               do_sample=False)[0, q.input_ids.shape[1]:].tolist()
    assert generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(4), 30, min_new_tokens=30).token_ids == hf


def test_streaming_callbacks_deliver_every_token_once(tiny, trained):
    _, runtime, _ = tiny
    draft, _ = trained
    f = _frames(32)
    chunks = []
    res = generate_speculative(runtime, draft, f, PROMPT, TokenTree.chain(4), 30, on_tokens=chunks.append)
    assert [t for c in chunks for t in c] == res.token_ids
    assert len(chunks) == res.stats["target_steps"] + 1 and all(chunks)  # the prefill's token, then one per verify
    singles = []
    ar = generate_ar(runtime, f, PROMPT, max_new_tokens=30, on_tokens=singles.append)
    assert singles == [[t] for t in ar.token_ids]


def _draft_by_levels(draft, ctx, tree, root, root_feat, root_pos):
    """The plain way to fill a tree: each level reruns the layer over every node so far under the tree mask."""
    depths, mask, children = tree.depths(), tree.mask(), tree.children()
    tokens = torch.zeros(tree.size, dtype=torch.long)
    tokens[0] = root
    feats = torch.zeros(1, tree.size, root_feat.shape[-1])  # [1, N, H]
    feats[0, 0] = root_feat.reshape(-1)
    for level in range(int(depths.max())):
        n = int((depths <= level).sum())
        h = draft.layer(tokens[None, :n], feats[:, :n], (root_pos + depths[:n])[None],
                        ctx.attend(root_pos, mask[:n, :n]))  # [1, n, H]
        for i in torch.nonzero(depths[:n] == level).flatten().tolist():
            if children[i]:
                top = torch.topk(draft.logits(h[:, i])[0], max(children[i]) + 1).indices
                for rank, child in children[i].items():
                    tokens[child] = top[rank]
                    feats[0, child] = h[0, i]
    return tokens


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tree", [TokenTree.chain(4), TokenTree.spine(3, 2),
                                  TokenTree.from_paths([(0,), (1,), (0, 0), (1, 0), (1, 1), (1, 0, 0)])])
def test_draft_tree_runs_each_node_once_and_equals_the_plain_way(tiny, trained, tree, backend, monkeypatch):
    """draft_tree (one layer run per inner node, ancestors' keys/values kept) fills the tree as rerunning
    the layer over the whole tree level by level does, on both draft backends."""
    monkeypatch.setenv("SPARROW_DRAFT", backend)
    _, runtime, _ = tiny
    draft, _ = trained
    for seed in (6, 7):
        p = runtime.prepare(_frames(seed), PROMPT)
        state, out = runtime.prefill(p, layers=draft.cfg.target_layers)
        ctx, feats = new_context(draft, out.hidden, p.visual_mask, 512)
        with torch.no_grad():
            want = _draft_by_levels(draft, ctx, tree, 5, feats[:, -1:], state.length)
        got, _ = draft_tree(draft, ctx, tree, 5, feats[:, -1:], state.length)
        assert torch.equal(got, want)


def test_fused_draft_step_matches_the_layer(tiny, trained, monkeypatch):
    """The C++ draft step (csrc/draft_step.cpp) against the layer through the context's attention op, on
    random tokens, features, positions and ancestors; the window context after handoffs too."""
    from sparrow import attention_cpp

    if not attention_cpp.available():
        pytest.skip("the C++ ops do not build here")
    _, runtime, _ = tiny
    draft, _ = trained
    cfg = draft.cfg
    g = torch.Generator().manual_seed(0)
    p = runtime.prepare(_frames(8), PROMPT)
    state, out = runtime.prefill(p, layers=cfg.target_layers)
    ctx, feats = new_context(draft, out.hidden, p.visual_mask, 512)
    for trial in range(6):
        if trial % 2:  # a handoff between rounds: new window slots (Sparrow) or prefix rows (EAGLE)
            extra = torch.randn(1, 3, cfg.hidden_size, generator=g)
            pos = state.length + trial * 3 + torch.arange(3)[None]
            ctx.extend(extra, pos, torch.ones(1, 3, dtype=torch.bool))
        first = state.length + 10 * trial
        token = torch.randint(cfg.vocab_size, (), generator=g)
        feat = torch.randn(1, 1, cfg.hidden_size, generator=g)
        a = trial % 4
        prior = (tuple(torch.randn(1, cfg.num_kv_heads, a, cfg.head_dim, generator=g) for _ in range(2))
                 if a else None)
        outs = {}
        for backend in ("torch", "cpp"):
            monkeypatch.setenv("SPARROW_DRAFT", backend)
            with torch.no_grad():
                outs[backend] = draft.step(token, feat, first + a, ctx, first, prior)
        (h0, (k0, v0), l0), (h1, (k1, v1), l1) = outs["torch"], outs["cpp"]
        for x, y in ((h0, h1), (k0, k1), (v0, v1), (l0, l1)):
            assert x.shape == y.shape
            torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-5)


def test_fused_context_rows_kv_matches_draft_kv(tiny, trained, monkeypatch):
    """`sparrow::draft_kv` (the rows a context takes in each round) against `Draft.kv` on random rows and
    positions; past FUSED_KV_ROWS rows, and under autograd, `context_rows_kv` is `kv` itself."""
    from sparrow import attention_cpp
    from sparrow.draft import FUSED_KV_ROWS

    if not attention_cpp.available():
        pytest.skip("the C++ ops do not build here")
    draft, _ = trained
    monkeypatch.setenv("SPARROW_DRAFT", "cpp")
    g = torch.Generator().manual_seed(1)
    for t in (1, 3, 6, FUSED_KV_ROWS, FUSED_KV_ROWS + 1):
        x = 3 * torch.randn(1, t, draft.cfg.hidden_size, generator=g)  # [1, T, H]
        pos = torch.randint(0, 30000, (1, t), generator=g)  # [1, T]
        with torch.no_grad():
            want = draft.kv(x, pos)
            got = draft.context_rows_kv(x, pos)
        for w, y in zip(want, got):
            assert y.shape == w.shape == (1, draft.cfg.num_kv_heads, t, draft.cfg.head_dim)
            torch.testing.assert_close(y, w, atol=2e-4, rtol=1e-4)
    d = draft.cfg.head_dim
    args = (torch.ones(d // 2), draft.ln_attn.weight, draft.k.weight, draft.v.weight, 1e-6)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="positions must be"):
            torch.ops.sparrow.draft_kv(torch.zeros(2, draft.cfg.hidden_size), torch.zeros(3), *args)
        with pytest.raises(RuntimeError, match="x must be a float32"):
            x64 = torch.zeros(2, draft.cfg.hidden_size, dtype=torch.float64)
            torch.ops.sparrow.draft_kv(x64, torch.zeros(2), *args)


def test_window_context_buffer_holds_glimpses_window_and_ancestors(tiny, trained):
    """What the fused step reads in place: rotated glimpse keys, then the valid ring slots' keys/values
    at their positions, then the ancestors, then a free position; also past the buffer's spare room."""
    from sparrow.draft import rotate

    _, runtime, _ = tiny
    draft, _ = trained
    if draft.cfg.attend != "window":
        pytest.skip("only the Sparrow draft has a window context")
    cfg = draft.cfg
    p = runtime.prepare(_frames(4), PROMPT)
    state, out = runtime.prefill(p, layers=cfg.target_layers)
    ctx, _ = new_context(draft, out.hidden, p.visual_mask, 512)
    g = torch.Generator().manual_seed(2)
    ctx.extend(torch.randn(1, 3, cfg.hidden_size, generator=g), state.length + torch.arange(3)[None],
               torch.ones(1, 3, dtype=torch.bool))
    valid = min(int(ctx.anchors), cfg.window)
    with torch.no_grad():
        kw, vw = draft.kv(ctx.ring[:, :valid], ctx.ring_pos[:, :valid, 0])
        # the round right after the handoff (glimpse keys made by extend), then one starting elsewhere
        for first, a in ((state.length + 3, 0), (state.length + 3, 2), (state.length + 9, ctx.SPARE + 5)):
            kg, vg = draft.kv(ctx.glimpses, None)
            kg = rotate(kg, torch.full((cfg.glimpses,), first - 1), cfg.rope_theta)
            prior = (tuple(torch.randn(1, cfg.num_kv_heads, a, cfg.head_dim, generator=g) for _ in range(2))
                     if a else None)
            k, v = ctx.context_kv(first, prior)
            assert k.shape == v.shape == (cfg.num_kv_heads, cfg.glimpses + valid + a + 1, cfg.head_dim)
            torch.testing.assert_close(k[:, :cfg.glimpses], kg[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, :cfg.glimpses], vg[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(k[:, cfg.glimpses:cfg.glimpses + valid], kw[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, cfg.glimpses:cfg.glimpses + valid], vw[0], atol=2e-5, rtol=1e-5)
            if a:
                assert torch.equal(k[:, cfg.glimpses + valid:-1], prior[0][0])
                assert torch.equal(v[:, cfg.glimpses + valid:-1], prior[1][0])


def test_fused_ops_read_float16_weights_exactly(tiny, trained):
    """A draft whose weights float16 holds exactly (one loaded from its file) gives the fused ops float16
    matrices: the same bits out as their float32 copies. In-place weight updates rebuild them."""
    import copy

    from sparrow import attention_cpp
    from sparrow.draft import _inv_freq

    if not attention_cpp.available():
        pytest.skip("the C++ ops do not build here")
    draft, _ = trained
    cfg = draft.cfg
    rounded = copy.deepcopy(draft)
    with torch.no_grad():
        for prm in rounded.parameters():
            prm.copy_(prm.half().float())
    weights, eps = rounded._step_args()
    assert weights[2].dtype == torch.float16 and weights[1].dtype == torch.float32  # q matrix; ln_attn stays
    full = [w.float() for w in weights]
    g = torch.Generator().manual_seed(3)
    inv = _inv_freq(cfg.head_dim, cfg.rope_theta)
    x_in = torch.randn(2 * cfg.hidden_size, generator=g)
    ctx = [torch.randn(cfg.num_kv_heads, 10, cfg.head_dim, generator=g) for _ in range(2)]
    with torch.no_grad():
        outs = [torch.ops.sparrow.draft_step(x_in, inv, 7, ctx[0].clone(), ctx[1].clone(), w, cfg.rms_norm_eps, eps)
                for w in (weights, full)]
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        x, pos = torch.randn(5, cfg.hidden_size, generator=g), torch.arange(40, 45).float()
        kvs = [torch.ops.sparrow.draft_kv(x, pos, inv, w[1], w[3], w[4], cfg.rms_norm_eps) for w in (weights, full)]
        for a, b in zip(*kvs):
            assert torch.equal(a, b)
        rounded.q.weight.mul_(2)
    assert torch.equal(rounded._step_args()[0][2].float(), rounded.q.weight)


def test_fused_draft_chain_equals_steps():
    """`sparrow::draft_chain` against K calls of `sparrow::draft_step` with the argmax between them in Python,
    on random weights and contexts: the same tokens, and the same keys/values left in the context; with
    end-of-turn ids held back for the first steps, where they would otherwise win."""
    from sparrow import attention_cpp

    if not attention_cpp.available():
        pytest.skip("the C++ ops do not build here")
    h, d, hkv, vocab = 32, 8, 2, 12
    g = torch.Generator().manual_seed(4)
    shapes = ((h, 2 * h), (h,), (2 * d * hkv, h), (hkv * d, h), (hkv * d, h), (h, 2 * d * hkv), (h,), (48, h),
              (48, h), (h, 48), (h,), (vocab, h))
    weights = [1 + 0.1 * torch.randn(s, generator=g) if len(s) == 1 else torch.randn(s, generator=g) / s[1] ** 0.5
               for s in shapes]
    embed, inv = torch.randn(vocab, h, generator=g), 1.0 / 1e4 ** (torch.arange(0, d, 2).float() / d)

    def by_steps(feat, token, k, pos, ctx_k, ctx_v, hold, eos):
        n, out = ctx_k.shape[1] - k, []
        for i in range(k):
            x_in = torch.cat([embed[token], feat])
            feat, kk, vv, logits = torch.ops.sparrow.draft_step(x_in, inv, pos + i, ctx_k[:, :n + i + 1],
                                                                ctx_v[:, :n + i + 1], weights, 1e-6, 1e-5)
            if i < hold:
                logits[list(eos)] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
        return out

    for n, k in ((0, 1), (5, 4), (40, 7)):
        feat = torch.randn(h, generator=g)
        ctx = [torch.randn(hkv, n + k, d, generator=g) for _ in range(2)]
        free = torch.tensor(sorted({int(t) for t in torch.randint(vocab, (2,), generator=g)}))
        for hold, eos in ((0, []), (0, free.tolist()), (k, free.tolist())):
            if hold:  # hold back what the free chain picked first, so the hold changes the outcome
                eos = sorted(set(eos) | {int(free_chain[0])})
            fused = [c.clone() for c in ctx]
            got = torch.ops.sparrow.draft_chain(feat, 3, k, 100 + n, *fused, embed, inv, weights, 1e-6, 1e-5, hold, eos)
            stepped = [c.clone() for c in ctx]
            assert got.dtype == torch.long and got.tolist() == by_steps(feat, 3, k, 100 + n, *stepped, hold, eos)
            assert torch.equal(fused[0], stepped[0]) and torch.equal(fused[1], stepped[1])
            assert not set(got.tolist()[:hold]) & set(eos)
            if not hold:
                free_chain = got
    with pytest.raises(RuntimeError, match="fewer than the 3 free ones"):
        torch.ops.sparrow.draft_chain(feat, 3, 3, 0, ctx[0][:, :2], ctx[1][:, :2], embed, inv, weights, 1e-6, 1e-6,
                                      0, [])
    with pytest.raises(RuntimeError, match="token 12 outside the vocabulary"):
        torch.ops.sparrow.draft_chain(feat, 12, 1, 0, *ctx, embed, inv, weights, 1e-6, 1e-6, 0, [])
    with pytest.raises(RuntimeError, match="embed must be"):
        torch.ops.sparrow.draft_chain(feat, 1, 1, 0, *ctx, embed[:, :3], inv, weights, 1e-6, 1e-6, 0, [])


def test_fused_draft_step_names_bad_input():
    from sparrow import attention_cpp

    if not attention_cpp.available():
        pytest.skip("the C++ ops do not build here")
    h, d, hkv = 16, 8, 2
    weights = [torch.zeros(s) for s in ((h, 2 * h), (h,), (2 * d * hkv, h), (hkv * d, h), (hkv * d, h),
                                         (h, 2 * d * hkv), (h,), (32, h), (32, h), (h, 32), (h,), (10, h))]
    inv = torch.ones(d // 2)
    ctx, ctx_v = torch.zeros(hkv, 3, d), torch.zeros(hkv, 3, d)  # the op writes its own key/value into both
    out = torch.ops.sparrow.draft_step(torch.zeros(2 * h), inv, 0, ctx, ctx_v, weights, 1e-6, 1e-6)
    assert [t.shape for t in out] == [(h,), (hkv * d,), (hkv * d,), (10,)]
    with pytest.raises(RuntimeError, match="free last position"):
        torch.ops.sparrow.draft_step(torch.zeros(2 * h), inv, 0, ctx[:, :0], ctx_v[:, :0], weights, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="ctx_v must be"):
        torch.ops.sparrow.draft_step(torch.zeros(2 * h), inv, 0, ctx, torch.zeros(hkv, 4, d), weights, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="gate must be"):
        bad = weights[:7] + [torch.zeros(32, h + 1)] + weights[8:]
        torch.ops.sparrow.draft_step(torch.zeros(2 * h), inv, 0, ctx, ctx_v, bad, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="x_in must be a float32"):
        torch.ops.sparrow.draft_step(torch.zeros(2 * h, dtype=torch.float64), inv, 0, ctx, ctx_v, weights, 1e-6, 1e-6)


def test_draft_backend_env_rejects_unknown(monkeypatch):
    from sparrow.draft import step_backend

    monkeypatch.setenv("SPARROW_DRAFT", "fast")
    with pytest.raises(ValueError, match="SPARROW_DRAFT"):
        step_backend(torch.zeros(1))

"""The owned-cache runtime against transformers' own forward, and its attention against a plain reference."""

import pytest
import torch

import tiny_models
from attention_cases import random_tree_mask
from sparrow.attention import multi_token_attention, reference_attention
from sparrow.demo.world import make_scene, render
from sparrow.generate import generate_ar
from sparrow.kv_cache import SlotKVCache
from sparrow.runtime import Runtime
from sparrow.target import Target, TargetError

ARCHS = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
PROMPT = "describe the video ."
TREE = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
DEPTHS = torch.tensor([0, 1, 1, 2])


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    path = tiny_models.build(request.param, tmp_path_factory.mktemp(request.param))
    # chunk of 16 so the tiny prompts are prefilled in several chunks
    return Target.load(path), Runtime(Target.load(path), max_len=256, slots=3, prefill_chunk=16)


def _frames(seed=2, n=12):
    return render(make_scene(seed), n, 48, 64)  # [n, 48, 64, 3]


def test_prefill_and_steps_match_transformers(pair):
    ref, rt = pair
    p = ref.prepare(_frames(), PROMPT)
    layers = (1, ref.num_layers)
    s_ref, o_ref = ref.prefill(p, layers=layers)
    s_rt, o_rt = rt.prefill(p, layers=layers)
    assert s_rt.length == s_ref.length and s_rt.pos_delta == s_ref.pos_delta
    torch.testing.assert_close(o_rt.logits, o_ref.logits[:, -1:], atol=1e-4, rtol=1e-4)
    for layer in layers:
        torch.testing.assert_close(o_rt.hidden[layer], o_ref.hidden[layer], atol=1e-4, rtol=1e-4)
    for tokens, mask, depths in [([[10, 11, 13, 12]], TREE, DEPTHS), ([[7, 8, 9]], None, None), ([[5]], None, None)]:
        tokens = torch.tensor(tokens)
        a = ref.step(s_ref, tokens, tree_mask=mask, depths=depths, layers=(2,))
        b = rt.step(s_rt, tokens, tree_mask=mask, depths=depths, layers=(2,))
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.hidden[2], a.hidden[2], atol=1e-4, rtol=1e-4)
        ref.truncate(s_ref, s_ref.length - tokens.shape[1] + 1)  # keep the first token, as after a rejection
        rt.truncate(s_rt, s_rt.length - tokens.shape[1] + 1)
        assert s_rt.length == s_ref.length


def test_ar_on_runtime_equals_transformers_generate(pair):
    ref, rt = pair
    for seed in range(2):
        f = _frames(seed, 4 + 8 * seed)
        p = ref.prepare(f, PROMPT)
        hf = ref.model.generate(input_ids=p.input_ids, **p.model_inputs, max_new_tokens=20, do_sample=False)
        assert generate_ar(rt, f, PROMPT, max_new_tokens=20).token_ids == hf[0, p.input_ids.shape[1]:].tolist()


def test_question_before_video_prompt_decodes_like_transformers(tmp_path):
    """A model whose chat template puts the question first: its text precedes the visual tokens in
    the prompt (M-RoPE positions then start the video after text), and the runtime still equals generate."""
    path = tiny_models.build("qwen2_vl", tmp_path, text_first=True)
    ref, rt = Target.load(path), Runtime(Target.load(path), max_len=256, prefill_chunk=16)
    f = _frames(3, 8)
    p = ref.prepare(f, PROMPT)
    ids = p.input_ids[0].tolist()
    video = ref.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert ids.index(ref.tokenizer.convert_tokens_to_ids("describe")) < ids.index(video)
    hf = ref.model.generate(input_ids=p.input_ids, **p.model_inputs, max_new_tokens=20, do_sample=False)
    assert generate_ar(rt, f, PROMPT, max_new_tokens=20).token_ids == hf[0, p.input_ids.shape[1]:].tolist()


def test_batch_of_sequences_at_different_lengths(pair):
    _, rt = pair
    states, alone = [], []
    for slot, (seed, n) in enumerate([(1, 4), (2, 8)]):
        p = rt.prepare(_frames(seed, n), PROMPT)
        st, _ = rt.prefill(p, slot=slot)
        alone.append(rt.step(st, torch.tensor([[10, 11]])).logits)
        rt.truncate(st, st.length - 2)
        states.append(st)
    assert states[0].length != states[1].length
    both = rt.step_batch(states, torch.tensor([[10, 11], [10, 11]])).logits
    torch.testing.assert_close(both[0:1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:2], alone[1], atol=1e-5, rtol=1e-5)


def test_rollback_limits(pair):
    _, rt = pair
    st, _ = rt.prefill(rt.prepare(_frames(), PROMPT))
    with pytest.raises(TargetError, match="prompt is"):
        rt.truncate(st, st.prompt_length - 1)
    with pytest.raises(ValueError, match="cannot truncate"):
        rt.truncate(st, st.length + 1)
    with pytest.raises(ValueError, match="exceed the cache's max length"):
        rt.step(st, torch.zeros(1, 256, dtype=torch.long))


@pytest.mark.parametrize("hq,hkv,past,t,block", [(4, 2, 0, 7, 3), (4, 4, 37, 1, 512), (8, 2, 101, 6, 512),
                                                 (6, 3, 19, 16, 5), (4, 1, 250, 4, 2)])
@pytest.mark.parametrize("tree", [False, True])
def test_attention_matches_reference(hq, hkv, past, t, block, tree):
    g = torch.Generator().manual_seed(hq * 1000 + past + t)
    d = 16
    q = torch.randn(hq, t, d, generator=g)
    kbuf = torch.randn(hkv, past + t + 9, d, generator=g)  # a buffer longer than the live part
    vbuf = torch.randn(hkv, past + t + 9, d, generator=g)
    mask = random_tree_mask(t, g) if tree else torch.ones(t, t, dtype=torch.bool).tril_()
    out = torch.full((hq, t, d), float("nan"))  # poisoned: any element left unwritten fails
    multi_token_attention(q, kbuf, vbuf, past, mask, 0.25, block=block, out=out)
    ref = reference_attention(q, kbuf[:, :past + t], vbuf[:, :past + t], past, mask, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not a multiple"):
        multi_token_attention(torch.zeros(3, 1, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), 3,
                              torch.ones(1, 1, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="need past"):
        multi_token_attention(torch.zeros(2, 2, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), 3,
                              torch.ones(2, 2, dtype=torch.bool), 1.0)


def test_cache_writes_in_place_without_reallocating():
    c = SlotKVCache(num_layers=2, slots=2, kv_heads=1, head_dim=4, max_len=8)
    k_ptr = c.k.data_ptr()
    c.begin([1], 3, torch.ones(3, 3, dtype=torch.bool).tril_())
    k, v = c.update(torch.ones(1, 1, 3, 4), torch.full((1, 1, 3, 4), 2.0), layer_idx=1)
    c.commit()
    assert c.lengths == [0, 3] and c.k.data_ptr() == k_ptr and k.data_ptr() == c.k[1].data_ptr()
    assert c.k[1, 1, 0, :3].eq(1).all() and c.k[1, 0].eq(0).all() and c.v[1, 1, 0, :3].eq(2).all()
    c.truncate(1, 1)
    c.begin([1], 1, torch.ones(1, 1, dtype=torch.bool))
    c.update(torch.full((1, 1, 1, 4), 5.0), torch.zeros(1, 1, 1, 4), layer_idx=1)
    c.commit()
    assert c.lengths == [0, 2] and c.k[1, 1, 0, 1].eq(5).all()


def test_precomputed_visual_embeddings_prefill_exactly_like_pixels(pair):
    """Triton's split (vision_encoder, then sparrow_llm): the tower's embeddings + the patch grid give the same
    prompt and the same logits as the pixels, on the runtime and on transformers' own path."""
    ref, rt = pair
    p = ref.prepare(_frames(), PROMPT)
    if ref.arch == "llava_onevision":
        with pytest.raises(TargetError, match="Qwen2-VL"):
            ref.prepare_embedded(PROMPT, torch.zeros(1, ref.hidden_size), torch.tensor([1, 1, 1]))
        return
    embeds = ref.visual_features(p.model_inputs)  # [M, H]
    grid = p.model_inputs["video_grid_thw"][0]  # [3]
    e = ref.prepare_embedded(PROMPT, embeds, grid)
    assert torch.equal(e.input_ids, p.input_ids) and "pixel_values_videos" not in e.model_inputs
    for model in (ref, rt):
        assert torch.equal(model.prefill(e)[1].logits, model.prefill(p)[1].logits)
    with pytest.raises(TargetError, match="visual embeddings must be"):
        ref.prepare_embedded(PROMPT, embeds[1:], grid)

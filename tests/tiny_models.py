"""Tiny random Hugging Face Vid-LLMs of each supported architecture, saved with save_pretrained."""

from pathlib import Path

import torch

from sparrow.demo.tokenizer import build_tokenizer

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)


def _ids(tok):
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"))


def build(arch: str, out: Path, seed: int = 0, text_first: bool = False) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    tok = build_tokenizer(text_first)
    c = tok.convert_tokens_to_ids
    text = dict(TEXT, vocab_size=len(tok), bos_token_id=None, eos_token_id=c("<|im_end|>"),
                pad_token_id=tok.pad_token_id)
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if arch == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(
            text_config=dict(text, rope_parameters=mrope),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                               patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
            vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"), **_ids(tok))
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    elif arch == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=mrope),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                               fullatt_block_indexes=[1]),
            vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"), **_ids(tok))
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
    elif arch == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            text_config=dict(text, model_type="qwen2"),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
            vision_feature_layer=-1, vision_feature_select_strategy="full", **_ids(tok))
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    model.generation_config.eos_token_id = c("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

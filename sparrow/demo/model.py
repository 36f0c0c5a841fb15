"""The embedded demo target: a tiny Qwen2-VL (real transformers class) sized for a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

from .tokenizer import build_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_TARGET_DIR = ASSETS / "demo_target"
DEMO_DRAFTS = {"sparrow": ASSETS / "demo_draft", "eagle": ASSETS / "demo_eagle"}


def demo_config(tokenizer=None):
    """Qwen2VLConfig for the demo target: 4 text layers, GQA (4 query / 2 KV heads), M-RoPE.

    Vision: 8-pixel patches, 2x2 spatial merge, 2-frame temporal patches, so one visual token
    covers 16x16 pixels over two frames (a 64x64, 32-frame video is 256 visual tokens).
    """
    from transformers import Qwen2VLConfig

    tok = tokenizer or build_tokenizer()
    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            # M-RoPE splits head_dim/2 = 32 rotary pairs over (time, height, width)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [8, 12, 12]},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(depth=2, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )

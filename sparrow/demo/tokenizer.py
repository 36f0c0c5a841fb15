"""The demo task's word-level tokenizer, saved as a standard `tokenizer.json` with a chat template."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from .text import vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")
ROLES = ("system", "user", "assistant")

# Qwen-style turns; word-level tokens need no newlines, so a space separates role and content.
def chat_template(text_first: bool = False) -> str:
    """The user turn's parts in message order, or (text_first) its text before its video, so that
    every visual token can attend to the question (attention is causal)."""
    video = "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% endif %}"
    text = "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    loop = "{% for part in message['content'] %}"
    parts = (loop + text + "{% endfor %}" + loop + video + "{% endfor %}") if text_first else \
        (loop + video + text + "{% endfor %}")
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }} "
            "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}" + parts + "{% endif %}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def build_tokenizer(text_first: bool = False):
    """A transformers fast tokenizer over the demo vocabulary (special tokens first, fixed ids)."""
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + list(ROLES) + vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens={"video_token": "<|video_pad|>", "image_token": "<|image_pad|>",
                              "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"},
    )
    fast.chat_template = chat_template(text_first)
    return fast


def save_tokenizer(out_dir: str | Path):
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok

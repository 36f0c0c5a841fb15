import numpy as np
import pytest
import torch

from sparrow.demo.tokenizer import build_tokenizer
from sparrow.processing import VisionSpec, build_batch, fit_size, patchify, prompt_ids


@pytest.mark.parametrize("patch,merge,h,w", [(8, 2, 64, 96), (14, 2, 56, 84), (4, 1, 12, 20)])
def test_patchify_matches_transformers_processor(patch, merge, h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(patch + h)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    spec = VisionSpec(patch_size=patch, temporal_patch_size=2, merge_size=merge)
    hf = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=merge, do_resize=False)
    ref = hf(images=[img], return_tensors="pt")
    mine = patchify(np.stack([img, img]), spec)  # an image is a 2-frame still video
    assert torch.equal(mine.grid_thw, ref["image_grid_thw"][0])
    torch.testing.assert_close(mine.pixel_values, ref["pixel_values"], atol=1e-5, rtol=1e-5)
    assert mine.num_tokens == h * w // (patch * merge) ** 2


def test_odd_frame_count_pads_with_last_frame():
    spec = VisionSpec(patch_size=8, merge_size=2)
    f = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    a = patchify(f, spec)
    b = patchify(np.concatenate([f, f[-1:]]), spec)
    assert torch.equal(a.pixel_values, b.pixel_values) and a.grid_thw.tolist() == [2, 2, 2]


def test_fit_size_and_bad_size():
    spec = VisionSpec(patch_size=8, merge_size=2)
    assert fit_size(70, 100, spec) == (64, 96)
    assert fit_size(3, 3, spec) == (16, 16)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        patchify(np.zeros((2, 20, 16, 3), np.uint8), spec)
    with pytest.raises(ValueError, match="patch_size"):
        VisionSpec(patch_size=0)


def test_prompt_expansion_and_batch_labels():
    tok = build_tokenizer()
    spec = VisionSpec(patch_size=8, merge_size=2)
    video = tok.convert_tokens_to_ids("<|video_pad|>")
    ids = prompt_ids(tok, "how many shapes are there ?", 7)
    assert ids.count(video) == 7 and tok.unk_token_id not in ids
    f = np.zeros((4, 32, 32, 3), np.uint8)
    batch = build_batch(tok, spec, [(f, "describe the video .", "a red square appears ."),
                                    (f[:2], "how many shapes are there ?", "one")])
    assert batch["input_ids"].shape[0] == 2
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]
    assert (batch["mm_token_type_ids"] == 2).sum(1).tolist() == [8, 4]
    lab = batch["labels"][1]
    supervised = lab[lab != -100].tolist()
    assert tok.decode(supervised) == "one <|im_end|>"
    # padding is neither attended nor supervised
    pad = batch["attention_mask"][1] == 0
    assert pad.any() and (batch["labels"][1][pad] == -100).all()

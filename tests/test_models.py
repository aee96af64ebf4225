"""models.py: a checkpoint loads through the auto classes, trains and generates with images; the torchvision-free
processor matches the official Qwen2.5-VL processor."""
import numpy as np
import pytest
import torch
from PIL import Image

import models


def _image(w, h, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def test_loads_through_auto_classes(tiny_dir):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    m, p = models.load_policy(tiny_dir, dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    assert isinstance(p, models.VLProcessor)


def test_load_policy_rejects_other_families(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        models.load_policy(tmp_path)


def test_protocol_tags_are_few_tokens(tiny_policy):
    _, p = tiny_policy
    for tag in ("<code>", "</code>", "<answer>", "\\boxed{", "<interpreter>", "image_clue_0"):
        assert len(p.encode_text(tag)) <= 5, tag


def test_forward_backward_generate_with_image(tiny_policy):
    model, p = tiny_policy
    text = p.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}])
    inputs = p([text], images=[_image(300, 200)])
    n_pad = int((inputs["input_ids"] == p.image_pad_id).sum())
    assert n_pad == p.tokens_for_grid(inputs["image_grid_thw"][0]) == p.geometry.image_tokens(300, 200)
    assert (inputs["mm_token_type_ids"] == models.MM_IMAGE).sum() == n_pad
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
    model.zero_grad()
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


def test_mm_token_type_ids_change_positions(tiny_policy):
    # Without mm_token_type_ids Qwen2.5-VL silently uses 1-D positions; the logits must differ, proving we pass them.
    model, p = tiny_policy
    text = p.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a b c"}]}])
    inputs = p([text], images=[_image(224, 224)])
    with torch.no_grad():
        with_types = model(**inputs).logits
        without = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert not torch.allclose(with_types, without)


def test_processor_matches_official_for_images(tiny_dir, tiny_policy):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):  # the official class minus its torchvision-only video check
        def check_argument_for_proper_class(self, name, arg):
            return None if (name == "video_processor" and arg is None) else super().check_argument_for_proper_class(name, arg)

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    official = ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(tiny_dir), tokenizer=tok,
                                  video_processor=None, chat_template=tok.chat_template)
    _, ours = tiny_policy
    images = [_image(150, 100, 1), _image(640, 480, 2)]
    text = ours.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "first"}, {"type": "image"}, {"type": "text", "text": "second"}]}])
    theirs = official(text=[text], images=images, return_tensors="pt")
    mine = ours([text], images=images)
    for key in ("input_ids", "attention_mask", "image_grid_thw", "pixel_values", "mm_token_type_ids"):
        assert torch.equal(mine[key], theirs[key]), key


def test_video_patches_and_counts(tiny_policy):
    model, p = tiny_policy
    frames = (np.random.default_rng(0).random((5, 112, 140, 3)) * 255).astype(np.uint8)
    text = p.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}])
    inputs = p([text], videos=[frames], video_fps=1.0)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert (t, h, w) == p.geometry.video_grid(5, 140, 112) == (3, 8, 10)
    assert int((inputs["input_ids"] == p.video_pad_id).sum()) == p.geometry.video_tokens(5, 140, 112) == 60
    assert inputs["pixel_values_videos"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert inputs["second_per_grid_ts"].tolist() == [2.0]
    assert torch.isfinite(model(**inputs).logits).all()


def test_pad_count_mismatch_is_an_error(tiny_policy):
    _, p = tiny_policy
    with pytest.raises(ValueError, match="placeholders"):
        p(["no image here"], images=[_image(64, 64)])


def test_geometry_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    g = models.VisionGeometry(min_pixels=3136, max_pixels=2_000_000)
    for h, w in [(100, 150), (480, 640), (3000, 4000), (28, 5000), (33, 33)]:
        assert g.resized_hw(h, w) == smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=2_000_000)
    with pytest.raises(ValueError, match="aspect ratio"):
        g.resized_hw(10, 2500)

"""models.py — the policy: a Qwen2.5-VL-family checkpoint and a processor that runs without torchvision.

What this file is
    PyVision-RL trains Qwen2.5-VL-7B (method.md §1, §8). Everything else in this project talks to the policy through
    two objects returned by `load_policy(name_or_path)`:
      * the model, an `AutoModelForImageTextToText` (Qwen2-VL, Qwen2.5-VL or Qwen3-VL);
      * a `VLProcessor`, which turns chat text plus images/video frames into `input_ids`, `attention_mask`,
        `mm_token_type_ids`, `pixel_values`, `image_grid_thw` (and the video equivalents).
    `build_tiny(out_dir)` writes a deterministic, random-weight Qwen2.5-VL with an offline-trained byte-level BPE tokenizer,
    so tests and the CPU demo use the very same loading path a 7B checkpoint uses. The demo size then gets a few minutes
    of text-only copy pretraining (`pretrain_copying`), the one pretrained skill the method leans on that a random
    model lacks: repeating a number it has read.

Why our own processor
    In transformers 5.x `AutoProcessor` for the Qwen-VL family requires torchvision (its video processor does), and PyPI's
    torchvision breaks next to the CPU torch wheel (environment.md §1, §3). `VLProcessor` uses the PIL image processor that
    transformers ships (`Qwen2VLImageProcessorPil`), a numpy patchifier for video with the official patch layout, and does the
    `<|image_pad|>` expansion itself. For images it yields the same `input_ids`, `image_grid_thw`, `pixel_values` and
    `mm_token_type_ids` as the official `Qwen2_5_VLProcessor` (tests/test_models.py checks this). `mm_token_type_ids` is always
    produced: transformers 5.x silently falls back to 1-D positions for Qwen2.5-VL without it (environment.md §3, pitfall 1).

How to run
    python models.py tiny --out runs/tiny --size test      # ~1 M params, for tests
    python models.py tiny --out runs/tiny-demo --size demo  # the CPU demo's policy (with ~8 min of copy pretraining)
    python -c "from models import load_policy; m, p = load_policy('Agents-X/PyVision-Image-7B-SFT', dtype='bfloat16', device='cuda')"

Differences from the official code
    * The official pipeline resizes in-context images with `qwen_vl_utils.fetch_image(min_pixels=3136, max_pixels=2e6)`
      before the processor; here the same bounds are processor settings (`min_pixels`/`max_pixels` of `load_policy`), which
      gives the same grid (both use `smart_resize` with factor 28).
    * Video through `VLProcessor` follows Qwen2-VL/Qwen2.5-VL; Qwen3-VL's timestamped video prompts are not reproduced
      (PyVision-Video keeps video out of the context anyway: video_context.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# Qwen's special tokens, in the order Qwen2.5-VL assigns them. The tiny tokenizer reserves the same set so every
# code path (chat template, pad expansion, token-type ids) is exercised exactly as with the real vocabulary.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END    # one image before expansion
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
MM_TEXT, MM_IMAGE, MM_VIDEO = 0, 1, 2                          # values of mm_token_type_ids

# Same behaviour as Qwen2.5-VL's template: a default system turn when none is given, images/videos as placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


# ---------------------------------------------------------------------------------------------------------------------
# Visual geometry: how many tokens an image or a clip costs
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionGeometry:
    """The resize rule and patching of a Qwen-VL processor; enough to count visual tokens without running it."""
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 14 * 14 * 4 * 1280

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Qwen's `smart_resize`: both sides multiples of patch*merge, pixel count within [min, max], aspect kept."""
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"aspect ratio of a {width}x{height} image is above 200; Qwen-VL cannot encode it")
        f = self.factor
        h, w = round(height / f) * f, round(width / f) * f
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h, w

    def image_grid(self, width: int, height: int) -> tuple[int, int, int]:
        h, w = self.resized_hw(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def image_tokens(self, width: int, height: int) -> int:
        t, gh, gw = self.image_grid(width, height)
        return t * gh * gw // self.merge_size ** 2

    def video_grid(self, num_frames: int, width: int, height: int) -> tuple[int, int, int]:
        h, w = self.resized_hw(height, width)
        return math.ceil(num_frames / self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def video_tokens(self, num_frames: int, width: int, height: int) -> int:
        t, gh, gw = self.video_grid(num_frames, width, height)
        return t * gh * gw // self.merge_size ** 2


# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------

class VLProcessor:
    """Text + images (+ video frames) -> model inputs for the Qwen-VL family, without torchvision.

    `__call__(texts, images, videos)` takes chat text that holds one `<|image_pad|>` per image (and one `<|video_pad|>` per
    video), in the order of `images`/`videos`, and expands each pad to the image's token count.
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        size = image_processor.size
        self.geometry = VisionGeometry(
            patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
            temporal_patch_size=image_processor.temporal_patch_size,
            min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]))
        self.image_mean = np.asarray(image_processor.image_mean, np.float32)
        self.image_std = np.asarray(image_processor.image_std, np.float32)
        ids = tokenizer.convert_tokens_to_ids
        self.image_pad_id, self.video_pad_id = ids(IMAGE_PAD), ids(VIDEO_PAD)
        self.vision_start_id, self.vision_end_id = ids(VISION_START), ids(VISION_END)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids("<|endoftext|>")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        if min_pixels is not None or max_pixels is not None:
            size = dict(image_processor.size)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(
                path, size={"shortest_edge": min_pixels or size["shortest_edge"],
                            "longest_edge": max_pixels or size["longest_edge"]})
        return cls(tokenizer, image_processor)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    # --- text -----------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (pads must already be expanded). No BOS is ever added: Qwen has none."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # --- images and video -------------------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values (N_patches, 3*T*P*P) and image_grid_thw (N_images, 3)."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.image_processor(rgb, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def encode_video(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """(T, H, W, 3) uint8 frames -> pixel_values_videos (N_patches, 3*tps*P*P) and its [t, h, w] grid.

        Same patch order as transformers' Qwen2VLVideoProcessor (checked bit-exact in environment.md §3); resizing is PIL
        bicubic on uint8, which differs slightly from torchvision's resampler when a resize is needed.
        """
        g = self.geometry
        frames = np.asarray(frames)
        num_frames, height, width, _ = frames.shape
        rh, rw = g.resized_hw(height, width)
        if (rh, rw) != (height, width):
            frames = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames])
        x = ((frames.astype(np.float32) / 255.0 - self.image_mean) / self.image_std).transpose(0, 3, 1, 2)  # (T, 3, H, W)
        if pad := -num_frames % g.temporal_patch_size:  # repeat the last frame to fill the last temporal patch
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)], 0)
        t, gh, gw = x.shape[0] // g.temporal_patch_size, rh // g.patch_size, rw // g.patch_size
        m, p, tp = g.merge_size, g.patch_size, g.temporal_patch_size
        x = x.reshape(t, tp, 3, gh // m, m, p, gw // m, m, p)          # split time, rows, cols into (merge, patch) blocks
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)                      # (t, gh/m, gw/m, m, m, 3, tp, p, p)
        return torch.from_numpy(np.ascontiguousarray(x).reshape(t * gh * gw, 3 * tp * p * p)), [t, gh, gw]

    def tokens_for_grid(self, grid: Sequence[int]) -> int:
        return int(grid[0]) * int(grid[1]) * int(grid[2]) // self.geometry.merge_size ** 2

    def expand_pads(self, text: str, image_grids: Sequence, video_grids: Sequence = ()) -> str:
        """Replace the k-th single `<|image_pad|>` with as many pads as image k has tokens (same for video)."""
        for pad, grids in ((IMAGE_PAD, image_grids), (VIDEO_PAD, video_grids)):
            pieces = text.split(pad)
            if len(pieces) - 1 != len(grids):
                raise ValueError(f"text has {len(pieces) - 1} {pad} placeholders but {len(grids)} inputs were given")
            text = pieces[0] + "".join(pad * self.tokens_for_grid(g) + rest for g, rest in zip(grids, pieces[1:]))
        return text

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.full_like(input_ids, MM_TEXT)
        types[input_ids == self.image_pad_id] = MM_IMAGE
        types[input_ids == self.video_pad_id] = MM_VIDEO
        return types

    def __call__(self, texts: str | Sequence[str], images: Sequence[Image.Image] | None = None,
                 videos: Sequence[np.ndarray] | None = None, video_fps: float | Sequence[float] = 2.0) -> dict:
        """Batch of chat texts -> model inputs (left-padded). Images/videos are consumed in order across the batch."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out: dict[str, torch.Tensor] = {}
        image_grids, video_grids = [], []
        if images:
            out["pixel_values"], out["image_grid_thw"] = self.encode_images(images)
            image_grids = out["image_grid_thw"].tolist()
        if videos:
            patches, video_grids = zip(*(self.encode_video(v) for v in videos))
            fps = [video_fps] * len(videos) if isinstance(video_fps, (int, float)) else list(video_fps)
            out["pixel_values_videos"] = torch.cat(patches)
            out["video_grid_thw"] = torch.tensor(video_grids)
            # seconds per temporal patch: Qwen2.5-VL uses it for the time axis of M-RoPE
            out["second_per_grid_ts"] = torch.tensor([self.geometry.temporal_patch_size / f for f in fps])
        expanded, i, v = [], 0, 0
        for text in texts:
            n_img, n_vid = text.count(IMAGE_PAD), text.count(VIDEO_PAD)
            expanded.append(self.expand_pads(text, image_grids[i:i + n_img], video_grids[v:v + n_vid]))
            i, v = i + n_img, v + n_vid
        if i != len(image_grids) or v != len(video_grids):
            raise ValueError(f"{len(image_grids)} images / {len(video_grids)} videos were given but the texts hold "
                             f"{i} / {v} placeholders")
        input_ids, attention_mask = self.pad([self.encode_text(t) for t in expanded], side="left")
        out.update(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=self.mm_token_type_ids(input_ids))
        return out

    def pad(self, rows: Sequence[Sequence[int]], side: str = "left", value: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows -> (ids (B, T), attention_mask (B, T)), padded on `side` with `value` (default: the pad id).
        Generation pads on the left (new tokens line up at the end); training pads on the right."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id if value is None else value, dtype=torch.long)   # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)                                           # (B, T)
        for b, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[b, cols] = torch.tensor(list(r), dtype=torch.long)
            mask[b, cols] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'")
    return table[dtype]


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False):
    """Yield a temp directory beside `path` that becomes `path` only when the block completes, so no later stage ever
    trusts a half-written checkpoint (a kill leaves only the `.tmp_` directory, removed by the next attempt). An
    existing `path` is replaced only with `replace=True`; otherwise it is refused, never written into."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; refusing to write into it (remove it or choose another directory)")
    tmp = path.with_name(f".tmp_{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_policy(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device: str = "cpu",
                attn_implementation: str = "sdpa", min_pixels: int | None = None, max_pixels: int | None = None):
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (hub name or local dir) -> (model, VLProcessor).

    `min_pixels`/`max_pixels` override the checkpoint's resize bounds (PyVision-RL uses 3136 and 2,000,000).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not one of {SUPPORTED_FAMILIES}")
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation).to(device)
    return model, VLProcessor.from_pretrained(name_or_path, min_pixels=min_pixels, max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------------------------------
# The tiny offline checkpoint
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinySize:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_depth: int
    min_pixels: int
    max_pixels: int
    copy_steps: int = 0      # steps of copy pretraining (see pretrain_copying); 0 leaves the weights random


TINY_SIZES = {
    # forward+backward of 8x512 tokens in ~0.3 s on 2 cores (environment.md §4)
    "test": TinySize(vocab_size=1024, hidden=128, layers=2, heads=4, kv_heads=2, vision_hidden=64, vision_depth=2,
                     min_pixels=56 * 56, max_pixels=224 * 224),
    # the CPU demo's policy: one GRPO step of 8 rollouts stays within ~10 s (environment.md §4)
    "demo": TinySize(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=2, vision_hidden=128, vision_depth=2,
                     min_pixels=56 * 56, max_pixels=224 * 224, copy_steps=800),
}

# Strings the policy must write and read cheaply: the PyVision protocol (method.md §2) and the runtime's names.
PROTOCOL_SNIPPETS = [
    "<code>\n```python\n", "\n```\n</code>", "<answer>\n\\boxed{", "}\n</answer>",
    "<tool_response>\n<interpreter>\nText Result:\n", "\nImage Result:\n", "</interpreter>\n\n</tool_response>",
    "<image_clue_0>", "</image_clue_0>", "<image_clue_1>", "</image_clue_1>", "image_clue_0", "video_clue_0",
    "plt.show()", "plt.imshow(", "print(", "np.array(", ".crop((", ".getpixel((", "len(video_clue_0)",
    "video_clue_0.get_avg_fps()", ".asnumpy()", "get_batch(", "Image Width: ", "; Image Height: ",
    "Frame Width: ", "; Frame Height: ", "Video Length: ", "; Sample FPS: ",
]


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """A fixed text corpus for the tiny BPE: protocol strings plus synthetic questions and solution code.

    It is generated, not read from disk, so the tokenizer (and hence the checkpoint) is byte-identical on every machine.
    """
    import data      # late imports: neither module needs models.py at import time
    import rollout
    texts = [s * 20 for s in PROTOCOL_SNIPPETS]
    texts += [template * 5 for templates in rollout.BUILTIN_TEMPLATES.values() for template in templates.values()]
    tasks = data.generate_image_tasks(n=120, seed=seed, out_dir=None) + data.generate_video_tasks(n=40, seed=seed, out_dir=None)
    for task in tasks:
        texts.append(task.question + "\n" + task.solution_code + f"\n<answer>\n\\boxed{{{task.answer}}}\n</answer>")
    return texts


def build_tokenizer(vocab_size: int, corpus: Sequence[str]):
    """Byte-level BPE trained on `corpus`, with Qwen's special tokens and chat template. Like Qwen's tokenizer it
    splits numbers into single digits, so a number is the same tokens wherever it appears (question, code, output)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE,
                                        padding_side="left")   # saved with the tokenizer, as Qwen-VL releases do
    return tokenizer


def tiny_config(tokenizer, size: TinySize):
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    half_head = size.hidden // size.heads // 2
    # M-RoPE splits each head's rotary half-dimension into (time, height, width) sections that must sum to it
    spatial = (half_head - half_head // 4) // 2
    mrope_section = [half_head - 2 * spatial, spatial, spatial]
    text = dict(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.hidden * 3,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=size.vision_depth, hidden_size=size.vision_hidden, intermediate_size=size.vision_hidden * 2,
                  num_heads=2, out_hidden_size=size.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[size.vision_depth - 1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids(IMAGE_PAD),
                            video_token_id=ids(VIDEO_PAD), vision_start_token_id=ids(VISION_START),
                            vision_end_token_id=ids(VISION_END), tie_word_embeddings=True)


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, size: str = "test", copy_steps: int | None = None) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint + tokenizer + image processor to `out_dir`, then `copy_steps` of copy
    pretraining (default: the size's). Same seed, same bytes."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose from {sorted(TINY_SIZES)}")
    spec = TINY_SIZES[size] if copy_steps is None else dataclasses.replace(TINY_SIZES[size], copy_steps=copy_steps)
    # an empty directory (a fresh mkdtemp) may be filled; anything else that exists is the user's and is refused
    empty = Path(out_dir).is_dir() and not any(Path(out_dir).iterdir())
    with atomic_dir(out_dir, replace=empty) as out:
        tokenizer = build_tokenizer(spec.vocab_size, tokenizer_corpus(seed))
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, spec))
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        Qwen2VLImageProcessorPil(size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
                                 ).save_pretrained(out)
        (out / "tiny.json").write_text(json.dumps({"size": size, "seed": seed, **spec.__dict__}, indent=1))
        if spec.copy_steps:
            model, processor = load_policy(out)
            log = pretrain_copying(model, processor, spec.copy_steps, seed=seed)
            model.save_pretrained(out)
            (out / "copy_pretraining.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Skills pretraining: what a pretrained VLM already knows and a random tiny one does not
# ---------------------------------------------------------------------------------------------------------------------
# PyVision-RL starts from Qwen2.5-VL, which can copy a number it has just read. The method relies on that twice: code
# reuses the coordinates given in the question, and the answer repeats what the code printed. A random 4 M-parameter
# model does not learn copying from a cold start of a few thousand trajectories (measured: after 512 SFT steps it
# answered with the most frequent value whatever the tool printed, on training tasks too). A few hundred steps of
# text-only pretraining on copy documents give it that skill. The documents carry random values and no task's
# images or answers, so nothing about the evaluation tasks is learnt here.

CALLS = ["getpixel", "crop", "point", "mark", "locate", "inspect", "spread"]
WORDS = ["the", "small", "square", "patch", "image", "at", "of", "is", "what", "which", "colour"]
NAMES = ["red", "green", "blue", "yellow", "black", "white", "grey", "left", "right", "top", "bottom", "first", "second"]


def _number(rng: random.Random, top: int = 799) -> int:
    """A number whose digit count is drawn uniformly (1 up to top's), then its value: with values uniform in 0..799,
    seven in eight have three digits, and the model learnt to write three whatever it read (77 -> 777, 23 -> 233)."""
    digits = rng.randint(1, len(str(top)))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(top, 10 ** digits - 1))


def _copy_document(rng: random.Random) -> list[tuple[str, bool]]:
    """One document as (text, is_target) pieces; the loss is on targets only. Two kinds, half each: read a tool result
    into the answer (the last printed line), or reuse what a question gives in code (numbers in a call, or two points
    in two calls)."""
    if rng.random() < 0.5:
        kind = rng.random()
        if kind < 0.3:
            printed = last = str(_number(rng, 999))
        elif kind < 0.5:
            printed = last = rng.choice("ABCDEFGH")
        elif kind < 0.8:
            last = rng.choice(["A", "B"] + NAMES)
            printed = f"({_number(rng, 255)}, {_number(rng, 255)}, {_number(rng, 255)})\n{last}"
        else:  # measurements, then the verdict: a number or an option letter
            last = rng.choice([str(_number(rng, 99)), "A", "B"])
            printed = f"{rng.uniform(0, 130)} {rng.uniform(0, 130)}\n{last}"
        return [(f"<|im_start|>user\n<tool_response>\n<interpreter>\nText Result:\n{printed}</interpreter>\n\n"
                 f"</tool_response><|im_end|>\n<|im_start|>assistant\n<answer>\n\\boxed{{", False),
                (f"{last}}}\n</answer><|im_end|>\n", True)]
    filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
    call = rng.choice(CALLS)
    if rng.random() < 0.3:
        (x1, y1), (x2, y2) = [(_number(rng), _number(rng)) for _ in range(2)]
        given = f"A. the {rng.choice(WORDS)} at ({x1}, {y1}) B. the {rng.choice(WORDS)} at ({x2}, {y2})"
        code, copied = f"first, second = {call}(", f"{x1}, {y1}), {call}({x2}, {y2})\n"
    else:
        values = [_number(rng) for _ in range(rng.choice([1, 2, 2, 4]))]
        named = len(values) == 2 and rng.random() < 0.5
        given = f"(x={values[0]}, y={values[1]})" if named else "(" + ", ".join(map(str, values)) + ")"
        code, copied = f"result = image_clue_0.{call}((", ", ".join(map(str, values)) + "))\n"
    return [(f"<|im_start|>user\nQuestion: {filler} {given}? {filler}<|im_end|>\n<|im_start|>assistant\n<code>\n"
             f"```python\n{code}", False),
            (copied, True)]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per step: linear warm-up over `warmup_steps`, then cosine decay to 10% at `total_steps` (shared
    by the copy pretraining and the SFT cold start)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(warmup_steps, 1))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    return factor


def pretrain_copying(model, processor: "VLProcessor", steps: int, seed: int = 0, batch: int = 32, seq_len: int = 128,
                     lr: float = 1e-3) -> list[dict]:
    """Train the language model on packed copy documents (AdamW, warm-up then cosine). Returns a log (first step, then
    every 25) with the loss and the accuracy on the copied tokens."""
    rng = random.Random(seed)
    params = list(model.model.language_model.parameters())   # the head is tied to the embeddings
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps=20, total_steps=steps))

    def row() -> tuple[list[int], list[int]]:
        ids, mask = [], []
        while len(ids) < seq_len + 1:
            for text, is_target in _copy_document(rng):
                piece = processor.encode_text(text)
                ids += piece
                mask += [int(is_target)] * len(piece)
        return ids[:seq_len + 1], mask[:seq_len + 1]

    log = []
    model.train()
    for step in tqdm(range(steps), desc="copy pretraining"):
        rows = [row() for _ in range(batch)]
        ids = torch.tensor([r[0] for r in rows], device=model.device)                        # (B, L+1)
        target_mask = torch.tensor([r[1] for r in rows], device=model.device)[:, 1:].bool()   # (B, L): copied tokens
        logits = model(input_ids=ids[:, :-1]).logits                                          # (B, L, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")         # (B, L)
        loss = nll[target_mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step == 0 or (step + 1) % 25 == 0 or step + 1 == steps:
            hit = (logits.argmax(-1) == ids[:, 1:])[target_mask].float().mean()
            log.append({"step": step + 1, "loss": float(loss.detach()), "copy_acc": float(hit)})
    model.eval()
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a deterministic tiny random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("--out", required=True, help="output directory (a normal Hugging Face checkpoint directory)")
    tiny.add_argument("--size", default="test", choices=sorted(TINY_SIZES), help="'test' for tests, 'demo' for the demo")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus")
    tiny.add_argument("--copy-steps", type=int, default=None, help="steps of copy pretraining (default: the size's)")
    args = parser.parse_args()
    path = build_tiny(args.out, seed=args.seed, size=args.size, copy_steps=args.copy_steps)
    n_params = sum(p.numel() for p in load_policy(path)[0].parameters())
    print(f"wrote {path} ({n_params / 1e6:.2f} M parameters)")


if __name__ == "__main__":
    main()

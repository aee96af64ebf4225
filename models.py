"""models.py — the policy: a Qwen2.5-VL-family checkpoint and a processor that runs without torchvision.

What this file is
    PyVision-RL trains Qwen2.5-VL-7B (docs/method.md §1, §8). Everything else in this project talks to the policy through
    two objects returned by `load_policy(name_or_path)`:
      * the model, an `AutoModelForImageTextToText` (Qwen2-VL, Qwen2.5-VL or Qwen3-VL);
      * a `VLProcessor`, which turns chat text plus images/video frames into `input_ids`, `attention_mask`,
        `mm_token_type_ids`, `pixel_values`, `image_grid_thw` (and the video equivalents).
    Tests and the CPU demo load a tiny checkpoint (tiny.py builds it) through this very path. `atomic_dir` is how
    every stage writes a directory another stage trusts: whole or not at all.

Why our own processor
    In transformers 5.x `AutoProcessor` for the Qwen-VL family requires torchvision (its video processor does), and PyPI's
    torchvision breaks next to the CPU torch wheel. `VLProcessor` uses the PIL image processor that
    transformers ships (`Qwen2VLImageProcessorPil`), a numpy patchifier for video with the official patch layout, and does the
    `<|image_pad|>` expansion itself. For images it yields the same `input_ids`, `image_grid_thw`, `pixel_values` and
    `mm_token_type_ids` as the official `Qwen2_5_VLProcessor` (tests/test_models.py checks this). `mm_token_type_ids` is always
    produced: transformers 5.x silently falls back to 1-D positions for Qwen2.5-VL without it.

How to run
    python -c "from models import load_policy; m, p = load_policy('Agents-X/PyVision-Image-7B-SFT', dtype='bfloat16', device='cuda')"

Differences from the official code
    * The official pipeline resizes in-context images with `qwen_vl_utils.fetch_image(min_pixels=3136, max_pixels=2e6)`
      before the processor; here the same bounds are processor settings (`min_pixels`/`max_pixels` of `load_policy`), which
      gives the same grid (both use `smart_resize` with factor 28).
    * Video through `VLProcessor` follows Qwen2-VL/Qwen2.5-VL; Qwen3-VL's timestamped video prompts are not reproduced
      (PyVision-Video keeps video out of the context anyway: video_context.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from config import config_field as _f

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

        Same patch order as transformers' Qwen2VLVideoProcessor; resizing is PIL
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


@dataclass
class ImageBounds:
    """The in-context image bounds one run uses everywhere: the processor that training and evaluation build, and
    hence vLLM's resizing (rollout.VLLMEngine takes them from the processor). train.py and eval.py inherit them."""
    min_pixels: int = _f(0, "in-context image lower bound in pixels (0: the checkpoint's own; paper: 3136)")
    max_pixels: int = _f(0, "in-context image upper bound in pixels (0: the checkpoint's own; paper: 2000000)")


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


def set_cpu_threads() -> int:
    """torch's CPU threads: OMP_NUM_THREADS when set; else the cores this process may use less those other processes
    keep busy right now (the kernel's count of runnable tasks, this one excluded), shared among this node's ranks.
    torch's default takes every core, and when anything else runs (another rank, the sandbox's tool processes, a second
    run) its spinning threads oversubscribe them: runs were 3-7x slower on 2 cores. Alone, this is torch's default."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():   # set and not empty (libgomp ignores an empty value)
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    busy = max(0, runnable_tasks() - 1)
    threads = max(1, (cores - busy) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(min(threads, cores))
    return torch.get_num_threads()


def runnable_tasks() -> int:
    """Tasks the kernel has running or ready to run at this instant, the caller included (/proc/loadavg's 4th field);
    1 where that file does not exist."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 1


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per step: linear warm-up over `warmup_steps`, then cosine decay to 10% at `total_steps` (shared
    by the copy pretraining and the SFT cold start)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(warmup_steps, 1))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    return factor

"""video_context.py — on-demand video context: the video stays in the sandbox, the model sees only what its code shows.

The idea (docs/method.md §1 item 3, §2.1, §9)
    PyVision-Video puts no frame of the video into the LLM context. The first user turn is text only: the instructions
    and a three-line block with the frame size, the number of frames and the native fps. The video itself is opened
    inside the Python runtime as `video_clue_0` (a `decord.VideoReader` in the official code; video_reader.py here), and
    the model's code samples frames and `plt.show()`s the ones it wants to look at, which come back as images in the
    next turn. So the model pays visual tokens only for what its code chose to show: the paper reports ~5K visual
    tokens per VSI-Bench sample this way, against ~45K for Qwen2.5-VL-7B reading the whole video at 1 fps (§9).

What this file holds
    * `video_info(path)` — the official prompt block, built from the file (`probe_video` -> `VideoMeta`).
    * `video_prompt(instructions, path, processor, context)` — the first user turn of a video task, which
      rollout.start_trajectory tokenises: on demand (the paper) the instructions alone; `full_context` the baseline.
    * The full-context baseline of the paper's comparison: `VideoSampling` (qwen-vl-utils' `fetch_video` rules),
      `sample_uniform(path, fps, max_frames)`, `full_context_video_inputs` / `full_context_image_inputs` (the sampled
      frames in the context as one Qwen video or as N images, through a processor) and `qwen2_5_vl_7b_geometry`.
    The reader is video_reader.py; the sandbox opens it. Counting the visual tokens of both sides is the bench's
    (bench/video_tokens.py).

How to run
    python video_context.py info VIDEO.mp4                     # prints the prompt's video_info block
    python bench/video_tokens.py --video VIDEO.mp4 --fps 1     # full-context tokens under Qwen2.5-VL-7B rules

Differences from the official code
    * `Sample FPS` in the info block is the stream's average frame rate, exactly as `decord.get_avg_fps()` reports it;
      Frame Width/Height are the displayed (rotated) size, as decord returns the frames.
    * `full_context` is this repository's baseline mode for rollouts: the sampled frames go into the first user turn
      as one Qwen video in front of the same instructions, and the sandbox still holds the video. The paper's baseline
      row is Qwen2.5-VL-7B given the video at 1 fps (§9); the official templates with frames in the context (video
      v1-v3) are unused variants (§2.1).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import VIDEO_PLACEHOLDER, VisionGeometry, VLProcessor
from video_reader import VideoReader


# ---------------------------------------------------------------------------------------------------------------------
# The on-demand context: the prompt's video information block (docs/method.md §2.1)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoMeta:
    path: str
    width: int
    height: int
    num_frames: int
    fps: float          # native average fps (decord's get_avg_fps)
    duration: float     # seconds covered by the frames


def probe_video(path: str | Path) -> VideoMeta:
    """The metadata the prompt needs, as the reader reports it: displayed frame size, frame count, average fps."""
    with VideoReader(path) as reader:
        width, height = reader.frame_size
        return VideoMeta(str(path), width, height, len(reader), reader.get_avg_fps(), reader.duration)


def video_info(video: str | Path | VideoMeta) -> str:
    """The `{video_info}` block of the `vis_tool_with_img_info_video_v4` template, character for character."""
    meta = video if isinstance(video, VideoMeta) else probe_video(video)
    return (f"Frame Width: {meta.width}; Frame Height: {meta.height};\n"
            f"Video Length: {meta.num_frames}; Sample FPS: {meta.fps:.2f}\n"
            "The original video has been read into the global variable `video_clue_0`.")


def video_prompt(instructions: str, video_path: str | Path, processor: VLProcessor, context: str = "on_demand",
                 fps: float = 1.0, max_frames: int = 64) -> tuple[str, dict]:
    """The first user turn of a video task (docs/method.md §2.1) -> (its chat text with every pad expanded, the video
    inputs the policy needs besides the token ids).

    `instructions` already hold the `video_info` block. `on_demand` (the paper): the turn is that text alone and there
    are no video inputs; the frames stay in the sandbox. `full_context` (the baseline, §9): at most `max_frames` frames
    sampled uniformly at `fps` go in front of the instructions as one Qwen video (`pixel_values_videos`,
    `video_grid_thw`, `second_per_grid_ts`)."""
    if context == "on_demand":
        return processor.apply_chat_template([{"role": "user", "content": instructions}]), {}
    frames, times = sample_uniform(video_path, fps=fps, max_frames=max_frames)
    sample_fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else fps
    pixel_values_videos, grid = processor.encode_video(frames)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                       {"type": "text", "text": "\n" + instructions}]}])
    video_inputs = {"pixel_values_videos": pixel_values_videos, "video_grid_thw": torch.tensor([grid]),
                    "second_per_grid_ts": torch.tensor([processor.geometry.temporal_patch_size / sample_fps])}
    return processor.expand_pads(text, [], [grid]), video_inputs


# ---------------------------------------------------------------------------------------------------------------------
# The full-context baseline (the paper's "Qwen2.5-VL-7B @ 1 fps" row)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoSampling:
    """How a full-context baseline turns a video file into model input: qwen-vl-utils' `fetch_video` rules
    (Qwen2.5-VL release): `fps` frames per second, at least `min_frames`, at most `max_frames`, an even count
    (`frame_factor` = temporal patch), uniformly spread; each frame resized within [`min_pixels`, a per-frame cap that
    shares `total_pixels` among the frames, at most `max_pixels`]. The defaults are qwen-vl-utils' defaults, i.e. the
    "model's default" setting. With `min_pixels=None` frames use the processor geometry's own bounds instead (what
    `models.VLProcessor` does with video).
    """
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    frame_factor: int = 2
    min_pixels: int | None = 128 * 28 * 28
    max_pixels: int | None = 768 * 28 * 28
    total_pixels: int | None = int(128000 * 28 * 28 * 0.9)   # VIDEO_TOTAL_PIXELS: 90% of a 128K-token context

    def num_frames(self, total_frames: int, native_fps: float) -> int:
        """qwen-vl-utils `smart_nframes` with `fps` given."""
        f = self.frame_factor
        min_frames = math.ceil(self.min_frames / f) * f
        max_frames = math.floor(min(self.max_frames, total_frames) / f) * f
        wanted = total_frames / native_fps * self.fps
        n = math.floor(min(max(wanted, min_frames), max_frames, total_frames) / f) * f
        if not f <= n <= total_frames:
            raise ValueError(f"cannot sample a video of {total_frames} frames: {n} frames is outside [{f}, {total_frames}]")
        return n

    def indices(self, total_frames: int, native_fps: float) -> list[int]:
        n = self.num_frames(total_frames, native_fps)
        return np.round(np.linspace(0, total_frames - 1, n)).astype(int).tolist()

    def sample_fps(self, total_frames: int, native_fps: float) -> float:
        """Frames per second of video time actually sampled (Qwen2.5-VL derives `second_per_grid_ts` from it)."""
        return self.num_frames(total_frames, native_fps) / total_frames * native_fps

    def frame_geometry(self, geometry: VisionGeometry, num_frames: int) -> VisionGeometry:
        """The resize bounds each of `num_frames` sampled frames gets (patching unchanged)."""
        if self.min_pixels is None:
            return geometry
        # kept as a float, as qwen-vl-utils compares and divides by it unrounded
        cap = max(min(self.max_pixels, self.total_pixels / num_frames * self.frame_factor), int(self.min_pixels * 1.05))
        return replace(geometry, min_pixels=self.min_pixels, max_pixels=cap)


def qwen2_5_vl_7b_geometry(max_pixels: int = 12845056) -> VisionGeometry:
    """Qwen2.5-VL-7B-Instruct's processor: patch 14, 2x2 merge, 2-frame temporal patch, pixels in [3136, 12845056]
    (its preprocessor_config.json; also qwen-vl-utils' `fetch_image` defaults, which resize the images the tool returns).
    PyVision-Image caps in-context images at `max_pixels=2_000_000` (docs/method.md §2.1)."""
    return VisionGeometry(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=max_pixels)


def sample_uniform(video: str | Path | VideoReader, fps: float = 1.0,
                   max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly sampled frames (T, H, W, 3) uint8 and their start times (T,) seconds, by qwen-vl-utils' rule."""
    sampling = VideoSampling(fps=fps, max_frames=max_frames if max_frames is not None else VideoSampling.max_frames)
    reader = video if isinstance(video, VideoReader) else VideoReader(video)
    try:
        indices = sampling.indices(len(reader), reader.get_avg_fps())
        # past the output bridge, and in float64: the frames are this project's input, not model code's
        return reader._batch(indices).copy(), reader._start_seconds[indices]
    finally:
        if reader is not video:
            reader.close()


def full_context_video_inputs(processor, question: str, frames: np.ndarray, sample_fps: float) -> dict:
    """Model inputs with the frames in context as one Qwen video (`<|vision_start|><|video_pad|><|vision_end|>`)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages)
    assert VIDEO_PLACEHOLDER in text, "the chat template must render a video item as the Qwen video placeholder"
    return processor(text, videos=[np.asarray(frames)], video_fps=sample_fps)


def full_context_image_inputs(processor, question: str, frames: np.ndarray) -> dict:
    """Model inputs with the frames in context as images, labelled `<image_clue_i>` like the official image prompt."""
    content = []
    for k in range(len(frames)):
        content += [{"type": "text", "text": f"<image_clue_{k}>"}, {"type": "image"},
                    {"type": "text", "text": f"</image_clue_{k}>"}]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "\n" + question}]}]
    return processor(processor.apply_chat_template(messages), images=[Image.fromarray(f) for f in frames])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the prompt's video_info block for a video file")
    info.add_argument("video")
    print(video_info(parser.parse_args().video))


if __name__ == "__main__":
    main()

"""bench/video_tokens.py — visual tokens of on-demand video context versus putting the video into the context.

What it measures (docs/method.md §9, Fig. 4: ~5K visual tokens per VSI-Bench sample for PyVision-Video, ~45K for
Qwen2.5-VL-7B at 1 fps)
    On the synthetic video set (data.py), per sample:
    * on-demand: the task's solution code runs against `video_clue_0` — in sandbox.py when it works, else in this process
      (`run_in_process`, labelled as such) — and every figure it shows is counted as the rollout would count it: a
      returned image resized by the processor (`count_visual_tokens(..., tool_images=...)`). The answer must be right
      (last printed line == reference), or the sample counts as wrong.
    * full context: the whole video sampled uniformly and given to the model as one video, at 1 fps (the paper's
      baseline) and at the model's default (qwen-vl-utils: 2 fps, at most 768 frames).
    Both under two processor geometries: Qwen2.5-VL-7B (patch 14, merge 2, temporal patch 2; tool images within
    [3136, 12845056] pixels as qwen-vl-utils' `fetch_image` defaults; video frames within qwen-vl-utils' video bounds,
    [128, 768] x 28 x 28 pixels per frame) — the paper's setting — and the tiny test checkpoint (`tiny.build_tiny`,
    whose processor keeps its image bounds [56x56, 224x224] for video frames too). For the tiny checkpoint the full
    context is also put through its processor (`full_context_video_inputs`) and the pads are checked against the count.
    Decode cost: seconds per frame fetched by the on-demand code, against seconds per frame of the 1 fps full-context
    sampling, both with `video_reader.VideoReader` in this process.

What it uses (here rather than in video_context.py, since nothing outside this bench and its tests does)
    `count_visual_tokens(geometry, images, videos, tool_images)` and `full_context_tokens(meta, geometry, sampling)`
    count visual tokens from a processor's geometry alone (`models.VisionGeometry`), without running the processor;
    `run_in_process` runs trusted solution code against `video_clue_0` in this process (model-written code goes
    through sandbox.py).

How to run
    python bench/video_tokens.py                   # 24 tasks, 6 per family
    python bench/video_tokens.py --n 48 --seed 1 --executor in-process
    python bench/video_tokens.py --video VIDEO.mp4 --fps 1     # one file's full-context tokens, Qwen2.5-VL-7B rules

The last line reads `on-demand / full-context (1 fps) visual tokens: R`, with R the ratio of the per-sample means under
the Qwen2.5-VL-7B geometry.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import models  # noqa: E402
import tiny  # noqa: E402
import video_context as vc  # noqa: E402
from video_reader import ReaderStats, VideoReader, cpu  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Visual-token accounting
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisualTokens:
    """Visual tokens one prompt or trajectory costs, by where they sit."""
    context_images: int = 0
    context_videos: int = 0
    tool_images: int = 0

    @property
    def total(self) -> int:
        return self.context_images + self.context_videos + self.tool_images


def _image_size(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image.shape[1], image.shape[0]
    width, height = image
    return int(width), int(height)


def _video_shape(video) -> tuple[int, int, int]:
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a video array must be (T, H, W, 3), got shape {video.shape}")
        return video.shape[0], video.shape[2], video.shape[1]
    num_frames, width, height = video
    return int(num_frames), int(width), int(height)


def count_visual_tokens(geometry: models.VisionGeometry, images: Sequence = (), videos: Sequence = (),
                        tool_images: Sequence = (),
                        video_geometry: models.VisionGeometry | None = None) -> VisualTokens:
    """Visual tokens under `geometry` (resize rule, patch, temporal patch, merge) — what the processor would emit.

    images / tool_images: PIL images, (H, W, 3) arrays or (width, height) pairs — in-context images and images the tool
    returned (the rollout resizes returned images with the same processor). videos: (T, H, W, 3) arrays or
    (num_frames, width, height) triples, resized under `video_geometry` (default: `geometry`, as `models.VLProcessor`
    does; `vc.VideoSampling.frame_geometry` gives qwen-vl-utils' per-frame bounds).
    """
    video_geometry = video_geometry or geometry
    return VisualTokens(
        context_images=sum(geometry.image_tokens(*_image_size(im)) for im in images),
        context_videos=sum(video_geometry.video_tokens(*_video_shape(v)) for v in videos),
        tool_images=sum(geometry.image_tokens(*_image_size(im)) for im in tool_images))


def full_context_tokens(meta: vc.VideoMeta, geometry: models.VisionGeometry, sampling: vc.VideoSampling,
                        as_images: bool = False) -> int:
    """Visual tokens of the whole video sampled by `sampling` and put into the context (as one video, or as images)."""
    n = sampling.num_frames(meta.num_frames, meta.fps)
    if as_images:
        return count_visual_tokens(geometry, images=[(meta.width, meta.height)] * n).total
    return count_visual_tokens(geometry, videos=[(n, meta.width, meta.height)],
                               video_geometry=sampling.frame_geometry(geometry, n)).total


QWEN_DEFAULT_SAMPLING = vc.VideoSampling()                    # fps 2.0, the "default setting" row
QWEN_1FPS_SAMPLING = vc.VideoSampling(fps=1.0)                # the paper's 45K-token baseline


# ---------------------------------------------------------------------------------------------------------------------
# Running trusted solution code against video_clue_0 in this process
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class OnDemandRun:
    """The result of running code against `video_clue_0`: printed text, shown figures, and the reader's statistics."""
    text: str
    images: list[Image.Image]
    error: str | None
    stats: ReaderStats = field(default_factory=ReaderStats)


def run_in_process(code: str, video_path: str | Path) -> OnDemandRun:
    """Execute `code` with the sandbox's video globals (`video_clue_0`, `np`, `plt`, `Image`) in THIS process.

    `plt.show()` renders the current figure to PNG at its own dpi (as the official runtime does) and collects it. No
    isolation whatsoever: only for code this project wrote (the synthetic tasks' solutions), in tests and benches.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: list[Image.Image] = []

    def show(*args, **kwargs) -> None:
        buffer = io.BytesIO()
        plt.gcf().savefig(buffer, format="png")
        shown.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        plt.close()

    stdout, error = io.StringIO(), None
    with VideoReader(video_path) as reader:
        namespace = {"video_clue_0": reader, "np": np, "plt": plt, "Image": Image, "VideoReader": VideoReader, "cpu": cpu}
        original_show, plt.show = plt.show, show
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, "<solution>", "exec"), namespace)
        except Exception as e:  # report like the sandbox does; the caller decides what a failure means
            error = f"{type(e).__name__}: {e}"
        finally:
            plt.show = original_show
            plt.close("all")
        return OnDemandRun(stdout.getvalue(), shown, error, reader.stats)


# ---------------------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    family: str
    correct: bool
    on_demand: dict[str, int]                 # geometry name -> visual tokens of the shown figures
    full_1fps: dict[str, int]                 # geometry name -> visual tokens of the whole video at 1 fps
    full_default: dict[str, int]              # ... at the model's default sampling
    frames_fetched: int
    frames_decoded: int
    fetch_seconds: float
    frame_size: tuple[int, int]               # (width, height) of the video
    figure_sizes: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Setting:
    """A processor geometry plus how its full-context baseline samples and bounds video frames."""
    name: str
    geometry: models.VisionGeometry
    at_1fps: vc.VideoSampling
    at_default: vc.VideoSampling


def settings(tiny_geometry: models.VisionGeometry) -> list[Setting]:
    processor_bounds = vc.VideoSampling(min_pixels=None, max_pixels=None, total_pixels=None)
    return [Setting("Qwen2.5-VL-7B", vc.qwen2_5_vl_7b_geometry(), QWEN_1FPS_SAMPLING, QWEN_DEFAULT_SAMPLING),
            Setting("tiny checkpoint", tiny_geometry, vc.VideoSampling(fps=1.0, min_pixels=None), processor_bounds)]


def last_line(text: str) -> str | None:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else None


def run_on_demand(task: data.Task, executor: str) -> tuple[OnDemandRun, str, list, str]:
    """-> (the in-process run, for the reader's statistics; the text and figures that count; which executor gave them)."""
    local = run_in_process(task.solution_code, task.video_path)
    if executor == "in-process":
        return local, local.text, local.images, "in-process"
    from sandbox import Sandbox
    with Sandbox(video=task.video_path) as box:
        result = box.run(task.solution_code)
    if result.status != "ok":
        raise RuntimeError(f"{task.id}: the solution failed in the sandbox: {result.status} {result.error}")
    return local, result.text, result.images, "sandbox"


def pick_executor(requested: str, probe_task: data.Task) -> str:
    """'sandbox' when sandbox.py runs the probe task, else 'in-process' (said loudly; 'sandbox' as a request is strict)."""
    if requested != "auto":
        return requested
    try:
        run_on_demand(probe_task, "sandbox")
        return "sandbox"
    except Exception as e:  # any failure of the other engineer's module: fall back, and say why
        print(f"NOTE: sandbox path unavailable ({type(e).__name__}: {e}); "
              "FALLBACK: solution code runs in this process (run_in_process)")
        return "in-process"


def measure(tasks: list[data.Task], executor: str, tiny_processor: models.VLProcessor) -> tuple[list[Sample], dict]:
    chosen = settings(tiny_processor.geometry)
    samples, full_sampling_seconds, full_sampled_frames, used = [], 0.0, 0, set()
    for task in tasks:
        local, text, images, source = run_on_demand(task, executor)
        used.add(source)
        meta = vc.probe_video(task.video_path)
        samples.append(Sample(
            family=task.family, correct=local.error is None and task.is_answer(last_line(text)),
            on_demand={s.name: count_visual_tokens(s.geometry, tool_images=images).tool_images for s in chosen},
            full_1fps={s.name: full_context_tokens(meta, s.geometry, s.at_1fps) for s in chosen},
            full_default={s.name: full_context_tokens(meta, s.geometry, s.at_default) for s in chosen},
            frames_fetched=local.stats.frames_requested, frames_decoded=local.stats.frames_decoded,
            fetch_seconds=local.stats.fetch_seconds, frame_size=(meta.width, meta.height),
            figure_sizes=[im.size for im in images]))
        # the 1 fps full-context baseline, for real: sample, decode, and feed the tiny processor
        started = time.perf_counter()
        frames, _ = vc.sample_uniform(task.video_path, fps=1.0)
        full_sampling_seconds += time.perf_counter() - started
        full_sampled_frames += len(frames)
        tiny_setting = chosen[1]
        inputs = vc.full_context_video_inputs(tiny_processor, task.question, frames,
                                              tiny_setting.at_1fps.sample_fps(meta.num_frames, meta.fps))
        pads = int((inputs["input_ids"] == tiny_processor.video_pad_id).sum())
        if pads != samples[-1].full_1fps[tiny_setting.name]:
            raise AssertionError(f"{task.id}: processor emitted {pads} video pads, accounting says "
                                 f"{samples[-1].full_1fps[tiny_setting.name]}")
    timing = {"full_seconds_per_frame": full_sampling_seconds / max(1, full_sampled_frames), "executors": used}
    return samples, timing


def report(samples: list[Sample], timing: dict, names: list[str]) -> float:
    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    by_family = defaultdict(list)
    for s in samples:
        by_family[s.family].append(s)
    print(f"\n{len(samples)} samples; on-demand figures counted from: {', '.join(sorted(timing['executors']))}")
    print(f"{'family':<18}{'n':>3}{'correct':>9}{'fetched/sample':>16}{'decoded/fetched':>17}{'figure px':>12}")
    for family, group in sorted(by_family.items()):
        sizes = sorted({f"{w}x{h}" for s in group for w, h in s.figure_sizes})
        print(f"{family:<18}{len(group):>3}{mean([s.correct for s in group]):>9.0%}"
              f"{mean([s.frames_fetched for s in group]):>16.1f}"
              f"{sum(s.frames_decoded for s in group) / max(1, sum(s.frames_fetched for s in group)):>17.2f}"
              f"{','.join(sizes):>12}")
    for name in names:
        print(f"\nvisual tokens per sample, {name} geometry (mean; on-demand = figures returned by the tool)")
        print(f"{'family':<18}{'on-demand':>11}{'full 1 fps':>12}{'full default':>14}{'ratio 1 fps':>13}")
        for family, group in sorted(by_family.items()) + [("all", samples)]:
            on_demand = mean([s.on_demand[name] for s in group])
            full_1fps = mean([s.full_1fps[name] for s in group])
            print(f"{family:<18}{on_demand:>11.1f}{full_1fps:>12.1f}{mean([s.full_default[name] for s in group]):>14.1f}"
                  f"{on_demand / full_1fps:>13.3f}")
    fetched = sum(s.frames_fetched for s in samples)
    print(f"\ndecode time per frame fetched (VideoReader, this process): on-demand "
          f"{sum(s.fetch_seconds for s in samples) / max(1, fetched) * 1e3:.3f} ms over {fetched} frames; "
          f"1 fps full-context sampling {timing['full_seconds_per_frame'] * 1e3:.3f} ms per frame")
    frame_w, frame_h = samples[0].frame_size
    qwen_h, qwen_w = QWEN_1FPS_SAMPLING.frame_geometry(vc.qwen2_5_vl_7b_geometry(), 2).resized_hw(frame_h, frame_w)
    print(f"note: qwen-vl-utils resizes each {frame_w}x{frame_h} video frame to at least 128x28x28 pixels "
          f"({qwen_w}x{qwen_h} here), while a figure is resized by the image rule only; the tiny processor applies its "
          "image bounds to both, so its ratio shows the cost of the shown frames without that upscaling")
    correct = mean([s.correct for s in samples])
    print(f"solution-code correctness: {correct:.1%}")
    ratio = mean([s.on_demand[names[0]] for s in samples]) / mean([s.full_1fps[names[0]] for s in samples])
    print(f"goal: ratio <= 0.15 at 100% correctness ({names[0]} geometry): "
          f"{'met' if ratio <= 0.15 and correct == 1.0 else 'NOT met'}")
    return ratio


def one_video(path: str, sampling: vc.VideoSampling) -> str:
    """Full-context visual tokens of one video file under Qwen2.5-VL-7B rules, as one video and as images."""
    meta = vc.probe_video(path)
    n = sampling.num_frames(meta.num_frames, meta.fps)
    geometry = vc.qwen2_5_vl_7b_geometry()
    return (f"{meta.num_frames} frames at {meta.fps:.2f} fps, {meta.width}x{meta.height}: {n} frames sampled -> "
            f"{full_context_tokens(meta, geometry, sampling)} visual tokens as a video, "
            f"{full_context_tokens(meta, geometry, sampling, as_images=True)} as images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="number of synthetic video tasks (families round-robin)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic video set")
    parser.add_argument("--executor", choices=["auto", "sandbox", "in-process"], default="auto",
                        help="where the solution code runs; auto = sandbox.py if it works, else in this process")
    parser.add_argument("--video", help="instead of the bench: full-context visual tokens of this video file under "
                                        "Qwen2.5-VL-7B rules")
    parser.add_argument("--fps", type=float, default=vc.VideoSampling.fps,
                        help="--video: sampling rate (qwen-vl-utils default 2)")
    parser.add_argument("--max-frames", type=int, default=vc.VideoSampling.max_frames,
                        help="--video: cap on sampled frames")
    args = parser.parse_args()
    if args.video:
        print(one_video(args.video, vc.VideoSampling(fps=args.fps, max_frames=args.max_frames)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tasks = data.generate_video_tasks(args.n, args.seed, Path(tmp) / "tasks")
        print(f"generated {len(tasks)} video tasks in {time.perf_counter() - started:.1f} s")
        tiny_processor = models.VLProcessor.from_pretrained(tiny.build_tiny(Path(tmp) / "tiny", size="test"))
        executor = pick_executor(args.executor, tasks[0])
        samples, timing = measure(tasks, executor, tiny_processor)
    ratio = report(samples, timing, [s.name for s in settings(tiny_processor.geometry)])
    print(f"on-demand / full-context (1 fps) visual tokens: {ratio:.3f}")


if __name__ == "__main__":
    main()

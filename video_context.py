"""video_context.py — on-demand video context: the video stays in the sandbox, the model sees only what its code shows.

What this file is
    PyVision-Video puts no frame of the video into the LLM context. The prompt carries a text block with the frame size,
    the number of frames and the native fps; the video itself is opened inside the Python runtime as `video_clue_0` (a
    `decord.VideoReader` in the official code), and the model's code samples frames and `plt.show()`s the ones it wants
    to look at (method.md §1 item 3, §2.1 `vis_tool_with_img_info_video_v4`, §3 "Injected variables"). The paper reports
    ~5K visual tokens per VSI-Bench sample this way against ~45K for Qwen2.5-VL-7B reading the video at 1 fps (§9).
    This file holds everything needed to reproduce and measure that:

    * `VideoReader` — a decord-compatible reader on PyAV (decord is unmaintained and often not installable):
      `len(v)`, `v.get_avg_fps()`, `v[i].asnumpy()`, negative indices, slices, `v.get_batch(idx).asnumpy()`,
      `v.get_frame_timestamp(idx)`, `v.get_key_indices()`. It seeks to the keyframe before a frame instead of decoding
      from the start, decodes forward when the target lies in the current GOP, keeps a bounded LRU cache of converted
      frames and never holds the whole video. `install_decord_alias()` lets `from decord import VideoReader, cpu` (which
      the official runtime header and the released checkpoints' code use) resolve to it.
    * `video_info(path)` — the official prompt block, built from the file.
    * The full-context baseline of the paper's comparison: `VideoSampling` (qwen-vl-utils' `fetch_video` rules),
      `sample_uniform(path, fps, max_frames)`, and `full_context_video_inputs` / `full_context_image_inputs`, which put the
      sampled frames into the context as one Qwen video or as N images.
    * Visual-token accounting: `count_visual_tokens(geometry, images, videos, tool_images)` and
      `full_context_tokens(meta, geometry, sampling)`, from a processor's geometry (`models.VisionGeometry`).
    * `write_video` (mp4 via PyAV, deterministic) and `run_in_process` (execute trusted solution code against
      `video_clue_0` in this process, for tests and benches; model-written code goes through sandbox.py).

How to run
    python video_context.py info VIDEO.mp4                     # prints the prompt's video_info block
    python video_context.py tokens VIDEO.mp4 --fps 1           # full-context tokens under Qwen2.5-VL-7B rules
    python -c "from video_context import VideoReader; v = VideoReader('a.mp4'); print(len(v), v[-1].shape)"

Differences from the official code / decord
    * Frame timestamps (`get_frame_timestamp`) are relative to the first frame, so frame 0 is at t = 0 even when a
      container starts at a non-zero pts; decord reports raw pts seconds. Both agree for the usual mp4 starting at 0.
    * Out-of-range indices raise `IndexError` (decord raises IndexError from `get_batch` and `DECORDError`/assertions
      elsewhere); unreadable files raise `VideoReadError` naming the path; a missing file raises FileNotFoundError.
    * `ctx` is accepted for signature compatibility; decoding is always on the CPU. `num_threads` defaults to 1, not
      decord's 0 (automatic), because many sandboxed readers run side by side under a per-uid thread limit.
    * The frame count comes from demuxing all packets once at open (no decode), as decord does to build its index;
      `stream.frames` from the container header is not trusted (it is 0 or wrong for many files).
    * `Sample FPS` in the info block is the stream's average frame rate, exactly as `decord.get_avg_fps()` reports it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

if TYPE_CHECKING:
    from models import VisionGeometry
# models.py (torch, transformers) is imported only where token geometry is needed: the sandbox imports this file for
# `VideoReader` in every runtime, and must not pay for torch there.


class VideoReadError(ValueError):
    """The file exists but cannot be read as a video (no video stream, corrupt data, undecodable frame)."""


# ---------------------------------------------------------------------------------------------------------------------
# The decord-compatible reader
# ---------------------------------------------------------------------------------------------------------------------

class _Frames:
    """Stand-in for decord's NDArray: `.asnumpy()` gives a fresh writable numpy array, `.shape` its shape."""

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray):
        self._array = array  # read-only; may be shared with the reader's cache

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    def asnumpy(self) -> np.ndarray:
        return self._array.copy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if dtype is not None:
            return self._array.astype(dtype)
        return self._array if copy is False else self._array.copy()

    def __len__(self) -> int:
        return len(self._array)

    def __repr__(self) -> str:
        return f"<Frames shape={self._array.shape} dtype={self._array.dtype}>"


@dataclass
class ReaderStats:
    """What the reader did: frames handed out, frames decoded to get them, seeks, and time spent fetching."""
    frames_requested: int = 0
    frames_decoded: int = 0
    seeks: int = 0
    fetch_seconds: float = 0.0


def cpu(device_id: int = 0) -> str:
    """decord's `cpu(0)` context; only accepted so `VideoReader(path, ctx=cpu(0))` runs unchanged."""
    return f"cpu({device_id})"


class VideoReader:
    """Random access to the frames of one video file, with decord's interface (RGB uint8, (H, W, 3) per frame).

    Memory: the frame index (one int64 pts per frame), the decoder's own reference frames, and an LRU cache of at most
    `cache_frames` converted frames and at most `cache_bytes` bytes. Nothing else is kept, however long the video.
    `width`/`height` (> 0) resize the frames on output, as decord's do; `num_threads` is the decoder's thread count.
    """

    def __init__(self, uri: str | Path, ctx: object = None, width: int = -1, height: int = -1, num_threads: int = 1,
                 cache_frames: int = 32, cache_bytes: int = 64 << 20):
        self.path = Path(uri)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file not found: {self.path}")
        self._out_width, self._out_height = width, height
        try:
            self._container = av.open(str(self.path))
        except av.error.FFmpegError as e:
            raise VideoReadError(f"cannot open video {self.path}: {e}") from None
        try:
            if not self._container.streams.video:
                raise VideoReadError(f"{self.path} has no video stream")
            self._stream = self._container.streams.video[0]
            # one decoding thread by default (decord: 0 = automatic): sandboxes run many readers side by side under a
            # per-uid process/thread limit, and low-resolution frames gain nothing from more
            self._stream.codec_context.thread_count = num_threads
            self._pts, self._key_indices, self._last_duration = self._index_packets()
        except BaseException:
            self._container.close()
            raise
        self._time_base = self._stream.time_base
        self._start_seconds = (self._pts - self._pts[0]).astype(np.float64) * float(self._time_base)  # (N,)
        rate = self._stream.average_rate or self._stream.guessed_rate
        if rate:
            self._avg_fps = float(rate)
        elif len(self._pts) > 1 and self._last_duration:  # no rate in the header: frames over the time they cover
            covered = int(self._pts[-1]) - int(self._pts[0]) + self._last_duration
            self._avg_fps = len(self._pts) / float(covered * self._time_base)
        else:
            raise VideoReadError(f"{self.path}: cannot determine the frame rate")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_frames, self._cache_bytes = max(1, cache_frames), cache_bytes
        self._decoder = None   # frame iterator over the stream; None until the first seek
        self._next_index = -1  # index of the frame the decoder yields next (-1: unknown, a seek is needed)
        self.stats = ReaderStats()

    # --- the frame index ----------------------------------------------------------------------------------------------
    def _index_packets(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Demux (no decode) every packet once -> (pts of each frame in presentation order, keyframe indices,
        duration of the last frame in stream time units, 0 when unknown)."""
        stamps, keys, last_pts, last_duration = [], [], None, 0
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0 or packet.is_discard:  # flush packets; frames an edit list cuts away
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    raise VideoReadError(f"{self.path}: packets carry no timestamps; cannot index frames")
                stamps.append(pts)
                keys.append(packet.is_keyframe)
                if last_pts is None or pts >= last_pts:  # the latest frame in presentation order so far
                    last_pts, last_duration = pts, packet.duration or 0
        except av.error.FFmpegError as e:
            raise VideoReadError(f"cannot read video {self.path}: {e}") from None
        if not stamps:
            raise VideoReadError(f"{self.path} contains no video frames")
        order = np.argsort(np.asarray(stamps, np.int64), kind="stable")    # decode order -> presentation order
        pts = np.asarray(stamps, np.int64)[order]                           # (N,)
        key_indices = np.flatnonzero(np.asarray(keys, bool)[order])         # (K,)
        if len(key_indices) == 0 or key_indices[0] != 0:
            # a stream whose first frame is not flagged as a keyframe still decodes from its start
            key_indices = np.concatenate([[0], key_indices])
        return pts, key_indices, last_duration

    # --- decord's interface --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pts)

    def get_avg_fps(self) -> float:
        return self._avg_fps

    def get_key_indices(self) -> list[int]:
        return self._key_indices.tolist()

    def get_frame_timestamp(self, idx) -> np.ndarray:
        """(start, end) seconds of frame `idx` (shape (2,)), or of each index in a list/slice (shape (N, 2))."""
        if isinstance(idx, slice):
            return self.get_frame_timestamp(range(len(self))[idx])
        starts = self._start_seconds
        ends = np.append(starts[1:], starts[-1] + self._frame_seconds(len(self) - 1))
        if _is_index(idx):
            i = self._normalise(idx)
            return np.array([starts[i], ends[i]])
        rows = [self._normalise(i) for i in _as_index_list(idx, self.path)]
        return np.stack([starts[rows], ends[rows]], axis=1) if rows else np.zeros((0, 2))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return self.get_batch(range(len(self))[idx])
        if not _is_index(idx):
            raise TypeError(f"{self.path}: frame index must be an int or a slice, got {type(idx).__name__}")
        i = self._normalise(idx)
        started = time.perf_counter()
        frame = self._frame(i)
        self.stats.frames_requested += 1
        self.stats.fetch_seconds += time.perf_counter() - started
        return _Frames(frame)

    def get_batch(self, indices) -> _Frames:
        """Frames at `indices` (list, range, array; negatives allowed; repeats allowed) -> (N, H, W, 3).

        Decodes the distinct indices in increasing order, so a batch costs one forward pass per GOP it touches.
        """
        wanted = [self._normalise(i) for i in _as_index_list(indices, self.path)]
        started = time.perf_counter()
        fetched = {i: self._frame(i) for i in sorted(set(wanted))}
        self.stats.frames_requested += len(wanted)
        self.stats.fetch_seconds += time.perf_counter() - started
        if not wanted:
            height, width = self._output_hw()
            return _Frames(np.zeros((0, height, width, 3), np.uint8))
        batch = np.stack([fetched[i] for i in wanted])  # (N, H, W, 3)
        batch.flags.writeable = False
        return _Frames(batch)

    # --- extras beyond decord ------------------------------------------------------------------------------------------
    def index_at(self, seconds: float) -> int:
        """Index of the frame on screen at `seconds` (relative to the first frame)."""
        starts = self._start_seconds
        end = starts[-1] + self._frame_seconds(len(self) - 1)
        if not 0 <= seconds < end:
            raise IndexError(f"{self.path}: time {seconds} s is outside the video [0, {end:.3f}) s")
        return int(np.searchsorted(starts, seconds, side="right")) - 1

    @property
    def duration(self) -> float:
        return float(self._start_seconds[-1] + self._frame_seconds(len(self) - 1))

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames this reader returns."""
        height, width = self._output_hw()
        return width, height

    def close(self) -> None:
        self._decoder = None
        self._cache.clear()
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        width, height = self.frame_size
        return f"VideoReader({str(self.path)!r}: {len(self)} frames, {width}x{height}, {self._avg_fps:.2f} fps)"

    # --- internals ---------------------------------------------------------------------------------------------------
    def _normalise(self, idx) -> int:
        i = int(idx)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: frame index {i} out of range for a video of {n} frames")
        return i + n if i < 0 else i

    def _frame_seconds(self, i: int) -> float:
        if i == len(self) - 1 and self._last_duration:
            return float(self._last_duration * self._time_base)
        return 1.0 / self._avg_fps

    def _output_hw(self) -> tuple[int, int]:
        cc = self._stream.codec_context
        height = self._out_height if self._out_height > 0 else cc.height
        width = self._out_width if self._out_width > 0 else cc.width
        return height, width

    def _frame(self, i: int) -> np.ndarray:
        """Frame i as a read-only (H, W, 3) uint8 array, from the cache or by decoding."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        # the keyframe to restart from: the last one at or before i
        key = int(self._key_indices[np.searchsorted(self._key_indices, i, side="right") - 1])
        # decode forward when the decoder already sits in [key, i]: a seek would only restart from `key`
        if not key <= self._next_index <= i:
            self._seek(key)
        frame = self._decode_until(i)
        if frame is None:  # the seek landed after i (keyframe flags can lie): restart from earlier keyframes
            for earlier in self._key_indices[self._key_indices < key][::-1]:
                self._seek(int(earlier))
                if (frame := self._decode_until(i)) is not None:
                    break
        if frame is None:
            self._next_index = -1
            raise VideoReadError(f"{self.path}: frame {i} could not be decoded")
        array = frame.to_ndarray(format="rgb24", width=self._out_width if self._out_width > 0 else None,
                                 height=self._out_height if self._out_height > 0 else None)  # (H, W, 3)
        array.flags.writeable = False
        self._remember(i, array)
        return array

    def _seek(self, key: int) -> None:
        self._container.seek(int(self._pts[key]), stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._next_index = key
        self.stats.seeks += 1

    def _decode_until(self, i: int):
        """Decode forward to frame i; None when the decoder passes i or ends without producing it."""
        target = self._pts[i]
        try:
            for frame in self._decoder:
                self.stats.frames_decoded += 1
                position = int(np.searchsorted(self._pts, frame.pts)) if frame.pts is not None else self._next_index
                self._next_index = position + 1
                if frame.pts == target or (frame.pts is None and position == i):
                    return frame
                if position > i:
                    return None
        except av.error.FFmpegError as e:
            self._next_index = -1
            raise VideoReadError(f"{self.path}: decoding failed near frame {i}: {e}") from None
        self._next_index = -1  # end of stream: the iterator is spent
        return None

    def _remember(self, i: int, array: np.ndarray) -> None:
        self._cache[i] = array
        capacity = max(1, min(self._cache_frames, self._cache_bytes // max(1, array.nbytes)))
        while len(self._cache) > capacity:
            self._cache.popitem(last=False)


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_index_list(indices, path: Path) -> list:
    """A list/tuple/range of ints, or anything numpy reads as a 1-D integer array (arrays, tensors) -> list of ints."""
    if isinstance(indices, (list, tuple, range)):
        values = list(indices)
        for value in values:
            if not _is_index(value):
                raise TypeError(f"{path}: frame indices must be ints, got {value!r} ({type(value).__name__})")
        return values
    array = np.asarray(indices)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{path}: frame indices must be a list or 1-D integer array, got {type(indices).__name__} "
                        f"of dtype {array.dtype} and shape {array.shape}")
    return array.tolist()


def install_decord_alias() -> types.ModuleType:
    """Make `import decord` / `from decord import VideoReader, cpu` resolve to this file's reader.

    The official runtime header runs `from decord import VideoReader, cpu` and model code often repeats it. An installed
    decord is left alone.
    """
    try:
        import decord  # noqa: F401  (a real decord wins)
        return sys.modules["decord"]
    except ImportError:
        module = types.ModuleType("decord", "decord-compatible alias backed by video_context.VideoReader (PyAV)")
        module.VideoReader, module.cpu = VideoReader, cpu
        sys.modules["decord"] = module
        return module


# ---------------------------------------------------------------------------------------------------------------------
# Writing (synthetic data, tests)
# ---------------------------------------------------------------------------------------------------------------------

def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18,
                gop_size: int | None = None) -> Path:
    """Encode RGB uint8 frames (H, W, 3), given one at a time, as H.264 yuv420p mp4 with PyAV.

    Same frames and settings -> same bytes with the same PyAV/FFmpeg build. Two x264 defaults broke that here: frame
    threading, and macroblock-tree rate control (`mbtree`), whose output for identical frames changed from one encode
    to the next within a process; the encoder runs on one thread with mbtree off. `gop_size` caps the keyframe interval.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}  # see the docstring: determinism
        stream.codec_context.thread_count = 1
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        to_yuv = VideoReformatter()  # one converter for all frames: a fresh one per frame costs ~1 ms each
        count = 0
        for count, rgb in enumerate(frames, start=1):
            rgb = np.asarray(rgb)
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"{path}: frame {count - 1} must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
            if count == 1:
                if rgb.shape[0] % 2 or rgb.shape[1] % 2:
                    raise ValueError(f"{path}: yuv420p needs even frame sides, got {rgb.shape[1]}x{rgb.shape[0]}")
                stream.height, stream.width = rgb.shape[:2]
            frame = to_yuv.reformat(av.VideoFrame.from_ndarray(rgb, format="rgb24"), format="yuv420p")
            frame.pts = count - 1
            container.mux(stream.encode(frame))
        if count == 0:
            raise ValueError(f"{path}: no frames to write")
        container.mux(stream.encode())
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The prompt's video information block (method.md §2.1)
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
    """Read the metadata the prompt needs. The official code decodes frame 0 for the size; the stream header has it."""
    with VideoReader(path) as reader:
        width, height = reader.frame_size
        return VideoMeta(str(path), width, height, len(reader), reader.get_avg_fps(), reader.duration)


def video_info(video: str | Path | VideoMeta) -> str:
    """The `{video_info}` block of the `vis_tool_with_img_info_video_v4` template, character for character."""
    meta = video if isinstance(video, VideoMeta) else probe_video(video)
    return (f"Frame Width: {meta.width}; Frame Height: {meta.height};\n"
            f"Video Length: {meta.num_frames}; Sample FPS: {meta.fps:.2f}\n"
            "The original video has been read into the global variable `video_clue_0`.")


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
    PyVision-Image caps in-context images at `max_pixels=2_000_000` (method.md §2.1)."""
    from models import VisionGeometry
    return VisionGeometry(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=max_pixels)


QWEN_DEFAULT_SAMPLING = VideoSampling()                       # fps 2.0, the "default setting" row
QWEN_1FPS_SAMPLING = VideoSampling(fps=1.0)                   # the paper's 45K-token baseline


def sample_uniform(video: str | Path | VideoReader, fps: float = 1.0,
                   max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly sampled frames (T, H, W, 3) uint8 and their start times (T,) seconds, by qwen-vl-utils' rule."""
    sampling = VideoSampling(fps=fps, max_frames=max_frames if max_frames is not None else VideoSampling.max_frames)
    reader = video if isinstance(video, VideoReader) else VideoReader(video)
    try:
        indices = sampling.indices(len(reader), reader.get_avg_fps())
        return reader.get_batch(indices).asnumpy(), reader.get_frame_timestamp(indices)[:, 0]
    finally:
        if reader is not video:
            reader.close()


def full_context_video_inputs(processor, question: str, frames: np.ndarray, sample_fps: float) -> dict:
    """Model inputs with the frames in context as one Qwen video (`<|vision_start|><|video_pad|><|vision_end|>`)."""
    from models import VIDEO_PLACEHOLDER
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


def count_visual_tokens(geometry: VisionGeometry, images: Sequence = (), videos: Sequence = (),
                        tool_images: Sequence = (), video_geometry: VisionGeometry | None = None) -> VisualTokens:
    """Visual tokens under `geometry` (resize rule, patch, temporal patch, merge) — what the processor would emit.

    images / tool_images: PIL images, (H, W, 3) arrays or (width, height) pairs — in-context images and images the tool
    returned (the rollout resizes returned images with the same processor). videos: (T, H, W, 3) arrays or
    (num_frames, width, height) triples, resized under `video_geometry` (default: `geometry`, as `models.VLProcessor`
    does; `VideoSampling.frame_geometry` gives qwen-vl-utils' per-frame bounds).
    """
    video_geometry = video_geometry or geometry
    return VisualTokens(
        context_images=sum(geometry.image_tokens(*_image_size(im)) for im in images),
        context_videos=sum(video_geometry.video_tokens(*_video_shape(v)) for v in videos),
        tool_images=sum(geometry.image_tokens(*_image_size(im)) for im in tool_images))


def full_context_tokens(meta: VideoMeta, geometry: VisionGeometry, sampling: VideoSampling,
                        as_images: bool = False) -> int:
    """Visual tokens of the whole video sampled by `sampling` and put into the context (as one video, or as images)."""
    n = sampling.num_frames(meta.num_frames, meta.fps)
    if as_images:
        return count_visual_tokens(geometry, images=[(meta.width, meta.height)] * n).total
    return count_visual_tokens(geometry, videos=[(n, meta.width, meta.height)],
                               video_geometry=sampling.frame_geometry(geometry, n)).total


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the prompt's video_info block for a video file")
    info.add_argument("video")
    tokens = sub.add_parser("tokens", help="full-context visual tokens of a video under Qwen2.5-VL-7B rules")
    tokens.add_argument("video")
    tokens.add_argument("--fps", type=float, default=VideoSampling.fps, help="sampling rate (qwen-vl-utils default 2)")
    tokens.add_argument("--max-frames", type=int, default=VideoSampling.max_frames, help="cap on sampled frames")
    args = parser.parse_args()
    if args.command == "info":
        print(video_info(args.video))
        return
    meta = probe_video(args.video)
    sampling = VideoSampling(fps=args.fps, max_frames=args.max_frames)
    n = sampling.num_frames(meta.num_frames, meta.fps)
    geometry = qwen2_5_vl_7b_geometry()
    print(f"{meta.num_frames} frames at {meta.fps:.2f} fps, {meta.width}x{meta.height}: {n} frames sampled -> "
          f"{full_context_tokens(meta, geometry, sampling)} visual tokens as a video, "
          f"{full_context_tokens(meta, geometry, sampling, as_images=True)} as images")


if __name__ == "__main__":
    main()

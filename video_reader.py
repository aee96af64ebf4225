"""video_reader.py — `video_clue_0`: a decord-compatible video reader on PyAV.

What this file is
    The official runtime opens a video task's video as `video_clue_0 = decord.VideoReader(path, ctx=cpu(0))` and the
    model's code samples frames from it (docs/method.md §3). decord is unmaintained and often not installable, so the
    sandbox (sandbox.py) opens this file's reader instead; video_context.py builds the prompt around it.

    * `VideoReader` — matched against decord 0.6.0 side by side: `len(v)`, `v.get_avg_fps()`, `v[i].asnumpy()`,
      negative indices, slices, `v.get_batch(idx).asnumpy()` (indices cast to int64 as decord casts them: floats,
      bools, any shape), `v.get_frame_timestamp(idx)`, `v.get_key_indices()`, `next`/`seek`/`seek_accurate`/
      `skip_frames`, file-like input, display rotation, and `width`/`height` resizing with decord's pixels. It seeks to
      the keyframe before a frame instead of decoding from the start, decodes forward when the target lies in the
      current GOP, keeps a bounded LRU cache of converted frames and never holds the whole video; `stats`
      (`ReaderStats`) counts what it decoded.
    * `VideoLoader`, `AVReader`, the output bridge (`set_bridge("torch")`) and `DECORDError`; `install_decord_alias()`
      makes them `import decord` (the official runtime header and the released checkpoints' code run
      `from decord import VideoReader, cpu`).
    * `write_video` — H.264 via PyAV, deterministic: the synthetic video tasks (data.py) and the tests' clips.

How to run
    python -c "from video_reader import VideoReader; v = VideoReader('a.mp4'); print(len(v), v[-1].shape)"
    python -m pytest -q tests/test_video_reader.py     # side by side with decord where decord 0.6.0 installs

Differences from decord (decord 0.6.0, which bundles FFmpeg 4.1; PyAV here bundles a newer one)
    * Frames are pixel-identical to decord's, rotated and resized ones included (the same FFmpeg filter chain): H.264
      in mp4, mov, mkv and flv are checked side by side by the tests, VP8/webm, MJPEG and MPEG-4 Part 2 were checked
      once by hand. Where decord is wrong this reader is right instead: MPEG-TS with B-frames (the container seeks by
      dts), where decord returns the second GOP's frames for the first GOP; AVI with B-frames, where decord's random
      access returns frames of the wrong GOP (its in-order reads match this reader's); frame widths whose rgb24 rows
      FFmpeg pads to a multiple of the width (48 pixels, say), which decord returns as (H, W, 4) or fails on;
      `get_batch(3)` (one index, not a sequence), which kills decord's process and raises TypeError here;
      `get_frame_timestamp(slice)`, which decord cannot take.
    * Timestamps are decord's (float32, from the stream's start time, end = start + packet duration), given the same
      packet durations: the FFmpeg versions' demuxers disagree on some (an flv's first packet, some B-frame mp4s).
    * `get_key_indices()` counts keyframes in presentation order; decord counts packets in decode order, which differs
      for open-GOP streams. Frames that an edit list cuts away are not counted; decord counts them.
    * Errors: out-of-range indices raise IndexError (as decord), unreadable files `VideoReadError` naming the path
      (decord: RuntimeError at open, DECORDError later; `VideoReadError` is a `DECORDError`), a missing file
      FileNotFoundError (decord: RuntimeError). A float frame index raises DECORDError, as decord's C++ check does.
    * A video whose frame 0 cannot be decoded fails at open: the display rotation comes with the first decoded frame
      (needs PyAV >= 14.1 for `VideoFrame.rotation`). decord instead papers over undecodable frames with copies of
      their neighbours (`fault_tol`); this reader raises, so `fault_tol` has nothing to limit.
    * `ctx` is accepted for signature compatibility; decoding is always on the CPU. `num_threads` defaults to 1, not
      decord's 0 (automatic), because many sandboxed readers run side by side under a per-uid thread limit. The bridge
      is per process (decord: per thread) and offers "native" and "torch" only.
    * The frame count comes from demuxing all packets once at open (no decode), as decord does to build its index;
      `stream.frames` from the container header is not trusted (it is 0 or wrong for many files). Where the codec
      reorders frames but the container stores decode times as pts (AVI with B-frames), frames are counted from the
      keyframe after a seek, as decord counts them.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import sys
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class DECORDError(Exception):
    """decord's error class (`decord.DECORDError` in the alias). The reader raises it where decord does (a float frame
    index) and, as `VideoReadError`, for unreadable videos: `except decord.DECORDError` in model code catches both."""


class VideoReadError(DECORDError, ValueError):
    """The file exists but cannot be read as a video (no video stream, corrupt data, undecodable frame)."""


# ---------------------------------------------------------------------------------------------------------------------
# The decord-compatible reader
# ---------------------------------------------------------------------------------------------------------------------

class _NDArray:
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
        return f"<NDArray shape={self._array.shape} dtype={self._array.dtype}>"


# decord's output bridge: what `vr[i]`, `get_batch`, `next` and the loaders return. decord also offers mxnet,
# tensorflow and tvm; only the two this project can install and test are offered.
_BRIDGES = ("native", "torch")
_bridge = "native"


def set_bridge(new_bridge: str) -> None:
    """`decord.bridge.set_bridge`: "native" returns NDArray stand-ins (`.asnumpy()`), "torch" uint8 torch tensors.

    decord keeps the choice per thread (new threads start from the main thread's); here it is one per process, which is
    the same for the single-threaded code a sandbox runs."""
    global _bridge
    if new_bridge not in _BRIDGES:
        raise ValueError(f"bridge {new_bridge!r} is not available in this decord-compatible reader; choose from "
                         f"{', '.join(_BRIDGES)}")
    _bridge = new_bridge


def reset_bridge() -> None:
    """`decord.bridge.reset_bridge`: back to "native"."""
    set_bridge("native")


@contextlib.contextmanager
def use_torch():
    """`with decord.bridge.use_torch():` — torch tensors inside the block, the previous bridge after it."""
    previous = _bridge
    set_bridge("torch")
    try:
        yield
    finally:
        set_bridge(previous)


def _bridge_out(array: np.ndarray):
    if _bridge == "torch":
        import torch   # only here: the sandbox imports this file in every runtime and must not pay for torch
        return torch.from_numpy(array.copy())   # a copy: `array` may be the cache's read-only frame
    return _NDArray(array)


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


def _int_argument(value, what: str, name: str) -> int:
    """An int argument of a decord call. decord's C++ side rejects a float with DECORDError; anything else that is
    not an integer fails in Python with TypeError."""
    if isinstance(value, (float, np.floating)):
        raise DECORDError(f"{name}: {what} must be an int, got float {value}")
    if not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: {what} must be an int, got {type(value).__name__}")
    return int(value)


class VideoReader:
    """Random access to the frames of one video, with decord's interface (RGB uint8, (H, W, 3) per frame).

    `uri` is a path or a file-like object (read whole at once, as decord does, so the reader outlives it). Frames come
    out as the video is displayed: a quarter-turn display rotation (phone videos) is applied, `width`/`height` (> 0)
    resize, through the same FFmpeg filter chain decord builds (`transpose`, then bilinear `scale` to rgb24), so the
    pixels are decord's. `num_threads` is the decoder's thread count; `fault_tol` is accepted for decord's signature
    and has nothing to limit: this reader never substitutes a neighbouring frame for an undecodable one, it raises.

    Memory: the frame index (pts, dts, duration per frame), the decoder's reference frames, and an LRU cache of at most
    `cache_frames` converted frames and at most `cache_bytes` bytes. Nothing else is kept, however long the video.
    """

    def __init__(self, uri, ctx: object = None, width: int = -1, height: int = -1, num_threads: int = 1,
                 fault_tol: float = -1, *, cache_frames: int = 32, cache_bytes: int = 64 << 20):
        if hasattr(uri, "read"):
            data = uri.read()
            self.path, self.name, source = None, f"<{len(data)}-byte video object>", io.BytesIO(data)
        else:
            self.path = Path(uri)
            self.name = source = str(self.path)
            if not self.path.is_file():
                raise FileNotFoundError(f"video file not found: {self.path}")
        try:
            self._container = av.open(source)
        except av.error.FFmpegError as e:
            raise VideoReadError(f"cannot open video {self.name}: {e}") from None
        try:
            if not self._container.streams.video:
                raise VideoReadError(f"{self.name} has no video stream")
            self._stream = self._container.streams.video[0]
            # one decoding thread by default (decord: 0 = automatic): sandboxes run many readers side by side under a
            # per-uid process/thread limit, and low-resolution frames gain nothing from more
            self._stream.codec_context.thread_count = num_threads
            self._pts, self._dts, durations, self._key_indices, rising_in_decode_order = self._index_packets()
            # a codec that reorders frames (B-frames) whose packet pts rise in decode order: the container (AVI) stores
            # decode times, so after a seek the frames are counted from the keyframe, as decord counts them
            self._counts_frames = bool(self._stream.codec_context.has_b_frames) and rising_in_decode_order
            self._time_base = self._stream.time_base
            self._init_timestamps(durations)
            self._init_frame_rate()
            self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
            self._cache_frames, self._cache_bytes = max(1, cache_frames), cache_bytes
            self._decoder = None   # frame iterator over the stream; None until the first seek
            self._next_index = -1  # index of the frame the decoder yields next (-1: unknown, a seek is needed)
            self._after_seek = False   # the decoder's next frame is the first since a seek
            self._position = 0     # decord's read position: the frame `next()` returns
            self.stats = ReaderStats()
            # the display rotation comes with the decoded frame (FFmpeg attaches the container's display matrix to it):
            # decode frame 0 now, which the output size needs, and keep it
            first = self._decoded(0)
            self._rotation = _clockwise_quarter_turns(first)
            coded_width, coded_height = self._stream.codec_context.width, self._stream.codec_context.height
            if self._rotation in (90, 270):
                coded_width, coded_height = coded_height, coded_width
            self._width = width if width > 0 else coded_width
            self._height = height if height > 0 else coded_height
            self._graph, self._graph_input = None, None
            self._remember(0, self._convert(first))
        except BaseException:
            self._container.close()
            raise

    # --- the frame index ----------------------------------------------------------------------------------------------
    def _index_packets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
        """Demux (no decode) every packet once -> pts, dts and duration (stream time units, 0 when unknown) of each
        frame in presentation order, the keyframe indices, and whether the pts rise strictly in decode order."""
        rows, keys = [], []
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0 or packet.is_discard:  # flush packets; frames an edit list cuts away
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    raise VideoReadError(f"{self.name}: packets carry no timestamps; cannot index frames")
                rows.append((pts, packet.dts if packet.dts is not None else pts, packet.duration or 0))
                keys.append(packet.is_keyframe)
        except av.error.FFmpegError as e:
            raise VideoReadError(f"cannot read video {self.name}: {e}") from None
        if not rows:
            raise VideoReadError(f"{self.name} contains no video frames")
        table = np.asarray(rows, np.int64)                                 # (N, 3) in decode order
        order = np.argsort(table[:, 0], kind="stable")                     # decode order -> presentation order
        pts, dts, durations = table[order].T                               # (N,) each
        key_indices = np.flatnonzero(np.asarray(keys, bool)[order])        # (K,)
        if len(key_indices) == 0 or key_indices[0] != 0:
            # a stream whose first frame is not flagged as a keyframe still decodes from its start
            key_indices = np.concatenate([[0], key_indices])
        return pts, dts, durations, key_indices, bool(np.all(np.diff(table[:, 0]) > 0))

    def _init_timestamps(self, durations: np.ndarray) -> None:
        """decord's frame times: seconds from the stream's start time, end = start + the packet's duration (so a frame
        whose packet has no duration ends where it starts), stored as float32 as decord returns them."""
        origin = self._stream.start_time if self._stream.start_time is not None else int(self._pts[0])
        time_base = float(self._time_base)
        self._start_seconds = (self._pts - origin) * time_base                           # (N,) float64
        self._timestamps = np.stack([self._start_seconds,
                                     (self._pts + durations - origin) * time_base], axis=1).astype(np.float32)  # (N, 2)
        self._last_duration = int(durations[-1])

    def _init_frame_rate(self) -> None:
        rate = self._stream.average_rate or self._stream.guessed_rate
        if rate:
            self._avg_fps = float(rate)
        elif len(self._pts) > 1 and self._last_duration:  # no rate in the header: frames over the time they cover
            covered = int(self._pts[-1]) - int(self._pts[0]) + self._last_duration
            self._avg_fps = len(self._pts) / float(covered * self._time_base)
        else:
            raise VideoReadError(f"{self.name}: cannot determine the frame rate")

    # --- decord's interface --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pts)

    def get_avg_fps(self) -> float:
        return self._avg_fps

    def get_key_indices(self) -> list[int]:
        return self._key_indices.tolist()

    def get_frame_timestamp(self, idx) -> np.ndarray:
        """(start, end) seconds, float32: shape (2,) for one index, idx.shape + (2,) for an array or list (decord), and
        (N, 2) for a slice (which decord 0.6.0 cannot take)."""
        if isinstance(idx, slice):
            idx = range(len(self))[idx]
        return self._timestamps[self._indices(idx)]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return self.get_batch(range(len(self))[idx])
        i = self._normalise(_int_argument(idx, "frame index", self.name))
        self._position = i + 1   # decord reads frame i by seeking there and taking the next frame
        return _bridge_out(self._fetch([i])[i])

    def get_batch(self, indices):
        """Frames at `indices` -> (N, H, W, 3). Indices are read as decord reads them: cast to int64 (floats truncate
        toward zero, bools are 0/1), any shape flattened in C order, negatives from the end, repeats allowed."""
        return _bridge_out(self._batch(indices))

    def next(self):
        """The frame at the read position, which then moves on; StopIteration after the last frame."""
        if self._position >= len(self):
            raise StopIteration
        i = self._position
        self._position += 1
        return _bridge_out(self._fetch([i])[i])

    def seek(self, pos) -> None:
        """decord's fast seek: the next frame read is a keyframe near `pos` — on mp4, as decord's FFmpeg seek lands,
        the first keyframe at or after `pos` when moving forward (the last keyframe if none is), the last keyframe at
        or before `pos` when moving back. `seek_accurate` lands on `pos` itself."""
        pos = self._seek_argument(pos)
        keys = self._key_indices
        if pos > self._position:
            later = keys[keys >= pos]
            self._position = int(later[0]) if len(later) else int(keys[-1])
        elif pos < self._position:
            self._position = int(keys[np.searchsorted(keys, pos, side="right") - 1])

    def seek_accurate(self, pos) -> None:
        self._position = self._seek_argument(pos)

    def skip_frames(self, num=1) -> None:
        """Move the read position `num` frames on (at most to the end); decoding happens when a frame is read."""
        num = _int_argument(num, "number of frames to skip", self.name)
        if num <= 0:
            raise AssertionError(f"{self.name}: skip_frames needs num > 0, got {num}")   # decord asserts
        self._position = min(len(self), self._position + num)

    # --- extras beyond decord ------------------------------------------------------------------------------------------
    def index_at(self, seconds: float) -> int:
        """Index of the frame on screen at `seconds` (on the `get_frame_timestamp` clock)."""
        starts = self._start_seconds
        end = self.duration
        if not starts[0] <= seconds < end:
            raise IndexError(f"{self.name}: time {seconds} s is outside the video [{starts[0]:.3f}, {end:.3f}) s")
        return int(np.searchsorted(starts, seconds, side="right")) - 1

    @property
    def duration(self) -> float:
        last = len(self) - 1
        frame_seconds = self._last_duration * float(self._time_base) if self._last_duration else 1.0 / self._avg_fps
        return float(self._start_seconds[last] + frame_seconds)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames this reader returns: after rotation and resizing."""
        return self._width, self._height

    def close(self) -> None:
        self._decoder = self._graph = None
        self._cache.clear()
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VideoReader({self.name!r}: {len(self)} frames, {self._width}x{self._height}, "
                f"{self._avg_fps:.2f} fps)")

    # --- internals ---------------------------------------------------------------------------------------------------
    def _normalise(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: frame index {i} out of range for a video of {n} frames")
        return i + n if i < 0 else i

    def _indices(self, indices) -> np.ndarray:
        """Frame indices as decord's `_validate_indices` reads them: `np.array(indices, dtype=np.int64)` (so floats
        truncate toward zero and bools are 0/1), negatives from the end; the result keeps the input's shape."""
        array = np.array(indices, dtype=np.int64)
        n = len(self)
        outside = array[(array < -n) | (array >= n)]
        if outside.size:
            raise IndexError(f"{self.name}: frame index {outside.flat[0]} out of range for a video of {n} frames")
        return np.where(array < 0, array + n, array)

    def _seek_argument(self, pos) -> int:
        pos = _int_argument(pos, "seek position", self.name)
        if not 0 <= pos < len(self):
            # decord asserts; the same exception keeps `except AssertionError` in model code working
            raise AssertionError(f"{self.name}: seek position {pos} outside [0, {len(self)})")
        return pos

    def _batch(self, indices) -> np.ndarray:
        """get_batch without the bridge: a read-only (N, H, W, 3) uint8 array."""
        wanted = self._indices(indices)
        if wanted.ndim == 0:   # decord 0.6.0 crashes the process here
            raise TypeError(f"{self.name}: get_batch takes a sequence of frame indices, got the single index "
                            f"{int(wanted)}; use vr[{int(wanted)}] or get_batch([{int(wanted)}])")
        wanted = wanted.ravel().tolist()
        if not wanted:
            return np.zeros((0, self._height, self._width, 3), np.uint8)
        first_seen = list(dict.fromkeys(wanted))
        # decord decodes the indices in the order given, so its read position ends after the last new one
        self._position = first_seen[-1] + 1
        fetched = self._fetch(sorted(first_seen))   # increasing order: one forward pass per GOP touched
        batch = np.stack([fetched[i] for i in wanted])  # (N, H, W, 3)
        batch.flags.writeable = False
        return batch

    def _fetch(self, distinct: list[int]) -> dict[int, np.ndarray]:
        started = time.perf_counter()
        frames = {i: self._frame(i) for i in distinct}
        self.stats.frames_requested += len(distinct)
        self.stats.fetch_seconds += time.perf_counter() - started
        return frames

    def _frame(self, i: int) -> np.ndarray:
        """Frame i as a read-only (H, W, 3) uint8 array, from the cache or by decoding."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        array = self._convert(self._decoded(i))
        self._remember(i, array)
        return array

    def _decoded(self, i: int) -> av.VideoFrame:
        """Decode frame i: forward when the decoder already sits in i's GOP, else after a seek to i's keyframe."""
        k = int(np.searchsorted(self._key_indices, i, side="right")) - 1
        if self._key_indices[k] <= self._next_index <= i and (frame := self._decode_until(i)) is not None:
            return frame
        # i's keyframe, then the one before (keyframe flags can lie; going further back for a frame that never decodes
        # would cost up to the whole video per read). Seeking to the keyframe's pts lands on it in mp4 and Matroska;
        # MPEG-TS seeks by dts and lands a keyframe late there, which the dts target then fixes.
        for key in self._key_indices[max(0, k - 1):k + 1][::-1]:
            for target in dict.fromkeys((int(self._pts[key]), int(self._dts[key]))):
                self._seek(int(key), target)
                if (frame := self._decode_until(i)) is not None:
                    return frame
        self._next_index = -1
        raise VideoReadError(f"{self.name}: frame {i} could not be decoded")

    def _seek(self, key: int, target: int) -> None:
        self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._next_index = key
        self._after_seek = True
        self.stats.seeks += 1

    def _decode_until(self, i: int) -> av.VideoFrame | None:
        """Decode forward to frame i; None when the decoder passes i or ends without producing it."""
        target = self._pts[i]
        try:
            for frame in self._decoder:
                self.stats.frames_decoded += 1
                # the first frame after a seek is a keyframe, whose pts is right even where later ones are not
                counted = frame.pts is None or (self._counts_frames and not self._after_seek)
                self._after_seek = False
                position = self._next_index if counted else int(np.searchsorted(self._pts, frame.pts))
                self._next_index = position + 1
                if position == i and (counted or frame.pts == target):
                    return frame
                if position > i:
                    return None
        except av.error.FFmpegError as e:
            self._next_index = -1
            raise VideoReadError(f"{self.name}: decoding failed near frame {i}: {e}") from None
        self._next_index = -1  # end of stream: the iterator is spent
        return None

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        """A decoded frame as the read-only (H, W, 3) RGB array decord gives, through decord's filter chain: `transpose`
        for the display rotation (clockwise once for 90, twice for 180, counter-clockwise once for 270), then `scale`
        (bilinear) straight to rgb24. Rebuilt when the stream changes size or pixel format midway; every frame still
        comes out at the size fixed at open."""
        if self._graph_input != (frame.width, frame.height, frame.format.name):
            self._graph = av.filter.Graph()
            self._graph.threads = 1   # as decord; also keeps the sandbox's per-uid thread count down
            turns = {90: ["clock"], 180: ["clock", "clock"], 270: ["cclock"]}.get(self._rotation, [])
            self._graph.link_nodes(
                self._graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                       time_base=self._time_base),
                *(self._graph.add("transpose", turn) for turn in turns),
                self._graph.add("scale", f"{self._width}:{self._height}:flags=bilinear"),
                self._graph.add("format", "rgb24"),
                self._graph.add("buffersink")).configure()
            self._graph_input = (frame.width, frame.height, frame.format.name)
        self._graph.vpush(frame)
        array = self._graph.vpull().to_ndarray()  # (H, W, 3)
        array.flags.writeable = False
        return array

    def _remember(self, i: int, array: np.ndarray) -> None:
        self._cache[i] = array
        capacity = max(1, min(self._cache_frames, self._cache_bytes // max(1, array.nbytes)))
        while len(self._cache) > capacity:
            self._cache.popitem(last=False)


def _clockwise_quarter_turns(frame: av.VideoFrame) -> int:
    """The display rotation decord applies, in clockwise degrees: 90, 180 or 270, else 0. decord negates FFmpeg's
    counter-clockwise display-matrix angle (`frame.rotation`, truncated to whole degrees) and acts on exact quarter
    turns only; flips in the matrix are ignored, as there."""
    clockwise = -int(frame.rotation) % 360
    return clockwise if clockwise in (90, 180, 270) else 0


# ---------------------------------------------------------------------------------------------------------------------
# decord's multi-video loader and audio+video reader
# ---------------------------------------------------------------------------------------------------------------------

class VideoLoader:
    """`decord.VideoLoader`: batches of `shape[0]` frames resized to `shape[1]` x `shape[2]` (height x width), from
    each of several videos. Within a batch frames are `interval` apart (interval + 1 indices); `skip` frames lie
    between consecutive batches. Iterating yields (frames (B, H, W, 3), indices (B, 2) int64 rows [video, frame]);
    `reset()` starts the next epoch. shuffle 0: videos and batches in order; 1: videos in random order, each read
    front to back; 2: all batches in random order (decord also has no working mode 3). The batch lists are decord's:
    mode 1 counts a video's batches by its own formula, which can take one batch more than modes 0 and 2. The random
    order is numpy's, not decord's. `ctx` and `prefetch` are accepted and unused (decord 0.6.0 ignores prefetch too).
    """

    def __init__(self, uris, ctx, shape, interval, skip, shuffle, prefetch=0):
        if len(shape) != 4:
            raise AssertionError(f"expected shape: [bs, height, width, 3], given {shape}")   # decord asserts
        if shuffle not in (0, 1, 2):
            raise DECORDError(f"invalid shuffle mode {shuffle}: 0 (none), 1 (random video order), 2 (random batches)")
        batch_size, height, width = shape[0], shape[1], shape[2]
        interval, skip = max(0, interval), max(0, skip)
        self._readers = [VideoReader(uri, width=width, height=height) for uri in uris]
        span = batch_size * (interval + 1) - interval   # frames one batch covers
        stride = span + skip                             # from one batch's first frame to the next one's
        batches = []   # [(video, frame indices)] per video, front to back
        for video, reader in enumerate(self._readers):
            last = len(reader) - 1   # decord's sampling range ends at the last index, exclusive
            starts = (range(0, (last + skip) // stride * stride, stride) if shuffle == 1
                      else range(0, last - span, stride))
            batches += [(video, list(range(start, start + span, interval + 1))) for start in starts]
        self._batches, self._shuffle = batches, shuffle
        self._rng = np.random.default_rng()
        self.reset()

    def __len__(self) -> int:
        return len(self._batches)

    def reset(self) -> None:
        """Start a new epoch (reshuffled when shuffling)."""
        self._next = 0
        if self._shuffle == 1:   # a random video order, each video's batches still front to back
            videos = self._rng.permutation([video for video, _ in self._batches])
            queues = {video: iter([b for b in self._batches if b[0] == video]) for video in set(videos.tolist())}
            self._order = [next(queues[video]) for video in videos.tolist()]
        elif self._shuffle == 2:
            self._order = [self._batches[k] for k in self._rng.permutation(len(self._batches))]
        else:
            self._order = list(self._batches)

    def __iter__(self) -> "VideoLoader":
        return self   # as decord: iterating again continues the epoch; `reset()` starts a new one

    def __next__(self):
        if self._next >= len(self._order):
            raise StopIteration
        video, frames = self._order[self._next]
        self._next += 1
        indices = np.array([[video, frame] for frame in frames], np.int64)  # (B, 2)
        return _bridge_out(self._readers[video]._batch(frames)), _bridge_out(indices)

    def next(self):
        return self.__next__()


class AVReader:
    """`decord.AVReader`: each video frame with the audio samples it covers. Audio: the first audio stream, decoded
    whole at open to float32 (channels, samples), resampled to `sample_rate` (-1 keeps the file's), mixed to mono when
    `mono`, and padded with zeros at the front when it starts after t = 0, as decord pads it. Frame k's samples are
    [ceil(start * rate), ceil(end * rate)) on the `get_frame_timestamp` clock, the start snapped to the previous
    frame's end when consecutive frames are requested together, as in decord. Video arguments as `VideoReader`.
    Sample for sample decord's where no resampling happens (mono mixing included); resampled audio has decord's sample
    counts but not its values, as decord flushes its resampler after every decoded audio frame, leaving seams."""

    def __init__(self, uri, ctx=None, sample_rate=44100, mono=True, width=-1, height=-1, num_threads=1,
                 fault_tol=-1):
        if hasattr(uri, "read"):
            data = uri.read()   # read once: the video and the audio are both decoded from these bytes
            video_source, audio_source = io.BytesIO(data), io.BytesIO(data)
        else:
            video_source = audio_source = str(uri)
        self._video = VideoReader(video_source, ctx, width, height, num_threads, fault_tol)
        self._audio, self.sample_rate = _decode_audio(audio_source, self._video.name, sample_rate, mono)

    def __len__(self) -> int:
        return len(self._video)

    def __getitem__(self, idx):
        """(audio (C, S) of frame idx, frame idx); a slice -> get_batch over it."""
        if isinstance(idx, slice):
            return self.get_batch(range(len(self))[idx])
        i = self._video._normalise(_int_argument(idx, "frame index", self._video.name))
        start, end = self._video.get_frame_timestamp(i)
        return _bridge_out(self._samples(self._sample(start), self._sample(end))), self._video[i]

    def get_batch(self, indices):
        """([audio (C, S) of each frame], frames (N, H, W, 3))."""
        wanted = self._video._indices(indices).ravel().tolist()
        audio, previous, previous_end = [], None, None
        for i in wanted:
            start, end = self._video.get_frame_timestamp(i)
            # decord's continuity rule, including its quirk that frame 0 does not count as a predecessor
            begin = previous_end if previous and i == previous + 1 else self._sample(start)
            previous, previous_end = i, self._sample(end)
            audio.append(_bridge_out(self._samples(begin, previous_end)))
        return audio, self._video.get_batch(wanted)

    def _sample(self, seconds) -> int:
        return math.ceil(seconds * self.sample_rate)

    def _samples(self, begin: int, end: int) -> np.ndarray:
        samples = self._audio[:, begin:end]
        samples.flags.writeable = False
        return samples


def _decode_audio(source, name: str, sample_rate: int, mono: bool) -> tuple[np.ndarray, int]:
    """The first audio stream as float32 (channels, samples) at `sample_rate` (-1: the file's), with decord's leading
    zero padding up to the first frame's start time -> (samples, rate)."""
    with av.open(source) as container:
        if not container.streams.audio:
            raise VideoReadError(f"{name} has no audio stream")
        stream = container.streams.audio[0]
        rate = sample_rate if sample_rate > 0 else stream.rate
        resampler = av.AudioResampler(format="fltp", layout="mono" if mono else stream.layout, rate=rate)
        chunks, start_seconds = [], None
        try:
            for frame in container.decode(stream):
                if start_seconds is None:
                    start_seconds = max(0.0, float(frame.pts * frame.time_base)) if frame.pts is not None else 0.0
                chunks += [out.to_ndarray() for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
        except av.error.FFmpegError as e:
            raise VideoReadError(f"{name}: decoding the audio failed: {e}") from None
    if not chunks:
        raise VideoReadError(f"{name}: the audio stream holds no samples")
    samples = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)  # (C, S)
    return np.pad(samples, ((0, 0), (math.ceil((start_seconds or 0.0) * rate), 0))), rate


def install_decord_alias() -> types.ModuleType:
    """Make `import decord` (and `decord.bridge`) resolve to this file's reader, whether or not decord is installed.

    The official runtime header runs `from decord import VideoReader, cpu` and model code often repeats it. The alias
    replaces an installed decord on purpose: `video_clue_0` is always this reader, so `decord.VideoReader(...)` in
    model code and `except decord.DECORDError` must be the same implementation; runs then behave the same on every
    machine, and decord's crashes (a process-killing segfault on `get_batch(3)`) cannot take a sandbox worker down.
    """
    bridge = types.ModuleType("decord.bridge", "decord.bridge: the output bridge of the decord-compatible alias")
    bridge.set_bridge, bridge.reset_bridge, bridge.use_torch = set_bridge, reset_bridge, use_torch
    module = types.ModuleType("decord", "decord-compatible alias backed by video_reader.VideoReader (PyAV)")
    module.VideoReader, module.VideoLoader, module.AVReader, module.cpu = VideoReader, VideoLoader, AVReader, cpu
    module.DECORDError, module.bridge = DECORDError, bridge
    sys.modules["decord"], sys.modules["decord.bridge"] = module, bridge
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Writing (synthetic data, tests)
# ---------------------------------------------------------------------------------------------------------------------

def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18,
                gop_size: int | None = None, rotation: int = 0, frame_ticks: Sequence[int] | None = None) -> Path:
    """Encode RGB uint8 frames (H, W, 3), given one at a time, as H.264 yuv420p (x264's default 3 B-frames) with PyAV,
    in the container the suffix names (.mp4, .mkv, .ts, .avi, ...).

    Same frames and settings -> same bytes with the same PyAV/FFmpeg build. Two x264 defaults broke that here: frame
    threading, and macroblock-tree rate control (`mbtree`), whose output for identical frames changed from one encode
    to the next within a process; the encoder runs on one thread with mbtree off. `gop_size` caps the keyframe interval.
    `rotation` (clockwise degrees; PyAV >= 18) tags the stream with a display matrix, as phones do; the pixels stay as
    given.
    `frame_ticks` are the frames' timestamps in 1/fps-second ticks (default 0, 1, 2, ...); gaps make the frame rate
    variable.
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
        if rotation:
            stream.set_display_rotation(-rotation)   # PyAV takes counter-clockwise degrees
        ticks = iter(frame_ticks) if frame_ticks is not None else itertools.count()
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
            frame.pts = next(ticks)
            container.mux(stream.encode(frame))
        if count == 0:
            raise ValueError(f"{path}: no frames to write")
        container.mux(stream.encode())
    return path


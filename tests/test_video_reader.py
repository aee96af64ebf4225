"""video_reader.py: the decord-compatible reader, pinned to decord 0.6.0's behaviour and, where decord 0.6.0 installs,
run side by side with it on the same files (frames, timestamps, index casting, sequential reads, loaders, audio, the
bridge and the `import decord` alias)."""
import io
import math
import sys
import tracemalloc
import wave

import av
import numpy as np
import pytest

import video_reader
from video_context import video_info
from video_reader import (AVReader, DECORDError, VideoLoader, VideoReader, VideoReadError, cpu, install_decord_alias,
                          reset_bridge, set_bridge, use_torch, write_video)

# Frames that carry their own index: bit b of the index lights block b of a 4x3 grid of 16x16 blocks (64x48 frames),
# which survives lossy H.264 because a block is either black or white.
BLOCK = 16


def coded_frame(index: int) -> np.ndarray:
    frame = np.zeros((3 * BLOCK, 4 * BLOCK, 3), np.uint8)  # (48, 64, 3)
    for bit in range(12):
        if index >> bit & 1:
            row, col = divmod(bit, 4)
            frame[row * BLOCK:(row + 1) * BLOCK, col * BLOCK:(col + 1) * BLOCK] = 255
    return frame


def frame_code(frame: np.ndarray) -> int:
    code = 0
    for bit in range(12):
        row, col = divmod(bit, 4)
        if frame[row * BLOCK + 4:(row + 1) * BLOCK - 4, col * BLOCK + 4:(col + 1) * BLOCK - 4].mean() > 128:
            code |= 1 << bit
    return code


@pytest.fixture(scope="module")
def coded_video(tmp_path_factory):
    """40 index-coded frames at 8 fps with a keyframe every 10 frames, so random access has to seek."""
    path = tmp_path_factory.mktemp("video") / "coded.mp4"
    return write_video(path, (coded_frame(i) for i in range(40)), fps=8, gop_size=10)


# ---------------------------------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------------------------------

def test_exact_frame_at_index_in_any_order(coded_video):
    reader = VideoReader(coded_video)
    assert len(reader) == 40 and reader.get_avg_fps() == 8.0
    order = np.random.default_rng(0).permutation(40).tolist()
    for i in order:
        frame = reader[i].asnumpy()
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        assert frame_code(frame) == i
    assert [frame_code(reader[i].asnumpy()) for i in (-1, -40, -13)] == [39, 0, 27]


def test_exact_frame_at_timestamp(coded_video):
    reader = VideoReader(coded_video)
    assert reader.get_frame_timestamp(20).tolist() == [2.5, 2.625]
    assert reader.get_frame_timestamp([0, -1]).tolist() == [[0.0, 0.125], [4.875, 5.0]]
    assert reader.get_frame_timestamp(slice(0, 3)).shape == (3, 2)
    assert reader.duration == 5.0
    for seconds in (0.0, 2.5, 2.56, 4.99):
        assert frame_code(reader[reader.index_at(seconds)].asnumpy()) == math.floor(seconds * 8)
    with pytest.raises(IndexError, match="5.0 s is outside"):
        reader.index_at(5.0)


def test_batches_slices_and_arrays(coded_video):
    reader = VideoReader(coded_video)
    batch = reader.get_batch([30, 2, 30, -1]).asnumpy()
    assert batch.shape == (4, 48, 64, 3) and [frame_code(f) for f in batch] == [30, 2, 30, 39]
    assert [frame_code(f) for f in reader.get_batch(np.array([5, 6])).asnumpy()] == [5, 6]
    assert [frame_code(f) for f in reader.get_batch(range(7, 10)).asnumpy()] == [7, 8, 9]
    assert [frame_code(f) for f in reader[3:9:2].asnumpy()] == [3, 5, 7]
    assert reader.get_batch([]).asnumpy().shape == (0, 48, 64, 3)
    frames = reader[11]
    assert frames.shape == (48, 64, 3) and frame_code(np.asarray(frames)) == 11
    owned = frames.asnumpy()
    owned[:] = 0  # the caller's copy: must not reach the cache
    assert frame_code(reader[11].asnumpy()) == 11


def test_clear_errors(coded_video, tmp_path):
    reader = VideoReader(coded_video)
    with pytest.raises(IndexError, match=r"frame index 40 out of range for a video of 40 frames"):
        reader[40]
    with pytest.raises(IndexError, match="-41"):
        reader[-41]
    with pytest.raises(IndexError, match="frame index 99"):
        reader.get_batch([1, 99])
    with pytest.raises(DECORDError, match="frame index must be an int, got float 1.5"):
        reader[1.5]   # decord's C++ type check: DECORDError, not TypeError
    with pytest.raises(TypeError, match="must be an int, got str"):
        reader["3"]
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        VideoReader(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="garbage.mp4") as raised:
        VideoReader(garbage)
    assert isinstance(raised.value, DECORDError) and isinstance(raised.value, ValueError)
    sound = tmp_path / "sound.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    with pytest.raises(VideoReadError, match="sound.wav has no video stream"):
        VideoReader(sound)


def test_seeks_to_keyframes_and_caches(coded_video):
    reader = VideoReader(coded_video, cache_frames=8)
    assert reader.get_key_indices()[:4] == [0, 10, 20, 30]
    for i in range(12):  # a sequential read: one seek, one decode per frame
        reader[i]
    assert reader.stats.seeks == 1 and reader.stats.frames_decoded == 12
    decoded = reader.stats.frames_decoded
    reader[11]  # cached
    assert reader.stats.frames_decoded == decoded
    reader[35]  # far ahead: seek to keyframe 30 and decode 30..35, not 12..35
    assert reader.stats.seeks == 2 and reader.stats.frames_decoded - decoded == 6
    reader[0]  # evicted from the 8-frame cache: decoded again after a seek back
    assert reader.stats.seeks == 3 and len(reader._cache) <= 8


def test_width_height_resize_like_decord(coded_video):
    reader = VideoReader(coded_video, width=32, height=24)
    assert reader[0].shape == (24, 32, 3) and reader.frame_size == (32, 24)


def test_long_video_is_read_without_loading_it(tmp_path):
    """10 minutes at 4 fps: random access decodes at most one GOP per frame, memory stays far below the whole video."""
    gop = 100
    path = write_video(tmp_path / "long.mp4", (coded_frame(i) for i in range(2400)), fps=4, gop_size=gop)
    whole_video_bytes = 2400 * 48 * 64 * 3  # 22 MB decoded
    tracemalloc.start()
    try:
        reader = VideoReader(path, cache_frames=16)
        assert len(reader) == 2400 and reader.duration == 600.0
        for i in (2399, 7, 1234, 1235, 601, -1, 1999, 0, 2222):
            before = reader.stats.frames_decoded
            assert frame_code(reader[i].asnumpy()) == i % 2400
            # B-frame reordering can add a few frames beyond the GOP; decoding from the start would cost up to 2400
            assert reader.stats.frames_decoded - before <= gop + 8
        batch = reader.get_batch([100, 2300, 1200])
        assert [frame_code(f) for f in batch.asnumpy()] == [100, 2300, 1200]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole_video_bytes / 20, f"peak traced memory {peak} bytes for a {whole_video_bytes}-byte video"
    assert reader.stats.frames_decoded < 12 * (gop + 8)


# ---------------------------------------------------------------------------------------------------------------------
# decord compatibility: rotation, containers, index types, the sequential API, loaders, bridge, alias. Each behaviour
# is pinned here with the values decord 0.6.0 gives; the `decord` tests below run decord itself on the same files.
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decord():
    """The real decord 0.6.0 (the dev extra installs it on Linux x86-64), for side-by-side checks; skipped elsewhere."""
    module = pytest.importorskip("decord")
    assert module.VideoReader is not VideoReader, "a test left the decord alias installed"
    return module


@pytest.fixture
def decord_alias(monkeypatch):
    """`import decord` resolves to the alias for one test; what `sys.modules` held before (a real decord, or nothing)
    comes back after."""
    for name in ("decord", "decord.bridge"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
    yield install_decord_alias()
    reset_bridge()


# Noise, shifted by one column per frame: scaling and colour conversion differ visibly between FFmpeg's code paths on
# it, where the black-and-white coded frames come out the same whatever the path.
TEXTURE = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)


def textured_frame(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.roll(TEXTURE, index, axis=1)[:height, :width]


def wide_frame(index: int) -> np.ndarray:
    """(64, 128, 3): the coded frame in the top-left corner of a wider textured frame, so a quarter turn changes the
    size. 128- and 64-pixel rows are 64-byte multiples in rgb24, which decord needs to return (H, W, 3)."""
    frame = textured_frame(index, 64, 128).copy()
    frame[:48, :64] = coded_frame(index)
    return frame


@pytest.fixture(scope="module")
def rotated_videos(tmp_path_factory):
    """The same 12 frames tagged with each display rotation (clockwise degrees), as phones write them."""
    folder = tmp_path_factory.mktemp("rotated")
    return {rotation: write_video(folder / f"rotated{rotation}.mp4", (wide_frame(i) for i in range(12)), fps=8,
                                     rotation=rotation) for rotation in (0, 90, 180, 270)}


@pytest.fixture(scope="module")
def b_frame_videos(tmp_path_factory):
    """The 40 coded frames (B-frames, a keyframe every 10) in the containers whose timestamps need care: MPEG-TS seeks
    by dts, AVI stores decode times as pts."""
    folder = tmp_path_factory.mktemp("b_frames")
    return {suffix: write_video(folder / f"coded.{suffix}", (coded_frame(i) for i in range(40)), fps=8, gop_size=10)
            for suffix in ("ts", "avi")}


def codes(frames) -> list[int]:
    return [frame_code(f) for f in frames.asnumpy()]


def test_display_rotation_is_applied(rotated_videos):
    upright = VideoReader(rotated_videos[0]).get_batch(range(12)).asnumpy()   # (12, 64, 128, 3)
    for rotation in (90, 180, 270):
        reader = VideoReader(rotated_videos[rotation])
        shown = np.rot90(upright, k=-rotation // 90, axes=(1, 2))             # clockwise
        assert np.array_equal(reader.get_batch(range(12)).asnumpy(), shown), rotation
        height, width = shown.shape[1:3]
        assert reader.frame_size == (width, height)
        assert video_info(rotated_videos[rotation]).startswith(f"Frame Width: {width}; Frame Height: {height};")
        # width/height resize the displayed frame, as decord's do
        assert VideoReader(rotated_videos[rotation], width=32, height=40)[0].shape == (40, 32, 3)


def test_rotation_and_resizing_match_decord(decord, rotated_videos):
    for rotation, path in rotated_videos.items():
        for size in ({}, {"width": 64, "height": 96}):
            ours, theirs = VideoReader(path, **size), decord.VideoReader(str(path), **size)
            assert np.array_equal(ours.get_batch(range(12)).asnumpy(), theirs.get_batch(range(12)).asnumpy()), \
                (rotation, size)


def test_b_frames_in_ts_and_avi_read_every_frame(b_frame_videos):
    for suffix, path in b_frame_videos.items():
        with av.open(str(path)) as container:   # the streams do reorder frames
            assert container.streams.video[0].codec_context.has_b_frames
        reader = VideoReader(path)
        assert len(reader) == 40 and reader.get_key_indices() == [0, 10, 20, 30]
        assert codes(reader.get_batch(range(40))) == list(range(40)), suffix   # frame 0 first: the first GOP
        uncached = VideoReader(path, cache_frames=1)   # every read below seeks or decodes forward
        order = np.random.default_rng(1).permutation(40).tolist()
        assert [frame_code(uncached[i].asnumpy()) for i in order] == order, suffix
    with av.open(str(b_frame_videos["ts"])) as container:   # the TS stream starts after 0 s ...
        assert container.streams.video[0].start_time > 0
    ts = VideoReader(b_frame_videos["ts"])                        # ... and times count from its start, as decord's
    assert ts.get_frame_timestamp([0, 1]).tolist() == [[0.0, 0.125], [0.125, 0.25]]


def test_b_frames_in_ts_and_avi_match_decord(decord, b_frame_videos):
    ts = decord.VideoReader(str(b_frame_videos["ts"]))
    ours = VideoReader(b_frame_videos["ts"])
    # decord's frames are wrong on this file (its seek to frame 0 lands on frame 10); its index is right. On the AVI
    # its random access is wrong (it cannot seek there) and its timestamps are garbage; frames read in order match.
    assert (len(ours), ours.get_key_indices(), ours.get_avg_fps()) == (len(ts), ts.get_key_indices(), ts.get_avg_fps())
    assert np.array_equal(ours.get_frame_timestamp(range(40)), ts.get_frame_timestamp(range(40)))
    avi = decord.VideoReader(str(b_frame_videos["avi"]))
    assert np.array_equal(VideoReader(b_frame_videos["avi"]).get_batch(range(40)).asnumpy(),
                          avi.get_batch(range(40)).asnumpy())


@pytest.mark.parametrize("suffix", ["mp4", "mov", "mkv", "flv"])   # avi: with the B-frames files
def test_ordinary_files_match_decord(decord, tmp_path, suffix):
    path = write_video(tmp_path / f"textured.{suffix}", (textured_frame(i) for i in range(40)), fps=8, gop_size=10)
    ours, theirs = VideoReader(path), decord.VideoReader(str(path))
    assert (len(ours), ours.get_key_indices(), ours.get_avg_fps()) == (len(theirs), theirs.get_key_indices(),
                                                                      theirs.get_avg_fps())
    order = np.random.default_rng(2).permutation(40).tolist()
    assert np.array_equal(ours.get_batch(order).asnumpy(), theirs.get_batch(order).asnumpy())
    resized = {"width": 128, "height": 60}
    assert np.array_equal(VideoReader(path, **resized).get_batch(range(0, 40, 3)).asnumpy(),
                          decord.VideoReader(str(path), **resized).get_batch(range(0, 40, 3)).asnumpy())
    if suffix != "flv":   # FFmpeg 4.1 gives flv's first packet no duration
        assert np.array_equal(ours.get_frame_timestamp(range(40)), theirs.get_frame_timestamp(range(40)))


def test_frame_ends_at_start_plus_its_duration(tmp_path):
    """A frame-rate change: Matroska gives every packet 1/8 s, so frame 4 ends at 0.75 s, not at frame 5's 0.875 s."""
    ticks = [0, 1, 2, 3, 5, 7, 9, 11]
    path = write_video(tmp_path / "vfr.mkv", (coded_frame(i) for i in range(8)), fps=8, frame_ticks=ticks)
    stamps = VideoReader(path).get_frame_timestamp(range(8))
    assert stamps.dtype == np.float32 and stamps[:, 0].tolist() == [tick / 8 for tick in ticks]
    assert stamps[:, 1].tolist() == [tick / 8 + 0.125 for tick in ticks]


def test_frame_ends_match_decord(decord, tmp_path):
    path = write_video(tmp_path / "vfr.mkv", (coded_frame(i) for i in range(8)), fps=8,
                          frame_ticks=[0, 1, 2, 3, 5, 7, 9, 11])
    assert np.array_equal(VideoReader(path).get_frame_timestamp(range(8)),
                          decord.VideoReader(str(path)).get_frame_timestamp(range(8)))


def test_index_types_are_cast_like_decord(coded_video):
    reader = VideoReader(coded_video)
    assert codes(reader.get_batch(np.linspace(0, 39, 8))) == [0, 5, 11, 16, 22, 27, 33, 39]   # truncated
    assert codes(reader.get_batch([1.9, -0.5, -1.5])) == [1, 0, 39]
    assert codes(reader.get_batch([True, False, True])) == [1, 0, 1]
    assert codes(reader.get_batch(np.array([1, 0, 1], bool))) == [1, 0, 1]
    assert codes(reader.get_batch(np.array([[1, 2], [3, 4]]).T)) == [1, 3, 2, 4]   # any shape, flattened in C order
    assert frame_code(reader[True].asnumpy()) == 1 and frame_code(reader[np.int32(3)].asnumpy()) == 3
    assert reader.get_frame_timestamp(2.7).tolist() == [0.25, 0.375]
    stamps = reader.get_frame_timestamp([[1, 2], [3, 4]])
    assert stamps.shape == (2, 2, 2) and stamps.dtype == np.float32 and stamps[1, 0].tolist() == [0.375, 0.5]
    with pytest.raises(DECORDError, match="got float 2.0"):
        reader[np.float64(2.0)]
    with pytest.raises(TypeError, match="single index 3"):
        reader.get_batch(3)
    with pytest.raises(IndexError, match="frame index 250 out of range"):
        reader.get_batch(np.array([1, 250], np.uint8))


# What model code does with indices; `get_batch(3)` is left out: it kills decord's process.
INDEX_CASES = ["vr.get_batch(np.linspace(0, 39, 8))", "vr.get_batch([1.9, -0.5, -1.5])", "vr.get_batch([True, False])",
               "vr.get_batch(np.array([True, False, True]))", "vr.get_batch([[1, 2], [3, 4]])",
               "vr.get_batch(np.array([[1, 2], [3, 4]]).T)", "vr.get_batch(['1', '2'])", "vr.get_batch([])",
               "vr.get_batch((1, 2))", "vr.get_batch(np.zeros((2, 2, 2)))", "vr.get_batch([-1, -40])",
               "vr.get_batch([-41])", "vr.get_batch([40])", "vr.get_batch(np.array([1, 250], np.uint8))",
               "vr.get_batch([float('nan')])", "vr.get_batch([1e20])", "vr.get_batch(None)",
               "vr.get_batch([[1], [2, 3]])", "vr[True]", "vr[np.int32(3)]", "vr[-1]", "vr[1.5]", "vr[-1.5]",
               "vr[np.float64(2.0)]", "vr[np.array(3)]", "vr[[1, 2]]", "vr['3']", "vr[None]", "vr[40]", "vr[-41]",
               "vr[1:7:2]", "vr[::-10]", "vr.get_frame_timestamp(3)", "vr.get_frame_timestamp(2.7)",
               "vr.get_frame_timestamp([[1, 2], [3, 4]])", "vr.get_frame_timestamp(-1)", "vr.get_frame_timestamp([])",
               "vr.get_frame_timestamp(True)", "vr.get_frame_timestamp(range(2))", "vr.get_frame_timestamp(40)"]


def outcome(expression: str, reader):
    """What an expression gives: (dtype, shape, bytes) of the array, or the name of the exception raised."""
    try:
        result = eval(expression, {"np": np, "vr": reader})
    except Exception as e:
        return type(e).__name__
    result = result.asnumpy() if hasattr(result, "asnumpy") else result
    return result.dtype.str, result.shape, result.tobytes()


def test_index_types_match_decord(decord, coded_video):
    ours, theirs = VideoReader(coded_video), decord.VideoReader(str(coded_video))
    for expression in INDEX_CASES:
        assert outcome(expression, ours) == outcome(expression, theirs), expression


# decord's sequential reading: next, fast and accurate seeks, skips, and where reads leave the position
SEQUENTIAL_STEPS = ["vr.next()", "vr.next()", "vr.next()", "vr.seek(15)", "vr.next()", "vr.next()", "vr.seek(5)",
                    "vr.next()", "vr.seek(10)", "vr.next()", "vr.seek_accurate(15)", "vr.next()", "vr.skip_frames(5)",
                    "vr.next()", "vr.skip_frames()", "vr.next()", "vr[20]", "vr.next()", "vr.get_batch([30, 7])",
                    "vr.next()", "vr.seek_accurate(38)", "vr.next()", "vr.next()", "vr.next()", "vr.skip_frames(3)",
                    "vr.next()", "vr.seek(40)", "vr.seek(-1)", "vr.skip_frames(0)", "vr.seek(2.5)",
                    "vr.seek_accurate(np.int64(3))", "vr.next()"]


def walk(reader) -> list:
    """Each step's result: the codes of the frames read, None for a seek or skip, or the exception's name."""
    results = []
    for step in SEQUENTIAL_STEPS:
        try:
            result = eval(step, {"np": np, "vr": reader})
        except (Exception, StopIteration) as e:
            results.append(type(e).__name__)
            continue
        frames = None if result is None else result.asnumpy()
        results.append(None if frames is None else [frame_code(f) for f in frames.reshape(-1, 48, 64, 3)])
    return results


def test_sequential_api_like_decord(coded_video):
    assert walk(VideoReader(coded_video)) == [
        [0], [1], [2], None, [20], [21], None, [0], None, [10], None, [15], None, [21], None, [23], [20], [21],
        [30, 7], [8], None, [38], [39], "StopIteration", None, "StopIteration", "AssertionError", "AssertionError",
        "AssertionError", "DECORDError", None, [3]]


def test_sequential_api_matches_decord(decord, coded_video):
    assert walk(VideoReader(coded_video)) == walk(decord.VideoReader(str(coded_video)))


def test_file_like_objects_are_read_whole(coded_video):
    with open(coded_video, "rb") as file:
        from_file = VideoReader(file)
    for reader in (from_file, VideoReader(io.BytesIO(coded_video.read_bytes()))):   # the file is closed by now
        assert len(reader) == 40 and codes(reader.get_batch([39, 0, 17])) == [39, 0, 17]
        assert reader.path is None and "-byte video object" in repr(reader)


def test_file_like_objects_match_decord(decord, coded_video):
    with open(coded_video, "rb") as ours_file, open(coded_video, "rb") as theirs_file:
        ours, theirs = VideoReader(ours_file), decord.VideoReader(theirs_file)
    assert np.array_equal(ours.get_batch(range(40)).asnumpy(), theirs.get_batch(range(40)).asnumpy())


def test_torch_bridge(coded_video):
    import torch
    reader = VideoReader(coded_video)
    try:
        set_bridge("torch")
        frame, batch = reader[5], reader.get_batch([1, 2])
        assert isinstance(frame, torch.Tensor) and frame.dtype == torch.uint8 and frame.shape == (48, 64, 3)
        assert frame_code(frame.numpy()) == 5 and batch.shape == (2, 48, 64, 3)
        assert isinstance(reader.next(), torch.Tensor)
        frame[:] = 0   # the caller's tensor: the cached frame stays intact
    finally:
        reset_bridge()
    assert frame_code(reader[5].asnumpy()) == 5
    with use_torch():
        assert isinstance(reader[0], torch.Tensor)
    assert hasattr(reader[0], "asnumpy")
    with pytest.raises(ValueError, match="'mxnet' is not available"):
        set_bridge("mxnet")


def test_torch_bridge_matches_decord(decord, coded_video):
    ours, theirs = VideoReader(coded_video), decord.VideoReader(str(coded_video))
    try:
        set_bridge("torch")
        decord.bridge.set_bridge("torch")
        for read in (lambda vr: vr[7], lambda vr: vr.get_batch([3, 1])):
            ours_tensor, theirs_tensor = read(ours), read(theirs)
            assert ours_tensor.dtype == theirs_tensor.dtype and ours_tensor.equal(theirs_tensor)
    finally:
        reset_bridge()
        decord.bridge.reset_bridge()


def test_decord_alias_covers_the_decord_api(decord_alias, coded_video, tmp_path):
    import decord
    from decord import VideoReader as DecordReader, cpu
    from decord.bridge import set_bridge
    assert decord is decord_alias and DecordReader is VideoReader and decord.bridge.set_bridge is set_bridge
    assert (decord.VideoLoader, decord.AVReader, decord.DECORDError) == (VideoLoader, AVReader, DECORDError)
    video = DecordReader(str(coded_video), ctx=cpu(0))   # the official runtime header's call
    assert len(video) == 40 and frame_code(video.get_batch([4]).asnumpy()[0]) == 4
    # decord's positional signature: uri, ctx, width, height, num_threads (0: automatic), fault_tol
    assert DecordReader(str(coded_video), cpu(0), 32, 24, 0, -1)[0].shape == (24, 32, 3)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    for read in (lambda: DecordReader(str(garbage)), lambda: video[1.5]):
        with pytest.raises(decord.DECORDError):   # what model code written against decord catches
            read()


def test_decord_alias_replaces_an_installed_decord(decord, decord_alias):
    import decord as imported
    assert imported is decord_alias and imported.VideoReader is VideoReader


def short_video(folder):
    return write_video(folder / "short.mkv", (coded_frame(i) for i in range(12)), fps=8)


LOADER_SHAPE = (3, 32, 64, 3)   # 3 frames of 32x64: resized, in rows decord can return


def test_video_loader_batches_like_decord(coded_video, tmp_path):
    """3 frames 2 apart, 1 skipped between batches: decord's batches start 8 frames apart while one ends before the
    last frame (mode 1 lets it end on the last but one)."""
    paths = [str(coded_video), str(short_video(tmp_path))]
    loader = VideoLoader(paths, ctx=cpu(0), shape=LOADER_SHAPE, interval=2, skip=1, shuffle=0)
    batches = list(loader)
    starts = [(0, 0), (0, 8), (0, 16), (0, 24), (1, 0)]
    assert len(loader) == 5 and [indices.asnumpy().tolist() for _, indices in batches] == \
        [[[video, start + 3 * k] for k in range(3)] for video, start in starts]
    resized = VideoReader(coded_video, width=64, height=32)
    assert np.array_equal(batches[1][0].asnumpy(), resized.get_batch([8, 11, 14]).asnumpy())
    assert next(loader, None) is None   # an epoch ends; reset() starts the next
    loader.reset()
    assert [indices.asnumpy().tolist() for _, indices in loader] == [i.asnumpy().tolist() for _, i in batches]
    for shuffle, extra in ((1, [(0, 32)]), (2, [])):
        shuffled = VideoLoader(paths, ctx=cpu(0), shape=LOADER_SHAPE, interval=2, skip=1, shuffle=shuffle)
        firsts = [tuple(indices.asnumpy()[0]) for _, indices in shuffled]
        assert sorted(firsts) == sorted(starts + extra), shuffle
        if shuffle == 1:   # each video front to back
            assert [f for f in firsts if f[0] == 0] == sorted(f for f in firsts if f[0] == 0)
    with pytest.raises(DECORDError, match="shuffle mode 3"):
        VideoLoader(paths, ctx=cpu(0), shape=LOADER_SHAPE, interval=2, skip=1, shuffle=3)


def test_video_loader_matches_decord(decord, coded_video, tmp_path):
    paths = [str(coded_video), str(short_video(tmp_path)), str(coded_video)]
    for interval, skip in ((0, 0), (2, 1), (1, 5)):
        for shuffle in (0, 1, 2):
            batches = []
            for module in (video_reader, decord):
                loader = module.VideoLoader(paths, ctx=module.cpu(0), shape=LOADER_SHAPE, interval=interval, skip=skip,
                                            shuffle=shuffle)
                batches.append({tuple(map(tuple, i.asnumpy())): f.asnumpy() for f, i in loader})
            ours, theirs = batches
            assert ours.keys() == theirs.keys(), (interval, skip, shuffle)
            assert all(np.array_equal(ours[key], theirs[key]) for key in ours)
            if shuffle == 0:
                assert list(ours) == list(theirs)


def write_with_audio(path, channels: int = 1, audio_start: float = 0.0):
    """The 16 coded frames at 8 fps (2 s) with a 44.1 kHz PCM tone, channel c a (c + 1) x 440 Hz sine, starting at
    `audio_start` s -> (path, the tone as float32 (channels, samples), as a decoder gives it back)."""
    rate = 44100
    seconds = np.arange(2 * rate) / rate
    pcm = (np.stack([np.sin(2 * np.pi * 440 * (c + 1) * seconds) for c in range(channels)]) * 16000).astype(np.int16)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=8)
        video.pix_fmt, video.width, video.height = "yuv420p", 64, 48
        audio = container.add_stream("pcm_s16le", rate=rate, layout="mono" if channels == 1 else "stereo")
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(coded_frame(i), format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for start in range(0, pcm.shape[1], 1024):
            chunk = np.ascontiguousarray(pcm[:, start:start + 1024].T).reshape(1, -1)   # s16 is interleaved
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=audio.layout)
            frame.sample_rate, frame.pts = rate, start + round(audio_start * rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path, pcm.astype(np.float32) / 32768


def test_av_reader_gives_each_frame_its_audio(tmp_path):
    path, tone = write_with_audio(tmp_path / "tone.mkv")
    reader = AVReader(str(path))
    assert len(reader) == 16 and reader.sample_rate == 44100
    audio, frame = reader[3]   # frame 3 covers [0.375, 0.5) s
    assert frame_code(frame.asnumpy()) == 3
    assert np.array_equal(audio.asnumpy(), tone[:, math.ceil(0.375 * 44100):math.ceil(0.5 * 44100)])
    audio, frames = reader.get_batch([1, 2, 9])
    assert codes(frames) == [1, 2, 9] and np.array_equal(np.concatenate([a.asnumpy() for a in audio[:2]], axis=1),
                                                         tone[:, math.ceil(0.125 * 44100):math.ceil(0.375 * 44100)])
    sliced, frames = reader[1:3]
    assert codes(frames) == [1, 2] and all(np.array_equal(a.asnumpy(), b.asnumpy()) for a, b in zip(sliced, audio[:2]))
    late, _ = write_with_audio(tmp_path / "late.mkv", audio_start=0.1)   # zeros before the audio starts
    audio, _ = AVReader(str(late))[0]
    assert np.array_equal(audio.asnumpy(), np.concatenate([np.zeros((1, 4410), np.float32), tone[:, :1103]], axis=1))
    with pytest.raises(VideoReadError, match="no audio stream"):
        AVReader(str(write_video(tmp_path / "silent.mp4", [coded_frame(0)], fps=8)))


def test_av_reader_matches_decord(decord, tmp_path):
    for channels, audio_start in ((1, 0.0), (2, 0.0), (1, 0.1)):
        path, _ = write_with_audio(tmp_path / f"tone{channels}{audio_start}.mkv", channels, audio_start)
        ours, theirs = AVReader(str(path)), decord.AVReader(str(path), ctx=decord.cpu(0))
        for read in (lambda r: ([r[3][0]], r[3][1]), lambda r: r.get_batch([0, 1, 2, 5, 6, 15])):
            (ours_audio, ours_frames), (theirs_audio, theirs_frames) = read(ours), read(theirs)
            assert np.array_equal(ours_frames.asnumpy(), theirs_frames.asnumpy())
            assert [a.shape for a in ours_audio] == [a.shape for a in theirs_audio]
            assert all(np.array_equal(a.asnumpy(), b.asnumpy()) for a, b in zip(ours_audio, theirs_audio))

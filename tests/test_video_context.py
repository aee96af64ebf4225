"""video_context.py: the decord-compatible reader, the prompt's video_info block, the full-context baseline, visual-token
accounting, and data.py's synthetic video tasks (whose solutions run against the reader)."""
import json
import math
import sys
import tracemalloc
import wave
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

import data
import video_context as vc
from video_context import VideoReader, VideoReadError, VideoSampling

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
    return vc.write_video(path, (coded_frame(i) for i in range(40)), fps=8, gop_size=10)


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
    with pytest.raises(TypeError, match="must be an int"):
        reader[1.5]
    with pytest.raises(TypeError, match="must be ints"):
        reader.get_batch([1, 2.0])
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        VideoReader(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="garbage.mp4"):
        VideoReader(garbage)
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


def test_decord_alias_runs_official_header_code(coded_video):
    sys.modules.pop("decord", None)
    try:
        vc.install_decord_alias()
        from decord import VideoReader as DecordReader, cpu
        video = DecordReader(str(coded_video), ctx=cpu(0))
        assert len(video) == 40 and frame_code(video.get_batch([4]).asnumpy()[0]) == 4
    finally:
        sys.modules.pop("decord", None)


def test_width_height_resize_like_decord(coded_video):
    reader = VideoReader(coded_video, width=32, height=24)
    assert reader[0].shape == (24, 32, 3) and reader.frame_size == (32, 24)


def test_long_video_is_read_without_loading_it(tmp_path):
    """10 minutes at 4 fps: random access decodes at most one GOP per frame, memory stays far below the whole video."""
    gop = 100
    path = vc.write_video(tmp_path / "long.mp4", (coded_frame(i) for i in range(2400)), fps=4, gop_size=gop)
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
# The prompt's info block
# ---------------------------------------------------------------------------------------------------------------------

def test_video_info_is_the_official_block(coded_video, tmp_path):
    assert vc.video_info(coded_video) == (
        "Frame Width: 64; Frame Height: 48;\n"
        "Video Length: 40; Sample FPS: 8.00\n"
        "The original video has been read into the global variable `video_clue_0`.")
    ntsc = vc.write_video(tmp_path / "ntsc.mp4", (coded_frame(i) for i in range(6)), fps=Fraction(30000, 1001))
    meta = vc.probe_video(ntsc)
    assert (meta.width, meta.height, meta.num_frames) == (64, 48, 6) and meta.fps == pytest.approx(29.97, abs=1e-3)
    assert "Video Length: 6; Sample FPS: 29.97\n" in vc.video_info(meta)


# ---------------------------------------------------------------------------------------------------------------------
# The full-context baseline and visual-token accounting
# ---------------------------------------------------------------------------------------------------------------------

def test_qwen_frame_sampling_rules():
    default = VideoSampling()
    assert default.num_frames(160, 8.0) == 40                      # 20 s at 2 fps
    assert VideoSampling(fps=1.0).num_frames(160, 8.0) == 20
    assert VideoSampling(fps=1.0).num_frames(83, 8.0) == 10         # 10.4 frames -> even count, floored
    assert default.num_frames(5, 8.0) == 4                          # at least min_frames
    assert default.num_frames(30 * 1000, 30.0) == 768               # at most max_frames
    assert VideoSampling(fps=1.0, max_frames=9).num_frames(160, 8.0) == 8
    assert VideoSampling(fps=1.0).indices(160, 8.0) == np.round(np.linspace(0, 159, 20)).astype(int).tolist()
    with pytest.raises(ValueError, match="1 frames"):
        default.num_frames(1, 8.0)
    # per-frame pixel cap: the 768-frame total budget share, but never below 1.05 x min_pixels
    geometry = vc.qwen2_5_vl_7b_geometry()
    assert default.frame_geometry(geometry, 20).max_pixels == 768 * 28 * 28
    assert default.frame_geometry(geometry, 768).max_pixels == pytest.approx(int(128000 * 28 * 28 * 0.9) / 768 * 2)
    assert VideoSampling(min_pixels=None).frame_geometry(geometry, 768) == geometry


def test_7b_geometry_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    sizes = [(120, 160), (480, 640), (3000, 4000), (2000, 30), (28, 28), (50, 9000), (1080, 1920), (333, 777)]
    for max_pixels in (12845056, 2_000_000):
        geometry = vc.qwen2_5_vl_7b_geometry(max_pixels)
        for h, w in sizes:
            assert geometry.resized_hw(h, w) == smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=max_pixels)
    # a video frame under qwen-vl-utils' video bounds (768 frames -> a 235200-pixel cap per frame)
    frame_geometry = VideoSampling().frame_geometry(vc.qwen2_5_vl_7b_geometry(), 768)
    h, w = smart_resize(1080, 1920, factor=28, min_pixels=128 * 28 * 28, max_pixels=int(128000 * 28 * 28 * 0.9) / 768 * 2)
    assert frame_geometry.video_tokens(768, 1920, 1080) == 384 * (h // 14) * (w // 14) // 4
    # the 640x480 figure a default matplotlib plt.show() returns: 476x644 -> 17 x 23 merged patches
    assert vc.count_visual_tokens(vc.qwen2_5_vl_7b_geometry(), tool_images=[(640, 480)]).tool_images == 391


def test_7b_geometry_matches_the_pil_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 2_000_000})
    images = [Image.new("RGB", size) for size in ((640, 480), (2000, 1500), (37, 61))]
    grids = processor(images, return_tensors="np")["image_grid_thw"]
    tokens = vc.count_visual_tokens(vc.qwen2_5_vl_7b_geometry(2_000_000), images=images)
    assert tokens.context_images == sum(int(np.prod(g)) // 4 for g in grids)


def test_token_counts_match_the_tiny_processor(tiny_dir):
    import models
    processor = models.VLProcessor.from_pretrained(tiny_dir)
    geometry = processor.geometry
    images = [Image.new("RGB", size, "red") for size in ((160, 120), (640, 480), (30, 50), (224, 224))]
    videos = [np.zeros((5, 120, 160, 3), np.uint8), np.zeros((8, 300, 200, 3), np.uint8)]
    text = models.IMAGE_PLACEHOLDER * len(images) + models.VIDEO_PLACEHOLDER * len(videos)
    inputs = processor(text, images=images, videos=videos)
    counted = vc.count_visual_tokens(geometry, images=images[:2], videos=videos, tool_images=images[2:])
    assert counted.context_images + counted.tool_images == int((inputs["input_ids"] == processor.image_pad_id).sum())
    assert counted.context_videos == int((inputs["input_ids"] == processor.video_pad_id).sum())
    assert counted.total == counted.context_images + counted.context_videos + counted.tool_images
    # sizes given as numbers count the same as the media themselves
    assert vc.count_visual_tokens(geometry, images=[(160, 120)], videos=[(5, 160, 120)]) == \
        vc.count_visual_tokens(geometry, images=images[:1], videos=videos[:1])


def test_full_context_baseline_through_the_processor(tiny_dir, tmp_path):
    """Sample at 1 fps, put the clip into the context as a video and as images: the pads match the accounting."""
    import models
    processor = models.VLProcessor.from_pretrained(tiny_dir)
    path = vc.write_video(tmp_path / "clip.mp4", (coded_frame(i) for i in range(83)), fps=8)
    frames, times = vc.sample_uniform(path, fps=1.0)
    assert frames.shape == (10, 48, 64, 3)
    assert [frame_code(f) for f in frames] == np.round(np.linspace(0, 82, 10)).astype(int).tolist()
    assert times.tolist() == [frame_code(f) / 8 for f in frames]
    assert len(vc.sample_uniform(path, fps=2.0, max_frames=6)[0]) == 6
    meta = vc.probe_video(path)
    processor_bounds = VideoSampling(fps=1.0, min_pixels=None)
    sample_fps = processor_bounds.sample_fps(meta.num_frames, meta.fps)
    as_video = vc.full_context_video_inputs(processor, "What happens?", frames, sample_fps)
    assert int((as_video["input_ids"] == processor.video_pad_id).sum()) == \
        vc.full_context_tokens(meta, processor.geometry, processor_bounds) == 5 * (4 * 4 // 4)
    assert as_video["second_per_grid_ts"].tolist() == [pytest.approx(2 / sample_fps)]
    as_images = vc.full_context_image_inputs(processor, "What happens?", frames)
    assert int((as_images["input_ids"] == processor.image_pad_id).sum()) == \
        vc.full_context_tokens(meta, processor.geometry, processor_bounds, as_images=True)
    assert "<image_clue_9>" in processor.decode(as_images["input_ids"][0])


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic video tasks (data.py)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("video_tasks")
    return out, data.generate_video_tasks(8, seed=3, out_dir=out)


def test_video_tasks_in_the_official_format(video_tasks):
    out, tasks = video_tasks
    loaded, bad = data.load_tasks(out / "tasks.json")
    assert not bad and [t.id for t in loaded] == [t.id for t in tasks]
    assert {t.family for t in loaded} == set(data.VIDEO_FAMILIES)
    for task in loaded:
        assert task.media_kind == "video" and task.data_source == "synthetic_video" and task.needs_tool
        assert task.ability in ("multiple_choice", "numeric")
        assert (task.choices is not None) == (task.ability == "multiple_choice")
        meta = vc.probe_video(task.video_path)
        assert (meta.width, meta.height, meta.fps) == (160, 120, 8.0) and 10 <= meta.duration <= 30
    rows = json.loads((out / "tasks.json").read_text())
    assert all(row["video_path"].startswith("videos/") for row in rows)


def test_solutions_answer_from_a_few_fetched_frames(video_tasks):
    _, tasks = video_tasks
    for task in tasks:
        run = vc.run_in_process(task.solution_code, task.video_path)
        assert run.error is None, (task.id, run.error)
        assert task.is_answer(run.text.strip().splitlines()[-1]), (task.id, task.family, run.text)
        assert 1 <= len(run.images) <= 2
        limit = 1 if task.family == "colour_at_time" else 31  # one frame; a binary search; or 1 frame/s of <= 30 s
        assert run.stats.frames_requested <= limit, (task.family, run.stats)


def test_the_answer_depends_on_the_moment(video_tasks):
    """colour_at_time: the asked moment is coloured differently from the video's start (when the video allows it)."""
    _, tasks = video_tasks
    for task in (t for t in tasks if t.family == "colour_at_time"):
        code_at_start = task.solution_code.replace("round(", "round(0 * ", 1)
        answer_at_start = vc.run_in_process(code_at_start, task.video_path).text.strip().splitlines()[-1]
        assert not task.is_answer(answer_at_start)


def test_video_tasks_are_deterministic(video_tasks, tmp_path):
    out, tasks = video_tasks
    again = data.generate_video_tasks(8, seed=3, out_dir=tmp_path)
    for first, second in zip(tasks, again):
        assert (first.question, first.answer, first.solution_code) == (second.question, second.answer,
                                                                       second.solution_code)
        assert open(first.video_path, "rb").read() == open(second.video_path, "rb").read()
    other = data.generate_video_tasks(4, seed=4, out_dir=None)
    assert [t.question for t in other] != [t.question for t in tasks[:4]]


def test_cli_writes_video_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["data.py", "--kind", "video", "--n", "2", "--seed", "1", "--out", str(tmp_path)])
    data.main()
    assert "wrote 2 video tasks" in capsys.readouterr().out
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2


def test_bench_smoke(monkeypatch, capsys):
    """bench/video_tokens.py end to end on 4 tasks (solution code in this process): its last line is the ratio."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("video_tokens", Path(__file__).parents[1] / "bench" / "video_tokens.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "video_tokens", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["video_tokens.py", "--n", "4", "--executor", "in-process"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert "solution-code correctness: 100.0%" in lines
    prefix = "on-demand / full-context (1 fps) visual tokens: "
    assert lines[-1].startswith(prefix) and 0 < float(lines[-1][len(prefix):]) <= 0.15

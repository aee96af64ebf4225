"""video_context.py: the prompt's video_info block and the full-context baseline; the visual-token accounting of
bench/video_tokens.py; and data.py's synthetic video tasks (whose solutions run against the reader). The reader itself:
tests/test_video_reader.py; the on-demand and full-context first turns in a rollout: tests/test_rollout.py."""
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import video_context as vc
from test_video_reader import coded_frame, frame_code
from video_context import VideoSampling
from video_reader import write_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import video_tokens  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# The prompt's info block
# ---------------------------------------------------------------------------------------------------------------------

def test_video_info_is_the_official_block(tmp_path):
    coded_video = write_video(tmp_path / "coded.mp4", (coded_frame(i) for i in range(40)), fps=8, gop_size=10)
    assert vc.video_info(coded_video) == (
        "Frame Width: 64; Frame Height: 48;\n"
        "Video Length: 40; Sample FPS: 8.00\n"
        "The original video has been read into the global variable `video_clue_0`.")
    ntsc = write_video(tmp_path / "ntsc.mp4", (coded_frame(i) for i in range(6)), fps=Fraction(30000, 1001))
    meta = vc.probe_video(ntsc)
    assert (meta.width, meta.height, meta.num_frames) == (64, 48, 6) and meta.fps == pytest.approx(29.97, abs=1e-3)
    assert "Video Length: 6; Sample FPS: 29.97\n" in vc.video_info(meta)


# ---------------------------------------------------------------------------------------------------------------------
# The full-context baseline, and the bench's visual-token accounting (bench/video_tokens.py)
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
    assert video_tokens.count_visual_tokens(vc.qwen2_5_vl_7b_geometry(), tool_images=[(640, 480)]).tool_images == 391


def test_7b_geometry_matches_the_pil_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 2_000_000})
    images = [Image.new("RGB", size) for size in ((640, 480), (2000, 1500), (37, 61))]
    grids = processor(images, return_tensors="np")["image_grid_thw"]
    tokens = video_tokens.count_visual_tokens(vc.qwen2_5_vl_7b_geometry(2_000_000), images=images)
    assert tokens.context_images == sum(int(np.prod(g)) // 4 for g in grids)


def test_token_counts_match_the_tiny_processor(tiny_dir):
    import models
    processor = models.VLProcessor.from_pretrained(tiny_dir)
    geometry = processor.geometry
    images = [Image.new("RGB", size, "red") for size in ((160, 120), (640, 480), (30, 50), (224, 224))]
    videos = [np.zeros((5, 120, 160, 3), np.uint8), np.zeros((8, 300, 200, 3), np.uint8)]
    text = models.IMAGE_PLACEHOLDER * len(images) + models.VIDEO_PLACEHOLDER * len(videos)
    inputs = processor(text, images=images, videos=videos)
    counted = video_tokens.count_visual_tokens(geometry, images=images[:2], videos=videos, tool_images=images[2:])
    assert counted.context_images + counted.tool_images == int((inputs["input_ids"] == processor.image_pad_id).sum())
    assert counted.context_videos == int((inputs["input_ids"] == processor.video_pad_id).sum())
    assert counted.total == counted.context_images + counted.context_videos + counted.tool_images
    # sizes given as numbers count the same as the media themselves
    assert video_tokens.count_visual_tokens(geometry, images=[(160, 120)], videos=[(5, 160, 120)]) == \
        video_tokens.count_visual_tokens(geometry, images=images[:1], videos=videos[:1])


def test_full_context_baseline_through_the_processor(tiny_dir, tmp_path):
    """Sample at 1 fps, put the clip into the context as a video and as images: the pads match the accounting."""
    import models
    processor = models.VLProcessor.from_pretrained(tiny_dir)
    path = write_video(tmp_path / "clip.mp4", (coded_frame(i) for i in range(83)), fps=8)
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
        video_tokens.full_context_tokens(meta, processor.geometry, processor_bounds) == 5 * (4 * 4 // 4)
    assert as_video["second_per_grid_ts"].tolist() == [pytest.approx(2 / sample_fps)]
    as_images = vc.full_context_image_inputs(processor, "What happens?", frames)
    assert int((as_images["input_ids"] == processor.image_pad_id).sum()) == \
        video_tokens.full_context_tokens(meta, processor.geometry, processor_bounds, as_images=True)
    assert "<image_clue_9>" in processor.decode(as_images["input_ids"][0])


def test_bench_counts_one_video_file(tmp_path, monkeypatch, capsys):
    """`python bench/video_tokens.py --video FILE --fps 1`: the 7B full-context tokens of one file."""
    path = write_video(tmp_path / "clip.mp4", (coded_frame(i) for i in range(83)), fps=8)
    monkeypatch.setattr(sys, "argv", ["video_tokens.py", "--video", str(path), "--fps", "1"])
    video_tokens.main()
    tokens = video_tokens.full_context_tokens(vc.probe_video(path), vc.qwen2_5_vl_7b_geometry(), VideoSampling(fps=1))
    assert capsys.readouterr().out.startswith(f"83 frames at 8.00 fps, 64x48: 10 frames sampled -> {tokens} visual "
                                              "tokens as a video, ")


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
        run = video_tokens.run_in_process(task.solution_code, task.video_path)
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
        answer_at_start = video_tokens.run_in_process(code_at_start, task.video_path).text.strip().splitlines()[-1]
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
    monkeypatch.setattr(sys, "argv", ["video_tokens.py", "--n", "4", "--executor", "in-process"])
    video_tokens.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert "solution-code correctness: 100.0%" in lines
    prefix = "on-demand / full-context (1 fps) visual tokens: "
    assert lines[-1].startswith(prefix) and 0 < float(lines[-1][len(prefix):]) <= 0.15

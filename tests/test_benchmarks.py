"""benchmarks.py: every converter on its release's format (real release rows from tests/fixtures with stand-in images,
or, where a release could not be read, rows written in its documented schema), the choices and options each question
carries, skipped items, parquet releases, and errors that name the file, row and field."""
import base64
import csv
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import pytest
from PIL import Image

import benchmarks
import data

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ROOT / "tests" / "fixtures"   # real release rows; tests/fixtures/README.md names each one's source


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path)
    return path


def _b64_jpeg(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _release(name: str, src: Path, images: Sequence[str]) -> None:
    """Copy the release fixture `name` to `src` and write a stand-in image at each of `images` (paths under src), each
    in its own colour so a test can tell which image a task got."""
    shutil.copytree(RELEASES / name, src, dirs_exist_ok=True)
    for k, image in enumerate(images):
        _png(src / image, (40 * k % 256, 100, 200))


def fixture_vstar(src: Path) -> None:
    _release("vstar", src, ["direct_attributes/sa_10033.jpg", "relative_position/sa_79958.jpg"])


def fixture_hrbench(src: Path) -> None:
    src.mkdir(parents=True)
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    with open(src / "hr_bench_4k.tsv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerow([0, "What is written on the sign?", "C", "single", "open", "shut", "exit", "stop", 0,
                         _b64_jpeg((10, 200, 10))])
        writer.writerow([1, "What colour is the car?", "A", "cross", "red", "blue", "green", "grey", 0, "0"])


def fixture_mathverse(src: Path) -> None:
    _release("mathverse", src, ["images_version_1-4/image_685.png", "images_version_6/image_685.png"])


def fixture_mathvision(src: Path) -> None:
    _release("mathvision", src, ["images/4.jpg", "images/6.jpg", "images/27.jpg"])


def fixture_wemath(src: Path) -> None:
    _png(src / "3steps" / "image" / "165-3.png")
    (src / "testmini.json").write_text(json.dumps([
        {"ID": "3steps_165", "split": "testmini", "knowledge concept": "Area of Circles",
         "question": "What is the area of the flower bed (  ) m²?", "option": "A. 200.96;B. 3215.36;C. 6280;D. 32",
         "answer": "B", "image_path": "3steps/image/165-3.png", "key": "3steps_3", "question number": 1575}]))


DYNAMATH_TRIALS = RELEASES / "dynamath" / "samples and result" / "10trials"


def fixture_dynamath(src: Path) -> None:
    _release("dynamath", src, [f"samples and result/10trials/trial{k}/image/image{item}.png"
                               for k in (3, 7) for item in (1, 5)])


def fixture_tirbench(src: Path) -> None:
    _png(src / "images" / "maze_1.png")
    _png(src / "images" / "diff_a.png")
    (src / "TIR-Bench.json").write_text(json.dumps([
        {"id": 0, "task": "maze", "prompt": "How many turns does the path take?", "answer": "3",
         "image_1": "images/maze_1.png", "image_2": None},
        {"id": 1, "task": "spot_difference", "prompt": "Which cells differ?", "answer": "1,4",
         "image_1": "images/diff_a.png", "image_2": "images/diff_a.png"}]))


def fixture_vsibench(src: Path) -> None:
    (src / "scannet").mkdir(parents=True)
    (src / "scannet" / "scene0011_00.mp4").write_bytes(b"\x00" * 64)   # converters check presence; eval reads it
    _write_jsonl(src / "test.jsonl", [
        {"id": 7, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_counting",
         "question": "How many chairs are in this room?", "options": None, "ground_truth": "4"},
        {"id": 8, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_rel_direction_easy",
         "question": "Is the sofa left or right of the tv?", "options": ["A. left", "B. right"], "ground_truth": "A"}])


# benchmark -> (fixture, {task id: (answer, data_source, ability)}, choices of the first task)
CONVERTER_CASES = {
    "vstar": (fixture_vstar, {"12": ("A", "vstar", "direct_attributes")}, ["rubber", "cotton", "kevlar", "leather"]),
    "hrbench": (fixture_hrbench, {"hrbench-4k-0": ("C", "hrbench-4k", "single"), "hrbench-4k-1": ("A", "hrbench-4k", "cross")},
                ["open", "shut", "exit", "stop"]),
    "mathverse": (fixture_mathverse, {"mathverse-3421": ("14", "mathverse", "Text Dominant"),
                                      "mathverse-3425": ("14", "mathverse", "Vision Only")}, None),
    "mathvision": (fixture_mathvision, {"mathvision-4": ("6", "mathvision", "counting"),
                                        "mathvision-6": ("D", "mathvision", "logic"),
                                        "mathvision-27": ("A", "mathvision", "topology")}, None),
    "wemath": (fixture_wemath, {"wemath-1575": ("B", "wemath", "3steps_3")}, None),
    "dynamath": (fixture_dynamath, {f"dynamath-v{k}-{item}": (answer, "dynamath", subject) for k in (3, 7)
                                    for item, answer, subject in (("1", "3.1416", "analytic geometry"),
                                                                  ("5", "A", "statistics"))}, None),
    "tirbench": (fixture_tirbench, {"tirbench-0": ("3", "tirbench", "maze")}, None),
    "vsibench": (fixture_vsibench, {"vsi-7": ("4", "vsi_numerical", "object_counting"),
                                    "vsi-8": ("A", "vsi", "object_rel_direction_easy")}, None),
}


@pytest.mark.parametrize("benchmark", sorted(CONVERTER_CASES))
def test_prepare_converts_the_release_format(benchmark, tmp_path):
    make_fixture, expected, first_choices = CONVERTER_CASES[benchmark]
    make_fixture(tmp_path / "src")
    path, skipped = benchmarks.prepare(benchmark, tmp_path / "src", tmp_path / "out")
    tasks, bad = data.load_tasks(path)   # the official validation format, media present
    assert bad == [] and {t.id: (t.answer, t.data_source, t.ability) for t in tasks} == expected
    assert first_choices is None or tasks[0].choices == first_choices
    for task in tasks:
        assert task.question.strip()
        media = Path(task.image_path or task.video_path)
        assert media.is_file()
        if task.image_path:
            Image.open(media).verify()
    assert skipped == (["tirbench-1: two images"] if benchmark == "tirbench" else [])


def test_converted_questions_carry_their_options(tmp_path):
    fixture_vstar(tmp_path / "vstar")
    fixture_vsibench(tmp_path / "vsi")
    vstar, _ = benchmarks.convert_vstar(tmp_path / "vstar", tmp_path / "media")
    released = json.loads((RELEASES / "vstar" / "test_questions.jsonl").read_text())
    assert vstar[0].question == released["text"]           # the official question line, instruction included
    assert vstar[0].question.endswith("\n(D) leather\nAnswer with the option's letter from the given choices directly.")
    vsi, _ = benchmarks.convert_vsibench(tmp_path / "vsi", tmp_path / "media")
    assert vsi[1].question.endswith("Options:\nA. left\nB. right") and vsi[1].choices == ["left", "right"]
    assert "Options" not in vsi[0].question
    fixture_hrbench(tmp_path / "hr")
    hr, _ = benchmarks.convert_hrbench(tmp_path / "hr", tmp_path / "media")
    assert hr[0].image_path == hr[1].image_path          # row 1's image field points at row 0's image
    assert hr[0].question.endswith("A. open\nB. shut\nC. exit\nD. stop")


def test_vstar_per_image_annotation_layout(tmp_path):
    """The layout the official evaluation scripts read: <category>/<name>.jpg beside <name>.json, the correct option
    first. Used when the release has no test_questions.jsonl; SRC may also be the category folder itself."""
    _release("vstar/relative_position", tmp_path / "bench" / "relative_position", ["sa_79958.jpg"])
    annotation = json.loads((RELEASES / "vstar" / "relative_position" / "sa_79958.json").read_text())
    for src in (tmp_path / "bench", tmp_path / "bench" / "relative_position"):
        path, skipped = benchmarks.prepare("vstar", src, tmp_path / "out")
        [task] = data.load_tasks(path)[0]
        assert skipped == [] and (task.id, task.answer, task.ability) == ("relative_position/sa_79958.jpg", "A",
                                                                         "relative_position")
        assert task.choices == annotation["options"] and task.answer_text == annotation["options"][0]
        assert task.question == (f"{annotation['question']}\n(A) {annotation['options'][0]}\n"
                                 f"(B) {annotation['options'][1]}\n{benchmarks.VSTAR_INSTRUCTION}")
        assert Path(task.image_path) == (tmp_path / "bench" / "relative_position" / "sa_79958.jpg").resolve()
    (tmp_path / "bench" / "relative_position" / "sa_79958.json").unlink()
    with pytest.raises(data.DataError, match=r"sa_79958.jpg: row 0: field '<annotation>': no annotation sa_79958.json"):
        benchmarks.prepare("vstar", tmp_path / "bench", tmp_path / "out")


def test_mathvision_lists_options_only_when_they_are_not_the_bare_letters(tmp_path):
    fixture_mathvision(tmp_path / "src")
    path, _ = benchmarks.prepare("mathvision", tmp_path / "src", tmp_path / "out")
    tasks = {t.id: t for t in data.load_tasks(path)[0]}
    released = {row["id"]: row for row in benchmarks.read_rows(RELEASES / "mathvision" / "data" / "testmini.jsonl")}
    # options A..E are drawn in the image: the question is left as released (the official prompt adds no block)
    assert tasks["mathvision-6"].question == released["6"]["question"]
    assert tasks["mathvision-6"].choices == list("ABCDE")
    assert tasks["mathvision-4"].question == released["4"]["question"] and tasks["mathvision-4"].choices is None
    written = "\n".join(f"({letter}) {option}" for letter, option in zip("ABCDE", released["27"]["options"]))
    assert tasks["mathvision-27"].question == released["27"]["question"] + "\n" + written


def test_mathverse_text_only_items_are_skipped_and_counted(tmp_path):
    path, skipped = benchmarks.prepare("mathverse", RELEASES / "mathverse" / "text_only" / "testmini_text_only.json",
                                       tmp_path / "out")
    assert data.load_tasks(path)[0] == []
    assert skipped == ["mathverse-1: text-only, no image", "mathverse-2: text-only, no image"]
    # a vision version without its image is a broken row, not a text-only item
    rows = json.loads((RELEASES / "mathverse" / "testmini.json").read_text())
    (tmp_path / "testmini.json").write_text(json.dumps([{**rows[0], "image": ""}]))
    with pytest.raises(data.DataError, match=r"testmini.json: row 0: field 'image': missing or empty"):
        benchmarks.prepare("mathverse", tmp_path / "testmini.json", tmp_path / "out")


def _colour(image_path: str) -> tuple:
    with Image.open(image_path) as image:
        return image.convert("RGB").getpixel((0, 0))


def test_dynamath_github_trials_are_variants(tmp_path):
    fixture_dynamath(tmp_path / "src")
    path, _ = benchmarks.prepare("dynamath", tmp_path / "src", tmp_path / "out")
    tasks = {t.id: t for t in data.load_tasks(path)[0]}
    released = json.loads((DYNAMATH_TRIALS / "trial7" / "dataset.json").read_text())["5"]
    task = tasks["dynamath-v7-5"]
    assert (task.question, task.answer, task.extra) == (
        released["question"], released["answer"],
        {"answer_type": released["answer_type"], "variant": 7, "knowledge_level": released["level"]})
    assert Path(task.image_path) == (tmp_path / "src" / "samples and result" / "10trials" / "trial7" / "image" /
                                     "image5.png").resolve()
    # one file whose folder and name do not say the variant cannot be placed
    (tmp_path / "seed").mkdir()
    shutil.copy(DYNAMATH_TRIALS / "trial3" / "dataset.json", tmp_path / "seed" / "dataset.json")
    with pytest.raises(ValueError, match="cannot tell which DynaMath variant"):
        benchmarks.prepare("dynamath", tmp_path / "seed", tmp_path / "out_seed")


@pytest.mark.parametrize("hub_file", ["data/sample{k}-00000-of-0000{k}.parquet",   # the dataset repository's files
                                      "sample_variant{k}/0000.parquet"])           # the hub's parquet export
def test_dynamath_hub_files_are_variants_with_their_own_ids_and_images(tmp_path, hub_file):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    colours = {3: (200, 0, 0), 7: (0, 0, 200)}
    for k, colour in colours.items():
        rows = []
        for item, row in json.loads((DYNAMATH_TRIALS / f"trial{k}" / "dataset.json").read_text()).items():
            buf = io.BytesIO()
            Image.new("RGB", (64, 48), colour).save(buf, format="PNG")
            rows.append({"id": item, "question": row["question"], "image": row["image"],
                         "decoded_image": {"bytes": buf.getvalue(), "path": None}, "ground_truth": row["answer"],
                         "answer_type": row["answer_type"], "subject": row["subject"], "knowledge_level": row["level"]})
        target = tmp_path / "hub" / hub_file.format(k=k)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), target)
    path, _ = benchmarks.prepare("dynamath", tmp_path / "hub", tmp_path / "out")
    tasks = data.load_tasks(path)[0]
    assert sorted(t.id for t in tasks) == ["dynamath-v3-1", "dynamath-v3-5", "dynamath-v7-1", "dynamath-v7-5"]
    assert len({t.image_path for t in tasks}) == 4                     # no variant's image overwrote another's
    assert all(_colour(t.image_path) == colours[t.extra["variant"]] for t in tasks)
    assert {t.id: t.answer for t in tasks}["dynamath-v3-5"] == "A"


def test_converter_errors_name_the_file_row_and_field(tmp_path):
    fixture_wemath(tmp_path / "src")
    (tmp_path / "src" / "3steps" / "image" / "165-3.png").unlink()
    with pytest.raises(data.DataError, match=r"testmini.json: row 0: field 'image_path'"):
        benchmarks.prepare("wemath", tmp_path / "src", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no file matching"):
        benchmarks.prepare("vsibench", tmp_path / "src" / "3steps", tmp_path / "out")
    (tmp_path / "hr_bench.tsv").write_text("index\tquestion\n")
    with pytest.raises(ValueError, match="'4k' or '8k'"):
        benchmarks.prepare("hrbench", tmp_path / "hr_bench.tsv", tmp_path / "out")


def test_parquet_needs_pyarrow_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        benchmarks.read_rows(tmp_path / "test.parquet")


def test_parquet_releases_convert(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, format="PNG")
    # HR-Bench on the hub: base64 strings; MATH-Vision: a decoded_image struct {bytes, path}
    (tmp_path / "hr").mkdir()
    pq.write_table(pa.Table.from_pylist([{"index": 5, "question": "Q?", "answer": "B", "category": "single", "A": "x",
                                          "B": "y", "C": "z", "D": "w", "image": _b64_jpeg((9, 9, 9))}]),
                   tmp_path / "hr" / "hr_bench_8k.parquet")
    path, _ = benchmarks.prepare("hrbench", tmp_path / "hr", tmp_path / "out_hr")
    assert [(t.id, t.data_source) for t in data.load_tasks(path)[0]] == [("hrbench-8k-5", "hrbench-8k")]
    (tmp_path / "mv").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "3", "question": "Q?", "options": ["1", "2"], "image": "images/3.jpg",
                                          "decoded_image": {"bytes": buf.getvalue(), "path": "3.png"}, "answer": "B",
                                          "level": 1, "subject": "algebra"}]), tmp_path / "mv" / "testmini.parquet")
    path, _ = benchmarks.prepare("mathvision", tmp_path / "mv", tmp_path / "out_mv")
    task = data.load_tasks(path)[0][0]
    assert task.id == "mathvision-3" and Image.open(task.image_path).size == (64, 48)

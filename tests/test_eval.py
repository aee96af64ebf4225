"""eval.py: the scripted expert scores 100% end to end, resume, per-sample errors, the hf engine, compare, the
command line, benchmark protocol settings and the benchmark converters (on fixtures in each release format)."""
import base64
import csv
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
from PIL import Image

import data
import eval as evaluation
import models
import rollout
from eval import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ROOT / "tests" / "fixtures"   # real release rows; tests/fixtures/README.md names each one's source
REQUIRED_SUMMARY_KEYS = {"accuracy", "correct_frac", "tool_calls_mean", "visual_tokens_mean", "turns_mean",
                         "wellformed_frac", "wall_s_per_sample", "end_reasons", "n_samples", "n_errors"}
REPORT_FILES = ("results.json", "results.md", "samples.jsonl", "accuracy_vs_visual_tokens.png", "tool_calls_hist.png",
                "trajectories.html")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return models.VLProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def image_tasks(image_tasks_dir):
    return data.load_tasks(image_tasks_dir / "tasks.json")[0]


class CountingExpert:
    """The scripted expert, remembering which (task, sample) trajectories it was asked to start."""

    def __init__(self, processor):
        self.expert = rollout.make_engine("scripted", processor=processor)
        self.started: list[tuple[str, int]] = []

    def generate(self, requests):
        self.started += [(r.trajectory.task.id, r.trajectory.sample_index) for r in requests if not r.trajectory.turns]
        return self.expert.generate(requests)


@pytest.fixture(scope="module")
def expert_run(tmp_path_factory, image_tasks, processor):
    out = tmp_path_factory.mktemp("expert_run")
    cfg = EvalConfig(engine="scripted", samples=2, batch_size=5, html_samples=4)
    results = evaluation.evaluate(image_tasks, rollout.make_engine("scripted", processor=processor), processor, cfg, out)
    return out, results


def test_scripted_expert_scores_100_percent_through_evaluate(expert_run, image_tasks):
    out, results = expert_run
    s = results["summary"]
    assert REQUIRED_SUMMARY_KEYS <= s.keys()
    assert s["accuracy"] == 1.0 and s["correct_frac"] == 1.0 and s["n_errors"] == 0
    assert s["n_samples"] == 2 * len(image_tasks) and len(results["samples"]) == 2 * len(image_tasks)
    # the synthetic set has tool-requiring and tool-free tasks: both are reported, and the expert solves both with code
    assert s["acc_tool"] == 1.0 and s["acc_no_tool"] == 1.0 and s["tool_calls_mean"] >= 1
    assert s["visual_tokens_mean"] > 0 and s["end_reasons"] == {"DONE": 2 * len(image_tasks)}
    assert results["per_source"]["synthetic_image"]["accuracy"] == 1.0
    assert {"synthetic_image/multiple_choice", "synthetic_image/numeric"} <= results["per_ability"].keys()
    assert results["avg_at_k"]["k"] == 2 and results["avg_at_k"]["avg"] == 1.0
    assert results["avg_at_k"]["per_run_accuracy"] == [1.0, 1.0]
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["summary"]["accuracy"] == 1.0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * len(image_tasks)
    assert "| accuracy | 1.000 |" in (out / "results.md").read_text()
    assert (out / "trajectories.html").read_text().count("<div class='traj'>") == 4   # html_samples


def test_cli_scripted_expert_writes_results(tmp_path, tiny_dir, image_tasks_dir):
    """The command line end to end; a row that is not a task (its image is missing) is dropped at load and reported
    in results.json and results.md, not silently lost."""
    rows = json.loads((image_tasks_dir / "tasks.json").read_text())
    rows = [{**row, "image_path": str(image_tasks_dir / row["image_path"])} for row in rows]
    rows.append({**rows[0], "id": "lost", "image_path": str(tmp_path / "missing.png")})
    (tmp_path / "tasks.json").write_text(json.dumps(rows))
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "eval.py", "--engine", "scripted", "--model", str(tiny_dir),
                           "--data", str(tmp_path / "tasks.json"), "--output-dir", str(out), "--max-turns", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert REQUIRED_SUMMARY_KEYS <= results["summary"].keys()
    assert results["summary"]["accuracy"] == 1.0 and results["per_source"]["synthetic_image"]["accuracy"] == 1.0
    assert results["config"]["max_turns"] == 3 and len(results["samples"]) == 12
    assert "accuracy 1.000" in proc.stdout
    assert [row["row"] for row in results["dropped_rows"]] == [12]
    assert "Rows dropped at load: 1" in (out / "results.md").read_text()


def test_ablation_report_has_help():
    proc = subprocess.run([sys.executable, "eval.py", "ablation-report", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage: eval.py ablation-report" in proc.stdout


def test_resume_runs_only_the_missing_samples(tmp_path, image_tasks, processor):
    cfg = EvalConfig(engine="scripted", batch_size=4)
    first = CountingExpert(processor)
    evaluation.evaluate(image_tasks, first, processor, cfg, tmp_path)
    assert sorted(first.started) == sorted((t.id, 0) for t in image_tasks)
    # an interrupted run: no results yet, half the samples recorded, and a torn line from the moment it was killed
    lines = (tmp_path / "samples.jsonl").read_text().splitlines(keepends=True)
    kept = lines[:len(lines) // 2]
    (tmp_path / "samples.jsonl").write_text("".join(kept) + lines[len(kept)][:40])
    for name in ("results.json", "results.md"):
        (tmp_path / name).unlink()
    second = CountingExpert(processor)
    results = evaluation.evaluate(image_tasks, second, processor, cfg, tmp_path)
    kept_ids = {json.loads(line)["task_id"] for line in kept}
    assert sorted(second.started) == sorted((t.id, 0) for t in image_tasks if t.id not in kept_ids)
    assert results["summary"]["accuracy"] == 1.0 and results["summary"]["n_samples"] == len(image_tasks)
    # the recorded samples are reused as they were (same wall time), not recomputed
    by_id = {r["task_id"]: r for r in results["samples"]}
    for line in kept:
        assert by_id[json.loads(line)["task_id"]]["wall_s"] == json.loads(line)["wall_s"]
    # a rerun with nothing left starts no trajectory; one with other settings is refused until --fresh
    third = CountingExpert(processor)
    evaluation.evaluate(image_tasks, third, processor, cfg, tmp_path)
    assert third.started == []
    with pytest.raises(ValueError, match="max_turns"):
        evaluation.evaluate(image_tasks, third, processor, EvalConfig(engine="scripted", max_turns=4), tmp_path)
    evaluation.evaluate(image_tasks[:2], third, processor, EvalConfig(engine="scripted", max_turns=4, fresh=True), tmp_path)
    assert len(third.started) == 2


def test_bad_samples_are_recorded_and_the_rest_completes(tmp_path, image_tasks_dir, processor):
    shutil.copytree(image_tasks_dir, tmp_path / "set")
    tasks, _ = data.load_tasks(tmp_path / "set" / "tasks.json")
    Path(tasks[1].image_path).rename(tmp_path / "moved.png")   # deleted after loading: the rollout cannot start
    tasks[3].data_source = "no_such_benchmark"                    # no verifier: recorded before any rollout
    choice_task = next(t for t in tasks[4:] if t.ability == "multiple_choice")
    choice_task.answer = "Z"                                      # the verifier rejects the reference answer
    cfg = EvalConfig(engine="scripted", batch_size=4)
    engine = CountingExpert(processor)
    results = evaluation.evaluate(tasks, engine, processor, cfg, tmp_path / "run")
    by_id = {r["task_id"]: r for r in results["samples"]}
    assert by_id[tasks[1].id]["error_stage"] == "rollout" and "FileNotFoundError" in by_id[tasks[1].id]["error"]
    assert by_id[tasks[3].id]["error_stage"] == "route" and "no_such_benchmark" in by_id[tasks[3].id]["error"]
    assert by_id[choice_task.id]["error_stage"] == "score" and "not among the options" in by_id[choice_task.id]["error"]
    assert by_id[choice_task.id]["num_tool_calls"] == 1   # the rollout's own record survives a scoring error
    assert (tasks[3].id, 0) not in engine.started
    s = results["summary"]
    assert s["n_errors"] == 3 and s["n_scored"] == len(tasks) - 3 and s["accuracy"] == 1.0
    assert all(r["error"] is None for r in results["samples"] if r["task_id"] not in {tasks[1].id, tasks[3].id,
                                                                                       choice_task.id})
    # once the image is back, --retry-errors reruns exactly the failed samples
    (tmp_path / "moved.png").rename(tasks[1].image_path)
    retry = CountingExpert(processor)
    results = evaluation.evaluate(tasks, retry, processor, EvalConfig(engine="scripted", batch_size=4,
                                                                       retry_errors=True), tmp_path / "run")
    assert sorted(retry.started) == sorted([(tasks[1].id, 0), (choice_task.id, 0)])
    assert results["summary"]["n_errors"] == 2


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tiny_policy, image_tasks):
    model, processor = tiny_policy
    out = tmp_path_factory.mktemp("hf_run")
    cfg = EvalConfig(engine="hf", max_turns=2, max_turn_tokens=16, max_response_tokens=256, samples=1)
    engine = rollout.make_engine("hf", model, processor, temperature=1.0)
    return out, evaluation.evaluate(image_tasks[:2], engine, processor, cfg, out)


def test_hf_engine_with_the_tiny_model_gives_valid_records(hf_run):
    out, results = hf_run
    assert results["summary"]["n_samples"] == 2 and results["summary"]["n_errors"] == 0
    valid_ends = {"DONE", "ERROR_IN_ACTION", "OVER_LENGTH", "EXCEED_MAX_TURNS", "EXCEED_MAX_IMAGE_NUM"}
    for record in results["samples"]:
        assert 0.0 <= record["acc"] <= 1.0 and record["end_reason"] in valid_ends
        assert 1 <= record["turns"] <= 2 and 0 < record["response_tokens"] <= 256
        assert record["visual_tokens"] > 0 and record["prompt_tokens"] > record["visual_tokens"]
    assert (out / "results.md").is_file()


def test_compare_puts_runs_side_by_side(expert_run, hf_run, capsys):
    table = evaluation.compare([expert_run[0], hf_run[0]])
    header = table.splitlines()[0]
    assert expert_run[0].name in header and hf_run[0].name in header
    accuracy_row = next(line for line in table.splitlines() if line.startswith("| accuracy |"))
    assert accuracy_row.split("|")[2].strip() == "1.000"
    assert "| accuracy: synthetic_image |" in table
    evaluation.main(["--compare", str(expert_run[0]), str(hf_run[0])])
    assert capsys.readouterr().out.strip() == table
    with pytest.raises(FileNotFoundError, match="results.json"):
        evaluation.compare([expert_run[0].parent / "nowhere"])


def test_benchmark_defaults_apply_unless_a_flag_overrides():
    cfg, _ = evaluation.parse_eval_args(["--benchmark-defaults", "vstar", "--data", "x.json"])
    assert (cfg.temperature, cfg.samples, cfg.top_k, cfg.max_pixels) == (0.01, 32, 0, 2_000_000)
    assert (cfg.max_turns, cfg.strict) == (30, True)
    cfg, _ = evaluation.parse_eval_args(["--benchmark-defaults", "vstar", "--samples", "4", "--no-strict"])
    assert (cfg.temperature, cfg.samples, cfg.strict) == (0.01, 4, False)
    cfg, _ = evaluation.parse_eval_args(["--benchmark-defaults", "mathverse"])
    assert (cfg.temperature, cfg.top_k, cfg.samples) == (0.5, 20, 1)
    assert EvalConfig.for_benchmark("vsibench").temperature == 0.01 and EvalConfig.for_benchmark("vsibench").max_pixels == 0
    assert set(evaluation.BENCHMARK_SAMPLING) == set(evaluation.BENCHMARKS)   # every convertible benchmark has a row
    with pytest.raises(SystemExit):
        evaluation.parse_eval_args(["--benchmark-defaults", "imagenet"])
    with pytest.raises(ValueError, match="samples"):
        EvalConfig(samples=0)
    with pytest.raises(ValueError, match="engine"):
        EvalConfig(engine="openai")


def test_video_tasks_through_evaluate(tmp_path, processor):
    tasks = data.generate_video_tasks(3, seed=0, out_dir=tmp_path / "videos")
    results = evaluation.evaluate(tasks, rollout.make_engine("scripted", processor=processor), processor,
                                  EvalConfig(engine="scripted"), tmp_path / "run")
    s = results["summary"]
    assert s["n_errors"] == 0, s["errors"]
    assert s["accuracy"] == 1.0 and results["per_source"]["synthetic_video"]["accuracy"] == 1.0
    # on-demand context: the only visual tokens are the figures the code showed
    for record in results["samples"]:
        assert (record["visual_tokens"] > 0) == (record["returned_images"] > 0)


def test_judged_benchmark_source_goes_through_the_judge(tmp_path, processor, exact_match_judge):
    fixture_vstar(tmp_path / "src")
    path, _ = evaluation.prepare("vstar", tmp_path / "src", tmp_path / "data")
    task = data.load_tasks(path)[0][0]
    wrong = dataclasses.replace(task, id="vstar-wrong", answer="C")
    for t in (task, wrong):
        t.solution_code = "print('A')"   # the expert answers A, the first task's reference; the second's is C
    cfg = EvalConfig(engine="scripted")
    blocked = evaluation.evaluate([task], CountingExpert(processor), processor, cfg, tmp_path / "no_judge")
    assert blocked["summary"]["n_errors"] == 1 and "no judge is configured" in blocked["samples"][0]["error"]
    cfg = EvalConfig(engine="scripted", judge_url=exact_match_judge)
    results = evaluation.evaluate([task, wrong], CountingExpert(processor), processor, cfg, tmp_path / "judged")
    by_id = {r["task_id"]: r for r in results["samples"]}
    assert by_id[task.id]["acc"] == 1.0 and by_id[task.id]["verifier"] == "judge"
    assert by_id[wrong.id]["acc"] == 0.0 and results["per_source"]["vstar"]["accuracy"] == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark converters, on real release rows (tests/fixtures, stand-in images) or, where a release could not be
# read, on rows written in its documented schema
# ---------------------------------------------------------------------------------------------------------------------

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
    path, skipped = evaluation.prepare(benchmark, tmp_path / "src", tmp_path / "out")
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
    vstar, _ = evaluation.convert_vstar(tmp_path / "vstar", tmp_path / "media")
    released = json.loads((RELEASES / "vstar" / "test_questions.jsonl").read_text())
    assert vstar[0].question == released["text"]           # the official question line, instruction included
    assert vstar[0].question.endswith("\n(D) leather\nAnswer with the option's letter from the given choices directly.")
    vsi, _ = evaluation.convert_vsibench(tmp_path / "vsi", tmp_path / "media")
    assert vsi[1].question.endswith("Options:\nA. left\nB. right") and vsi[1].choices == ["left", "right"]
    assert "Options" not in vsi[0].question
    fixture_hrbench(tmp_path / "hr")
    hr, _ = evaluation.convert_hrbench(tmp_path / "hr", tmp_path / "media")
    assert hr[0].image_path == hr[1].image_path          # row 1's image field points at row 0's image
    assert hr[0].question.endswith("A. open\nB. shut\nC. exit\nD. stop")


def test_vstar_per_image_annotation_layout(tmp_path):
    """The layout the official evaluation scripts read: <category>/<name>.jpg beside <name>.json, the correct option
    first. Used when the release has no test_questions.jsonl; SRC may also be the category folder itself."""
    _release("vstar/relative_position", tmp_path / "bench" / "relative_position", ["sa_79958.jpg"])
    annotation = json.loads((RELEASES / "vstar" / "relative_position" / "sa_79958.json").read_text())
    for src in (tmp_path / "bench", tmp_path / "bench" / "relative_position"):
        path, skipped = evaluation.prepare("vstar", src, tmp_path / "out")
        [task] = data.load_tasks(path)[0]
        assert skipped == [] and (task.id, task.answer, task.ability) == ("relative_position/sa_79958.jpg", "A",
                                                                         "relative_position")
        assert task.choices == annotation["options"] and task.answer_text == annotation["options"][0]
        assert task.question == (f"{annotation['question']}\n(A) {annotation['options'][0]}\n"
                                 f"(B) {annotation['options'][1]}\n{evaluation.VSTAR_INSTRUCTION}")
        assert Path(task.image_path) == (tmp_path / "bench" / "relative_position" / "sa_79958.jpg").resolve()
    (tmp_path / "bench" / "relative_position" / "sa_79958.json").unlink()
    with pytest.raises(data.DataError, match=r"sa_79958.jpg: row 0: field '<annotation>': no annotation sa_79958.json"):
        evaluation.prepare("vstar", tmp_path / "bench", tmp_path / "out")


def test_mathvision_lists_options_only_when_they_are_not_the_bare_letters(tmp_path):
    fixture_mathvision(tmp_path / "src")
    path, _ = evaluation.prepare("mathvision", tmp_path / "src", tmp_path / "out")
    tasks = {t.id: t for t in data.load_tasks(path)[0]}
    released = {row["id"]: row for row in evaluation.read_rows(RELEASES / "mathvision" / "data" / "testmini.jsonl")}
    # options A..E are drawn in the image: the question is left as released (the official prompt adds no block)
    assert tasks["mathvision-6"].question == released["6"]["question"]
    assert tasks["mathvision-6"].choices == list("ABCDE")
    assert tasks["mathvision-4"].question == released["4"]["question"] and tasks["mathvision-4"].choices is None
    written = "\n".join(f"({letter}) {option}" for letter, option in zip("ABCDE", released["27"]["options"]))
    assert tasks["mathvision-27"].question == released["27"]["question"] + "\n" + written


def test_mathverse_text_only_items_are_skipped_and_counted(tmp_path):
    path, skipped = evaluation.prepare("mathverse", RELEASES / "mathverse" / "text_only" / "testmini_text_only.json",
                                       tmp_path / "out")
    assert data.load_tasks(path)[0] == []
    assert skipped == ["mathverse-1: text-only, no image", "mathverse-2: text-only, no image"]
    # a vision version without its image is a broken row, not a text-only item
    rows = json.loads((RELEASES / "mathverse" / "testmini.json").read_text())
    (tmp_path / "testmini.json").write_text(json.dumps([{**rows[0], "image": ""}]))
    with pytest.raises(data.DataError, match=r"testmini.json: row 0: field 'image': missing or empty"):
        evaluation.prepare("mathverse", tmp_path / "testmini.json", tmp_path / "out")


def _colour(image_path: str) -> tuple:
    with Image.open(image_path) as image:
        return image.convert("RGB").getpixel((0, 0))


def test_dynamath_github_trials_are_variants(tmp_path):
    fixture_dynamath(tmp_path / "src")
    path, _ = evaluation.prepare("dynamath", tmp_path / "src", tmp_path / "out")
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
        evaluation.prepare("dynamath", tmp_path / "seed", tmp_path / "out_seed")


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
    path, _ = evaluation.prepare("dynamath", tmp_path / "hub", tmp_path / "out")
    tasks = data.load_tasks(path)[0]
    assert sorted(t.id for t in tasks) == ["dynamath-v3-1", "dynamath-v3-5", "dynamath-v7-1", "dynamath-v7-5"]
    assert len({t.image_path for t in tasks}) == 4                     # no variant's image overwrote another's
    assert all(_colour(t.image_path) == colours[t.extra["variant"]] for t in tasks)
    assert {t.id: t.answer for t in tasks}["dynamath-v3-5"] == "A"


def test_converter_errors_name_the_file_row_and_field(tmp_path):
    fixture_wemath(tmp_path / "src")
    (tmp_path / "src" / "3steps" / "image" / "165-3.png").unlink()
    with pytest.raises(data.DataError, match=r"testmini.json: row 0: field 'image_path'"):
        evaluation.prepare("wemath", tmp_path / "src", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no file matching"):
        evaluation.prepare("vsibench", tmp_path / "src" / "3steps", tmp_path / "out")
    (tmp_path / "hr_bench.tsv").write_text("index\tquestion\n")
    with pytest.raises(ValueError, match="'4k' or '8k'"):
        evaluation.prepare("hrbench", tmp_path / "hr_bench.tsv", tmp_path / "out")


def test_parquet_needs_pyarrow_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        evaluation.read_rows(tmp_path / "test.parquet")


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
    path, _ = evaluation.prepare("hrbench", tmp_path / "hr", tmp_path / "out_hr")
    assert [(t.id, t.data_source) for t in data.load_tasks(path)[0]] == [("hrbench-8k-5", "hrbench-8k")]
    (tmp_path / "mv").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "3", "question": "Q?", "options": ["1", "2"], "image": "images/3.jpg",
                                          "decoded_image": {"bytes": buf.getvalue(), "path": "3.png"}, "answer": "B",
                                          "level": 1, "subject": "algebra"}]), tmp_path / "mv" / "testmini.parquet")
    path, _ = evaluation.prepare("mathvision", tmp_path / "mv", tmp_path / "out_mv")
    task = data.load_tasks(path)[0][0]
    assert task.id == "mathvision-3" and Image.open(task.image_path).size == (64, 48)

"""eval.py: the scripted expert scores 100% end to end, resume, per-sample errors, the hf engine, the command line
(with `--compare` and `ablation-report`, which run reports.py), benchmark protocol settings, and a converted V* task
scored by the judge. The converters' own tests are in test_benchmarks.py."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks
import data
import eval as evaluation
import models
import reports
import rollout
from eval import EvalConfig
from test_benchmarks import fixture_vstar

ROOT = Path(__file__).resolve().parents[1]
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


def test_paired_differences_take_each_seed_against_its_baselines_twin():
    summary = {"full": {"1": {"tool/calls_mean": 1.0, "acc/mean": 0.5, "heldout_accuracy": 0.6},
                        "2": {"tool/calls_mean": 2.0, "acc/mean": 0.4, "heldout_accuracy": None}},
               "tool_coef_0": {"1": {"tool/calls_mean": 0.75, "acc/mean": 0.5, "heldout_accuracy": 0.7},
                               "2": {"tool/calls_mean": 1.5, "acc/mean": 0.5, "heldout_accuracy": 0.5},
                               "3": {"tool/calls_mean": 9.0, "acc/mean": 0.1, "heldout_accuracy": 0.1}},
               "require_image": {"1": {"tool/calls_mean": 3.0, "acc/mean": 0.5, "heldout_accuracy": 0.6}},
               "require_image_tool_coef_0": {"1": {"tool/calls_mean": 2.5, "acc/mean": 0.25, "heldout_accuracy": 0.6}}}
    paired = reports.paired_differences(summary)
    assert list(paired) == ["tool_coef_0", "require_image", "require_image_tool_coef_0"]   # full is the reference
    base, seeds, diffs = paired["tool_coef_0"]
    assert base == "full" and seeds == ["1", "2"]               # seed 3 has no twin
    assert diffs["tool/calls_mean"] == pytest.approx([-0.25, -0.5]) and diffs["acc/mean"] == pytest.approx([0.0, 0.1])
    assert diffs["heldout_accuracy"] == pytest.approx([0.1])   # seed 2's full run was not evaluated
    # an arm whose name extends another arm's changes one thing of that arm: it is measured against it, not full
    base, seeds, diffs = paired["require_image_tool_coef_0"]
    assert base == "require_image" and diffs["tool/calls_mean"] == pytest.approx([-0.5])
    assert paired["require_image"][0] == "full"
    _, _, only_calls = reports.paired_differences(summary, ["tool/calls_mean"])["tool_coef_0"]
    assert list(only_calls) == ["tool/calls_mean"]


def test_sign_flip_p_counts_the_sign_patterns_as_extreme_as_the_seeds():
    # all n differences one way: only that pattern and its mirror are as extreme -> 2 / 2^n
    assert reports.sign_flip_p([-0.1, -0.2, -0.05]) == pytest.approx(2 / 8)
    assert reports.sign_flip_p([-0.04, -0.22, -0.10, -0.18]) == pytest.approx(2 / 16)
    # one seed the other way (|sum| 0.3 of 0.5): as extreme are the observed signs, each of the three 0.1s flipped
    # instead, and the mirrors of these four -> 8 / 16
    assert reports.sign_flip_p([0.1, -0.2, -0.1, -0.1]) == pytest.approx(8 / 16)
    # differences that cancel are no evidence at all
    assert reports.sign_flip_p([0.1, -0.1]) == 1.0
    # past the exact count, a sample of the patterns: 17 seeds all one way is far below 0.001 either way
    assert reports.sign_flip_p([-0.1] * 17) < 1e-3 and reports.sign_flip_p([0.1, -0.1] * 9) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        reports.sign_flip_p([])


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
    table = reports.compare([expert_run[0], hf_run[0]])
    header = table.splitlines()[0]
    assert expert_run[0].name in header and hf_run[0].name in header
    accuracy_row = next(line for line in table.splitlines() if line.startswith("| accuracy |"))
    assert accuracy_row.split("|")[2].strip() == "1.000"
    assert "| accuracy: synthetic_image |" in table
    evaluation.main(["--compare", str(expert_run[0]), str(hf_run[0])])
    assert capsys.readouterr().out.strip() == table
    with pytest.raises(FileNotFoundError, match="results.json"):
        reports.compare([expert_run[0].parent / "nowhere"])


def test_benchmark_defaults_apply_unless_a_flag_overrides():
    cfg, _ = evaluation.parse_eval_args(["--benchmark-defaults", "vstar", "--data", "x.json"])
    assert (cfg.temperature, cfg.samples, cfg.top_k, cfg.max_pixels) == (0.01, 32, 0, 2_000_000)
    assert (cfg.max_turns, cfg.strict) == (30, True)
    cfg, _ = evaluation.parse_eval_args(["--benchmark-defaults", "vstar", "--samples", "4", "--no-strict"])
    assert (cfg.temperature, cfg.samples, cfg.strict) == (0.01, 4, False)
    cfg, _ = evaluation.parse_eval_args(["--benchmark-defaults", "mathverse"])
    assert (cfg.temperature, cfg.top_k, cfg.samples) == (0.5, 20, 1)
    assert EvalConfig.for_benchmark("vsibench").temperature == 0.01 and EvalConfig.for_benchmark("vsibench").max_pixels == 0
    assert set(evaluation.BENCHMARK_SAMPLING) == set(benchmarks.BENCHMARKS)   # every convertible benchmark has a row
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
    path, _ = benchmarks.prepare("vstar", tmp_path / "src", tmp_path / "data")
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

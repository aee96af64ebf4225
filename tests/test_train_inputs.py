"""train.py's checks before any work: flag values, paths that do not exist or are not what they claim, a run directory
already in use, a resume with changed settings; and what it says when a step trains on nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import config
import ofr
import train

ROOT = Path(train.__file__).parent


@pytest.mark.parametrize("flags, message", [
    (["--engine", "nonsense"], "invalid choice: 'nonsense' (choose from 'hf', 'vllm', 'scripted')"),
    (["--loss-agg", "token_mean"], "invalid choice: 'token_mean'"),
    (["--video-context", "ondemand"], "invalid choice: 'ondemand'"),
    (["--parallel", "fsdp"], "invalid choice: 'fsdp'"),
    (["--preset", "paper"], "invalid choice: 'paper'"),
])
def test_choice_flags_are_refused_with_the_allowed_values(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "-3"], "--max-steps must be at least 1, got -3"),
    (["--group-size", "1"], "--group-size must be at least 2, got 1"),
    (["--micro-batch-tokens", "-1"], "--micro-batch-tokens must be at least 0"),
])
def test_counts_out_of_range_are_refused(flags, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_config(flags)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is a file, not a directory"):
        train.parse_config(["--output-dir", str(tmp_path / "notes.txt")])


def test_resume_keeps_the_runs_own_settings_and_names_each_change(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config.flag_values(train.TrainConfig(lr=3e-5, group_size=8))))
    cfg = train.parse_config(["--output-dir", str(tmp_path), "--resume", "--lr", "1e-4", "--max-steps", "50"])
    assert cfg.lr == 3e-5 and cfg.max_steps == 50          # max_steps may grow; the lr is the run's
    out = capsys.readouterr().out
    assert "--lr is 0.0001" in out and "says 3e-05" in out and "max-steps" not in out
    cfg = train.parse_config(["--output-dir", str(tmp_path), "--resume", "--lr", "1e-4", "--no-keep-config"])
    assert cfg.lr == 1e-4


def run(*args, timeout=300):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_mistyped_data_path_writes_nothing_next_to_it(tmp_path, tiny_dir):
    """The tiny preset makes synthetic tasks only when --data is empty: a missing file is an error, and the user's
    directory (here holding tasks.json) is left exactly as it was."""
    users = tmp_path / "mine"
    users.mkdir()
    (users / "tasks.json").write_text("[]")
    proc = run("--model", str(tiny_dir), "--data", str(users / "tasks_v2.json"), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode != 0 and "tasks_v2.json: no such file" in proc.stderr
    assert sorted(p.name for p in users.iterdir()) == ["tasks.json"] and (users / "tasks.json").read_text() == "[]"


def test_a_checkpoint_directory_given_as_model_is_refused_not_written_into(tmp_path, image_tasks_dir):
    ckpt = tmp_path / "ckpt" / "step_000004"
    (ckpt / "shards").mkdir(parents=True)
    proc = run("--model", str(ckpt), "--data", str(image_tasks_dir / "tasks.json"), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode != 0 and "not a model directory (no config.json)" in proc.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["shards"]


def test_a_fresh_run_into_a_run_directory_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run("--output-dir", str(tmp_path))
    assert proc.returncode != 0 and "holds a run already: --resume continues it" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_step_that_trains_on_nothing_says_why():
    stats = ofr.OFRStats(draws=3, cap_hit=True, groups_drawn=12, trajectories_drawn=48, groups_kept=0,
                         trajectories_kept=0, removed={"zero_variance": 48}, group_std_mean=float("nan"),
                         group_std_std=float("nan"), group_std_min=float("nan"), group_std_max=float("nan"),
                         drawn_group_std_mean=0.0, negative_correct_frac_kept=float("nan"),
                         negative_correct_frac_all=float("nan"))
    note = train.nothing_survived_note(stats, train.TrainConfig(preset="tiny"))
    assert "{'zero_variance': 48}" in note and "random weights" in note and "--engine scripted" in note
    assert "random weights" not in train.nothing_survived_note(stats, train.TrainConfig(preset="tiny", model="m"))


def test_cpu_threads_leave_busy_cores_and_other_ranks_alone(monkeypatch):
    import models
    import torch
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        monkeypatch.setattr(models, "runnable_tasks", lambda: 1)             # alone: every core
        assert models.set_cpu_threads() == 4
        monkeypatch.setattr(models, "runnable_tasks", lambda: 4)             # three cores busy elsewhere
        assert models.set_cpu_threads() == 1
        monkeypatch.setattr(models, "runnable_tasks", lambda: 1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                          # two ranks on this node
        assert models.set_cpu_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "")                            # empty (`OMP_NUM_THREADS= make`): unset
        torch.set_num_threads(1)
        assert models.set_cpu_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")                           # the user's setting wins
        torch.set_num_threads(3)
        assert models.set_cpu_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert models.runnable_tasks() >= 1                                      # the real count includes this process


def test_rows_that_are_not_tasks_are_skipped_and_listed_as_eval_does(tmp_path, tiny_dir, image_tasks_dir):
    rows = json.loads((image_tasks_dir / "tasks.json").read_text())
    rows = [{**row, "image_path": str(image_tasks_dir / row["image_path"])} for row in rows]
    rows.append({**rows[0], "id": "lost", "image_path": str(tmp_path / "missing.png")})
    (tmp_path / "tasks.json").write_text(json.dumps(rows))
    proc = run("--model", str(tiny_dir), "--data", str(tmp_path / "tasks.json"), "--engine", "scripted",
               "--max-steps", "1", "--html-every", "0", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 unreadable rows" in proc.stderr
    assert [row["row"] for row in json.loads((tmp_path / "out" / "bad_rows.json").read_text())] == [12]


def test_judged_training_data_needs_and_uses_the_judge_url(tmp_path, tiny_dir, image_tasks_dir, exact_match_judge):
    """A judged data source (here the synthetic tasks relabelled as V*) stops at start-up without --judge-url, naming
    the source, and trains with it: every trajectory's answer goes to the judge."""
    rows = json.loads((image_tasks_dir / "tasks.json").read_text())
    rows = [{**row, "image_path": str(image_tasks_dir / row["image_path"]), "data_source": "vstar"} for row in rows]
    (tmp_path / "tasks.json").write_text(json.dumps(rows))
    common = ["--model", str(tiny_dir), "--data", str(tmp_path / "tasks.json"), "--engine", "scripted",
              "--max-steps", "1", "--html-every", "0"]
    proc = run(*common, "--output-dir", str(tmp_path / "no_judge"))
    assert proc.returncode != 0 and "'vstar' is scored by the LLM judge, but no judge is configured" in proc.stderr
    proc = run(*common, "--judge-url", exact_match_judge, "--output-dir", str(tmp_path / "judged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "judged" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reward/masked_frac"] == 0.0 and 0.0 < metrics["acc/mean"] < 1.0

"""sft.py: the loss covers assistant tokens only (images included), official-format rows convert with their errors named,
and the demo pipeline runs end to end at test size: cold start -> GRPO -> evaluations -> summary and ablation report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import models
import reports
import sft
import train

ROOT = Path(sft.__file__).parent


@pytest.fixture(scope="module")
def expert_trajs(tiny_policy, image_tasks_dir):
    _, p = tiny_policy
    cfg = sft.SFTConfig(max_turns=3, recover_rate=0.5, direct_rate=1.0)
    return sft.expert_trajectories(data.load_tasks(image_tasks_dir / "tasks.json")[0], p, cfg)


def test_expert_trajectories_are_correct_and_mixed(expert_trajs):
    assert expert_trajs and all(t.correct for t in expert_trajs)
    calls = {t.num_tool_calls for t in expert_trajs}
    assert {0, 1, 2} <= calls        # direct answers, one call, and a recovery after a broken first attempt


def test_sft_loss_is_the_mean_nll_of_assistant_tokens_only(tiny_dir, expert_trajs):
    """The loss equals the token-mean NLL over the action mask, and that mask holds the model's own tokens: none of the
    prompt, none of the tool output."""
    model, p = models.load_policy(tiny_dir)
    trajs = [t for t in expert_trajs if t.num_tool_calls][:2]
    total = float(sum(sum(t.action_mask) for t in trajs))
    with torch.no_grad():
        loss, mask = sft.sft_loss(model, trajs, p, "cpu", total)
        batch = train.collate(trajs, p, "cpu")
        logits = model(**{k: v for k, v in batch.items() if k != "action_mask"}).logits[:, :-1]    # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    expected = (nll * batch["action_mask"][:, 1:]).sum() / total
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for b, t in enumerate(trajs):
        own = p.decode([tok for tok, m in zip(t.input_ids, t.action_mask) if m])
        assert "<code>" in own and "<answer>" in own
        assert "Text Result" not in own and "tool_response" not in own and t.task.question not in own


def test_expert_trajectories_in_the_full_context_layout(tmp_path, tiny_policy):
    """The full-context arm's cold start: the frames sit in the prompt (video inputs present), all still correct."""
    _, p = tiny_policy
    tasks = data.generate_video_tasks(2, seed=0, out_dir=tmp_path)
    trajs = sft.expert_trajectories(tasks, p, sft.SFTConfig(max_turns=3, recover_rate=0.0, video_context="full_context"))
    assert len(trajs) == 2 and all(t.video_inputs and t.correct for t in trajs)
    on_demand = sft.expert_trajectories(tasks, p, sft.SFTConfig(max_turns=3, recover_rate=0.0))
    assert not any(t.video_inputs for t in on_demand)


def _official_row(tmp_path, images=1, role="assistant"):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "a.png")
    return {"messages": [{"role": "user", "content": "<image>What colour?"},
                         {"role": role, "content": "<answer>\n\\boxed{red}\n</answer>"}],
            "images": ["a.png"] * images}


def test_official_rows_convert_with_images_and_assistant_mask(tmp_path, tiny_policy):
    _, p = tiny_policy
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([_official_row(tmp_path)]))
    (traj,) = sft.official_rows(path, p)
    assert len(traj.image_grid_thw) == 1 and traj.pixel_values
    n_pads = sum(tok == p.image_pad_id for tok in traj.input_ids)
    assert n_pads == p.tokens_for_grid(traj.image_grid_thw[0])
    assistant = p.decode([tok for tok, m in zip(traj.input_ids, traj.action_mask) if m])
    assert assistant.startswith("<answer>") and "What colour" not in assistant


@pytest.mark.parametrize("row, field", [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                                           "messages.role")])
def test_official_row_errors_name_file_row_and_field(tmp_path, tiny_policy, row, field):
    _, p = tiny_policy
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(data.DataError) as err:
        sft.official_rows(path, p)
    assert str(path) in str(err.value) and "row 0" in str(err.value) and field in str(err.value)


def _run(*args):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_demo_pipeline_end_to_end_at_test_size(tmp_path, tiny_dir, image_tasks_dir):
    """What `make demo` and `make ablations` chain, with the test model and a handful of tasks: every stage's CLI,
    the files the next stage reads, and the summary keys the README promises."""
    tasks = str(image_tasks_dir / "tasks.json")
    roll = ["--template-key", "short", "--max-turns", "3", "--max-turn-tokens", "96", "--max-response-tokens", "512"]
    _run("sft.py", "--model", str(tiny_dir), "--image-tasks", tasks, "--output-dir", str(tmp_path / "sft"),
         "--epochs", "1", "--lr", "1e-3", "--max-turns", "3", "--direct-rate", "0.5", "--guess-rate", "0.4",
         "--template-key", "short")
    log = [json.loads(line) for line in (tmp_path / "sft" / "sft_log.jsonl").read_text().splitlines()]
    assert log and log[-1]["loss"] < log[0]["loss"]
    evals = {"sft": tmp_path / "eval_sft", "rl": tmp_path / "abl" / "full-s1" / "eval"}   # where make puts them
    for name in ("sft", "rl"):
        model = tmp_path / "sft" / "model" if name == "sft" else tmp_path / "abl" / "full-s1" / "final"
        if name == "rl":
            _run("train.py", "--preset", "tiny", "--model", str(tmp_path / "sft" / "model"), "--data", tasks,
                 "--max-steps", "2", "--output-dir", str(tmp_path / "abl" / "full-s1"), "--template-key", "short")
        _run("eval.py", "--engine", "hf", "--model", str(model), "--data", tasks, "--output-dir", str(evals[name]),
             "--temperature", "0", *roll)
    timings = tmp_path / "timings"
    timings.mkdir()
    (timings / "sft.s").write_text("12.5")
    (timings / "rl.s").write_text("7.5")
    _run("eval.py", "demo-summary", "--sft-eval", str(evals["sft"]), "--rl-eval", str(evals["rl"]),
         "--train-dir", str(tmp_path / "abl" / "full-s1"), "--timings-dir", str(timings), "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("sft_acc_tool", "rl_acc_tool", "sft_tool_calls", "rl_tool_calls", "sft_wellformed", "wall_s"):
        assert key in summary, key
    assert summary["wall_s"] == 20.0 and summary["n_heldout"] == 12
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "summary.md").is_file()
    table = reports.ablation_report(tmp_path / "abl")
    assert "full" in table and (tmp_path / "abl" / "curves.png").is_file()
    seed = json.loads((tmp_path / "abl" / "summary.json").read_text())["full"]["1"]
    rl_eval = json.loads((evals["rl"] / "results.json").read_text())
    assert seed["heldout_accuracy"] == rl_eval["summary"]["accuracy"]
    assert seed["heldout_tool_calls"] == rl_eval["summary"]["tool_calls_mean"]
    families = {t.family for t in data.load_tasks(tasks)[0]}
    assert set(seed["heldout_per_family"]) == families and "Held-out, per family" in table
    assert seed["heldout_per_family"] == {f: {m: g[m] for m in seed["heldout_per_family"][f]}
                                          for f, g in rl_eval["per_family"].items()}
    assert seed["acc/mean first 10"] is not None and seed["acc/mean step std"] is not None
    for key in ("tool/calls_mean", "acc/mean", "rollout/turns_mean"):
        assert seed[key] is not None, key
    assert {"tool/reward_gap run mean", "tool/reward_gap_bonus run mean"} <= set(seed)
    # the tasks mix families: training tool calls and accuracy per family, in the table and in the paired differences
    assert len(seed["train_per_source"]) > 1 and set(seed["train_per_source"]) <= families
    assert "per task source" in table and "tool/push_kept run mean" in seed and all(f"tool/calls_mean/{f}" in seed for f in seed["train_per_source"])

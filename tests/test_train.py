"""train.py: the update lowers the loss on a fixed batch and touches only action tokens; 2-rank torchrun (gloo) gives the
same update as one rank; a run resumed from a checkpoint continues exactly like an uninterrupted one."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import data
import models
import rollout
import train
from sandbox import SandboxPool

ROOT = Path(train.__file__).parent


@pytest.fixture(scope="module")
def expert_batch(tiny_dir, image_tasks_dir):
    """Scripted-expert trajectories on 2 tasks x 4 samples: half of the first attempts fail (reward 0)."""
    _, p = models.load_policy(tiny_dir)
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0][:2]
    with SandboxPool(timeout=20) as pool:
        trajs = rollout.rollout(tasks, rollout.ScriptedExpert(p, recover_rate=0.5), p, pool.open,
                                rollout.RolloutConfig(max_turns=3), n=4)
    rollout.score_trajectories(trajs, p)
    import ofr
    adv = ofr.group_advantages([t.reward for t in trajs], [t.group_id for t in trajs])
    assert len(set(adv.round(6))) > 1
    return trajs, adv.tolist()


def full_logprobs(model, batch):
    """The plain computation the chunked one replaces: (B, T-1, V) float32 logits, log-softmax at every target."""
    logits = model(**{k: v for k, v in batch.items() if k != "action_mask"}).logits[:, :-1].float()   # (B, T-1, V)
    return logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)            # (B, T-1)


def surrogate(model, trajs, adv, p, old):
    """The PPO surrogate of the batch under fixed old log-probs (what one update step minimises)."""
    batch = train.collate(trajs, p, "cpu")
    logp, _ = train.action_logprobs(model, batch)
    rows = torch.repeat_interleave(torch.arange(len(trajs)), batch["action_mask"][:, 1:].sum(1))
    loss, _ = train.ppo_token_loss(logp, old, torch.tensor(adv)[rows], 0.2, 0.2, 3.0)
    return float(loss.mean())


def test_one_step_changes_weights_and_lowers_the_loss(tiny_dir, expert_batch):
    trajs, adv = expert_batch
    model, p = models.load_policy(tiny_dir)
    model.model.visual.requires_grad_(False)
    cfg = train.TrainConfig(lr=1e-4, micro_batch=3)
    with torch.no_grad():
        old, _ = train.action_logprobs(model, train.collate(trajs, p, "cpu"))
        before = surrogate(model, trajs, adv, p, old)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
    stats = train.update(model, optimizer, trajs, adv, cfg, p, train.Dist())
    assert stats.tokens == sum(sum(t.action_mask) for t in trajs) and stats.grad_norm > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert any("language_model" in k for k in changed)
    assert not any(".visual." in k or k.startswith("model.visual") for k in changed)   # vision tower frozen
    with torch.no_grad():
        assert surrogate(model, trajs, adv, p, old) < before


@pytest.mark.parametrize("chunk", [1, 7, 100000])
def test_chunked_action_logprobs_equal_the_full_computation(tiny_dir, expert_batch, chunk):
    """Log-probs, entropies and the gradient of a loss over action tokens: the chunked, checkpointed LM head at action
    positions equals full-vocabulary logits at every position masked afterwards; tokens outside the action mask
    (prompt, tool output, padding) get exactly zero gradient."""
    trajs, adv = expert_batch
    model, p = models.load_policy(tiny_dir)
    batch = train.collate(trajs, p, "cpu")
    mask = batch["action_mask"][:, 1:].bool()                                   # (B, T-1)
    assert any(t.response_len > sum(t.action_mask) for t in trajs)              # tool output exists and is masked
    full = full_logprobs(model, batch)
    full.retain_grad()
    (full[mask] * torch.linspace(-1, 1, int(mask.sum()))).sum().backward()
    assert torch.count_nonzero(full.grad[~mask]) == 0
    expected_grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    logp, entropy = train.action_logprobs(model, batch, chunk=chunk, with_entropy=True)   # (N,), (N,)
    (logp * torch.linspace(-1, 1, int(mask.sum()))).sum().backward()
    assert torch.allclose(logp, full[mask].detach(), atol=1e-5)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "action_mask"}).logits[:, :-1][mask].float()
        assert torch.allclose(entropy, torch.distributions.Categorical(logits=logits).entropy(), atol=1e-4)
    for name, q in model.named_parameters():
        if name in expected_grads:
            # float32 sums in another order: equal to 1e-4 of the gradient's own scale
            assert (q.grad - expected_grads[name]).abs().max() <= 1e-4 * expected_grads[name].abs().max(), name


def test_ppo_loss_clipping_and_dual_clip():
    logp, old = torch.log(torch.tensor([[1.5, 0.5, 5.0]])), torch.zeros(1, 3)
    pos, _ = train.ppo_token_loss(logp, old, torch.tensor([[1.0]]), 0.2, 0.2, 3.0)
    assert torch.allclose(pos, torch.tensor([[-1.2, -0.5, -1.2]]))      # ratio capped at 1.2 for A > 0
    neg, _ = train.ppo_token_loss(logp, old, torch.tensor([[-1.0]]), 0.2, 0.2, 3.0)
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 3.0]]))         # floor 0.8; dual clip caps at c = 3


def summary(group, reward, calls, bonus, source="synthetic_image", direct=None):
    direct = calls == 0 if direct is None else direct
    return train.TrajSummary(group, reward, reward >= 1, "DONE", calls, calls, True, 0, 0, 0, bonus, direct, source)


def test_tool_reward_gaps_hand_computed():
    batch = [summary(0, 1.2, 2, 0.2), summary(0, 0.0, 1, 0.0), summary(0, 1.0, 0, 0.0), summary(0, 0.0, 0, 0.0),
             summary(1, 1.1, 1, 0.1), summary(1, 0.0, 1, 0.0),                       # tool only: no comparison
             summary(2, 1.0, 0, 0.0), summary(2, float("nan"), 1, 0.0),              # a masked reward: left out
             summary(3, 0.0, 3, 0.0), summary(3, 1.0, 0, 0.0),                       # answering without paid
             summary(4, 0.0, 0, 0.0, direct=False), summary(4, 1.0, 0, 0.0)]         # a failed call is an attempt
    gaps = train.tool_reward_gaps(batch)
    # group 0: tool (1.2 + 0) / 2 - direct (1 + 0) / 2 = 0.1, of which the bonus 0.2 / 2 = 0.1; groups 3, 4: -1, bonus 0
    assert gaps == [pytest.approx((0.1, 0.1)), pytest.approx((-1.0, 0.0)), pytest.approx((-1.0, 0.0))]


def test_tool_push_drawn_and_kept_hand_computed():
    batch = [summary(0, 1.1, 1, 0.1, "ring"), summary(0, 0.0, 1, 0.0, "ring"), summary(0, 1.0, 0, 0.0, "ring"),
             summary(0, 0.0, 0, 0.0, "ring"), summary(1, 1.0, 0, 0.0, "big"), summary(1, float("nan"), 2, 0.0, "big"),
             summary(2, 1.0, 0, 0.0, "big"), summary(2, 0.0, 0, 0.0, "big", direct=False)]
    advantages = train.drawn_advantages(batch)
    assert advantages[:4] == pytest.approx([0.575, -0.525, 0.475, -0.525]) and all(map(math.isnan, advantages[4:6]))
    push = train.tool_push("drawn", batch, advantages)
    # ring: the tool users' 0.575 - 0.525 over 4; big (the masked group left out): -0.5 over 2
    assert push["tool/push_drawn/ring"] == pytest.approx(0.05 / 4) and push["tool/push_drawn/big"] == -0.25
    assert push["tool/push_drawn"] == pytest.approx((0.05 - 0.5) / 6)
    assert train.tool_push("kept", [], []) == {"tool/push_kept": pytest.approx(math.nan, nan_ok=True)}


def test_rollout_metrics_per_source():
    batch = [summary(0, 1.1, 1, 0.1, "ring"), summary(0, 0.0, 3, 0.0, "ring"), summary(1, 1.0, 0, 0.0, "big")]
    stats = train.rollout_metrics(batch, [], processor=None)
    assert stats["tool/calls_mean"] == pytest.approx(4 / 3)
    assert stats["tool/calls_mean/ring"] == 2.0 and stats["acc/mean/ring"] == 0.5
    assert stats["tool/calls_mean/big"] == 0.0 and stats["acc/mean/big"] == 1.0
    assert stats["tool/direct_frac"] == pytest.approx(1 / 3) and stats["tool/direct_frac/ring"] == 0.0
    assert train.rollout_metrics(batch[2:], [], processor=None)["tool/calls_mean/big"] == 0.0


def train_process(out, *extra, ranks=1, steps=1, preset="tiny") -> subprocess.CompletedProcess:
    args = ["train.py", "--preset", preset, "--engine", "scripted", "--max-steps", str(steps), "--output-dir", str(out),
            "--lr", "1e-3", "--save-every", "1", "--html-every", "0", *extra]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_train(out, *extra, ranks=1, steps=1, preset="tiny"):
    proc = train_process(out, *extra, ranks=ranks, steps=steps, preset=preset)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(run_dir: Path, step: int) -> dict:
    """The model weights of a sharded checkpoint, as one state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(run_dir / "ckpt" / f"step_{step:06d}" / "shards", run_dir / "gathered.pt")
    return torch.load(run_dir / "gathered.pt", weights_only=False)["model"]


def test_paper_preset_step_moves_the_float32_master_weights_and_two_ranks_match_one(tmp_path, tiny_dir,
                                                                                  image_tasks_dir):
    """One step of --preset paper-image (bfloat16 compute, FSDP2, lr 1e-6, activation checkpointing, token-budget
    packing) on the tiny model. The checkpoint holds float32 weights and >= 90 % of the language model's moved (with
    bfloat16 master weights ~2 % did: most lr-1e-6 updates round away). Two ranks give the same weights as one process
    under the same mixed precision, to 1 % of lr per element (measured: identical)."""
    paper = ["--model", str(tiny_dir), "--data", str(image_tasks_dir / "tasks.json"), "--lr", "1e-6",
             "--group-size", "4", "--gen-batch-prompts", "4", "--train-groups", "2", "--max-draws", "3",
             "--eval-every", "0"]
    run_train(tmp_path / "one", *paper, preset="paper-image")
    run_train(tmp_path / "two", *paper, preset="paper-image", ranks=2)
    start = models.load_policy(tiny_dir, dtype="float32")[0].state_dict()
    one, two = checkpoint_weights(tmp_path / "one", 1), checkpoint_weights(tmp_path / "two", 1)
    language = [k for k in start if "language_model" in k or k.startswith("lm_head")]
    assert {one[k].dtype for k in language} == {two[k].dtype for k in language} == {torch.float32}
    moved = sum(int((two[k] != start[k]).sum()) for k in language) / sum(start[k].numel() for k in language)
    assert moved >= 0.9, moved
    for k in language:
        assert ((two[k] - start[k]) - (one[k] - start[k])).abs().max() <= 0.01 * 1e-6, k
    config = json.loads((tmp_path / "two" / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"       # the export is in the dtype asked for


def test_released_preset_with_offload_trains_and_resumes_on_two_ranks(tmp_path, tiny_dir, image_tasks_dir):
    """--preset released-image: FSDP2 with parameters, gradients and AdamW state offloaded to host memory, four
    optimiser steps per RL step; its sharded checkpoint resumes into the same state (the second step equals an
    uninterrupted run's)."""
    released = ["--model", str(tiny_dir), "--data", str(image_tasks_dir / "tasks.json"), "--lr", "1e-4",
                "--group-size", "4", "--gen-batch-prompts", "4", "--train-groups", "4", "--max-draws", "3",
                "--eval-every", "0"]
    straight = run_train(tmp_path / "straight", *released, preset="released-image", ranks=2, steps=2)
    run_train(tmp_path / "resumed", *released, preset="released-image", ranks=2, steps=1)
    resumed = run_train(tmp_path / "resumed", *released, "--resume", preset="released-image", ranks=2, steps=2)
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["offload"] and config["mini_batches"] == 4
    assert straight[1]["loss/policy"] == pytest.approx(resumed[1]["loss/policy"], rel=1e-6, abs=1e-9)
    assert straight[1]["grad/norm"] == pytest.approx(resumed[1]["grad/norm"], rel=1e-6)


@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
def test_bfloat16_compute_on_float32_master_weights(tiny_dir, expert_batch, parallel):
    """With --dtype bfloat16 the blocks compute in bfloat16 (FSDP2 gathers bfloat16 copies of its shards; one process
    autocasts) while the parameters the optimiser steps stay float32."""
    trajs, _ = expert_batch
    d = train.init_distributed(one_process_group=parallel == "fsdp2")
    try:
        model, p = models.load_policy(tiny_dir, dtype="float32")
        cfg = train.TrainConfig(parallel=parallel, dtype="bfloat16")
        wrapped = train.wrap_model(model, cfg, d)
        master = list(model.parameters())          # what the optimiser steps (under FSDP2: this rank's shards)
        seen = []
        projection = model.model.language_model.layers[0].self_attn.q_proj
        projection.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        with train.compute_context(cfg, d):
            logp, _ = train.action_logprobs(wrapped, train.collate(trajs[:2], p, "cpu"))
        assert seen == [torch.bfloat16] and logp.dtype == torch.float32
        assert {q.dtype for q in master} == {torch.float32}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 500), max_size=40), max_count=st.integers(1, 8),
       budget=st.sampled_from([0, 1, 300, 1000, 4000]))
def test_packing_puts_every_trajectory_in_one_micro_batch_within_the_budget(lengths, max_count, budget):
    packs = train.pack_micro_batches(lengths, max_count, budget)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    for pack in packs:
        assert 1 <= len(pack) <= max_count
        if budget and len(pack) > 1:
            assert len(pack) * max(lengths[i] for i in pack) <= budget


def test_token_budget_packing_gives_the_same_gradient_as_counted_micro_batches(tiny_dir, expert_batch):
    """Every action token enters the loss once with the same weight however the trajectories are packed: one SGD step
    of lr 1 (the weights move by exactly the gradient) is the same with micro-batches of 3 in order and with
    length-sorted packs of at most 300 padded tokens."""
    trajs, adv = expert_batch
    moved = []
    for micro_batch, budget in ((3, 0), (8, 300)):
        model, p = models.load_policy(tiny_dir)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = train.TrainConfig(micro_batch=micro_batch, micro_batch_tokens=budget, grad_clip=1e9)
        stats = train.update(model, torch.optim.SGD(model.parameters(), lr=1.0), trajs, adv, cfg, p, train.Dist())
        assert stats.tokens == sum(sum(t.action_mask) for t in trajs)
        moved.append({k: v - start[k] for k, v in model.state_dict().items()})
    assert len(train.pack_micro_batches([len(t.input_ids) for t in trajs], 8, 300)) > len(trajs) // 3   # really packed
    for k in moved[0]:
        assert torch.allclose(moved[0][k], moved[1][k], atol=1e-6), k


def test_two_ranks_give_the_same_update_as_one(tmp_path, tiny_dir, image_tasks_dir):
    common = ["--model", str(tiny_dir), "--data", str(image_tasks_dir / "tasks.json")]
    one = run_train(tmp_path / "one", *common)
    two = run_train(tmp_path / "two", *common, ranks=2)
    for key in ("reward/mean", "ofr/trajectories_kept", "train/tokens"):
        assert one[0][key] == two[0][key], key
    assert one[0]["loss/policy"] == pytest.approx(two[0]["loss/policy"], rel=1e-5, abs=1e-7)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    start = load_file(tiny_dir / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_fsdp2_two_ranks_match_one_rank_across_a_resume(tmp_path, tiny_dir, image_tasks_dir):
    """Sharded parameters, gradients and optimiser state: step 2 after a resume from a sharded checkpoint still equals
    the single-process run (a lost or mis-sharded optimiser state changes the second Adam step)."""
    common = ["--model", str(tiny_dir), "--data", str(image_tasks_dir / "tasks.json")]
    one = run_train(tmp_path / "one", *common, steps=2)
    run_train(tmp_path / "fsdp", *common, "--parallel", "fsdp2", ranks=2, steps=1)
    sharded = run_train(tmp_path / "fsdp", *common, "--parallel", "fsdp2", "--resume", ranks=2, steps=2)
    for a, b in zip(one, sharded):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-5, abs=1e-7)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert a.keys() == b.keys()          # the gathered tied head is not written twice
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_fsdp2_with_the_hf_engine_rolls_out_from_a_synced_replica(tmp_path, tiny_dir, image_tasks_dir):
    """A sharded policy cannot `generate` rank by rank; the HF engine gets a full replica and the new weights after
    every update. Two steps (rollout, update, sync, rollout) and a periodic evaluation must finish without a hang."""
    tasks = str(image_tasks_dir / "tasks.json")
    metrics = run_train(tmp_path / "hf", "--model", str(tiny_dir), "--data", tasks, "--engine", "hf",
                        "--parallel", "fsdp2", "--eval-every", "2", "--eval-data", tasks, ranks=2, steps=2)
    assert [m["step"] for m in metrics] == [1, 2, 2] and "eval/accuracy" in metrics[-1]


def test_hf_engine_sync_weights_copies_into_its_replica(tiny_dir):
    import copy
    model, p = models.load_policy(tiny_dir)
    engine = rollout.HFEngine(copy.deepcopy(model), p)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    engine.sync_weights(train.full_weights(model))
    for (name, a), b in zip(model.state_dict().items(), engine.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(tmp_path, tiny_dir, image_tasks_dir):
    common = ["--model", str(tiny_dir), "--data", str(image_tasks_dir / "tasks.json")]
    straight = run_train(tmp_path / "straight", *common, steps=3)
    run_train(tmp_path / "resumed", *common, steps=2)
    resumed = run_train(tmp_path / "resumed", *common, "--resume", steps=3)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("reward/mean", "loss/policy", "grad/norm", "ofr/trajectories_kept", "tool/calls_mean",
                "tool/mixed_groups"):
        assert resumed[2][key] == straight[2][key], key


def test_resume_falls_back_from_a_corrupt_checkpoint_and_cuts_the_log_back(tmp_path, tiny_dir, image_tasks_dir):
    """After a stop that left a half-written checkpoint (.tmp_), a corrupt newest one and a torn metrics line: the
    resume names the corrupt checkpoint, continues from the one before, re-runs the lost step exactly, and the log
    holds each step once."""
    common = ["--model", str(tiny_dir), "--data", str(image_tasks_dir / "tasks.json")]
    run_dir = tmp_path / "run"
    straight = run_train(run_dir, *common, steps=3)
    (run_dir / "ckpt" / ".tmp_step_000009").mkdir()
    for shard in (run_dir / "ckpt" / "step_000003" / "shards").glob("*.distcp"):
        shard.write_bytes(b"\0" * 64)
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 4, "reward/me')
    proc = train_process(run_dir, *common, "--resume", steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_000003 cannot be loaded" in proc.stdout and "falling back to step_000002" in proc.stdout
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[2]["loss/policy"] == straight[2]["loss/policy"]
    # a corrupt checkpoint with nothing older to fall back to stops the run, naming it
    for old in (run_dir / "ckpt").glob("step_*"):
        for shard in (old / "shards").glob("*.distcp"):
            shard.write_bytes(b"\0" * 64)
    proc = train_process(run_dir, *common, "--resume", steps=4)
    assert proc.returncode != 0 and "no checkpoint in" in proc.stderr and "step_00000" in proc.stderr


def test_an_eval_interrupted_after_its_checkpoint_runs_on_resume(tmp_path, tiny_dir, image_tasks_dir):
    tasks = str(image_tasks_dir / "tasks.json")
    common = ["--model", str(tiny_dir), "--data", tasks, "--eval-every", "2", "--eval-data", tasks]
    run_dir = tmp_path / "run"
    run_train(run_dir, *common, steps=2)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert "eval/accuracy" in rows[-1]
    (run_dir / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")    # stopped after the checkpoint, before eval
    resumed = run_train(run_dir, *common, "--resume", steps=2)
    assert [m["step"] for m in resumed] == [1, 2, 2] and "eval/accuracy" in resumed[-1]


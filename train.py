"""train.py — GRPO with oversampling-filtering-ranking and the accumulative tool reward (docs/method.md §5, §6, §12).

What this file is
    The training loop of PyVision-RL. One step:
      1. oversample: roll out generation batches of prompts x group_size (rollout.py), score them (reward.py);
      2. filter and rank (ofr.py) until `train_groups` groups survive, with mean-centred group advantages;
      3. update: PPO-clip (separate low/high clip, dual-clip) over the kept trajectories with a token-mean loss on the
         model's own tokens only (prompt and tool-output tokens are masked), old log-probs from the training model over
         the full interleaved sequence with every image;
      4. push the new weights to the rollout engine (vLLM), log, checkpoint, evaluate.

How to run
    python train.py --preset tiny --max-steps 5 --output-dir runs/tiny-rl                    # CPU, one process
    torchrun --nproc_per_node=2 train.py --preset tiny --output-dir runs/tiny-rl             # CPU, gloo DDP
    torchrun --nproc_per_node=8 train.py --preset paper-image --data rl.json --output-dir runs/img   # 8 GPUs, vLLM
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 train.py --preset paper-video ...  # multi-node
    python train.py --preset tiny --max-steps 10 --output-dir runs/tiny-rl --resume          # continue a stopped run
    torchrun --nproc_per_node=8 train.py --preset released-image ...   # the released script's batch and offload

Distribution
    Every rank rolls out its share of each generation batch. The rank-local trajectories are summarised (group, reward,
    end reason, ...) and gathered, so group statistics and OFR see all ranks and pick the same trajectories everywhere;
    each rank then trains on its kept trajectories. The token-mean loss is normalised by the global token count, so N
    ranks give the same update as one rank on the same data (tests/test_train.py checks this with gloo).
    `--parallel ddp` keeps a full copy of the policy per rank; `--parallel fsdp2` (the paper presets) shards each
    transformer block's parameters, gradients and AdamW state over the ranks (in one process too, as a 1-rank group,
    so one GPU runs the same code as eight), which is what lets a 7B policy train beside a colocated vLLM. Checkpoints
    are sharded (torch.distributed.checkpoint: each rank writes and reads its own part), so a run resumes under any
    layout and rank count; the final export is one Hugging Face directory gathered on rank 0. A sharded policy cannot
    run HF `generate` rank by rank, so with `--engine hf` under FSDP2 the engine keeps a full replica that receives the
    new weights after each update, exactly as vLLM does. Collectives time out after `--dist-timeout-min`, and periodic
    evaluation is spread over the ranks, so no rank waits out another's long solo work.

Precision and memory (what a 7B policy on 80 GB cards needs; bench/memory_plan.py measures it)
    * `--dtype bfloat16` is the compute dtype: the master weights and AdamW state stay float32 (at lr 1e-6 most updates
      of a bfloat16 weight would round away), FSDP2 gathers bfloat16 copies and reduces gradients in float32, one
      process and DDP autocast. The final export is written in the compute dtype; checkpoints hold the float32 weights.
    * The LM head runs only at action positions, `--logprob-chunk` positions at a time under checkpointing: no
      (B, T, vocab) float32 logits (`action_logprobs`). `--grad-checkpointing` recomputes each block in the backward.
    * `--micro-batch-tokens` packs length-sorted trajectories up to a padded-token budget; `--offload` keeps FSDP2's
      shards, gradients and AdamW state in host memory.

Differences from the paper / official code
    * With one optimiser step per RL step (the default, on-policy) the old log-probs equal the current ones; we reuse
      the detached log-probs of the update's own forward instead of a second pass (same numbers, one pass fewer). With
      `mini_batches > 1` they are recomputed before the update, as the official code does.
    * Token-mean normalisation: the loss here is the mean over every action token of the mini-batch on every rank,
      however it is split into micro-batches. The official actor (`verl_agents/verl/workers/actor/dp_actor.py`) takes
      each micro-batch's token mean, divides it by the number of accumulation steps, and data parallelism averages the
      ranks: a mean of micro-batch means. The released scripts put one trajectory in each micro-batch
      (`ppo_micro_batch_size_per_gpu=1`), which makes it the mean over trajectories of each trajectory's token mean, so
      a token of a long trajectory weighs less there; `--loss-agg seq-mean-token-mean` gives that weighting here. Kept:
      the official weighting changes with the micro-batch size and the number of GPUs, the global token mean does not.
    * No reference model is loaded unless `kl_coef > 0` (the paper uses no KL; the released scripts set
      `use_kl_loss=False`). With `kl_coef > 0`, k3 is used as is; the official `low_var_kl`
      (`verl_agents/verl/trainer/ppo/core_algos.py`) clamps each token's value to [-10, 10]. Kept: no paper run uses
      KL, and the clamp silences the tokens that have drifted furthest, the ones the penalty is there to pull back.
    * OFR keeps whole groups by default (ofr.py lists the other differences).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException   # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import config
import data
import eval as evaluation
import models
import ofr
import reports
import reward
import rollout
import tiny
from rollout import Trajectory
from sandbox import SandboxPool


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------

_f = config.config_field


@dataclass
class TrainConfig(rollout.RolloutConfig, ofr.OFRConfig, reward.JudgeConfig, models.ImageBounds):
    """Everything one run reads. The rollout, OFR, judge and image-bound settings are declared in their own files
    (rollout.RolloutConfig, ofr.OFRConfig, reward.JudgeConfig, models.ImageBounds) and inherited with their flags."""
    preset: str = _f("tiny", "starting values: tiny (CPU tests), demo (the CPU demo), paper-image and paper-video (the "
                             "paper's text), released-image and released-video (the released script)",
                     ["tiny", "demo", "paper-image", "paper-video", "released-image", "released-video"])
    model: str = _f("", "checkpoint name or path; empty with the tiny preset builds a tiny model in OUTPUT_DIR/model")
    data: str = _f("", "training tasks (official RL or validation format); empty with tiny: synthetic tasks are written")
    eval_data: str = _f("", "held-out tasks for periodic evaluation (empty: no periodic evaluation)")
    output_dir: str = _f("runs/train", "where the config, metrics.jsonl, checkpoints and the final model go")
    resume: bool = _f(False, "continue from the newest checkpoint in OUTPUT_DIR")
    keep_config: bool = _f(True, "with --resume: settings that change the run's results come from the run's own "
                                 "config.json, with a warning for each flag that differs (--no-keep-config: flags win)")
    engine: str = _f("hf", "rollout engine: hf (transformers generate), vllm (GPU), scripted (expert, for checks)",
                     ["hf", "vllm", "scripted"])
    max_steps: int = _f(20, "RL steps")
    seed: int = _f(0, "seed for data order, sampling and the scripted expert")
    # batch shape (paper: 32 prompts generated per batch, 16 trained per step, 8 rollouts each)
    gen_batch_prompts: int = _f(32, "prompts per generation batch (the oversampling batch)")
    mini_batches: int = _f(1, "optimiser steps per RL step (1 = on-policy)")
    micro_batch: int = _f(4, "most trajectories per forward/backward (gradient accumulation inside a mini-batch)")
    micro_batch_tokens: int = _f(0, "padded tokens per forward/backward: trajectories are sorted by length and packed "
                                    "up to this budget (a longer one goes alone); 0: MICRO_BATCH in arrival order")
    logprob_chunk: int = _f(2048, "action positions per LM-head chunk: only one chunk's (chunk, vocab) float32 logits "
                                  "exist at a time, recomputed in the backward pass")
    grad_checkpointing: bool = _f(False, "activation checkpointing of every transformer block (recompute in backward)")
    # optimisation
    lr: float = _f(1e-6, "AdamW learning rate (constant)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max gradient norm")
    clip_low: float = _f(0.2, "PPO ratio clip below 1")
    clip_high: float = _f(0.2, "PPO ratio clip above 1")
    dual_clip: float = _f(3.0, "dual-clip constant c for negative advantages (0 disables)")
    loss_agg: str = _f("token-mean", "token-mean (paper) or seq-mean-token-mean", ["token-mean", "seq-mean-token-mean"])
    kl_coef: float = _f(0.0, "KL-to-reference coefficient; 0 loads no reference model (paper)")
    kl_estimator: str = _f("k3", "k1 or k3", ["k1", "k3"])
    train_vision: bool = _f(False, "also train the vision tower (paper: frozen)")
    dtype: str = _f("float32", "compute dtype: float32, or bfloat16 (mixed precision: the master weights, the "
                               "gradient reduction and AdamW's state stay float32; the final export is in this dtype)",
                     ["float32", "bfloat16"])
    parallel: str = _f("ddp", "how ranks hold the model: ddp (a full copy each) or fsdp2 (parameters, gradients and "
                              "optimiser state sharded per transformer block: what a 7B policy needs; also in one "
                              "process, as a 1-rank group)", ["ddp", "fsdp2"])
    offload: bool = _f(False, "fsdp2: keep parameters, gradients and AdamW state in host memory (CPUOffloadPolicy)")
    dist_timeout_min: float = _f(60.0, "collective timeout in minutes (NCCL's 10-minute default kills a job whose "
                                       "ranks wait on a long checkpoint write)")
    # reward (coefficient 0 is the paper's ablation)
    tool_coef: float = _f(0.1, "accumulative tool reward per call, paid only when correct (0 = ablation)")
    # rollout sampling and the vLLM engine
    temperature: float = _f(1.0, "rollout sampling temperature")
    top_p: float = _f(1.0, "rollout nucleus sampling")
    vllm_gpu_memory: float = _f(0.4, "vllm: fraction of the GPU's memory it takes (the trainer shares the GPU)")
    vllm_eager: bool = _f(False, "vllm: no CUDA graphs or torch.compile (starts in seconds, decodes slower)")
    # logging, checkpoints, evaluation
    save_every: int = _f(10, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(2, "newest checkpoints kept on disk")
    eval_every: int = _f(0, "evaluate on EVAL_DATA every N steps (0: never)")
    html_every: int = _f(5, "write a few trajectories to the HTML viewer every N steps")
    collapse_alarm: float = _f(0.5, "warn when tool calls/trajectory fall this fraction below the first step's")
    tensorboard: bool = _f(False, "also log to TensorBoard (needs the tensorboard package)")
    wandb: str = _f("", "Weights & Biases project to log to (needs wandb)")


# The paper-scale presets. Two sources disagree on the batch (arXiv 2602.20739's training details vs the released
# training script in the official repository's README): `paper-*` follow the paper's text (32 prompts drawn per generation batch, 16
# groups of 8 trained, one optimiser step per RL step, i.e. on-policy); `released-*` follow the released script
# (gen_batch_size=32, train_batch_size=64 groups, ppo_mini_batch_size=16 -> 4 optimiser steps per RL step, FSDP
# parameter and optimiser offload, vLLM at gpu_memory_utilization=0.85). Both share the rest: lr 1e-6 constant, no KL,
# clip 0.2/0.2 with dual clip 3, token-mean loss, a turn budget of 4 tool calls, 20,480 response tokens, images within
# 3,136..2,000,000 pixels, bf16 compute with float32 master weights, activation checkpointing, save every 10 and
# evaluate every 20 steps, 700 steps.
_PAPER_SCALE = dict(engine="vllm", dtype="bfloat16", parallel="fsdp2", grad_checkpointing=True, group_size=8,
                    gen_batch_prompts=32, train_groups=16, lr=1e-6, max_turns=5, tool_coef=0.1, kl_coef=0.0,
                    clip_low=0.2, clip_high=0.2, dual_clip=3.0, loss_agg="token-mean", max_steps=700, save_every=10,
                    eval_every=20, micro_batch=4, micro_batch_tokens=32768, min_pixels=3136, max_pixels=2_000_000,
                    vllm_gpu_memory=0.4)
_RELEASED_SCRIPT = dict(train_groups=64, mini_batches=4, max_draws=16, offload=True, vllm_gpu_memory=0.85)

PRESETS: dict[str, dict] = {
    "tiny": dict(group_size=4, gen_batch_prompts=4, train_groups=2, max_draws=3, micro_batch=4, lr=1e-4,
                 max_turns=3, max_response_tokens=1024, max_turn_tokens=192, tool_timeout_s=10.0, save_every=5),
    # the CPU demo (make demo): RL from the cold-start checkpoint on synthetic image tasks, a few minutes on 2 cores
    "demo": dict(group_size=8, gen_batch_prompts=6, train_groups=3, max_draws=2, micro_batch=8, lr=3e-5,
                 max_turns=3, max_response_tokens=768, max_turn_tokens=160, tool_timeout_s=10.0, template_key="short",
                 max_steps=40, save_every=4, html_every=5),
    **{f"paper-{kind}": _PAPER_SCALE | dict(model=f"Agents-X/PyVision-{kind.title()}-7B-SFT")
       for kind in ("image", "video")},
    **{f"released-{kind}": _PAPER_SCALE | _RELEASED_SCRIPT | dict(model=f"Agents-X/PyVision-{kind.title()}-7B-SFT")
       for kind in ("image", "video")},
}


# the smallest value each count accepts (checked before any work; a GRPO group of one has advantage 0 everywhere)
MINIMUM = {"max_steps": 1, "group_size": 2, "gen_batch_prompts": 1, "train_groups": 1, "max_draws": 1,
           "mini_batches": 1, "micro_batch": 1, "micro_batch_tokens": 0, "logprob_chunk": 1, "max_turns": 1,
           "save_every": 1, "keep_checkpoints": 1, "eval_every": 0, "html_every": 0}
# settings a resumed run may change without changing what it computes
RUN_CONTROL = {"resume", "keep_config", "max_steps", "output_dir", "save_every", "keep_checkpoints", "eval_every",
               "eval_data", "html_every", "tensorboard", "wandb", "dist_timeout_min", "judge_url", "tool_timeout_s"}


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Preset values apply unless a flag is given; counts are checked, and a resumed run keeps its own config."""
    parser = config.add_config_flags(argparse.ArgumentParser(description="GRPO + OFR training (PyVision-RL)."),
                                     TrainConfig)
    given = config.given_flags(parser.parse_args(argv))
    cfg = TrainConfig(**(PRESETS[given.get("preset", TrainConfig.preset)] | given))
    for name, least in MINIMUM.items():
        if getattr(cfg, name) < least:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(cfg, name)}")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--output-dir {out} is a file, not a directory")
    saved = out / "config.json"
    if cfg.resume and saved.is_file():
        cfg = resumed_config(cfg, json.loads(saved.read_text()), saved)
    return cfg


def resumed_config(cfg: TrainConfig, saved: dict, path: Path) -> TrainConfig:
    """The run's own settings win over changed flags (a resumed run that silently changed its lr or batch would be
    neither the old experiment nor a new one), except those in RUN_CONTROL; each difference is named."""
    changed = {k: v for k, v in config.flag_values(cfg).items()
               if k in saved and k not in RUN_CONTROL and saved[k] != v}
    for name, value in changed.items():
        action = "keeping the run's value (--no-keep-config to change it)" if cfg.keep_config else "using the flag"
        print(f"warning: --{name.replace('_', '-')} is {value!r} but {path} says {saved[name]!r}; {action}")
    return dataclasses.replace(cfg, **{k: saved[k] for k in changed}) if cfg.keep_config else cfg


# ---------------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_min: float = 60.0, one_process_group: bool = False) -> Dist:
    """torchrun sets RANK/WORLD_SIZE: gloo on CPU, nccl on GPU. A plain `python train.py` is one process, with a 1-rank
    group when `one_process_group` (FSDP2 needs one: one process then runs the same sharded code as eight)."""
    timeout = datetime.timedelta(minutes=timeout_min)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if one_process_group and not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timeout)
    return Dist(rank, world, local, device)


def all_gather_objects(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# ---------------------------------------------------------------------------------------------------------------------
# Sampling: generation batches -> OFR
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class TrajSummary:
    """What OFR needs of a trajectory, small enough to gather from every rank."""
    group_id: int
    reward: float
    correct: bool
    end_reason: str
    num_tool_calls: int
    num_returned_images: int
    vision_consistent: bool
    sample_index: int
    rank: int
    local_index: int
    tool_bonus: float         # the reward's tool part (reward.RewardParts), for `tool_reward_gaps`
    direct: bool              # Trajectory.answered_directly: no tool call tried
    source: str               # the task's synthetic family, else its data_source: metrics per source


class PromptStream:
    """An endless, seeded, resumable stream of tasks: a fresh permutation every epoch."""

    def __init__(self, tasks: Sequence[data.Task], seed: int, epoch: int = 0, cursor: int = 0):
        self.tasks, self.seed, self.epoch, self.cursor = list(tasks), seed, epoch, cursor

    def _order(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tasks)).tolist()

    def take(self, n: int) -> list[data.Task]:
        out, order = [], self._order()
        while len(out) < n:
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            out.append(self.tasks[order[self.cursor]])
            self.cursor += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


# ---------------------------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------------------------

def collate(trajs: Sequence[Trajectory], processor: models.VLProcessor, device) -> dict:
    """Right-padded batch over whole trajectories (every image in order), plus the action mask (B, T)."""
    action, _ = processor.pad([t.action_mask for t in trajs], side="right", value=0)   # (B, T)
    return rollout.batch_inputs(trajs, processor, device, side="right") | {"action_mask": action.to(device)}


def action_logprobs(model, batch: dict, chunk: int = 2048, with_entropy: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of the model's own tokens only: (N,) for the N action targets of the batch, row-major.

    The language model runs once over the whole interleaved sequence; the LM head then runs only at the positions whose
    next token is an action, `chunk` positions at a time under activation checkpointing, so one (chunk, vocab) float32
    block of logits exists at a time instead of (B, T, vocab) (~60 GiB at 7B and 8K tokens x 4 trajectories)."""
    policy = unwrap(model)
    captured = {}
    # the final hidden states (after the last norm) are the inner model's output; the HF forward is still called
    # through `model` so DDP and FSDP2 see a forward (FSDP2 gathers the root's weights, the LM head among them)
    hook = policy.model.register_forward_hook(lambda module, args, output: captured.update(hidden=output[0]))
    try:
        model(**{k: v for k, v in batch.items() if k != "action_mask"}, logits_to_keep=1, use_cache=False)   # head: 1 position
    finally:
        hook.remove()
    at_action = batch["action_mask"][:, 1:].bool()                                  # (B, T-1): next token is an action
    hidden = captured["hidden"][:, :-1][at_action]                                  # (N, H)
    targets = batch["input_ids"][:, 1:][at_action]                                  # (N,)
    weight = policy.lm_head.weight                                                  # (V, H): under FSDP2 unsharded
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        part = (hidden[start:start + chunk], weight, targets[start:start + chunk], with_entropy)
        logp, entropy = (checkpoint(_head_logprobs, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else _head_logprobs(*part))
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)      # (N,)
    return logp, (torch.cat(entropies) if entropies and with_entropy else None)


def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """log p(target) and, when asked, the entropy at a chunk of positions. hidden: (n, H), weight: (V, H),
    targets: (n,). The entropy costs a second (n, V) softmax, so the old-log-prob pass and SFT skip it."""
    logits = F.linear(hidden, weight).float()                                       # (n, V)
    normaliser = logits.logsumexp(-1)                                               # (n,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - normaliser             # (n,)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = normaliser - (logits.softmax(-1) * logits).sum(-1)            # (n,)
    return logp, entropy


def pack_micro_batches(lengths: Sequence[int], max_count: int, token_budget: int) -> list[list[int]]:
    """Indices of each micro-batch. Without a budget: `max_count` at a time in the given order. With one: longest
    first, each micro-batch filled while (its count) x (its longest length) -- the padded size it costs -- stays within
    `token_budget` and the count within `max_count`; a trajectory longer than the budget goes alone."""
    order = list(range(len(lengths)))
    if token_budget <= 0:
        return [order[i:i + max_count] for i in range(0, len(order), max_count)]
    order.sort(key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    for i in order:
        # sorted longest first, so the pack's first member is its longest: the padded cost is count x that length
        if packs and len(packs[-1]) < max_count and (len(packs[-1]) + 1) * lengths[packs[-1][0]] <= token_budget:
            packs[-1].append(i)
        else:
            packs.append([i])
    return packs


def compute_context(cfg: TrainConfig, d: Dist):
    """Autocast to the compute dtype where FSDP2's mixed-precision policy does not already cast (one process, DDP)."""
    dtype = models.resolve_dtype(cfg.dtype)
    if dtype == torch.float32 or cfg.parallel == "fsdp2":
        return contextlib.nullcontext()
    return torch.autocast(device_type=d.device.type, dtype=dtype)


def ppo_token_loss(logp, old_logp, advantages, clip_low: float, clip_high: float, dual_clip: float):
    """Per-token PPO-clip loss with dual-clip (docs/method.md §5). logp, old_logp, advantages: (N,) or broadcastable."""
    ratio = torch.exp(logp - old_logp)                                              # (N,)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)                                        # (N,)
    if dual_clip > 0:  # a negative advantage with a huge ratio would otherwise dominate the step
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    clip_frac = (clipped > unclipped).float()                                       # (N,) where clipping bound
    return loss, clip_frac


def kl_penalty(logp, ref_logp, estimator: str):
    log_ratio = ref_logp - logp                                                     # (N,)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":  # unbiased, always >= 0 (Schulman's k3)
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


@dataclass
class UpdateStats:
    loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_frac: float = 0.0
    grad_norm: float = 0.0
    tokens: float = 0.0


def update(model, optimizer, trajs: Sequence[Trajectory], advantages: Sequence[float], cfg: TrainConfig,
           processor: models.VLProcessor, d: Dist, ref_model=None, spare: Trajectory | None = None) -> UpdateStats:
    """PPO-clip on the kept trajectories of this rank. Normalisers are global (all ranks), so the update does not
    depend on how trajectories are split over ranks or packed into micro-batches; every rank runs the same number of
    forward and backward passes (DDP and FSDP2 communicate in them), padding with zero-weight passes over `spare` (or
    its first kept trajectory) when it has fewer or none kept."""
    stats = UpdateStats()
    pairs = list(zip(trajs, advantages))
    filler = trajs[0] if trajs else spare
    chunks = [pairs[i::cfg.mini_batches] for i in range(cfg.mini_batches)]
    old = {}   # id(trajectory) -> (n_actions,) log-probs under the sampling weights
    if cfg.mini_batches > 1:  # off-policy within the step: freeze log-probs of the sampling weights first
        with torch.no_grad(), compute_context(cfg, d):
            for part, _ in lockstep(micro_batches(pairs, cfg), filler, d):
                batch = collate([t for t, _ in part], processor, d.device)
                logp, _ = action_logprobs(model, batch, cfg.logprob_chunk)
                for (t, _), own in zip(part, logp.split(batch["action_mask"][:, 1:].sum(1).tolist())):
                    old.setdefault(id(t), own)
    for chunk in chunks:
        # global normalisers: the mean over every action token (or sequence) of this mini-batch on every rank
        tokens = max(all_reduce_sum(float(sum(sum(t.action_mask) for t, _ in chunk)), d), 1.0)
        seqs = max(all_reduce_sum(float(len(chunk)), d), 1.0)
        optimizer.zero_grad(set_to_none=True)
        for part, weight in lockstep(micro_batches(chunk, cfg), filler, d):
            batch = collate([t for t, _ in part], processor, d.device)
            counts = batch["action_mask"][:, 1:].sum(1)                              # (B,) action targets per row
            rows = torch.repeat_interleave(torch.arange(len(part), device=d.device), counts)   # (N,) row of each
            adv = torch.tensor([a for _, a in part], dtype=torch.float32, device=d.device)[rows]   # (N,)
            with compute_context(cfg, d):
                logp, entropy = action_logprobs(model, batch, cfg.logprob_chunk, with_entropy=True)   # (N,), (N,)
            old_logp = torch.cat([old[id(t)] for t, _ in part]) if old else logp.detach()          # (N,)
            loss_tok, clip_frac = ppo_token_loss(logp, old_logp, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
            if ref_model is not None and cfg.kl_coef > 0:
                with torch.no_grad(), compute_context(cfg, d):
                    ref_logp, _ = action_logprobs(ref_model, batch, cfg.logprob_chunk)
                kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)                      # (N,)
                loss_tok = loss_tok + cfg.kl_coef * kl
                stats.kl += float(kl.sum()) * weight / tokens
            if cfg.loss_agg == "token-mean":
                loss = loss_tok.sum() / tokens
            elif cfg.loss_agg == "seq-mean-token-mean":
                per_seq = loss_tok.new_zeros(len(part)).index_add(0, rows, loss_tok) / counts.clamp(min=1)   # (B,)
                loss = per_seq.sum() / seqs
            else:
                raise ValueError(f"unknown loss_agg {cfg.loss_agg!r}")
            # DDP and FSDP2 average gradients over ranks; scaling by world turns that average into the global sum
            (loss * weight * d.world).backward()
            stats.loss += loss.item() * weight
            stats.entropy += float(entropy.sum()) * weight / tokens
            stats.clip_frac += float(clip_frac.sum()) * weight / tokens
            stats.tokens += float(counts.sum()) * weight
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        stats.grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP2: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)   # no gradients held through the rollouts that follow (3.5 GiB at 7B)
    for name in ("loss", "kl", "entropy", "clip_frac"):
        setattr(stats, name, all_reduce_sum(getattr(stats, name), d) / cfg.mini_batches)
    stats.tokens = all_reduce_sum(stats.tokens, d)
    return stats


def micro_batches(pairs: Sequence[tuple[Trajectory, float]], cfg: TrainConfig) -> list[list[tuple[Trajectory, float]]]:
    packs = pack_micro_batches([len(t.input_ids) for t, _ in pairs], cfg.micro_batch, cfg.micro_batch_tokens)
    return [[pairs[i] for i in pack] for pack in packs]


def lockstep(micro: list, filler: Trajectory, d: Dist):
    """(micro-batch, weight) for as many passes as the busiest rank runs: ranks with fewer repeat a real trajectory
    with weight 0, so the collectives inside every forward and backward line up."""
    for m in range(max(all_gather_objects(len(micro), d))):
        yield (micro[m], 1.0) if m < len(micro) else ([(filler, 0.0)], 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic directories, newest wins
# ---------------------------------------------------------------------------------------------------------------------

def export_model(model, processor, path: Path, dtype: str, d: Dist) -> None:
    """Write the final Hugging Face directory (what eval.py and vLLM load) in `dtype`, gathered to rank 0's CPU and
    written whole or not at all (models.atomic_dir); every rank calls this (the gather is a collective). Tied weights
    (Qwen's lm_head = embeddings) come back from the gather as two copies; the tied one is left out, as from_pretrained
    ties it again."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        policy, torch_dtype = unwrap(model), models.resolve_dtype(dtype)
        tied = getattr(policy, "all_tied_weights_keys", None) or {}
        state = {k: v.to(torch_dtype) for k, v in state.items() if k not in tied}
        with models.atomic_dir(path, replace=True) as tmp:
            policy.save_pretrained(tmp, state_dict=state)
            config = json.loads((tmp / "config.json").read_text())   # it names the master weights' dtype: say ours
            config["dtype"] = str(torch_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            processor.save_pretrained(tmp)


def save_checkpoint(out: Path, step: int, model, optimizer, stream: PromptStream, extra: dict, d: Dist,
                    keep: int) -> None:
    """Write ckpt/step_N atomically: each rank writes its own shard of the float32 master weights and AdamW state
    (torch.distributed.checkpoint, no gather), rank 0 the RNG states and the stream position, all into a temp dir that
    is renamed only when every rank has finished. Multi-node runs need OUTPUT_DIR on a shared file system."""
    final, tmp = out / "ckpt" / f"step_{step:06d}", out / "ckpt" / f".tmp_step_{step:06d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_state, optimizer_state = get_state_dict(model, optimizer)     # this rank's shards (DDP: full copies)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / "shards",
             no_dist=not dist.is_initialized())
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    rngs = all_gather_objects(rng, d)           # each rank's RNG state, so resumed ranks continue exactly
    if d.main:
        torch.save({"rng": rngs}, tmp / "rng.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "stream": stream.state(), **extra}))
        shutil.rmtree(final, ignore_errors=True)   # a step re-run after a resume from an older checkpoint
        os.replace(tmp, final)
        for old in sorted((out / "ckpt").glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    barrier(d)


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> dict:
    """Read this rank's shards of a checkpoint into the (wrapped) model and optimiser in place, and its RNG state;
    returns the checkpoint's meta. Resharding is torch.distributed.checkpoint's: any layout can resume any other."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path / "shards", no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rngs = torch.load(path / "rng.pt", weights_only=False)["rng"]
    rng = rngs[d.rank % len(rngs)]
    random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
    return json.loads((path / "meta.json").read_text())


def resume(out: Path, model, optimizer, d: Dist) -> dict | None:
    """Load the newest readable checkpoint; one that fails to load is named with its error and the previous one is
    tried (all ranks fail together: the sharded load is a collective). None when there is none."""
    found = checkpoints(out)
    for k, path in enumerate(found):
        try:
            return load_checkpoint(path, model, optimizer, d)
        except (Exception, CheckpointException) as error:   # torn or corrupt files: the older checkpoint is whole
            reason = f"{type(error).__name__}: {' '.join(str(error).split())[-300:]}"
            if k + 1 == len(found):  # the weights may be half overwritten by now: never train on from them
                raise SystemExit(f"no checkpoint in {out / 'ckpt'} can be loaded; the last tried, {path}: "
                                 f"{reason}") from error
            if d.main:
                print(f"warning: checkpoint {path} cannot be loaded ({reason}); falling back to {found[k + 1].name}")
    return None


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, newest first (a half-written one is still a .tmp_ directory and never listed)."""
    return sorted((out / "ckpt").glob("step_*"), reverse=True)


def barrier(d: Dist) -> None:
    if dist.is_initialized() and d.world > 1:
        dist.barrier()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def wrap_model(model, cfg: TrainConfig, d: Dist):
    """Share the policy over the ranks: DDP keeps a full copy per rank; FSDP2 shards every transformer block of the
    language model and of the vision tower as one unit, and the rest (embeddings, head, merger) with the root, so a
    block's weights are gathered only while it runs. With a bfloat16 compute dtype FSDP2 gathers bfloat16 copies of the
    float32 shards and reduces gradients in float32 (one process and DDP autocast instead: `compute_context`).
    Activation checkpointing is switched on first, so the weight names stay those of the checkpoint."""
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.train_vision:   # HF also makes the frozen vision tower's input require grad: its whole backward
            model.disable_input_require_grads()   # would run for nothing (non-reentrant checkpointing needs no hook)
    if cfg.parallel == "fsdp2":
        shard = dict(mp_policy=MixedPrecisionPolicy(param_dtype=models.resolve_dtype(cfg.dtype),
                                                    reduce_dtype=torch.float32),
                     offload_policy=(CPUOffloadPolicy(pin_memory=torch.cuda.is_available())   # pinning needs a GPU
                                     if cfg.offload else OffloadPolicy()))
        for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
            fully_shard(block, **shard)
        return fully_shard(model, **shard)
    if cfg.offload:
        raise SystemExit("--offload needs --parallel fsdp2")
    if cfg.parallel != "ddp":
        raise ValueError(f"unknown --parallel {cfg.parallel!r}; choose ddp or fsdp2")
    return torch.nn.parallel.DistributedDataParallel(model) if d.world > 1 else model


def full_weights(model):
    """(name, unsharded float32 tensor) for every weight, one at a time, for the rollout engine (which casts each to
    its own dtype); under FSDP2 each one is all-gathered, so every rank walks this in the same order."""
    for name, tensor in unwrap(model).state_dict().items():
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


# ---------------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl always; TensorBoard and W&B when asked for. Rank 0 only."""

    def __init__(self, out: Path, cfg: TrainConfig, enabled: bool, resumed_at: int | None = None):
        self.enabled, self.path = enabled, out / "metrics.jsonl"
        self.rows = self._read(resumed_at) if resumed_at is not None and self.path.is_file() else []
        if enabled and resumed_at is not None:   # steps after the checkpoint run again: their old rows go
            self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        self.tb = self.wandb = None
        if enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))
        if enabled and cfg.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb, config=config.flag_values(cfg), dir=str(out))

    def _read(self, through_step: int) -> list[dict]:
        """The rows up to `through_step`; a torn line (a full disk, a kill mid-write) ends the readable part."""
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row["step"] <= through_step:
                rows.append(row)
        return rows

    def has(self, step: int, key: str) -> bool:
        return any(row["step"] == step and key in row for row in self.rows)

    def write(self, step: int, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.rows.append({"step": step, **clean})
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)


def tool_reward_gaps(batch: Sequence[TrajSummary]) -> list[tuple[float, float]]:
    """RL's pressure on tool use, one entry per group holding both trajectories that tried the tool (a failed call
    included) and ones that answered at once: (their mean reward minus the others', the part of that difference the tool
    bonus makes).
    Within a group the advantages are the rewards less one baseline, so a positive gap pushes tool use up and a
    negative one down; interaction collapse is RL under a negative gap (docs/method.md §4.2, §10.1). Groups with an
    unknown (masked) reward are left out."""
    gaps = []
    for positions in ofr.group_members([s.group_id for s in batch]).values():
        members = [batch[p] for p in positions]
        tool = [s for s in members if not s.direct]
        direct = [s for s in members if s.direct]
        if tool and direct and all(math.isfinite(s.reward) for s in members):
            gaps.append((float(np.mean([s.reward for s in tool]) - np.mean([s.reward for s in direct])),
                         float(np.mean([s.tool_bonus for s in tool]) - np.mean([s.tool_bonus for s in direct]))))
    return gaps


def tool_push(name: str, trajs: Sequence[TrajSummary], advantages: Sequence[float]) -> dict:
    """`tool/push_NAME`: the mean over trajectories of the advantage of those that tried the tool (0 for the others;
    unknown advantages left out), also per task source. Advantages sum to 0 within a group, so this is the update's
    first-order push on calling the tool at all: > 0 raises it, < 0 lowers it. Over the drawn groups (advantage =
    reward less the group mean) it says what the rewards ask for; over the kept ones, what the update does after OFR's
    std ranking chose which groups to train on."""
    terms = [(t.source, float(a) * (not t.direct)) for t, a in zip(trajs, advantages) if math.isfinite(a)]
    out = {f"tool/push_{name}": float(np.mean([v for _, v in terms])) if terms else math.nan}
    for source in sorted({source for source, _ in terms}):
        out[f"tool/push_{name}/{source}"] = float(np.mean([v for s, v in terms if s == source]))
    return out


def drawn_advantages(batch: Sequence[TrajSummary]) -> list[float]:
    """Reward less its group's mean reward (nan for a group with a masked reward), in batch order."""
    advantages = [math.nan] * len(batch)
    for positions in ofr.group_members([s.group_id for s in batch]).values():
        mean = float(np.mean([batch[p].reward for p in positions]))
        for p in positions:
            advantages[p] = batch[p].reward - mean
    return advantages


def rollout_metrics(trajs: Sequence[TrajSummary], local: Sequence[Trajectory], processor: models.VLProcessor) -> dict:
    """Batch statistics over every drawn trajectory (all ranks) plus length statistics of this rank's. Tool calls and
    accuracy also per task source (family, data source): a mixture's mean can hide tool use falling on the tasks that
    can be answered without it while it rises on the others."""
    calls = np.array([t.num_tool_calls for t in trajs], dtype=float)
    rewards = np.array([t.reward for t in trajs], dtype=float)
    ends = [t.end_reason for t in trajs]
    out = {"reward/mean": float(np.nanmean(rewards)), "acc/mean": float(np.mean([t.correct for t in trajs])),
           "tool/calls_mean": float(calls.mean()), "tool/calls_max": float(calls.max()),
           "tool/zero_ratio": float((calls == 0).mean())}
    out |= {f"end/{r}": ends.count(r) / len(ends) for r in sorted(ofr.END_REASONS)}   # every step: a time series
    out["tool/direct_frac"] = float(np.mean([t.direct for t in trajs]))
    for source in sorted({t.source for t in trajs}):
        mine = [t for t in trajs if t.source == source]
        out[f"tool/calls_mean/{source}"] = float(np.mean([t.num_tool_calls for t in mine]))
        out[f"tool/direct_frac/{source}"] = float(np.mean([t.direct for t in mine]))
        out[f"acc/mean/{source}"] = float(np.mean([t.correct for t in mine]))
    if local:
        parts = [t.reward_parts for t in local if t.reward_parts is not None]
        out |= reward.reward_stats(parts)
        out["rollout/turns_mean"] = float(np.mean([len(t.turns) for t in local]))
        out["rollout/response_len_mean"] = float(np.mean([sum(t.action_mask) for t in local]))
        out["rollout/obs_len_mean"] = float(np.mean([t.response_len - sum(t.action_mask) for t in local]))
        out["rollout/visual_tokens_mean"] = float(np.mean([t.visual_tokens(processor) for t in local]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------------

def prepare_inputs(cfg: TrainConfig, out: Path, d: Dist) -> tuple[str, list[data.Task]]:
    """Resolve the model path and the tasks, checking both before any work. Only the tiny preset with an empty flag
    makes its own (a tiny model, synthetic tasks), and only under OUTPUT_DIR: a mistyped path is an error, never a
    reason to write into someone else's directory."""
    model_path, data_path = cfg.model, cfg.data
    if cfg.preset == "tiny":
        model_path = model_path or str(out / "model")
        data_path = data_path or str(out / "data" / "tasks.json")
        if d.main and not cfg.model and not Path(model_path, "config.json").exists():
            tiny.build_tiny(model_path, seed=cfg.seed, size="test")
        if d.main and not cfg.data and not Path(data_path).exists():
            data.generate_image_tasks(64, seed=cfg.seed + 1000, out_dir=Path(data_path).parent)
        barrier(d)
    if not model_path or not data_path:
        raise SystemExit("--model and --data are required outside the tiny preset")
    # a local path must be a model directory; anything else that does not exist is taken for a hub name
    if Path(model_path).exists() and not Path(model_path, "config.json").is_file():
        raise SystemExit(f"--model {model_path}: not a model directory (no config.json); a training checkpoint "
                         "(ckpt/step_N) is resumed with --resume, the final model is OUTPUT_DIR/final")
    if not Path(data_path).is_file():
        raise SystemExit(f"--data {data_path}: no such file")
    tasks, _ = data.load_readable_tasks(data_path, out)
    return model_path, tasks


@dataclass
class Run:
    """Everything the loop works with, built once by `setup` (fresh or from a checkpoint)."""
    model: torch.nn.Module                 # the policy (unwrapped)
    train_model: torch.nn.Module           # the same, DDP-wrapped or FSDP2-sharded when world > 1
    ref_model: torch.nn.Module | None      # only when kl_coef > 0
    processor: models.VLProcessor
    optimizer: torch.optim.Optimizer
    engine: rollout.Engine
    engine_has_own_weights: bool           # vLLM, or the HF engine's replica under FSDP2: sync after every update
    stream: PromptStream
    start_step: int
    extra: dict                            # carried across resumes: the first step's tool calls (collapse alarm)
    rollout_cfg: rollout.RolloutConfig
    ofr_cfg: ofr.OFRConfig
    judge: reward.Judge | None             # judged data sources only


def setup(cfg: TrainConfig, d: Dist, out: Path) -> Run:
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + d.rank)
    model_path, tasks = prepare_inputs(cfg, out, d)
    judge = cfg.make_judge()
    reward.check_routable(((t.data_source, t.ability) for t in tasks), judge)   # fail now, not mid-step
    # the master weights are float32 whatever the compute dtype: at lr 1e-6 almost every AdamW update of a bfloat16
    # weight would round away. The image bounds set here are the ones rollouts (vLLM included) and evaluation use.
    model, processor = models.load_policy(model_path, dtype="float32", device=str(d.device),
                                          min_pixels=cfg.min_pixels or None, max_pixels=cfg.max_pixels or None)
    if not cfg.train_vision:
        model.model.visual.requires_grad_(False)   # the paper freezes the vision tower
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = models.load_policy(model_path, dtype=cfg.dtype, device=str(d.device))[0].eval()
    # a sharded policy cannot run `generate` rank by rank (its all-gathers would have to line up), so under FSDP2 the
    # HF engine gets a full replica in the compute dtype, refreshed after every update like vLLM's copy
    engine_has_own_weights = cfg.engine == "vllm" or (cfg.engine == "hf" and cfg.parallel == "fsdp2")
    replica = None
    if engine_has_own_weights and cfg.engine == "hf":
        replica = copy.deepcopy(model).to(models.resolve_dtype(cfg.dtype)).eval()
    train_model = wrap_model(model, cfg, d)     # before the optimiser: FSDP2 replaces the parameters by shards
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    stream, start_step, extra, meta = PromptStream(tasks, cfg.seed), 0, {"first_tool_calls": None}, None
    if cfg.resume:
        meta = resume(out, train_model, optimizer, d)
    if meta:
        stream = PromptStream(tasks, cfg.seed, **meta["stream"])
        start_step, extra = meta["step"], {"first_tool_calls": meta.get("first_tool_calls")}
    # an engine with its own weights (vLLM, the replica) starts from MODEL: on a resume it gets the resumed ones now
    engine = make_train_engine(cfg, model if replica is None else replica, processor, model_path, d.rank)
    if meta and engine_has_own_weights:
        engine.sync_weights(full_weights(train_model))
    rollout_cfg, ofr_cfg = config.derive(rollout.RolloutConfig, cfg), config.derive(ofr.OFRConfig, cfg)
    return Run(model, train_model, ref_model, processor, optimizer, engine, engine_has_own_weights, stream, start_step,
               extra, rollout_cfg, ofr_cfg, judge)


def oversample_filter_rank(draw, config: ofr.OFRConfig) -> ofr.OFRResult:
    """OFR (docs/method.md §6): draw generation batches (`draw()`: roll out, score, gather) until enough groups survive
    the filters, at most `max_draws` of them; then rank the survivors by group reward std and keep the top groups."""
    screened = []
    for draw_index in range(config.max_draws):
        screened.append(ofr.screen(draw(), draw_index, config))   # zero-variance groups, broken trajectories out
        if ofr.enough(screened, config):
            break
    return ofr.rank_and_cut(screened, config)


class GroupSampler:
    """One step's generation batches: `draw()` rolls out this rank's share of the prompts, scores them, and gathers
    every rank's summaries (in an order that does not depend on the number of ranks) for OFR."""

    def __init__(self, cfg: TrainConfig, d: Dist, run: Run, sandboxes):
        self.cfg, self.d, self.run, self.sandboxes = cfg, d, run, sandboxes
        self.local: list[Trajectory] = []        # this rank's trajectories, all draws
        self.summaries: list[TrajSummary] = []   # every rank's, all draws
        self.gaps: list[tuple[float, float]] = []   # tool_reward_gaps of every draw
        self.advantages: list[float] = []           # every draw's rewards less their group's mean, as summaries
        self.seconds = 0.0

    def draw(self) -> list[TrajSummary]:
        t0, cfg, d, run = time.perf_counter(), self.cfg, self.d, self.run
        prompts = run.stream.take(cfg.gen_batch_prompts)           # identical on every rank
        mine = list(range(d.rank, len(prompts), d.world))          # this rank's share of the groups
        trajs = rollout.rollout([prompts[g] for g in mine], run.engine, run.processor, self.sandboxes.open,
                                run.rollout_cfg, n=cfg.group_size)
        for t in trajs:                                              # group id = the prompt's place in the batch
            t.group_id = mine[t.group_id]
        rollout.score_trajectories(trajs, run.processor, cfg.tool_coef, judge=run.judge)
        local = [TrajSummary(t.group_id, t.reward, t.correct, t.end_reason, t.num_tool_calls, t.num_returned_images,
                             t.vision_consistent, t.sample_index, d.rank, len(self.local) + k, t.reward_parts.tool_bonus,
                             t.answered_directly, t.task.family or t.task.data_source)
                 for k, t in enumerate(trajs)]
        self.local.extend(trajs)
        # OFR keeps arrival order among equal stds: sort so that N ranks and one rank see the same batch
        batch = sorted((s for part in all_gather_objects(local, d) for s in part), key=lambda s: (s.group_id, s.sample_index))
        self.summaries.extend(batch)
        self.gaps += tool_reward_gaps(batch)
        self.advantages += drawn_advantages(batch)
        self.seconds += time.perf_counter() - t0
        return batch

    def kept_here(self, result: ofr.OFRResult) -> list[tuple[Trajectory, float]]:
        return [(self.local[s.local_index], float(a)) for s, a in zip(result.trajectories, result.advantages)
                if s.rank == self.d.rank]

    def viewer_groups(self, result: ofr.OFRResult, groups: int) -> tuple[list[Trajectory], dict, set]:
        """This rank's first `groups` groups of the step's first generation batch, with the advantage of each kept
        trajectory and the set kept, keyed by (group_id, sample_index) as write_html takes them."""
        shown = self.local[:groups * self.cfg.group_size]
        kept = {id(t): a for t, a in self.kept_here(result)}
        advantages = {(t.group_id, t.sample_index): kept[id(t)] for t in shown if id(t) in kept}
        return shown, advantages, set(advantages)


def step_metrics(sampler: GroupSampler, result: ofr.OFRResult, upd: UpdateStats, seconds: dict) -> dict:
    metrics = rollout_metrics(sampler.summaries, sampler.local, sampler.run.processor) | result.stats.as_log()
    metrics["adv/neg_correct_frac"] = result.stats.negative_correct_frac_kept   # the paper's Fig. 6 metric
    gaps = np.array(sampler.gaps, dtype=float).reshape(-1, 2)                  # (mixed groups, 2)
    metrics["tool/reward_gap"], metrics["tool/reward_gap_bonus"] = gaps.mean(0) if len(gaps) else (math.nan, math.nan)
    metrics["tool/mixed_groups"] = float(len(gaps))
    metrics |= tool_push("drawn", sampler.summaries, sampler.advantages)
    metrics |= tool_push("kept", result.trajectories, result.advantages)
    metrics |= {"loss/policy": upd.loss, "loss/kl": upd.kl, "loss/entropy": upd.entropy, "loss/clip_frac": upd.clip_frac,
                "grad/norm": upd.grad_norm, "train/tokens": upd.tokens, "perf/rollout_s": sampler.seconds,
                "perf/tool_s": sum(turn.tool_s for t in sampler.local for turn in t.turns)}
    return metrics | {f"perf/{k}_s": v for k, v in seconds.items()}


def collapse_alarm(metrics: dict, run: Run, cfg: TrainConfig) -> bool:
    """Interaction collapse: tool calls per trajectory fell `collapse_alarm` below the first step's level."""
    if run.extra["first_tool_calls"] is None:
        run.extra["first_tool_calls"] = metrics["tool/calls_mean"]
    floor = run.extra["first_tool_calls"] * (1 - cfg.collapse_alarm)
    metrics["alarm/collapse"] = float(metrics["tool/calls_mean"] < floor)
    return bool(metrics["alarm/collapse"])


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(argv)
    d = init_distributed(cfg.dist_timeout_min, one_process_group=cfg.parallel == "fsdp2")
    if d.device.type == "cpu":
        models.set_cpu_threads()
    out = Path(cfg.output_dir)
    if not cfg.resume and ((out / "metrics.jsonl").exists() or checkpoints(out)):
        raise SystemExit(f"--output-dir {out} holds a run already: --resume continues it, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    if d.main:
        (out / "config.json").write_text(json.dumps(config.flag_values(cfg), indent=1))
    run = setup(cfg, d, out)
    log = MetricsLog(out, cfg, d.main, resumed_at=run.start_step if cfg.resume else None)
    with SandboxPool(timeout=cfg.tool_timeout_s) as sandboxes:
        # an evaluation due at the resumed checkpoint that a stop interrupted runs now
        if eval_due(cfg, run.start_step) and not all_gather_objects(log.has(run.start_step, "eval/accuracy"), d)[0]:
            periodic_eval(cfg, run, out, run.start_step, log, d)
        for step in tqdm(range(run.start_step, cfg.max_steps), initial=run.start_step, total=cfg.max_steps,
                         disable=not d.main, desc="RL steps"):
            t_step = time.perf_counter()
            # 1) oversample -> roll out -> score; OFR filters and ranks over every rank's trajectories
            run.model.eval()
            sampler = GroupSampler(cfg, d, run, sandboxes)
            result = oversample_filter_rank(sampler.draw, run.ofr_cfg)
            kept = sampler.kept_here(result)

            # 2) policy update on the kept trajectories (a colocated vLLM frees its GPU memory meanwhile)
            if hasattr(run.engine, "sleep"):
                run.engine.sleep()
            run.model.train()
            t0 = time.perf_counter()
            upd = UpdateStats()
            if result.trajectories:
                upd = update(run.train_model, run.optimizer, [t for t, _ in kept], [a for _, a in kept], cfg,
                             run.processor, d, run.ref_model, spare=sampler.local[0])
            elif d.main and not run.extra.get("told_why_nothing_survived"):   # skipped update: say why, once
                run.extra["told_why_nothing_survived"] = True
                tqdm.write(nothing_survived_note(result.stats, cfg))
            update_s = time.perf_counter() - t0

            # 3) new weights to the rollout engine (vLLM wakes up inside: cache freed, weights, sync, KV cache)
            t0 = time.perf_counter()
            if run.engine_has_own_weights:
                run.engine.sync_weights(full_weights(run.train_model))
            sync_s = time.perf_counter() - t0

            # 4) log: reward parts, tool use, OFR, loss, timings; alarm on interaction collapse; a few trajectories
            metrics = step_metrics(sampler, result, upd, {"update": update_s, "sync": sync_s,
                                                          "step": time.perf_counter() - t_step})
            if collapse_alarm(metrics, run, cfg) and d.main:
                tqdm.write(f"step {step + 1}: interaction collapse alarm: {metrics['tool/calls_mean']:.2f} tool "
                           f"calls/trajectory, {run.extra['first_tool_calls']:.2f} at the start")
            log.write(step + 1, metrics)
            if d.main and cfg.html_every and (step + 1) % cfg.html_every == 0:
                shown, advantages, kept_keys = sampler.viewer_groups(result, groups=2)
                rollout.write_html(shown, out / "html" / f"step_{step + 1:06d}.html", f"RL step {step + 1}",
                                   advantages=advantages, kept=kept_keys)

            # 5) checkpoint and evaluate
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                save_checkpoint(out, step + 1, run.train_model, run.optimizer, run.stream, run.extra, d,
                                cfg.keep_checkpoints)
            if eval_due(cfg, step + 1):
                periodic_eval(cfg, run, out, step + 1, log, d)

    export_model(run.train_model, run.processor, out / "final", cfg.dtype, d)
    if dist.is_initialized():
        # rank 0 may still be writing the export: a rank that tears its gloo pairs down while a peer is busy can abort
        # at exit ("terminate called without an active exception", seen once in CI), so the ranks leave together
        barrier(d)
        dist.destroy_process_group()


def eval_due(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.eval_every and cfg.eval_data and step and step % cfg.eval_every == 0)


def nothing_survived_note(stats: ofr.OFRStats, cfg: TrainConfig) -> str:
    """Why a step trained on nothing, in words: almost always every group had equal rewards."""
    note = (f"nothing survived OFR in {stats.draws} generation batches (removed: {stats.removed}), so this update "
            "is skipped. A group teaches GRPO only when its rewards differ; ")
    if cfg.preset == "tiny" and not cfg.model and cfg.engine != "scripted":
        return note + ("the tiny preset's model has random weights and never answers right. For a one-minute run "
                       "that learns: python train.py --preset tiny --engine scripted --max-steps 5 --output-dir "
                       "runs/tiny-rl (README: Quickstart), or start from a cold start (make demo).")
    return note + "check that the policy sometimes answers right (acc/mean) and not always (too easy tasks)."


def make_train_engine(cfg: TrainConfig, model, processor, model_path: str, rank: int = 0):
    if cfg.engine == "hf":
        return rollout.make_engine("hf", model, processor, temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.engine == "scripted":   # for checks: half of its first attempts fail, so groups have reward variance
        return rollout.make_engine("scripted", processor=processor, seed=cfg.seed, recover_rate=0.5)
    return rollout.make_engine("vllm", processor=processor, model_path=model_path, temperature=cfg.temperature,
                               top_p=cfg.top_p, gpu_memory_utilization=cfg.vllm_gpu_memory,
                               enforce_eager=cfg.vllm_eager, seed=cfg.seed + rank)   # each rank samples its own


def periodic_eval(cfg: TrainConfig, run: Run, out: Path, step: int, log: MetricsLog, d: Dist) -> None:
    """Greedy evaluation spread over the ranks: each evaluates every world-th task with its rollout engine's own weights
    when it has them (vLLM, or the replica under FSDP2, where the sharded policy cannot run alone), else with the
    policy itself; rank 0 gathers the samples and writes the report. (Rank 0 alone would leave the others waiting in a
    collective for the whole evaluation.)"""
    tasks, _ = data.load_tasks(cfg.eval_data)
    if run.engine_has_own_weights:
        engine = copy.copy(run.engine)
        engine.temperature = 0.0
    else:
        engine = rollout.make_engine("hf", run.model, run.processor, temperature=0.0)
    eval_cfg = config.derive(evaluation.EvalConfig, cfg, temperature=0.0)   # the run's protocol, judge and bounds
    report_dir = out / "eval" / f"step_{step:06d}"
    part_dir = report_dir / f"rank_{d.rank}" if d.world > 1 else report_dir
    results = evaluation.evaluate(tasks[d.rank::d.world], engine, run.processor, eval_cfg, part_dir)
    if d.world > 1:
        samples = [s for part in all_gather_objects(results["samples"], d) for s in part]
        results = evaluation.summarize([evaluation.SampleRecord(**s) for s in samples], eval_cfg.samples)
        if d.main:
            reports.write_reports(results | {"config": dataclasses.asdict(eval_cfg)}, report_dir, [],
                                  title=f"step {step}, {d.world} ranks")
    log.write(step, {f"eval/{k}": v for k, v in results["summary"].items() if isinstance(v, (int, float))})


if __name__ == "__main__":
    main()

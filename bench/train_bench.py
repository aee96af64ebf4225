"""bench/train_bench.py — GRPO update step time and peak memory: our `train.update` against TRL's `GRPOTrainer` on the
same single-turn update, plus our full RL step split into rollout and update (issue: train.py; docs/method.md §5, §12).

The workload (identical for both frameworks)
    8 synthetic image tasks x 8 samples = 64 single-turn sequences with one image each, on the tiny "test" and "demo"
    models (tiny.build_tiny). Prompt = the rollout's first user turn (rollout.start_trajectory, template "short";
    200-370 tokens depending on the tokenizer, 54-64 of them image tokens). Completion = fixed token ids closed with
    <|im_end|>: even samples the scripted expert's code action (75-150 tokens), odd samples a direct <answer> (13-20).
    Reward = 1 for the direct answer, else 0, so every group has advantages +-0.5 (mean-centred, no std division: the
    paper's setting). One optimiser step over all 64 sequences, 8 per forward/backward, fp32, AdamW lr 1e-6 with weight
    decay 0.01, grad clip 1.0, PPO clip 0.2, no KL, vision tower frozen (the paper's setting) on both sides.

What is timed (median over the timed steps of every round; `--warmup` untimed steps first in each process)
    ours        one call of train.update(): collate, forward with token log-probs and entropy, PPO loss and backward for
                8 micro-batches of 8 (micro_batch=8), clip, AdamW step.
    TRL         one optimiser step of GRPOTrainer.train(), callback on_step_begin -> on_step_end, minus the time spent in
                its `_generate` (prompt tokenisation with the first processor pass, and generation, which here returns
                the fixed completions: FixedCompletionsGRPO). What remains is what TRL does from generated ids to new
                weights: the second processor pass over the images, padding, rewards and advantages, 8 x training_step
                (gradient checkpointing, its chunked fused LM head with entropy, backward), clip, AdamW and LR scheduler.
                Also shown, not compared: TRL's whole loop iteration (on_step_end to on_step_end), which adds its data
                loader (it decodes gradient_accumulation_steps x 64 dataset rows per optimiser step and generates from
                the first 64) and `_generate`.
    ours full   one RL step as train.py runs it, single turn: rollout (HF generate, `--gen-tokens` new tokens for each of
                the 64 sequences) with scoring, then the update, timed separately.
    Memory      every (size, framework) runs in its own subprocess, back to back, the rounds alternating which framework
                goes first. At the start of every step the process resets its RSS high-water mark (/proc/self/clear_refs).
                "peak RSS" is the highest RSS inside a timed step; "step +RSS" is that peak minus the RSS at the start of
                the first (warm-up) step, i.e. what the steps add to the loaded model and data: activations, gradients,
                AdamW state, allocator caches. The absolute peak also counts imports (TRL's bring datasets, pyarrow,
                pandas and accelerate) and the data each side holds (TRL: the rows its data loader decoded).

TRL settings
    TRL 1.16's defaults, except what must match: loss_type "dapo" (the default: token sum over the active tokens of the
    whole optimiser step = our token-mean), beta 0 (the default: no reference model), epsilon 0.2, gradient
    checkpointing on, num_generations 8, per_device_train_batch_size 8, linear LR decay and shuffling of the generation
    batch, all defaults. Changed to match ours: gradient_accumulation_steps 8 (64 sequences per optimiser step), bf16
    False (TRL defaults to bf16 autocast; both run fp32 here), weight_decay 0.01, scale_rewards "none"; and, to keep I/O
    out of the loop, report_to "none", save_strategy "no". The processing class is the official Qwen2_5_VLProcessor minus
    its torchvision-only video check (as in tests/test_models.py), padding on the left as TRL's own loading sets it.
    The bench checks that TRL's prompt ids equal ours token for token. Left different: our dual-clip (inactive here:
    on-policy, ratio 1), and padding: TRL pads every micro-batch to the longest prompt + longest completion of the
    64-sequence batch, ours pads each micro-batch to its own longest sequence.

How to run
    python bench/train_bench.py                                      # both sizes, ours and TRL, 2 rounds (~6 min)
    python bench/train_bench.py --sizes test --rounds 1 --steps 2    # quick
    python bench/train_bench.py --threads 1                          # on a machine other jobs share
TRL is not a project dependency: `pip install 'trl==1.16.*'` (not trl[vlm], which pulls torchvision). Without it the
bench prints our figures only and its last line says that TRL is not installed instead of giving the ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import tiny  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

GROUPS, GROUP_SIZE, MICRO_BATCH = 8, 8, 8      # 64 sequences per optimiser step, 8 per forward/backward
LR, WEIGHT_DECAY = 1e-6, 0.01
PROMPTS = rollout.RolloutConfig(template_key="short")
RESULT_TAG = "RESULT "


# ---------------------------------------------------------------------------------------------------------------------
# Memory: the RSS high-water mark over one step
# ---------------------------------------------------------------------------------------------------------------------

def _status_kb(name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class StepMemory:
    """Peak RSS of each step, and the loaded state it is compared with. `start()` resets the high-water mark to the
    current RSS (Linux: writing 5 to /proc/self/clear_refs); the RSS at the first start is the loaded state (model,
    data, no optimiser state yet); `stop()` records the peak since the last start. Without /proc the peak is the
    process-lifetime ru_maxrss and `exact` turns False."""
    peaks_kb: list[int] = field(default_factory=list)
    loaded_kb: int | None = None
    exact: bool = True

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        if self.loaded_kb is None:
            self.loaded_kb = _status_kb("VmRSS") or 0

    def stop(self) -> None:
        self.peaks_kb.append(_status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)   # both kB

    def summary(self, skip: int) -> dict:
        """The highest timed step (the first `skip` steps are warm-up) and how far it rose above the loaded state."""
        peak = max(self.peaks_kb[skip:])
        return {"peak_kb": peak, "increment_kb": peak - self.loaded_kb, "exact_memory": self.exact}


# ---------------------------------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------------------------------

def completion_texts(task: data.Task) -> list[str]:
    """Half the group runs code (the scripted expert's first action), half answers directly."""
    code = f"Let me inspect the image with code.\n<code>\n```python\n{task.solution_code}\n```\n</code>"
    answer = f"<answer>\n\\boxed{{{task.answer}}}\n</answer>"
    return [code if k % 2 == 0 else answer for k in range(GROUP_SIZE)]


def reward_of(text: str) -> float:
    """Single turn: the code never runs, so only a direct answer can score."""
    return 1.0 if "<answer>" in text else 0.0


def group_key(prompt_ids, image: Image.Image) -> tuple:
    """Prompt ids alone do not name a group: two tasks of one family can share their question and image size."""
    return tuple(int(i) for i in prompt_ids), hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


@dataclass
class Workload:
    model: torch.nn.Module
    processor: models.VLProcessor
    tasks: list[data.Task]
    trajectories: list[rollout.Trajectory]       # GROUPS x GROUP_SIZE, group-major
    advantages: list[float]
    completions: dict[tuple, list[list[int]]]     # group_key -> the group's completion ids, in sample order


def build_workload(model_dir: Path, tasks_file: Path) -> Workload:
    """The first GROUPS tasks of `tasks_file` (synthetic image tasks, which carry their solution code) x GROUP_SIZE."""
    model, processor = models.load_policy(model_dir, dtype="float32")
    model.model.visual.requires_grad_(False)   # the paper freezes the vision tower; frozen for both frameworks
    tasks = data.load_tasks(tasks_file)[0][:GROUPS]
    if len(tasks) < GROUPS or any(t.image_path is None or t.solution_code is None for t in tasks):
        raise ValueError(f"{tasks_file}: the bench needs {GROUPS} synthetic image tasks (with solution code)")
    trajectories, advantages, completions = [], [], {}
    for g, task in enumerate(tasks):
        texts = completion_texts(task)
        rewards = [reward_of(t) for t in texts]
        baseline = sum(rewards) / len(rewards)
        group = []
        for k, text in enumerate(texts):
            traj = rollout.start_trajectory(task, g, k, processor, PROMPTS)
            ids = processor.encode_text(text) + [processor.eos_id]
            traj.input_ids += ids
            traj.action_mask += [1] * len(ids)           # the whole completion is the model's action
            trajectories.append(traj)
            advantages.append(rewards[k] - baseline)
            group.append(ids)
        first = trajectories[-1]
        completions[group_key(first.input_ids[:first.prompt_len], first.images[0])] = group
    return Workload(model, processor, tasks, trajectories, advantages, completions)


# ---------------------------------------------------------------------------------------------------------------------
# Workers: one (size, framework) per process
# ---------------------------------------------------------------------------------------------------------------------

def run_ours(w: Workload, warmup: int, steps: int, full_steps: int, gen_tokens: int) -> dict:
    cfg = train.TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY, micro_batch=MICRO_BATCH)
    optimizer = torch.optim.AdamW([p for p in w.model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    w.model.train()
    memory, times = StepMemory(), []
    for _ in range(warmup + steps):
        memory.start()
        start = time.perf_counter()
        train.update(w.model, optimizer, w.trajectories, w.advantages, cfg, w.processor, train.Dist())
        times.append(time.perf_counter() - start)
        memory.stop()

    # the full RL step with a single turn: no code runs, so the sandbox pool only has to exist
    from sandbox import SandboxPool
    engine = rollout.make_engine("hf", w.model, w.processor)
    gen_cfg = rollout.RolloutConfig(template_key="short", max_turns=1, max_turn_tokens=gen_tokens)
    rollout_s, full_update_s, generated = [], [], []
    with SandboxPool(timeout=30) as pool:
        for _ in range(full_steps):
            w.model.eval()
            start = time.perf_counter()
            trajs = rollout.rollout(w.tasks, engine, w.processor, pool.open, gen_cfg, n=GROUP_SIZE)
            rollout.score_trajectories(trajs, w.processor)
            rollout_s.append(time.perf_counter() - start)
            rewards = [t.reward for t in trajs]
            advantages = [r - statistics.mean(rewards[t.group_id * GROUP_SIZE:(t.group_id + 1) * GROUP_SIZE])
                          for r, t in zip(rewards, trajs)]
            # a random policy also samples vision tokens. OFR drops trajectories whose image pads do not match their
            # images (ofr.py); a sampled <|video_pad|> passes that check yet breaks the forward, so it is dropped here
            kept = [(t, a) for t, a in zip(trajs, advantages)
                    if t.vision_consistent and (t.video_inputs or w.processor.video_pad_id not in t.input_ids)]
            w.model.train()
            start = time.perf_counter()
            train.update(w.model, optimizer, [t for t, _ in kept], [a for _, a in kept], cfg, w.processor, train.Dist())
            full_update_s.append(time.perf_counter() - start)
            generated.append(sum(sum(t.action_mask) for t in trajs))
    return {"update_s": times[warmup:], **memory.summary(warmup), "rollout_s": rollout_s,
            "full_update_s": full_update_s, "generated_tokens": generated}


def run_trl(w: Workload, model_dir: Path, out_dir: Path, warmup: int, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):   # the official class minus its torchvision-only video check
        def check_argument_for_proper_class(self, name, arg):
            return None if (name == "video_processor" and arg is None) else super().check_argument_for_proper_class(name, arg)

    # left padding, as TRL's own AutoProcessor loading sets it: TRL left-pads the prompt ids itself, and the second
    # processor pass must pad mm_token_type_ids the same way (the saved tiny tokenizer pads on the right)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
    processing_class = ImageOnlyProcessor(image_processor=w.processor.image_processor, tokenizer=tokenizer,
                                          video_processor=None, chat_template=tokenizer.chat_template)

    class FixedCompletionsGRPO(GRPOTrainer):
        """GRPOTrainer whose generation returns the workload's completions. `_generate` is timed so that the bench can
        take it out of the step."""
        generate_s = 0.0

        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            self.generate_s += time.perf_counter() - start
            return out

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            seen: Counter = Counter()   # the k-th copy of a prompt in the batch gets the group's k-th completion
            out = []
            for ids, prompt_images in zip(prompt_ids, images):
                key = group_key(ids, prompt_images[0])
                if key not in w.completions:
                    raise RuntimeError("TRL tokenised a prompt differently from rollout.start_trajectory; the two "
                                       "frameworks would not train on the same sequences")
                out.append(w.completions[key][seen[key]])
                seen[key] += 1
            return out, None

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.memory, self.update_s, self.generate_s, self.loop_s, self.last_end = StepMemory(), [], [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            trainer.generate_s = 0.0
            self.memory.start()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            end = time.perf_counter()
            self.update_s.append(end - self.start - trainer.generate_s)
            self.memory.stop()
            self.generate_s.append(trainer.generate_s)
            self.loop_s.append(end - self.last_end if self.last_end else float("nan"))
            self.last_end = end

    rows = []
    for task in w.tasks:   # the same first user turn as rollout.start_trajectory, as chat messages plus the image
        image = Image.open(task.image_path).convert("RGB")
        instructions = rollout.render_prompt(task.question, width=image.width, height=image.height, template_key="short")
        content = [{"type": "text", "text": "<image_clue_0>"}, {"type": "image"},
                   {"type": "text", "text": "</image_clue_0>\n" + instructions}]
        rows.append({"prompt": [{"role": "user", "content": content}], "images": [image]})

    def reward_direct_answer(completions, **kwargs):
        return [reward_of(c[0]["content"]) for c in completions]

    config = GRPOConfig(output_dir=str(out_dir), max_steps=warmup + steps, learning_rate=LR, weight_decay=WEIGHT_DECAY,
                        per_device_train_batch_size=MICRO_BATCH, num_generations=GROUP_SIZE,
                        gradient_accumulation_steps=GROUPS * GROUP_SIZE // MICRO_BATCH,
                        bf16=False, scale_rewards="none", report_to="none", save_strategy="no", seed=0)
    timer = StepTimer()
    trainer = FixedCompletionsGRPO(model=w.model, reward_funcs=reward_direct_answer, args=config,
                                   train_dataset=Dataset.from_list(rows), processing_class=processing_class,
                                   callbacks=[timer])
    trainer.train()
    return {"update_s": timer.update_s[warmup:], **timer.memory.summary(warmup),
            "trl_generate_s": timer.generate_s[warmup:], "trl_loop_s": timer.loop_s[max(warmup, 1):],
            "gradient_checkpointing": bool(config.gradient_checkpointing), "loss_type": config.loss_type}


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    w = build_workload(workdir / args.size / "model", workdir / "tasks" / "tasks.json")
    if args.worker == "ours":
        result = run_ours(w, args.warmup, args.steps, args.full_steps, args.gen_tokens)
    else:
        result = run_trl(w, workdir / args.size / "model", workdir / args.size / "trl_out", args.warmup, args.steps)
    result["tokens"] = sum(len(t.input_ids) for t in w.trajectories)
    result["action_tokens"] = sum(sum(t.action_mask) for t in w.trajectories)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------

def spawn(framework: str, size: str, workdir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--size", size, "--workdir", str(workdir),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--full-steps", str(args.full_steps),
           "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} worker for size {size!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def spread(xs: list[float]) -> str:
    """Median and range: the range is the noise of this machine (2 cores, shared)."""
    return f"{statistics.median(xs):6.2f} s [{min(xs):.2f}-{max(xs):.2f}]" if xs else "   n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["test", "demo"], choices=sorted(tiny.TINY_SIZES),
                        help="tiny model sizes; the last one gives the final ratio line")
    parser.add_argument("--rounds", type=int, default=2, help="processes per (size, framework), run alternately")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimiser steps per process")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per process")
    parser.add_argument("--full-steps", type=int, default=2, help="ours: full RL steps (rollout + update) per process")
    parser.add_argument("--gen-tokens", type=int, default=96, help="ours, full step: new tokens per sequence")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in both frameworks (0: torch's default, one per core). On a busy machine use "
                             "1: a team of 2 OpenMP threads on 2 shared cores stalls at every barrier, 2-20x at random")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup", "full_steps", "threads"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.gen_tokens < 1:
        parser.error(f"--gen-tokens must be at least 1, got {args.gen_tokens}")
    if args.worker:
        return worker(args)

    have_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    frameworks = ["ours", "trl"] if have_trl else ["ours"]
    print(f"{GROUPS} tasks x {GROUP_SIZE} samples = {GROUPS * GROUP_SIZE} single-turn sequences with one image each, "
          f"micro-batch {MICRO_BATCH}; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        workdir = Path(tmp)
        data.generate_image_tasks(GROUPS, seed=0, out_dir=workdir / "tasks")
        for size in args.sizes:
            tiny.build_tiny(workdir / size / "model", seed=0, size=size)
        for r in range(args.rounds):
            for size in args.sizes:
                for framework in (frameworks if r % 2 == 0 else frameworks[::-1]):   # alternate who goes first
                    start = time.perf_counter()
                    results.setdefault((size, framework), []).append(spawn(framework, size, workdir, args))
                    print(f"  round {r + 1}: {size} {framework} in {time.perf_counter() - start:.0f} s, "
                          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    def pooled(size: str, framework: str, key: str) -> list[float]:
        return [x for run in results[(size, framework)] for x in run[key] if x == x]   # x == x drops NaN

    def median_time(size: str, framework: str) -> float:
        return statistics.median(pooled(size, framework, "update_s"))

    def memory_mb(size: str, framework: str, key: str) -> float:
        return max(run[key] for run in results[(size, framework)]) / 1024

    print(f"\n{'size':<5} {'framework':<9} {'tokens':>6} {'actions':>7}   {'update step: median [range]':<27} "
          f"{'peak RSS':>9} {'step +RSS':>10}")
    for size in args.sizes:
        for framework in frameworks:
            run = results[(size, framework)][0]
            print(f"{size:<5} {framework:<9} {run['tokens']:>6} {run['action_tokens']:>7}   "
                  f"{spread(pooled(size, framework, 'update_s')):<27} {memory_mb(size, framework, 'peak_kb'):6.0f} MB "
                  f"{memory_mb(size, framework, 'increment_kb'):7.0f} MB")
    if not all(run["exact_memory"] for runs in results.values() for run in runs):
        print("(no /proc/self/clear_refs here: peaks are process-lifetime maxima, set-up included)")
    if args.full_steps:
        print("\nours, full RL step (single turn, HF generate, 64 sequences): rollout + scoring, then update")
        for size in args.sizes:
            print(f"{size:<5} rollout {spread(pooled(size, 'ours', 'rollout_s'))}   "
                  f"update {spread(pooled(size, 'ours', 'full_update_s'))}   "
                  f"({statistics.mean(pooled(size, 'ours', 'generated_tokens')):.0f} generated tokens)")
    if not have_trl:
        why = "skipped (--no-trl)" if args.no_trl else "not installed (pip install 'trl==1.16.*')"
        print(f"\nTRL {why}: no side-by-side, so the last line is not the ours / TRL ratio")
        return
    run = results[(args.sizes[0], "trl")][0]
    print(f"\nTRL: loss_type {run['loss_type']}, gradient checkpointing {run['gradient_checkpointing']}; "
          f"excluded from its update step: _generate (first processor pass + fixed completions)")
    for size in args.sizes:
        print(f"{size:<5} TRL _generate {spread(pooled(size, 'trl', 'trl_generate_s'))}   "
              f"whole loop iteration incl. data loader {spread(pooled(size, 'trl', 'trl_loop_s'))}")
    print()
    for size in args.sizes:
        print(f"{size:<5} ours / TRL: update step time {median_time(size, 'ours') / median_time(size, 'trl'):.2f}, "
              f"peak RSS {memory_mb(size, 'ours', 'peak_kb') / memory_mb(size, 'trl', 'peak_kb'):.2f}, "
              f"step +RSS {memory_mb(size, 'ours', 'increment_kb') / memory_mb(size, 'trl', 'increment_kb'):.2f}")
    last = args.sizes[-1]
    print(f"ours / TRL peak memory ({last}): peak RSS "
          f"{memory_mb(last, 'ours', 'peak_kb') / memory_mb(last, 'trl', 'peak_kb'):.2f}, "
          f"step +RSS {memory_mb(last, 'ours', 'increment_kb') / memory_mb(last, 'trl', 'increment_kb'):.2f}")
    print(f"ours / TRL update step time: {median_time(last, 'ours') / median_time(last, 'trl'):.2f}")


if __name__ == "__main__":
    main()

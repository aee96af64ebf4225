"""eval.py — judge a checkpoint on the paper's benchmarks: the evaluation protocol, metrics, reports (docs/method.md §9, §5).

What this file is
    PyVision-RL is reported on V* (avg@32), HRBench-4K/8K, MathVerse, MathVision, WeMath, DynaMath, TIR-Bench and
    VSI-Bench, with a 30-turn budget and a 32K context (docs/method.md §9). This file runs that protocol on any file in the
    official validation format `{id, question, answer, ability, data_source, image_path | video_path}` (data.py):
      * `evaluate(tasks, engine, processor, cfg, out_dir)` rolls every task out `cfg.samples` times through the same
        agent loop as training (rollout.rollout, one sandbox per trajectory from sandbox.SandboxPool), scores it
        (rollout.score_trajectories → reward.py) and appends one record per finished (task, sample) to
        `samples.jsonl`. A restarted run skips the recorded samples; a sample that fails (media that will not load, a
        prompt the engine refused, a verifier or judge error, an unknown data_source) is recorded with its error and
        the run goes on.
      * Reports: `results.json` (summary, per data source, per source/ability, avg@k, every sample record),
        `results.md`, `accuracy_vs_visual_tokens.png`, `tool_calls_hist.png` and `trajectories.html` (rollout.write_html).
      * `compare(run_dirs)`: a markdown side-by-side table of finished runs (SFT vs RL, on-demand vs full-context...).
      * `prepare`: converters from each benchmark's public release files into the validation format.

How to run
    python eval.py --engine scripted --data runs/data/image/tasks.json --output-dir runs/eval/expert
    python eval.py --engine hf --model runs/tiny --data runs/data/image/tasks.json --output-dir runs/eval/tiny
    python eval.py --engine vllm --model Agents-X/PyVision-Image-7B-RL --data data/vstar/tasks.json \\
        --benchmark-defaults vstar --judge-url http://127.0.0.1:8000/v1 --output-dir runs/eval/vstar-rl
    python eval.py --compare runs/eval/vstar-sft runs/eval/vstar-rl
    python eval.py prepare --benchmark vstar --src vstar_bench/ --out data/vstar
    (`python eval.py --help` lists every setting; `python eval.py prepare --help` the benchmarks.)

Protocol defaults (every one is a flag)
    max_turns 30 and a 32K context (docs/method.md §9). The context is prompt + response; `max_response_tokens` bounds the
    response (actions, tool text and returned images), so its default 28672 = 32768 − 4096 leaves room for the largest
    prompt: an in-context image at the paper's max_pixels = 2,000,000 is ≤ 2,551 tokens, plus ≈ 1K of instructions
    (video prompts are text only, ≈ 1K). Per-turn cap 10240 and ≤ 32 images per trajectory as in training (§2.4).
    Sampling (§5, one summary source): T = 0.01 on V*, T = 0.5 with top-k 20 on the other image benchmarks, T = 0.01
    on video; `--benchmark-defaults NAME` applies a row of `BENCHMARK_SAMPLING` (also k = 32 samples on V* and the
    paper's in-context image bounds 3136..2,000,000 pixels); explicit flags override it.

Metrics
    accuracy = mean of RewardParts.acc (0/1, or Mean Relative Accuracy for MRA sources) over scored samples;
    correct_frac = share with acc ≥ 0.5; avg@k = mean over tasks of the mean over its k samples (plus pass@k and the
    spread of the k per-run accuracies); tool calls, turns, end reasons, visual tokens (input image + returned figures
    [+ video grids]), response tokens and wall seconds per sample (batch wall time / samples in the batch). When tasks
    carry `needs_tool` (synthetic sets), acc_tool and acc_no_tool are reported separately. Errored samples are counted
    (n_errors) and left out of every mean.

Resuming
    `samples.jsonl` is appended (and fsync'ed) after every batch; `eval_config.json` keeps the settings. Rerunning the
    same command skips every recorded (task, sample), `--retry-errors` reruns the errored ones, and a rerun whose
    result-affecting settings differ (anything but batch size, workers, viewer size, judge URL, device) is refused
    unless `--fresh` discards the old samples.

Differences from the paper / official code
    * The official evaluation code (PyVision-RL-Eval) was not available. V* keeps its release's question line
      verbatim and MATH-Vision lists options as its own prompt does; for the other benchmarks how options are listed
      is ours. The judge is reward.Judge with our few-shot examples (reward.py).
    * Benchmark-specific scores that are not one accuracy are not reproduced: WeMath's four-dimensional metric, TIR-Bench's
      per-task rules (IoU, jigsaw) and its answer-extraction model; we report judged accuracy for those. TIR-Bench's
      two-image items are skipped by the converter (the image scaffold has one image).
    * A sample that fails (missing media, judge down) is counted in n_errors and left out of the accuracy, not scored as
      wrong; retry it with --retry-errors.
    * Video runs use on-demand context by default; `--video-context full_context` puts uniformly sampled frames in the
      prompt instead (the paper's baseline), and `--compare` sets the two output directories side by side.
    * Sampling fields apply when eval.py builds the engine (CLI, `build_engine`); a caller passing its own engine (e.g.
      train.py's periodic evaluation) owns that engine's sampling.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import config
import data
import models
import reward
import rollout
import tiny
from data import DataError, Task
from models import VLProcessor


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------

_f = config.config_field


ENGINES = ("hf", "vllm", "scripted")


@dataclass
class EvalConfig(rollout.RolloutConfig, reward.JudgeConfig, models.ImageBounds):
    """One evaluation run. The protocol settings are the rollout's (rollout.RolloutConfig, inherited with their flags;
    the evaluation budgets below override the training defaults), and so are the judge and the image bounds."""
    # what to evaluate (used by the command line; evaluate() receives the tasks, engine and processor)
    model: str = _f("", "checkpoint name or path (hf, vllm; scripted: its tokenizer; empty with scripted builds a tiny "
                        "one in OUTPUT_DIR/tiny_model)")
    engine: str = _f("hf", "hf (transformers generate, CPU or GPU), vllm (GPU), scripted (the expert, for sanity runs)")
    data: str = _f("", "tasks in the official validation format (JSON list or JSONL, image_path or video_path rows)")
    output_dir: str = _f("runs/eval", "where samples.jsonl, results.json/.md, the plots and trajectories.html go")
    benchmark_defaults: str = _f("", "apply a paper benchmark's protocol settings first (BENCHMARK_SAMPLING): "
                                     "vstar, hrbench, mathverse, mathvision, wemath, dynamath, tirbench, vsibench "
                                     "(in Python: EvalConfig.for_benchmark(NAME, ...))")
    dtype: str = _f("auto", "parameter dtype of the hf engine: auto, float32, bfloat16, float16")
    device: str = _f("", "device of the hf engine (empty: cuda when available, else cpu)")
    vllm_gpu_memory: float = _f(0.85, "vllm: fraction of the GPU's memory for weights, activations and KV cache")
    vllm_eager: bool = _f(False, "vllm: no CUDA graphs or torch.compile (starts in seconds, decodes slower)")
    # protocol (docs/method.md §2.4, §9)
    max_turns: int = _f(30, "generation rounds per trajectory (paper evaluation: 30)")
    max_response_tokens: int = _f(28672, "token budget after the prompt, tool text and images included "
                                         "(32K context − 4096 for the prompt)")
    # sampling (docs/method.md §5)
    temperature: float = _f(0.5, "sampling temperature (paper: 0.01 on V* and video, 0.5 elsewhere; 0: greedy)")
    top_p: float = _f(1.0, "nucleus sampling")
    top_k: int = _f(20, "top-k sampling (0: off; paper: 20 on image benchmarks other than V*)")
    samples: int = _f(1, "samples per task, k of avg@k (paper: 32 on V*)")
    seed: int = _f(0, "seed of sampling and of the scripted expert")
    # scoring (reward.py)
    tool_coef: float = _f(0.1, "tool reward per call, paid when correct (only reported: evaluation ranks by accuracy)")
    strict: bool = _f(True, "official answer gate <answer>\\n\\boxed{..}\\n</answer>; --no-strict also accepts "
                            "looser answer formats")
    # running
    batch_size: int = _f(8, "tasks per rollout call (all their pending samples run together)")
    retry_errors: bool = _f(False, "on resume, run again the samples recorded with an error")
    fresh: bool = _f(False, "discard the samples already recorded in OUTPUT_DIR and start over")
    html_samples: int = _f(8, "trajectories written to trajectories.html (half correct, half not, when possible)")

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"EvalConfig.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.on_error not in ("terminate", "feedback"):
            raise ValueError(f"EvalConfig.on_error must be 'terminate' or 'feedback', got {self.on_error!r}")
        if self.benchmark_defaults and self.benchmark_defaults not in BENCHMARK_SAMPLING:
            raise ValueError(f"unknown benchmark {self.benchmark_defaults!r}; choose from {sorted(BENCHMARK_SAMPLING)}")
        for name in ("max_turns", "max_response_tokens", "max_turn_tokens", "max_images", "samples", "batch_size",
                     "tool_workers", "max_tool_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature", "top_k", "tool_coef", "tool_timeout_s", "html_samples", "min_pixels", "max_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalConfig.top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def for_benchmark(cls, name: str, **overrides) -> "EvalConfig":
        """The paper's protocol for benchmark `name` (a BENCHMARK_SAMPLING row), then `overrides` on top."""
        if name not in BENCHMARK_SAMPLING:
            raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARK_SAMPLING)}")
        return cls(**(BENCHMARK_SAMPLING[name] | {"benchmark_defaults": name} | overrides))

    def rollout_config(self) -> rollout.RolloutConfig:
        return config.derive(rollout.RolloutConfig, self)


# Protocol settings per benchmark (docs/method.md §5 "Paper evaluation", a single summary source: treat as probable).
# Keys are the `prepare` benchmark names. The image rows also restore the paper's in-context image bounds (§2.1).
_PAPER_IMAGE_PIXELS = dict(min_pixels=3136, max_pixels=2_000_000)
_IMAGE_ELSEWHERE = dict(temperature=0.5, top_p=1.0, top_k=20, samples=1) | _PAPER_IMAGE_PIXELS
BENCHMARK_SAMPLING: dict[str, dict] = {
    "vstar": dict(temperature=0.01, top_p=1.0, top_k=0, samples=32) | _PAPER_IMAGE_PIXELS,   # reported as avg@32
    **{name: _IMAGE_ELSEWHERE for name in ("hrbench", "mathverse", "mathvision", "wemath", "dynamath", "tirbench")},
    "vsibench": dict(temperature=0.01, top_p=1.0, top_k=0, samples=1),
}

# Fields that do not change what a sample's result is: a resumed run may change them freely.
RESUME_NEUTRAL_FIELDS = frozenset({"output_dir", "batch_size", "tool_workers", "retry_errors", "fresh", "html_samples",
                                   "judge_url", "device"})


def parse_eval_args(argv: Sequence[str] | None = None) -> tuple[EvalConfig, list[str]]:
    """-> (config, run dirs to compare). Precedence: flags given > --benchmark-defaults row > dataclass defaults."""
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on validation files (PyVision-RL protocol). "
                                                 "Subcommand: `eval.py prepare --help` converts benchmark releases.")
    config.add_config_flags(parser, EvalConfig)
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", default=None,
                        help="print a side-by-side markdown table of finished runs and exit")
    args = vars(parser.parse_args(argv))
    compare_dirs = args.pop("compare") or []
    given = {k: v for k, v in args.items() if v is not None}
    try:
        benchmark = given.pop("benchmark_defaults", "")
        return (EvalConfig.for_benchmark(benchmark, **given) if benchmark else EvalConfig(**given)), compare_dirs
    except ValueError as error:
        parser.error(str(error))


# ---------------------------------------------------------------------------------------------------------------------
# Sample records and the resumable store
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class SampleRecord:
    """One finished (task, sample): what the metrics need. `error` is set when the sample could not be scored; then
    acc/correct/reward are None, and the rollout fields are filled only if the rollout itself finished."""
    task_id: str
    sample: int
    data_source: str
    ability: str
    needs_tool: bool | None
    reference: str
    answer: str | None = None          # the extracted answer (None: none, or rejected by the format gate)
    acc: float | None = None           # 0/1, or MRA in [0, 1]
    correct: bool | None = None        # acc >= 0.5
    reward: float | None = None        # acc + tool_coef * tool calls when correct
    wellformed: bool | None = None
    verifier: str | None = None
    num_tool_calls: int = 0
    turns: int = 0
    end_reason: str | None = None
    visual_tokens: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    returned_images: int = 0
    generate_s: float = 0.0            # this trajectory's share of generation time
    tool_s: float = 0.0                # its sandbox time
    wall_s: float = 0.0                # batch wall time / samples in the batch
    final_action: str = ""             # last turn's text (tail, for a quick look)
    error: str | None = None
    error_stage: str | None = None     # route | rollout | score

    @property
    def key(self) -> tuple[str, int]:
        return self.task_id, self.sample


FINAL_ACTION_CHARS = 2000


def _task_fields(task: Task, sample: int) -> dict:
    return dict(task_id=task.id, sample=sample, data_source=task.data_source, ability=task.ability,
                needs_tool=task.needs_tool, reference=task.answer)


def _describe(error: BaseException) -> str:
    """'Type: message (at file:line in function)', the innermost frame: enough to find the cause in a results file."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {str(error)[:800]}{where}"


def error_record(task: Task, sample: int, stage: str, error: BaseException | str) -> SampleRecord:
    message = error if isinstance(error, str) else _describe(error)
    return SampleRecord(**_task_fields(task, sample), error=message, error_stage=stage)


def trajectory_record(traj: rollout.Trajectory, processor: VLProcessor, wall_s: float,
                      score_error: BaseException | None = None) -> SampleRecord:
    if score_error is None and traj.reward_parts.masked:   # the judge gave no verdict within its budget
        outcome = dict(error="judge: no verdict within its retries and time budget", error_stage="score")
    elif score_error is None:
        parts = traj.reward_parts
        outcome = dict(answer=parts.answer, acc=parts.acc, correct=parts.correct, reward=parts.total,
                       wellformed=parts.wellformed, verifier=parts.verifier)
    else:
        outcome = dict(error=_describe(score_error), error_stage="score")
    return SampleRecord(
        **_task_fields(traj.task, traj.sample_index), **outcome,
        num_tool_calls=traj.num_tool_calls, turns=len(traj.turns), end_reason=traj.end_reason,
        visual_tokens=traj.visual_tokens(processor), prompt_tokens=traj.prompt_len,
        response_tokens=traj.response_len, returned_images=traj.num_returned_images,
        generate_s=sum(t.generate_s for t in traj.turns), tool_s=sum(t.tool_s for t in traj.turns), wall_s=wall_s,
        final_action=traj.final_action[-FINAL_ACTION_CHARS:])


class SampleStore:
    """`samples.jsonl`: one JSON record per line, appended and fsync'ed as each sample finishes, so a killed run loses at
    most the line being written. On open a torn last line (no trailing newline) is cut off. When a key appears twice
    (a retried error), the last line wins."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[tuple[str, int], SampleRecord]:
        if not self.path.is_file():
            return {}
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            raw = raw[:raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as handle:
                handle.truncate(len(raw))
        known = {f.name for f in dataclasses.fields(SampleRecord)}
        records = {}
        for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                record = SampleRecord(**{k: v for k, v in row.items() if k in known})
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{self.path}: line {number} is not a sample record ({error}); delete the line or "
                                 "rerun with --fresh") from None
            records[record.key] = record
        return records

    def append(self, records: Sequence[SampleRecord]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())


def _check_resumable(out: Path, cfg: EvalConfig) -> None:
    """A resumed run must have the settings that produced the samples already recorded; save them on first use."""
    path = out / "eval_config.json"
    current = dataclasses.asdict(cfg)
    if path.is_file() and (out / "samples.jsonl").is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in current.keys() - RESUME_NEUTRAL_FIELDS if saved.get(k) != current[k])
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"{out} holds samples of a run with other settings ({detail}); use another --output-dir "
                             "or --fresh to discard them")
    path.write_text(json.dumps(current, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------

def unscorable_tasks(tasks: Sequence[Task], judge: reward.Judge | None) -> dict[str, str]:
    """task id -> why no verifier can score it (unknown source/ability, judged source without a judge)."""
    problems: dict[tuple[str, str], str] = {}
    for key in dict.fromkeys((t.data_source, t.ability) for t in tasks):
        try:
            reward.check_routable([key], judge)
        except reward.UnroutableError as error:
            problems[key] = str(error)
    return {t.id: problems[(t.data_source, t.ability)] for t in tasks if (t.data_source, t.ability) in problems}


def _batches(pending: list[tuple[Task, int]], batch_size: int) -> Iterable[list[tuple[Task, list[int]]]]:
    """Pending (task, sample) pairs grouped by task, `batch_size` tasks per batch."""
    by_task: dict[str, tuple[Task, list[int]]] = {}
    for task, sample in pending:
        by_task.setdefault(task.id, (task, []))[1].append(sample)
    groups = list(by_task.values())
    for start in range(0, len(groups), batch_size):
        yield groups[start:start + batch_size]


def run_batch(batch: list[tuple[Task, list[int]]], engine, processor: VLProcessor, sandbox_factory, cfg: EvalConfig,
              judge: reward.Judge | None) -> tuple[list[SampleRecord], list[rollout.Trajectory]]:
    """Roll out and score one batch. A failing batch is split into its tasks so one bad task costs only its own
    samples; a failing score is retried per trajectory for the same reason."""
    units = [(task, sample) for task, samples in batch for sample in samples]
    # the sampling seed depends only on the batch's content, so a resumed run draws as the first one would
    torch.manual_seed(zlib.crc32(f"{cfg.seed}/{units[0][0].id}/{units[0][1]}/{len(units)}".encode()))
    start = time.perf_counter()
    try:
        trajs = rollout.rollout([task for task, _ in units], engine, processor, sandbox_factory, cfg.rollout_config(),
                                n=1)
    except Exception as error:   # noqa: BLE001 — any failure of one task must not stop the evaluation
        if len(batch) > 1:
            results = [run_batch([item], engine, processor, sandbox_factory, cfg, judge) for item in batch]
            return [r for records, _ in results for r in records], [t for _, trajs in results for t in trajs]
        return [error_record(task, sample, "rollout", error) for task, sample in units], []
    wall_s = (time.perf_counter() - start) / len(trajs)
    for traj, (_, sample) in zip(trajs, units):   # rollout numbers its n=1 samples 0; restore the sample index
        traj.sample_index = sample
    # a prompt the engine refused (ENGINE_ERROR) is an error of that sample, not a wrong answer
    refused = [error_record(t.task, t.sample_index, "rollout", t.error) for t in trajs if t.error is not None]
    trajs = [t for t in trajs if t.error is None]
    try:
        rollout.score_trajectories(trajs, processor, cfg.tool_coef, judge, cfg.strict)
        return refused + [trajectory_record(t, processor, wall_s) for t in trajs], trajs
    except Exception:   # noqa: BLE001 — find the trajectories that fail and record them alone
        records = []
        for traj in trajs:
            try:
                rollout.score_trajectories([traj], processor, cfg.tool_coef, judge, cfg.strict)
                records.append(trajectory_record(traj, processor, wall_s))
            except Exception as error:   # noqa: BLE001
                records.append(trajectory_record(traj, processor, wall_s, score_error=error))
        return refused + records, [t for t, r in zip(trajs, records) if r.error is None]


def evaluate(tasks: Sequence[Task], engine, processor: VLProcessor, cfg: EvalConfig, out_dir: str | Path,
             dropped_rows: Sequence[data.BadRow] = ()) -> dict:
    """Run `cfg.samples` samples of every task, resuming from `out_dir/samples.jsonl`; write and return results.json.
    `dropped_rows` (rows of the data file that are not tasks) are listed in results.json and results.md."""
    from sandbox import SandboxPool   # the sandbox starts worker processes: import it only when evaluating

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    duplicates = sorted(k for k, n in Counter(t.id for t in tasks).items() if n > 1)
    if duplicates:
        raise ValueError(f"task ids must be unique to resume an evaluation; repeated: {duplicates[:10]}")
    store = SampleStore(out / "samples.jsonl")
    if cfg.fresh:
        store.path.unlink(missing_ok=True)
    _check_resumable(out, cfg)
    done = store.load()
    if cfg.retry_errors:
        done = {key: record for key, record in done.items() if record.error is None}

    judge = cfg.make_judge()   # masked samples are recorded as errors: --retry-errors judges them again
    blocked = unscorable_tasks(tasks, judge)
    # no rollout is spent on a sample no verifier could score
    unroutable = [error_record(t, k, "route", blocked[t.id]) for t in tasks if t.id in blocked
                  for k in range(cfg.samples) if (t.id, k) not in done]
    store.append(unroutable)
    done.update((r.key, r) for r in unroutable)
    pending = [(t, k) for t in tasks for k in range(cfg.samples) if (t.id, k) not in done]

    shown: dict[bool, list[rollout.Trajectory]] = {True: [], False: []}   # a few of each outcome for the viewer
    # a rollout keeps its trajectories' sandboxes open until it returns: the pool must hold a whole batch
    max_live = max(256, cfg.batch_size * cfg.samples)
    # seeding happens inside a forked RNG state, so an evaluation during training leaves the trainer's RNG untouched
    rng_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=rng_devices), \
            SandboxPool(timeout=cfg.tool_timeout_s, max_live=max_live) as pool, \
            tqdm(total=len(pending), desc="eval", unit="sample", disable=not pending) as progress:
        for batch in _batches(pending, cfg.batch_size):
            records, trajs = run_batch(batch, engine, processor, pool.open, cfg, judge)
            store.append(records)
            done.update((r.key, r) for r in records)
            for traj in trajs:
                if len(shown[traj.correct]) < cfg.html_samples:
                    shown[traj.correct].append(traj)
            progress.update(len(records))

    records = [done[(t.id, k)] for t in tasks for k in range(cfg.samples)]
    results = summarize(records, cfg.samples) | {"config": dataclasses.asdict(cfg),
                                                  "dropped_rows": [dataclasses.asdict(b) for b in dropped_rows]}
    # alternate correct and not correct, so the viewer shows both when both exist
    viewer = [t for pair in itertools.zip_longest(shown[True], shown[False]) for t in pair if t is not None]
    write_reports(results, out, viewer[:cfg.html_samples], title=f"{cfg.engine} {cfg.model}".strip())
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------

def _mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def group_metrics(records: Sequence[SampleRecord]) -> dict:
    """Means over the scored samples of a group; errors are only counted."""
    scored = [r for r in records if r.error is None]
    metrics = {
        "n_samples": len(records), "n_scored": len(scored), "n_errors": len(records) - len(scored),
        "accuracy": _mean(r.acc for r in scored),
        "correct_frac": _mean(r.correct for r in scored),
        "reward_mean": _mean(r.reward for r in scored),
        "wellformed_frac": _mean(r.wellformed for r in scored),
        "tool_calls_mean": _mean(r.num_tool_calls for r in scored),
        "tool_calls_zero_frac": _mean(r.num_tool_calls == 0 for r in scored),
        "turns_mean": _mean(r.turns for r in scored),
        "visual_tokens_mean": _mean(r.visual_tokens for r in scored),
        "response_tokens_mean": _mean(r.response_tokens for r in scored),
        "wall_s_per_sample": _mean(r.wall_s for r in scored),
        "end_reasons": dict(Counter(r.end_reason for r in scored).most_common()),
    }
    if any(r.needs_tool is not None for r in scored):
        metrics["acc_tool"] = _mean(r.acc for r in scored if r.needs_tool)
        metrics["acc_no_tool"] = _mean(r.acc for r in scored if r.needs_tool is False)
    return metrics


def avg_at_k(records: Sequence[SampleRecord], k: int) -> dict:
    """avg@k: mean over tasks of the mean accuracy of their k samples; pass@k: share of tasks with a correct sample;
    per_run_accuracy[j]: accuracy of the j-th samples, whose spread (std) shows the run-to-run noise."""
    by_task: dict[str, list[SampleRecord]] = defaultdict(list)
    by_run: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.error is None:
            by_task[r.task_id].append(r)
            by_run[r.sample].append(r.acc)
    per_run = [_mean(by_run[j]) for j in sorted(by_run)]
    return {"k": k, "avg": _mean(_mean(r.acc for r in rs) for rs in by_task.values()),
            "pass": _mean(any(r.correct for r in rs) for rs in by_task.values()),
            "per_run_accuracy": per_run, "std": statistics.pstdev(per_run) if len(per_run) > 1 else 0.0}


def summarize(records: Sequence[SampleRecord], k: int) -> dict:
    per_source: dict[str, list[SampleRecord]] = defaultdict(list)
    per_ability: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        per_source[r.data_source].append(r)
        per_ability[f"{r.data_source}/{r.ability}"].append(r)
    errors = Counter(r.error for r in records if r.error is not None)
    at_k = avg_at_k(records, k)
    return {"summary": group_metrics(records) | {"avg_at_k": at_k["avg"], "k": k, "errors": dict(errors.most_common(5))},
            "per_source": {name: group_metrics(rs) for name, rs in sorted(per_source.items())},
            "per_ability": {name: group_metrics(rs) for name, rs in sorted(per_ability.items())},
            "avg_at_k": at_k,
            "samples": [dataclasses.asdict(r) for r in records]}


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_ROWS = ("accuracy", "correct_frac", "avg_at_k", "acc_tool", "acc_no_tool", "tool_calls_mean",
                "tool_calls_zero_frac", "turns_mean", "visual_tokens_mean", "response_tokens_mean", "wellformed_frac",
                "wall_s_per_sample", "n_samples", "n_errors")
GROUP_COLUMNS = ("n_samples", "accuracy", "correct_frac", "tool_calls_mean", "turns_mean", "visual_tokens_mean",
                 "n_errors")


def results_markdown(results: dict, title: str) -> str:
    s, at_k = results["summary"], results["avg_at_k"]
    parts = [f"# Evaluation: {title}", "",
             _table(["metric", "value"], [(name, s.get(name)) for name in SUMMARY_ROWS if name in s]), "",
             f"avg@{at_k['k']}: {_fmt(at_k['avg'])} (pass@{at_k['k']} {_fmt(at_k['pass'])}, "
             f"std of the per-run accuracies {_fmt(at_k['std'])})", ""]
    for heading, key in (("Per data source", "per_source"), ("Per data source / ability", "per_ability")):
        rows = [(name, *(g[c] for c in GROUP_COLUMNS)) for name, g in results[key].items()]
        parts += [f"## {heading}", "", _table(["group", *GROUP_COLUMNS], rows), ""]
    parts += ["## End reasons", "", _table(["end reason", "samples"], s["end_reasons"].items()), ""]
    if s["errors"]:
        parts += ["## Most frequent errors", "", _table(["error", "samples"], s["errors"].items()), ""]
    dropped = results.get("dropped_rows", [])
    if dropped:   # rows that never became tasks: not in any count above
        reasons = Counter(f"field {row['field']!r}: {row['problem']}" for row in dropped)
        parts += [f"## Rows dropped at load: {len(dropped)}", "", _table(["reason", "rows"], reasons.most_common(10)), ""]
    return "\n".join(parts)


def plot_accuracy_vs_visual_tokens(results: dict, path: Path) -> None:
    """One point per source/ability group (and the overall mean): where the visual-token budget goes and what it buys."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, g in results["per_ability"].items():
        if g["accuracy"] is not None:
            ax.scatter(g["visual_tokens_mean"], g["accuracy"], s=20 + 4 * math.sqrt(g["n_scored"]))
            ax.annotate(name, (g["visual_tokens_mean"], g["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    s = results["summary"]
    if s["accuracy"] is not None:
        ax.scatter(s["visual_tokens_mean"], s["accuracy"], marker="*", s=160, color="black", label="all samples")
        ax.legend(loc="lower right")
    ax.set(xlabel="visual tokens per sample (input + returned images)", ylabel="accuracy", ylim=(-0.05, 1.05),
           title="accuracy vs visual tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_tool_call_histogram(records: Sequence[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    scored = [r for r in records if r["error"] is None]
    top = max((r["num_tool_calls"] for r in scored), default=0)
    counts = {outcome: [sum(1 for r in scored if r["num_tool_calls"] == n and bool(r["correct"]) == outcome)
                        for n in range(top + 1)] for outcome in (True, False)}
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(top + 1), counts[True], label="correct", color="tab:green")
    ax.bar(range(top + 1), counts[False], bottom=counts[True], label="not correct", color="tab:red")
    ax.set(xlabel="tool calls per trajectory", ylabel="samples", title="tool calls per trajectory")
    ax.set_xticks(range(top + 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_reports(results: dict, out: Path, trajectories: Sequence[rollout.Trajectory], title: str) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "results.md").write_text(results_markdown(results, title or str(out)), encoding="utf-8")
    plot_accuracy_vs_visual_tokens(results, out / "accuracy_vs_visual_tokens.png")
    plot_tool_call_histogram(results["samples"], out / "tool_calls_hist.png")
    if trajectories:   # a resumed run with nothing left to do keeps the viewer of the run that made the samples
        rollout.write_html(trajectories, out / "trajectories.html", title=f"Evaluation trajectories: {title}")


CURVE_KEYS = ("acc/mean", "reward/mean", "tool/calls_mean", "rollout/turns_mean", "adv/neg_correct_frac",
              "ofr/kept_frac")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training metrics at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(runs: dict[str, Sequence[str | Path]], path: Path, keys: Sequence[str] = CURVE_KEYS,
                         smooth: int = 5) -> None:
    """One panel per metric; one line per run label: each seed's trailing mean over `smooth` steps (a step sees only a
    few prompts, so raw values jump), then the mean over seeds, shaded min-max when there are several."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    cols = 3
    fig = Figure(figsize=(4.2 * cols, 3.2 * math.ceil(len(keys) / cols)))
    FigureCanvasAgg(fig)
    for k, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / cols), cols, k + 1)
        for label, run_dirs in runs.items():
            series = [{m["step"]: m.get(key) for m in read_metrics(d)} for d in run_dirs]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            raw = np.array([[s[t] if s[t] is not None else np.nan for s in series] for t in steps], float)  # (steps, seeds)
            values = np.array([raw[max(0, i - smooth + 1):i + 1].mean(0) for i in range(len(steps))])  # (steps, seeds)
            line, = ax.plot(steps, values.mean(1), label=label)
            if len(run_dirs) > 1:
                ax.fill_between(steps, values.min(1), values.max(1), alpha=0.2, color=line.get_color())
        ax.set(title=f"{key} ({smooth}-step mean)" if smooth > 1 else key, xlabel="RL step")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def demo_summary(sft_eval: str | Path, rl_eval: str | Path, train_dir: str | Path, timings_dir: str | Path,
                 out: str | Path) -> dict:
    """The CPU demo's summary.json, summary.md and curves.png from its two evaluations and its RL run."""
    out = Path(out)
    sft = json.loads((Path(sft_eval) / "results.json").read_text())["summary"]
    rl = json.loads((Path(rl_eval) / "results.json").read_text())["summary"]
    stages = {p.stem: float(p.read_text()) for p in sorted(Path(timings_dir).glob("*.s"))}
    summary = {"sft_acc_tool": sft["acc_tool"], "rl_acc_tool": rl["acc_tool"],
               "sft_acc_no_tool": sft["acc_no_tool"], "rl_acc_no_tool": rl["acc_no_tool"],
               "sft_acc": sft["accuracy"], "rl_acc": rl["accuracy"],
               "sft_tool_calls": sft["tool_calls_mean"], "rl_tool_calls": rl["tool_calls_mean"],
               "sft_wellformed": sft["wellformed_frac"], "rl_wellformed": rl["wellformed_frac"],
               "sft_turns": sft["turns_mean"], "rl_turns": rl["turns_mean"],
               "n_heldout": sft["n_samples"], "stage_wall_s": stages, "wall_s": sum(stages.values())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(compare([sft_eval, rl_eval]) + "\n")
    plot_training_curves({"RL (full recipe)": [train_dir]}, out / "curves.png")
    return summary


ABLATION_KEYS = ("acc/mean", "tool/calls_mean", "rollout/turns_mean", "adv/neg_correct_frac",
                 "rollout/visual_tokens_mean")


def ablation_report(root: str | Path, last: int = 5) -> str:
    """Runs under ROOT named LABEL-sSEED: curves.png (mean over seeds, min-max shaded) and a markdown table of the
    last `last` steps' mean per run, as mean ± spread over seeds."""
    root = Path(root)
    runs: dict[str, list[Path]] = defaultdict(list)
    for run_dir in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file()):
        runs[run_dir.name.rsplit("-s", 1)[0]].append(run_dir)
    if not runs:
        raise FileNotFoundError(f"no run with a metrics.jsonl under {root}")
    plot_training_curves(runs, root / "curves.png", ABLATION_KEYS)
    rows = []
    for label, run_dirs in runs.items():
        cells = []
        for key in ABLATION_KEYS:
            per_seed = []
            for d in run_dirs:
                tail = [m[key] for m in read_metrics(d)[-last:] if m.get(key) is not None]
                if tail:
                    per_seed.append(statistics.fmean(tail))
            cells.append(f"{statistics.fmean(per_seed):.3f} ± {(max(per_seed) - min(per_seed)) / 2:.3f}"
                         if per_seed else "–")
        rows.append([label, str(len(run_dirs)), *cells])
    table = _table(["run", "seeds", *(f"{k} (last {last} steps)" for k in ABLATION_KEYS)], rows)
    (root / "summary.md").write_text(table + "\n")
    return table


COMPARE_ROWS = ("accuracy", "correct_frac", "avg_at_k", "acc_tool", "acc_no_tool", "tool_calls_mean", "turns_mean",
                "visual_tokens_mean", "wellformed_frac", "wall_s_per_sample", "n_samples", "n_errors")


def compare(run_dirs: Sequence[str | Path]) -> str:
    """Markdown table: one column per finished run (its results.json), summary metrics then accuracy per source."""
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no results.json (is it a finished eval.py output directory?)")
        runs.append(json.loads(path.read_text(encoding="utf-8")))
    names = [Path(d).name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):   # same leaf names (runs/a/eval, runs/b/eval): show the whole paths
        names = [str(d) for d in run_dirs]
    rows = [(name, *(run["summary"].get(name) for run in runs)) for name in COMPARE_ROWS
            if any(name in run["summary"] for run in runs)]
    sources = sorted({source for run in runs for source in run["per_source"]})
    rows += [(f"accuracy: {source}", *(run["per_source"].get(source, {}).get("accuracy") for run in runs))
             for source in sources]
    return _table(["metric", *names], rows)


# ---------------------------------------------------------------------------------------------------------------------
# Engines by name
# ---------------------------------------------------------------------------------------------------------------------

def build_engine(cfg: EvalConfig, out_dir: Path):
    """-> (engine, processor) for cfg.engine, with cfg's sampling settings."""
    pixels = dict(min_pixels=cfg.min_pixels or None, max_pixels=cfg.max_pixels or None)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    if cfg.engine == "hf":
        if not cfg.model:
            raise ValueError("--engine hf needs --model (a checkpoint name or path)")
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = models.load_policy(cfg.model, dtype=cfg.dtype, device=device, **pixels)
        return rollout.make_engine("hf", model.eval(), processor, **sampling), processor
    model_path = cfg.model
    if not model_path:
        if cfg.engine != "scripted":
            raise ValueError(f"--engine {cfg.engine} needs --model (a checkpoint name or path)")
        # the expert writes text, but the loop still needs a tokenizer and an image processor: a tiny one does
        tiny_dir = out_dir / "tiny_model"
        model_path = str(tiny_dir if (tiny_dir / "config.json").is_file() else tiny.build_tiny(tiny_dir))
    processor = VLProcessor.from_pretrained(model_path, **pixels)
    if cfg.engine == "scripted":
        return rollout.make_engine("scripted", processor=processor, seed=cfg.seed), processor
    return rollout.make_engine("vllm", processor=processor, model_path=model_path, dtype=cfg.dtype,
                               gpu_memory_utilization=cfg.vllm_gpu_memory, enforce_eager=cfg.vllm_eager,
                               max_images=cfg.max_images, seed=cfg.seed, **sampling), processor


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark converters: public release files -> the official validation format
# ---------------------------------------------------------------------------------------------------------------------

def read_keyed_rows(path: Path) -> list[tuple[str, dict]]:
    """(key, row) pairs of a .json (list, or a mapping key -> row), .jsonl, .tsv (VLMEvalKit style) or .parquet file.
    The key is the mapping's key (some releases keep the item id only there, e.g. DynaMath's GitHub files), else the
    row's position."""
    suffix = path.suffix.lower()
    keys = None
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):
            keys, rows = list(rows), list(rows.values())
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".tsv":
        csv.field_size_limit(sys.maxsize)   # base64 images are far longer than csv's default 128 KiB field limit
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), which the project does "
                              "not depend on; or convert the file to JSON/TSV first") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (want .json, .jsonl, .tsv or .parquet)")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(path, -1, "<file>", "expected a list of objects")
    return list(zip(keys or map(str, range(len(rows))), rows))


def read_rows(path: Path) -> list[dict]:
    """The rows of `path` (read_keyed_rows without the keys)."""
    return [row for _, row in read_keyed_rows(path)]


def _files(src: Path, patterns: Sequence[str]) -> list[Path]:
    """`src` itself when it is a file; else the files below it matching the first pattern that matches any (patterns go
    from the release's own file name to looser ones)."""
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} does not exist")
    for pattern in patterns:
        found = sorted(p for p in src.rglob(pattern) if p.is_file())
        if found:
            return found
    raise FileNotFoundError(f"--src {src}: no file matching {list(patterns)}")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:   # e.g. a base64 string too long to be a file name
        return False


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _field(row: dict, name: str | tuple[str, ...], file: Path, index: int):
    """The row's value of `name`; a tuple names the spellings different releases of one benchmark use, first wins."""
    names = (name,) if isinstance(name, str) else name
    value = next((row[n] for n in names if not _is_empty(row.get(n))), None)
    if value is None:
        raise DataError(file, index, "|".join(names), "missing or empty")
    return value


def _existing(path_text: str, roots: Sequence[Path], file: Path, index: int, name: str) -> Path:
    path = Path(path_text)
    for candidate in ([path] if path.is_absolute() else [root / path for root in roots]):
        if _is_file(candidate):
            return candidate.resolve()
    raise DataError(file, index, name, f"file not found: {path_text} (looked under {[str(r) for r in roots]})")


def _image_file(value, media_dir: Path, stem: str, roots: Sequence[Path], file: Path, index: int, name: str) -> Path:
    """The image of a row as a file: a path (kept where it is), a base64 string (TSV) or a {bytes, path} struct (parquet
    Image feature); decoded images are written once to media_dir/stem.<format>."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise DataError(file, index, name, "image struct without bytes or path")
    if isinstance(value, str):
        if len(value) < 4096 and "\n" not in value:   # short enough to be a path: a file wins over base64
            path = Path(value)
            for candidate in [path] if path.is_absolute() else [root / path for root in roots]:
                if _is_file(candidate):
                    return candidate.resolve()
        try:
            value = base64.b64decode("".join(value.split()), validate=True)
        except binascii.Error:
            raise DataError(file, index, name, f"neither an existing file (looked under {[str(r) for r in roots]}) "
                                               f"nor base64 image data: {value[:80]!r}") from None
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(file, index, name, f"unsupported image value of type {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as image:
            image_format = (image.format or "png").lower()
    except Exception as error:   # PIL raises several unrelated types for bad data
        raise DataError(file, index, name, f"not a file path, and undecodable as image data ({error})") from None
    media_dir.mkdir(parents=True, exist_ok=True)
    target = media_dir / f"{stem}.{'jpg' if image_format == 'jpeg' else image_format}"
    target.write_bytes(value)
    return target


def _lettered(options: Sequence[str], style: str = "{letter}. {text}") -> str:
    return "\n".join(style.format(letter=chr(ord("A") + k), text=str(text).strip()) for k, text in enumerate(options))


_PAREN_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*)$")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")   # the folders the official evaluation scripts read
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _vstar_task(task_id: str, question: str, answer: str, category: str, image: Path, options: list[str]) -> Task:
    return Task(id=task_id, question=question, answer=answer, ability=category, data_source="vstar",
                image_path=str(image), choices=options)


def _vstar_from_questions(src: Path) -> list[Task]:
    """test_questions.jsonl rows {image, text, label, category, question_id}. `text` is the released question line
    (the question, one `(A) option` line per option, then VSTAR_INSTRUCTION) and is kept whole; the option lines also
    give the task's choices. Ids are the official question_id."""
    tasks = []
    for file in _files(src, ["test_questions.jsonl", "*.jsonl"]):
        for i, row in enumerate(read_rows(file)):
            text = str(_field(row, "text", file, i)).strip()
            options = [m.group(2).strip() for m in map(_PAREN_OPTION.match, text.splitlines()) if m]
            if not options:
                raise DataError(file, i, "text", "no '(A) ...' option lines found")
            image = _existing(str(_field(row, "image", file, i)), [file.parent], file, i, "image")
            tasks.append(_vstar_task(str(_field(row, "question_id", file, i)), text,
                                     str(_field(row, "label", file, i)).strip(), str(row.get("category", "vstar")),
                                     image, options))
    return tasks


def _vstar_from_annotations(folders: Sequence[Path]) -> list[Task]:
    """The per-image layout: <category>/<name>.jpg beside <name>.json {target_object, bbox, question, options}, the
    correct option first (the release's convention; the official evaluation scripts list the options in that order
    and score against the first). The question is written in the test_questions.jsonl layout, so both layouts give the
    model the same kind of prompt. Ids are <category>/<image file name>, the name the official scripts record."""
    tasks = []
    for folder in folders:
        for image in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".json"):
            annotation = image.with_suffix(".json")
            if not annotation.is_file():
                raise DataError(image, 0, "<annotation>", f"no annotation {annotation.name} beside the image")
            row = json.loads(annotation.read_text(encoding="utf-8"))
            options = [str(option).strip() for option in _field(row, "options", annotation, 0)]
            lines = [str(_field(row, "question", annotation, 0)).strip(),
                     *(f"({letter}) {option}" for letter, option in zip(data.LETTERS, options)), VSTAR_INSTRUCTION]
            tasks.append(_vstar_task(f"{folder.name}/{image.name}", "\n".join(lines), "A", folder.name,
                                     image.resolve(), options))
    return tasks


def convert_vstar(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """V* Bench (craigwu/vstar_bench): test_questions.jsonl when the release holds it (its labels follow shuffled
    options), else the per-image annotations of VSTAR_CATEGORIES (SRC may also be one category folder)."""
    folders = [src] if src.name in VSTAR_CATEGORIES else [src / name for name in VSTAR_CATEGORIES]
    folders = [folder for folder in folders if folder.is_dir()]
    if folders and not (src / "test_questions.jsonl").is_file():
        return _vstar_from_annotations(folders), []
    return _vstar_from_questions(src), []


def convert_hrbench(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """HR-Bench (DreamMr/HR-Bench): hr_bench_4k / hr_bench_8k as TSV (VLMEvalKit) or parquet, rows {index, question,
    A, B, C, D, answer, category, cycle_category, image (base64)}. As in VLMEvalKit TSVs, an image field holding only a
    row index means "the same image as that row". The 4K/8K split is read from the file name."""
    tasks = []
    for file in _files(src, ["*hr_bench*.tsv", "*hr_bench*.parquet", "*hrbench*.tsv", "*hrbench*.parquet"]):
        variant = next((v for v in ("8k", "4k") if v in file.name.lower()), None)
        if variant is None:
            raise ValueError(f"{file}: cannot tell 4K from 8K; the file name must contain '4k' or '8k'")
        rows = read_rows(file)
        images: dict[str, Path] = {}
        for i, row in enumerate(rows):   # images first: a row may point to a later row's image
            value = row.get("image")
            if value is not None and not (isinstance(value, str) and value.strip().isdigit()):
                index = str(_field(row, "index", file, i))
                images[index] = _image_file(value, media, f"hrbench-{variant}-{index}", [file.parent], file, i, "image")
        for i, row in enumerate(rows):
            index = str(_field(row, "index", file, i))
            value = row.get("image")
            reference = value.strip() if isinstance(value, str) and value.strip().isdigit() else index
            if reference not in images:
                raise DataError(file, i, "image", f"refers to row index {reference}, which has no image")
            letters = [letter for letter in "ABCDEFGH" if row.get(letter) not in (None, "")]
            question = str(_field(row, "question", file, i)).strip() + "\n" + "\n".join(
                f"{letter}. {str(row[letter]).strip()}" for letter in letters)
            tasks.append(Task(id=f"hrbench-{variant}-{index}", question=question,
                              answer=str(_field(row, "answer", file, i)).strip(), ability=str(row.get("category", "all")),
                              data_source=f"hrbench-{variant}", image_path=str(images[reference]),
                              choices=[str(row[letter]).strip() for letter in letters],
                              extra={"cycle_category": row.get("cycle_category")}))
    return tasks, []


MATHVERSE_TEXT_ONLY = "Text Only"   # the problem_version whose items carry no image


def _holds_no_image(value) -> bool:
    """True for an image field that holds nothing: missing, empty, or a parquet image struct without bytes or path."""
    return not (value.get("bytes") or value.get("path")) if isinstance(value, dict) else _is_empty(value)


def convert_mathverse(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """MathVerse (AI4Math/MathVerse, ZrrSkywalker/MathVerse): testmini.json rows {sample_index, problem_index,
    problem_version, question, image, answer, question_type, metadata, query_wo, query_cot}; the options of
    multi-choice items are in `question`. Vision-only items have an empty question (it is in the image).
    Text-only items (testmini_text_only.json, problem_version "Text Only", image "") are skipped and listed: a task here
    is a question about one image or one video (data.Task), and the agent's prompt and sandbox start from that media."""
    tasks, skipped = [], []
    for file in _files(src, ["testmini.json", "*.json", "*.parquet"]):
        for i, row in enumerate(read_rows(file)):
            index = str(_field(row, "sample_index", file, i))
            if _holds_no_image(row.get("image")) and row.get("problem_version") == MATHVERSE_TEXT_ONLY:
                skipped.append(f"mathverse-{index}: text-only, no image")
                continue
            question = str(row.get("question") or "").strip() or "Answer the question shown in the image."
            image = _image_file(_field(row, "image", file, i), media, f"mathverse-{index}",
                                [file.parent, file.parent / "images"], file, i, "image")
            tasks.append(Task(id=f"mathverse-{index}", question=question, answer=str(_field(row, "answer", file, i)),
                              ability=str(row.get("problem_version", "all")), data_source="mathverse",
                              image_path=str(image), extra={"question_type": row.get("question_type")}))
    return tasks, skipped


# MATH-Vision items whose options are these bare letters have the options drawn in the image; the official prompt
# (mathllm/MATH-V `models/GPT4V.py`) lists options only when they are not exactly these.
MATHVISION_LETTERS_ONLY = ["A", "B", "C", "D", "E"]


def convert_mathvision(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """MATH-Vision (mathllm/MATH-V on GitHub: data/test.jsonl, data/testmini.jsonl + images/; MathLLMs/MathVision on the
    hub: test/testmini parquet), rows {id, question, options, image, decoded_image, answer, solution, level, subject};
    `options` empty for free-form items. Options other than MATHVISION_LETTERS_ONLY follow the question as the official
    prompt lays them out, one `(A) option` line each. Pass one split at a time (testmini repeats test's ids)."""
    tasks = []
    for file in _files(src, ["test*.jsonl", "*.parquet", "*.json"]):
        for i, row in enumerate(read_rows(file)):
            index = str(_field(row, "id", file, i))
            options = [str(o) for o in (row.get("options") or [])]
            question = str(_field(row, "question", file, i)).strip()
            if options and options != MATHVISION_LETTERS_ONLY:
                question += "\n" + _lettered(options, "({letter}) {text}")
            image_value = row.get("decoded_image") or _field(row, "image", file, i)
            image = _image_file(image_value, media, f"mathvision-{index}", [file.parent, file.parent.parent], file, i,
                                "image")
            tasks.append(Task(id=f"mathvision-{index}", question=question, answer=str(_field(row, "answer", file, i)),
                              ability=str(row.get("subject", "all")), data_source="mathvision", image_path=str(image),
                              choices=options or None, extra={"level": row.get("level")}))
    return tasks, []


def convert_wemath(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """We-Math (We-Math/We-Math): testmini.json rows {ID, split, knowledge concept, question, option ("A. x;B. y"),
    answer (letter), image_path, key ("2steps_1", ...), question number}."""
    tasks = []
    for file in _files(src, ["testmini.json", "*.json", "*.parquet"]):
        for i, row in enumerate(read_rows(file)):
            number = str(row.get("question number") or _field(row, "ID", file, i))
            question = str(_field(row, "question", file, i)).strip()
            if row.get("option"):
                question += "\nOptions: " + str(row["option"]).strip()
            image_value = row.get("image") or _field(row, "image_path", file, i)
            image = _image_file(image_value, media, f"wemath-{number}", [file.parent], file, i, "image_path")
            tasks.append(Task(id=f"wemath-{number}", question=question, answer=str(_field(row, "answer", file, i)).strip(),
                              ability=str(row.get("key") or "all"), data_source="wemath", image_path=str(image),
                              extra={"knowledge_concept": row.get("knowledge concept"), "ID": row.get("ID")}))
    return tasks, []


# the variant number in a DynaMath file's folder/name: trial{k}/ (GitHub), sample{k}-*.parquet (hub),
# sample_variant{k}/ (the hub's parquet export)
_DYNAMATH_VARIANT = re.compile(r"(?:trial|variant|sample)_?(\d+)")


def convert_dynamath(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """DynaMath's released sample of 10 variants of its 501 seed questions, one file per variant k:
      * GitHub DynaMath/DynaMath: `samples and result/10trials/trial{k}/dataset.json`, a mapping id -> {question,
        answer, image (a path under trial{k}/), answer_type, subject, level};
      * hub DynaMath/DynaMath_Sample: `data/sample{k}-*.parquet` (split sample_variant{k}), rows {id, question, image,
        decoded_image, ground_truth, answer_type, subject, knowledge_level}.
    Ids are dynamath-v{k}-{id}, and so are the names of the images written from parquet bytes, so variants never share
    an id or overwrite each other's image."""
    tasks = []
    for file in _files(src, ["trial*/dataset.json", "*.parquet", "*.json"]):
        variants = _DYNAMATH_VARIANT.findall(f"{file.parent.name}/{file.name}")
        if not variants:
            raise ValueError(f"{file}: cannot tell which DynaMath variant this file holds; its folder or name must say "
                             "(trial{k}/dataset.json, sample{k}-*.parquet or sample_variant{k}/)")
        variant = int(variants[-1])
        for i, (key, row) in enumerate(read_keyed_rows(file)):
            task_id = f"dynamath-v{variant}-{row.get('id', key)}"
            image_value = row.get("decoded_image") or _field(row, "image", file, i)
            image = _image_file(image_value, media, task_id, [file.parent, file.parent.parent], file, i, "image")
            tasks.append(Task(id=task_id, question=str(_field(row, "question", file, i)).strip(),
                              answer=str(_field(row, ("ground_truth", "answer"), file, i)).strip(),
                              ability=str(row.get("subject", "all")), data_source="dynamath", image_path=str(image),
                              extra={"answer_type": row.get("answer_type"), "variant": variant,
                                     "knowledge_level": row.get("knowledge_level", row.get("level"))}))
    return tasks, []


def convert_tirbench(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """TIR-Bench (hub Agents-X/TIR-Bench; the GitHub repository agents-x-project/TIR-Bench holds only its scoring
    scripts): TIR-Bench.json, a list (or index -> row mapping) of {id, task|category, prompt, answer, image_1, image_2,
    meta_data}, image paths relative to the JSON (data.zip unzipped beside it). Two-image items (image_2 set) are
    skipped: the image scaffold puts one image in context and in the sandbox."""
    tasks, skipped = [], []
    for file in _files(src, ["TIR-Bench.json", "*.json"]):
        for i, row in enumerate(read_rows(file)):
            index = str(row.get("id", row.get("question_id", i)))
            if row.get("image_2"):
                skipped.append(f"tirbench-{index}: two images")
                continue
            image = _existing(str(_field(row, "image_1", file, i)), [file.parent, file.parent / "images"], file, i,
                              "image_1")
            tasks.append(Task(id=f"tirbench-{index}", question=str(_field(row, "prompt", file, i)).strip(),
                              answer=str(_field(row, "answer", file, i)).strip(),
                              ability=str(row.get("task") or row.get("category") or "all"), data_source="tirbench",
                              image_path=str(image)))
    return tasks, skipped


VSI_NUMERIC_TYPES = frozenset({"object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation"})


def convert_vsibench(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """VSI-Bench (nyu-visionx/VSI-Bench): test-00000-of-00001.parquet (or JSON/JSONL) rows {id, dataset, scene_name,
    question_type, question, options ("A. chair" ...), ground_truth}; videos at <src>/<dataset>/<scene_name>.mp4 (the
    unzipped arkitscenes/scannet/scannetpp archives, the path the official lmms-eval task reads). Numeric question
    types are scored by MRA (vsi_numerical), the rest by the judge (vsi)."""
    tasks = []
    root = src if src.is_dir() else src.parent
    for file in _files(src, ["*.parquet", "*.jsonl", "test*.json"]):
        for i, row in enumerate(read_rows(file)):
            index = str(_field(row, "id", file, i))
            kind = str(_field(row, "question_type", file, i))
            video = _existing(f"{_field(row, 'dataset', file, i)}/{_field(row, 'scene_name', file, i)}.mp4",
                              [root, file.parent], file, i, "dataset/scene_name")
            options = [str(o) for o in (row.get("options") or [])]
            numeric = kind in VSI_NUMERIC_TYPES or not options
            question = str(_field(row, "question", file, i)).strip()
            if not numeric:
                question += "\nOptions:\n" + "\n".join(options)
            tasks.append(Task(id=f"vsi-{index}", question=question, answer=str(_field(row, "ground_truth", file, i)),
                              ability=kind, data_source="vsi_numerical" if numeric else "vsi", video_path=str(video),
                              choices=None if numeric else [re.sub(r"^[A-Z]\.\s*", "", o) for o in options],
                              extra={"dataset": row.get("dataset"), "scene_name": row.get("scene_name")}))
    return tasks, []


@dataclass(frozen=True)
class Benchmark:
    convert: Callable[[Path, Path], tuple[list[Task], list[str]]]
    release: str    # where the public files come from


BENCHMARKS: dict[str, Benchmark] = {
    "vstar": Benchmark(convert_vstar, "huggingface.co/datasets/craigwu/vstar_bench (test_questions.jsonl + images, or "
                                      "the per-image direct_attributes|relative_position/<name>.jpg + <name>.json)"),
    "hrbench": Benchmark(convert_hrbench, "huggingface.co/datasets/DreamMr/HR-Bench (hr_bench_4k/8k .tsv or .parquet)"),
    "mathverse": Benchmark(convert_mathverse, "huggingface.co/datasets/AI4Math/MathVerse or github.com/ZrrSkywalker/"
                                              "MathVerse (testmini.json + images; text-only items are skipped)"),
    "mathvision": Benchmark(convert_mathvision, "github.com/mathllm/MATH-V (data/test[mini].jsonl + images) or "
                                                "huggingface.co/datasets/MathLLMs/MathVision (test/testmini parquet)"),
    "wemath": Benchmark(convert_wemath, "huggingface.co/datasets/We-Math/We-Math (testmini.json + images)"),
    "dynamath": Benchmark(convert_dynamath, "github.com/DynaMath/DynaMath (samples and result/10trials/trial{k}/"
                                            "dataset.json) or huggingface.co/datasets/DynaMath/DynaMath_Sample "
                                            "(data/sample{k}-*.parquet)"),
    "tirbench": Benchmark(convert_tirbench, "huggingface.co/datasets/Agents-X/TIR-Bench (TIR-Bench.json + data.zip "
                                            "unzipped beside it)"),
    "vsibench": Benchmark(convert_vsibench, "huggingface.co/datasets/nyu-visionx/VSI-Bench (test-*.parquet + the "
                                            "arkitscenes/scannet/scannetpp zips unzipped beside it)"),
}


def prepare(benchmark: str, src: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Convert a benchmark release into OUT/tasks.json (+ OUT/media/ for images stored inside the release files).
    -> (tasks.json path, skipped items). The written file is read back with data.load_tasks as a check."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {sorted(BENCHMARKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, skipped = BENCHMARKS[benchmark].convert(Path(src), out / "media")
    duplicates = sorted(k for k, n in Counter(t.id for t in tasks).items() if n > 1)
    if duplicates:
        raise ValueError(f"{src}: repeated ids after conversion {duplicates[:10]}; pass one split/file at a time")
    path = out / "tasks.json"
    data.write_tasks(tasks, path)
    data.load_tasks(path)
    return path, skipped


def prepare_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="eval.py prepare",
                                     description="Convert a benchmark's public release into the official validation "
                                                 "format. Sources:\n" + "\n".join(
                                                     f"  {name}: {b.release}" for name, b in BENCHMARKS.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--src", required=True, help="the downloaded release: its directory or one of its files")
    parser.add_argument("--out", required=True, help="output directory: tasks.json, media/")
    args = parser.parse_args(argv)
    path, skipped = prepare(args.benchmark, args.src, args.out)
    tasks, _ = data.load_tasks(path)
    print(f"wrote {len(tasks)} tasks to {path} ({len(skipped)} skipped{': ' + '; '.join(skipped[:5]) if skipped else ''})")
    print(f"evaluate with: python eval.py --data {path} --benchmark-defaults {args.benchmark} --judge-url URL ...")


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        prepare_main(argv[1:])
        return None
    if argv[:1] == ["ablation-report"]:   # used by `make ablations`
        sub = argparse.ArgumentParser(prog="eval.py ablation-report", description=ablation_report.__doc__)
        sub.add_argument("root", nargs="?", default="runs/ablations", help="the ablation runs' directory")
        print(ablation_report(sub.parse_args(argv[1:]).root))
        return None
    if argv[:1] == ["demo-summary"]:   # used by `make demo`
        sub = argparse.ArgumentParser(prog="eval.py demo-summary", description=demo_summary.__doc__)
        for name in ("sft_eval", "rl_eval", "train_dir", "timings_dir", "out"):
            sub.add_argument("--" + name.replace("_", "-"), required=True)
        summary = demo_summary(**vars(sub.parse_args(argv[1:])))
        print(json.dumps({k: v for k, v in summary.items() if k != "stage_wall_s"}, indent=1))
        return None
    cfg, compare_dirs = parse_eval_args(argv)
    if compare_dirs:
        print(compare(compare_dirs))
        return None
    if not cfg.data:
        raise SystemExit("eval.py: --data is required (or --compare RUN_DIR ..., or the prepare subcommand)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks, bad_rows = data.load_readable_tasks(cfg.data, out)
    engine, processor = build_engine(cfg, out)
    results = evaluate(tasks, engine, processor, cfg, out, dropped_rows=bad_rows)
    s = results["summary"]
    print(f"accuracy {_fmt(s['accuracy'])} over {s['n_scored']} samples ({s['n_errors']} errors), "
          f"avg@{s['k']} {_fmt(s['avg_at_k'])}, tool calls {_fmt(s['tool_calls_mean'])}, "
          f"visual tokens {_fmt(s['visual_tokens_mean'])} -> {out / 'results.json'}")
    if s["errors"]:
        print(f"most frequent error: {next(iter(s['errors']))}", file=sys.stderr)
    if s["n_scored"] == 0:   # nothing could be scored (no judge, wrong engine...): let scripts notice
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()

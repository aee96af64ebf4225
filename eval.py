"""eval.py — judge a checkpoint on the paper's benchmarks: the evaluation protocol and its metrics (docs/method.md §9, §5).

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
      * `summarize(records, k)`: the metrics below, overall, per data source and per source/ability, and avg@k; with
        every sample record they are `results.json`, which reports.write_reports writes beside `results.md`, the plots
        and `trajectories.html`.
    The benchmarks' release files become that format in benchmarks.py (`python eval.py prepare`); results.md, the plots,
    `--compare` tables, the demo summary and the ablation report are made in reports.py. Their commands run here.

How to run
    python eval.py --engine scripted --data runs/data/image/tasks.json --output-dir runs/eval/expert
    python eval.py --engine hf --model runs/tiny --data runs/data/image/tasks.json --output-dir runs/eval/tiny
    python eval.py --engine vllm --model Agents-X/PyVision-Image-7B-RL --data data/vstar/tasks.json \\
        --benchmark-defaults vstar --judge-url http://127.0.0.1:8000/v1 --output-dir runs/eval/vstar-rl
    python eval.py --compare runs/eval/vstar-sft runs/eval/vstar-rl
    python eval.py prepare --benchmark vstar --src vstar_bench/ --out data/vstar
    (`python eval.py --help` lists every setting; `python eval.py prepare --help` the benchmarks; reports.py's docstring
    shows the `ablation-report` and `demo-summary` subcommands.)

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
    * The official evaluation code (PyVision-RL-Eval) was not available. The judge is reward.Judge with our few-shot
      examples (reward.py); how each benchmark's questions and options are written is benchmarks.py's.
    * Benchmark-specific scores that are not one accuracy are not reproduced: WeMath's four-dimensional metric, TIR-Bench's
      per-task rules (IoU, jigsaw) and its answer-extraction model; we report judged accuracy for those.
    * A sample that fails (missing media, judge down) is counted in n_errors and left out of the accuracy, not scored as
      wrong; retry it with --retry-errors.
    * Video runs use on-demand context by default; `--video-context full_context` puts uniformly sampled frames in the
      prompt instead (the paper's baseline), and `--compare` sets the two output directories side by side.
    * Sampling fields apply when eval.py builds the engine (CLI, `build_engine`); a caller passing its own engine (e.g.
      train.py's periodic evaluation) owns that engine's sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
import traceback
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

import benchmarks
import config
import data
import models
import reports
import reward
import rollout
import tiny
from data import Task
from models import VLProcessor
from sandbox import SandboxPool


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
# Keys are benchmarks.BENCHMARKS' names. The image rows also restore the paper's in-context image bounds (§2.1).
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
    family: str | None = None          # synthetic task family
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
                needs_tool=task.needs_tool, reference=task.answer, family=task.family)


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
    reports.write_reports(results, out, viewer[:cfg.html_samples], title=f"{cfg.engine} {cfg.model}".strip())
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
        # what answering without the tool earns against calling it: the pressure behind interaction collapse
        "acc_direct": _mean(r.acc for r in scored if r.num_tool_calls == 0),
        "acc_with_tool": _mean(r.acc for r in scored if r.num_tool_calls > 0),
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
    per_family: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        per_source[r.data_source].append(r)
        per_ability[f"{r.data_source}/{r.ability}"].append(r)
        if r.family is not None:
            per_family[r.family].append(r)
    errors = Counter(r.error for r in records if r.error is not None)
    at_k = avg_at_k(records, k)
    return {"summary": group_metrics(records) | {"avg_at_k": at_k["avg"], "k": k, "errors": dict(errors.most_common(5))},
            "per_source": {name: group_metrics(rs) for name, rs in sorted(per_source.items())},
            "per_ability": {name: group_metrics(rs) for name, rs in sorted(per_ability.items())},
            "per_family": {name: group_metrics(rs) for name, rs in sorted(per_family.items())},
            "avg_at_k": at_k,
            "samples": [dataclasses.asdict(r) for r in records]}


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
# Command line
# ---------------------------------------------------------------------------------------------------------------------

# Subcommands: each module parses its own arguments (converters in benchmarks.py, reports in reports.py).
SUBCOMMANDS = {"prepare": benchmarks.prepare_main, "ablation-report": reports.ablation_report_main,
               "demo-summary": reports.demo_summary_main}


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
        return None
    models.set_cpu_threads()
    cfg, compare_dirs = parse_eval_args(argv)
    if compare_dirs:
        print(reports.compare(compare_dirs))
        return None
    if not cfg.data:
        raise SystemExit("eval.py: --data is required (or --compare RUN_DIR ..., or the prepare subcommand)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks, bad_rows = data.load_readable_tasks(cfg.data, out)
    engine, processor = build_engine(cfg, out)
    results = evaluate(tasks, engine, processor, cfg, out, dropped_rows=bad_rows)
    s = results["summary"]
    print(f"accuracy {reports.fmt(s['accuracy'])} over {s['n_scored']} samples ({s['n_errors']} errors), "
          f"avg@{s['k']} {reports.fmt(s['avg_at_k'])}, tool calls {reports.fmt(s['tool_calls_mean'])}, "
          f"visual tokens {reports.fmt(s['visual_tokens_mean'])} -> {out / 'results.json'}")
    if s["errors"]:
        print(f"most frequent error: {next(iter(s['errors']))}", file=sys.stderr)
    if s["n_scored"] == 0:   # nothing could be scored (no judge, wrong engine...): let scripts notice
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()

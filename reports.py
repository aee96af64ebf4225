"""reports.py — what a reader looks at after a run: results.md, plots, side-by-side tables, the CPU demo's summary, the
ablation report and training curves (docs/method.md §9).

What this file is
    Everything here reads finished numbers and writes files for people; nothing here runs a model or computes a metric
    (eval.summarize does, under the paper's protocol).
      * `write_reports(results, out, trajectories, title)`: `results.json` (what eval.summarize returned),
        `results.md`, `accuracy_vs_visual_tokens.png`, `tool_calls_hist.png` and `trajectories.html`
        (rollout.write_html). eval.evaluate and train.py's periodic evaluation call it.
      * `compare(run_dirs)`: a markdown side-by-side table of finished evaluations (SFT vs RL, on-demand vs
        full-context...): summary metrics, then accuracy per data source.
      * `demo_summary(...)`: the CPU demo's summary.json, summary.md and curves.png (`make demo`).
      * `ablation_report(root)`: runs named LABEL-sSEED under ROOT -> curves.png and a table of each run's last steps,
        mean ± spread over seeds, then each arm minus its baseline seed by seed with its sign-flip p-value
        (`sign_flip_p`; `make ablations`).
      * `plot_training_curves(runs, path)`: keys of train.py's metrics.jsonl, one line per run label, min-max over
        seeds shaded.

How to run (eval.py's command line dispatches here)
    python eval.py --compare runs/eval/vstar-sft runs/eval/vstar-rl
    python eval.py ablation-report runs/ablations
    python eval.py demo-summary --sft-eval runs/demo/eval_sft --rl-eval runs/demo/eval_rl --train-dir runs/demo/rl \\
        --timings-dir runs/demo/timings --out runs/demo

Differences from the paper / official code
    * The paper shows tables and figures, not the code that made them: every file here, its layout and the curves'
      smoothing (a trailing mean over 5 steps) are ours.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import rollout


# ---------------------------------------------------------------------------------------------------------------------
# One evaluation: results.json, results.md, plots, the trajectory viewer
# ---------------------------------------------------------------------------------------------------------------------

def fmt(value) -> str:
    """A table cell: floats to 3 decimals (whole numbers from 100 on), – for a metric with no value."""
    if value is None:
        return "–"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_ROWS = ("accuracy", "correct_frac", "avg_at_k", "acc_tool", "acc_no_tool", "tool_calls_mean",
                "tool_calls_zero_frac", "turns_mean", "visual_tokens_mean", "response_tokens_mean", "wellformed_frac",
                "wall_s_per_sample", "n_samples", "n_errors")
GROUP_COLUMNS = ("n_samples", "accuracy", "correct_frac", "tool_calls_mean", "turns_mean", "visual_tokens_mean",
                 "n_errors")
FAMILY_COLUMNS = ("n_samples", "accuracy", "tool_calls_mean", "tool_calls_zero_frac", "acc_direct", "acc_with_tool",
                  "response_tokens_mean")


def results_markdown(results: dict, title: str) -> str:
    s, at_k = results["summary"], results["avg_at_k"]
    parts = [f"# Evaluation: {title}", "",
             _table(["metric", "value"], [(name, s.get(name)) for name in SUMMARY_ROWS if name in s]), "",
             f"avg@{at_k['k']}: {fmt(at_k['avg'])} (pass@{at_k['k']} {fmt(at_k['pass'])}, "
             f"std of the per-run accuracies {fmt(at_k['std'])})", ""]
    for heading, key in (("Per data source", "per_source"), ("Per data source / ability", "per_ability")):
        rows = [(name, *(g[c] for c in GROUP_COLUMNS)) for name, g in results[key].items()]
        parts += [f"## {heading}", "", _table(["group", *GROUP_COLUMNS], rows), ""]
    if results.get("per_family"):   # synthetic sets: how each family is answered, directly or with the tool
        rows = [(name, *(g[c] for c in FAMILY_COLUMNS)) for name, g in results["per_family"].items()]
        parts += ["## Per synthetic family", "", _table(["family", *FAMILY_COLUMNS], rows), ""]
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


# ---------------------------------------------------------------------------------------------------------------------
# Training runs and side-by-side tables
# ---------------------------------------------------------------------------------------------------------------------

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
            # a step may lack a value (a task source not drawn that step): means over what is there
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # an all-missing window stays nan
                values = np.array([np.nanmean(raw[max(0, i - smooth + 1):i + 1], 0) for i in range(len(steps))])
                line, = ax.plot(steps, np.nanmean(values, 1), label=label)                      # values: (steps, seeds)
                if len(run_dirs) > 1:
                    ax.fill_between(steps, np.nanmin(values, 1), np.nanmax(values, 1), alpha=0.2, color=line.get_color())
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
# averaged over the whole run: RL's push on tool use (its sign says whether calls should rise or collapse) and the
# gradient norm (what std normalisation inflates)
RUN_MEAN_KEYS = ("tool/reward_gap", "tool/reward_gap_bonus", "tool/push_drawn", "tool/push_kept", "grad/norm")
# compared with the `full` arm seed by seed: a run and its `full` twin share the seed's task order and first rollouts
PAIRED_KEYS = ("tool/calls_mean", "acc/mean", "heldout_accuracy")
# logged per task source (train.rollout_metrics, train.tool_push): last steps' means, whole run's means
SOURCE_KEYS = ("tool/calls_mean", "tool/direct_frac", "acc/mean")
SOURCE_RUN_MEAN_KEYS = ("tool/push_drawn", "tool/push_kept")


def ablation_report(root: str | Path, last: int = 5, early: int = 10) -> str:
    """Runs under ROOT named ARM-sSEED: curves.png (mean over seeds, min-max shaded), summary.json (per arm and seed: the
    last `last` steps' means of ABLATION_KEYS, the first `early` steps' means of accuracy and of the share of correct
    samples with a negative advantage, the whole run's means of RUN_MEAN_KEYS, the step-to-step std of accuracy and,
    where ARM-sSEED/eval/results.json exists, the final checkpoint's held-out accuracy and tool calls, overall and per
    synthetic family) and summary.md (each as mean ± half the spread over seeds, then each arm minus its baseline
    seed by seed: `full`, or the arm whose name it extends)."""
    root = Path(root)
    runs: dict[str, list[Path]] = defaultdict(list)
    for run_dir in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file()):
        runs[run_dir.name.rsplit("-s", 1)[0]].append(run_dir)
    if not runs:
        raise FileNotFoundError(f"no run with a metrics.jsonl under {root}")
    summary = {arm: {run_dir.name.rsplit("-s", 1)[1]: run_summary(run_dir, last, early) for run_dir in run_dirs}
               for arm, run_dirs in runs.items()}
    sources = sorted({s for seeds in summary.values() for v in seeds.values() for s in v["train_per_source"]})
    per_source = [f"tool/calls_mean/{s}" for s in sources] if len(sources) > 1 else []
    plot_training_curves(runs, root / "curves.png", [*ABLATION_KEYS, *per_source])
    (root / "summary.json").write_text(json.dumps(summary, indent=1))

    def spread(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}" if values else "–"

    keys = [*ABLATION_KEYS, f"acc/mean first {early}", f"adv/neg_correct_frac first {early}",
            *(f"{k} run mean" for k in RUN_MEAN_KEYS), "acc/mean step std", "heldout_accuracy", "heldout_tool_calls"]
    rows = [[arm, str(len(seeds)), *(spread([v[key] for v in seeds.values() if v.get(key) is not None]) for key in keys)]
            for arm, seeds in summary.items()]
    parts = [_table(["arm", "seeds", *(f"{k} (last {last})" if k in ABLATION_KEYS else k for k in keys)], rows)]
    if len(sources) > 1:   # a mixture's mean can hide tool use falling on one kind of task while it rises on another
        source_keys = [*SOURCE_KEYS, *(f"{k} run mean" for k in SOURCE_RUN_MEAN_KEYS)]
        rows = [[arm, *(spread([v["train_per_source"][s][k] for v in seeds.values()
                                if v["train_per_source"].get(s, {}).get(k) is not None])
                        for s in sources for k in source_keys)]
                for arm, seeds in summary.items()]
        parts += ["", f"Training per task source (tool calls and accuracy, last {last} steps; push on tool use, "
                  "whole run):", "", _table(["arm", *(f"{s} {k}" for s in sources for k in source_keys)], rows)]
    families = sorted({f for seeds in summary.values() for v in seeds.values() for f in v.get("heldout_per_family", {})})
    if families:   # held-out accuracy and tool calls per synthetic family: where a multi-call family separates arms
        rows = [[arm, *(spread([v["heldout_per_family"][f][m] for v in seeds.values()
                                if f in v.get("heldout_per_family", {}) and v["heldout_per_family"][f][m] is not None])
                        for f in families for m in ("accuracy", "tool_calls_mean"))]
                for arm, seeds in summary.items()]
        parts += ["", "Held-out, per family (accuracy, tool calls):", "",
                  _table(["arm", *(f"{f} {m}" for f in families for m in ("acc", "calls"))], rows)]
    paired_keys = [*PAIRED_KEYS, *per_source]
    paired = paired_differences(summary, paired_keys)
    if paired:
        rows = [[arm, base, ", ".join(sorted(seeds)),
                 *(spread(diffs[key]) + f" ({_signs(diffs[key])})" if diffs[key] else "–" for key in paired_keys)]
                for arm, (base, seeds, diffs) in paired.items()]
        parts += ["", f"Minus its baseline, seed by seed (last {last} steps; held-out; in brackets, seeds above / below "
                  "0 and the two-sided sign-flip p of the mean, `sign_flip_p`):", "",
                  _table(["arm", "minus", "seeds", *paired_keys], rows)]
    table = "\n".join(parts)
    (root / "summary.md").write_text(table + "\n")
    return table


def baseline_arm(arm: str, arms: Iterable[str]) -> str | None:
    """The arm `arm` changes one thing of: the longest other arm whose name it extends (`require_image_tool_coef_0`
    -> `require_image`), else `full`; None for `full` itself."""
    extended = [base for base in arms if arm.startswith(base + "_")]
    return max(extended, key=len) if extended else (None if arm == "full" else "full")


def paired_differences(summary: dict, keys: Sequence[str] = PAIRED_KEYS
                       ) -> dict[str, tuple[str, list[str], dict[str, list[float]]]]:
    """Each arm's `keys` minus its baseline run's (`baseline_arm`) of the same seed, over the seeds both have. Same
    seed, same task order and first rollouts: the pairing takes the task draw out of the comparison (common random
    numbers)."""
    paired = {}
    for arm, seeds in summary.items():
        base = baseline_arm(arm, summary)
        if base is None:   # `full` is the reference itself
            continue
        reference = summary.get(base, {})
        shared = [seed for seed in seeds if seed in reference]
        if shared:
            paired[arm] = (base, shared, {key: [seeds[s][key] - reference[s][key] for s in shared
                                                if seeds[s].get(key) is not None and reference[s].get(key) is not None]
                                          for key in keys})
    return paired


def sign_flip_p(differences: Sequence[float], exact_up_to: int = 16) -> float:
    """Two-sided p-value of a paired mean difference under random sign flips: if the arm changed nothing, each seed's
    difference would be as likely negative as positive, so the observed |mean| is ranked among the means of the
    differences under every assignment of signs (exact up to `exact_up_to` seeds, else 2^16 random assignments). With
    n seeds it is at least 2 / 2^n (3 seeds: 0.25, 6: 0.031): the smallest p a run of n seeds can give, which is what
    tells a reader how many seeds a claim needs."""
    n = len(differences)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one paired difference")
    magnitudes = np.abs(np.asarray(differences, dtype=float))                          # (n,)
    if n <= exact_up_to:
        flips = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1                        # (2^n, n) every pattern
    else:
        flips = np.random.default_rng(0).integers(0, 2, size=(2 ** exact_up_to, n))    # (2^16, n) a sample of them
    # |sum| ranks the patterns as |mean| does (same n); ties count against the effect
    flipped = np.abs((1 - 2 * flips) @ magnitudes)                                      # (patterns,) |sum| each
    return float(np.mean(flipped >= abs(float(np.sum(differences))) - 1e-12))


def _signs(values: list[float]) -> str:
    return f"{sum(v > 0 for v in values)} / {sum(v < 0 for v in values)}, p {sign_flip_p(values):.2g}"


def run_summary(run_dir: Path, last: int, early: int = 10) -> dict:
    """One run's last-`last`-step means of ABLATION_KEYS, early-training and fluctuation figures, and its held-out
    results (absent before its evaluation)."""
    metrics = read_metrics(run_dir)

    def mean_of(key: str, rows: list[dict]) -> float | None:
        values = [m[key] for m in rows if m.get(key) is not None]
        return statistics.fmean(values) if values else None

    values = {key: mean_of(key, metrics[-last:]) for key in ABLATION_KEYS}
    values[f"acc/mean first {early}"] = mean_of("acc/mean", metrics[:early])
    values[f"adv/neg_correct_frac first {early}"] = mean_of("adv/neg_correct_frac", metrics[:early])
    values |= {f"{key} run mean": mean_of(key, metrics) for key in RUN_MEAN_KEYS}
    # per task source (train.py's tool/calls_mean/SOURCE and acc/mean/SOURCE; a step without the source has none)
    sources = sorted({key.split("/", 2)[2] for m in metrics for key in m if key.startswith("tool/calls_mean/")})
    values["train_per_source"] = {s: {k: mean_of(f"{k}/{s}", metrics[-last:]) for k in SOURCE_KEYS}
                                  | {f"{k} run mean": mean_of(f"{k}/{s}", metrics) for k in SOURCE_RUN_MEAN_KEYS}
                                  for s in sources}
    values |= {f"tool/calls_mean/{s}": values["train_per_source"][s]["tool/calls_mean"] for s in sources}
    accs = [m["acc/mean"] for m in metrics if m.get("acc/mean") is not None]
    values["acc/mean step std"] = statistics.pstdev(accs) if len(accs) > 1 else None
    results = run_dir / "eval" / "results.json"
    if results.is_file():
        held_out = json.loads(results.read_text())
        values["heldout_accuracy"] = held_out["summary"]["accuracy"]
        values["heldout_tool_calls"] = held_out["summary"]["tool_calls_mean"]
        values["heldout_per_family"] = {f: {m: g[m] for m in ("accuracy", "tool_calls_mean", "acc_direct",
                                                             "tool_calls_zero_frac")}
                                        for f, g in held_out.get("per_family", {}).items()}
    else:
        values["heldout_accuracy"] = None
    return values


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
# Command lines (eval.py dispatches its subcommands here)
# ---------------------------------------------------------------------------------------------------------------------

def ablation_report_main(argv: Sequence[str]) -> None:
    """`eval.py ablation-report [ROOT]`, used by `make ablations`."""
    sub = argparse.ArgumentParser(prog="eval.py ablation-report", description=ablation_report.__doc__)
    sub.add_argument("root", nargs="?", default="runs/ablations", help="the ablation runs' directory")
    print(ablation_report(sub.parse_args(argv).root))


def demo_summary_main(argv: Sequence[str]) -> None:
    """`eval.py demo-summary --sft-eval ... --out ...`, used by `make demo`."""
    sub = argparse.ArgumentParser(prog="eval.py demo-summary", description=demo_summary.__doc__)
    for name in ("sft_eval", "rl_eval", "train_dir", "timings_dir", "out"):
        sub.add_argument("--" + name.replace("_", "-"), required=True)
    summary = demo_summary(**vars(sub.parse_args(argv)))
    print(json.dumps({k: v for k, v in summary.items() if k != "stage_wall_s"}, indent=1))

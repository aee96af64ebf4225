"""bench/rollout_bench.py — rollout throughput: trajectories/s and tokens/s, with the time split into generation, tool
execution, image processing and bookkeeping (issue: rollout.py).

Two engines through the same loop and sandbox, in one process:
  * scripted — the expert writes the tasks' solution code: measures the loop + sandbox + processor with no model cost;
  * hf       — the tiny model samples actions with transformers generate (CPU).
The hf run's generation share is the baseline the other phases are compared against.

    python bench/rollout_bench.py [--tasks 16] [--n 4] [--size test|demo]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import tiny  # noqa: E402
import rollout  # noqa: E402
from sandbox import SandboxPool  # noqa: E402


def measure(name, engine, tasks, processor, pool, cfg, n):
    timings = rollout.RolloutTimings()
    trajs = rollout.rollout(tasks, engine, processor, pool.open, cfg, n=n, timings=timings)
    rollout.score_trajectories(trajs, processor)
    generated = sum(sum(t.action_mask) for t in trajs)
    total = sum(len(t.input_ids) for t in trajs)
    bookkeeping = timings.total_s - timings.generate_s - timings.tool_s - timings.image_s
    share = lambda x: f"{x:7.3f} s ({100 * x / timings.total_s:4.1f}%)"
    print(f"\n[{name}] {len(trajs)} trajectories in {timings.total_s:.2f} s: {len(trajs) / timings.total_s:.1f} traj/s, "
          f"{generated / timings.total_s:.0f} generated tok/s, {total / timings.total_s:.0f} sequence tok/s, "
          f"accuracy {sum(t.correct for t in trajs) / len(trajs):.2f}, tool calls {sum(t.num_tool_calls for t in trajs)}")
    print(f"  generation   {share(timings.generate_s)}\n  tool exec    {share(timings.tool_s)}\n"
          f"  images       {share(timings.image_s)}\n  bookkeeping  {share(bookkeeping)}")
    return timings, trajs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=16, help="synthetic image tasks")
    parser.add_argument("--n", type=int, default=4, help="samples per task")
    parser.add_argument("--size", default="test", choices=sorted(tiny.TINY_SIZES), help="tiny model size")
    parser.add_argument("--max-turn-tokens", type=int, default=96, help="hf engine: tokens per generation round")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = models.load_policy(tiny.build_tiny(Path(tmp) / "model", size=args.size))
        tasks = data.generate_image_tasks(args.tasks, seed=0, out_dir=Path(tmp) / "tasks")
        cfg = rollout.RolloutConfig(max_turns=3, max_turn_tokens=args.max_turn_tokens, max_response_tokens=2048)
        print(f"{args.tasks} tasks x {args.n} samples, tiny '{args.size}' model, torch threads {torch.get_num_threads()}")
        with SandboxPool(timeout=30) as pool:
            t0 = time.perf_counter()
            pool.open().close()   # start the template process outside the measured runs
            print(f"sandbox pool start: {time.perf_counter() - t0:.2f} s")
            scripted, _ = measure("scripted", rollout.ScriptedExpert(processor), tasks, processor, pool, cfg, args.n)
            hf, _ = measure("hf", rollout.make_engine("hf", model.eval(), processor), tasks, processor, pool, cfg, args.n)
    print(f"\nnon-generation time per trajectory: scripted {1000 * (scripted.total_s - scripted.generate_s) / (args.tasks * args.n):.1f} ms, "
          f"hf {1000 * (hf.total_s - hf.generate_s) / (args.tasks * args.n):.1f} ms")
    print(f"hf generation share of rollout time: {hf.generate_s / hf.total_s:.2f}")


if __name__ == "__main__":
    main()

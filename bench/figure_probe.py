"""bench/figure_probe.py — is the colour of a returned zoom in a policy's visual tokens?

What it measures
    The multi-call family `ring_colour` (data.py) asks the policy to name the colour in a figure its own zoom returned
    (docs/method.md §2: figures come back as new image turns). When a policy zooms right and still names the wrong
    colour, either its vision tower lost the colour or its language model never learnt to read it. This script
    separates the two: it makes the zoom figures of `--n` ring_colour tasks (the expert's own zoom code, one figure
    that shows a colour per task), runs each through the checkpoint's vision tower and merger as the policy would
    (`VLProcessor.encode_images`, then `model.model.visual`), and fits a linear classifier (softmax regression on the
    mean and the centre merged token) on 70 % of the figures; it prints its accuracy on the other 30 % beside chance.
    Then it asks the policy itself: each figure returned by a tool call after the task's question, the share of greedy
    answers that name its colour (`tiny.answer_accuracy`; the option's text, as the scripted expert answers). A high
    probe accuracy with a low answer accuracy means the colour is there and the language model does not use it. With
    `--tasks`, the policy also runs greedily on a task file's ring_colour tasks through the real loop and sandbox: how
    often a zoom it asked for showed the colour (its code copied a printed ring centre closely enough) and how often it
    then named that colour.

How to run
    python bench/figure_probe.py --model runs/ablations/sft/model            # a cold start
    python bench/figure_probe.py --model runs/demo/model --n 300 --seed 11   # the untrained vision tower
    python bench/figure_probe.py --model runs/ablations/model                # after seeing pretraining (tiny.py)
    python bench/figure_probe.py --model runs/ablations/full-s1/final --tasks runs/ablations/data/heldout/tasks.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data    # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import tiny    # noqa: E402
from sandbox import SandboxPool  # noqa: E402


def zoom_figures(n: int, seed: int) -> tuple[list[Image.Image], list[int], list[data.Task]]:
    """The first figure showing a colour in each of `n` ring_colour tasks, the colour's index in data.PALETTE, and the
    task."""
    figures, labels, tasks, shown = [], [], [], []
    show = Image.Image.show
    Image.Image.show = lambda self, *args, **kwargs: shown.append(self)   # what the sandbox's capture receives
    try:
        for task, image in data.iter_image_tasks(n, seed, families=("ring_colour",)):
            for code in task.follow_up_code:
                exec(code, {"image_clue_0": image, "np": np, "Image": Image})
                name = data.read_zoomed_colour(shown[-1])
                if name is not None:
                    figures.append(shown[-1])
                    labels.append(list(data.PALETTE).index(name))
                    tasks.append(task)
                    break
    finally:
        Image.Image.show = show
    return figures, labels, tasks


@torch.no_grad()
def visual_features(model, processor: models.VLProcessor, figures: list[Image.Image]) -> torch.Tensor:
    """(figures, 2 * hidden): the mean and the centre of each figure's merged visual tokens."""
    rows = []
    for figure in figures:
        pixel_values, grid = processor.encode_images([figure])
        out = model.model.visual(pixel_values, grid_thw=grid)
        tokens = (out.pooler_output if hasattr(out, "pooler_output") else out).float()   # (tokens, hidden)
        rows.append(torch.cat([tokens.mean(0), tokens[tokens.shape[0] // 2]]))
    return torch.stack(rows)


def probe_accuracy(features: torch.Tensor, labels: list[int], train_frac: float = 0.7, steps: int = 300) -> float:
    """Softmax regression fitted on the first `train_frac` (standardised features, small L2), accuracy on the rest."""
    y = torch.tensor(labels)
    n = int(train_frac * len(labels))
    x = (features - features[:n].mean(0)) / (features[:n].std(0) + 1e-6)        # (figures, dim)
    w = torch.zeros(x.shape[1], len(data.PALETTE), requires_grad=True)
    b = torch.zeros(len(data.PALETTE), requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-3 * (w ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[n:] @ w + b).argmax(1) == y[n:]).float().mean())


def zoom_hits(model, processor: models.VLProcessor, tasks_file: str, max_turns: int) -> str:
    """The policy's own greedy rollouts on the ring_colour tasks of `tasks_file`: how often a zoom it asked for showed
    the colour (its call copied a printed centre closely enough), and how often it then named the colour."""
    tasks = [t for t in data.load_tasks(tasks_file)[0] if t.family == "ring_colour"]
    engine = rollout.make_engine("hf", model=model, processor=processor, temperature=0.0)
    cfg = rollout.RolloutConfig(max_turns=max_turns, max_turn_tokens=160, max_response_tokens=768, template_key="short")
    with SandboxPool() as pool:
        trajs = rollout.rollout(tasks, engine, processor, pool.open, cfg)
    rollout.score_trajectories(trajs, processor)
    called = [t for t in trajs if t.num_tool_calls]
    shown = [t for t in called if any(data.read_zoomed_colour(im) for turn in t.turns for im in turn.images)]
    return (f"{len(trajs)} ring_colour tasks of {tasks_file}, greedy, {max_turns} rounds: accuracy "
            f"{sum(t.correct for t in trajs) / len(trajs):.3f}; {len(called)} called the tool; a zoom showed the colour "
            f"in {len(shown)} of them ({len(shown) / max(len(called), 1):.2f}), named right in "
            f"{sum(t.correct for t in shown)} of those")


def main() -> None:
    parser = argparse.ArgumentParser(description="Linear probe: the colour of ring_colour zooms in visual tokens.")
    parser.add_argument("--model", required=True, help="checkpoint directory (a tiny model or a cold start)")
    parser.add_argument("--n", type=int, default=300, help="ring_colour tasks, one zoom figure each")
    parser.add_argument("--seed", type=int, default=11, help="task seed (not the training or held-out seeds)")
    parser.add_argument("--tasks", default="", help="also roll the policy out on this tasks.json's ring_colour tasks")
    parser.add_argument("--max-turns", type=int, default=3, help="rounds of those rollouts (3: a budget of 2 calls)")
    args = parser.parse_args()
    models.set_cpu_threads()
    torch.manual_seed(0)
    model, processor = models.load_policy(args.model)
    figures, labels, tasks = zoom_figures(args.n, args.seed)
    accuracy = probe_accuracy(visual_features(model, processor, figures), labels)
    # the same figures as the answer step of a trajectory sees them: the task's question, the zoom returned by a call
    docs = [tiny.seeing_document(processor, figure, task.question, task.answer_text, returned=True)
            for figure, task in zip(figures, tasks)]
    read = tiny.answer_accuracy(model, processor, docs)
    print(f"{args.model}: {len(labels)} zoom figures; linear probe accuracy on the held-out 30 %: {accuracy:.3f}; "
          f"greedy answer after the returned zoom: {read:.3f} (chance {1 / len(data.PALETTE):.2f})")
    if args.tasks:
        print(zoom_hits(model, processor, args.tasks, args.max_turns))


if __name__ == "__main__":
    main()

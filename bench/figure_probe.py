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
    answers that name its colour (`tiny.answer_accuracy`; the option's text, as the scripted expert answers). A high probe accuracy with a low answer accuracy means
    the colour is there and the language model does not use it.

How to run
    python bench/figure_probe.py --model runs/ablations/sft/model            # a cold start
    python bench/figure_probe.py --model runs/demo/model --n 300 --seed 11   # the untrained vision tower
    python bench/figure_probe.py --model runs/ablations/model                # after seeing pretraining (tiny.py)
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
import tiny    # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description="Linear probe: the colour of ring_colour zooms in visual tokens.")
    parser.add_argument("--model", required=True, help="checkpoint directory (a tiny model or a cold start)")
    parser.add_argument("--n", type=int, default=300, help="ring_colour tasks, one zoom figure each")
    parser.add_argument("--seed", type=int, default=11, help="task seed (not the training or held-out seeds)")
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


if __name__ == "__main__":
    main()

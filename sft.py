"""sft.py — the supervised cold start: teach the protocol on multi-turn tool-use trajectories (docs/method.md §1, §8).

What this file is
    PyVision-RL starts RL from an SFT checkpoint trained on GPT-4.1-written trajectories. Here the cold start trains on:
      * trajectories of the scripted expert (rollout.py) on the synthetic image/video tasks, produced through the real
        loop and sandbox — including some that recover from a broken first attempt (errors fed back), some that answer
        tool-free tasks directly (`--direct-rate`) and, optionally, some that answer tool-requiring tasks without the
        tool (`--guess-rate`: a cold start that under-uses the tool); their token layout is exactly the RL layout (same
        ids, same action mask);
      * or the official SFT format for GPU users: a JSON list of {"messages": [{"role", "content"}...], "images": [...]}
        where "<image>" marks each image in order (the LLaMA-Factory layout of Agents-X/PyVision-*-SFT-Data).
    The loss is next-token cross-entropy on assistant tokens only (tool outputs and prompts are masked), images included.

How to run
    python sft.py --model runs/tiny --n-image 256 --output-dir runs/sft                 # expert trajectories, CPU
    torchrun --nproc_per_node=8 sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data sft.json --dtype bfloat16 ...

Differences from the official pipeline
    * The official SFT code is not public (LLaMA-Factory style runs, docs/method.md §8). In official-format data every
      assistant turn is closed with <|im_end|> (chat form), while RL actions before an observation are not
      (docs/method.md §11.9); expert trajectories use the RL layout, so both stages see the same token structure.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import config
import data
import models
import rollout
import train
from rollout import Trajectory
from sandbox import SandboxPool


_f = config.config_field


@dataclass
class SFTConfig:
    model: str = _f("", "starting checkpoint (name or path)")
    output_dir: str = _f("runs/sft", "where the trained checkpoint and sft_log.jsonl go")
    data: str = _f("", "official-format SFT JSON; empty: generate scripted-expert trajectories")
    image_tasks: str = _f("", "synthetic image tasks.json for expert trajectories (empty: generated with --seed)")
    video_tasks: str = _f("", "synthetic video tasks.json for expert trajectories (empty: none)")
    n_image: int = _f(256, "image tasks to generate when --image-tasks is empty")
    recover_rate: float = _f(0.15, "fraction of expert trajectories that first write broken code, then fix it")
    direct_rate: float = _f(1.0, "fraction of tool-free tasks answered directly, the rest with code (1.0: always "
                                 "direct, as a model that sees the image)")
    guess_rate: float = _f(0.0, "fraction of tool-requiring tasks answered directly with the right answer (a teacher's "
                                "guess that the correctness filter kept): a cold start that under-uses the tool")
    epochs: int = _f(3, "passes over the trajectories")
    lr: float = _f(1e-3, "AdamW learning rate (linear warm-up, then cosine decay to 10%)")
    warmup_steps: int = _f(20, "steps of linear warm-up: full-size first steps on a new format wreck what the "
                               "starting checkpoint could already do (measured: the tiny model's copying)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(8, "trajectories per optimiser step")
    micro_batch: int = _f(8, "trajectories per forward/backward")
    grad_clip: float = _f(1.0, "max gradient norm")
    max_turns: int = _f(5, "turn budget of the expert's rollouts")
    template_key: str = _f("default", "built-in prompt wording: default, or short (the CPU demo's)")
    video_context: str = _f("on_demand", "video in the sandbox only (on_demand) or its frames in the prompt "
                                         "(full_context): the cold start of each arm of the video comparison")
    dtype: str = _f("float32", "float32 or bfloat16")
    train_vision: bool = _f(False, "also train the vision tower")
    seed: int = _f(0, "seed of tasks, order and initialisation")


def parse_config(argv: Sequence[str] | None = None) -> SFTConfig:
    parser = config.add_config_flags(argparse.ArgumentParser(description="Supervised cold start on multi-turn "
                                                                        "trajectories."), SFTConfig)
    return SFTConfig(**config.given_flags(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------------------------
# Data: expert trajectories or official SFT rows, both as Trajectory records
# ---------------------------------------------------------------------------------------------------------------------

def expert_trajectories(tasks: Sequence[data.Task], processor: models.VLProcessor, cfg: SFTConfig) -> list[Trajectory]:
    """Run the scripted expert through the real loop; keep only trajectories that end correct (the official SFT data
    was filtered the same way)."""
    expert = rollout.ScriptedExpert(processor, recover_rate=cfg.recover_rate,
                                    direct_rate=cfg.direct_rate, guess_rate=cfg.guess_rate, seed=cfg.seed)
    rcfg = rollout.RolloutConfig(max_turns=cfg.max_turns, on_error="feedback", template_key=cfg.template_key,
                                 video_context=cfg.video_context)
    trajs = []
    with SandboxPool() as pool:
        for start in tqdm(range(0, len(tasks), 64), desc="expert trajectories", disable=len(tasks) <= 64):
            trajs += rollout.rollout(tasks[start:start + 64], expert, processor, pool.open, rcfg)
    rollout.score_trajectories(trajs, processor)
    return [t for t in trajs if t.correct]


def official_rows(path: str | Path, processor: models.VLProcessor) -> list[Trajectory]:
    """Official SFT rows -> Trajectory records (assistant tokens in the mask)."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    base = Path(path).parent
    out = []
    for i, row in enumerate(rows):
        messages, image_paths = row.get("messages"), row.get("images", [])
        if not isinstance(messages, list) or not messages:
            raise data.DataError(path, i, "messages", "missing or not a non-empty list")
        images = []
        for p in image_paths:
            full = Path(p) if Path(p).is_absolute() else base / p
            if not full.is_file():
                raise data.DataError(path, i, "images", f"file not found: {full}")
            images.append(Image.open(full).convert("RGB"))
        if messages[0].get("role") != "system":   # the Qwen template's default system turn
            messages = [{"role": "system", "content": "You are a helpful assistant."}] + messages
        ids, mask = [], []
        grids: list[list[int]] = []
        pixel_values: list[torch.Tensor] = []
        used = 0
        for m in messages:
            if m.get("role") not in ("user", "assistant", "system"):
                raise data.DataError(path, i, "messages.role", f"unknown role {m.get('role')!r}")
            content = str(m.get("content", ""))
            n_img = content.count("<image>")
            if used + n_img > len(images):
                raise data.DataError(path, i, "images", f"messages hold more <image> tags than the {len(images)} images")
            content = content.replace("<image>", models.IMAGE_PLACEHOLDER)
            if n_img:
                pv, grid = processor.encode_images(images[used:used + n_img])
                sizes = [int(g.prod()) for g in grid]
                pixel_values += list(torch.split(pv, sizes))
                grids += grid.tolist()
                content = processor.expand_pads(content, grid.tolist())
            used += n_img
            head = processor.encode_text(f"<|im_start|>{m['role']}\n")
            body = processor.encode_text(content) + [processor.eos_id] + processor.encode_text("\n")
            ids += head + body
            mask += [0] * len(head) + ([1] * len(body) if m["role"] == "assistant" else [0] * len(body))
        task = data.Task(id=str(row.get("id", i)), question="", answer="", ability="sft", data_source="sft",
                         image_path=str(image_paths[0]) if image_paths else "")
        out.append(Trajectory(task, i, 0, "image", ids, mask, 0, images, pixel_values, grids))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def sft_loss(model, trajs: Sequence[Trajectory], processor: models.VLProcessor, device, total_tokens: float):
    """Sum of assistant-token NLL in this micro-batch / total assistant tokens in the step (token mean)."""
    batch = train.collate(trajs, processor, device)
    logp, _ = train.action_logprobs(model, batch)                               # (N,) over the assistant tokens
    return -logp.sum() / total_tokens, batch["action_mask"][:, 1:]


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(argv)
    d = train.init_distributed()
    if d.device.type == "cpu":
        models.set_cpu_threads()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, processor = models.load_policy(cfg.model, dtype=cfg.dtype, device=str(d.device))
    if not cfg.train_vision:
        model.model.visual.requires_grad_(False)

    if cfg.data:
        trajs = official_rows(cfg.data, processor)
    else:
        tasks = (data.load_tasks(cfg.image_tasks)[0] if cfg.image_tasks
                 else data.generate_image_tasks(cfg.n_image, cfg.seed + 2000, out / "tasks" / "image"))
        if cfg.video_tasks:
            tasks += data.load_tasks(cfg.video_tasks)[0]
        mine = tasks[d.rank::d.world]
        trajs = expert_trajectories(mine, processor, cfg)
    if d.main:
        print(f"SFT on {len(trajs)} trajectories x {d.world} ranks, "
              f"{np.mean([sum(t.action_mask) for t in trajs]):.0f} assistant tokens each")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(trajs) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, models.warmup_cosine(cfg.warmup_steps, total_steps))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
    model.train()
    rng = random.Random(cfg.seed)
    log = (out / "sft_log.jsonl").open("w") if d.main else None
    bar = tqdm(total=total_steps, disable=not d.main, desc="SFT")
    for epoch in range(cfg.epochs):
        order = list(range(len(trajs)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            step_trajs = [trajs[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            total = train.all_reduce_sum(float(sum(sum(t.action_mask) for t in step_trajs)), d)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(0, len(step_trajs), cfg.micro_batch):
                loss, _ = sft_loss(train_model, step_trajs[m:m + cfg.micro_batch], processor, d.device, total)
                (loss * d.world).backward()   # DDP averages over ranks; the loss is already a global token mean
                loss_sum += float(loss)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            schedule.step()
            loss_sum = train.all_reduce_sum(loss_sum, d)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            if log:
                log.write(json.dumps({"epoch": epoch, "step": bar.n, "loss": loss_sum, "grad_norm": grad_norm,
                                      "lr": schedule.get_last_lr()[0]}) + "\n")
    bar.close()
    if d.main:
        log.close()
        with models.atomic_dir(out / "model", replace=True) as tmp:   # the next stage trusts a complete directory
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        print(f"wrote {out / 'model'}")


if __name__ == "__main__":
    main()

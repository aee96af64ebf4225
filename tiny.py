"""tiny.py — a tiny, offline Qwen2.5-VL that loads like a 7B checkpoint: what the tests and the CPU demo train.

What this file is
    PyVision-RL trains Qwen2.5-VL-7B (docs/method.md §1, §8); no weights can be downloaded on the machines this project is
    tested on. `build_tiny(out_dir)` writes a deterministic, random-weight Qwen2.5-VL with an offline-trained byte-level
    BPE tokenizer (Qwen's special tokens and chat template, digits split as Qwen splits them) and Qwen's image
    processor, so everything downstream uses the very loading path (`models.load_policy`) a real checkpoint uses. The
    demo size then gets a few minutes of text-only copy pretraining (`pretrain_copying`), the one pretrained skill the
    demo's tasks lean on that a random model lacks: repeating a number it has read. Tasks that make the policy read a
    figure it fetched (data.py, ring_colour) lean on a second one, naming the colour it is shown; `--see-steps` adds
    it to a built checkpoint (`pretrain_seeing`, generic pictures; the ablations' model, Makefile `ABL_MODEL`).

How to run
    python tiny.py --out runs/tiny --size test        # ~1 M params, for tests
    python tiny.py --out runs/tiny-demo --size demo   # the CPU demo's policy (with ~8-13 min of copy pretraining)
    python tiny.py --out runs/tiny-see --from runs/tiny-demo --see-steps 400   # + seeing pretraining (~6 min)

Differences from a real checkpoint
    * A 2-layer vision tower with random weights (its features mean nothing until the cold start trains it) and a
      vocabulary of 1-2K tokens learnt from the protocol strings and synthetic tasks; the architecture, special tokens,
      chat template, M-RoPE and image geometry are Qwen2.5-VL's.
    * Written whole or not at all (`models.atomic_dir`); an existing directory is never written into.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import rollout
from models import (CHAT_TEMPLATE, IMAGE_PAD, SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START, VLProcessor,
                    atomic_dir, load_policy, set_cpu_threads, warmup_cosine)

# ---------------------------------------------------------------------------------------------------------------------
# The tiny offline checkpoint
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinySize:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_depth: int
    min_pixels: int
    max_pixels: int
    copy_steps: int = 0      # steps of copy pretraining (see pretrain_copying); 0 leaves the weights random


TINY_SIZES = {
    # forward+backward of 8x512 tokens in ~0.3 s on 2 cores (measured on this project's CPU machine)
    "test": TinySize(vocab_size=1024, hidden=128, layers=2, heads=4, kv_heads=2, vision_hidden=64, vision_depth=2,
                     min_pixels=56 * 56, max_pixels=224 * 224),
    # the CPU demo's policy: one GRPO step of 8 rollouts stays within ~10 s on 2 cores
    "demo": TinySize(vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=2, vision_hidden=128, vision_depth=2,
                     min_pixels=56 * 56, max_pixels=224 * 224, copy_steps=800),
}

# Strings the policy must write and read cheaply: the PyVision protocol (docs/method.md §2) and the runtime's names.
PROTOCOL_SNIPPETS = [
    "<code>\n```python\n", "\n```\n</code>", "<answer>\n\\boxed{", "}\n</answer>",
    "<tool_response>\n<interpreter>\nText Result:\n", "\nImage Result:\n", "</interpreter>\n\n</tool_response>",
    "<image_clue_0>", "</image_clue_0>", "<image_clue_1>", "</image_clue_1>", "image_clue_0", "video_clue_0",
    "plt.show()", "plt.imshow(", "print(", "np.array(", ".crop((", ".getpixel((", "len(video_clue_0)",
    "video_clue_0.get_avg_fps()", ".asnumpy()", "get_batch(", "Image Width: ", "; Image Height: ",
    "Frame Width: ", "; Frame Height: ", "Video Length: ", "; Sample FPS: ",
]


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """A fixed text corpus for the tiny BPE: protocol strings plus synthetic questions and solution code.

    It is generated, not read from disk, so the tokenizer (and hence the checkpoint) is byte-identical on every machine.
    """
    texts = [s * 20 for s in PROTOCOL_SNIPPETS]
    texts += [template * 5 for templates in rollout.BUILTIN_TEMPLATES.values() for template in templates.values()]
    tasks = data.generate_image_tasks(n=120, seed=seed, out_dir=None) + data.generate_video_tasks(n=40, seed=seed, out_dir=None)
    for task in tasks:
        texts.append(task.question + "\n" + task.solution_code + f"\n<answer>\n\\boxed{{{task.answer}}}\n</answer>")
    return texts


def build_tokenizer(vocab_size: int, corpus: Sequence[str]):
    """Byte-level BPE trained on `corpus`, with Qwen's special tokens and chat template. Like Qwen's tokenizer it
    splits numbers into single digits, so a number is the same tokens wherever it appears (question, code, output)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE,
                                        padding_side="left")   # saved with the tokenizer, as Qwen-VL releases do
    return tokenizer


def tiny_config(tokenizer, size: TinySize):
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    half_head = size.hidden // size.heads // 2
    # M-RoPE splits each head's rotary half-dimension into (time, height, width) sections that must sum to it
    spatial = (half_head - half_head // 4) // 2
    mrope_section = [half_head - 2 * spatial, spatial, spatial]
    text = dict(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.hidden * 3,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=size.vision_depth, hidden_size=size.vision_hidden, intermediate_size=size.vision_hidden * 2,
                  num_heads=2, out_hidden_size=size.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[size.vision_depth - 1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids(IMAGE_PAD),
                            video_token_id=ids(VIDEO_PAD), vision_start_token_id=ids(VISION_START),
                            vision_end_token_id=ids(VISION_END), tie_word_embeddings=True)


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, size: str = "test", copy_steps: int | None = None) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint + tokenizer + image processor to `out_dir`, then `copy_steps` of copy
    pretraining (default: the size's). Same seed, same bytes."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose from {sorted(TINY_SIZES)}")
    spec = TINY_SIZES[size] if copy_steps is None else dataclasses.replace(TINY_SIZES[size], copy_steps=copy_steps)
    # an empty directory (a fresh mkdtemp) may be filled; anything else that exists is the user's and is refused
    empty = Path(out_dir).is_dir() and not any(Path(out_dir).iterdir())
    with atomic_dir(out_dir, replace=empty) as out:
        tokenizer = build_tokenizer(spec.vocab_size, tokenizer_corpus(seed))
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, spec))
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        Qwen2VLImageProcessorPil(size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
                                 ).save_pretrained(out)
        (out / "tiny.json").write_text(json.dumps({"size": size, "seed": seed, **spec.__dict__}, indent=1))
        if spec.copy_steps:
            model, processor = load_policy(out)
            log = pretrain_copying(model, processor, spec.copy_steps, seed=seed)
            model.save_pretrained(out)
            (out / "copy_pretraining.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Skills pretraining: what a pretrained VLM already knows and a random tiny one does not
# ---------------------------------------------------------------------------------------------------------------------
# PyVision-RL starts from Qwen2.5-VL, which can copy a number it has just read. The method relies on that twice: code
# reuses the coordinates given in the question, and the answer repeats what the code printed. A random 4 M-parameter
# model does not learn copying from a cold start of a few thousand trajectories (measured: after 512 SFT steps it
# answered with the most frequent value whatever the tool printed, on training tasks too). A few hundred steps of
# text-only pretraining on copy documents give it that skill. The documents carry random values and no task's
# images or answers, so nothing about the evaluation tasks is learnt here.

CALLS = ["getpixel", "crop", "point", "mark", "locate", "inspect", "spread"]
WORDS = ["the", "small", "square", "patch", "image", "at", "of", "is", "what", "which", "colour"]
NAMES = ["red", "green", "blue", "yellow", "black", "white", "grey", "left", "right", "top", "bottom", "first", "second"]


def _number(rng: random.Random, top: int = 799) -> int:
    """A number whose digit count is drawn uniformly (1 up to top's), then its value: with values uniform in 0..799,
    seven in eight have three digits, and the model learnt to write three whatever it read (77 -> 777, 23 -> 233)."""
    digits = rng.randint(1, len(str(top)))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(top, 10 ** digits - 1))


def _copy_document(rng: random.Random) -> list[tuple[str, bool]]:
    """One document as (text, is_target) pieces; the loss is on targets only. Two kinds, half each: read a tool result
    into the answer (the last printed line), or reuse what a question gives in code (numbers in a call, or two points
    in two calls)."""
    if rng.random() < 0.5:
        kind = rng.random()
        if kind < 0.3:
            printed = last = str(_number(rng, 999))
        elif kind < 0.5:
            printed = last = rng.choice("ABCDEFGH")
        elif kind < 0.8:
            last = rng.choice(["A", "B"] + NAMES)
            printed = f"({_number(rng, 255)}, {_number(rng, 255)}, {_number(rng, 255)})\n{last}"
        else:  # measurements, then the verdict: a number or an option letter
            last = rng.choice([str(_number(rng, 99)), "A", "B"])
            printed = f"{rng.uniform(0, 130)} {rng.uniform(0, 130)}\n{last}"
        return [(f"<|im_start|>user\n<tool_response>\n<interpreter>\nText Result:\n{printed}</interpreter>\n\n"
                 f"</tool_response><|im_end|>\n<|im_start|>assistant\n<answer>\n\\boxed{{", False),
                (f"{last}}}\n</answer><|im_end|>\n", True)]
    filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
    call = rng.choice(CALLS)
    if rng.random() < 0.3:
        (x1, y1), (x2, y2) = [(_number(rng), _number(rng)) for _ in range(2)]
        given = f"A. the {rng.choice(WORDS)} at ({x1}, {y1}) B. the {rng.choice(WORDS)} at ({x2}, {y2})"
        code, copied = f"first, second = {call}(", f"{x1}, {y1}), {call}({x2}, {y2})\n"
    else:
        values = [_number(rng) for _ in range(rng.choice([1, 2, 2, 4]))]
        named = len(values) == 2 and rng.random() < 0.5
        given = f"(x={values[0]}, y={values[1]})" if named else "(" + ", ".join(map(str, values)) + ")"
        code, copied = f"result = image_clue_0.{call}((", ", ".join(map(str, values)) + "))\n"
    return [(f"<|im_start|>user\nQuestion: {filler} {given}? {filler}<|im_end|>\n<|im_start|>assistant\n<code>\n"
             f"```python\n{code}", False),
            (copied, True)]


def _copy_row(rng: random.Random, processor: VLProcessor, seq_len: int) -> tuple[list[int], list[int]]:
    """`seq_len + 1` tokens of packed copy documents and their target mask (1 on copied tokens)."""
    ids, mask = [], []
    while len(ids) < seq_len + 1:
        for text, is_target in _copy_document(rng):
            piece = processor.encode_text(text)
            ids += piece
            mask += [int(is_target)] * len(piece)
    return ids[:seq_len + 1], mask[:seq_len + 1]


def _pretrain(params: list, steps: int, lr: float, desc: str, batch_loss) -> list[dict]:
    """The skills' shared loop: AdamW, 20 warm-up steps then cosine, gradient clip 1. `batch_loss()` draws a batch and
    returns (loss, {metric: value}); the log keeps the first step, then every 25."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps=20, total_steps=steps))
    log = []
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        loss, metrics = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step == 0 or (step + 1) % 25 == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": float(loss.detach())} | {k: float(v) for k, v in metrics.items()})
            bar.set_postfix({k: f"{v:.3f}" for k, v in log[-1].items() if k != "step"})
    return log


def pretrain_copying(model, processor: VLProcessor, steps: int, seed: int = 0, batch: int = 32, seq_len: int = 128,
                     lr: float = 1e-3) -> list[dict]:
    """Train the language model on packed copy documents. Returns a log with the loss and the accuracy on the copied
    tokens."""
    rng = random.Random(seed)

    def batch_loss():
        rows = [_copy_row(rng, processor, seq_len) for _ in range(batch)]
        ids = torch.tensor([r[0] for r in rows], device=model.device)                        # (B, L+1)
        target_mask = torch.tensor([r[1] for r in rows], device=model.device)[:, 1:].bool()   # (B, L): copied tokens
        logits = model(input_ids=ids[:, :-1]).logits                                          # (B, L, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")         # (B, L)
        hit = (logits.detach().argmax(-1) == ids[:, 1:])[target_mask].float().mean()
        return nll[target_mask].mean(), {"copy_acc": hit}

    model.train()
    # the head is tied to the embeddings
    log = _pretrain(list(model.model.language_model.parameters()), steps, lr, "copy pretraining", batch_loss)
    model.eval()
    return log


# Seeing. Qwen2.5-VL names the colour of what it is shown; a random tiny model trained only on tasks does not learn to:
# after the cold start its visual tokens held a returned zoom's colour (a linear probe reads it 88 % of the time,
# bench/figure_probe.py) while its answers about that zoom were at chance (docs/results.md, "Multi-call tasks"). A
# few hundred steps on generic pictures, one palette-coloured square or circle each on a white, black or noisy
# background, sometimes framed, sometimes beside black shapes, sometimes blurred by an upscale, teach the language
# model to read colour from visual tokens. The pictures are drawn here, not by any task family, with their own
# random layouts; the answer is the colour's name, with or without options listed (the tasks' option format).

SHAPES = ("square", "circle")
SEE_QUESTIONS = ("What is the colour of the {shape}?", "Which colour is the {shape}?", "What colour is shown?",
                 "Name the colour of the coloured {shape}.")


def _draw(canvas: np.ndarray, shape: str, cx: int, cy: int, half: int, colour) -> None:
    """A filled square of side 2*half+1 or a disc of radius half, centred at (cx, cy)."""
    if shape == "square":
        canvas[max(cy - half, 0):cy + half + 1, max(cx - half, 0):cx + half + 1] = colour
    else:
        yy, xx = np.ogrid[:canvas.shape[0], :canvas.shape[1]]
        canvas[(xx - cx) ** 2 + (yy - cy) ** 2 <= half * half] = colour


def _seeing_picture(rng: random.Random, nrng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """One generic picture -> (picture, shape word, colour name)."""
    w, h = rng.randint(64, 224), rng.randint(64, 224)
    background = rng.choice(["white", "black", "noise", "coarse noise"])
    if background in ("white", "black"):
        canvas = np.full((h, w, 3), 255 if background == "white" else 0, np.uint8)                       # (H, W, 3)
    else:
        cell = 1 if background == "noise" else rng.choice([2, 4, 6])
        grain = nrng.integers(90, 171, size=(h // cell + 1, w // cell + 1, 1), dtype=np.uint8).repeat(3, axis=2)
        canvas = grain.repeat(cell, axis=0).repeat(cell, axis=1)[:h, :w].copy()                          # (H, W, 3)
    for _ in range(rng.randint(0, 2)):   # black distractors, possibly under the coloured shape
        _draw(canvas, rng.choice(SHAPES), rng.randrange(w), rng.randrange(h), rng.randint(3, min(w, h) // 5), 0)
    shape, colour = rng.choice(SHAPES), rng.choice(list(data.PALETTE))
    half = rng.randint(1, min(w, h) // 4)
    thickness, gap = rng.randint(1, 8), rng.randint(0, 12)
    framed = rng.random() < 0.5 and 2 * (half + gap + thickness) + 2 < min(w, h)
    reach = half + gap + thickness if framed else half
    cx, cy = rng.randint(reach, w - 1 - reach), rng.randint(reach, h - 1 - reach)
    if framed:   # a black square frame around the shape, the background kept inside it
        inner = canvas[cy - half - gap:cy + half + gap + 1, cx - half - gap:cx + half + gap + 1].copy()
        canvas[cy - reach:cy + reach + 1, cx - reach:cx + reach + 1] = 0
        canvas[cy - half - gap:cy + half + gap + 1, cx - half - gap:cx + half + gap + 1] = inner
    _draw(canvas, shape, cx, cy, half, data.PALETTE[colour])
    picture = Image.fromarray(canvas)
    if rng.random() < 0.4:   # seen through a zoom: a coarser picture upscaled, edges blurred
        factor = rng.choice([2, 3, 4])
        picture = picture.resize((max(w // factor, 8), max(h // factor, 8)), Image.NEAREST).resize((w, h), Image.BICUBIC)
    return picture, shape, colour


def seeing_document(processor: VLProcessor, picture: Image.Image, question: str, answer: str,
                    returned: bool) -> rollout.Trajectory:
    """A question about a picture and its answer as a record whose target mask covers the answer's value. The picture
    sits in the question (the first user turn's layout) or, when `returned`, comes back from a tool call (an observation
    turn's layout, rollout.observation_text) after a question without it."""
    if returned:
        context = (processor.apply_chat_template([{"role": "user", "content": question}])
                   + "<code>\n```python\nimage_clue_0.show()\n```\n</code>" + rollout.observation_text("image", "", 1, 1))
    else:
        content = [{"type": "text", "text": "<image_clue_0>"}, {"type": "image"},
                   {"type": "text", "text": "</image_clue_0>\n" + question}]
        context = processor.apply_chat_template([{"role": "user", "content": content}])
    pixel_values, grid = processor.encode_images([picture])
    ids = processor.encode_text(processor.expand_pads(context + "<answer>\n\\boxed{", grid.tolist()))
    target = processor.encode_text(f"{answer}}}\n</answer>")
    task = data.Task(id="seeing", question=question, answer=answer, ability="pretraining", data_source="tiny")
    return rollout.Trajectory(task, 0, 0, "image", ids + target, [0] * len(ids) + [1] * len(target), len(ids),
                              [picture], [pixel_values], grid.tolist())


def _seeing_row(rng: random.Random, nrng: np.random.Generator, processor: VLProcessor) -> rollout.Trajectory:
    """A seeing document on a fresh picture, answered with the colour's name; half the questions list the colours as
    shuffled options (answered by the option's text, as the scripted expert answers), half the pictures sit in the
    question and half come back from a tool."""
    picture, shape, colour = _seeing_picture(rng, nrng)
    question = rng.choice(SEE_QUESTIONS).format(shape=shape)
    if rng.random() < 0.5:
        choices = list(data.PALETTE)
        rng.shuffle(choices)
        question += " Options: " + " ".join(f"{data.LETTERS[k]}. {c}" for k, c in enumerate(choices))
    return seeing_document(processor, picture, question, colour, returned=rng.random() < 0.5)


@torch.no_grad()
def answer_accuracy(model, processor: VLProcessor, docs: Sequence[rollout.Trajectory], batch: int = 16) -> float:
    """Share of documents whose answer's first token (the colour's name) is the model's greedy choice."""
    hits = []
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        logits = model(**rollout.batch_inputs(chunk, processor, model.device, side="right")).logits   # (B, T, V)
        for row, doc in zip(logits, chunk):
            hits.append(int(row[doc.prompt_len - 1].argmax()) == doc.input_ids[doc.prompt_len])
    return sum(hits) / len(hits)


def pretrain_seeing(model, processor: VLProcessor, steps: int, seed: int = 0, batch: int = 16, copy_rows: int = 4,
                    lr: float = 1e-3) -> list[dict]:
    """Train the whole model (vision tower, merger, language model) on seeing documents, with `copy_rows` rows of copy
    documents in every batch so the copying skill is kept. Returns a log with the loss, the accuracy on the answers'
    first token (the colour's name) and on copied tokens."""
    rng, nrng = random.Random(seed + 1), np.random.default_rng(seed + 1)

    def batch_loss():
        docs = [_seeing_row(rng, nrng, processor) for _ in range(batch)]
        for _ in range(copy_rows):
            ids, mask = _copy_row(rng, processor, 128)
            docs.append(rollout.Trajectory(docs[0].task, 0, 0, "image", ids, mask, 0, [], [], []))
        inputs = rollout.batch_inputs(docs, processor, model.device, side="right")
        targets, _ = processor.pad([d.action_mask for d in docs], side="right", value=0)         # (B, T)
        targets = targets.to(model.device)[:, 1:].bool()                                        # (B, T-1)
        logits = model(**inputs).logits[:, :-1]                                                  # (B, T-1, V)
        labels = inputs["input_ids"][:, 1:]                                                      # (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")                  # (B, T-1)
        hit = logits.detach().argmax(-1) == labels                                               # (B, T-1)
        first = targets & ~F.pad(targets, (1, 0))[:, :-1]           # the first target token of each document
        first[batch:] = False
        return nll[targets].mean(), {"see_acc": hit[first].float().mean(),
                                     "copy_acc": hit[batch:][targets[batch:]].float().mean()}

    model.train()
    log = _pretrain(list(model.parameters()), steps, lr, "seeing pretraining", batch_loss)
    model.eval()
    return log


def add_seeing(src: str | os.PathLike, out_dir: str | os.PathLike, steps: int, seed: int = 0) -> Path:
    """Copy the tiny checkpoint `src` to `out_dir` with `steps` of seeing pretraining added; its log goes beside it
    (seeing_pretraining.jsonl) and tiny.json records the steps. `src` is only read."""
    if not (Path(src) / "tiny.json").is_file():
        raise ValueError(f"--from {src}: not a tiny checkpoint (no tiny.json); seeing pretraining is for tiny models")
    info = json.loads((Path(src) / "tiny.json").read_text())
    with atomic_dir(out_dir) as out:
        model, processor = load_policy(src)
        torch.manual_seed(seed)
        log = pretrain_seeing(model, processor, steps, seed=seed)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        if (Path(src) / "copy_pretraining.jsonl").is_file():
            (out / "copy_pretraining.jsonl").write_bytes((Path(src) / "copy_pretraining.jsonl").read_bytes())
        (out / "seeing_pretraining.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
        (out / "tiny.json").write_text(json.dumps(info | {"see_steps": steps, "see_seed": seed}, indent=1))
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (a normal Hugging Face checkpoint directory)")
    parser.add_argument("--size", default="test", choices=sorted(TINY_SIZES), help="'test' for tests, 'demo' for the demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus")
    parser.add_argument("--copy-steps", type=int, default=None, help="steps of copy pretraining (default: the size's)")
    parser.add_argument("--from", dest="source", default=None,
                        help="a tiny checkpoint to continue instead of building one (with --see-steps)")
    parser.add_argument("--see-steps", type=int, default=0, help="steps of seeing pretraining (pretrain_seeing) added "
                                                                 "to the --from checkpoint")
    args = parser.parse_args()
    if args.see_steps < 0 or (args.source is None) != (args.see_steps == 0):
        parser.error("--from and --see-steps go together: --from CHECKPOINT --see-steps N (N > 0)")
    set_cpu_threads()
    path = (add_seeing(args.source, args.out, args.see_steps, seed=args.seed) if args.source
            else build_tiny(args.out, seed=args.seed, size=args.size, copy_steps=args.copy_steps))
    n_params = sum(p.numel() for p in load_policy(path)[0].parameters())
    print(f"wrote {path} ({n_params / 1e6:.2f} M parameters)")


if __name__ == "__main__":
    main()

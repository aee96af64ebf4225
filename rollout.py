"""rollout.py — the multi-turn agent loop: think -> code -> tool output -> ... -> answer, token-in token-out.

What this file is
    The heart of PyVision-RL (docs/method.md §2, §12 "rollout"). A batch of tasks x n samples becomes `Trajectory` records. Each
    trajectory is ONE token sequence, built incrementally and never re-tokenized:
        prompt | action_1 | observation_1 | action_2 | ... | action_k
    with an action mask that is 1 exactly on model-generated tokens, plus every image in context (the input image and each
    figure the tool returned) as pixel values and grid sizes, so the trainer can recompute log-probs over the full
    interleaved sequence (docs/method.md §2.5).

    The protocol is the official one, string for string (docs/method.md §2.1-§2.4):
      * actions stop at `</code>` (kept); code is the last ```python block inside <code>...</code> (fallback: the last bare
        ```python block); the last `<answer>...</answer>` ends the episode unless it is empty;
      * observations are new user turns `<tool_response><interpreter>Text Result: ... Image Result: <image_clue_k>...`,
        opened with `\n<|im_start|>user\n` and closed with `<|im_end|>\n<|im_start|>assistant\n` (the action before an
        observation is not closed with <|im_end|>);
      * end reasons DONE, ERROR_IN_ACTION, OVER_LENGTH, EXCEED_MAX_TURNS, EXCEED_MAX_IMAGE_NUM, checked in that order
        (plus our ENGINE_ERROR, see below).

    Engines share one interface (`Engine.generate(requests) -> results`): `hf` (transformers generate, batched, CPU or GPU),
    `vllm` (lazy import, GPU) and `scripted` (an expert that writes the tasks' real solution code and answers with what
    it printed; it drives the same loop, sandbox and parsing as a model).

    `write_html` is the viewer: a summary (accuracy, end reasons, tool calls, failed calls) linking to every sample,
    then each GRPO group side by side with rewards, advantages, OFR's verdicts and why each trajectory ended — the
    sandbox's error included, which `Turn.tool_error` keeps even when the error ended the episode unseen by the model.

How to run
    rollout.py is a library (train.py, eval.py and sft.py drive it). To watch the loop with the expert as the policy:
    python eval.py --engine scripted --data runs/demo/data/heldout/tasks.json --output-dir runs/eval/expert
    (then open runs/eval/expert/trajectories.html); `python -m pytest -q tests/test_rollout.py` runs its checks.

Differences from the official code
    * The instruction text is a template. We ship our own wording (same instructions, same placeholders); pass the
      official `rl_system_prompt_template.json` with `--template-file FILE --template-key KEY` to give the released
      checkpoints exactly the prompt they were trained on.
    * On EXCEED_MAX_TURNS the last code is not executed (the official code executes it and throws the result away).
    * Errors can be fed back to the model (`on_error="feedback"`, the predecessor PyVision's behaviour) instead of ending
      the trajectory (`"terminate"`, what the paper trained with, the default).
    * Tool text is truncated to `max_tool_text_chars` (head and tail kept); the official code has no bound. Sandbox
      notes (interpreter reset after a timeout, figures dropped or downscaled) are appended to it in brackets.
    * A call that ends in `sys.exit()` counts as a successful call (the official runtime reports it as an error).
    * `num_tool_calls` counts observations appended to the trajectory. The official `tool_call_cnt`
      (`verl_agents/verl/workers/agent/parallel_env.py`) is raised once the code has run, before the observation's
      length check, so a call whose observation would overflow the context (the trajectory ends OVER_LENGTH, the
      observation is not appended) counts there and not here. Only the reported tool-call statistics differ, by at
      most one call: such a trajectory holds no answer, so it is wrong and earns no tool bonus on either side. Kept:
      here a call counts when the model saw its result.
    * A trajectory whose prompt leaves no room in the engine's context (`max_model_len`, vLLM) ends as OVER_LENGTH
      before generating, as the official loop ends an over-long one. A prompt vLLM refuses, or expands to another
      length than ours (the two image processors would disagree on an image's size, and training would score other
      pixels than were sampled from), ends that trajectory alone as ENGINE_ERROR (our end reason, not an official one)
      with a logged message; OFR drops it. vLLM's core runs in the trainer's process (weights handed over in memory).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence

import torch
from PIL import Image

import reward
from config import config_field as _f
from data import Task, read_zoomed_colour
from models import IMAGE_PLACEHOLDER, VLProcessor
from video_context import video_info, video_prompt

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# The protocol strings (docs/method.md §2)
# ---------------------------------------------------------------------------------------------------------------------

STOP = "</code>"
# sandbox statuses that count as a successful call: "exit" is code that called sys.exit() after doing its work
OK_STATUSES = ("ok", "exit")
OBS_OPEN = "\n<|im_start|>user\n"
OBS_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
CODE_RE = re.compile(r"<code>\s*```python\s*(.*?)\s*```\s*</code>", re.DOTALL)
BARE_CODE_RE = re.compile(r"```python\s*(.*?)\s*```", re.DOTALL)


class EndReason:
    DONE = "DONE"
    ERROR_IN_ACTION = "ERROR_IN_ACTION"
    OVER_LENGTH = "OVER_LENGTH"
    EXCEED_MAX_TURNS = "EXCEED_MAX_TURNS"
    EXCEED_MAX_IMAGE_NUM = "EXCEED_MAX_IMAGE_NUM"   # official name: EXCEED_MAX_IMAGE_NUM_32
    ENGINE_ERROR = "ENGINE_ERROR"   # ours: the engine refused this trajectory's prompt (Trajectory.error says why)


# Our own wording of the two official templates (`vistool_with_img_info_v2`, `vis_tool_with_img_info_video_v4`): the same
# instructions in the same order, the same placeholders ({query}, {width}, {height} / {video_info}), the same code and
# answer formats. Doubled braces are literal braces after str.format, as in the official JSON.
_AGENT_PREAMBLE = (
    "You are an agent: keep working until the user's question is fully answered, and only end your turn once you are "
    "sure it is solved.\n\n"
    "Solve the problem step by step. You can write executable Python code to support your reasoning; an external sandbox "
    "runs it and returns its output.\n\n"
    "Think carefully before each call and reflect on the results of earlier calls. Do not rely on calls alone: reason "
    "about what you see.\n\n")
_FORMAT_RULES = (
    "The sandbox output comes back wrapped in `<interpreter>output_str</interpreter>`. Write complete scripts, "
    "including the imports they need. Wrap every code snippet as `<code>\n```python\ncode snippet\n```\n</code>`.\n"
    "End your response with the final answer in this format:\n<answer>\n\\boxed{{'The final answer goes here.'}}\n"
    "</answer>\n\n")
_CLOSING = ("Remember to end with the final answer in the format: \n<answer>\n\\boxed{{'The final answer goes here.'}}\n"
            "</answer>")
DEFAULT_TEMPLATES = {
    "image": _AGENT_PREAMBLE
    + "Each provided image, in order, is already loaded as the global variable `image_clue_i` (opened with "
      "PIL.Image.open()). Use these variables directly; there is no need to load the images again.\n\n"
      "This is a visual question answering task: use the Python tool (for example matplotlib) to analyse or transform "
      "the images whenever it helps, e.g. zooming in, rotating, adjusting contrast, computing statistics or isolating "
      "features.\n\n"
      "To look at an image you produce, call plt.show(); do not save it. Do not use image processing libraries such as "
      "cv2 or PIL. To inspect a value, print() it.\n\n"
    + _FORMAT_RULES
    + "*image resolution:*\n\nImage Width: {width}; Image Height: {height}\n\n"
      "*user question:*\nAnswer the following Problem with an image provided and put the answer in the format of "
      "\\boxed{{answer}}\n\n{query}\n\n"
    + _CLOSING,
    "video": _AGENT_PREAMBLE
    + "Each provided video, in order, is already loaded as the global variable `video_clue_j` (opened with "
      "VideoReader()). Use these variables directly; there is no need to load the videos again.\n\n"
      "This is a visual question answering task: use the Python tool (for example matplotlib) to analyse or transform "
      "images whenever it helps, e.g. zooming in, rotating, adjusting contrast, computing statistics or isolating "
      "features. You can also sample frames from the videos with Python (decord-style API).\n\n"
      "Note:\n1. To look at an image you produce, call plt.show(); do not save it.\n"
      "2. Do not use image processing libraries such as cv2 or PIL.\n"
      "3. You CANNOT see the video directly: to reason about it, sample frames and show them with plt.show().\n"
      "4. To inspect a value, print() it.\n"
      "5. If the frames you have are not enough, sample more frames from `video_clue_0` with Python.\n\n"
    + _FORMAT_RULES
    + "*Video Information:*\n\n{video_info}\n\n"
      "*User Question:*\nAnswer the following Problem with an image provided and put the answer in the format of "
      "\\boxed{{answer}}\n\n{query}\n\n"
    + _CLOSING,
}


# A short wording for the CPU demo: same protocol, same placeholders, ~80 tokens instead of ~1000, so a tiny model
# trains on 2 cores in minutes. Chosen with `template_key="short"` (no file).
SHORT_TEMPLATES = {
    "image": "Answer the question about the image. It is loaded as `image_clue_0` (PIL). When the detail matters, "
             "run Python: <code>\n```python\ncode\n```\n</code>. Then answer as <answer>\n\\boxed{{answer}}\n"
             "</answer>.\nImage Width: {width}; Image Height: {height}\nQuestion: {query}",
    "video": "Answer the question about the video. You cannot see it: it is loaded as `video_clue_0` (decord-style "
             "reader); show the frames you need with plt.show(). Run Python as <code>\n```python\ncode\n```\n"
             "</code>. Then answer as <answer>\n\\boxed{{answer}}\n</answer>.\n{video_info}\nQuestion: {query}",
}
BUILTIN_TEMPLATES = {"default": DEFAULT_TEMPLATES, "short": SHORT_TEMPLATES}


def load_template(template_file: str | Path | None, template_key: str | None, mode: Literal["image", "video"]) -> str:
    """Without a file, `template_key` picks a built-in set ("default" or "short"); with a file, a key in it."""
    if not template_file:
        if (template_key or "default") not in BUILTIN_TEMPLATES:
            raise KeyError(f"no built-in template set {template_key!r}; use {sorted(BUILTIN_TEMPLATES)} or a file")
        return BUILTIN_TEMPLATES[template_key or "default"][mode]
    templates = json.loads(Path(template_file).read_text(encoding="utf-8"))
    if template_key not in templates:
        raise KeyError(f"{template_file}: no template named {template_key!r}; it has {sorted(templates)}")
    return templates[template_key]


def render_prompt(question: str, width: int | None = None, height: int | None = None, video_info: str | None = None,
                  template_file: str | Path | None = None, template_key: str | None = None) -> str:
    """Instruction text of the first user turn: image mode with width/height, video mode with video_info."""
    if video_info is not None:
        return load_template(template_file, template_key, "video").format(query=question, video_info=video_info)
    if width is None or height is None:
        raise ValueError("render_prompt needs width and height (image mode) or video_info (video mode)")
    return load_template(template_file, template_key, "image").format(query=question, width=width, height=height)


def parse_action(text: str) -> tuple[str | None, str | None]:
    """-> (answer, code): the last <answer> block wins; else the last code block (official order, docs/method.md §2.2).
    An empty last block (`<answer></answer>`) is no answer and the code block still runs: the official tool
    (`verl_agents/verl/workers/agent/envs/agents_x/safe_persis_python_exe_tool_*.py`) tests the answer's truthiness.
    Whitespace alone is truthy, so `<answer> </answer>` ends the episode there and here."""
    answers = ANSWER_RE.findall(text)
    if answers and answers[-1]:
        return answers[-1], None
    blocks = CODE_RE.findall(text) or BARE_CODE_RE.findall(text)
    return None, (blocks[-1] if blocks else None)


def truncate_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head, tail = limit // 2, limit - limit // 2
    return f"{text[:head]}\n...[{len(text) - limit} characters truncated]...\n{text[-tail:]}"


def observation_text(mode: Literal["image", "video"], text: str, first_label: int, num_images: int) -> str:
    """The official observation turn (docs/method.md §2.3). The image and video sandboxes differ in one newline each."""
    if num_images == 0:
        trail = "\n" if mode == "video" else ""
        body = f"<interpreter>\nText Result:\n{text}{trail}</interpreter>"
    else:
        lead = "\n" if mode == "video" else ""
        labels = "".join(f"<image_clue_{k}>{IMAGE_PLACEHOLDER}</image_clue_{k}>"
                          for k in range(first_label, first_label + num_images))
        body = f"<interpreter>{lead}Text Result:\n{text}\nImage Result:\n{labels}</interpreter>"
    return f"{OBS_OPEN}<tool_response>\n{body}\n\n</tool_response>{OBS_CLOSE}"


def error_observation(message: str) -> str:
    return f"{OBS_OPEN}<tool_response>\n<interpreter>Error: {message}</interpreter>\n\n</tool_response>{OBS_CLOSE}"


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Turn:
    action: str                     # model text of this turn
    action_tokens: int
    finish_reason: str              # "stop" (</code>), "eos", "length"
    code: str | None = None
    exec_status: str | None = None  # sandbox status, when code ran
    tool_error: str | None = None   # the sandbox's error (traceback, timeout, ...), kept even when it ends the episode
    observation: str | None = None  # appended observation text (None when nothing was appended)
    images: list[Image.Image] = field(default_factory=list)   # figures returned in this turn
    generate_s: float = 0.0
    tool_s: float = 0.0


@dataclass
class Trajectory:
    """One rollout: the token sequence the trainer needs, and what the logs, reward and OFR need."""
    task: Task
    group_id: int                    # index of the prompt in its batch: the GRPO group
    sample_index: int                # which of the n samples of the group
    mode: Literal["image", "video"]
    input_ids: list[int]             # prompt + actions + observations
    action_mask: list[int]           # 1 on model-generated tokens only
    prompt_len: int
    images: list[Image.Image]        # every image in context, in order (input image first in image mode)
    pixel_values: list[torch.Tensor] # one (patches, dim) tensor per image, in order
    image_grid_thw: list[list[int]]  # one [t, h, w] per image
    video_inputs: dict = field(default_factory=dict)   # full-context video mode: pixel_values_videos etc.
    turns: list[Turn] = field(default_factory=list)
    end_reason: str | None = None
    error: str | None = None         # ENGINE_ERROR: what the engine said about this trajectory's prompt
    num_tool_calls: int = 0
    num_returned_images: int = 0
    vision_consistent: bool = True   # image placeholders in the ids match the images (set at the end of the rollout)
    image_s: float = 0.0             # time spent turning images into pixel values for this trajectory
    # filled by reward.py
    reward: float = 0.0
    correct: bool = False
    reward_parts: object | None = None

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def final_action(self) -> str:
        return self.turns[-1].action if self.turns else ""

    @property
    def answered_directly(self) -> bool:
        """The first action was the final answer: no tool call tried. A call whose code failed, or that never became
        well-formed code, ran no tool (`num_tool_calls` stays 0) but was an attempt: it is not a direct answer."""
        return len(self.turns) == 1 and self.end_reason == EndReason.DONE

    def response_text(self, processor: VLProcessor) -> str:
        return processor.decode(self.response_ids)

    def visual_tokens(self, processor: VLProcessor) -> int:
        grids = self.image_grid_thw + self.video_inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist()
        return sum(processor.tokens_for_grid(g) for g in grids)

    def check_vision_consistency(self, processor: VLProcessor) -> bool:
        """Image placeholders in the ids match the images (official `vtoken_images_num_consis` filter)."""
        ids = torch.tensor(self.input_ids)
        starts = int(((ids[:-1] == processor.vision_start_id) & (ids[1:] == processor.image_pad_id)).sum())
        pads = int((ids == processor.image_pad_id).sum())
        # a sampled <|video_pad|> with no video behind it would crash M-RoPE in the update: it counts as inconsistent
        video_grids = self.video_inputs.get("video_grid_thw")
        video_expected = sum(processor.tokens_for_grid(g) for g in video_grids.tolist()) if video_grids is not None else 0
        return (starts == len(self.image_grid_thw) and video_expected == int((ids == processor.video_pad_id).sum())
                and pads == sum(processor.tokens_for_grid(g) for g in self.image_grid_thw))

    def model_inputs(self, processor: VLProcessor) -> dict:
        """Inputs for one forward pass over the whole trajectory (batch of 1)."""
        ids = torch.tensor([self.input_ids])                                 # (1, T)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": processor.mm_token_type_ids(ids)}
        if self.pixel_values:
            out["pixel_values"] = torch.cat(self.pixel_values)               # (sum patches, dim)
            out["image_grid_thw"] = torch.tensor(self.image_grid_thw)        # (N_images, 3)
        return out | self.video_inputs


# ---------------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class GenRequest:
    trajectory: Trajectory
    max_new_tokens: int


@dataclass
class GenResult:
    token_ids: list[int]
    finish_reason: Literal["stop", "eos", "length", "error"]
    error: str | None = None   # finish "error": why the engine refused this request (the batch's others went on)


class Engine(Protocol):
    """`generate` answers every request, in order. An engine with a context window says so in `max_model_len`
    (prompt plus new tokens); the loop then ends a trajectory that has no room left as OVER_LENGTH."""

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]: ...


def batch_inputs(trajs: Sequence[Trajectory], processor: VLProcessor, device, side: str = "left") -> dict:
    """Model inputs for a batch of whole trajectories: padded ids with their token types, and every image (and video)
    of every trajectory in order. Generation pads on the left, the trainer on the right."""
    ids, attention = processor.pad([t.input_ids for t in trajs], side=side)         # (B, T), (B, T)
    inputs = {"input_ids": ids, "attention_mask": attention, "mm_token_type_ids": processor.mm_token_type_ids(ids)}
    pixel_values = [pv for t in trajs for pv in t.pixel_values]
    if pixel_values:
        inputs["pixel_values"] = torch.cat(pixel_values)                             # (sum patches, dim)
        inputs["image_grid_thw"] = torch.tensor([g for t in trajs for g in t.image_grid_thw])   # (N_images, 3)
    videos = [t.video_inputs for t in trajs if t.video_inputs]
    if videos:
        inputs.update({k: torch.cat([v[k] for v in videos]) for k in videos[0]})
    return {k: v.to(device) for k, v in inputs.items()}


def cut_at_stop(token_ids: list[int], processor: VLProcessor, stop: str = STOP) -> tuple[list[int], bool]:
    """Keep tokens up to and including the stop string; re-encode the last token when it overhangs the stop.

    A token can straddle the end of `</code>` (e.g. a merged `>\\n` in Qwen's vocabulary); the kept text then ends exactly
    at the stop string, as with vLLM's include_stop_str_in_output.
    """
    text = processor.decode(token_ids)
    at = text.find(stop)
    if at < 0:
        return token_ids, False
    end = at + len(stop)
    # generation halts right after the stop, so the shortest prefix that still holds it is found from the end in a
    # decode or two (scanning from the start would decode every prefix: quadratic in the turn length)
    k = len(token_ids)
    while k > 1 and len(processor.decode(token_ids[:k - 1])) >= end:
        k -= 1
    if len(processor.decode(token_ids[:k])) == end:
        return token_ids[:k], True
    head = processor.decode(token_ids[:k - 1])   # the k-th token overhangs the stop: keep only its part up to `end`
    return token_ids[:k - 1] + processor.encode_text(text[len(head):end]), True


class HFEngine:
    """transformers `generate` over all active trajectories at once (left-padded batch), with the `</code>` stop."""

    def __init__(self, model, processor: VLProcessor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        self.model, self.processor = model, processor
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        p = self.processor
        inputs = batch_inputs([r.trajectory for r in requests], p, self.model.device, side="left")
        width = inputs["input_ids"].shape[1]
        # every knob explicit: otherwise the checkpoint's generation_config.json (e.g. top_k, repetition_penalty of an
        # Instruct release) would silently change the sampling distribution
        sampling = dict(do_sample=False, repetition_penalty=1.0)   # greedy: the sampling knobs would only warn
        if self.temperature > 0:
            sampling |= dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0))
        out = self.model.generate(**inputs, max_new_tokens=max(r.max_new_tokens for r in requests),
                                  stop_strings=[STOP], tokenizer=p.tokenizer, eos_token_id=p.eos_id,
                                  pad_token_id=p.pad_id, **sampling)
        results = []
        for b, r in enumerate(requests):
            new = out[b, width:].tolist()
            if p.pad_id in new:   # rows that finished early are padded by generate
                new = new[:new.index(p.pad_id)]
            if p.eos_id in new:
                results.append(GenResult(new[:new.index(p.eos_id) + 1], "eos"))
                continue
            new, stopped = cut_at_stop(new, p)
            if len(new) > r.max_new_tokens:
                new, stopped = new[:r.max_new_tokens], False
            results.append(GenResult(new, "stop" if stopped else "length"))
        return results

    @torch.no_grad()
    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new (name, full tensor) weights into the engine's model, for when it holds a replica of the policy
        (train.py under FSDP2, whose sharded policy cannot run `generate` rank by rank)."""
        own = self.model.state_dict()
        for name, tensor in weights:
            own[name].copy_(tensor)


class ScriptedExpert:
    """An expert policy for the synthetic tasks: it writes the task's solution code, reads what the sandbox printed and
    answers with the last printed line. It sees exactly what a model sees (its own context), so the whole loop —
    parsing, sandbox, observation format, budgets — is exercised for real. A multi-call task (`follow_up_code`) gets
    its calls one per turn; a call that only shows a figure is read with `data.read_zoomed_colour`, which answers or,
    when the figure holds nothing (an empty ring), leads to the next call.

    Variants used for the SFT cold start: `recover_rate` writes a broken first attempt (a typo'd name) before the real
    code, which only helps when errors are fed back (`on_error="feedback"`); `direct_rate` answers that fraction of the
    tool-free tasks (`needs_tool=False`) directly, as a model that sees the image would, and the rest with code;
    `guess_rate` answers that fraction of the tool-requiring tasks directly too, as a teacher that answered without
    looking and was kept by the correctness filter because its answer happened to be right.
    """

    def __init__(self, processor: VLProcessor, recover_rate: float = 0.0, direct_rate: float = 0.0,
                 guess_rate: float = 0.0, seed: int = 0):
        self.processor, self.seed = processor, seed
        self.recover_rate, self.direct_rate, self.guess_rate = recover_rate, direct_rate, guess_rate

    def _coin(self, traj: Trajectory, what: str) -> float:
        # a draw per (seed, task, sample, choice), so it does not depend on batching or on which rank runs it; a real
        # hash, since CRC32 is linear: keys that differ in one character get correlated draws
        key = f"{self.seed}/{traj.task.id}/{traj.sample_index}/{what}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2 ** 64

    def _say(self, text: str, finish: str) -> GenResult:
        ids = self.processor.encode_text(text) + ([self.processor.eos_id] if finish == "eos" else [])
        return GenResult(ids, finish)

    def _act(self, traj: Trajectory) -> GenResult:
        task = traj.task
        if task.solution_code is None:
            raise ValueError(f"task {task.id}: the scripted expert needs a task with solution_code (synthetic tasks)")
        answer_with = lambda a: self._say(f"<answer>\n\\boxed{{{a}}}\n</answer>", "eos")
        if not traj.turns:
            # tool-free tasks use direct_rate, tool-requiring ones guess_rate; a task that does not say always gets code
            answer_direct_p = {True: self.guess_rate, False: self.direct_rate}.get(task.needs_tool, 0.0)
            if self._coin(traj, "direct") < answer_direct_p:
                # a multiple-choice answer by the option's text, as the solution code prints it
                return answer_with(task.answer_text)
            if self._coin(traj, "recover") < self.recover_rate:
                broken = task.solution_code.replace("image_clue_0", "image_clue", 1).replace("video_clue_0", "video_clue", 1)
                return self._say(f"Let me inspect the {traj.mode} with code.\n<code>\n```python\n{broken}\n```\n</code>", "stop")
        calls = [task.solution_code, *(task.follow_up_code or [])]
        done = sum(t.exec_status in OK_STATUSES for t in traj.turns)   # calls that ran; a failed one is written again
        last = traj.turns[-1] if traj.turns else None
        if last is not None and last.exec_status in OK_STATUSES:
            printed = re.search(r"Text Result:\n(.*?)(?:\nImage Result:|\n?</interpreter>)", last.observation or "",
                                re.DOTALL)
            # what the code printed, without the sandbox's own bracketed notes (a restart, a dropped figure)
            lines = [line for line in (printed.group(1).strip().splitlines() if printed else [])
                     if not (line.startswith("[") and line.endswith("]"))]
            if task.follow_up_code and not lines and last.images:   # a zoom: read the answer off it, if it holds one
                seen = read_zoomed_colour(last.images[-1])
                if seen is not None:
                    return answer_with(seen)
            if done == len(calls):   # no call left: the answer is what the last one printed
                return answer_with(lines[-1].strip() if lines else "unknown")
        why = "Let me inspect the" if last is None else (
            "That failed; let me fix the code and inspect the" if last.exec_status not in OK_STATUSES else
            "Let me look closer at the")
        return self._say(f"{why} {traj.mode} with code.\n<code>\n```python\n{calls[done]}\n```\n</code>", "stop")

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        return [self._act(r.trajectory) for r in requests]


def vllm_prompt(traj: Trajectory, processor: VLProcessor) -> dict:
    """A trajectory as a vLLM prompt: its token ids with each run of image pads collapsed to the single placeholder
    vLLM expands itself, plus its images."""
    ids, pad = [], processor.image_pad_id
    for tok in traj.input_ids:
        if not (tok == pad and ids and ids[-1] == pad):
            ids.append(tok)
    prompt = {"prompt_token_ids": ids}
    if traj.images:
        prompt["multi_modal_data"] = {"image": list(traj.images)}
    return prompt


@contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in the main thread once `seconds` have passed (a SIGALRM timer; setting it fails outside the
    main thread). It interrupts Python code and sleeps; a call blocked inside C returns first (a hung NCCL collective
    is ended by the process group's own timeout)."""
    def expire(signum, frame):
        raise TimeoutError
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class VLLMEngine:
    """vLLM rollouts (GPU only; `pip install -e .[vllm]`), colocated with the trainer in its process.

    Prompts go in as token ids plus PIL images. vLLM expands each image's single `<|image_pad|>` itself (as in the
    official code), so runs of pads in our expanded ids are collapsed to one before sending; the returned token ids are
    appended to our own sequence unchanged (token-in, token-out).

    One image geometry: vLLM resizes every image within our processor's bounds (`mm_processor_kwargs` built from
    `processor.geometry`), not the checkpoint's preprocessor_config.json, so both sides count the same tokens. A
    prompt that still comes back with another length than ours (an image processor that resizes differently) ends
    that trajectory as ENGINE_ERROR with both lengths in `Trajectory.error`: training never scores pixels other than
    the policy sampled from (OFR drops the trajectory) and the run goes on, the log naming each one.

    Requests vLLM refuses: it checks all of a batch's requests before running any, and one it rejects (a prompt as long
    as its context `max_model_len`, multimodal input it cannot take) fails the whole `generate` with a ValueError. The
    batch is then halved until each refused request stands alone; those end as ENGINE_ERROR with vLLM's message, the
    others generate normally. Any other exception (out of memory, a dead engine) stops the run.

    The weight cycle, once per RL step: `sleep()` discards the weights and the KV cache (level 2: nothing is copied to
    host memory, as the next sync overwrites every weight); `sync_weights(weights)` wakes the engine in an order that
    fits beside the trainer: PyTorch's cache emptied (vLLM maps its memory outside it, so blocks the update freed would
    stay reserved), the weights woken, the new ones loaded, then the KV cache woken. The load runs in the calling
    thread, so the trainer's FSDP2 all-gathers inside `weights` run on the rank's own device, and each tensor is cast
    to vLLM's dtype as it arrives (one at a time: never a second copy of the model).

    vLLM versions (0.26 and 0.33, the range in pyproject.toml, read in their source): the calls used here are the same
    in both — `LLM(mm_processor_kwargs={"size": {"shortest_edge": .., "longest_edge": ..}})` (both read these Qwen2-VL
    pixel bounds; transformers 5 deprecates the min_pixels/max_pixels spelling), `LLM.sleep(level=2)`,
    `LLM.wake_up(tags=[..])`, `LLM.apply_model` (in the calling thread when the engine core runs in this process) and a
    ValueError for a refused request. One behaviour differs: 0.33's wake_up empties PyTorch's cache itself, 0.26's
    does not; `sync_weights` always does.

    The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as RL frameworks colocate it), so
    `sync_weights` hands the trainer's tensors to the model directly instead of pickling them to another process.
    Under torchrun each rank holds its own engine. Checked on an H200 with vLLM 0.26 (bench/vllm_bench.py; README
    "Checked on a GPU"), in one process; bench/gpu_check.py checks this cycle under FSDP2, the image bounds and the
    wake-up beside a trainer.
    """

    def __init__(self, processor: VLProcessor, model_path: str, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, dtype: str = "auto", gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 32768, max_images: int = 32, enforce_eager: bool = False,
                 sync_timeout_s: float = 600.0, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ImportError("the vllm engine needs the GPU extra: pip install -e '.[vllm]'") from e
        self.processor, self.sync_timeout_s, self.sampling_params = processor, sync_timeout_s, SamplingParams
        self.temperature, self.top_p, self.top_k, self.max_model_len = temperature, top_p, top_k, max_model_len
        # float32 checkpoints (the tiny ones) have no flash-attention kernels: auto means bfloat16 for them
        config = Path(model_path) / "config.json"
        if dtype == "auto" and config.is_file():
            saved = json.loads(config.read_text())
            if saved.get("dtype", saved.get("torch_dtype")) == "float32":
                dtype = "bfloat16"
        # under torchrun every rank holds its own engine: vLLM's default executor would put each one on cuda:0, its
        # external-launcher mode takes the rank and GPU from torchrun's environment (RANK, LOCAL_RANK) and, at
        # tensor-parallel size 1, lets the ranks generate independently (vLLM's "external DP"). One process with a
        # 1-rank group (train.py's FSDP2) has no such environment and keeps the default executor.
        torchrun = torch.distributed.is_initialized() and "RANK" in os.environ
        launcher = {"distributed_executor_backend": "external_launcher"} if torchrun else {}
        bounds = {"shortest_edge": processor.geometry.min_pixels, "longest_edge": processor.geometry.max_pixels}
        # videos reach the model only as frames the code returns (images), so no video slot is profiled
        self.llm = LLM(model=str(model_path), dtype=dtype, enable_sleep_mode=True,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": max_images, "video": 0}, mm_processor_kwargs={"size": bounds},
                       enforce_eager=enforce_eager, seed=seed, **launcher)

    def sampling(self, max_tokens: int):
        return self.sampling_params(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                    max_tokens=max_tokens, stop=[STOP], include_stop_str_in_output=True,
                                    skip_special_tokens=False, n=1)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        try:
            outputs = self.llm.generate([vllm_prompt(r.trajectory, self.processor) for r in requests],
                                        [self.sampling(r.max_new_tokens) for r in requests], use_tqdm=False)
        except ValueError as e:   # one refused request fails the batch before anything ran: isolate it by halving
            if len(requests) == 1:
                return [GenResult([], "error", f"vLLM refused the prompt: {e}")]
            half = len(requests) // 2
            return self.generate(requests[:half]) + self.generate(requests[half:])
        return [self._result(request, out) for request, out in zip(requests, outputs, strict=True)]

    def _result(self, request: GenRequest, out) -> GenResult:
        ours, theirs = len(request.trajectory.input_ids), len(out.prompt_token_ids)
        if ours != theirs:
            return GenResult([], "error", f"vLLM expanded the prompt to {theirs} tokens, our processor to {ours}: the "
                                          "two image processors disagree on an image's size")
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        if completion.finish_reason == "length":
            return GenResult(ids, "length")
        if ids and ids[-1] == self.processor.eos_id:
            return GenResult(ids, "eos")
        return GenResult(cut_at_stop(ids, self.processor)[0], "stop")

    def sleep(self) -> None:
        self.llm.sleep(level=2)

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Wake up with the trainer's (name, full tensor) weights, in the order of the class docstring. Call it from
        the main thread (the timeout is a SIGALRM timer there); a failure or a timeout stops the run instead of hanging
        it or leaving rollouts on discarded weights."""
        dtype = self.llm.model_config.dtype
        torch.cuda.empty_cache()
        try:
            with _deadline(self.sync_timeout_s):
                self.llm.wake_up(tags=["weights"])
                self.llm.apply_model(lambda model: model.load_weights((name, t.to(dtype)) for name, t in weights))
                self.llm.wake_up(tags=["kv_cache"])
        except TimeoutError as e:
            raise RuntimeError(f"vLLM weight sync did not finish within {self.sync_timeout_s:.0f} s; "
                               "stopping the run") from e
        except Exception as e:  # any failure here must surface, never leave rollouts on discarded weights
            raise RuntimeError(f"vLLM weight sync failed: {e!r}; stopping the run") from e


def make_engine(name: str, model=None, processor: VLProcessor | None = None, **kwargs) -> Engine:
    """Engines by name, the same names in rollout.py, eval.py and train.py."""
    if name == "hf":
        return HFEngine(model, processor, **kwargs)
    if name == "scripted":
        return ScriptedExpert(processor, **kwargs)
    if name == "vllm":
        return VLLMEngine(processor=processor, **kwargs)
    raise ValueError(f"unknown engine {name!r}; choose hf, vllm or scripted")


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class RolloutConfig:
    """The protocol's budgets and options (docs/method.md §2.4). train.py and eval.py inherit these settings and their
    flags; the defaults are the paper's training values (eval.py overrides the evaluation budgets)."""
    max_turns: int = _f(5, "generation rounds per trajectory; at most MAX_TURNS-1 tool calls (paper: a turn budget of 4)")
    max_response_tokens: int = _f(20480, "token budget after the prompt: actions, tool text and images (OVER_LENGTH)")
    max_turn_tokens: int = _f(10240, "token budget of one generation round (ERROR_IN_ACTION when hit)")
    max_images: int = _f(32, "images in context, the input included, before EXCEED_MAX_IMAGE_NUM")
    on_error: str = _f("terminate", "a code error ends the trajectory (terminate: the paper) or is fed back (feedback)",
                       ["terminate", "feedback"])
    max_tool_text_chars: int = _f(4000, "tool output beyond this many characters is cut in the middle")
    tool_timeout_s: float = _f(30.0, "wall-clock limit of one tool call")
    tool_workers: int = _f(8, "sandbox calls running at once")
    template_file: str = _f("", "prompt templates JSON (the official rl_system_prompt_template.json); empty: built-in")
    template_key: str = _f("", "key in TEMPLATE_FILE, or a built-in set (default, short); empty: default")
    video_context: str = _f("on_demand", "video tasks: on_demand (the paper: video only in the sandbox) or "
                                         "full_context (uniform frames in the prompt, the baseline; §9)",
                            ["on_demand", "full_context"])
    full_context_fps: float = _f(1.0, "full_context: frames per second put into the prompt")
    full_context_max_frames: int = _f(64, "full_context: most frames put into the prompt")


def start_trajectory(task: Task, group_id: int, sample_index: int, processor: VLProcessor,
                     cfg: RolloutConfig) -> Trajectory:
    """Build the first user turn (docs/method.md §2.1): image in context + instructions; for video the turn
    `video_context.video_prompt` builds: the instructions with the video's metadata only (or, for the full-context
    baseline, sampled frames as a Qwen video input)."""
    if task.media_kind == "image":
        image = Image.open(task.image_path).convert("RGB")
        instructions = render_prompt(task.question, width=image.width, height=image.height,
                                     template_file=cfg.template_file, template_key=cfg.template_key)
        content = [{"type": "text", "text": "<image_clue_0>"}, {"type": "image"},
                   {"type": "text", "text": "</image_clue_0>\n" + instructions}]
        text = processor.apply_chat_template([{"role": "user", "content": content}])
        t0 = time.perf_counter()
        pixel_values, grid = processor.encode_images([image])
        image_s = time.perf_counter() - t0
        ids = processor.encode_text(processor.expand_pads(text, grid.tolist()))
        return Trajectory(task, group_id, sample_index, "image", ids, [0] * len(ids), len(ids), [image],
                          [pixel_values], grid.tolist(), image_s=image_s)
    instructions = render_prompt(task.question, video_info=video_info(task.video_path),
                                 template_file=cfg.template_file, template_key=cfg.template_key)
    text, video_inputs = video_prompt(instructions, task.video_path, processor, cfg.video_context,
                                      cfg.full_context_fps, cfg.full_context_max_frames)
    ids = processor.encode_text(text)
    return Trajectory(task, group_id, sample_index, "video", ids, [0] * len(ids), len(ids), [], [], [],
                      video_inputs=video_inputs)


def _append(traj: Trajectory, ids: list[int], is_action: bool) -> None:
    traj.input_ids += ids
    traj.action_mask += [1 if is_action else 0] * len(ids)


@dataclass
class RolloutTimings:
    """Wall-clock split of a rollout call (bench/rollout_bench.py): generation, tool execution (the concurrent phase),
    image processing; `total_s` minus the three is bookkeeping (parsing, tokenising observations, sandboxes)."""
    generate_s: float = 0.0
    tool_s: float = 0.0
    image_s: float = 0.0
    total_s: float = 0.0


def rollout(tasks: Sequence[Task], engine: Engine, processor: VLProcessor, sandbox_factory, cfg: RolloutConfig,
            n: int = 1, first_group: int = 0, timings: RolloutTimings | None = None) -> list[Trajectory]:
    """Run `n` samples of every task to the end. `sandbox_factory(images=..., video=...)` opens one sandbox per
    trajectory (see sandbox.py); they are closed before returning, whatever happens."""
    timings = timings if timings is not None else RolloutTimings()
    start = time.perf_counter()
    trajs = [start_trajectory(t, first_group + g, k, processor, cfg) for g, t in enumerate(tasks) for k in range(n)]
    sandboxes: dict[int, object] = {}
    try:
        with ThreadPoolExecutor(max_workers=cfg.tool_workers) as pool:
            active = list(range(len(trajs)))
            for turn in range(cfg.max_turns):
                if not active:
                    break
                active = _one_round(trajs, active, turn, engine, processor, cfg, sandboxes, sandbox_factory, pool,
                                    timings)
                for i in [i for i in sandboxes if i not in active]:   # finished: give the process back now
                    sandboxes.pop(i).close()
    finally:
        for sb in sandboxes.values():
            sb.close()
    for traj in trajs:
        traj.vision_consistent = traj.check_vision_consistency(processor)
    timings.image_s += sum(t.image_s for t in trajs)
    timings.total_s += time.perf_counter() - start
    return trajs


def score_trajectories(trajs: Sequence[Trajectory], processor: VLProcessor, tool_coef: float = 0.1, judge=None,
                       strict: bool = True) -> None:
    """Fill reward, correct and reward_parts (reward.py) from each trajectory's decoded response."""
    requests = [reward.ScoreRequest(t.task.answer, t.task.data_source, t.task.ability, t.response_text(processor),
                                    t.num_tool_calls, t.task.question, t.task.choices,
                                    sample_id=f"{t.task.id}/{t.sample_index}") for t in trajs]
    for traj, parts in zip(trajs, reward.score_many(requests, tool_coef, judge, strict)):
        traj.reward_parts, traj.reward, traj.correct = parts, parts.total, parts.correct


def _one_round(trajs, active, turn, engine, processor, cfg, sandboxes, sandbox_factory, pool, timings) -> list[int]:
    # 1) generate one action for every active trajectory with room left in the engine's context (prompt plus new
    #    tokens; vLLM refuses a prompt that fills it): one without room has run out of length like one over budget
    context = getattr(engine, "max_model_len", math.inf)
    for i in active:
        if len(trajs[i].input_ids) >= context:
            trajs[i].end_reason = EndReason.OVER_LENGTH
    asking = [i for i in active if trajs[i].end_reason is None]
    budgets = {i: min(cfg.max_turn_tokens, cfg.max_response_tokens - trajs[i].response_len,
                      context - len(trajs[i].input_ids)) for i in asking}
    t0 = time.perf_counter()
    results = engine.generate([GenRequest(trajs[i], max(1, budgets[i])) for i in asking]) if asking else []
    timings.generate_s += time.perf_counter() - t0
    gen_s = (time.perf_counter() - t0) / max(1, len(asking))
    to_run: list[tuple[int, str]] = []
    for i, res in zip(asking, results):
        traj = trajs[i]
        if res.finish_reason == "error":   # the engine refused this trajectory alone: it ends, the batch goes on
            traj.end_reason, traj.error = EndReason.ENGINE_ERROR, res.error
            log.warning("task %s, sample %d ends as %s: %s", traj.task.id, traj.sample_index, traj.end_reason,
                        res.error)
            continue
        action = processor.decode(res.token_ids)
        _append(traj, res.token_ids, is_action=True)
        answer, code = parse_action(action)
        traj.turns.append(Turn(action, len(res.token_ids), res.finish_reason, code=code, generate_s=gen_s))
        # 2) end checks, in the official order (docs/method.md §2.4)
        if traj.response_len >= cfg.max_response_tokens or len(traj.input_ids) >= context:
            traj.end_reason = EndReason.OVER_LENGTH
        elif res.finish_reason == "length" or not res.token_ids:
            traj.end_reason = EndReason.ERROR_IN_ACTION
        elif answer is not None:
            traj.end_reason = EndReason.DONE
        elif code is None:
            if cfg.on_error == "feedback" and turn < cfg.max_turns - 1:
                _observe(traj, error_observation("No Python code or final answer found. "
                                                 "There is something wrong with the format."), [], processor, cfg)
            else:
                traj.end_reason = EndReason.ERROR_IN_ACTION
        elif turn == cfg.max_turns - 1:
            traj.end_reason = EndReason.EXCEED_MAX_TURNS
        else:
            to_run.append((i, code))
    # 3) run all code of this round concurrently, one sandbox per trajectory
    def run(item):
        i, code = item
        if i not in sandboxes:
            t = trajs[i]
            sandboxes[i] = sandbox_factory(images=t.images[:1] if t.mode == "image" else [],
                                           video=t.task.video_path if t.mode == "video" else None)
        start = time.perf_counter()
        return sandboxes[i].run(code), time.perf_counter() - start
    t0 = time.perf_counter()
    finished = list(pool.map(run, to_run))
    timings.tool_s += time.perf_counter() - t0
    for (i, _), (result, tool_s) in zip(to_run, finished):
        traj, last = trajs[i], trajs[i].turns[-1]
        last.exec_status, last.tool_error, last.tool_s = result.status, result.error, tool_s
        # sandbox notes (state reset after a timeout, figures dropped or downscaled) are part of what the model sees
        notes = "".join(f"\n[{note}]" for note in result.notes)
        if result.status not in OK_STATUSES:
            if cfg.on_error == "terminate":
                traj.end_reason = EndReason.ERROR_IN_ACTION
                continue
            message = truncate_middle(f"{result.error or result.status}\n{result.text}".strip(), cfg.max_tool_text_chars)
            _observe(traj, error_observation(f"Execution error: {message}{notes}"), [], processor, cfg)
            continue
        first_label = traj.num_returned_images + (1 if traj.mode == "image" else 0)
        text = truncate_middle(result.text.strip(), cfg.max_tool_text_chars) + notes
        obs = observation_text(traj.mode, text, first_label, len(result.images))
        _observe(traj, obs, list(result.images), processor, cfg)
    return [i for i in active if trajs[i].end_reason is None]


def _observe(traj: Trajectory, obs: str, images: list[Image.Image], processor: VLProcessor, cfg: RolloutConfig) -> None:
    """Append an observation turn (mask 0) with its images, then apply the length and image caps."""
    grids: list[list[int]] = []
    pixel_values = None
    if images:
        t0 = time.perf_counter()
        pixel_values, grid = processor.encode_images(images)
        traj.image_s += time.perf_counter() - t0
        grids = grid.tolist()
    ids = processor.encode_text(processor.expand_pads(obs, grids))
    if traj.response_len + len(ids) >= cfg.max_response_tokens:
        traj.end_reason = EndReason.OVER_LENGTH   # an observation that would overflow is not appended (official)
        return
    _append(traj, ids, is_action=False)
    traj.turns[-1].observation, traj.turns[-1].images = obs, images
    traj.num_tool_calls += 1
    if images:
        # split the batch's patches back per image so each trajectory owns its own tensors
        sizes = [g[0] * g[1] * g[2] for g in grids]
        traj.pixel_values += list(torch.split(pixel_values, sizes))
        traj.image_grid_thw += grids
        traj.images += images
        traj.num_returned_images += len(images)
    if len(traj.image_grid_thw) >= cfg.max_images:
        traj.end_reason = EndReason.EXCEED_MAX_IMAGE_NUM


# ---------------------------------------------------------------------------------------------------------------------
# Viewer
# ---------------------------------------------------------------------------------------------------------------------

def _img_tag(image: Image.Image) -> str:
    """The image at full size, shown as a thumbnail; a click toggles full size (a link to a data: URI would be
    blocked by browsers as a top-level navigation)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return (f"<img class='thumb' title='{image.width}x{image.height} px, click for full size' "
            f"onclick=\"this.classList.toggle('full')\" src='data:image/png;base64,{data}'>")


def _failed_call(turn: Turn) -> bool:
    return turn.exec_status is not None and turn.exec_status not in OK_STATUSES


def _end_detail(t: Trajectory) -> str:
    """Why the trajectory ended, in words, from what the loop recorded (see `_one_round` for the order of checks)."""
    last = t.turns[-1] if t.turns else None
    if t.end_reason == EndReason.ENGINE_ERROR:
        return t.error or "the engine refused the prompt"
    if t.end_reason == EndReason.ERROR_IN_ACTION and last is not None:
        if _failed_call(last):
            error_lines = (last.tool_error or "").strip().splitlines()
            last_line = f": {error_lines[-1]}" if error_lines else ""   # a traceback ends with the exception
            return f"the sandbox call ended with status {last.exec_status}{last_line}"
        if last.finish_reason == "length":
            return f"the turn used its whole token budget ({last.action_tokens} tokens) without </code> or an answer"
        if last.action_tokens == 0:
            return "the engine produced no tokens"
        return "the action held neither code nor an answer"
    if t.end_reason == EndReason.OVER_LENGTH:
        return f"{t.response_len} response tokens: the next action or observation did not fit the length budget"
    if t.end_reason == EndReason.EXCEED_MAX_TURNS:
        return f"{len(t.turns)} turns without an answer (the last code was not run)"
    if t.end_reason == EndReason.EXCEED_MAX_IMAGE_NUM:
        return f"{len(t.image_grid_thw)} images in context"
    parts = t.reward_parts
    if parts is None:
        return "answered (not scored)"
    if parts.masked:
        return "answered, but the judge gave no verdict: reward masked"
    return f"answered {parts.answer!r}" if parts.wellformed else "no well-formed answer (format gate)"


def _counts(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: str(kv[0])))


def _counts_text(values) -> str:
    return ", ".join(f"{html.escape(str(value))}: {count}" for value, count in _counts(values).items()) or "none"


def _summary(trajectories: Sequence[Trajectory], anchors: list[str], kept: set | None) -> list[str]:
    """Accuracy, end reasons (each with links to its samples), tool calls and failed calls, OFR's verdicts."""
    n = len(trajectories)
    masked = sum(bool(getattr(t.reward_parts, "masked", False)) for t in trajectories)
    correct = sum(t.correct for t in trajectories)
    scored = n - masked
    lines = [f"<p class='summary'>{n} trajectories · accuracy: {correct}/{scored} "
             f"({100 * correct / scored if scored else math.nan:.1f}%)"
             + (f" · masked: {masked}" if masked else "")
             + f" · tool calls: {sum(t.num_tool_calls for t in trajectories)} "
               f"(trajectories by calls made: {_counts_text(t.num_tool_calls for t in trajectories)})"
             + " · failed calls by status: "
             + _counts_text(turn.exec_status for t in trajectories for turn in t.turns if _failed_call(turn))
             + (f" · OFR kept {sum((t.group_id, t.sample_index) in kept for t in trajectories)}/{n}"
                if kept is not None else "") + "</p>",
             "<table><tr><th>end reason</th><th>count</th><th>samples</th></tr>"]
    for reason, count in _counts(t.end_reason for t in trajectories).items():
        links = " ".join(f"<a href='#{a}'>{html.escape(t.task.id)}/{t.sample_index}</a>"
                         for t, a in zip(trajectories, anchors) if t.end_reason == reason)
        lines.append(f"<tr><td>{reason}</td><td>{count}</td><td>{links}</td></tr>")
    lines.append("</table>")
    return lines


def _card(t: Trajectory, anchor: str, advantages: dict | None, kept: set | None) -> list[str]:
    """One trajectory: its reward, advantage and OFR verdict, why it ended, then every turn."""
    key = (t.group_id, t.sample_index)
    advantage = f" · advantage: {advantages[key]:+.3f}" if advantages is not None and key in advantages else ""
    verdict = "" if kept is None else (" · <b class='kept'>OFR: kept</b>" if key in kept
                                       else " · <b class='dropped'>OFR: dropped</b>")
    parts = [f"<div class='traj'><h4 id='{anchor}'>sample {t.sample_index} · {'✓' if t.correct else '✗'} · "
             f"reward {t.reward:.2f}{advantage}{verdict}</h4>"
             f"<p class='meta'>end: {t.end_reason} — {html.escape(_end_detail(t))} · "
             f"tool calls: {t.num_tool_calls}</p>"]
    for k, turn in enumerate(t.turns):
        tool = f", tool {turn.exec_status} in {turn.tool_s:.2f}s" if turn.exec_status is not None else ""
        parts.append(f"<h5>turn {k + 1} <span class='meta'>({turn.action_tokens} tokens, {turn.finish_reason}, "
                     f"gen {turn.generate_s:.2f}s{tool})</span></h5><pre>{html.escape(turn.action)}</pre>")
        # an error that ended the episode never reached an observation: show it on its own
        if turn.tool_error and (turn.observation is None or turn.tool_error not in turn.observation):
            parts.append(f"<pre class='err'>sandbox {turn.exec_status}:\n{html.escape(turn.tool_error)}</pre>")
        if turn.observation is not None:
            parts.append(f"<pre class='obs'>{html.escape(turn.observation)}</pre>")
            parts += [_img_tag(im) for im in turn.images]
    parts.append("</div>")
    return parts


def write_html(trajectories: Sequence[Trajectory], path: str | Path, title: str = "PyVision-RL trajectories",
               advantages: dict[tuple[int, int], float] | None = None,
               kept: set[tuple[int, int]] | None = None) -> Path:
    """A self-contained HTML page: a summary (accuracy, end reasons, tool calls, failed calls) linking to every sample,
    then each GRPO group side by side — the question, reference answer and input image once, and per sample its
    reward, advantage and OFR verdict (when `advantages` / `kept` are given, keyed by (group_id, sample_index)), why it
    ended (sandbox errors included), each turn's text, code, tool output and figures. Images are embedded at full
    size and shown as thumbnails that a click enlarges."""
    anchors = [f"t{k}" for k in range(len(trajectories))]
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:0 16px}pre{background:#f4f4f4;padding:6px;white-space:pre-wrap}"
             ".group{display:flex;gap:8px;overflow-x:auto;align-items:flex-start}.traj{flex:0 0 440px;border:1px solid "
             "#ccc;padding:8px}.obs{background:#eef6ff}.err{background:#fde8e8}.meta{color:#555}.kept{color:#070}"
             ".dropped{color:#a00}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
             ".thumb{margin:4px;border:1px solid #999;max-width:300px;max-height:300px;cursor:zoom-in}"
             ".thumb.full{max-width:none;max-height:none;cursor:zoom-out}</style>", f"<h1>{html.escape(title)}</h1>"]
    parts += _summary(trajectories, anchors, kept)
    groups: dict[tuple[int, str], list[int]] = {}   # the task too: pages may mix rollouts that reuse group ids
    for k, t in enumerate(trajectories):
        groups.setdefault((t.group_id, t.task.id), []).append(k)
    for (group_id, task_id), members in groups.items():
        first = trajectories[members[0]]
        parts.append(f"<h3>{html.escape(task_id)} · group {group_id}</h3><p>{html.escape(first.task.question)}</p>"
                     f"<p class='meta'>reference answer: {html.escape(str(first.task.answer))}</p>")
        if first.mode == "image" and first.images:
            parts.append(_img_tag(first.images[0]))
        parts.append("<div class='group'>")
        for k in sorted(members, key=lambda k: trajectories[k].sample_index):
            parts += _card(trajectories[k], anchors[k], advantages, kept)
        parts.append("</div>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path

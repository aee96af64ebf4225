"""reward.py — the reward of one trajectory: R = acc + c · n_tool_calls · 1[correct]   (docs/method.md §4.1, §4.2).

What this file is
    The accuracy reward and the accumulative tool reward of PyVision-RL, as pure functions plus one network client.
    * `format_ok` + `extract_answer`: the official format gate (§4.1 step 1). The answer must be written
      `<answer>\\n\\boxed{...}\\n</answer>`, newlines included; a lenient mode is an option for evaluation.
    * `route` / `check_routable`: `data_source` (and, for our synthetic sources, `ability`) picks the verifier.
      Judge sources: vstar, deepeyes, minio3, hrbench-4k/8k, ecd, wemath-*, v-interaction, mathvision, vsi, longvila
      (and the eval benchmarks the official judge prompt knows: wemath, mathvista, mathverse, logicvista).
      MRA sources: vsi_numerical and any `*_rule_verifiable`. Synthetic sources (`synthetic_image`, `synthetic_video`)
      route by ability: multiple_choice, numeric, vsi_numerical (MRA), string.
    * Rule verifiers: multiple choice (letter or option text), numbers with a tolerance, Mean Relative Accuracy,
      normalised string match.
    * `Judge`: LLM-as-judge over any OpenAI-compatible `/v1/chat/completions` endpoint (e.g. a vLLM server), with the
      official prompt layout `[Question]: … [Standard Answer]: … [Model_answer] : … Judgement:`, temperature 0.3,
      a bounded thread pool, and one wall-clock budget per batch (`batch_budget_s`) within which only the failed
      samples are retried, with exponential backoff and one logged warning per retry naming them.
    * `score` / `score_many`: a `RewardParts` record with every component (acc, tool bonus, total) kept separate.
      correct ⇔ acc ≥ 0.5 (for 0/1 verifiers that is acc = 1; for MRA it is the official `is_answer_right`), and
      total = acc + tool_coef · n_tool_calls when correct, else acc. tool_coef = 0.1 is the paper; 0 is its ablation (§10.1).

How to run
    python -m pytest -q tests/test_reward.py
    python -c "import reward; print(reward.route('vstar'), reward.mean_relative_accuracy(12, 10))"   # judge 0.6

Contracts other files rely on
    * A judge failure under `on_failure="mask"` gives `RewardParts(masked=True, acc=nan, total=nan)`. NaN, not 0, so a
      forgotten mask cannot pass as a wrong answer; ofr.py drops every group that holds a NaN reward.
    * A judge source scored without a judge, an unknown data_source or an unknown ability raises `UnroutableError`
      before any verifier runs; `check_routable` lets train/eval fail on the whole dataset before step 1.

Differences from the official code (multi_task_verifier.py, rule_match_verify.py, reward_score/__init__.py, naive.py)
    1. Boxed answer: the official regex `<answer>\\n\\\\boxed\\{(.*?)\\}\\n</answer>` ends the answer at the first `}\\n</answer>`,
       so `\\boxed{A} junk}` yields "A} junk". Here the braces after `\\boxed{` are balanced (`\\{`, `\\}` are literal braces)
       and the closing brace must be followed by `\\n</answer>`; otherwise there is no answer. Nested braces such as
       `\\frac{1}{2}` work in both. Like the official regex, only the first `<answer>\\n\\boxed{` counts. An empty
       answer is no answer (the official code sent "" to the judge).
    2. Answers of ≥ 1000 characters: the official code zeroes acc but leaves `is_answer_right=True`, so the reward manager
       still adds the tool bonus (score 0 + 0.1·n). Here such an answer is rejected outright: no acc, no bonus.
    3. MRA: the official code takes the first number anywhere in the whole response (tool code, printed numbers…) and
       crashes when there is none. Here it is the first number of the extracted boxed answer; no number scores 0; a
       reference answer that is not a number is a clear error.
    4. The format gate (vision-token pairs balanced, equal `<answer>`/`</answer>` counts after the last
       `</interpreter>`) applies to every verifier; the official code applies it on the judge path only.
    5. An unknown data_source is an error; the official code falls back to the judge with a warning, and several of its
       routed sources (vl_agent, chart, zebra_cot, vigorl, math_8k_verified, barc) crash in `get_prompt`.
    6. Judge: an unparseable verdict is retried, then handled by `on_failure` (official: silently 0). HTTP errors are
       retried with backoff (official: the exception kills the step), within one wall-clock budget per batch, so a
       judge that never answers costs `batch_budget_s` per batch, not timeout × attempts per sample. No random `seed`
       is sent (official: a random seed per call, which at T=0.3 is the same stochastic judge). The instructions and
       few-shot examples are our own words with the official layout and meaning (the official "Judement" typo is not
       kept).
    7. Multiple-choice, numeric and string rule verifiers are ours (the official code judges those with the LLM).
    8. MRA numbers: the official pattern (`rule_match_verify.py`, `[-+]?\\d*\\.?\\d+`) reads only the first run of digits,
       so "1,234" is 1, "3/4" is 3, "2.5e3" is 2.5 and `\\frac{3}{4}` is 3. `parse_number` reads thousands separators,
       fractions, `\\frac` and exponents (1234, 0.75, 2500, 0.75). Kept: an answer written 1,234 means 1234.
    9. MRA at exact thresholds: a relative error equal to 1 − θ is a hit, as in VSI-Bench's own scorer (thinking-in-space
       `lmms_eval/tasks/vsibench/utils.py`, `<=`), with 1 − θ = (20 − k)/20 exact. The official code compares with
       `<` against 1 − θ built as 0.5 + 0.05·i in floating point (0.30000000000000004 at θ = 0.70,
       0.09999999999999998 at θ = 0.90, ...), so it agrees at 0.3 and 0.05 (13 for 10 scores 0.5, 10.5 for 10 scores
       1.0 on both sides) and differs only where its float rounding falls below a threshold (0.9 for 1: 0.8 there,
       0.9 here). Integer counts hit these boundaries often (VSI-Bench's object_counting), so the benchmark's own
       rule is the one kept.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import re
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from config import config_field as _f

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- format gate (docs/method.md §4.1, step 1)
ANSWER_OPEN = "<answer>\n\\boxed{"        # the strict form opens with exactly these characters …
ANSWER_CLOSE = "\n</answer>"              # … and the brace closing \boxed{ must be followed by exactly these
MAX_ANSWER_CHARS = 1000                   # official anti-hacking rule: a longer answer could argue with the judge
FORBIDDEN_IN_ANSWER = ("<interpreter>", "<answer>", "\\boxed")
VISION_OPEN_PAIR = "<|vision_start|><|image_pad|>"
VISION_CLOSE_PAIR = "<|image_pad|><|vision_end|>"
CORRECT_THRESHOLD = 0.5                   # correct ⇔ acc ≥ 0.5 (official `is_answer_right` for MRA; acc = 1 for 0/1 verifiers)
DEFAULT_TOOL_COEF = 0.1                   # 0.1 per tool call, paid only when the answer is correct (paper Eq. 1)


def format_ok(response_text: str) -> bool:
    """The official structural checks on the decoded response (prompt excluded).

    Image placeholders come in pairs `<|vision_start|><|image_pad|>…<|image_pad|><|vision_end|>`; unequal counts mean
    truncation cut an image. In the final turn (after the last `</interpreter>`) every `<answer>` must be closed.
    """
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be a str, got {type(response_text).__name__}")
    if response_text.count(VISION_OPEN_PAIR) != response_text.count(VISION_CLOSE_PAIR):
        return False
    final_turn = response_text.split("</interpreter>")[-1]
    return final_turn.count("<answer>") == final_turn.count("</answer>")


def _closing_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` that closes the `{` at `open_index`, or None when it never closes.

    A backslash escapes the next character, so LaTeX's literal braces `\\{ \\}` do not count, while `\\frac{1}{2}`
    (a backslash before a letter) nests normally.
    """
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_content(text: str, boxed_at: int) -> str | None:
    """The content of the `\\boxed{…}` starting at `boxed_at` (balanced braces), or None when unclosed."""
    open_index = boxed_at + len("\\boxed")
    close_index = _closing_brace(text, open_index)
    return None if close_index is None else text[open_index + 1:close_index]


def _strict_answer(text: str) -> str | None:
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    open_index = start + len(ANSWER_OPEN) - 1
    close_index = _closing_brace(text, open_index)
    if close_index is None or not text.startswith(ANSWER_CLOSE, close_index + 1):
        return None
    return text[open_index + 1:close_index]


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _lenient_answer(text: str) -> str | None:
    """The first `<answer>…</answer>` block (or, without one, the whole text); inside it the last `\\boxed{…}`,
    else — inside a block only — the block's text. Whitespace around the box does not matter."""
    block = _ANSWER_BLOCK.search(text)
    region = block.group(1) if block else text
    boxed_at = region.rfind("\\boxed{")
    if boxed_at >= 0:
        content = _boxed_content(region, boxed_at)
        if content is not None:
            return content
    return block.group(1) if block else None


def extract_answer(text: str, strict: bool = True) -> str | None:
    """The model's final answer, or None when there is no acceptable one.

    strict=True is the official gate: the first `<answer>\\n\\boxed{…}\\n</answer>` (newlines required, balanced
    braces). strict=False also accepts `<answer>\\boxed{…}</answer>`, an unboxed `<answer>…</answer>` and a bare
    `\\boxed{…}`. In both modes the anti-hacking rules then apply: an answer of ≥ 1000 characters, or one containing
    `<interpreter>`, `<answer>` or `\\boxed`, is rejected; so is an empty one.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    answer = _strict_answer(text) if strict else _lenient_answer(text)
    if answer is None:
        return None
    answer = answer.strip()
    if not answer or len(answer) >= MAX_ANSWER_CHARS or any(tag in answer for tag in FORBIDDEN_IN_ANSWER):
        return None
    return answer


# ---------------------------------------------------------------- rule verifiers
NUMERIC_REL_TOL = 1e-6     # default: exact up to float noise; per-request override via ScoreRequest.rel_tol
NUMERIC_ABS_TOL = 1e-9
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_REAL = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"([-+]?{_REAL})(?:\s*/\s*({_REAL}))?")


def parse_number(text: str) -> float | None:
    """The first number in `text`: '1,234' → 1234, '3/4' and '\\frac{3}{4}' → 0.75, '12 m' → 12; None without one."""
    cleaned = _THOUSANDS_COMMA.sub("", _LATEX_FRAC.sub(r"\1/\2", text))
    match = _NUMBER.search(cleaned)
    if match is None:
        return None
    value = float(match.group(1))
    if match.group(2) is not None:
        denominator = float(match.group(2))
        if denominator == 0:
            return None
        value /= denominator
    return value


def mean_relative_accuracy(predicted: float, target: float) -> float:
    """VSI-Bench MRA: the fraction of θ ∈ {0.50, 0.55, …, 0.95} with |ŷ − y| / |y| ≤ 1 − θ (VSI-Bench's own scorer
    counts the boundary as a hit); exact match when y = 0."""
    if not math.isfinite(target):
        raise ValueError(f"MRA target must be finite, got {target}")
    if target == 0:
        return 1.0 if predicted == 0 else 0.0
    relative_error = abs(predicted - target) / abs(target)
    # 1 − θ for θ = k/20, k = 10…19, written as (20 − k)/20 so boundary cases follow the formula, not float rounding
    return sum(relative_error <= (20 - k) / 20 for k in range(10, 20)) / 10


def normalize_text(text: str) -> str:
    """Case-, width- and spacing-insensitive form; surrounding quotes and punctuation dropped ('The Cat.' → 'the cat')."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(" .,;:!?'\"`")


_LETTER_ANSWER = re.compile(r"\(?([A-Z])\)?(?=$|[\s.:)])")


def _choice_map(options: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Option letter → option text. A list is lettered A, B, C… in order (data.py's `Task.choices`)."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        choices = {str(letter).strip().upper(): text for letter, text in options.items()}
    elif isinstance(options, Sequence) and not isinstance(options, str):
        if len(options) > 26:
            raise ValueError(f"options: at most 26 choices can be lettered, got {len(options)}")
        choices = {chr(ord("A") + k): text for k, text in enumerate(options)}
    else:
        raise TypeError(f"options must be a mapping letter → text or a list of texts, got {type(options).__name__}")
    for letter, text in choices.items():
        if not re.fullmatch(r"[A-Z]", letter) or not isinstance(text, str):
            raise ValueError(f"options: bad choice {letter!r}: {text!r} (want a letter A–Z and a text)")
    return choices


def _letter_by_text(text: str, choices: dict[str, str]) -> str | None:
    wanted = normalize_text(text)
    return next((letter for letter, option in choices.items() if normalize_text(option) == wanted), None)


def verify_multiple_choice(answer: str, task_answer: str, options=None) -> float:
    """1.0 when the answer picks the reference option, by letter ('B', '(B)', 'B. left') or by the option's text."""
    choices = _choice_map(options)
    gold = task_answer.strip().strip("().").strip()
    if not re.fullmatch(r"[A-Z]", gold):
        gold = _letter_by_text(task_answer, choices)
        if gold is None:
            raise ValueError(f"multiple-choice task answer {task_answer!r} is neither a letter nor one of the options")
    if choices and gold not in choices:
        raise ValueError(f"multiple-choice task answer {gold!r} is not among the options {sorted(choices)}")
    # the option text is tried first, so an option that itself starts with a capital ("A dog") is not read as a letter
    picked = _letter_by_text(answer, choices) if choices else None
    if picked is None:
        match = _LETTER_ANSWER.match(answer.strip())
        picked = match.group(1) if match else None
    return float(picked == gold)


def _reference_number(task_answer: str) -> float:
    value = parse_number(task_answer)
    if value is None:
        raise ValueError(f"numeric task answer {task_answer!r} holds no number")
    return value


def verify_numeric(answer: str, task_answer: str, rel_tol: float = NUMERIC_REL_TOL) -> float:
    """1.0 when the first number of the answer is within rel_tol (relative) or NUMERIC_ABS_TOL of the reference."""
    target = _reference_number(task_answer)
    predicted = parse_number(answer)
    return float(predicted is not None and math.isclose(predicted, target, rel_tol=rel_tol, abs_tol=NUMERIC_ABS_TOL))


def verify_mra(answer: str, task_answer: str) -> float:
    """Mean Relative Accuracy of the answer's first number (0 when it has none)."""
    target = _reference_number(task_answer)
    predicted = parse_number(answer)
    return 0.0 if predicted is None else mean_relative_accuracy(predicted, target)


def verify_string(answer: str, task_answer: str) -> float:
    return float(normalize_text(answer) == normalize_text(task_answer))


# ---------------------------------------------------------------- routing
# judged sources → the family of few-shot examples shown to the judge (official get_prompt branches)
JUDGE_SOURCES: dict[str, str] = {
    **dict.fromkeys(["vstar", "deepeyes", "minio3", "hrbench-4k", "hrbench-8k", "tirbench"], "visual_search"),
    "ecd": "chart",
    **dict.fromkeys(["wemath-standard", "wemath-pro", "wemath", "v-interaction", "mathvision", "mathvista",
                     "mathverse", "logicvista", "dynamath"], "math"),
    **dict.fromkeys(["vsi", "longvila"], "multiple_choice"),
}
MRA_SOURCES = frozenset({"vsi_numerical"})
RULE_VERIFIABLE_SUFFIX = "_rule_verifiable"          # official: any such source is scored by MRA
ABILITY_ROUTED_SOURCES = frozenset({"synthetic_image", "synthetic_video"})   # data.py; the ability picks the verifier
ABILITY_VERIFIERS = {"multiple_choice": "multiple_choice", "numeric": "numeric", "vsi_numerical": "mra",
                     "string": "string"}
Verifier = Literal["judge", "mra", "multiple_choice", "numeric", "string"]


class UnroutableError(ValueError):
    """A task no verifier can score (unknown data_source/ability, or a judge source with no judge configured)."""


def route(data_source: str, ability: str | None = None) -> Verifier:
    """The verifier for a task. Official sources route by data_source alone; synthetic ones by ability."""
    if not isinstance(data_source, str):
        raise UnroutableError(f"data_source must be a str, got {type(data_source).__name__} {data_source!r}")
    if data_source in MRA_SOURCES or data_source.endswith(RULE_VERIFIABLE_SUFFIX):
        return "mra"
    if data_source in JUDGE_SOURCES:
        return "judge"
    if data_source in ABILITY_ROUTED_SOURCES:
        if ability not in ABILITY_VERIFIERS:
            raise UnroutableError(f"data_source {data_source!r}: unknown ability {ability!r} "
                                  f"(known: {sorted(ABILITY_VERIFIERS)})")
        return ABILITY_VERIFIERS[ability]
    raise UnroutableError(f"unknown data_source {data_source!r}: add it to reward.JUDGE_SOURCES, MRA_SOURCES or "
                          f"ABILITY_ROUTED_SOURCES (known: {sorted([*JUDGE_SOURCES, *MRA_SOURCES, *ABILITY_ROUTED_SOURCES])})")


def check_routable(tasks: Iterable[tuple[str, str | None]], judge: Judge | None) -> dict[tuple[str, str | None], Verifier]:
    """Route every distinct (data_source, ability) pair up front; raise one `UnroutableError` listing every problem.

    Call it on the whole dataset before training or evaluating, so a bad source fails at start-up, not mid-step.
    """
    routes: dict[tuple[str, str | None], Verifier] = {}
    problems = []
    for data_source, ability in dict.fromkeys(tasks):
        try:
            verifier = route(data_source, ability)
        except UnroutableError as error:
            problems.append(str(error))
            continue
        if verifier == "judge" and judge is None:
            problems.append(f"data_source {data_source!r} is scored by the LLM judge, but no judge is configured")
        routes[(data_source, ability)] = verifier
    if problems:
        raise UnroutableError("; ".join(problems))
    return routes


# ---------------------------------------------------------------- LLM-as-judge (docs/method.md §4.1, step 2)
JUDGE_SYSTEM_PROMPT = "You are a helpful assistant."
JUDGE_INSTRUCTIONS = (
    "You will compare two answers to the same question. [Question] is the question, [Standard Answer] is the "
    "reference answer, and [Model_answer] is the answer taken from a model's response. Decide whether the two answers "
    "agree. They agree when they say the same thing, even in different words or notation: 'blue' and 'the car is "
    "blue' agree, and so do '0.5' and '1/2'. If they agree, the Judgement is 1; if they differ, the Judgement is 0. "
    "Output only the Judgement and nothing else."
)
# (question, standard answer, model answer, judgement) — our own examples, a few per family
JUDGE_EXAMPLES: dict[str, tuple[tuple[str, str, str, int], ...]] = {
    "visual_search": (
        ("What colour is the umbrella held by the woman?", "The umbrella is red.", "red", 1),
        ("Is the clock above or below the window?", "The clock is above the window.", "below the window", 0),
        ("How many birds sit on the wire?", "Three birds sit on the wire.", "3", 1),
        ("What is written on the shop sign?", "BAKERY", "Bakehouse", 0),
    ),
    "chart": (
        ("Which product has the tallest bar?", "Product C has the tallest bar, at 42 units.", "C", 1),
        ("In which year were sales lowest?", "Sales were lowest in 2019.", "2020", 0),
        ("By how much did revenue grow from Q1 to Q2?", "From 200 to 250, a growth of 25%. Answer: 25%", "25 percent", 1),
    ),
    "math": (
        ("What is the area of the shaded triangle?", "12", "12", 1),
        ("Solve for x in the figure.", "x = 5", "5", 1),
        ("What fraction of the circle is shaded?", "3/4", "0.75", 1),
        ("What is the length of side AB?", "2.5", "25", 0),
        ("What is the probability of drawing two red balls?", "1/6", "1/3", 0),
    ),
    "multiple_choice": (
        ("Is the lamp to the left or the right of the sofa?\nA. left\nB. right", "B", "right", 1),
        ("Which object appears first in the video?\nA. chair\nB. table\nC. door", "A", "C. door", 0),
        ("What is the person mainly doing?\nA. cooking\nB. cleaning\nC. reading", "C", "C", 1),
        ("How many chairs are in the room?", "4", "four", 1),
    ),
}


def judge_prompt(question: str, standard_answer: str, model_answer: str, family: str) -> str:
    """The user message: instructions, the family's examples, then the item in the same layout ending at 'Judgement:'."""
    examples = "\n\n".join(
        f"[Question]: {q}\n[Standard Answer]: {s}\n[Model_answer] : {m}\nJudgement: {j}"
        for q, s, m, j in JUDGE_EXAMPLES[family])
    item = f"[Question]: {question}\n[Standard Answer]: {standard_answer}\n[Model_answer] : {model_answer}\nJudgement:"
    return f"{JUDGE_INSTRUCTIONS}\n\n{examples}\n\n{item}"


def parse_judgement(reply: str) -> float | None:
    """Official parsing: the text after the last 'Judgement:' — contains '1' → 1, else '0' → 0. Without that label
    the reply must be exactly '1' or '0'. Anything else is None (unparseable; the judge retries it)."""
    reply = reply.strip()
    if "Judgement:" in reply:
        verdict = reply.split("Judgement:")[-1]
        return 1.0 if "1" in verdict else 0.0 if "0" in verdict else None
    return {"1": 1.0, "0": 0.0}.get(reply)


@dataclass(frozen=True)
class JudgeItem:
    """One question to judge. `data_source` picks the few-shot family; `sample_id` names the sample in the retry and
    masking logs (e.g. "task-7/3"; empty: its place in the batch)."""
    question: str
    standard_answer: str
    model_answer: str
    data_source: str
    sample_id: str = ""


class JudgeError(RuntimeError):
    """The judge could not give a verdict (after retries, or because the request itself is wrong)."""


class _TransientJudgeError(Exception):
    """A failure worth retrying: connection trouble, timeout, 408/429/5xx, malformed or unparseable reply."""


@dataclass(frozen=True)
class Judge:
    """Client for an OpenAI-compatible chat-completions server, e.g. `vllm serve Qwen/Qwen2.5-72B-Instruct
    --served-model-name judge`. `base_url` includes the API prefix, e.g. 'http://127.0.0.1:8000/v1'.

    A batch (`judge_many`) is judged in rounds: every sample without a verdict gets one request (at most
    max_concurrency in flight); after a round with failures the failed samples alone are retried, sleeping
    backoff_s · 2^k first and logging one warning that names them. Samples that have a verdict are never sent again.
    The whole batch, retries included, gets `batch_budget_s` of wall-clock time: each request's timeout is cut to what
    is left, and a sample still without a verdict after 1 + max_retries rounds or when the budget is spent is
    handled by on_failure: "raise" raises `JudgeError` naming the samples, "mask" returns None for each of them
    (score() turns those into masked samples). A 4xx other than 408/429 (wrong URL or model name) always raises:
    retrying or masking would hide a configuration error.
    """
    base_url: str
    model: str = "judge"
    temperature: float = 0.3
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_concurrency: int = 8
    max_tokens: int = 32
    # A judge that never answers costs at most this per batch; a healthy judge at max_concurrency 8 and ~1 s per
    # verdict finishes a 256-trajectory step in about half a minute.
    batch_budget_s: float = 600.0
    on_failure: Literal["raise", "mask"] = "raise"
    api_key: str | None = None

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"Judge.base_url must start with http:// or https://, got {self.base_url!r}")
        if self.on_failure not in ("raise", "mask"):
            raise ValueError(f"Judge.on_failure must be 'raise' or 'mask', got {self.on_failure!r}")
        for name in ("timeout_s", "max_concurrency", "max_tokens", "batch_budget_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Judge.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_retries", "backoff_s", "temperature"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Judge.{name} must be >= 0, got {getattr(self, name)}")

    def request_body(self, item: JudgeItem) -> dict:
        family = JUDGE_SOURCES.get(item.data_source)
        if family is None:
            raise UnroutableError(f"data_source {item.data_source!r} is not a judge source (known: {sorted(JUDGE_SOURCES)})")
        prompt = judge_prompt(item.question, item.standard_answer, item.model_answer, family)
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}

    def _post(self, body: dict, timeout_s: float) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url.rstrip('/')}/chat/completions",
                                         data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                payload = json.loads(response.read())
            content = payload["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}")
            return content
        except urllib.error.HTTPError as error:
            if error.code in (408, 429) or error.code >= 500:
                raise _TransientJudgeError(f"HTTP {error.code}") from error
            raise JudgeError(f"judge at {self.base_url} rejected the request: HTTP {error.code} "
                             f"{error.read()[:200]!r}") from error
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise _TransientJudgeError(f"{type(error).__name__}: {error}") from error
        except (ValueError, KeyError, IndexError, TypeError) as error:   # not JSON / not a chat completion
            raise _TransientJudgeError(f"malformed reply ({type(error).__name__}: {error})") from error

    def _attempt(self, body: dict, deadline: float) -> float | str:
        """One request within the batch's deadline: the verdict, or why there is none (a failure worth retrying)."""
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return f"the batch budget of {self.batch_budget_s:g} s was spent"
        try:
            reply = self._post(body, min(self.timeout_s, left_s))
        except _TransientJudgeError as error:
            return str(error)
        verdict = parse_judgement(reply)
        return verdict if verdict is not None else f"unparseable verdict {reply[:200]!r}"

    def judge(self, item: JudgeItem) -> float | None:
        """1.0 (answers agree) or 0.0 (they differ); None when it failed and on_failure="mask"."""
        return self.judge_many([item])[0]

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        """Verdicts in input order (None: masked), within one wall-clock budget for the whole batch (see the class)."""
        if not items:
            return []
        bodies = [self.request_body(item) for item in items]   # an unroutable item fails before any request
        names = [item.sample_id or f"item {k}" for k, item in enumerate(items)]
        deadline = time.monotonic() + self.batch_budget_s
        verdicts: list[float | None] = [None] * len(items)
        problems: dict[int, str] = {}
        pending = list(range(len(items)))
        rounds = 0
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="judge")
        try:
            while pending:
                rounds += 1
                for k, outcome in zip(pending, pool.map(lambda k: self._attempt(bodies[k], deadline), pending)):
                    if isinstance(outcome, float):
                        verdicts[k] = outcome
                    else:
                        problems[k] = outcome
                pending = [k for k in pending if verdicts[k] is None]
                delay_s = self.backoff_s * 2 ** (rounds - 1)
                if not pending or rounds > self.max_retries or time.monotonic() + delay_s >= deadline:
                    break
                log.warning("judge: retry %d/%d in %g s for %d sample(s) %s (last failure: %s)", rounds,
                            self.max_retries, delay_s, len(pending), _name_list(names[k] for k in pending),
                            problems[pending[0]])
                time.sleep(delay_s)
        finally:   # a configuration error (JudgeError) cancels the requests not yet sent
            pool.shutdown(wait=True, cancel_futures=True)
        if pending:
            failures = _name_list(f"{names[k]}: {problems[k]}" for k in pending)
            message = (f"judge gave no verdict after {rounds} attempts (budget {self.batch_budget_s:g} s) for "
                       f"{len(pending)} of {len(items)} samples: {failures}")
            if self.on_failure == "raise":
                raise JudgeError(message)
            log.warning("%s; masking %d sample(s)", message, len(pending))
        return verdicts


@dataclass
class JudgeConfig:
    """The judge settings train.py and eval.py share (they inherit these fields and flags)."""
    judge_url: str = _f("", "OpenAI-compatible judge endpoint, e.g. http://127.0.0.1:8000/v1 (needed by judged data "
                            "sources; a sample the judge cannot score within its budget is masked)")
    judge_model: str = _f("judge", "model name served at JUDGE_URL")

    def make_judge(self) -> Judge | None:
        """The judge client, or None without a URL. A sample it cannot score in its budget is masked, never scored 0:
        training drops that group (ofr.py), evaluation records it as the sample's error."""
        return Judge(base_url=self.judge_url, model=self.judge_model, on_failure="mask") if self.judge_url else None


def _name_list(names: Iterable[str], shown: int = 20) -> str:
    """'[a, b, c]', or the first `shown` and a count of the rest: a log line stays readable for a 1000-sample batch."""
    names = list(names)
    rest = f", … {len(names) - shown} more" if len(names) > shown else ""
    return f"[{', '.join(names[:shown])}{rest}]"


# ---------------------------------------------------------------- the reward (docs/method.md §4.2)
@dataclass(frozen=True)
class ScoreRequest:
    """One trajectory to score. `options` are the multiple-choice texts (a list lettered A, B, … or a letter → text
    mapping); `rel_tol` is the numeric verifier's relative tolerance; `sample_id` names it in the judge's logs
    (empty: "request <its index>")."""
    task_answer: str
    data_source: str
    ability: str | None
    response_text: str
    num_tool_calls: int
    question: str = ""
    options: Mapping[str, str] | Sequence[str] | None = None
    rel_tol: float = NUMERIC_REL_TOL
    sample_id: str = ""

    def __post_init__(self):
        for name in ("task_answer", "data_source", "response_text", "question", "sample_id"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"ScoreRequest.{name} must be a str, got {type(getattr(self, name)).__name__} "
                                f"{getattr(self, name)!r}")
        if isinstance(self.num_tool_calls, bool) or not isinstance(self.num_tool_calls, int) or self.num_tool_calls < 0:
            raise ValueError(f"ScoreRequest.num_tool_calls must be an int >= 0, got {self.num_tool_calls!r}")
        if not self.rel_tol >= 0:
            raise ValueError(f"ScoreRequest.rel_tol must be >= 0, got {self.rel_tol}")


@dataclass(frozen=True)
class RewardParts:
    """Every component of one trajectory's reward, for the update and for logging.

    acc: 0/1, or MRA in [0, 1]; nan when masked.   tool_bonus: tool_coef · n_tool_calls when correct, else 0.
    total = acc + tool_bonus (nan when masked).     answer: the extracted answer (None: none / rejected).
    wellformed: passed the format gate with an answer.   masked: the judge failed under on_failure="mask".
    """
    acc: float
    correct: bool
    tool_bonus: float
    total: float
    answer: str | None
    wellformed: bool
    masked: bool
    verifier: Verifier
    num_tool_calls: int


def _rule_acc(verifier: Verifier, answer: str, request: ScoreRequest) -> float:
    if verifier == "multiple_choice":
        return verify_multiple_choice(answer, request.task_answer, request.options)
    if verifier == "numeric":
        return verify_numeric(answer, request.task_answer, request.rel_tol)
    if verifier == "mra":
        return verify_mra(answer, request.task_answer)
    return verify_string(answer, request.task_answer)


def score_many(requests: Sequence[ScoreRequest], tool_coef: float = DEFAULT_TOOL_COEF, judge: Judge | None = None,
               strict: bool = True) -> list[RewardParts]:
    """Score a batch: every task is routed first (one clear error for the whole batch), rule verifiers run locally,
    then all judge items go to the judge concurrently."""
    if not (math.isfinite(tool_coef) and tool_coef >= 0):
        raise ValueError(f"tool_coef must be finite and >= 0, got {tool_coef}")
    routes = check_routable(((r.data_source, r.ability) for r in requests), judge)
    verifiers = [routes[(r.data_source, r.ability)] for r in requests]
    answers = [extract_answer(r.response_text, strict) if format_ok(r.response_text) else None for r in requests]

    accs: list[float | None] = [0.0] * len(requests)      # None = masked judge failure
    judged = []
    for i, (request, verifier, answer) in enumerate(zip(requests, verifiers, answers)):
        if answer is None:
            continue
        if verifier == "judge":
            judged.append(i)
            continue
        try:
            accs[i] = _rule_acc(verifier, answer, request)
        except ValueError as error:
            raise ValueError(f"request {i} (data_source={request.data_source!r}, ability={request.ability!r}): "
                             f"{error}") from error
    if judged:
        items = [JudgeItem(requests[i].question, requests[i].task_answer, answers[i], requests[i].data_source,
                           requests[i].sample_id or f"request {i}") for i in judged]
        for i, verdict in zip(judged, judge.judge_many(items)):
            accs[i] = verdict

    parts = []
    for request, verifier, answer, acc in zip(requests, verifiers, answers, accs):
        common = dict(answer=answer, wellformed=answer is not None, verifier=verifier,
                      num_tool_calls=request.num_tool_calls)
        if acc is None:
            parts.append(RewardParts(acc=math.nan, correct=False, tool_bonus=0.0, total=math.nan, masked=True, **common))
            continue
        correct = acc >= CORRECT_THRESHOLD
        tool_bonus = tool_coef * request.num_tool_calls if correct else 0.0
        parts.append(RewardParts(acc=acc, correct=correct, tool_bonus=tool_bonus, total=acc + tool_bonus,
                                 masked=False, **common))
    return parts


def score(task_answer: str, data_source: str, ability: str | None, response_text: str, num_tool_calls: int,
          question: str = "", tool_coef: float = DEFAULT_TOOL_COEF, judge: Judge | None = None, strict: bool = True,
          options: Mapping[str, str] | Sequence[str] | None = None, rel_tol: float = NUMERIC_REL_TOL) -> RewardParts:
    """R = acc + tool_coef · num_tool_calls · 1[correct] for one trajectory (see `score_many` for batches)."""
    request = ScoreRequest(task_answer, data_source, ability, response_text, num_tool_calls, question, options, rel_tol)
    return score_many([request], tool_coef, judge, strict)[0]


def reward_stats(parts: Sequence[RewardParts]) -> dict[str, float]:
    """Batch means for logging; acc/tool/total over unmasked samples only."""
    scored = [p for p in parts if not p.masked]

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else math.nan

    return {"reward/acc": mean(p.acc for p in scored), "reward/tool_bonus": mean(p.tool_bonus for p in scored),
            "reward/total": mean(p.total for p in scored), "reward/correct_frac": mean(p.correct for p in scored),
            "reward/wellformed_frac": mean(p.wellformed for p in parts), "reward/masked_frac": mean(p.masked for p in parts)}

"""data.py — tasks: the official data formats, and synthetic tasks where the Python tool is genuinely needed.

What this file is
    A `Task` is one question about one image or one video with its reference answer (docs/method.md §2.1, "Training data item
    format"). This file loads the two official JSON formats into `Task` records and generates seeded synthetic tasks for
    tests, the scripted expert, the SFT cold start and the CPU demo.

    * Validation rows (the official `image_val_dataset` / `video_val_dataset` files): a JSON list of
      `{id, question, answer, ability, data_source, image_path | video_path}`.
    * RL training rows: `{prompt, data_source, ability, env_name, reward_model: {ground_truth}, extra_info: {answer, index,
      question, split}, mm_hint: {hint_path, hint_type}}`.
    A bad row raises a `DataError` naming the file, the row index and the field; `load_tasks(..., on_error="skip")` instead
    skips bad rows and returns them in a report, so one broken row does not cost a whole run.

Synthetic image tasks
    The policy sees the image downscaled to its visual budget (`max_pixels`), while the sandbox holds it at full resolution
    as `image_clue_0` (docs/method.md §2.1, §3). Tool-requiring families put the answer in detail that the downscale destroys
    (the colour of a 3-pixel marker ringed by look-alike markers, counts of 3-pixel dots, which of two grey-looking patches
    is a 1-pixel checkerboard, the exact x coordinate of a single dot). Tool-free families (one large shape's colour, a count of
    large squares) are answerable from the downscaled view. Every task carries `solution_code`: short, templated Python a
    competent agent would write, whose last printed line is the answer. The scripted expert (rollout.py) runs it in the
    sandbox and answers with what it printed, so correctness comes from the tool, not from peeking at the label. The code
    takes from the question only what can be copied as written (coordinates in the question's (x, y) order) and leaves
    offsets and colour matching to Python: colour questions print the nearest colour of a fixed palette by name, an
    option's text that the verifier accepts as that option. A small policy learns to copy; it does not learn arithmetic,
    or a table from a shuffled option list to RGB values, in its head (measured: README, "The CPU demo").

    One family needs several calls, each depending on what the one before returned (the ablations' mixture, for the
    paper's interaction-collapse and turn-budget findings, docs/method.md §10): `ring_colour` asks for the colour of a
    small square inside a black ring whose position the question does not give. The expert locates the rings (printed
    centres), zooms into one printed centre (a figure, nothing printed) and reads the colour off the returned figure;
    when that ring is the empty one of two, a third call zooms into the other. The demo's default mixture
    (`DEFAULT_IMAGE_FAMILIES`) keeps to the single-call families; `--families` names another.

Synthetic video tasks
    PyVision-Video keeps the video out of the context: the prompt has only `video_context.video_info(path)`, the sandbox
    holds the video as `video_clue_0` (docs/method.md §2.1, §3). Each family's answer depends on a few specific moments: the
    colour of a ball at a given time, when a square first appears, how often a ball crosses a line, which of two squares
    moves first. 160x120, 8 fps, 10-30 s, H.264 mp4 written with PyAV (same seed, same bytes with the same PyAV build).
    Colours are saturated and blobs large so they survive yuv420p compression; the solution code classifies colours by
    the nearest reference or a wide tolerance, never by exact values. Every solution fetches only the frames it needs
    (one frame, a binary search of ~10 frames, or one frame per second where events are at least 2 s apart), shows what
    it looked at with `plt.imshow`/`plt.plot` + `plt.show()` in a figure about the size of the frames, and prints the
    answer last.

How to run
    python data.py --kind image --n 64 --seed 0 --out runs/data/image     # writes tasks.json + images/
    python data.py --n 64 --families ring_colour,big_shape_color --out runs/data/rings   # a chosen mixture
    python data.py --kind video --n 32 --seed 0 --out runs/data/video     # writes tasks.json + videos/
    python -c "import data; tasks, bad = data.load_tasks('tasks.json', on_error='skip')"

Differences from the official code
    * Official raw validation rows are converted only when their path contains `image_val_dataset`/`video_val_dataset`;
      here the format is detected per row.
    * Relative media paths are resolved against the JSON file's directory (the official files use absolute paths).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image

VALIDATION_FIELDS = ("id", "question", "answer", "ability", "data_source")
SYNTHETIC_IMAGE_SOURCE = "synthetic_image"
SYNTHETIC_VIDEO_SOURCE = "synthetic_video"


class DataError(ValueError):
    """A bad row: carries the file, the row index and the field so the message says exactly what to fix."""

    def __init__(self, file: str | Path, row: int, field_name: str, problem: str):
        self.file, self.row, self.field, self.problem = str(file), row, field_name, problem
        super().__init__(f"{file}: row {row}: field '{field_name}': {problem}")


@dataclass
class Task:
    """One question about one image or one video. Synthetic tasks also carry their solution and family."""
    id: str
    question: str
    answer: str
    ability: str
    data_source: str
    image_path: str | None = None
    video_path: str | None = None
    choices: list[str] | None = None          # option texts of a multiple-choice task, letters A, B, ... in order
    solution_code: str | None = None          # Python whose last printed line is the answer (for multiple choice,
                                              # the option's letter or text; synthetic tasks) or, for a multi-call
                                              # family, the first call
    follow_up_code: list[str] | None = None   # a multi-call family's later calls, each written after reading the
                                              # observation before it (it copies numbers that one printed)
    needs_tool: bool | None = None            # True when the downscaled view does not hold the answer
    family: str | None = None                 # synthetic task family
    extra: dict = field(default_factory=dict)

    @property
    def answer_text(self) -> str:
        """The answer as words: the option's text for multiple choice (the verifier accepts it as the letter)."""
        return self.choices[LETTERS.index(self.answer)] if self.choices and self.answer in LETTERS else self.answer

    def is_answer(self, text: str) -> bool:
        """True when `text` is the answer: the answer itself or, for multiple choice, the option's text."""
        return text.strip() in (self.answer, self.answer_text)

    @property
    def media_kind(self) -> Literal["image", "video"]:
        return "image" if self.image_path is not None else "video"

    def to_row(self) -> dict:
        """The official validation row, plus our optional fields when set."""
        row = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        return row | ({"extra": self.extra} if self.extra else {})


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class BadRow:
    file: str
    row: int
    field: str
    problem: str


def _expect_str(file, i, row: dict, name: str, allow_number: bool = False) -> str:
    value = row.get(name)
    if value is None or value == "":
        raise DataError(file, i, name, "missing or empty")
    if isinstance(value, bool) or not isinstance(value, (str, int, float) if allow_number else str):
        raise DataError(file, i, name, f"expected {'a string or number' if allow_number else 'a string'}, "
                                       f"got {type(value).__name__}")
    return str(value)


def _check_media(file, i, name: str, path: Path) -> None:
    if not path.is_file():
        raise DataError(file, i, name, f"file not found: {path}")
    if name == "image_path":
        try:
            with Image.open(path) as im:  # reads the header only; enough to catch non-images and truncated headers
                im.size
        except Exception as e:  # PIL raises several unrelated types for bad files
            raise DataError(file, i, name, f"unreadable image {path}: {e}") from None
    elif path.stat().st_size == 0:
        raise DataError(file, i, name, f"empty video file {path}")


def parse_row(row: dict, file: str | Path, i: int, check_media: bool = True) -> Task:
    """One JSON row (validation or RL-training format) -> Task, or a DataError naming the field."""
    if not isinstance(row, dict):
        raise DataError(file, i, "<row>", f"expected a JSON object, got {type(row).__name__}")
    base = Path(file).parent
    if "prompt" in row or "extra_info" in row:  # RL training format
        info, reward_model, hint = row.get("extra_info"), row.get("reward_model"), row.get("mm_hint")
        for name, value in (("extra_info", info), ("reward_model", reward_model), ("mm_hint", hint)):
            if not isinstance(value, dict):
                raise DataError(file, i, name, "missing or not an object")
        flat = {"id": info.get("index", i), "question": info.get("question"),
                "answer": reward_model.get("ground_truth", info.get("answer")),
                "ability": row.get("ability"), "data_source": row.get("data_source")}
        kind = hint.get("hint_type")
        if kind not in ("image", "video"):
            raise DataError(file, i, "mm_hint.hint_type", f"expected 'image' or 'video', got {kind!r}")
        flat[f"{kind}_path"] = hint.get("hint_path")
        row = flat
    values = {name: _expect_str(file, i, row, name, allow_number=name in ("id", "answer")) for name in VALIDATION_FIELDS}
    media = [name for name in ("image_path", "video_path") if row.get(name) not in (None, "")]
    if len(media) != 1:
        raise DataError(file, i, "image_path|video_path", f"exactly one is required, found {media or 'neither'}")
    path = Path(_expect_str(file, i, row, media[0]))
    path = path if path.is_absolute() else base / path
    if check_media:
        _check_media(file, i, media[0], path)
    choices = row.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise DataError(file, i, "choices", "expected a list of strings")
    follow_up = row.get("follow_up_code")
    if follow_up is not None and not (isinstance(follow_up, list) and all(isinstance(c, str) for c in follow_up)):
        raise DataError(file, i, "follow_up_code", "expected a list of strings (one per later call)")
    known = set(VALIDATION_FIELDS) | {"image_path", "video_path", "choices", "solution_code", "follow_up_code",
                                      "needs_tool", "family", "extra"}
    return Task(**values, **{media[0]: str(path)}, choices=choices, solution_code=row.get("solution_code"),
                follow_up_code=follow_up, needs_tool=row.get("needs_tool"), family=row.get("family"),
                extra=row.get("extra") or {k: v for k, v in row.items() if k not in known})


def load_tasks(path: str | Path, on_error: Literal["raise", "skip"] = "raise",
               check_media: bool = True) -> tuple[list[Task], list[BadRow]]:
    """Read a JSON list (or JSONL) of rows. Returns (tasks, bad_rows); bad_rows is empty unless on_error='skip'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix != ".jsonl" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise DataError(path, -1, "<file>", f"invalid JSON: {e}") from None
    if not isinstance(rows, list):
        raise DataError(path, -1, "<file>", "expected a JSON list of rows")
    tasks, bad = [], []
    for i, row in enumerate(rows):
        try:
            tasks.append(parse_row(row, path, i, check_media))
        except DataError as e:
            if on_error == "raise":
                raise
            bad.append(BadRow(e.file, e.row, e.field, e.problem))
    return tasks, bad


def load_readable_tasks(path: str | Path, out_dir: str | Path) -> tuple[list[Task], list[BadRow]]:
    """How train.py and eval.py both read their tasks: a row that is not a task (a missing field, missing media) is
    skipped, listed in OUT_DIR/bad_rows.json with its file, row, field and problem, and counted on stderr; a file with
    no readable task at all stops the run before any work."""
    tasks, bad_rows = load_tasks(path, on_error="skip")
    if bad_rows:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "bad_rows.json").write_text(json.dumps([asdict(b) for b in bad_rows], indent=1))
        print(f"{len(bad_rows)} unreadable rows in {path} skipped (see {Path(out_dir) / 'bad_rows.json'}); "
              f"first: {bad_rows[0]}", file=sys.stderr)
    if not tasks:
        raise SystemExit(f"no readable task in {path}")
    return tasks, bad_rows


def write_tasks(tasks: list[Task], path: str | Path) -> None:
    """Write the official validation format; media paths relative to the file when they lie below it."""
    path = Path(path)
    rows = []
    for task in tasks:
        row = task.to_row()
        for key in ("image_path", "video_path"):
            if key in row and Path(row[key]).is_relative_to(path.parent):
                row[key] = str(Path(row[key]).relative_to(path.parent))
        rows.append(row)
    tmp = path.with_name(f".tmp_{path.name}")      # written whole or not at all: later stages trust this file
    tmp.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic image tasks
# ---------------------------------------------------------------------------------------------------------------------

# Marker colours are saturated and far apart, so the nearest-colour rule in the solution code is unambiguous.
PALETTE = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 220, 30)}
LETTERS = "ABCDEFGH"


def _noisy_canvas(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Grey noise (values 90..170): fine texture that the downscale averages away but pixel tests ignore."""
    return rng.integers(90, 171, size=(height, width, 1), dtype=np.uint8).repeat(3, axis=2)  # (H, W, 3)


def _options_text(choices: list[str]) -> str:
    return " ".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))


def _free_spots(rng: random.Random, width: int, height: int, count: int, margin: int, spacing: int) -> list[tuple[int, int]]:
    """`count` points at least `spacing` apart (Chebyshev), `margin` from the border."""
    spots: list[tuple[int, int]] = []
    while len(spots) < count:
        x, y = rng.randint(margin, width - margin - 1), rng.randint(margin, height - margin - 1)
        if all(max(abs(x - a), abs(y - b)) >= spacing for a, b in spots):
            spots.append((x, y))
    return spots


def _nearest_colour_code(variable: str) -> str:
    """Code that prints the name of the palette colour nearest to the RGB value in `variable`. The palette is the same
    in every task and the name is an option's text, which the verifier accepts as that option: the code copies
    nothing from the question's shuffled option list, and the policy never maps letters to RGB values in its head."""
    palette = ", ".join(f"'{name}': {rgb}" for name, rgb in PALETTE.items())
    return (f"palette = {{{palette}}}\n"
            f"print(min(palette, key=lambda c: sum((a - b) ** 2 for a, b in zip({variable}, palette[c]))))")


def _pixel_color(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    canvas = _noisy_canvas(nrng, width, height)
    names = list(PALETTE)
    target = rng.choice(names)
    x, y = rng.randint(12, width - 13), rng.randint(12, height - 13)
    # a touching ring of look-alike markers in the other colours: the downscale blends them into the target
    others = [c for c in names if c != target]
    for k, (dx, dy) in enumerate([(-3, -3), (0, -3), (3, -3), (-3, 0), (3, 0), (-3, 3), (0, 3), (3, 3)]):
        canvas[y + dy - 1:y + dy + 2, x + dx - 1:x + dx + 2] = PALETTE[others[k % len(others)]]
    canvas[y - 1:y + 2, x - 1:x + 2] = PALETTE[target]
    choices = names[:]
    rng.shuffle(choices)
    answer = LETTERS[choices.index(target)]
    question = (f"What is the colour of the small square centred at pixel (x={x}, y={y})? "
                f"Options: {_options_text(choices)}")
    code = (f"pixel = image_clue_0.getpixel(({x}, {y}))\n"
            "print(pixel)\n"
            + _nearest_colour_code("pixel"))
    return canvas, question, answer, "multiple_choice", choices, code, True


def _count_dots(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    canvas = _noisy_canvas(nrng, width, height)
    count = rng.randint(3, 12)
    for x, y in _free_spots(rng, width, height, count, margin=6, spacing=12):
        canvas[y - 1:y + 2, x - 1:x + 2] = (255, 0, 0)
    question = "How many small red dots (3x3 pixels each) are in the image? Answer with a number."
    code = ("a = np.array(image_clue_0).astype(int)\n"
            "red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)\n"
            "print(int(red.sum()) // 9)")
    return canvas, question, str(count), "numeric", None, code, True


def _checker_patch(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    canvas = _noisy_canvas(nrng, width, height)
    (x1, y1), (x2, y2) = _free_spots(rng, width, height, 2, margin=12, spacing=width // 3)
    first_checker = rng.random() < 0.5
    # a 1-pixel black/white checkerboard averages to the flat patch's grey once downscaled: only full resolution tells them apart
    yy, xx = np.mgrid[:6, :6]
    checker = np.where((yy + xx) % 2 == 0, 0, 255).astype(np.uint8)[..., None]   # (6, 6, 1)
    for (x, y), is_checker in (((x1, y1), first_checker), ((x2, y2), not first_checker)):
        canvas[y - 3:y + 3, x - 3:x + 3] = checker if is_checker else 128
    choices = [f"the patch at ({x1}, {y1})", f"the patch at ({x2}, {y2})"]
    question = ("Two 6x6 patches look grey from afar; one is a fine black and white checkerboard. "
                f"Which one is the checkerboard? Options: {_options_text(choices)}")
    # the patch centres go into the code as the question writes them and Python does the offsets: a small policy
    # learns to copy numbers, not to do arithmetic on them in its head
    code = ("g = np.array(image_clue_0.convert('L')).astype(float)\n"
            "def spread(x, y):\n"
            "    return g[y - 3:y + 3, x - 3:x + 3].std()\n"
            f"first, second = spread({x1}, {y1}), spread({x2}, {y2})\n"
            "print(first, second)\n"
            "print('A' if first > second else 'B')")
    return canvas, question, "A" if first_checker else "B", "multiple_choice", choices, code, True


def _locate_dot(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    canvas = _noisy_canvas(nrng, width, height)
    x, y = rng.randint(4, width - 5), rng.randint(4, height - 5)
    canvas[y - 1:y + 2, x - 1:x + 2] = PALETTE["green"]
    question = "A single small green dot is in the image. What is the x coordinate (in pixels) of its centre?"
    code = ("a = np.array(image_clue_0).astype(int)\n"
            "ys, xs = np.nonzero((a[..., 1] > 150) & (a[..., 0] < 80) & (a[..., 2] < 80))\n"
            "print(int(round(xs.mean())))")
    return canvas, question, str(x), "numeric", None, code, True


def _big_shape_color(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    canvas = np.full((height, width, 3), 255, np.uint8)
    colour = rng.choice(list(PALETTE))
    cx, cy, r = width // 2 + rng.randint(-40, 40), height // 2 + rng.randint(-40, 40), min(width, height) // 3
    yy, xx = np.ogrid[:height, :width]
    canvas[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = PALETTE[colour]
    choices = list(PALETTE)
    rng.shuffle(choices)
    question = f"What is the colour of the large circle? Options: {_options_text(choices)}"
    code = f"pixel = image_clue_0.getpixel(({cx}, {cy}))\n" + _nearest_colour_code("pixel")
    return canvas, question, LETTERS[choices.index(colour)], "multiple_choice", choices, code, False


def _count_big_squares(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    canvas = np.full((height, width, 3), 255, np.uint8)
    count = rng.randint(1, 5)
    band = width // 5  # one square per vertical band, so squares never share a column
    for k in sorted(rng.sample(range(5), count)):
        side = rng.randint(band // 2, band - 10)
        x0, y0 = k * band + rng.randint(2, band - side - 2), rng.randint(5, height - side - 5)
        canvas[y0:y0 + side, x0:x0 + side] = 0
    question = "How many large black squares are in the image? Answer with a number."
    code = ("dark = (np.array(image_clue_0.convert('L')) < 50).any(axis=0)\n"
            "print(int(dark[0]) + int((dark[1:] & ~dark[:-1]).sum()))")
    return canvas, question, str(count), "numeric", None, code, False


RING_SIDE, RING_ZOOM = 29, 4   # a ring's outer side (odd: its centre is a whole pixel); the zoom's magnification


def _ring_colour(rng: random.Random, nrng: np.random.Generator, width: int, height: int):
    """Multi-call: locate, then zoom and read what the zoom shows. One or two 29x29 black rings, one holding a square of
    side 3..19; two rings sit in different halves, printed left first. The expert's first call prints the ring centres
    (it cannot know them from the question), each later call zooms 4x into one printed centre and prints nothing: the
    colour is read from the returned image (`read_zoomed_colour`), and when the left ring's zoom shows it empty a third
    call zooms into the right one. So 2 or 3 calls; the policy copies numbers from an observation and reads a figure.
    Large squares are visible in the downscaled view, small ones are not: direct answers are right at a moderate rate."""
    canvas = _noisy_canvas(nrng, width, height)
    names = list(PALETTE)
    colour = rng.choice(names)
    margin = RING_SIDE
    halves = [(margin, width // 2 - margin), (width // 2 + margin, width - margin)]
    rings = halves if rng.random() < 0.5 else [rng.choice(halves)]
    filled = rng.randrange(len(rings))
    centres = []
    for k, (lo, hi) in enumerate(rings):
        cx, cy = rng.randint(lo, hi), rng.randint(margin, height - margin)
        r = RING_SIDE // 2
        inside = canvas[cy - r + 2:cy + r - 1, cx - r + 2:cx + r - 1].copy()   # (25, 25, 3): the ring is 2 px thick
        canvas[cy - r:cy + r + 1, cx - r:cx + r + 1] = 0
        canvas[cy - r + 2:cy + r - 1, cx - r + 2:cx + r - 1] = inside
        if k == filled:
            half = rng.randint(1, 9)   # side 3..19
            canvas[cy - half:cy + half + 1, cx - half:cx + half + 1] = PALETTE[colour]
        centres.append((cx, cy))
    choices = names[:]
    rng.shuffle(choices)
    question = ("A small coloured square sits inside a black ring (the image may also hold a second, empty ring). "
                f"What is the colour of the square? Options: {_options_text(choices)}")
    locate = ("g = np.array(image_clue_0.convert('L'))\n"
              "ys, xs = np.nonzero(g < 40)\n"
              "for half in (xs < g.shape[1] // 2, xs >= g.shape[1] // 2):\n"
              "    if half.any():\n"
              "        print(round(xs[half].mean()), round(ys[half].mean()))")
    zooms = [f"x, y = {cx}, {cy}\n"
             f"image_clue_0.crop((x - 20, y - 20, x + 20, y + 20)).resize(({40 * RING_ZOOM}, {40 * RING_ZOOM})).show()"
             for cx, cy in centres]
    return canvas, question, LETTERS[choices.index(colour)], "multiple_choice", choices, [locate, *zooms], True


def read_zoomed_colour(figure: Image.Image) -> str | None:
    """What a sighted reader sees in a `ring_colour` zoom: the palette colour at the figure's centre, or None when the
    centre is grey (an empty ring, or not a zoom). The scripted expert reads returned figures with this instead of
    looking up the label, so its answers, like its calls, come from what the sandbox returned."""
    pixels = np.asarray(figure.convert("RGB")).astype(int)   # (H, W, 3)
    h, w = pixels.shape[:2]
    centre = pixels[h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 3].reshape(-1, 3).mean(axis=0)   # (3,)
    if centre.max() - centre.min() < 80:   # palette colours span >= 170 between channels, grey noise 0
        return None
    return min(PALETTE, key=lambda name: float(((centre - PALETTE[name]) ** 2).sum()))


IMAGE_FAMILIES = {"pixel_color": _pixel_color, "count_dots": _count_dots, "checker_patch": _checker_patch,
                  "locate_dot": _locate_dot, "big_shape_color": _big_shape_color, "count_big_squares": _count_big_squares,
                  "ring_colour": _ring_colour}
# the demo's mixture: the single-call families (ring_colour joins the ablations' mixtures, Makefile ABL_FAMILIES and
# ABL_RL_FAMILIES)
DEFAULT_IMAGE_FAMILIES = ("pixel_color", "count_dots", "checker_patch", "locate_dot", "big_shape_color",
                          "count_big_squares")


def check_image_families(families: Sequence[str]) -> None:
    """ValueError unless `families` names at least one family and only known ones."""
    if (unknown := sorted(set(families) - set(IMAGE_FAMILIES))) or not families:
        what = f"unknown {', '.join(unknown)}" if unknown else "no family named"
        raise ValueError(f"{what} (known: {', '.join(IMAGE_FAMILIES)})")


def iter_image_tasks(n: int, seed: int, families: Sequence[str] = DEFAULT_IMAGE_FAMILIES
                     ) -> Iterator[tuple[Task, Image.Image]]:
    """Seeded synthetic image tasks, `families` in round-robin (a family named twice gets twice the share). Yields
    (task without a path, the full-resolution image)."""
    check_image_families(families)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    for i in range(n):
        family = families[i % len(families)]
        width, height = rng.choice([(640, 480), (800, 600), (560, 560), (720, 480)])
        canvas, question, answer, ability, choices, code, needs_tool = IMAGE_FAMILIES[family](rng, nrng, width, height)
        first, *later = [code] if isinstance(code, str) else code
        task = Task(id=f"img-{seed}-{i:05d}", question=question, answer=answer, ability=ability,
                    data_source=SYNTHETIC_IMAGE_SOURCE, choices=choices, solution_code=first,
                    follow_up_code=later or None, needs_tool=needs_tool, family=family)
        yield task, Image.fromarray(canvas)


def _write_task_set(items, out_dir: str | Path | None, media_dir: str, suffix: str, save) -> list[Task]:
    """Shared by the image and video generators: save each task's media with `save(media, path)`, point the task at
    it, and write `out_dir/tasks.json`. With out_dir=None nothing is written (text only)."""
    tasks = []
    if out_dir is not None:
        (Path(out_dir) / media_dir).mkdir(parents=True, exist_ok=True)
    for task, media in items:
        if out_dir is not None:
            path = Path(out_dir) / media_dir / f"{task.id}{suffix}"
            save(media, path)
            setattr(task, "image_path" if media_dir == "images" else "video_path", str(path))
        tasks.append(task)
    if out_dir is not None:
        write_tasks(tasks, Path(out_dir) / "tasks.json")
    return tasks


def generate_image_tasks(n: int, seed: int, out_dir: str | Path | None,
                         families: Sequence[str] = DEFAULT_IMAGE_FAMILIES) -> list[Task]:
    """Write `out_dir/tasks.json` and `out_dir/images/*.png` (same seed, same bytes). With out_dir=None, text only."""
    return _write_task_set(iter_image_tasks(n, seed, families), out_dir, "images", ".png",
                           lambda image, path: image.save(path, format="PNG"))


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic video tasks
# ---------------------------------------------------------------------------------------------------------------------

VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_FPS = 160, 120, 8
VIDEO_BACKGROUND = (40, 40, 40)
VIDEO_GOP_FRAMES = 4 * VIDEO_FPS       # a keyframe every 4 s: a random access decodes at most ~32 frames
LINE_X = VIDEO_WIDTH // 2              # the line of the crossing family
# what a video family returns: (frame index -> (H, W, 3) uint8 frame, question, answer, ability, choices, solution code)
VideoScene = tuple[Callable[[int], np.ndarray], str, str, str, list[str] | None, str]


def _video_canvas() -> np.ndarray:
    return np.full((VIDEO_HEIGHT, VIDEO_WIDTH, 3), VIDEO_BACKGROUND, np.uint8)  # (H, W, 3)


def _draw_disc(frame: np.ndarray, cx: float, cy: float, radius: int, colour: tuple[int, int, int]) -> None:
    yy, xx = np.ogrid[:VIDEO_HEIGHT, :VIDEO_WIDTH]
    frame[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius] = colour


def _draw_square(frame: np.ndarray, cx: float, cy: float, half: int, colour: tuple[int, int, int]) -> None:
    x, y = int(round(cx)), int(round(cy))
    frame[y - half:y + half, x - half:x + half] = colour


def _wander(k: int, phase: float, period_frames: float, centre: float, amplitude: float) -> float:
    """A smooth back-and-forth coordinate: what makes the synthetic clips videos rather than slide shows."""
    return centre + amplitude * np.sin(2 * np.pi * k / period_frames + phase)


def _colour_at_time(rng: random.Random, num_frames: int) -> VideoScene:
    """A ball drifts around and changes colour every 2-5 s; the question asks for its colour at one moment."""
    names = list(PALETTE)
    starts, colours = [0], [rng.choice(names)]      # frame where each colour segment starts, and its colour
    while (nxt := starts[-1] + rng.randint(2 * VIDEO_FPS, 5 * VIDEO_FPS)) < num_frames:
        starts.append(nxt)
        colours.append(rng.choice([c for c in names if c != colours[-1]]))

    def colour_of(k: int) -> str:
        return colours[max(j for j, start in enumerate(starts) if start <= k)]

    # ask on the half-second grid, at least 0.5 s from a colour change, preferring moments not coloured like frame 0
    grid = [k for k in range(VIDEO_FPS, num_frames - VIDEO_FPS, VIDEO_FPS // 2)
            if all(abs(k - start) >= VIDEO_FPS // 2 for start in starts[1:])]
    telling = [k for k in grid if colour_of(k) != colours[0]]
    asked = rng.choice(telling or grid)
    phases = (rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))
    periods = (rng.uniform(40, 90), rng.uniform(30, 70))

    def draw(k: int) -> np.ndarray:
        frame = _video_canvas()
        _draw_disc(frame, _wander(k, phases[0], periods[0], 80, 50), _wander(k, phases[1], periods[1], 60, 30), 14,
                   PALETTE[colour_of(k)])
        return frame

    choices = names[:]
    rng.shuffle(choices)
    seconds = f"{asked / VIDEO_FPS:g}"
    question = f"What colour is the ball at t = {seconds} s? Options: {_options_text(choices)}"
    code = ("fps = video_clue_0.get_avg_fps()\n"
            f"frame = video_clue_0[round({seconds} * fps)].asnumpy()\n"
            "plt.figure(figsize=(1.6, 1.2))\n"
            "plt.imshow(frame)\n"
            "plt.axis('off')\n"
            "plt.show()\n"
            "colour = frame[frame.max(axis=2) - frame.min(axis=2) > 80].mean(axis=0)\n"
            "print(colour.round())\n"
            + _nearest_colour_code("colour"))
    return draw, question, LETTERS[choices.index(colour_of(asked))], "multiple_choice", choices, code


def _first_appearance(rng: random.Random, num_frames: int) -> VideoScene:
    """A green square appears at some moment and stays; a red ball moves around the whole time."""
    appears = rng.randrange(2 * VIDEO_FPS, num_frames - 2 * VIDEO_FPS + 1, VIDEO_FPS // 2)  # on the half-second grid
    cx, cy = rng.randint(14, VIDEO_WIDTH - 14), rng.randint(14, VIDEO_HEIGHT - 14)
    phases = (rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))

    def draw(k: int) -> np.ndarray:
        frame = _video_canvas()
        _draw_disc(frame, _wander(k, phases[0], 70, 80, 60), _wander(k, phases[1], 45, 60, 40), 10, PALETTE["red"])
        if k >= appears:
            _draw_square(frame, cx, cy, 10, PALETTE["green"])
        return frame

    question = ("A green square appears at some moment and stays until the end of the video. "
                "At what time, in seconds, does it first appear? Answer with a number.")
    code = ("fps = video_clue_0.get_avg_fps()\n"
            "def visible(i):\n"
            "    frame = video_clue_0[i].asnumpy().astype(int)\n"
            f"    return (np.abs(frame - {PALETTE['green']}).sum(axis=2) < 120).sum() > 40\n"
            "lo, hi = 0, len(video_clue_0) - 1\n"
            "while lo < hi:\n"
            "    mid = (lo + hi) // 2\n"
            "    if visible(mid):\n"
            "        hi = mid\n"
            "    else:\n"
            "        lo = mid + 1\n"
            "plt.figure(figsize=(3.2, 1.2))\n"
            "plt.imshow(np.hstack([video_clue_0[lo - 1].asnumpy(), video_clue_0[lo].asnumpy()]))\n"
            "plt.axis('off')\n"
            "plt.show()\n"
            "print(f'{lo / fps:g}')")
    return draw, question, f"{appears / VIDEO_FPS:g}", "numeric", None, code


def _count_crossings(rng: random.Random, num_frames: int) -> VideoScene:
    """A red ball rests on one side of a white line, then crosses it; crossings are at least 2 s apart."""
    seconds = num_frames // VIDEO_FPS
    # crossings happen half-way between whole seconds, so one-frame-per-second sampling never lands on the line
    candidates = [m + 0.5 for m in range(seconds - 1)]
    rng.shuffle(candidates)
    wanted, crossings = rng.randint(1, 6), []
    for c in candidates:
        if len(crossings) < wanted and all(abs(c - other) >= 2 for other in crossings):
            crossings.append(c)
    crossings.sort()
    first_side = rng.choice([-1, 1])
    bob_phase = rng.uniform(0, 2 * np.pi)

    def base_x(t: float) -> float:
        """Rest at LINE_X +- 40; during the second around a crossing, move straight through the line."""
        side = first_side
        for c in crossings:
            if t >= c + 0.5:
                side = -side
            elif t > c - 0.5:
                return LINE_X + side * 40 * (1 - 2 * (t - (c - 0.5)))
        return LINE_X + side * 40

    def draw(k: int) -> np.ndarray:
        frame = _video_canvas()
        frame[:, LINE_X - 1:LINE_X + 1] = 255
        t = k / VIDEO_FPS
        _draw_disc(frame, base_x(t) + 6 * np.sin(2 * np.pi * t / 1.7), _wander(k, bob_phase, 25, 60, 25), 10,
                   PALETTE["red"])
        return frame

    question = (f"A red ball moves left and right across the white vertical line at x = {LINE_X}. After each crossing "
                "it stays on the new side for at least 2 seconds. How many times does the ball cross the line? "
                "Answer with a number.")
    code = ("fps = video_clue_0.get_avg_fps()\n"
            "times = np.arange(0, len(video_clue_0) / fps, 1.0)\n"
            "frames = video_clue_0.get_batch([int(t * fps) for t in times]).asnumpy().astype(int)\n"
            f"xs = [np.nonzero((np.abs(f - {PALETTE['red']}).sum(axis=2) < 120).any(axis=0))[0].mean() for f in frames]\n"
            "plt.figure(figsize=(3.2, 1.2))\n"
            "plt.plot(times, xs, 'o-')\n"
            f"plt.axhline({LINE_X}, color='k')\n"
            "plt.show()\n"
            f"sides = np.array(xs) > {LINE_X}\n"
            "print(int((sides[1:] != sides[:-1]).sum()))")
    return draw, question, str(len(crossings)), "numeric", None, code


def _moves_first(rng: random.Random, num_frames: int) -> VideoScene:
    """A blue and a yellow square stand still; each later slides 40 px in 1 s. Starts are at least 2 s apart."""
    squares = {"blue": [rng.randint(20, 60), rng.randint(16, VIDEO_HEIGHT - 16)],
               "yellow": [rng.randint(100, 140), rng.randint(16, VIDEO_HEIGHT - 16)]}
    outward = {"blue": (-1, 0), "yellow": (1, 0)}   # never toward each other, so they cannot overlap
    moves = {}
    for name, (x, y) in squares.items():
        options = [d for d in (outward[name], (0, -1), (0, 1))
                   if 10 <= x + 40 * d[0] <= VIDEO_WIDTH - 10 and 10 <= y + 40 * d[1] <= VIDEO_HEIGHT - 10]
        moves[name] = rng.choice(options)
    half = VIDEO_FPS // 2
    first_start = rng.randrange(VIDEO_FPS, num_frames - 4 * VIDEO_FPS + 1, half)
    second_start = rng.randrange(first_start + 2 * VIDEO_FPS, num_frames - 2 * VIDEO_FPS + 1, half)
    first = rng.choice(list(squares))
    starts = {first: first_start, next(n for n in squares if n != first): second_start}

    def draw(k: int) -> np.ndarray:
        frame = _video_canvas()
        for name, (x, y) in squares.items():
            progress = min(max((k - starts[name]) / VIDEO_FPS, 0.0), 1.0)  # 0 before the start, 1 a second later
            _draw_square(frame, x + 40 * progress * moves[name][0], y + 40 * progress * moves[name][1], 8,
                         PALETTE[name])
        return frame

    names = list(squares)
    rng.shuffle(names)
    choices = [f"the {name} square" for name in names]
    question = ("Two squares, a blue one and a yellow one, stand still at the start of the video; later each of them "
                f"moves. Which one starts moving first? Options: {_options_text(choices)}")
    reference = ", ".join(f"'{LETTERS[j]}': {PALETTE[name]}" for j, name in enumerate(names))
    code = (f"colours = {{{reference}}}\n"
            "def centres(i):\n"
            "    frame = video_clue_0[i].asnumpy().astype(int)\n"
            "    return {k: np.argwhere(np.abs(frame - c).sum(axis=2) < 120).mean(axis=0) for k, c in colours.items()}\n"
            "start = centres(0)\n"
            "def moved(i):\n"
            "    now = centres(i)\n"
            "    return [k for k in colours if np.abs(now[k] - start[k]).max() > 2]\n"
            "lo, hi = 0, len(video_clue_0) - 1\n"
            "while lo < hi:\n"
            "    mid = (lo + hi) // 2\n"
            "    if moved(mid):\n"
            "        hi = mid\n"
            "    else:\n"
            "        lo = mid + 1\n"
            "plt.figure(figsize=(3.2, 1.2))\n"
            "plt.imshow(np.hstack([video_clue_0[0].asnumpy(), video_clue_0[lo].asnumpy()]))\n"
            "plt.axis('off')\n"
            "plt.show()\n"
            "print(moved(lo)[0])")
    return draw, question, LETTERS[names.index(first)], "multiple_choice", choices, code


VIDEO_FAMILIES = {"colour_at_time": _colour_at_time, "first_appearance": _first_appearance,
                  "count_crossings": _count_crossings, "moves_first": _moves_first}


def iter_video_tasks(n: int, seed: int) -> Iterator[tuple[Task, Iterator[np.ndarray]]]:
    """Seeded synthetic video tasks, families in round-robin. Yields (task without a path, its frames, lazily).

    Frames are drawn from parameters fixed when the task is made, so skipping or consuming them never changes later
    tasks.
    """
    rng = random.Random(seed)
    families = list(VIDEO_FAMILIES)
    for i in range(n):
        family = families[i % len(families)]
        num_frames = rng.randint(10, 30) * VIDEO_FPS
        draw, question, answer, ability, choices, code = VIDEO_FAMILIES[family](rng, num_frames)
        task = Task(id=f"vid-{seed}-{i:05d}", question=question, answer=answer, ability=ability,
                    data_source=SYNTHETIC_VIDEO_SOURCE, choices=choices, solution_code=code, needs_tool=True,
                    family=family)
        yield task, (draw(k) for k in range(num_frames))


def generate_video_tasks(n: int, seed: int, out_dir: str | Path | None) -> list[Task]:
    """Write `out_dir/tasks.json` and `out_dir/videos/*.mp4` (same seed, same bytes). With out_dir=None, text only."""
    def write(frames: Iterator[np.ndarray], path: Path) -> None:
        # PyAV only where a video is written: image-only work and the tokenizer corpus (out_dir=None) run without it
        from video_reader import write_video
        write_video(path, frames, fps=VIDEO_FPS, gop_size=VIDEO_GOP_FRAMES)
    return _write_task_set(iter_video_tasks(n, seed), out_dir, "videos", ".mp4", write)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write seeded synthetic tasks in the official validation format.")
    parser.add_argument("--kind", choices=["image", "video"], default="image", help="media kind of the tasks")
    parser.add_argument("--n", type=int, default=64, help="number of tasks")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes")
    parser.add_argument("--out", required=True, help="output directory (tasks.json and the media beside it)")
    parser.add_argument("--families", default=",".join(DEFAULT_IMAGE_FAMILIES),
                        help="image families, comma-separated, in round-robin; a family named twice gets twice the "
                             f"share (known: {', '.join(IMAGE_FAMILIES)})")
    args = parser.parse_args()
    families = tuple(args.families.split(","))
    try:
        check_image_families(families)   # before any directory is made
    except ValueError as e:
        parser.error(f"--families: {e}")
    if args.kind == "image":
        tasks = generate_image_tasks(args.n, args.seed, args.out, families)
    else:
        tasks = generate_video_tasks(args.n, args.seed, args.out)
    print(f"wrote {len(tasks)} {args.kind} tasks to {Path(args.out) / 'tasks.json'}")


if __name__ == "__main__":
    main()

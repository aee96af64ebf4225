"""data.py — tasks: the official data formats, and synthetic tasks where the Python tool is genuinely needed.

What this file is
    A `Task` is one question about one image or one video with its reference answer (method.md §2.1, "Training data item
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
    as `image_clue_0` (method.md §2.1, §3). Tool-requiring families put the answer in detail that the downscale destroys
    (the colour of a 3-pixel marker ringed by look-alike markers, counts of 3-pixel dots, which of two grey-looking patches
    is a 1-pixel checkerboard, the exact x coordinate of a single dot). Tool-free families (one large shape's colour, a count of
    large squares) are answerable from the downscaled view. Every task carries `solution_code`: short, templated Python a
    competent agent would write, whose last printed line is the answer. The scripted expert (rollout.py) runs it in the
    sandbox and answers with what it printed, so correctness comes from the tool, not from peeking at the label.

How to run
    python data.py --kind image --n 64 --seed 0 --out runs/data/image     # writes tasks.json + images/
    python -c "import data; tasks, bad = data.load_tasks('tasks.json', on_error='skip')"

Differences from the official code
    * Official raw validation rows are converted only when their path contains `image_val_dataset`/`video_val_dataset`;
      here the format is detected per row.
    * Relative media paths are resolved against the JSON file's directory (the official files use absolute paths).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image

VALIDATION_FIELDS = ("id", "question", "answer", "ability", "data_source")
SYNTHETIC_IMAGE_SOURCE = "synthetic_image"


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
    solution_code: str | None = None          # Python whose last printed line is the answer (synthetic tasks)
    needs_tool: bool | None = None            # True when the downscaled view does not hold the answer
    family: str | None = None                 # synthetic task family
    extra: dict = field(default_factory=dict)

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
    known = set(VALIDATION_FIELDS) | {"image_path", "video_path", "choices", "solution_code", "needs_tool", "family", "extra"}
    return Task(**values, **{media[0]: str(path)}, choices=choices, solution_code=row.get("solution_code"),
                needs_tool=row.get("needs_tool"), family=row.get("family"),
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
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


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
    reference = ", ".join(f"'{LETTERS[k]}': {PALETTE[c]}" for k, c in enumerate(choices))
    code = (f"pixel = image_clue_0.getpixel(({x}, {y}))\n"
            f"options = {{{reference}}}\n"
            "print(pixel)\n"
            "print(min(options, key=lambda k: sum((a - b) ** 2 for a, b in zip(pixel, options[k]))))")
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
    code = ("g = np.array(image_clue_0.convert('L')).astype(float)\n"
            f"first = g[{y1 - 3}:{y1 + 3}, {x1 - 3}:{x1 + 3}].std()\n"
            f"second = g[{y2 - 3}:{y2 + 3}, {x2 - 3}:{x2 + 3}].std()\n"
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
    reference = ", ".join(f"'{LETTERS[k]}': {PALETTE[c]}" for k, c in enumerate(choices))
    code = (f"pixel = image_clue_0.getpixel(({cx}, {cy}))\n"
            f"options = {{{reference}}}\n"
            "print(min(options, key=lambda k: sum((a - b) ** 2 for a, b in zip(pixel, options[k]))))")
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


IMAGE_FAMILIES = {"pixel_color": _pixel_color, "count_dots": _count_dots, "checker_patch": _checker_patch,
                  "locate_dot": _locate_dot, "big_shape_color": _big_shape_color, "count_big_squares": _count_big_squares}


def iter_image_tasks(n: int, seed: int) -> Iterator[tuple[Task, Image.Image]]:
    """Seeded synthetic image tasks, families in round-robin. Yields (task without a path, the full-resolution image)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    families = list(IMAGE_FAMILIES)
    for i in range(n):
        family = families[i % len(families)]
        width, height = rng.choice([(640, 480), (800, 600), (560, 560), (720, 480)])
        canvas, question, answer, ability, choices, code, needs_tool = IMAGE_FAMILIES[family](rng, nrng, width, height)
        task = Task(id=f"img-{seed}-{i:05d}", question=question, answer=answer, ability=ability,
                    data_source=SYNTHETIC_IMAGE_SOURCE, choices=choices, solution_code=code,
                    needs_tool=needs_tool, family=family)
        yield task, Image.fromarray(canvas)


def generate_image_tasks(n: int, seed: int, out_dir: str | Path | None) -> list[Task]:
    """Write `out_dir/tasks.json` and `out_dir/images/*.png` (same seed, same bytes). With out_dir=None, text only."""
    tasks = []
    if out_dir is not None:
        (Path(out_dir) / "images").mkdir(parents=True, exist_ok=True)
    for task, image in iter_image_tasks(n, seed):
        if out_dir is not None:
            path = Path(out_dir) / "images" / f"{task.id}.png"
            image.save(path, format="PNG")
            task.image_path = str(path)
        tasks.append(task)
    if out_dir is not None:
        write_tasks(tasks, Path(out_dir) / "tasks.json")
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description="Write seeded synthetic tasks in the official validation format.")
    parser.add_argument("--kind", choices=["image"], default="image", help="media kind of the tasks")
    parser.add_argument("--n", type=int, default=64, help="number of tasks")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes")
    parser.add_argument("--out", required=True, help="output directory (tasks.json and the media beside it)")
    args = parser.parse_args()
    tasks = generate_image_tasks(args.n, args.seed, args.out)
    print(f"wrote {len(tasks)} {args.kind} tasks to {Path(args.out) / 'tasks.json'}")


if __name__ == "__main__":
    main()

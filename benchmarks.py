"""benchmarks.py — the benchmarks' public release files → our tasks.json (docs/method.md §9).

What this file is
    PyVision-RL is reported on V*, HRBench-4K/8K, MathVerse, MathVision, WeMath, DynaMath, TIR-Bench and VSI-Bench
    (docs/method.md §9). Each release has its own layout (JSON or JSONL rows, VLMEvalKit TSVs with base64 images, hub
    parquet files with image structs, one annotation file per image); one converter per benchmark reads it into the
    official validation format `{id, question, answer, ability, data_source, image_path | video_path}` (data.py), the
    only format eval.py evaluates:
      * `BENCHMARKS`: name -> converter and where its public files come from; the same names select the protocol's
        sampling (`eval.py --benchmark-defaults NAME`, eval.BENCHMARK_SAMPLING).
      * `prepare(benchmark, src, out)`: OUT/tasks.json (+ OUT/media/ for images stored inside the release files), read
        back with data.load_tasks as a check; the items a converter skips are returned and printed.
      * `read_rows(path)`: the rows of a .json, .jsonl, .tsv or .parquet file.
    Each converter's docstring names the release files and fields it reads; the `data_source` it writes picks the
    verifier (reward.py).

How to run
    python eval.py prepare --benchmark vstar --src vstar_bench/ --out data/vstar
    python eval.py --data data/vstar/tasks.json --benchmark-defaults vstar --judge-url http://127.0.0.1:8000/v1
    (`python eval.py prepare --help` lists the benchmarks and where each release is downloaded.)

Differences from the paper / official code
    * The official evaluation code (PyVision-RL-Eval) was not available. V* keeps its release's question line
      verbatim and MATH-Vision lists options as its own prompt does; for the other benchmarks how options are listed
      is ours.
    * TIR-Bench's two-image items and MathVerse's text-only items are skipped (and listed): a task here is a question
      about one image or one video, and the agent's prompt and sandbox start from that media.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

import data
from data import DataError, Task


# ---------------------------------------------------------------------------------------------------------------------
# Reading release files
# ---------------------------------------------------------------------------------------------------------------------

def read_keyed_rows(path: Path) -> list[tuple[str, dict]]:
    """(key, row) pairs of a .json (list, or a mapping key -> row), .jsonl, .tsv (VLMEvalKit style) or .parquet file.
    The key is the mapping's key (some releases keep the item id only there, e.g. DynaMath's GitHub files), else the
    row's position."""
    suffix = path.suffix.lower()
    keys = None
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):
            keys, rows = list(rows), list(rows.values())
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".tsv":
        csv.field_size_limit(sys.maxsize)   # base64 images are far longer than csv's default 128 KiB field limit
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), which the project does "
                              "not depend on; or convert the file to JSON/TSV first") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (want .json, .jsonl, .tsv or .parquet)")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(path, -1, "<file>", "expected a list of objects")
    return list(zip(keys or map(str, range(len(rows))), rows))


def read_rows(path: Path) -> list[dict]:
    """The rows of `path` (read_keyed_rows without the keys)."""
    return [row for _, row in read_keyed_rows(path)]


def _files(src: Path, patterns: Sequence[str]) -> list[Path]:
    """`src` itself when it is a file; else the files below it matching the first pattern that matches any (patterns go
    from the release's own file name to looser ones)."""
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} does not exist")
    for pattern in patterns:
        found = sorted(p for p in src.rglob(pattern) if p.is_file())
        if found:
            return found
    raise FileNotFoundError(f"--src {src}: no file matching {list(patterns)}")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:   # e.g. a base64 string too long to be a file name
        return False


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _field(row: dict, name: str | tuple[str, ...], file: Path, index: int):
    """The row's value of `name`; a tuple names the spellings different releases of one benchmark use, first wins."""
    names = (name,) if isinstance(name, str) else name
    value = next((row[n] for n in names if not _is_empty(row.get(n))), None)
    if value is None:
        raise DataError(file, index, "|".join(names), "missing or empty")
    return value


def _existing(path_text: str, roots: Sequence[Path], file: Path, index: int, name: str) -> Path:
    path = Path(path_text)
    for candidate in ([path] if path.is_absolute() else [root / path for root in roots]):
        if _is_file(candidate):
            return candidate.resolve()
    raise DataError(file, index, name, f"file not found: {path_text} (looked under {[str(r) for r in roots]})")


def _image_file(value, media_dir: Path, stem: str, roots: Sequence[Path], file: Path, index: int, name: str) -> Path:
    """The image of a row as a file: a path (kept where it is), a base64 string (TSV) or a {bytes, path} struct (parquet
    Image feature); decoded images are written once to media_dir/stem.<format>."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise DataError(file, index, name, "image struct without bytes or path")
    if isinstance(value, str):
        if len(value) < 4096 and "\n" not in value:   # short enough to be a path: a file wins over base64
            path = Path(value)
            for candidate in [path] if path.is_absolute() else [root / path for root in roots]:
                if _is_file(candidate):
                    return candidate.resolve()
        try:
            value = base64.b64decode("".join(value.split()), validate=True)
        except binascii.Error:
            raise DataError(file, index, name, f"neither an existing file (looked under {[str(r) for r in roots]}) "
                                               f"nor base64 image data: {value[:80]!r}") from None
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(file, index, name, f"unsupported image value of type {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as image:
            image_format = (image.format or "png").lower()
    except Exception as error:   # PIL raises several unrelated types for bad data
        raise DataError(file, index, name, f"not a file path, and undecodable as image data ({error})") from None
    media_dir.mkdir(parents=True, exist_ok=True)
    target = media_dir / f"{stem}.{'jpg' if image_format == 'jpeg' else image_format}"
    target.write_bytes(value)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# One converter per benchmark: (release directory or file, media directory) -> (tasks, skipped items)
# ---------------------------------------------------------------------------------------------------------------------

def _lettered(options: Sequence[str], style: str = "{letter}. {text}") -> str:
    return "\n".join(style.format(letter=chr(ord("A") + k), text=str(text).strip()) for k, text in enumerate(options))


_PAREN_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*)$")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")   # the folders the official evaluation scripts read
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _vstar_task(task_id: str, question: str, answer: str, category: str, image: Path, options: list[str]) -> Task:
    return Task(id=task_id, question=question, answer=answer, ability=category, data_source="vstar",
                image_path=str(image), choices=options)


def _vstar_from_questions(src: Path) -> list[Task]:
    """test_questions.jsonl rows {image, text, label, category, question_id}. `text` is the released question line
    (the question, one `(A) option` line per option, then VSTAR_INSTRUCTION) and is kept whole; the option lines also
    give the task's choices. Ids are the official question_id."""
    tasks = []
    for file in _files(src, ["test_questions.jsonl", "*.jsonl"]):
        for i, row in enumerate(read_rows(file)):
            text = str(_field(row, "text", file, i)).strip()
            options = [m.group(2).strip() for m in map(_PAREN_OPTION.match, text.splitlines()) if m]
            if not options:
                raise DataError(file, i, "text", "no '(A) ...' option lines found")
            image = _existing(str(_field(row, "image", file, i)), [file.parent], file, i, "image")
            tasks.append(_vstar_task(str(_field(row, "question_id", file, i)), text,
                                     str(_field(row, "label", file, i)).strip(), str(row.get("category", "vstar")),
                                     image, options))
    return tasks


def _vstar_from_annotations(folders: Sequence[Path]) -> list[Task]:
    """The per-image layout: <category>/<name>.jpg beside <name>.json {target_object, bbox, question, options}, the
    correct option first (the release's convention; the official evaluation scripts list the options in that order
    and score against the first). The question is written in the test_questions.jsonl layout, so both layouts give the
    model the same kind of prompt. Ids are <category>/<image file name>, the name the official scripts record."""
    tasks = []
    for folder in folders:
        for image in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".json"):
            annotation = image.with_suffix(".json")
            if not annotation.is_file():
                raise DataError(image, 0, "<annotation>", f"no annotation {annotation.name} beside the image")
            row = json.loads(annotation.read_text(encoding="utf-8"))
            options = [str(option).strip() for option in _field(row, "options", annotation, 0)]
            lines = [str(_field(row, "question", annotation, 0)).strip(),
                     *(f"({letter}) {option}" for letter, option in zip(data.LETTERS, options)), VSTAR_INSTRUCTION]
            tasks.append(_vstar_task(f"{folder.name}/{image.name}", "\n".join(lines), "A", folder.name,
                                     image.resolve(), options))
    return tasks


def convert_vstar(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """V* Bench (craigwu/vstar_bench): test_questions.jsonl when the release holds it (its labels follow shuffled
    options), else the per-image annotations of VSTAR_CATEGORIES (SRC may also be one category folder)."""
    folders = [src] if src.name in VSTAR_CATEGORIES else [src / name for name in VSTAR_CATEGORIES]
    folders = [folder for folder in folders if folder.is_dir()]
    if folders and not (src / "test_questions.jsonl").is_file():
        return _vstar_from_annotations(folders), []
    return _vstar_from_questions(src), []


def convert_hrbench(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """HR-Bench (DreamMr/HR-Bench): hr_bench_4k / hr_bench_8k as TSV (VLMEvalKit) or parquet, rows {index, question,
    A, B, C, D, answer, category, cycle_category, image (base64)}. As in VLMEvalKit TSVs, an image field holding only a
    row index means "the same image as that row". The 4K/8K split is read from the file name."""
    tasks = []
    for file in _files(src, ["*hr_bench*.tsv", "*hr_bench*.parquet", "*hrbench*.tsv", "*hrbench*.parquet"]):
        variant = next((v for v in ("8k", "4k") if v in file.name.lower()), None)
        if variant is None:
            raise ValueError(f"{file}: cannot tell 4K from 8K; the file name must contain '4k' or '8k'")
        rows = read_rows(file)
        images: dict[str, Path] = {}
        for i, row in enumerate(rows):   # images first: a row may point to a later row's image
            value = row.get("image")
            if value is not None and not (isinstance(value, str) and value.strip().isdigit()):
                index = str(_field(row, "index", file, i))
                images[index] = _image_file(value, media, f"hrbench-{variant}-{index}", [file.parent], file, i, "image")
        for i, row in enumerate(rows):
            index = str(_field(row, "index", file, i))
            value = row.get("image")
            reference = value.strip() if isinstance(value, str) and value.strip().isdigit() else index
            if reference not in images:
                raise DataError(file, i, "image", f"refers to row index {reference}, which has no image")
            letters = [letter for letter in "ABCDEFGH" if row.get(letter) not in (None, "")]
            question = str(_field(row, "question", file, i)).strip() + "\n" + "\n".join(
                f"{letter}. {str(row[letter]).strip()}" for letter in letters)
            tasks.append(Task(id=f"hrbench-{variant}-{index}", question=question,
                              answer=str(_field(row, "answer", file, i)).strip(), ability=str(row.get("category", "all")),
                              data_source=f"hrbench-{variant}", image_path=str(images[reference]),
                              choices=[str(row[letter]).strip() for letter in letters],
                              extra={"cycle_category": row.get("cycle_category")}))
    return tasks, []


MATHVERSE_TEXT_ONLY = "Text Only"   # the problem_version whose items carry no image


def _holds_no_image(value) -> bool:
    """True for an image field that holds nothing: missing, empty, or a parquet image struct without bytes or path."""
    return not (value.get("bytes") or value.get("path")) if isinstance(value, dict) else _is_empty(value)


def convert_mathverse(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """MathVerse (AI4Math/MathVerse, ZrrSkywalker/MathVerse): testmini.json rows {sample_index, problem_index,
    problem_version, question, image, answer, question_type, metadata, query_wo, query_cot}; the options of
    multi-choice items are in `question`. Vision-only items have an empty question (it is in the image).
    Text-only items (testmini_text_only.json, problem_version "Text Only", image "") are skipped and listed: a task here
    is a question about one image or one video (data.Task), and the agent's prompt and sandbox start from that media."""
    tasks, skipped = [], []
    for file in _files(src, ["testmini.json", "*.json", "*.parquet"]):
        for i, row in enumerate(read_rows(file)):
            index = str(_field(row, "sample_index", file, i))
            if _holds_no_image(row.get("image")) and row.get("problem_version") == MATHVERSE_TEXT_ONLY:
                skipped.append(f"mathverse-{index}: text-only, no image")
                continue
            question = str(row.get("question") or "").strip() or "Answer the question shown in the image."
            image = _image_file(_field(row, "image", file, i), media, f"mathverse-{index}",
                                [file.parent, file.parent / "images"], file, i, "image")
            tasks.append(Task(id=f"mathverse-{index}", question=question, answer=str(_field(row, "answer", file, i)),
                              ability=str(row.get("problem_version", "all")), data_source="mathverse",
                              image_path=str(image), extra={"question_type": row.get("question_type")}))
    return tasks, skipped


# MATH-Vision items whose options are these bare letters have the options drawn in the image; the official prompt
# (mathllm/MATH-V `models/GPT4V.py`) lists options only when they are not exactly these.
MATHVISION_LETTERS_ONLY = ["A", "B", "C", "D", "E"]


def convert_mathvision(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """MATH-Vision (mathllm/MATH-V on GitHub: data/test.jsonl, data/testmini.jsonl + images/; MathLLMs/MathVision on the
    hub: test/testmini parquet), rows {id, question, options, image, decoded_image, answer, solution, level, subject};
    `options` empty for free-form items. Options other than MATHVISION_LETTERS_ONLY follow the question as the official
    prompt lays them out, one `(A) option` line each. Pass one split at a time (testmini repeats test's ids)."""
    tasks = []
    for file in _files(src, ["test*.jsonl", "*.parquet", "*.json"]):
        for i, row in enumerate(read_rows(file)):
            index = str(_field(row, "id", file, i))
            options = [str(o) for o in (row.get("options") or [])]
            question = str(_field(row, "question", file, i)).strip()
            if options and options != MATHVISION_LETTERS_ONLY:
                question += "\n" + _lettered(options, "({letter}) {text}")
            image_value = row.get("decoded_image") or _field(row, "image", file, i)
            image = _image_file(image_value, media, f"mathvision-{index}", [file.parent, file.parent.parent], file, i,
                                "image")
            tasks.append(Task(id=f"mathvision-{index}", question=question, answer=str(_field(row, "answer", file, i)),
                              ability=str(row.get("subject", "all")), data_source="mathvision", image_path=str(image),
                              choices=options or None, extra={"level": row.get("level")}))
    return tasks, []


def convert_wemath(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """We-Math (We-Math/We-Math): testmini.json rows {ID, split, knowledge concept, question, option ("A. x;B. y"),
    answer (letter), image_path, key ("2steps_1", ...), question number}."""
    tasks = []
    for file in _files(src, ["testmini.json", "*.json", "*.parquet"]):
        for i, row in enumerate(read_rows(file)):
            number = str(row.get("question number") or _field(row, "ID", file, i))
            question = str(_field(row, "question", file, i)).strip()
            if row.get("option"):
                question += "\nOptions: " + str(row["option"]).strip()
            image_value = row.get("image") or _field(row, "image_path", file, i)
            image = _image_file(image_value, media, f"wemath-{number}", [file.parent], file, i, "image_path")
            tasks.append(Task(id=f"wemath-{number}", question=question, answer=str(_field(row, "answer", file, i)).strip(),
                              ability=str(row.get("key") or "all"), data_source="wemath", image_path=str(image),
                              extra={"knowledge_concept": row.get("knowledge concept"), "ID": row.get("ID")}))
    return tasks, []


# the variant number in a DynaMath file's folder/name: trial{k}/ (GitHub), sample{k}-*.parquet (hub),
# sample_variant{k}/ (the hub's parquet export)
_DYNAMATH_VARIANT = re.compile(r"(?:trial|variant|sample)_?(\d+)")


def convert_dynamath(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """DynaMath's released sample of 10 variants of its 501 seed questions, one file per variant k:
      * GitHub DynaMath/DynaMath: `samples and result/10trials/trial{k}/dataset.json`, a mapping id -> {question,
        answer, image (a path under trial{k}/), answer_type, subject, level};
      * hub DynaMath/DynaMath_Sample: `data/sample{k}-*.parquet` (split sample_variant{k}), rows {id, question, image,
        decoded_image, ground_truth, answer_type, subject, knowledge_level}.
    Ids are dynamath-v{k}-{id}, and so are the names of the images written from parquet bytes, so variants never share
    an id or overwrite each other's image."""
    tasks = []
    for file in _files(src, ["trial*/dataset.json", "*.parquet", "*.json"]):
        variants = _DYNAMATH_VARIANT.findall(f"{file.parent.name}/{file.name}")
        if not variants:
            raise ValueError(f"{file}: cannot tell which DynaMath variant this file holds; its folder or name must say "
                             "(trial{k}/dataset.json, sample{k}-*.parquet or sample_variant{k}/)")
        variant = int(variants[-1])
        for i, (key, row) in enumerate(read_keyed_rows(file)):
            task_id = f"dynamath-v{variant}-{row.get('id', key)}"
            image_value = row.get("decoded_image") or _field(row, "image", file, i)
            image = _image_file(image_value, media, task_id, [file.parent, file.parent.parent], file, i, "image")
            tasks.append(Task(id=task_id, question=str(_field(row, "question", file, i)).strip(),
                              answer=str(_field(row, ("ground_truth", "answer"), file, i)).strip(),
                              ability=str(row.get("subject", "all")), data_source="dynamath", image_path=str(image),
                              extra={"answer_type": row.get("answer_type"), "variant": variant,
                                     "knowledge_level": row.get("knowledge_level", row.get("level"))}))
    return tasks, []


def convert_tirbench(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """TIR-Bench (hub Agents-X/TIR-Bench; the GitHub repository agents-x-project/TIR-Bench holds only its scoring
    scripts): TIR-Bench.json, a list (or index -> row mapping) of {id, task|category, prompt, answer, image_1, image_2,
    meta_data}, image paths relative to the JSON (data.zip unzipped beside it). Two-image items (image_2 set) are
    skipped: the image scaffold puts one image in context and in the sandbox."""
    tasks, skipped = [], []
    for file in _files(src, ["TIR-Bench.json", "*.json"]):
        for i, row in enumerate(read_rows(file)):
            index = str(row.get("id", row.get("question_id", i)))
            if row.get("image_2"):
                skipped.append(f"tirbench-{index}: two images")
                continue
            image = _existing(str(_field(row, "image_1", file, i)), [file.parent, file.parent / "images"], file, i,
                              "image_1")
            tasks.append(Task(id=f"tirbench-{index}", question=str(_field(row, "prompt", file, i)).strip(),
                              answer=str(_field(row, "answer", file, i)).strip(),
                              ability=str(row.get("task") or row.get("category") or "all"), data_source="tirbench",
                              image_path=str(image)))
    return tasks, skipped


VSI_NUMERIC_TYPES = frozenset({"object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation"})


def convert_vsibench(src: Path, media: Path) -> tuple[list[Task], list[str]]:
    """VSI-Bench (nyu-visionx/VSI-Bench): test-00000-of-00001.parquet (or JSON/JSONL) rows {id, dataset, scene_name,
    question_type, question, options ("A. chair" ...), ground_truth}; videos at <src>/<dataset>/<scene_name>.mp4 (the
    unzipped arkitscenes/scannet/scannetpp archives, the path the official lmms-eval task reads). Numeric question
    types are scored by MRA (vsi_numerical), the rest by the judge (vsi)."""
    tasks = []
    root = src if src.is_dir() else src.parent
    for file in _files(src, ["*.parquet", "*.jsonl", "test*.json"]):
        for i, row in enumerate(read_rows(file)):
            index = str(_field(row, "id", file, i))
            kind = str(_field(row, "question_type", file, i))
            video = _existing(f"{_field(row, 'dataset', file, i)}/{_field(row, 'scene_name', file, i)}.mp4",
                              [root, file.parent], file, i, "dataset/scene_name")
            options = [str(o) for o in (row.get("options") or [])]
            numeric = kind in VSI_NUMERIC_TYPES or not options
            question = str(_field(row, "question", file, i)).strip()
            if not numeric:
                question += "\nOptions:\n" + "\n".join(options)
            tasks.append(Task(id=f"vsi-{index}", question=question, answer=str(_field(row, "ground_truth", file, i)),
                              ability=kind, data_source="vsi_numerical" if numeric else "vsi", video_path=str(video),
                              choices=None if numeric else [re.sub(r"^[A-Z]\.\s*", "", o) for o in options],
                              extra={"dataset": row.get("dataset"), "scene_name": row.get("scene_name")}))
    return tasks, []


# ---------------------------------------------------------------------------------------------------------------------
# The table of benchmarks and the `prepare` command
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Benchmark:
    convert: Callable[[Path, Path], tuple[list[Task], list[str]]]
    release: str    # where the public files come from


BENCHMARKS: dict[str, Benchmark] = {
    "vstar": Benchmark(convert_vstar, "huggingface.co/datasets/craigwu/vstar_bench (test_questions.jsonl + images, or "
                                      "the per-image direct_attributes|relative_position/<name>.jpg + <name>.json)"),
    "hrbench": Benchmark(convert_hrbench, "huggingface.co/datasets/DreamMr/HR-Bench (hr_bench_4k/8k .tsv or .parquet)"),
    "mathverse": Benchmark(convert_mathverse, "huggingface.co/datasets/AI4Math/MathVerse or github.com/ZrrSkywalker/"
                                              "MathVerse (testmini.json + images; text-only items are skipped)"),
    "mathvision": Benchmark(convert_mathvision, "github.com/mathllm/MATH-V (data/test[mini].jsonl + images) or "
                                                "huggingface.co/datasets/MathLLMs/MathVision (test/testmini parquet)"),
    "wemath": Benchmark(convert_wemath, "huggingface.co/datasets/We-Math/We-Math (testmini.json + images)"),
    "dynamath": Benchmark(convert_dynamath, "github.com/DynaMath/DynaMath (samples and result/10trials/trial{k}/"
                                            "dataset.json) or huggingface.co/datasets/DynaMath/DynaMath_Sample "
                                            "(data/sample{k}-*.parquet)"),
    "tirbench": Benchmark(convert_tirbench, "huggingface.co/datasets/Agents-X/TIR-Bench (TIR-Bench.json + data.zip "
                                            "unzipped beside it)"),
    "vsibench": Benchmark(convert_vsibench, "huggingface.co/datasets/nyu-visionx/VSI-Bench (test-*.parquet + the "
                                            "arkitscenes/scannet/scannetpp zips unzipped beside it)"),
}


def prepare(benchmark: str, src: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Convert a benchmark release into OUT/tasks.json (+ OUT/media/ for images stored inside the release files).
    -> (tasks.json path, skipped items). The written file is read back with data.load_tasks as a check."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {sorted(BENCHMARKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, skipped = BENCHMARKS[benchmark].convert(Path(src), out / "media")
    duplicates = sorted(k for k, n in Counter(t.id for t in tasks).items() if n > 1)
    if duplicates:
        raise ValueError(f"{src}: repeated ids after conversion {duplicates[:10]}; pass one split/file at a time")
    path = out / "tasks.json"
    data.write_tasks(tasks, path)
    data.load_tasks(path)
    return path, skipped


def prepare_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="eval.py prepare",
                                     description="Convert a benchmark's public release into the official validation "
                                                 "format. Sources:\n" + "\n".join(
                                                     f"  {name}: {b.release}" for name, b in BENCHMARKS.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--src", required=True, help="the downloaded release: its directory or one of its files")
    parser.add_argument("--out", required=True, help="output directory: tasks.json, media/")
    args = parser.parse_args(argv)
    path, skipped = prepare(args.benchmark, args.src, args.out)
    tasks, _ = data.load_tasks(path)
    print(f"wrote {len(tasks)} tasks to {path} ({len(skipped)} skipped{': ' + '; '.join(skipped[:5]) if skipped else ''})")
    print(f"evaluate with: python eval.py --data {path} --benchmark-defaults {args.benchmark} --judge-url URL ...")

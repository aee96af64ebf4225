"""data.py: official row formats load into Tasks; bad rows name file, row and field; synthetic tasks are deterministic and
their recorded solution code really produces the answer (and the tool-requiring ones really need full resolution)."""
import contextlib
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data


def run_solution_lines(task: data.Task) -> list[str]:
    scope = {"np": np, "Image": Image, "image_clue_0": Image.open(task.image_path).convert("RGB")}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(task.solution_code, scope)
    return out.getvalue().strip().splitlines()


def run_solution(task: data.Task) -> str:
    return run_solution_lines(task)[-1]


def test_generator_same_seed_same_bytes(tmp_path):
    a = subprocess.run([sys.executable, "data.py", "--kind", "image", "--n", "6", "--seed", "3", "--out", str(tmp_path / "a")],
                       cwd=Path(data.__file__).parent, capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    data.generate_image_tasks(6, seed=3, out_dir=tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    other = data.generate_image_tasks(6, seed=4, out_dir=None)
    assert [t.question for t in other] != [t.question for t in data.load_tasks(tmp_path / "a" / "tasks.json")[0]]


def test_solution_code_gives_the_answer(image_tasks_dir):
    tasks, bad = data.load_tasks(image_tasks_dir / "tasks.json")
    assert not bad and len(tasks) == 12
    assert {t.family for t in tasks} == set(data.DEFAULT_IMAGE_FAMILIES)
    assert {t.ability for t in tasks} == {"multiple_choice", "numeric"}
    for task in tasks:
        assert task.is_answer(run_solution(task)), task.id


def test_tool_solution_code_copies_what_the_question_gives(image_tasks_dir):
    """The expert code of tool-requiring tasks only copies from the question: every number that varies between tasks of
    a family is written in the question as it is (no offsets computed in the head, no option-to-RGB table in the
    shuffled options' order: the palette is fixed and the code prints the colour's name)."""
    tasks, _ = data.load_tasks(image_tasks_dir / "tasks.json")
    by_family: dict[str, list[data.Task]] = {}
    for task in tasks:
        by_family.setdefault(task.family, []).append(task)
    for family, (first, second) in ((f, ts[:2]) for f, ts in by_family.items() if ts[0].needs_tool):
        for task, other in ((first, second), (second, first)):
            varying = set(re.findall(r"\d+", task.solution_code)) - set(re.findall(r"\d+", other.solution_code))
            assert varying <= set(re.findall(r"\d+", task.question)), (family, varying, task.solution_code)


def test_ring_colour_calls_depend_on_what_came_back(tmp_path):
    """The multi-call family: the first call prints the ring centres and is the same code in every task; each later
    call copies one printed line (left ring first); the first zoom showing a colour shows the answer, a zoom into the
    empty ring shows none; so 2 or 3 calls. `--families` writes the mixture it names, in round-robin."""
    out = subprocess.run([sys.executable, "data.py", "--n", "24", "--seed", "5", "--out", str(tmp_path),
                          "--families", "ring_colour,big_shape_color"],
                         cwd=Path(data.__file__).parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tasks, _ = data.load_tasks(tmp_path / "tasks.json")
    assert [t.family for t in tasks] == ["ring_colour", "big_shape_color"] * 12
    rings = [t for t in tasks if t.family == "ring_colour"]
    assert len({t.solution_code for t in rings}) == 1
    calls_needed = []
    for task in rings:
        printed = run_solution_lines(task)
        assert [f"x, y = {line.replace(' ', ', ')}" for line in printed] == [c.splitlines()[0] for c in task.follow_up_code]
        image = Image.open(task.image_path).convert("RGB")
        shown = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Image.Image, "show", lambda self, *a, **k: shown.append(self))
            for code in task.follow_up_code:
                exec(code, {"np": np, "Image": Image, "image_clue_0": image})
                if data.read_zoomed_colour(shown[-1]) is not None:
                    break
        assert data.read_zoomed_colour(shown[-1]) == task.answer_text
        assert all(data.read_zoomed_colour(s) is None for s in shown[:-1])
        calls_needed.append(1 + len(shown))
    assert set(calls_needed) == {2, 3}, calls_needed
    bad = subprocess.run([sys.executable, "data.py", "--out", str(tmp_path / "x"), "--families", "ring_color"],
                         cwd=Path(data.__file__).parent, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--families: unknown ring_color" in bad.stderr and not (tmp_path / "x").exists()


def test_tool_tasks_lose_their_answer_when_downscaled(tiny_policy):
    # The policy sees the image at the processor's resolution. Running each solution on that view (upsampled back) must
    # fail often on every tool-requiring family and never on the tool-free ones.
    _, processor = tiny_policy
    solved: dict[str, list[bool]] = {}
    needs_tool = {}
    for task, image in data.iter_image_tasks(120, seed=1):
        h, w = processor.geometry.resized_hw(image.height, image.width)
        seen = image.resize((w, h), Image.BICUBIC).resize(image.size, Image.NEAREST)  # what survives the downscale
        out = io.StringIO()
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"), contextlib.redirect_stdout(out):
                warnings.simplefilter("ignore")
                exec(task.solution_code, {"np": np, "Image": Image, "image_clue_0": seen})
            ok = task.is_answer(out.getvalue().strip().splitlines()[-1])
        except Exception:  # e.g. no dot survives: the code finds nothing to measure
            ok = False
        solved.setdefault(task.family, []).append(ok)
        needs_tool[task.family] = task.needs_tool
    rates = {family: float(np.mean(v)) for family, v in solved.items()}
    for family, rate in rates.items():
        assert (rate < 0.9) if needs_tool[family] else (rate == 1.0), (family, rate)
    assert np.mean([r for f, r in rates.items() if needs_tool[f]]) < 0.6, rates


def _write(tmp_path, rows, name="rows.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_validation_and_rl_rows(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "v.mp4").write_bytes(b"\x00" * 10)
    rows = [{"id": 1, "question": "q?", "answer": 3, "ability": "numeric", "data_source": "vstar", "image_path": "a.png"},
            {"prompt": [{"role": "user", "content": "<image>\n..."}], "data_source": "vsi", "ability": "spatial",
             "env_name": "pyvision_gym_wo_video_hint", "reward_model": {"ground_truth": "B", "style": "model"},
             "extra_info": {"answer": "B", "index": 7, "question": "which?", "split": "train"},
             "mm_hint": {"hint_path": str(tmp_path / "v.mp4"), "hint_type": "video"}}]
    tasks, bad = data.load_tasks(_write(tmp_path, rows))
    assert not bad
    assert tasks[0].id == "1" and tasks[0].answer == "3" and tasks[0].image_path == str(tmp_path / "a.png")
    assert tasks[1].id == "7" and tasks[1].answer == "B" and tasks[1].question == "which?"
    assert tasks[1].media_kind == "video" and tasks[1].video_path == str(tmp_path / "v.mp4")


@pytest.mark.parametrize("row, field", [
    ({"question": "q", "answer": "1", "ability": "a", "data_source": "s", "image_path": "a.png"}, "id"),
    ({"id": 1, "question": "q", "ability": "a", "data_source": "s", "image_path": "a.png"}, "answer"),
    ({"id": 1, "question": "q", "answer": "1", "ability": "a", "data_source": "s"}, "image_path|video_path"),
    ({"id": 1, "question": "q", "answer": "1", "ability": "a", "data_source": "s", "image_path": "a.png",
      "video_path": "v.mp4"}, "image_path|video_path"),
    ({"id": 1, "question": "q", "answer": "1", "ability": "a", "data_source": "s", "image_path": "missing.png"}, "image_path"),
    ({"id": 1, "question": "q", "answer": "1", "ability": "a", "data_source": "s", "image_path": "bad.png"}, "image_path"),
    ({"id": 1, "question": ["q"], "answer": "1", "ability": "a", "data_source": "s", "image_path": "a.png"}, "question"),
    ({"id": 1, "question": "q", "answer": {"x": 1}, "ability": "a", "data_source": "s", "image_path": "a.png"}, "answer"),
    ({"id": 1, "question": "q", "answer": "1", "ability": "a", "data_source": "s", "image_path": "a.png",
      "follow_up_code": "print(1)"}, "follow_up_code"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    good = {"id": 0, "question": "q", "answer": "1", "ability": "a", "data_source": "s", "image_path": "a.png"}
    path = _write(tmp_path, [good, row])
    with pytest.raises(data.DataError) as err:
        data.load_tasks(path)
    assert (err.value.row, err.value.field) == (1, field)
    assert str(path) in str(err.value) and "row 1" in str(err.value)
    tasks, bad = data.load_tasks(path, on_error="skip")
    assert [t.id for t in tasks] == ["0"] and [(b.row, b.field) for b in bad] == [(1, field)]


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(data.DataError, match="broken.json.*invalid JSON"):
        data.load_tasks(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.load_tasks(tmp_path / "nope.json")


def test_image_tasks_and_video_texts_need_no_pyav(tmp_path):
    """Only writing a video needs PyAV: image tasks and text-only video tasks (what the tiny model's tokenizer corpus
    draws on) work on a machine without it, such as a GPU image that ships torch but not PyAV."""
    code = ("import sys; sys.modules['av'] = None\n"             # `import av` now raises ImportError
            "import data\n"
            f"data.generate_image_tasks(2, 0, {str(tmp_path)!r})\n"
            "assert len(data.generate_video_tasks(2, 0, None)) == 2\n"
            "try:\n"
            f"    data.generate_video_tasks(1, 0, {str(tmp_path / 'v')!r})\n"
            "except ImportError:\n"
            "    print('writing a video needs PyAV')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(data.__file__).parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "writing a video needs PyAV"

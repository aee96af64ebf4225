"""Tests for sandbox.py, the tool as the model and the rollout use it: what the code sees, what comes back, statuses.

The isolation and the limits it enforces (timeouts, rlimits, namespaces, budgets, cleanup) are tests/test_isolation.py.
"""
import numpy as np
import pytest
from PIL import Image

import sandbox
from sandbox import ExecResult, Sandbox, SandboxConfig, SandboxPool, preamble_names


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(spares=2, max_running=4, timeout=15) as p:
        yield p


# --- contract: preloaded names, state, images ------------------------------------------------------------------------

def test_state_persists_and_preamble_names_exist(pool, tmp_path):
    gray = Image.linear_gradient("L").resize((64, 48))        # mode "L": must arrive as RGB at the same size
    path = tmp_path / "input.png"
    Image.new("RGB", (30, 40), (10, 20, 30)).save(path)
    with pool.open(images=[gray, str(path)]) as sb:
        r = sb.run(f"names = {preamble_names(2, False)!r}\nmissing = [n for n in names if n not in globals()]\n"
                   "print(missing, image_clue_0.mode, image_clue_0.size, image_clue_1.size, "
                   "image_clue_1.getpixel((0, 0)))")
        assert r.status == "ok", r.error
        assert r.text == "[] RGB (64, 48) (30, 40) (10, 20, 30)\n"
        assert sb.run("import json\nx = 41\ndef f(v):\n    return v + 1").ok
        r = sb.run("print(f(x), json.dumps([np.int64(3).item()]))")
        assert (r.status, r.text, r.state_reset) == ("ok", "42 [3]\n", False)


def test_sandbox_without_a_pool_uses_one_process_wide_pool():
    with Sandbox(images=[Image.new("RGB", (20, 10))], timeout=5) as a, Sandbox() as b:
        assert a.run("print(image_clue_0.size)").text == "(20, 10)\n" and b.run("print(1)").ok
        assert a.config.timeout == 5 and sandbox.default_pool() is a._pool is b._pool


def test_video_is_opened_with_video_reader(pool, tmp_path):
    video_reader = pytest.importorskip("video_reader")
    frames = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(5)]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)                  # root-only: a worker uid reads it via CAP_DAC_READ_SEARCH
    video_reader.write_video(private / "clip.mp4", frames, fps=5)
    with pool.open(video=private / "clip.mp4") as sb:
        r = sb.run("from decord import VideoReader, cpu\n"
                   "print(type(video_clue_0).__name__, len(video_clue_0), video_clue_0[2].asnumpy().shape)")
        assert (r.status, r.text) == ("ok", "VideoReader 5 (32, 48, 3)\n"), r.error


def test_show_variants_return_images_including_functions_from_earlier_calls(pool):
    with pool.open() as sb:
        assert sb.run("def draw():\n    plt.figure(figsize=(2, 1), dpi=50)\n    plt.plot([1, 2])\n    plt.show()").ok
        r = sb.run("draw()")
        assert r.status == "ok" and [im.size for im in r.images] == [(100, 50)]
        r = sb.run("Image.new('RGBA', (40, 40)).show()\n"
                   "display(np.zeros((30, 60, 3), np.uint8), np.ones((32, 32)), plt.figure(figsize=(1, 1), dpi=40))\n"
                   "fig = plt.figure(figsize=(1, 1), dpi=40)\nfig.show()\ndisplay('hello')\n"
                   "s = 'plt.show()'")              # a string mentioning plt.show() shows nothing
        assert r.status == "ok", r.error
        assert [im.size for im in r.images] == [(40, 40), (60, 30), (32, 32), (40, 40), (40, 40)]
        assert all(im.mode == "RGB" for im in r.images) and r.text == "'hello'\n"
        assert np.asarray(r.images[2]).min() == 255   # float arrays are read as [0, 1]


def test_image_checks_drop_downscale_and_cap_with_notes(pool):
    with pool.open(max_images=3, max_image_pixels=10_000, min_image_side=28) as sb:
        r = sb.run("display(Image.new('RGB', (6000, 28)))\n"        # aspect 214 >= 200
                   "display(Image.new('RGB', (10, 10)))\n"          # below the minimum side
                   "display(Image.new('RGB', (400, 400)))\n"        # downscaled to 100x100
                   "plt.figure(figsize=(100, 100), dpi=100)\nplt.show()\n"   # a 10000x10000 figure: rendered small
                   "for _ in range(4):\n    display(Image.new('RGB', (50, 50)))")
        assert r.status == "ok", r.error
        assert [im.size for im in r.images] == [(100, 100), (100, 100), (50, 50)]
        notes = "\n".join(r.notes)
        assert "aspect ratio 214 is not below 200" in notes
        assert "10x10 px is below the 28 px minimum side" in notes
        assert "downscaled from 400x400" in notes and "figure downscaled from 10000x10000" in notes
        assert notes.count("more than 3 images in one call") == 3


# --- any code, any exit -----------------------------------------------------------------------------------------------

def test_code_of_any_size_and_content_and_every_way_out_is_reported(pool):
    with pool.open() as sb:
        payload = "q'\"\\\n\t\u00e9\u4e2d" * 25_000
        r = sb.run(f"data = {payload!r}\nprint(len(data), data[:3])")
        assert len(r.text) < 100 and r.text == f"{len(payload)} {payload[:3]}\n"
        r = sb.run("print('a')\x00")
        assert r.status == "error" and "null bytes" in r.error
        r = sb.run("print('\\udcff')")       # a lone surrogate comes back as valid text
        assert r.ok and r.text.encode("utf-8")
        assert sb.run("kept = 1").ok
        r = sb.run("print('before')\nimport sys\nsys.exit(3)")
        assert (r.status, r.text, r.error, r.state_reset) == ("exit", "before\n", "SystemExit: 3", False)
        assert sb.run("exit()").status == "exit" and sb.run("print(kept)").text == "1\n"
        r = sb.run("raise KeyboardInterrupt")
        assert r.status == "error" and "KeyboardInterrupt" in r.error
        r = sb.run("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nimport time\ntime.sleep(1)")
        assert r.status == "error" and "KeyboardInterrupt" in r.error
        r = sb.run("def f():\n    return f()\nf()")
        assert r.status == "error" and "RecursionError" in r.error and len(r.error) < 8100
        r = sb.run("import ctypes\nctypes.string_at(0)")
        assert r.status == "crashed" and "SIGSEGV" in r.error and r.state_reset
        r = sb.run("import os\nos._exit(7)")
        assert r.status == "crashed" and "exited with code 7" in r.error
        r = sb.run("import sys, json\nsys.setrecursionlimit(10**8)\njson.loads('[' * 10**7)")   # C-stack overflow
        assert r.status == "crashed" and "SIGSEGV" in r.error
        assert sb.run("print('still here')").text == "still here\n"


def test_traceback_is_trimmed_to_the_users_cells(pool):
    with pool.open() as sb:
        assert sb.run("def bad(x):\n    return x['missing']").ok
        r = sb.run("bad({})")
        assert r.status == "error"
        assert '"<cell 1>", line 2' in r.error and '"<cell 2>", line 1' in r.error and "return x['missing']" in r.error
        assert r.error.endswith("KeyError: 'missing'") and "sandbox.py" not in r.error and "isolation.py" not in r.error
        r = sb.run("x = (1,\n")
        assert "SyntaxError" in r.error and "sandbox.py" not in r.error


# --- pool -------------------------------------------------------------------------------------------------------------

def test_pool_runs_many_trajectories_concurrently_and_attributes_each_result():
    with SandboxPool(spares=4, max_running=4, timeout=3) as pool:
        boxes = [pool.open() for _ in range(16)]
        assert all(r.ok for r in pool.run_many([(sb, f"me = {i}") for i, sb in enumerate(boxes)]))
        codes = ["import time\ntime.sleep(60)", "raise ValueError(f'bad {me}')", "print(me)", "print(me * 100)"]
        results = pool.run_many([(sb, codes[i % 4]) for i, sb in enumerate(boxes)])
        for i, r in enumerate(results):
            expected = [("timeout", ""), ("error", ""), ("ok", f"{i}\n"), ("ok", f"{i * 100}\n")][i % 4]
            assert (r.status, r.text) == expected
            if i % 4 == 1:
                assert r.error.endswith(f"ValueError: bad {i}")
        again = pool.run_many([(sb, "print(me)") for sb in boxes])
        assert [r.text for r in again] == ["" if i % 4 == 0 else f"{i}\n" for i in range(16)]
        for sb in boxes:
            sb.close()



def test_bad_inputs_name_the_input(pool, tmp_path):
    with pytest.raises(TypeError, match=r"images\[1\]"):
        pool.open(images=[Image.new("RGB", (8, 8)), 123])
    with pytest.raises(FileNotFoundError, match=r"images\[0\]"):
        pool.open(images=[tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="video"):
        pool.open(video=tmp_path / "missing.mp4")
    with pytest.raises(TypeError, match="colour"):
        pool.open(colour="red")
    with pytest.raises(ValueError, match="timeout"):
        SandboxConfig(timeout=0)
    with pytest.raises(ValueError, match="isolation"):
        SandboxPool(isolation="chroot")
    with pool.open() as sb, pytest.raises(TypeError, match="code must be a str"):
        sb.run(b"print(1)")



def test_exec_result_defaults():
    r = ExecResult("ok")
    assert r.ok and r.images == [] and r.notes == [] and r.error is None and not r.state_reset

"""tiny.py: the tiny checkpoint builds deterministically and whole or not at all, from the command line too; copy
pretraining targets only what the context shows and learns it; seeing pretraining asks what its pictures show, trains
the vision tower with the language model, and is added to a checkpoint without touching it."""
import os
from pathlib import Path

import pytest
import torch

import models
import tiny


def test_build_is_deterministic(tiny_dir, tmp_path):
    again = tiny.build_tiny(tmp_path / "again", seed=0, size="test")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_cli_writes_checkpoint(tmp_path):
    import subprocess, sys
    out = subprocess.run([sys.executable, "tiny.py", "--out", str(tmp_path / "ck"), "--size", "test"],
                         cwd=Path(tiny.__file__).parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ck" / "model.safetensors").is_file() and "parameters" in out.stdout


def test_copy_documents_target_what_the_context_holds():
    """Every target of the copy pretraining repeats values its own context shows (nothing else is learnt there)."""
    import random
    import re
    rng = random.Random(0)
    for _ in range(300):
        (context, _), (target, is_target) = tiny._copy_document(rng)
        assert is_target
        copied = re.findall(r"\w+", target.split("}")[0])          # numbers, letters, names, call names
        assert copied and all(value in re.findall(r"\w+", context) for value in copied), (context, target)


def test_copy_documents_copy_numbers_of_every_length():
    """Numbers of one, two and three digits are all common in the copied targets: with one length dominant the
    model writes that length whatever it read (77 -> 777)."""
    import collections
    import random
    import re
    rng = random.Random(0)
    lengths = collections.Counter(len(number) for _ in range(600)
                                  for number in re.findall(r"\d+", tiny._copy_document(rng)[-1][0]))
    total = sum(lengths.values())
    assert all(lengths[n] / total > 0.2 for n in (1, 2, 3)), lengths


def test_copy_pretraining_learns_on_copied_tokens(tiny_dir, tmp_path):
    model, p = models.load_policy(tiny_dir)
    vision_before = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    log = tiny.pretrain_copying(model, p, steps=40, batch=8, seq_len=64, lr=3e-3)
    assert log[0]["step"] == 1 and log[-1]["step"] == 40
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert all(torch.equal(v, model.model.visual.state_dict()[k]) for k, v in vision_before.items())  # text only


def test_a_build_killed_midway_leaves_no_model_directory(tmp_path):
    """kill -9 during copy pretraining (config and random weights already written): the model directory does not
    exist, so no later stage trains on random weights; a rerun starts clean. An existing directory is never written
    into."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "tiny.py", "--out", str(out), "--size", "demo"],
                            cwd=Path(tiny.__file__).parent, env=os.environ | {"OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".tmp_model" / "model.safetensors").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to write into it"):
        tiny.build_tiny(out, size="test")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_seeing_documents_ask_what_the_picture_shows(tiny_dir):
    """Each seeing document's target is the name of the colour of the one palette-coloured shape its picture holds
    (also when the question lists options: the scripted expert answers by the option's text), and only the answer is a
    target."""
    import random
    import re
    import numpy as np
    import data
    _, p = models.load_policy(tiny_dir)
    rng, nrng = random.Random(0), np.random.default_rng(0)
    layouts = set()
    for _ in range(120):
        doc = tiny._seeing_row(rng, nrng, p)
        pixels = np.asarray(doc.images[0]).reshape(-1, 3).astype(int)                    # (H*W, 3)
        coloured = pixels[pixels.max(1) - pixels.min(1) > 120]                            # saturated pixels only
        nearest = {min(data.PALETTE, key=lambda n: ((px - data.PALETTE[n]) ** 2).sum()) for px in coloured[::7]}
        target = p.decode([t for t, m in zip(doc.input_ids, doc.action_mask) if m])
        value = target.split("}")[0]
        options = re.findall(r"[A-D]\. (\w+)", doc.task.question)
        assert target == value + "}\n</answer>" and {value} == nearest, (doc.task.question, target)
        assert doc.action_mask[:doc.prompt_len] == [0] * doc.prompt_len and doc.check_vision_consistency(p)
        layouts.add(("Image Result" in p.decode(doc.input_ids), bool(options)))
    assert len(layouts) == 4   # in the question or returned by a tool, with or without options


def test_seeing_pretraining_trains_vision_and_language(tiny_dir):
    model, p = models.load_policy(tiny_dir)
    vision_before = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    log = tiny.pretrain_seeing(model, p, steps=40, batch=8, copy_rows=2, lr=3e-3)
    assert log[0]["step"] == 1 and log[-1]["step"] == 40 and {"see_acc", "copy_acc"} <= set(log[-1])
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert not all(torch.equal(v, model.model.visual.state_dict()[k]) for k, v in vision_before.items())


def test_cli_adds_seeing_to_a_tiny_checkpoint_without_touching_it(tiny_dir, tmp_path):
    import json
    import subprocess
    import sys
    before = {f.name: f.read_bytes() for f in tiny_dir.iterdir() if f.is_file()}
    run = lambda *flags: subprocess.run([sys.executable, "tiny.py", *flags], cwd=Path(tiny.__file__).parent,
                                        capture_output=True, text=True, timeout=120)
    out = run("--out", str(tmp_path / "seeing"), "--from", str(tiny_dir), "--see-steps", "2")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "seeing" / "tiny.json").read_text())["see_steps"] == 2
    assert len((tmp_path / "seeing" / "seeing_pretraining.jsonl").read_text().splitlines()) == 2
    assert {f.name: f.read_bytes() for f in tiny_dir.iterdir() if f.is_file()} == before
    assert "--from and --see-steps go together" in run("--out", str(tmp_path / "x"), "--see-steps", "2").stderr
    (tmp_path / "plain").mkdir()
    refused = run("--out", str(tmp_path / "y"), "--from", str(tmp_path / "plain"), "--see-steps", "2")
    assert refused.returncode != 0 and "not a tiny checkpoint" in refused.stderr and not (tmp_path / "y").exists()

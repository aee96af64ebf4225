"""bench/train_bench.py: its workload is a real GRPO batch (8 groups x 8, group-centred advantages, loss mask exactly on
the completion, one key per group for the TRL side), and its memory probe sees memory a step touches."""
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_bench  # noqa: E402


def test_workload_is_64_single_turn_sequences_in_8_centred_groups(tiny_dir, image_tasks_dir):
    w = train_bench.build_workload(tiny_dir, image_tasks_dir / "tasks.json")
    assert len(w.trajectories) == len(w.advantages) == 64 and len(w.completions) == 8
    for g in range(8):
        adv = np.array(w.advantages[8 * g:8 * g + 8])
        assert abs(adv.sum()) < 1e-9 and set(np.abs(adv)) == {0.5}
    for traj, advantage in zip(w.trajectories, w.advantages):
        completion = traj.input_ids[traj.prompt_len:]
        assert traj.action_mask == [0] * traj.prompt_len + [1] * len(completion)
        assert completion[-1] == w.processor.eos_id and len(traj.pixel_values) == 1
        assert (advantage > 0) == ("<answer>" in w.processor.decode(completion))
        key = train_bench.group_key(traj.input_ids[:traj.prompt_len], traj.images[0])
        assert w.completions[key][traj.sample_index] == completion


def test_step_memory_sees_what_a_step_touches():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs on this system")
    memory = train_bench.StepMemory()
    memory.start()
    # 200 MB of fresh pages, every one touched: an anonymous mapping, because malloc may hand back memory an earlier
    # test freed and that is still resident (then the RSS does not rise; seen in the full suite)
    block = mmap.mmap(-1, 200 * 2 ** 20)
    np.frombuffer(block, dtype=np.uint8).fill(1)
    memory.stop()
    block.close()
    memory.start()                                       # a quiet step right after: its own peak, not the one before
    memory.stop()
    assert memory.summary(skip=0)["increment_kb"] >= 190 * 1024
    assert memory.peaks_kb[1] < memory.peaks_kb[0] - 150 * 1024

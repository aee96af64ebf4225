"""bench/gpu_check.py on a CPU (its parts need a GPU and vLLM): it parses its arguments, and its parts are the ones its
docstring describes, each with a time limit that keeps the whole check within the 8 minutes it promises."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def test_help_runs_without_a_gpu():
    out = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--parts" in out and "--out" in out and "{cycle,pixels,wake,memory,plan}" in out


def test_parts_are_the_docstrings_and_fit_in_8_minutes():
    described = re.findall(r"^  (\w+):", gpu_check.__doc__, re.MULTILINE)
    assert described == list(gpu_check.PARTS) == ["cycle", "pixels", "wake", "memory", "plan"]
    in_turn = sum(limit for name, (_, limit) in gpu_check.PARTS.items() if name not in gpu_check.BACKGROUND)
    alongside = max(limit for name, (_, limit) in gpu_check.PARTS.items() if name in gpu_check.BACKGROUND)
    assert max(in_turn, alongside) + 30 <= 8 * 60   # 30 s to build the tiny model and the tasks first

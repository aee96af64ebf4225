"""Shared fixtures: one tiny checkpoint and one synthetic image set per test session (both built offline, in seconds)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    import models
    return models.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0, size="test")


@pytest.fixture(scope="session")
def tiny_policy(tiny_dir):
    import models
    return models.load_policy(tiny_dir)


@pytest.fixture(scope="session")
def image_tasks_dir(tmp_path_factory) -> Path:
    import data
    out = tmp_path_factory.mktemp("image_tasks")
    data.generate_image_tasks(12, seed=0, out_dir=out)
    return out

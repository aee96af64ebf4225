"""Shared fixtures: one tiny checkpoint and one synthetic image set per test session (both built offline, in seconds)."""
import http.server
import json
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    import tiny
    return tiny.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0, size="test")


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


class _ExactMatchJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style chat endpoint that judges like an exact-match judge: 1 when the model answer is the standard one."""

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        item = prompt.rsplit("[Question]:", 1)[1]
        standard = item.split("[Standard Answer]: ")[1].split("\n")[0]
        model_answer = item.split("[Model_answer] : ")[1].split("\n")[0]
        body = json.dumps({"choices": [{"message": {"content": f"Judgement: {int(standard == model_answer)}"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def exact_match_judge():
    """The URL of an OpenAI-style judge on 127.0.0.1 that answers 1 exactly when the model's answer is the standard one."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ExactMatchJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()

"""Tests for reward.py: the format gate, every verifier against hand-computed values, routing, the accumulative tool
reward, and the LLM judge against a local OpenAI-style HTTP server (127.0.0.1 only)."""
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import reward
from reward import (Judge, JudgeError, JudgeItem, ScoreRequest, UnroutableError, check_routable, extract_answer,
                    format_ok, mean_relative_accuracy, parse_judgement, parse_number, route, score, score_many)


def boxed(answer: str) -> str:
    return f"<answer>\n\\boxed{{{answer}}}\n</answer>"


# ------------------------------------------------------------------ answer extraction (strict = official gate)
@pytest.mark.parametrize("text, expected", [
    (boxed("B"), "B"),
    ("I think so.\n" + boxed("  left side "), "left side"),
    (boxed("\\frac{1}{2}"), "\\frac{1}{2}"),                         # nested braces
    (boxed("\\{1, 2\\}"), "\\{1, 2\\}"),                              # escaped braces are literal …
    (boxed("\\{x"), "\\{x"),                                            # … so they need no partner
    (boxed("A") + "\n" + boxed("B"), "A"),                            # the first answer counts
    ("<answer>\\boxed{B}</answer>", None),                            # newlines are required
    ("<answer>\n\\boxed{B}</answer>", None),
    ("<answer>\n\\boxed{A} junk}\n</answer>", None),                  # official regex would give "A} junk"
    ("<answer>\n\\boxed{A}}\n</answer>", None),
    ("<answer>\n\\boxed{a{b}\n</answer>", None),                      # never closed
    (boxed("   "), None),                                             # empty
    (boxed("<interpreter>x</interpreter>"), None),                    # anti-hacking content checks
    (boxed("\\boxed{B}"), None),
    ("no answer here", None),
])
def test_extract_answer_strict(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_length_limit_is_1000_characters():
    assert extract_answer(boxed("x" * 999)) == "x" * 999
    assert extract_answer(boxed("x" * 1000)) is None
    assert extract_answer(boxed(" " + "x" * 999 + " ")) == "x" * 999       # counted after stripping, as official


@pytest.mark.parametrize("text, expected", [
    ("<answer>\\boxed{B}</answer>", "B"),
    ("<answer> \\boxed{ \\frac{3}{4} } </answer>", "\\frac{3}{4}"),
    ("<answer>left</answer>", "left"),
    ("so the result is \\boxed{7} and \\boxed{8}", "8"),                  # bare box: the last one
    (boxed("C"), "C"),
    ("<answer>" + "x" * 1000 + "</answer>", None),
    ("nothing", None),
])
def test_extract_answer_lenient(text, expected):
    assert extract_answer(text, strict=False) == expected


def test_format_ok_checks_vision_pairs_and_answer_tags_in_final_turn():
    image = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
    assert format_ok(f"<interpreter>{image}</interpreter>\n" + boxed("B"))
    assert not format_ok("<interpreter><|vision_start|><|image_pad|><|image_pad|></interpreter>" + boxed("B"))
    assert not format_ok("<interpreter>x</interpreter>\n" + boxed("B") + "<answer>")
    # answer tags echoed inside an earlier tool output do not count
    assert format_ok("<interpreter><answer></interpreter>\n" + boxed("B"))


# ------------------------------------------------------------------ numbers and MRA
@pytest.mark.parametrize("text, expected", [
    ("12", 12.0), ("12 meters", 12.0), ("-3.5", -3.5), ("1,234", 1234.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75),
    ("about 2.5e3 mm", 2500.0), (".5", 0.5), ("50%", 50.0), ("1/0", None), ("none", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("predicted, target, expected", [
    (10, 10, 1.0),
    (12, 10, 0.7),     # rel 0.2 ≤ 1−θ for θ = .50 … .80 (0.2 itself a hit) → 7/10
    (14, 10, 0.3),     # rel 0.4 ≤ 1−θ for θ = .50 .55 .60               → 3/10
    (5, 4, 0.6),       # rel 0.25: θ = .75 is a hit (≤, VSI-Bench's rule) → 6/10
    (15, 10, 0.1),     # rel 0.5 hits only θ = .50
    (16, 10, 0.0),     # rel 0.6 hits nothing
    (10.6, 10, 0.9),   # rel 0.06 misses only θ = .95 (1−θ = 0.05)       → 9/10
    (10.4, 10, 1.0),   # rel 0.04 ≤ 0.05 hits every θ                      → 10/10
    (13, 10, 0.5),     # rel exactly 0.3 hits θ = .70, as the official code and VSI-Bench's scorer count it
    (10.5, 10, 1.0),   # rel exactly 0.05 hits θ = .95 (both: 1.0)
    (0.9, 1, 0.9),     # rel 0.1 hits θ = .90 (the official float threshold 0.09999999999999998 misses it: 0.8)
    (-12, -10, 0.7),   # |y| in the denominator
    (0, 0, 1.0), (0.1, 0, 0.0),
])
def test_mean_relative_accuracy_hand_computed(predicted, target, expected):
    assert mean_relative_accuracy(predicted, target) == pytest.approx(expected)


def test_mra_scores_the_boxed_answer_not_the_first_number_in_the_response():
    response = "I count 3 chairs in frame 12, then more.\n" + boxed("7")
    parts = score("7", "vsi_numerical", None, response, num_tool_calls=2)
    assert parts.acc == 1.0 and parts.correct and parts.total == pytest.approx(1.2)
    no_number = score("7", "vsi_numerical", None, boxed("many"), num_tool_calls=1)
    assert no_number.acc == 0.0 and no_number.total == 0.0


def test_mra_partial_credit_gates_the_tool_bonus_at_one_half():
    correct = score("10", "vsi_numerical", None, boxed("12"), num_tool_calls=2)          # MRA 0.7 ≥ 0.5
    assert (correct.acc, correct.correct, correct.tool_bonus) == (pytest.approx(0.7), True, pytest.approx(0.2))
    assert correct.total == pytest.approx(0.9)
    wrong = score("10", "scannet_rule_verifiable", None, boxed("14"), num_tool_calls=2)  # MRA 0.3 < 0.5
    assert (wrong.acc, wrong.correct, wrong.tool_bonus, wrong.total) == (pytest.approx(0.3), False, 0.0,
                                                                         pytest.approx(0.3))
    with pytest.raises(ValueError, match="holds no number"):
        score("B", "vsi_numerical", None, boxed("3"), num_tool_calls=0)


# ------------------------------------------------------------------ rule verifiers
@pytest.mark.parametrize("answer, options, expected", [
    ("B", None, 1.0), ("(B)", None, 1.0), ("B. right", None, 1.0), ("B:", None, 1.0), ("A", None, 0.0),
    ("Both", None, 0.0), ("right", ["left", "right"], 1.0), ("Right.", ["left", "right"], 1.0),
    ("left", ["left", "right"], 0.0), ("the answer is B", None, 0.0),
    ("A dog", {"A": "a cat", "B": "A dog"}, 1.0),                  # option text wins over a leading capital
])
def test_verify_multiple_choice(answer, options, expected):
    assert reward.verify_multiple_choice(answer, "B", options) == expected


def test_multiple_choice_reference_may_be_option_text_and_must_be_valid():
    assert reward.verify_multiple_choice("B", "right", ["left", "right"]) == 1.0
    with pytest.raises(ValueError, match="neither a letter nor one of the options"):
        reward.verify_multiple_choice("B", "up", ["left", "right"])
    with pytest.raises(ValueError, match="not among the options"):
        reward.verify_multiple_choice("C", "C", ["left", "right"])


@pytest.mark.parametrize("answer, task_answer, expected", [
    ("1234", "1,234", 1.0), ("0.75", "3/4", 1.0), ("\\frac{3}{4}", "0.75", 1.0), ("7 dots", "7", 1.0),
    ("8", "7", 0.0), ("seven", "7", 0.0), ("0.1 + 0.2", "0.1", 1.0),
])
def test_verify_numeric(answer, task_answer, expected):
    assert reward.verify_numeric(answer, task_answer) == expected


def test_verify_numeric_tolerance():
    assert reward.verify_numeric("3.14", "3.14159") == 0.0
    assert reward.verify_numeric("3.14", "3.14159", rel_tol=1e-3) == 1.0
    assert score("3.14159", "synthetic_image", "numeric", boxed("3.14"), 0, rel_tol=1e-3).correct


@pytest.mark.parametrize("answer, expected", [
    ("Red Car", 1.0), ("  red   car. ", 1.0), ("'red car'", 1.0), ("ｒｅｄ car", 1.0), ("red cars", 0.0),
])
def test_verify_string(answer, expected):
    assert reward.verify_string(answer, "red car") == expected


# ------------------------------------------------------------------ routing
@pytest.mark.parametrize("source", ["vstar", "deepeyes", "minio3", "hrbench-4k", "hrbench-8k", "ecd",
                                    "wemath-standard", "wemath-pro", "v-interaction", "mathvision", "vsi", "longvila"])
def test_official_judge_sources_route_to_the_judge(source):
    assert route(source, "anything") == "judge"


@pytest.mark.parametrize("source, ability, verifier", [
    ("vsi_numerical", None, "mra"), ("scannet_rule_verifiable", "x", "mra"),
    ("synthetic_image", "multiple_choice", "multiple_choice"), ("synthetic_image", "numeric", "numeric"),
    ("synthetic_video", "vsi_numerical", "mra"), ("synthetic_video", "string", "string"),
])
def test_rule_routes(source, ability, verifier):
    assert route(source, ability) == verifier


def test_unroutable_tasks_fail_before_anything_is_scored():
    with pytest.raises(UnroutableError, match="unknown data_source 'vl_agent'"):
        route("vl_agent", None)
    with pytest.raises(UnroutableError, match="unknown ability 'essay'"):
        route("synthetic_image", "essay")
    with pytest.raises(UnroutableError) as error:
        check_routable([("vstar", None), ("mystery", None), ("synthetic_image", "numeric")], judge=None)
    assert "'vstar' is scored by the LLM judge, but no judge is configured" in str(error.value)
    assert "unknown data_source 'mystery'" in str(error.value)
    with pytest.raises(UnroutableError, match="no judge is configured"):
        score("B", "vstar", None, boxed("B"), num_tool_calls=1)
    assert check_routable([("synthetic_image", "numeric")] * 3, judge=None) == {("synthetic_image", "numeric"): "numeric"}


def test_score_rejects_bad_inputs_by_name():
    with pytest.raises(TypeError, match="task_answer must be a str"):
        score(7, "synthetic_image", "numeric", boxed("7"), 0)
    with pytest.raises(ValueError, match="num_tool_calls must be an int >= 0"):
        score("7", "synthetic_image", "numeric", boxed("7"), -1)
    with pytest.raises(ValueError, match="tool_coef"):
        score("7", "synthetic_image", "numeric", boxed("7"), 0, tool_coef=-0.1)
    with pytest.raises(ValueError, match=r"request 1 \(data_source='synthetic_image'"):
        score_many([ScoreRequest("7", "synthetic_image", "numeric", boxed("7"), 0),
                    ScoreRequest("many", "synthetic_image", "numeric", boxed("7"), 0)])


# ------------------------------------------------------------------ the accumulative tool reward
def test_tool_bonus_is_paid_only_when_correct():
    right = score("B", "synthetic_image", "multiple_choice", boxed("B"), num_tool_calls=3)
    assert (right.acc, right.correct, right.tool_bonus, right.total) == (1.0, True, pytest.approx(0.3), pytest.approx(1.3))
    assert right.verifier == "multiple_choice" and right.wellformed and not right.masked and right.answer == "B"
    wrong = score("B", "synthetic_image", "multiple_choice", boxed("A"), num_tool_calls=3)
    assert (wrong.acc, wrong.correct, wrong.tool_bonus, wrong.total) == (0.0, False, 0.0, 0.0)
    ablation = score("B", "synthetic_image", "multiple_choice", boxed("B"), num_tool_calls=3, tool_coef=0.0)
    assert (ablation.tool_bonus, ablation.total) == (0.0, 1.0)
    for n in range(5):    # the official values with max_turns = 5: 1.0 … 1.4
        assert score("7", "synthetic_image", "numeric", boxed("7"), n).total == pytest.approx(1.0 + 0.1 * n)


def test_format_violations_score_zero_even_with_the_right_answer():
    truncated_image = "<|vision_start|><|image_pad|>" + boxed("B")
    parts = score("B", "synthetic_image", "multiple_choice", truncated_image, num_tool_calls=2)
    assert (parts.acc, parts.total, parts.wellformed, parts.answer) == (0.0, 0.0, False, None)
    no_newlines = score("B", "synthetic_image", "multiple_choice", "<answer>\\boxed{B}</answer>", 2)
    assert no_newlines.total == 0.0
    assert score("B", "synthetic_image", "multiple_choice", "<answer>\\boxed{B}</answer>", 2, strict=False).correct


def test_overlong_answer_gets_neither_accuracy_nor_tool_bonus():
    # official: acc 0 but is_answer_right stays True, so the tool bonus was still paid
    long_answer = "x" * 1000
    parts = score(long_answer, "synthetic_image", "string", boxed(long_answer), num_tool_calls=4)
    assert (parts.acc, parts.correct, parts.tool_bonus, parts.total) == (0.0, False, 0.0, 0.0)


def test_reward_stats_reports_components_separately():
    parts = score_many([ScoreRequest("B", "synthetic_image", "multiple_choice", boxed("B"), 2),
                        ScoreRequest("B", "synthetic_image", "multiple_choice", boxed("A"), 4),
                        ScoreRequest("B", "synthetic_image", "multiple_choice", "no answer", 0)])
    stats = reward.reward_stats(parts)
    assert stats["reward/acc"] == pytest.approx(1 / 3)
    assert stats["reward/tool_bonus"] == pytest.approx(0.2 / 3)
    assert stats["reward/total"] == pytest.approx(1.2 / 3)
    assert stats["reward/wellformed_frac"] == pytest.approx(2 / 3)
    assert stats["reward/masked_frac"] == 0.0


# ------------------------------------------------------------------ the LLM judge
@pytest.mark.parametrize("reply, verdict", [
    ("Judgement: 1", 1.0), ("Judgement: 0", 0.0), ("1", 1.0), (" 0\n", 0.0), ("Judgement: 10", 1.0),
    ("Judgement: yes", None), ("The answer is 1", None), ("", None),
])
def test_parse_judgement(reply, verdict):
    assert parse_judgement(reply) == verdict


class FakeJudgeServer:
    """An OpenAI-style /v1/chat/completions endpoint on 127.0.0.1. `respond(index, body)` returns
    (status, content, delay_s) for the index-th request."""

    def __init__(self, respond):
        self.bodies, self.inflight, self.max_inflight = [], 0, 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    index = len(server.bodies)
                    server.bodies.append((self.path, body))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    status, content, delay = respond(index, body)
                    server.stop.wait(delay)
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except OSError:
                    pass                         # the client gave up (timeout test)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = False               # server_close() joins the handler threads: nothing leaks

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02})
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def judge_server():
    servers = []

    def start(respond):
        servers.append(FakeJudgeServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


ITEM = JudgeItem(question="Is the cup left or right of the plate?", standard_answer="The cup is on the left.",
                 model_answer="left", data_source="vstar")


def test_judge_success_and_request_body(judge_server):
    server = judge_server(lambda i, body: (200, "Judgement: 1", 0))
    judge = Judge(server.url, model="qwen-judge", backoff_s=0.01)
    assert judge.judge(ITEM) == 1.0
    path, body = server.bodies[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "qwen-judge" and body["temperature"] == 0.3
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are a helpful assistant."}
    assert user["role"] == "user"
    assert user["content"].endswith("[Question]: Is the cup left or right of the plate?\n"
                                    "[Standard Answer]: The cup is on the left.\n[Model_answer] : left\nJudgement:")
    assert user["content"].count("Judgement: ") >= 3                     # few-shot examples precede the item


def test_judge_retries_after_server_errors(judge_server):
    server = judge_server(lambda i, body: (500, "", 0) if i < 2 else (200, "0", 0))
    assert Judge(server.url, max_retries=3, backoff_s=0.01).judge(ITEM) == 0.0
    assert len(server.bodies) == 3


def test_judge_backoff_doubles_between_attempts(judge_server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(reward.time, "sleep", sleeps.append)
    server = judge_server(lambda i, body: (503, "", 0))
    with pytest.raises(JudgeError):
        Judge(server.url, max_retries=3, backoff_s=0.5).judge(ITEM)
    assert sleeps == [0.5, 1.0, 2.0] and len(server.bodies) == 4


@pytest.mark.parametrize("first_reply", ["I am not sure", None])      # unparseable verdict; content null
def test_judge_retries_an_unparseable_or_malformed_reply(judge_server, first_reply):
    server = judge_server(lambda i, body: (200, first_reply if i == 0 else "Judgement: 1", 0))
    assert Judge(server.url, backoff_s=0.01).judge(ITEM) == 1.0
    assert len(server.bodies) == 2


def test_judge_failure_raises_or_masks_never_zero(judge_server, caplog):
    server = judge_server(lambda i, body: (503, "", 0))
    with pytest.raises(JudgeError, match="no verdict after 3 attempts.*HTTP 503"):
        Judge(server.url, max_retries=2, backoff_s=0.01).judge(ITEM)
    assert len(server.bodies) == 3
    with caplog.at_level(logging.WARNING, logger="reward"):
        assert Judge(server.url, max_retries=1, backoff_s=0.01, on_failure="mask").judge(ITEM) is None
    assert "masking 1 sample" in caplog.text


def test_judge_timeout_raises_or_masks(judge_server):
    server = judge_server(lambda i, body: (200, "1", 5.0))
    with pytest.raises(JudgeError, match="no verdict after 2 attempts"):
        Judge(server.url, timeout_s=0.2, max_retries=1, backoff_s=0.01).judge(ITEM)
    assert Judge(server.url, timeout_s=0.2, max_retries=0, on_failure="mask").judge(ITEM) is None


def test_judge_configuration_error_is_raised_even_when_masking(judge_server):
    server = judge_server(lambda i, body: (404, "", 0))
    with pytest.raises(JudgeError, match="rejected the request: HTTP 404"):
        Judge(server.url, on_failure="mask", backoff_s=0.01).judge(ITEM)
    assert len(server.bodies) == 1


def test_judge_many_honours_the_concurrency_limit_and_keeps_order(judge_server):
    def respond(i, body):
        model_answer = body["messages"][1]["content"].rsplit("[Model_answer] : ", 1)[1]
        return 200, "Judgement: 1" if model_answer.startswith("yes") else "Judgement: 0", 0.15

    server = judge_server(respond)
    answers = ["yes", "no", "yes", "yes", "no", "no"]
    items = [JudgeItem("q", "yes", a, "vsi") for a in answers]
    verdicts = Judge(server.url, max_concurrency=2).judge_many(items)
    assert verdicts == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert server.max_inflight == 2


def test_score_many_with_judge_adds_the_bonus_and_masks_failures(judge_server):
    def respond(i, body):
        model_answer = body["messages"][1]["content"].rsplit("[Model_answer] : ", 1)[1]
        return (200, "Judgement: 1", 0) if model_answer.startswith("left") else (500, "", 0)

    server = judge_server(respond)
    judge = Judge(server.url, max_retries=1, backoff_s=0.01, on_failure="mask")
    requests = [ScoreRequest("The cup is on the left.", "vstar", None, boxed("left"), 2, question="Where is the cup?"),
                ScoreRequest("B", "synthetic_image", "multiple_choice", boxed("B"), 1),
                ScoreRequest("The cup is on the right.", "hrbench-4k", None, boxed("right"), 3, question="Where?")]
    judged, rule, masked = score_many(requests, judge=judge)
    assert (judged.acc, judged.total, judged.verifier) == (1.0, pytest.approx(1.2), "judge")
    assert rule.total == pytest.approx(1.1)
    assert masked.masked and math.isnan(masked.total) and math.isnan(masked.acc) and not masked.correct
    assert masked.tool_bonus == 0.0
    assert len(server.bodies) == 1 + 2                                    # the rule-verified task never reaches the judge
    assert reward.reward_stats([judged, rule, masked])["reward/masked_frac"] == pytest.approx(1 / 3)


def model_answer_of(body: dict) -> str:
    return body["messages"][1]["content"].rsplit("[Model_answer] : ", 1)[1].split("\n")[0]


def test_judge_retries_only_the_failed_samples_and_logs_each_retry_by_sample_id(judge_server, caplog):
    sent = {}

    def respond(i, body):
        answer = model_answer_of(body)
        sent[answer] = sent.get(answer, 0) + 1          # one request per sample and round: no two handlers share a key
        return (500, "", 0) if answer == "flaky" and sent[answer] <= 2 else (200, "Judgement: 1", 0)

    server = judge_server(respond)
    items = [JudgeItem("q", "a", answer, "vstar", sample_id=f"task-3/{k}") for k, answer in
             enumerate(["steady", "flaky", "also steady"])]
    with caplog.at_level(logging.WARNING, logger="reward"):
        assert Judge(server.url, max_retries=3, backoff_s=0.01).judge_many(items) == [1.0, 1.0, 1.0]
    assert sent == {"steady": 1, "flaky": 3, "also steady": 1}    # a sample with a verdict is never sent again
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and all("[task-3/1]" in line and "HTTP 500" in line for line in retries)
    assert retries[0].startswith("judge: retry 1/3") and retries[1].startswith("judge: retry 2/3")


def test_a_judge_that_never_answers_costs_one_batch_budget_then_masks_each_sample(judge_server, caplog):
    server = judge_server(lambda i, body: (200, "Judgement: 1", 60.0))   # answers only when the test ends
    judge = Judge(server.url, timeout_s=0.5, max_retries=10, backoff_s=0.05, max_concurrency=2, batch_budget_s=1.0,
                  on_failure="mask")
    requests = [ScoreRequest("left", "vstar", None, boxed("left"), 1, question="Where?", sample_id=f"task-9/{k}")
                for k in range(6)]
    requests.append(ScoreRequest("B", "synthetic_image", "multiple_choice", boxed("B"), 1, sample_id="task-2/0"))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="reward"):
        parts = score_many(requests, judge=judge)
    # without the budget: 6 samples / 2 in flight x 11 attempts x 0.5 s = 16 s and more
    assert time.monotonic() - start < 3.0
    assert [p.masked for p in parts] == [True] * 6 + [False]
    assert all(math.isnan(p.total) for p in parts[:6]) and parts[6].total == pytest.approx(1.1)
    assert "masking 6 sample(s)" in caplog.text and "task-9/5" in caplog.text and "budget 1 s" in caplog.text
    assert len(server.bodies) <= 4                                # never more requests than the budget had room for


def test_judge_config_validation():
    with pytest.raises(ValueError, match="base_url"):
        Judge("127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="on_failure"):
        Judge("http://127.0.0.1:1/v1", on_failure="zero")
    with pytest.raises(ValueError, match="batch_budget_s"):
        Judge("http://127.0.0.1:1/v1", batch_budget_s=0)
    with pytest.raises(UnroutableError, match="not a judge source"):
        Judge("http://127.0.0.1:1/v1").request_body(JudgeItem("q", "a", "b", "synthetic_image"))

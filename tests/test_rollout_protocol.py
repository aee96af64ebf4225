"""rollout.py, protocol level: prompt templates, action parsing, observation strings, stop-string trimming."""
import json

import pytest

import data
import ofr
import rollout
from rollout import EndReason, parse_action


def test_render_prompt_default_templates_fill_placeholders():
    text = rollout.render_prompt("How many dots?", width=640, height=480)
    assert "Image Width: 640; Image Height: 480" in text and "How many dots?" in text
    assert "<code>\n```python\ncode snippet\n```\n</code>" in text
    assert "<answer>\n\\boxed{'The final answer goes here.'}\n</answer>" in text
    assert "image_clue_i" in text and "{" not in text.replace("\\boxed{", "")
    video = rollout.render_prompt("When?", video_info="Frame Width: 8; Frame Height: 6;\nVideo Length: 10; Sample FPS: 2.00")
    assert "*Video Information:*\n\nFrame Width: 8" in video and "video_clue_0" in video
    with pytest.raises(ValueError, match="width and height"):
        rollout.render_prompt("q")


def test_render_prompt_with_official_format_template_file(tmp_path):
    # Same format as the official rl_system_prompt_template.json: named placeholders, doubled literal braces.
    templates = {"img_key": "Agent text.\nImage Width: {width}; Image Height: {height}\n{query}\n\\boxed{{answer}}",
                 "vid_key": "Video text.\n{video_info}\n{query}"}
    path = tmp_path / "rl_system_prompt_template.json"
    path.write_text(json.dumps(templates))
    got = rollout.render_prompt("Q?", width=3, height=4, template_file=path, template_key="img_key")
    assert got == templates["img_key"].format(query="Q?", width=3, height=4)
    assert rollout.render_prompt("Q?", video_info="VI", template_file=path, template_key="vid_key") == "Video text.\nVI\nQ?"
    with pytest.raises(KeyError, match="missing_key"):
        rollout.render_prompt("Q?", width=1, height=1, template_file=path, template_key="missing_key")


@pytest.mark.parametrize("text, answer, code", [
    ("think <code>\n```python\nprint(1)\n```\n</code>", None, "print(1)"),
    ("<code>```python\na=1\n```</code> and <code>\n```python\nb=2\n```\n</code>", None, "b=2"),   # several: last wins
    ("```python\nx = 3\n```", None, "x = 3"),                                                      # bare fallback
    ("<code>\n```python\nprint(1)\n", None, None),                                                  # unclosed block
    ("no code, no answer", None, None),
    ("<answer>\n\\boxed{4}\n</answer>", "\n\\boxed{4}\n", None),
    ("<answer>\\boxed{4}</answer>", "\\boxed{4}", None),    # DONE, although the strict reward gate rejects it
    ("<code>\n```python\nprint(1)\n```\n</code><answer>A</answer>", "A", None),                    # answer wins
    # an empty last answer is no answer (official truthiness test): the code runs, or the action holds neither
    ("<answer></answer>\n<code>\n```python\nprint(1)\n```\n</code>", None, "print(1)"),
    ("<answer>A</answer> then <answer></answer>", None, None),
    ("<answer> </answer>", " ", None),                                                              # truthy: DONE
])
def test_parse_action(text, answer, code):
    assert parse_action(text) == (answer, code)


def test_empty_answer_before_code_runs_the_code(tiny_policy, image_tasks_dir):
    """The official loop runs the code after `<answer></answer>`, counts the call and goes on; it does not end DONE."""
    from sandbox import SandboxPool
    from test_rollout import ANSWER, CODE, ReplayEngine
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    engine = ReplayEngine(p, ["<answer></answer>\n" + CODE.format("print(6 * 7)"), ANSWER.format(task.answer)])
    with SandboxPool(timeout=20) as pool:
        [traj] = rollout.rollout([task], engine, p, pool.open, rollout.RolloutConfig())
    assert traj.end_reason == EndReason.DONE and traj.num_tool_calls == 1 and len(traj.turns) == 2
    assert traj.turns[0].exec_status == "ok" and "42" in traj.turns[0].observation


def test_observation_strings_are_the_official_ones():
    img = rollout.IMAGE_PLACEHOLDER
    assert rollout.observation_text("image", "42", 1, 0) == (
        "\n<|im_start|>user\n<tool_response>\n<interpreter>\nText Result:\n42</interpreter>\n\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert rollout.observation_text("video", "42", 0, 0) == (
        "\n<|im_start|>user\n<tool_response>\n<interpreter>\nText Result:\n42\n</interpreter>\n\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert rollout.observation_text("image", "t", 1, 2) == (
        "\n<|im_start|>user\n<tool_response>\n<interpreter>Text Result:\nt\nImage Result:\n"
        f"<image_clue_1>{img}</image_clue_1><image_clue_2>{img}</image_clue_2></interpreter>\n\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert rollout.observation_text("video", "", 0, 1) == (
        "\n<|im_start|>user\n<tool_response>\n<interpreter>\nText Result:\n\nImage Result:\n"
        f"<image_clue_0>{img}</image_clue_0></interpreter>\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_truncate_middle_keeps_head_and_tail():
    text = "a" * 50 + "b" * 50
    cut = rollout.truncate_middle(text, 20)
    assert cut.startswith("a" * 10) and cut.endswith("b" * 10) and "80 characters truncated" in cut
    assert rollout.truncate_middle("short", 20) == "short"


def test_cut_at_stop_keeps_stop_and_nothing_after(tiny_policy):
    _, p = tiny_policy
    ids = p.encode_text("x = 1\n```\n</code>\nmore text after")
    kept, stopped = rollout.cut_at_stop(ids, p)
    assert stopped and p.decode(kept).endswith("</code>") and "more" not in p.decode(kept)
    # a token that straddles the stop string is re-encoded so the text ends exactly at </code>
    overhang = p.tokenizer.convert_tokens_to_ids("></")                 # one token: ">" then "</"
    straddle = p.encode_text("print(1)\n</code") + [overhang] + p.encode_text("x")
    assert p.decode(straddle) == "print(1)\n</code></x"
    kept, stopped = rollout.cut_at_stop(straddle, p)
    assert stopped and p.decode(kept) == "print(1)\n</code>"
    assert rollout.cut_at_stop(p.encode_text("no stop"), p) == (p.encode_text("no stop"), False)


def test_end_reason_names():
    # the official names plus our ENGINE_ERROR, each known to OFR (which refuses an unknown end reason)
    names = {value for key, value in vars(EndReason).items() if not key.startswith("_")}
    assert names == {"DONE", "ERROR_IN_ACTION", "OVER_LENGTH", "EXCEED_MAX_TURNS", "EXCEED_MAX_IMAGE_NUM",
                     "ENGINE_ERROR"} == ofr.END_REASONS

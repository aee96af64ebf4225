"""rollout.py, the loop: the scripted expert solves the synthetic tasks through the real sandbox; every end reason;
malformed model output; the token/mask invariants on the image and the video protocol; the HF engine with the tiny model.

`ReplayEngine` stands in for the *policy's text* only (what a model might write); the loop, the parsing, the sandbox and
the processor are the real ones."""
import dataclasses

import pytest
import torch

import data
import rollout
from rollout import EndReason, GenResult, RolloutConfig
from sandbox import SandboxPool

CODE = "<code>\n```python\n{}\n```\n</code>"
ANSWER = "<answer>\n\\boxed{{{}}}\n</answer>"


class ReplayEngine:
    """Writes given turns (the k-th string on the k-th round), as a model would."""

    def __init__(self, processor, turns, finish=None):
        self.p, self.turns, self.finish = processor, turns, finish

    def generate(self, requests):
        out = []
        for r in requests:
            text = self.turns[min(len(r.trajectory.turns), len(self.turns) - 1)]
            ids = self.p.encode_text(text)
            finish = self.finish or ("eos" if "</answer>" in text else "stop" if text.endswith("</code>") else "eos")
            out.append(GenResult(ids + ([self.p.eos_id] if finish == "eos" else []), finish))
        return out


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(timeout=20) as p:
        yield p


@pytest.fixture(scope="module")
def video_tasks_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("video_tasks")
    data.generate_video_tasks(4, seed=0, out_dir=out)
    return out


def run(tasks, engine, processor, pool, **cfg):
    trajs = rollout.rollout(tasks, engine, processor, pool.open, RolloutConfig(**cfg))
    rollout.score_trajectories(trajs, processor)
    return trajs


def final_conversation(traj, processor):
    """The whole conversation as text with one placeholder per image, built from the public protocol pieces: the chat
    template around the rendered prompt, then each turn's action text and observation string."""
    from PIL import Image
    from video_context import video_info
    if traj.mode == "image":
        image = Image.open(traj.task.image_path)
        instructions = rollout.render_prompt(traj.task.question, width=image.width, height=image.height)
        content = [{"type": "text", "text": "<image_clue_0>"}, {"type": "image"},
                   {"type": "text", "text": "</image_clue_0>\n" + instructions}]
    else:
        content = rollout.render_prompt(traj.task.question, video_info=video_info(traj.task.video_path))
    text = processor.apply_chat_template([{"role": "user", "content": content}])
    for turn in traj.turns:
        text += turn.action + (turn.observation or "")
    return text


def assert_token_exact(traj, processor):
    text = final_conversation(traj, processor)
    canonical = processor([text], images=traj.images or None)
    assert canonical["input_ids"][0].tolist() == traj.input_ids
    if traj.images:
        assert torch.equal(canonical["pixel_values"], torch.cat(traj.pixel_values))
        assert canonical["image_grid_thw"].tolist() == traj.image_grid_thw
    # the action mask is 1 exactly on the tokens the engine produced, turn by turn
    generated = sum(t.action_tokens for t in traj.turns)
    assert sum(traj.action_mask) == generated and traj.action_mask[:traj.prompt_len] == [0] * traj.prompt_len
    ids = torch.tensor(traj.input_ids)
    assert int((ids == processor.image_pad_id).sum()) == sum(processor.tokens_for_grid(g) for g in traj.image_grid_thw)
    assert traj.vision_consistent


def test_expert_solves_image_and_video_tasks(tiny_policy, image_tasks_dir, video_tasks_dir, pool):
    _, p = tiny_policy
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0] + data.load_tasks(video_tasks_dir / "tasks.json")[0]
    trajs = run(tasks, rollout.ScriptedExpert(p), p, pool)
    assert [t.end_reason for t in trajs] == [EndReason.DONE] * len(tasks)
    assert all(t.correct and t.num_tool_calls == 1 for t in trajs), [(t.task.id, t.reward_parts) for t in trajs if not t.correct]
    for traj in trajs:
        assert_token_exact(traj, p)
    video = [t for t in trajs if t.mode == "video"]
    assert video and all(t.num_returned_images >= 1 and t.images for t in video)   # frames came back as figures
    # video prompts carry metadata only, no visual tokens
    assert all(p.image_pad_id not in t.input_ids[:t.prompt_len] for t in video)


def test_expert_solves_multi_call_tasks_by_reading_what_came_back(tiny_policy, tmp_path, pool):
    """ring_colour through the real loop: the first call prints the ring centres, the next copies one into a zoom that
    prints nothing, and the answer is read off the returned figure; an empty ring's zoom leads to a third call. Under
    a turn budget of 2 tool calls (max_turns 3) exactly the 3-call tasks run out of turns."""
    _, p = tiny_policy
    tasks = data.generate_image_tasks(12, seed=4, out_dir=tmp_path, families=("ring_colour",))
    trajs = run(tasks, rollout.ScriptedExpert(p), p, pool, max_turns=5)
    assert [t.end_reason for t in trajs] == [EndReason.DONE] * len(tasks) and all(t.correct for t in trajs)
    calls = [t.num_tool_calls for t in trajs]
    assert set(calls) == {2, 3}, calls
    for traj in trajs:
        assert_token_exact(traj, p)
        located, *zooms = traj.turns[:-1]
        printed = located.observation.split("Text Result:\n")[1].split("</interpreter>")[0].split()
        for zoom in zooms:   # each zoom copies a printed centre, prints nothing and returns one figure
            assert zoom.code.splitlines()[0].replace("x, y = ", "").split(", ") == printed[:2] or \
                zoom.code.splitlines()[0].replace("x, y = ", "").split(", ") == printed[2:4]
            assert len(zoom.images) == 1 and "Text Result:\n\nImage Result" in zoom.observation.replace("\n\n\n", "\n\n")
        assert data.read_zoomed_colour(zooms[-1].images[0]) == traj.task.answer_text
        assert all(data.read_zoomed_colour(z.images[0]) is None for z in zooms[:-1])   # the empty ring came first
    short = run(tasks, rollout.ScriptedExpert(p), p, pool, max_turns=3)
    assert [t.end_reason == EndReason.DONE for t in short] == [c == 2 for c in calls]
    assert [t.correct for t in short] == [c == 2 for c in calls]


def test_expert_answers_a_fraction_of_tool_free_tasks_directly(tiny_policy, image_tasks_dir, pool):
    """The cold start's mix: tool-free tasks answered directly at `direct_rate`, with code otherwise; tool-requiring
    tasks always with code. All correct either way."""
    _, p = tiny_policy
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0]
    trajs = rollout.rollout(tasks, rollout.ScriptedExpert(p, direct_rate=0.5), p, pool.open, RolloutConfig(), n=8)
    rollout.score_trajectories(trajs, p)
    assert all(t.correct for t in trajs)
    free = [t.num_tool_calls for t in trajs if t.task.needs_tool is False]
    assert free and 0.2 < free.count(0) / len(free) < 0.8 and set(free) == {0, 1}
    assert all(t.num_tool_calls == 1 for t in trajs if t.task.needs_tool)


def test_expert_guesses_tool_requiring_tasks_at_guess_rate_only(tiny_policy, image_tasks_dir, pool):
    """`guess_rate` answers tool-requiring tasks directly (a cold start that under-uses the tool) and touches nothing
    else; a task that does not say whether it needs the tool (an official row) is always solved with code."""
    _, p = tiny_policy
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0]
    trajs = run(tasks, rollout.ScriptedExpert(p, guess_rate=1.0), p, pool)
    assert all(t.correct for t in trajs)
    assert [t.num_tool_calls for t in trajs] == [0 if t.needs_tool else 1 for t in tasks]
    unknown = [dataclasses.replace(t, needs_tool=None) for t in tasks[:2]]
    trajs = run(unknown, rollout.ScriptedExpert(p, direct_rate=1.0, guess_rate=1.0), p, pool)
    assert [t.num_tool_calls for t in trajs] == [1, 1]


def test_mrope_positions_span_the_interleaved_sequence(tiny_policy, video_tasks_dir, pool):
    model, p = tiny_policy
    task = data.load_tasks(video_tasks_dir / "tasks.json")[0][0]
    traj = run([task], rollout.ScriptedExpert(p), p, pool)[0]
    inputs = traj.model_inputs(p)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])       # (3, 1, T)
    pos = positions[:, 0]
    is_image = inputs["input_ids"][0] == p.image_pad_id
    assert is_image.any()
    # image tokens spread over height/width; text tokens share one position on all three axes
    assert pos[1][is_image].unique().numel() > 1 and torch.equal(pos[0][~is_image], pos[1][~is_image])
    # text after the returned figure continues right after the image's largest position
    last_image = int(is_image.nonzero().max())
    assert int(pos[0, last_image + 1]) == int(pos[:, is_image].max()) + 1
    with torch.no_grad():
        trajectory_logits = model(**inputs).logits
        canonical = p([final_conversation(traj, p)], images=traj.images)
        assert torch.allclose(trajectory_logits, model(**canonical).logits, atol=1e-5)


def test_every_end_reason(tiny_policy, image_tasks_dir, pool):
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    show = "import matplotlib.pyplot as plt\nplt.imshow(np.zeros((40, 40)))\nplt.show()\nprint('shown')"
    cases = {
        EndReason.DONE: (["Done.\n" + ANSWER.format("A")], {}),
        EndReason.ERROR_IN_ACTION: (["I will not use the format."], {}),
        EndReason.EXCEED_MAX_TURNS: ([CODE.format("print(1)")], {"max_turns": 3}),
        EndReason.OVER_LENGTH: ([CODE.format("print('x' * 3000)")], {"max_response_tokens": 600,
                                                                      "max_tool_text_chars": 3000}),
        EndReason.EXCEED_MAX_IMAGE_NUM: ([CODE.format(show)], {"max_images": 3}),
    }
    for reason, (turns, cfg) in cases.items():
        traj = run([task], ReplayEngine(p, turns), p, pool, **cfg)[0]
        assert traj.end_reason == reason, (reason, traj.end_reason, [t.action for t in traj.turns])
        assert traj.vision_consistent
        assert traj.answered_directly == (reason == EndReason.DONE)
    # code that raises ends the trajectory (paper) ...
    traj = run([task], ReplayEngine(p, [CODE.format("1 / 0")]), p, pool)[0]
    assert traj.end_reason == EndReason.ERROR_IN_ACTION and traj.turns[-1].exec_status == "error"
    assert traj.num_tool_calls == 0 and not traj.answered_directly   # no call ran, but one was tried
    # ... or comes back as an observation in feedback mode, and the model can recover
    traj = run([task], ReplayEngine(p, [CODE.format("1 / 0"), ANSWER.format("A")]), p, pool, on_error="feedback")[0]
    assert traj.end_reason == EndReason.DONE and "ZeroDivisionError" in traj.turns[0].observation
    assert_token_exact(traj, p)
    # a turn that hits its token cap is an error
    traj = run([task], ReplayEngine(p, ["think think"], finish="length"), p, pool)[0]
    assert traj.end_reason == EndReason.ERROR_IN_ACTION
    # EXCEED_MAX_TURNS: max_turns-1 observations were appended, the last code was not run
    traj = run([task], ReplayEngine(p, [CODE.format("print(1)")]), p, pool, max_turns=3)[0]
    assert traj.num_tool_calls == 2 and traj.turns[-1].exec_status is None
    # images count against the cap, and their tokens match the figures
    traj = run([task], ReplayEngine(p, [CODE.format(show)]), p, pool, max_images=3)[0]
    assert len(traj.image_grid_thw) == 3 and traj.num_returned_images == 2
    assert_token_exact(traj, p)


def test_malformed_model_output(tiny_policy, image_tasks_dir, pool):
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    # several code blocks: the last one runs
    two = CODE.format("print('first')") + " then " + CODE.format("print('second')")
    traj = run([task], ReplayEngine(p, [two, ANSWER.format("A")]), p, pool)[0]
    assert "second" in traj.turns[0].observation and "first" not in traj.turns[0].observation
    # an unclosed block is neither code nor answer
    traj = run([task], ReplayEngine(p, ["<code>\n```python\nprint(1)\n"]), p, pool)[0]
    assert traj.end_reason == EndReason.ERROR_IN_ACTION
    # an answer without the exact newlines ends the episode but fails the strict reward gate
    traj = run([task], ReplayEngine(p, ["<answer>\\boxed{" + task.answer + "}</answer>"]), p, pool)[0]
    assert traj.end_reason == EndReason.DONE and not traj.correct and not traj.reward_parts.wellformed
    # the same answer in the exact form is correct
    traj = run([task], ReplayEngine(p, [ANSWER.format(task.answer)]), p, pool)[0]
    assert traj.correct and traj.reward == 1.0


def test_tool_text_is_truncated(tiny_policy, image_tasks_dir, pool):
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    traj = run([task], ReplayEngine(p, [CODE.format("print('y' * 5000)"), ANSWER.format("A")]), p, pool,
               max_tool_text_chars=200)[0]
    assert "characters truncated" in traj.turns[0].observation and len(traj.turns[0].observation) < 600


def test_hf_engine_with_tiny_model(tiny_policy, image_tasks_dir, pool):
    model, p = tiny_policy
    torch.manual_seed(0)
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0][:2]
    engine = rollout.make_engine("hf", model, p, temperature=1.0)
    trajs = run(tasks, engine, p, pool, max_turns=2, max_turn_tokens=24, max_response_tokens=200)
    assert len(trajs) == 2
    for traj in trajs:
        assert traj.end_reason in (EndReason.ERROR_IN_ACTION, EndReason.DONE, EndReason.EXCEED_MAX_TURNS)
        assert all(0 < t.action_tokens <= 24 for t in traj.turns)
        assert sum(traj.action_mask) == sum(t.action_tokens for t in traj.turns)
        assert traj.vision_consistent


def test_html_viewer(tiny_policy, image_tasks_dir, pool, tmp_path):
    _, p = tiny_policy
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0][:2]
    trajs = run(tasks, rollout.ScriptedExpert(p), p, pool)
    page = rollout.write_html(trajs, tmp_path / "view.html").read_text()
    assert page.count("class='traj'") == 2 and "data:image/png;base64," in page and "Text Result:" in page


class PerSampleEngine:
    """Sample k of every group writes scripts[k] (a ReplayEngine each), so one group holds different outcomes."""

    def __init__(self, processor, scripts):
        self.engines = [ReplayEngine(processor, turns) for turns in scripts]

    def generate(self, requests):
        return [self.engines[r.trajectory.sample_index].generate([r])[0] for r in requests]


def test_html_viewer_shows_why_each_sample_ended_and_each_group_side_by_side(tiny_policy, image_tasks_dir, pool,
                                                                             tmp_path):
    import base64
    import html
    import io
    import re
    from PIL import Image
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    scripts = [[CODE.format("print(undefined_name)")],                       # ends ERROR_IN_ACTION (terminate)
               [CODE.format("print(1)"), ANSWER.format(task.answer)],      # right, one tool call
               [ANSWER.format("not the answer")]]                           # wrong, no tool call
    trajs = rollout.rollout([task], PerSampleEngine(p, scripts), p, pool.open, RolloutConfig(), n=3)
    rollout.score_trajectories(trajs, p)
    assert [t.end_reason for t in trajs] == [EndReason.ERROR_IN_ACTION, EndReason.DONE, EndReason.DONE]
    g = trajs[0].group_id
    page = rollout.write_html(trajs, tmp_path / "view.html", advantages={(g, 0): -0.367, (g, 1): 0.733, (g, 2): -0.367},
                              kept={(g, 0), (g, 1)}).read_text()
    text = html.unescape(page)
    # the sandbox error that ended sample 0 is on the page, in its turn and as the end reason's detail
    assert text.count("NameError: name 'undefined_name' is not defined") == 2
    assert "the sandbox call ended with status error: NameError" in text
    # the summary counts, with a link to every sample
    assert "3 trajectories · accuracy: 1/3 (33.3%)" in text
    assert "tool calls: 1 (trajectories by calls made: 0: 2, 1: 1)" in text and "failed calls by status: error: 1" in text
    assert "<tr><td>DONE</td><td>2</td>" in page and "<tr><td>ERROR_IN_ACTION</td><td>1</td>" in page
    assert all(f"href='#t{k}'" in page and f"id='t{k}'" in page for k in range(3))
    # one group, side by side, with advantages and OFR's verdicts
    assert page.count("<div class='group'>") == 1 and page.count("<div class='traj'") == 3
    assert page.count("OFR: kept") == 2 and page.count("OFR: dropped") == 1 and "advantage: +0.733" in page
    # images are embedded at full size (a click on the thumbnail shows them so)
    first = re.search(r"src='data:image/png;base64,([^']+)'", page).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(first))).size == trajs[0].images[0].size


def test_full_context_video_puts_frames_in_the_prompt(tiny_policy, video_tasks_dir, pool):
    model, p = tiny_policy
    task = data.load_tasks(video_tasks_dir / "tasks.json")[0][0]
    on_demand = run([task], rollout.ScriptedExpert(p), p, pool)[0]
    full = run([task], rollout.ScriptedExpert(p), p, pool, video_context="full_context", full_context_fps=1.0)[0]
    assert full.correct and full.end_reason == EndReason.DONE
    video_tokens = int((torch.tensor(full.input_ids[:full.prompt_len]) == p.video_pad_id).sum())
    assert video_tokens == p.tokens_for_grid(full.video_inputs["video_grid_thw"][0]) > 0
    assert p.video_pad_id not in on_demand.input_ids
    assert full.visual_tokens(p) > on_demand.visual_tokens(p)
    with torch.no_grad():   # the trainer's inputs for this trajectory run through the model
        assert torch.isfinite(model(**full.model_inputs(p)).logits).all()


def test_sandbox_notes_reach_the_model(tiny_policy, image_tasks_dir, pool):
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    # a 6000x20 figure is dropped by the sandbox (too thin for Qwen-VL); the model is told why, in the observation
    thin = "import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(60, 0.2), dpi=100)\nplt.show()\nprint('done')"
    traj = run([task], ReplayEngine(p, [CODE.format(thin), ANSWER.format("A")]), p, pool)[0]
    obs = traj.turns[0].observation
    assert "done" in obs and "[figure dropped" in obs and traj.turns[0].images == []
    # sys.exit() after the work is a successful call
    traj = run([task], ReplayEngine(p, [CODE.format("print(7)\nimport sys\nsys.exit(0)"), ANSWER.format("A")]), p, pool)[0]
    assert traj.end_reason == EndReason.DONE and traj.num_tool_calls == 1 and "7" in traj.turns[0].observation


def test_sampled_video_pad_marks_the_trajectory_inconsistent(tiny_policy, image_tasks_dir, pool):
    # a tiny model can sample <|video_pad|> in an image trajectory; OFR must drop it before M-RoPE sees it
    _, p = tiny_policy
    task = data.load_tasks(image_tasks_dir / "tasks.json")[0][0]
    traj = run([task], ReplayEngine(p, ["oops <|video_pad|> " + ANSWER.format("A")]), p, pool)[0]
    assert traj.end_reason == EndReason.DONE and not traj.vision_consistent
    clean = run([task], ReplayEngine(p, [ANSWER.format("A")]), p, pool)[0]
    assert clean.vision_consistent


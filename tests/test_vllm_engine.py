"""rollout.VLLMEngine against a stand-in for vLLM's `LLM` (vLLM itself needs a GPU; bench/gpu_check.py runs the real
one): what it asks of vLLM (our image bounds, its context, sleep mode, one engine per torchrun rank), prompts as vLLM
takes them, a request vLLM refuses ending only its own trajectory (in the loop and in evaluation), the loop's context
guard, and the wake-up and weight-sync order with its failure and timeout messages."""
import dataclasses
import logging
import os
import sys
import threading
import time
import types
from types import SimpleNamespace as NS

import pytest
import torch
import torch.distributed as dist
from PIL import Image

import data
import eval as evaluation
import models
import ofr
import rollout
from rollout import EndReason, RolloutConfig

ANSWER = "<answer>\n\\boxed{A}\n</answer>"


class FakeLLM:
    """vLLM's `LLM` as VLLMEngine calls it, made from the same keyword arguments.

    It counts image tokens as vLLM does: images resized within `mm_processor_kwargs["size"]` when given, else within
    the checkpoint's own bounds (its preprocessor_config.json). `generate` checks every prompt before running any, and
    one that fills `max_model_len` fails the whole batch with vLLM's ValueError; each prompt comes back with as many ids
    as vLLM's expansion gives it and the completion `self.completion`; `self.requests` keeps (prompt length,
    max_tokens) of every request run. sleep, wake_up and the model's load_weights append to `self.calls`.
    """

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.requests, self.completion = kwargs, [], [], []
        own = models.VLProcessor.from_pretrained(kwargs["model"]).geometry
        size = (kwargs.get("mm_processor_kwargs") or {}).get("size", {})
        self.geometry = dataclasses.replace(own, min_pixels=size.get("shortest_edge", own.min_pixels),
                                            max_pixels=size.get("longest_edge", own.max_pixels))
        self.model_config = NS(dtype=torch.bfloat16)
        self.model = NS(load_weights=lambda weights: self.calls.extend(("load", name, t.dtype) for name, t in weights))

    def generate(self, prompts, params, use_tqdm=True):
        lengths = [len(p["prompt_token_ids"]) + sum(self.geometry.image_tokens(*image.size) - 1
                                                    for image in p.get("multi_modal_data", {}).get("image", []))
                   for p in prompts]
        for n in lengths:
            if n >= self.kwargs["max_model_len"]:
                raise ValueError(f"The decoder prompt (length {n}) is longer than the maximum model length of "
                                 f"{self.kwargs['max_model_len']}.")
        self.requests += [(n, p["max_tokens"]) for n, p in zip(lengths, params)]
        return [NS(prompt_token_ids=[0] * n, outputs=[NS(token_ids=self.completion, finish_reason="stop")])
                for n in lengths]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def apply_model(self, func):
        return [func(self.model)]


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` gives FakeLLM as LLM (and plain dicts as SamplingParams)."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)


@pytest.fixture(scope="module")
def paper_processor(tiny_dir):
    """The tiny checkpoint's processor with the paper's image bounds (its own allow at most 224 x 224 pixels)."""
    return models.VLProcessor.from_pretrained(tiny_dir, min_pixels=3136, max_pixels=2_000_000)


def no_sandbox(**kwargs):
    pytest.fail("these trajectories write no code")


def test_vllm_gets_our_image_bounds_and_settings(tiny_dir, paper_processor, fake_vllm, monkeypatch, tmp_path):
    """The bounds of the processor it is given (not the checkpoint's), its context, its core in this process, sleep
    mode, bfloat16 for a float32 checkpoint, no video slot; one engine per rank under torchrun only."""
    engine = rollout.VLLMEngine(paper_processor, str(tiny_dir), max_model_len=4096)
    kwargs = engine.llm.kwargs
    assert kwargs["mm_processor_kwargs"] == {"size": {"shortest_edge": 3136, "longest_edge": 2_000_000}}
    assert engine.max_model_len == kwargs["max_model_len"] == 4096
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert kwargs["enable_sleep_mode"] and kwargs["dtype"] == "bfloat16"
    assert kwargs["limit_mm_per_prompt"] == {"image": 32, "video": 0}
    assert "distributed_executor_backend" not in kwargs
    assert rollout.VLLMEngine(paper_processor, str(tiny_dir), dtype="float16").llm.kwargs["dtype"] == "float16"
    # a 1-rank group in one process (train.py's FSDP2) keeps vLLM's executor; under torchrun (RANK set) every rank
    # builds its engine through the external launcher
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert "distributed_executor_backend" not in rollout.VLLMEngine(paper_processor, str(tiny_dir)).llm.kwargs
        monkeypatch.setenv("RANK", "0")
        launched = rollout.VLLMEngine(paper_processor, str(tiny_dir)).llm.kwargs
        assert launched["distributed_executor_backend"] == "external_launcher"
    finally:
        dist.destroy_process_group()


def test_a_4_megapixel_image_costs_vllm_the_tokens_it_costs_us(tiny_dir, paper_processor, image_tasks_dir,
                                                                fake_vllm, tmp_path):
    Image.new("RGB", (2000, 2000), "white").save(tmp_path / "big.png")
    task = dataclasses.replace(data.load_tasks(image_tasks_dir / "tasks.json")[0][0],
                               image_path=str(tmp_path / "big.png"))
    traj = rollout.start_trajectory(task, 0, 0, paper_processor, RolloutConfig())
    pads = traj.input_ids.count(paper_processor.image_pad_id)
    assert pads == paper_processor.geometry.image_tokens(2000, 2000) == 2500   # resized to 1400 x 1400 pixels
    # vLLM gets the ids with each image's pads collapsed to one, and the image itself
    prompt = rollout.vllm_prompt(traj, paper_processor)
    assert prompt["prompt_token_ids"].count(paper_processor.image_pad_id) == len(traj.images) == 1
    assert len(prompt["prompt_token_ids"]) == len(traj.input_ids) - pads + 1
    assert prompt["multi_modal_data"]["image"] == list(traj.images)

    engine = rollout.VLLMEngine(paper_processor, str(tiny_dir), temperature=0.0)
    code = paper_processor.encode_text("<code>\n```python\nprint(1)\n```\n</code>")
    engine.llm.completion = code
    result = engine.generate([rollout.GenRequest(traj, 64)])[0]
    assert (result.token_ids, result.finish_reason) == (code, "stop")
    # a vLLM that resized with the checkpoint's bounds would count 64 tokens for the image: that trajectory ends with
    # both lengths (training would otherwise score other pixels than were sampled from), not the run
    engine.llm.geometry = models.VLProcessor.from_pretrained(tiny_dir).geometry
    result = engine.generate([rollout.GenRequest(traj, 64)])[0]
    assert result.finish_reason == "error" and result.token_ids == []
    assert f"vLLM expanded the prompt to {len(traj.input_ids) - pads + 64} tokens, our processor to " \
           f"{len(traj.input_ids)}" in result.error


def test_a_request_vllm_refuses_fails_alone(tiny_dir, tiny_policy, image_tasks_dir, fake_vllm):
    _, p = tiny_policy
    trajs = [rollout.start_trajectory(t, g, 0, p, RolloutConfig())
             for g, t in enumerate(data.load_tasks(image_tasks_dir / "tasks.json")[0][:5])]
    limit = max(len(t.input_ids) for t in trajs) + 50
    trajs[3].input_ids += p.encode_text(" x") * (limit - len(trajs[3].input_ids))   # vLLM refuses this prompt
    engine = rollout.VLLMEngine(p, str(tiny_dir), max_model_len=limit)
    engine.llm.completion = p.encode_text(ANSWER) + [p.eos_id]
    results = engine.generate([rollout.GenRequest(t, 16) for t in trajs])
    assert [r.finish_reason for r in results] == ["eos", "eos", "eos", "error", "eos"]
    assert results[3].error == f"vLLM refused the prompt: The decoder prompt (length {limit}) is longer than the " \
                               f"maximum model length of {limit}."
    assert sorted(n for n, _ in engine.llm.requests) == sorted(len(t.input_ids) for k, t in enumerate(trajs) if k != 3)
    # anything but vLLM's refusal of a request (out of memory, a dead engine) stops the run
    engine.llm.generate = lambda prompts, params, use_tqdm: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate([rollout.GenRequest(trajs[0], 16)])


def test_the_loop_guards_the_context_and_goes_on_past_a_refused_prompt(tiny_dir, tiny_policy, image_tasks_dir,
                                                                      fake_vllm, caplog):
    _, p = tiny_policy
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0]
    length = {t.id: len(rollout.start_trajectory(t, 0, 0, p, RolloutConfig()).input_ids) for t in tasks}
    short, long = min(tasks, key=lambda t: length[t.id]), max(tasks, key=lambda t: length[t.id])
    answer = p.encode_text(ANSWER) + [p.eos_id]
    assert length[short.id] + len(answer) < length[long.id]   # the short one has room for its answer, the long none
    engine = rollout.VLLMEngine(p, str(tiny_dir), max_model_len=length[long.id])
    engine.llm.completion = answer
    trajs = rollout.rollout([short, long], engine, p, no_sandbox, RolloutConfig())
    assert [t.end_reason for t in trajs] == [EndReason.DONE, EndReason.OVER_LENGTH]
    assert trajs[1].turns == [] and trajs[1].response_len == 0
    # only the short prompt went to vLLM, with a budget that fits the context
    assert engine.llm.requests == [(length[short.id], length[long.id] - length[short.id])]
    # a prompt vLLM refuses although the guard let it through ends alone, logged, and OFR never trains on it
    engine.max_model_len = 10 ** 6
    with caplog.at_level(logging.WARNING, logger="rollout"):
        trajs = rollout.rollout([short, long], engine, p, no_sandbox, RolloutConfig())
    assert [t.end_reason for t in trajs] == [EndReason.DONE, EndReason.ENGINE_ERROR]
    assert trajs[0].error is None and "longer than the maximum model length" in trajs[1].error
    assert f"task {long.id}, sample 0 ends as ENGINE_ERROR: vLLM refused the prompt" in caplog.text
    assert EndReason.ENGINE_ERROR not in ofr.OFRConfig().keep_end_reasons


def test_evaluation_records_a_refused_prompt_as_an_error(tiny_dir, tiny_policy, image_tasks_dir, fake_vllm,
                                                         tmp_path):
    _, p = tiny_policy
    tasks = data.load_tasks(image_tasks_dir / "tasks.json")[0][:4]
    length = [len(rollout.start_trajectory(t, 0, 0, p, RolloutConfig()).input_ids) for t in tasks]
    engine = rollout.VLLMEngine(p, str(tiny_dir), max_model_len=max(length), temperature=0.0)
    engine.llm.completion = p.encode_text(ANSWER) + [p.eos_id]
    engine.max_model_len = 10 ** 6   # the loop lets every prompt through; vLLM refuses the longest
    results = evaluation.evaluate(tasks, engine, p, evaluation.EvalConfig(batch_size=4), tmp_path)
    by_id = {r["task_id"]: r for r in results["samples"]}
    refused = tasks[length.index(max(length))].id
    assert by_id[refused]["error_stage"] == "rollout" and "vLLM refused the prompt" in by_id[refused]["error"]
    assert results["summary"]["n_errors"] == 1 and results["summary"]["n_scored"] == len(tasks) - 1


def test_sync_wakes_in_order_loads_in_the_main_thread_and_stops_the_run_on_failure_or_timeout(
        tiny_dir, tiny_policy, fake_vllm, monkeypatch):
    model, p = tiny_policy
    engine = rollout.VLLMEngine(p, str(tiny_dir), sync_timeout_s=5)
    llm = engine.llm
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.calls.append(("empty_cache",)))
    made_in_main_thread = []

    def weights():   # as train.full_weights: each tensor made (under FSDP2: all-gathered) only when asked for
        for name, tensor in model.state_dict().items():
            made_in_main_thread.append(threading.current_thread() is threading.main_thread())
            yield name, tensor

    def load(weights):   # records each weight's name and dtype, and how many the trainer had made by then
        for k, (name, tensor) in enumerate(weights):
            llm.calls.append(("load", name, tensor.dtype, len(made_in_main_thread) - k))
    llm.model.load_weights = load
    engine.sleep()
    engine.sync_weights(weights())
    assert llm.calls[:3] == [("sleep", 2), ("empty_cache",), ("wake_up", ["weights"])]
    assert llm.calls[3:-1] == [("load", name, torch.bfloat16, 1) for name in model.state_dict()]
    assert llm.calls[-1] == ("wake_up", ["kv_cache"])
    assert all(made_in_main_thread)   # the trainer's collectives run in the main thread, on the rank's device

    def broken(weights):
        raise KeyError("visual.blocks.0.attn.qkv.weight")
    llm.model.load_weights = broken
    with pytest.raises(RuntimeError, match="weight sync failed.*visual.blocks.0"):
        engine.sync_weights(weights())
    llm.model.load_weights = lambda weights: time.sleep(30)
    engine.sync_timeout_s = 1
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish within 1 s"):
        engine.sync_weights(weights())
    assert time.perf_counter() - start < 10   # interrupted, not waited out

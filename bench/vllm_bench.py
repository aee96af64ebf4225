"""bench/vllm_bench.py — the vLLM engine on a GPU, measured against the HF engine in the same process (issues: rollout.py,
train.py, eval.py). Needs a CUDA GPU and `pip install -e .[vllm]`; CI has neither.

  loop: one trained checkpoint through the full agent loop (sandbox, parsing, scoring) with both engines, greedy:
        accuracy, how many trajectories come out token for token the same, trajectories/s, generated tokens/s and the
        vLLM/HF ratio.
  sync: the colocated weight path, in its own process (vLLM's sleep-mode allocator serves one engine per process):
        a vLLM engine started from other weights (INIT) is put to sleep and woken up by `sync_weights` with the trained
        checkpoint's weights; it must then roll out what the HF engine on the trained weights rolls out.
  decode: decode throughput of the Qwen2.5-VL-7B architecture with random weights (vLLM's dummy loader; HF's random
        init), PROMPTS image prompts x NEW_TOKENS new tokens, vLLM vs HF `generate` — what a rollout costs at the
        paper's scale, without downloading a checkpoint.

    python bench/vllm_bench.py loop --model CKPT --data TASKS.json [--tasks 64] [--n 2] [--eager]
    python bench/vllm_bench.py sync --model CKPT --init-model OTHER_CKPT --data TASKS.json [--eager]
    python bench/vllm_bench.py decode --tokenizer-from CKPT [--prompts 64] [--new-tokens 512] [--eager]

loop and decode end with their vLLM/HF ratio. Both engines run in bfloat16 (a float32 tiny checkpoint is cast). Figures
from an H200 are in the README (Checked on a GPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
from sandbox import SandboxPool  # noqa: E402

# the demo's rollout budget (Makefile ROLL) with the short template the demo checkpoint was trained on
LOOP_CFG = rollout.RolloutConfig(max_turns=3, max_turn_tokens=160, max_response_tokens=768, template_key="short")

# Qwen2.5-VL-7B-Instruct's shapes (its config.json); token ids stay the tiny tokenizer's
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=False, layer_types=["full_attention"] * 28)
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, tokens_per_second=2)


def run_loop(name: str, engine, tasks, processor, n: int) -> dict:
    timings = rollout.RolloutTimings()
    with SandboxPool(timeout=30) as pool:
        pool.open().close()   # the sandbox template starts outside the measured run
        trajs = rollout.rollout(tasks, engine, processor, pool.open, LOOP_CFG, n=n, timings=timings)
    rollout.score_trajectories(trajs, processor)
    generated = sum(sum(t.action_mask) for t in trajs)
    row = dict(engine=name, trajectories=len(trajs), accuracy=sum(t.correct for t in trajs) / len(trajs),
               tool_calls=sum(t.num_tool_calls for t in trajs) / len(trajs), seconds=timings.total_s,
               generate_s=timings.generate_s, traj_per_s=len(trajs) / timings.total_s,
               gen_tok_per_s=generated / timings.generate_s, ids=[list(t.input_ids) for t in trajs])
    print(f"[{name}] {len(trajs)} trajectories in {timings.total_s:.2f} s ({timings.generate_s:.2f} s generating): "
          f"{row['traj_per_s']:.1f} traj/s, {row['gen_tok_per_s']:.0f} generated tok/s, accuracy {row['accuracy']:.3f}, "
          f"tool calls/traj {row['tool_calls']:.2f}", flush=True)
    return row


def hf_reference(args):
    """The tasks, the trained policy on the GPU and its greedy rollouts with the HF engine: the reference both parts
    compare vLLM against."""
    tasks = data.load_tasks(args.data)[0][:args.tasks]
    model, processor = models.load_policy(args.model, dtype="bfloat16", device="cuda")
    hf = run_loop("hf", rollout.make_engine("hf", model.eval(), processor, temperature=0.0), tasks, processor, args.n)
    return tasks, model, processor, hf


def identical(a: dict, b: dict) -> float:
    """Fraction of trajectories whose token ids are the same in two runs."""
    return sum(x == y for x, y in zip(a["ids"], b["ids"])) / len(a["ids"])


def loop_part(args) -> dict:
    tasks, _, processor, hf = hf_reference(args)

    t0 = time.perf_counter()
    engine = rollout.make_engine("vllm", processor=processor, model_path=args.model, temperature=0.0,
                                 gpu_memory_utilization=0.3, enforce_eager=args.eager)
    start_s = time.perf_counter() - t0
    print(f"vLLM engine start: {start_s:.1f} s", flush=True)
    run_loop("vllm", engine, tasks, processor, args.n)        # warm-up: first-call allocations and captures
    vllm_row = run_loop("vllm", engine, tasks, processor, args.n)
    same = identical(hf, vllm_row)
    print(f"trajectories token-identical between hf and vllm (greedy, both bfloat16): {same:.3f}")
    ratio = vllm_row["traj_per_s"] / hf["traj_per_s"]
    print(f"loop: vllm/hf trajectories per second = {ratio:.2f}x")
    return {"hf": hf, "vllm": vllm_row, "vllm_start_s": start_s, "token_identical": same, "ratio_traj_per_s": ratio}


def sync_part(args) -> dict:
    """The colocated weight path, in a process of its own (vLLM's sleep-mode allocator serves one engine per
    process): start from other weights, sleep, wake up with the trained ones; the HF engine on the trained weights
    is the reference."""
    tasks, model, processor, hf = hf_reference(args)
    engine = rollout.make_engine("vllm", processor=processor, model_path=args.init_model, temperature=0.0,
                                 gpu_memory_utilization=0.3, enforce_eager=args.eager)
    before = run_loop("vllm, INIT weights", engine, tasks, processor, args.n)
    engine.sleep()
    t0 = time.perf_counter()
    engine.sync_weights((k, v.detach()) for k, v in model.state_dict().items())   # wakes it up
    sync_s = time.perf_counter() - t0
    after = run_loop("vllm, synced weights", engine, tasks, processor, args.n)
    same = identical(hf, after)
    print(f"sync_weights: {sync_s:.2f} s; accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} (hf on the "
          f"trained weights: {hf['accuracy']:.3f}); trajectories token-identical to hf's: {same:.3f}")
    return {"sync_s": sync_s, "acc_before_sync": before["accuracy"], "acc_after_sync": after["accuracy"],
            "acc_hf": hf["accuracy"], "token_identical_to_hf": same}


def decode_part(args) -> dict:
    processor = models.VLProcessor.from_pretrained(args.tokenizer_from)
    with tempfile.TemporaryDirectory(prefix="qwen25vl7b_") as tmp_name:
        return _decode(args, processor, Path(tmp_name))


def qwen25_vl_7b_config(tokenizer_from: str | Path) -> dict:
    """Qwen2.5-VL-7B's config.json, with the special-token ids of the checkpoint at `tokenizer_from` (whose tokenizer
    the prompts use), in bfloat16."""
    config = json.loads((Path(tokenizer_from) / "config.json").read_text())
    config["text_config"].update(QWEN25_VL_7B_TEXT)
    config["vision_config"].update(QWEN25_VL_7B_VISION)
    config.update(tie_word_embeddings=False, dtype="bfloat16")
    return config


def _decode(args, processor, tmp: Path) -> dict:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from vllm import LLM, SamplingParams
    config = qwen25_vl_7b_config(args.tokenizer_from)
    (tmp / "config.json").write_text(json.dumps(config))
    for f in Path(args.tokenizer_from).iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (tmp / f.name).write_bytes(f.read_bytes())
    tasks = data.generate_image_tasks(args.prompts, seed=3, out_dir=tmp / "tasks")
    trajs = [rollout.start_trajectory(t, i, 0, processor, LOOP_CFG) for i, t in enumerate(tasks)]
    tokens = args.prompts * args.new_tokens

    llm = LLM(model=str(tmp), load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.45,
              max_model_len=4096, limit_mm_per_prompt={"image": 1, "video": 0}, enforce_eager=args.eager, seed=0)
    prompts = [rollout.vllm_prompt(t, processor) for t in trajs]
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:4], params, use_tqdm=False)           # warm-up
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    vllm_s = time.perf_counter() - t0
    del llm          # shuts vLLM's engine process down: its memory goes back before the HF model is built
    gc.collect()
    torch.cuda.empty_cache()
    print(f"[vllm] {args.prompts} x {args.new_tokens} tokens in {vllm_s:.2f} s: {tokens / vllm_s:.0f} tok/s", flush=True)

    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**config), dtype=torch.bfloat16,
                                                                attn_implementation="sdpa").eval()
    inputs = rollout.batch_inputs(trajs, processor, model.device, side="left")
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, pad_token_id=processor.pad_id)
    with torch.no_grad():
        warm = rollout.batch_inputs(trajs[:4], processor, model.device, side="left")
        model.generate(**warm, max_new_tokens=8, min_new_tokens=8, **sampling)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **sampling)
        torch.cuda.synchronize()
        hf_s = time.perf_counter() - t0
    print(f"[hf]   {args.prompts} x {args.new_tokens} tokens in {hf_s:.2f} s: {tokens / hf_s:.0f} tok/s")
    print(f"decode: vllm/hf tokens per second = {hf_s / vllm_s:.2f}x")
    return {"vllm_tok_per_s": tokens / vllm_s, "hf_tok_per_s": tokens / hf_s, "ratio": hf_s / vllm_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["loop", "sync", "decode"])
    parser.add_argument("--model", help="loop, sync: trained checkpoint")
    parser.add_argument("--init-model", help="sync: a checkpoint of the same architecture with other weights")
    parser.add_argument("--data", help="loop, sync: tasks JSON")
    parser.add_argument("--tasks", type=int, default=64, help="loop, sync: tasks used")
    parser.add_argument("--n", type=int, default=2, help="loop, sync: samples per task")
    parser.add_argument("--tokenizer-from", help="decode: checkpoint whose tokenizer and image processor are used")
    parser.add_argument("--prompts", type=int, default=64, help="decode: prompts (one image each)")
    parser.add_argument("--new-tokens", type=int, default=512, help="decode: tokens generated per prompt")
    parser.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs or torch.compile")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    result = {"loop": loop_part, "sync": sync_part, "decode": decode_part}[args.part](args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

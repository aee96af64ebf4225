"""bench/gpu_check.py — what a CPU cannot settle about the colocated vLLM path, on one GPU in at most 8 minutes with
nothing downloaded (tiny models built on the spot, the Qwen2.5-VL-7B architecture with random weights from its config).
Needs a CUDA GPU and `pip install -e .[vllm]`; the parts run vLLM eager (no CUDA graphs), which starts in seconds.

  cycle:  train.py's colocated step with FSDP2 really applied (a 1-rank process group, as `--parallel fsdp2` makes in
          one process): greedy vLLM rollouts of a copy-pretrained tiny policy, vLLM put to sleep, one update of the
          sharded policy (train.update), `sync_weights` of the sharded weights (it wakes vLLM), rollouts again; those
          must be token-identical to the HF engine's on the updated weights.
  pixels: 4-megapixel images through vLLM with the paper's image bounds (3,136 ... 2,000,000 pixels; the tiny
          checkpoint's own stop at 224 x 224): vLLM's prompt must be exactly as long as ours for every one.
  wake:   vLLM asleep while PyTorch's cache holds 80 % of the free memory (allocated, then freed, as an update leaves
          it): `sync_weights` must wake vLLM, and its greedy rollouts must be the ones from before the sleep.
  memory: one update of the 7B architecture as the paper-image preset runs it (FSDP2 at one rank, bfloat16 compute over
          float32 master weights, activation checkpointing, frozen vision tower) on the paper's longest trajectory (a
          2-megapixel image prompt, then 20,480 response tokens): torch.cuda.max_memory_allocated. The optimiser is
          plain SGD: AdamW's two float32 moments per trainable weight do not fit beside unsharded weights on one GPU;
          their size is printed beside the measurement.
  plan:   bench/memory_plan.py's estimate for one GPU (`--preset paper-image --gpus 1`), its output printed to set
          beside `memory` (n/a where that script is absent). It runs on the CPU while the other parts run.

Every part runs in a process of its own (vLLM's sleep-mode allocator serves one engine per process) under its own time
limit, so a part that fails, crashes or hangs still leaves the others' rows; its log is printed after the table.

    python bench/gpu_check.py                           # every part
    python bench/gpu_check.py --parts pixels wake       # some of them
    python bench/gpu_check.py --out gpu_check.json      # also write the rows as JSON

On a machine whose vLLM lacks FlashInfer, set VLLM_USE_FLASHINFER_SAMPLER=0 (README: Checked on a GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COPY_STEPS = 300            # copy pretraining of the cycle's policy, so its greedy choices are not the near-ties of a
                            # random one, which two engines' bfloat16 kernels may break differently
PAPER_PIXELS = dict(min_pixels=3136, max_pixels=2_000_000)
VLLM_MEMORY = 0.3           # of the GPU for each vLLM engine here (the tiny model needs little)


def tiny_tasks(work: Path):
    import data
    return data.load_tasks(work / "tasks" / "tasks.json")[0]


def vllm_engine(processor, model_dir: Path):
    import rollout
    return rollout.make_engine("vllm", processor=processor, model_path=str(model_dir), temperature=0.0,
                               gpu_memory_utilization=VLLM_MEMORY, enforce_eager=True)


def as_row(trajs) -> dict:
    """Trajectories as vllm_bench.identical compares them."""
    return {"ids": [list(t.input_ids) for t in trajs]}


def cycle_part(work: Path, args) -> tuple[dict, bool]:
    import models
    import rollout
    import tiny
    import train
    import vllm_bench
    from sandbox import SandboxPool
    from torch.distributed.tensor import DTensor
    policy_dir = work / "copy_pretrained"
    shutil.copytree(work / "tiny", policy_dir)
    model, processor = models.load_policy(policy_dir, device="cuda")
    tiny.pretrain_copying(model, processor, COPY_STEPS)
    model.save_pretrained(policy_dir)
    del model
    cfg = train.parse_config(["--preset", "tiny", "--model", str(policy_dir), "--engine", "vllm", "--parallel", "fsdp2",
                              "--data", str(work / "tasks" / "tasks.json"), "--dtype", "bfloat16", "--temperature",
                              "0", "--vllm-eager", "--lr", "1e-3", "--output-dir", str(work / "cycle")])
    d = train.init_distributed(cfg.dist_timeout_min, one_process_group=True)
    run = train.setup(cfg, d, Path(cfg.output_dir))
    sharded = all(isinstance(p, DTensor) for p in run.train_model.parameters())
    tasks = tiny_tasks(work)
    with SandboxPool(timeout=30) as pool:
        before = rollout.rollout(tasks, run.engine, run.processor, pool.open, vllm_bench.LOOP_CFG)
    # advantages of both signs move the weights whatever the rewards: this checks the machinery, not learning
    advantages = [1.0 if k % 2 == 0 else -1.0 for k in range(len(before))]
    run.engine.sleep()
    run.model.train()
    update = train.update(run.train_model, run.optimizer, before, advantages, cfg, run.processor, d)
    run.model.eval()
    t0 = time.perf_counter()
    run.engine.sync_weights(train.full_weights(run.train_model))
    sync_s = time.perf_counter() - t0
    after = vllm_bench.run_loop("vllm after the update", run.engine, tasks, run.processor, 1)
    hf = rollout.make_engine("hf", models.load_policy(policy_dir, dtype="bfloat16", device="cuda")[0].eval(),
                             run.processor, temperature=0.0)
    hf.sync_weights(train.full_weights(run.train_model))
    reference = vllm_bench.run_loop("hf on the updated weights", hf, tasks, run.processor, 1)
    same = vllm_bench.identical(after, reference)
    figures = dict(fsdp2_sharded=sharded, trajectories=len(tasks), grad_norm=round(update.grad_norm, 4),
                   sync_s=round(sync_s, 3), changed_by_update=round(1 - vllm_bench.identical(as_row(before), after), 3),
                   stale_vs_hf=round(vllm_bench.identical(as_row(before), reference), 3), synced_vs_hf=same)
    return figures, sharded and same == 1.0


def pixels_part(work: Path, args) -> tuple[dict, bool]:
    import models
    import rollout
    from PIL import Image
    processor = models.VLProcessor.from_pretrained(work / "tiny", **PAPER_PIXELS)
    engine = vllm_engine(processor, work / "tiny")
    task = tiny_tasks(work)[0]
    trajs = []
    for width, height in [(2000, 2000), (2560, 1600), (1200, 3333)]:   # 4 megapixels, three aspect ratios
        path = work / f"image_{width}x{height}.png"
        Image.effect_noise((width, height), 64).convert("RGB").save(path)
        trajs.append(rollout.start_trajectory(dataclasses.replace(task, image_path=str(path)), len(trajs), 0,
                                              processor, rollout.RolloutConfig()))
    outputs = engine.llm.generate([rollout.vllm_prompt(t, processor) for t in trajs], engine.sampling(1),
                                  use_tqdm=False)
    own = models.VLProcessor.from_pretrained(work / "tiny").geometry
    figures = {}
    for traj, out in zip(trajs, outputs):
        size = traj.images[0].size
        figures["x".join(map(str, size))] = (f"ours {len(traj.input_ids)} / vLLM {len(out.prompt_token_ids)} tokens "
                                             f"({processor.geometry.image_tokens(*size)} for the image; "
                                             f"{own.image_tokens(*size)} in the checkpoint's bounds)")
    return figures, all(len(t.input_ids) == len(out.prompt_token_ids) for t, out in zip(trajs, outputs))


def wake_part(work: Path, args) -> tuple[dict, bool]:
    import models
    import torch
    import vllm_bench
    model, processor = models.load_policy(work / "tiny", device="cuda")   # the trainer's copy of the policy
    engine = vllm_engine(processor, work / "tiny")
    tasks = tiny_tasks(work)
    before = vllm_bench.run_loop("vllm before sleeping", engine, tasks, processor, 1)
    engine.sleep()
    hog = torch.empty(int(0.8 * torch.cuda.mem_get_info()[0]), dtype=torch.uint8, device="cuda")   # the update's peak
    hog_gib = hog.numel() / 2 ** 30
    del hog   # freed, but still reserved in PyTorch's cache
    cached_gib = torch.cuda.memory_reserved() / 2 ** 30
    free_asleep_gib = torch.cuda.mem_get_info()[0] / 2 ** 30
    engine.sync_weights(model.state_dict().items())
    free_awake_gib = torch.cuda.mem_get_info()[0] / 2 ** 30
    after = vllm_bench.run_loop("vllm after waking", engine, tasks, processor, 1)
    same = vllm_bench.identical(before, after)
    figures = dict(torch_cached_gib=round(cached_gib, 1), free_before_wake_gib=round(free_asleep_gib, 1),
                   vllm_share_gib=round(VLLM_MEMORY * torch.cuda.mem_get_info()[1] / 2 ** 30, 1),
                   free_after_wake_gib=round(free_awake_gib, 1), hog_gib=round(hog_gib, 1), same_as_before_sleep=same)
    return figures, same == 1.0


def longest_trajectory(work: Path, processor, cfg):
    """The paper's longest trajectory: a 2-megapixel image with the default instructions, then MAX_RESPONSE_TOKENS of
    model tokens (all actions: the most log-probs a trajectory can ask for)."""
    import rollout
    from PIL import Image
    path = work / "image_1600x1250.png"
    Image.effect_noise((1600, 1250), 64).convert("RGB").save(path)
    task = dataclasses.replace(tiny_tasks(work)[0], image_path=str(path))
    traj = rollout.start_trajectory(task, 0, 0, processor, rollout.RolloutConfig())
    phrase = processor.encode_text("Let me zoom in on the upper left corner. ")
    traj.input_ids += (phrase * (cfg.max_response_tokens // len(phrase) + 1))[:cfg.max_response_tokens]
    traj.action_mask += [1] * cfg.max_response_tokens
    return traj


def memory_part(work: Path, args) -> tuple[dict, bool]:
    import models
    import torch
    import train
    import vllm_bench
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = train.parse_config(["--preset", "paper-image"])
    d = train.init_distributed(cfg.dist_timeout_min, one_process_group=True)
    config = Qwen2_5_VLConfig(**vllm_bench.qwen25_vl_7b_config(work / "tiny"))
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.model.visual.requires_grad_(False)   # the paper freezes the vision tower
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_model = train.wrap_model(model, cfg, d)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)   # no state
    processor = models.VLProcessor.from_pretrained(work / "tiny", **PAPER_PIXELS)
    traj = longest_trajectory(work, processor, cfg)
    weights_gib = torch.cuda.memory_allocated() / 2 ** 30
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train.update(train_model, optimizer, [traj], [1.0], cfg, processor, d)
    torch.cuda.synchronize()
    figures = dict(gpu=torch.cuda.get_device_name(), tokens=len(traj.input_ids), prompt_tokens=traj.prompt_len,
                   params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
                   trainable_b=round(trainable / 1e9, 2), master_weights_gib=round(weights_gib, 1),
                   after_update_gib=round(torch.cuda.memory_allocated() / 2 ** 30, 1),
                   max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1),
                   adamw_moments_not_allocated_gib=round(8 * trainable / 2 ** 30, 1),
                   update_s=round(time.perf_counter() - t0, 1))
    return figures, True


def plan_part(work: Path, args) -> tuple[dict, bool]:
    script = ROOT / "bench" / "memory_plan.py"
    if not script.is_file():
        return {"estimate": "n/a (no bench/memory_plan.py)"}, True
    out = subprocess.run([sys.executable, str(script), "--preset", "paper-image", "--gpus", "1",
                          "--hbm-gib", str(args.hbm_gib)], capture_output=True, text=True, check=True)
    print(out.stdout)
    lines = out.stdout.strip().splitlines()
    return {"estimate": lines[-1] if lines else "n/a (no output)"}, True


# name -> (function, time limit in seconds); `plan` uses the CPU only and runs beside the others
PARTS = {"cycle": (cycle_part, 170), "pixels": (pixels_part, 70), "wake": (wake_part, 80),
         "memory": (memory_part, 130), "plan": (plan_part, 450)}
BACKGROUND = {"plan"}


def run_child(args) -> None:
    """One part in this process: its figures (or its error) go to args.result as JSON."""
    try:
        figures, ok = PARTS[args.child][0](Path(args.work), args)
        result = {"status": "ok" if ok else "FAIL", "figures": figures}
    except Exception as e:  # noqa: BLE001 — the parent reports it in its table
        traceback.print_exc()
        result = {"status": "error", "figures": {"error": f"{type(e).__name__}: {str(e)[:300]}"}}
    Path(args.result).write_text(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)   # vLLM's and the sandbox's threads are not waited for: the part is done


def start(name: str, work: Path, args) -> tuple[subprocess.Popen, float]:
    """A part in a new process (and process group), its output to WORK/NAME.log; `plan` sees no GPU."""
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": ""} if name in BACKGROUND else {})
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--work", str(work), "--result",
                                 str(work / f"{name}.json"), "--hbm-gib", str(args.hbm_gib)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, time.perf_counter()


def finish(name: str, proc: subprocess.Popen, started: float, work: Path) -> dict:
    """Wait for a part within its limit (its whole process group is killed past it) and read its row."""
    limit = PARTS[name][1]
    try:
        proc.wait(timeout=max(1.0, limit - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"part": name, "status": f"timeout ({limit} s)", "seconds": limit, "figures": {}}
    result_file = work / f"{name}.json"
    row = json.loads(result_file.read_text()) if result_file.is_file() else {
        "status": f"crashed (exit {proc.returncode})", "figures": {}}
    return {"part": name, "seconds": round(time.perf_counter() - started, 1), **row}


def versions() -> str:
    found = []
    for package in ("torch", "transformers", "vllm"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run (all)")
    parser.add_argument("--hbm-gib", type=float, default=139.0, help="plan: the GPU's memory in GiB (an H200's)")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    parser.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    import data
    import tiny
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    print(f"{versions()}; logs in {work}", flush=True)
    tiny.build_tiny(work / "tiny", size="test")
    data.generate_image_tasks(16, seed=0, out_dir=work / "tasks")
    background = {name: start(name, work, args) for name in args.parts if name in BACKGROUND}
    rows = []
    for name in [n for n in args.parts if n not in BACKGROUND]:
        rows.append(finish(name, *start(name, work, args), work))
        print(f"{name}: {rows[-1]['status']} ({rows[-1]['seconds']} s)", flush=True)
    rows += [finish(name, proc, started, work) for name, (proc, started) in background.items()]

    print(f"\n{'part':8} {'status':20} {'seconds':>8}  figures")
    for row in rows:
        figures = "; ".join(f"{k}={v}" for k, v in row["figures"].items())
        print(f"{row['part']:8} {row['status']:20} {row['seconds']:>8}  {figures}")
    for row in rows:   # why a part failed; what memory_plan.py printed
        log = (work / f"{row['part']}.log").read_text().splitlines()[-40:]
        if log and (row["status"] != "ok" or row["part"] == "plan"):
            print(f"\n--- {row['part']} log (last 40 lines) ---\n" + "\n".join(log))
    if args.out:
        Path(args.out).write_text(json.dumps({"versions": versions(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

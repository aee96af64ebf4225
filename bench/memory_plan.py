"""bench/memory_plan.py — per-GPU peak memory of a training preset at Qwen2.5-VL-7B scale on N GPUs, measured on a CPU
by running this project's own update code (train.wrap_model, train.update) at the 7B shapes, plus the colocated vLLM.

Where it is in the paper
    PyVision-RL (arXiv 2602.20739) trains a 7B policy (Qwen2.5-VL-7B) on one node of 8 GPUs, vLLM colocated with the
    trainer; a trajectory may reach the prompt (one image of up to 2,000,000 pixels) plus 20,480 response tokens. This
    script answers, before a GPU is lent, whether a preset of train.py fits that node and which knob to turn if not.

How to run
    python bench/memory_plan.py --preset paper-image --gpus 8 --hbm-gib 80      # the paper's node (~3 min, 2 cores)
    python bench/memory_plan.py --preset released-image --gpus 8 --hbm-gib 80   # the released script's settings
    python bench/memory_plan.py --shape cross-check                             # the whole script on a small policy
The last line reads `PRESET on N x H GiB: peak X GiB per GPU, ratio R` (R = X / H; the goal is R <= 0.90).

What it measures, and how
    Method: the policy is built from Qwen2.5-VL-7B's published config under torch's FakeTensorMode (tensors with shapes
    and dtypes but no storage, so 8 billion parameters cost nothing), sharded by train.wrap_model over a fake process
    group of N ranks (FSDP2 with the preset's mixed precision, activation checkpointing and offload), and trained by
    train.update on real trajectories (the project's prompt, processor and collate), under FSDP2's memory tracker
    (torch.distributed._tools.fsdp2_mem_tracker), which counts every tensor a rank allocates, by kind, through one
    forward, backward and AdamW step. Integer bookkeeping (token ids, masks, image grids, M-RoPE positions) keeps its
    values so the model's data-dependent code runs as it does on a GPU; floating-point tensors are fake. Every
    measurement runs in a fresh process, after one warm-up update that creates AdamW's state (steady state).
    Micro-batches measured: the preset's longest trajectory alone (prompt with one image of the preset's max_pixels,
    then max_response_tokens response tokens), and, when the preset packs to a token budget, a pack that fills it (the
    packer puts several shorter trajectories together, each with such an image). Every response token counts as an
    action (the LM head runs on all of them: the worst case). In a mini-batch's later micro-batches the gradients of
    the earlier ones are resident: the pack is charged the full sharded gradients.
    Logits chunk: what one LM-head chunk adds, the peak with chunks of 2 x LOGPROB_CHUNK minus the peak with chunks of
    LOGPROB_CHUNK on a short trajectory, whose peak lies in the head's backward (at 8 GPUs; on one, AdamW's step
    holds the peak and the difference is 0).
    Cross-check: the same method on a small configuration (4 layers of width 512, vocabulary 16,384, world size 1) is
    compared with a real run of it on this CPU: the growth of the process's peak RSS (VmHWM, reset before the update)
    over its RSS before the update, malloc returning every large block on free (MALLOC_MMAP_THRESHOLD_), so RSS
    follows live tensors as torch.cuda.max_memory_allocated does on a GPU. Two updates of a 4,096-token trajectory:
    with the preset's LM-head chunk (the peak lies in the head's backward) and with chunks of 256 (the peak lies in a
    recomputed block's backward, as at 7B). Each must agree within --tolerance.

What it assumes (printed; not measured)
    * vLLM during the update sleeps at level 2 (weights and KV cache discarded, rollout.py): it keeps its CUDA-graph
      pool and buffers, --vllm-asleep-gib. During rollouts it holds the preset's vllm_gpu_memory x HBM, beside the
      trainer's resident state (sharded weights, the last step's gradients, AdamW state; none of it with --offload).
    * The CUDA context and NCCL buffers, --cuda-context-gib, outside PyTorch's allocator.
    * The figures are allocated bytes (what torch.cuda.max_memory_allocated reports); the caching allocator's
      fragmentation comes on top. With --offload the sharded state is on the host; its transient device copy (one
      FSDP unit's shard at a time) is not counted. AdamW runs with foreach=True, PyTorch's default on a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
import vllm_bench  # noqa: E402   (bench/, beside this file)

GIB = 2 ** 30
RESULT_TAG = "PROBE_RESULT "   # the line a probe process prints its figures on


# ---------------------------------------------------------------------------------------------------------------------
# Policy shapes
# ---------------------------------------------------------------------------------------------------------------------

SHAPES = {
    # Qwen2.5-VL-7B-Instruct's config.json, as every bench builds it (bench/vllm_bench.py, bench/gpu_check.py)
    "qwen2.5-vl-7b": (vllm_bench.QWEN25_VL_7B_TEXT, vllm_bench.QWEN25_VL_7B_VISION),
    # small enough to run for real on one CPU core in seconds, big enough that its update adds hundreds of MB, so the
    # RSS measurement is not lost in the allocator's noise
    "cross-check": (dict(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
                    dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=512,
                         fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, tokens_per_second=2)),
}


def policy_config(shape: str, processor: models.VLProcessor):
    """The Qwen2.5-VL config of SHAPES[shape] whose special-token ids are the processor's."""
    from transformers import Qwen2_5_VLConfig
    text, vision = SHAPES[shape]
    return Qwen2_5_VLConfig(text_config=text | dict(eos_token_id=processor.eos_id, pad_token_id=processor.pad_id),
                            vision_config=vision, image_token_id=processor.image_pad_id,
                            video_token_id=processor.video_pad_id, vision_start_token_id=processor.vision_start_id,
                            vision_end_token_id=processor.vision_end_id, tie_word_embeddings=False)


def build_processor(cfg: train.TrainConfig) -> models.VLProcessor:
    """The project's processor with the preset's image bounds; the tiny checkpoints' tokenizer stands in for Qwen's:
    its ids all lie in the 7B vocabulary, and a 1,024-token BPE makes more tokens of the prompt's text (~530) than
    Qwen's does, which errs on the safe side."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    bounds = {"shortest_edge": cfg.min_pixels or 56 * 56, "longest_edge": max_pixels(cfg)}
    tokenizer = tiny.build_tokenizer(tiny.TINY_SIZES["test"].vocab_size, tiny.tokenizer_corpus(0))
    return models.VLProcessor(tokenizer, Qwen2VLImageProcessorPil(size=bounds))


# ---------------------------------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------------------------------

ACTION_TEXT = "<code>\n```python\nprint(image_clue_0.size)\n```\n</code>\n"   # what the response tokens repeat


def first_turn(processor: models.VLProcessor, image_path: Path) -> rollout.Trajectory:
    """The rollout's first user turn on one image (the project's prompt template and image processing)."""
    task = data.Task(id="memory-plan", question="How many red squares are in the image?", answer="0",
                     ability="counting", data_source="memory_plan", image_path=str(image_path))
    return rollout.start_trajectory(task, 0, 0, processor, rollout.RolloutConfig())


def trajectory(processor: models.VLProcessor, image_path: Path, total_tokens: int) -> rollout.Trajectory:
    """The first turn, then model tokens up to `total_tokens`."""
    traj = first_turn(processor, image_path)
    if total_tokens < traj.prompt_len:
        raise ValueError(f"a trajectory of {total_tokens} tokens is shorter than its prompt ({traj.prompt_len})")
    action = processor.encode_text(ACTION_TEXT)
    response = (action * (total_tokens // len(action) + 1))[:total_tokens - traj.prompt_len]
    traj.input_ids += response
    traj.action_mask += [1] * len(response)
    return traj


def max_pixels(cfg: train.TrainConfig) -> int:
    """The largest image the preset's processor takes (0 in a preset: the checkpoint's own, Qwen's default)."""
    return cfg.max_pixels or 14 * 14 * 4 * 1280


def square_image(path: Path, pixels: int) -> Path:
    """A plain square image of about `pixels` pixels (its content does not change what the update allocates)."""
    side = int(pixels ** 0.5)
    Image.new("RGB", (side, side), (200, 40, 40)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Fake tensors that keep integer values
# ---------------------------------------------------------------------------------------------------------------------

SMALL_FLOAT_VALUES = 1 << 16   # floating-point results up to this many elements keep their values (rotary tables)


def install_fake_value_propagation():
    """FakeTensorMode in which integer bookkeeping keeps its values, and the patches it needs.

    Qwen2.5-VL's forward reads values: it splits the image into attention windows from `image_grid_thw`, builds M-RoPE
    positions from the token ids, and train.update selects action positions from the action mask. Plain fake tensors
    have no values, so those ops would fail. Here an op whose tensor inputs all have values (real tensors, or fake ones
    that carry a `constant`) runs for real and its result keeps its value, unless it is a large floating-point tensor
    (then it is fake, like every activation). Ops that touch any valueless tensor run fake. A floating-point scalar read
    from a valueless tensor (a loss or a norm printed for logging) reads as 0.0."""
    from torch._subclasses.fake_impls import _is_tensor_constructor
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import _disable_current_modes

    def value_of(t: torch.Tensor) -> torch.Tensor | None:
        """The values a tensor carries: a real tensor's own, a fake one's constant; none for other subclasses (DTensor
        reaches here with its shards, which it dispatches itself)."""
        if isinstance(t, FakeTensor):
            return t.constant
        return t if type(t) in (torch.Tensor, torch.nn.Parameter) else None

    class ValuedFakeMode(FakeTensorMode):
        def __init__(self):
            super().__init__(allow_non_fake_inputs=True)

        def dispatch(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat, spec = pytree.tree_flatten((args, kwargs))
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            values = {id(t): value_of(t) for t in tensors}
            if tensors and all(v is not None for v in values.values()):
                real_args, real_kwargs = pytree.tree_unflatten(
                    [values[id(a)] if isinstance(a, torch.Tensor) else a for a in flat], spec)
                with _disable_current_modes():
                    out = func(*real_args, **real_kwargs)
                # an in-place op returns its input's value: hand back the fake tensor that carries it
                owner = {id(values[id(t)]): t for t in tensors if isinstance(t, FakeTensor)}
                return pytree.tree_map_only(torch.Tensor, lambda r: owner[id(r)] if id(r) in owner else self.fake_of(r),
                                            out)
            if func is torch.ops.aten._local_scalar_dense.default and tensors[0].dtype.is_floating_point:
                return 0.0
            out = super().dispatch(func, types, args, kwargs)
            if not tensors and _is_tensor_constructor(func) and not out.dtype.is_floating_point:
                with _disable_current_modes():   # arange, zeros, full of integers: index arithmetic
                    return self.fake_of(func(*args, **kwargs))
            return out

        def fake_of(self, real: torch.Tensor) -> FakeTensor:
            keep = not real.dtype.is_floating_point or real.numel() <= SMALL_FLOAT_VALUES
            with _disable_current_modes():
                return self.fake_tensor_converter.from_real_tensor(self, real, make_constant=keep)

    class ValuesIntoTorchTensor(TorchFunctionMode):
        """`torch.tensor([t0, t1])` of 0-d tensors copies their storage in C++, which a fake tensor has not: it is given
        their values instead (M-RoPE's rope deltas are built this way)."""
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.as_tensor):
                args = pytree.tree_map_only(FakeTensor, lambda t: t.constant if t.constant is not None else t, args)
            return func(*args, **(kwargs or {}))

    fake_tolist = FakeTensor.tolist
    # element by element, a fake tensor's tolist dispatches two ops per element (M-RoPE lists ~20,000 token types)
    FakeTensor.tolist = lambda self: self.constant.tolist() if self.constant is not None else fake_tolist(self)
    # transformers treats any fake tensor as a graph being traced and then builds a (1, 1, T, T) attention mask where
    # eager code passes none (is_causal=True, flash kernels); a mask that carries its values is not being traced
    import transformers.masking_utils as masking_utils
    traced = masking_utils.is_tracing
    masking_utils.is_tracing = lambda tensor=None: traced(
        None if isinstance(tensor, FakeTensor) and tensor.constant is not None else tensor)
    # DTensor computes output shapes on fake copies of its global tensors under the active fake mode; under ours the
    # tracker would count those global-shape tensors as allocations. A fake mode of their own keeps them out.
    import torch.distributed.tensor._sharding_prop as sharding_prop
    propagation_mode = FakeTensorMode()
    sharding_prop.detect_fake_mode = lambda *args, **kwargs: propagation_mode
    return ValuedFakeMode(), ValuesIntoTorchTensor


# ---------------------------------------------------------------------------------------------------------------------
# Probes: one measurement, in a process of its own
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Call:
    """One train.update() call: trajectories of these total lengths, each with one square image of `image_pixels`."""
    label: str
    lengths: list[int]
    image_pixels: int
    settings: dict = field(default_factory=dict)   # TrainConfig fields that differ from the preset's


@dataclass
class Probe:
    """One measurement: the preset's policy of SHAPE sharded over WORLD ranks, trained by one update() per call."""
    preset: str
    shape: str                  # a key of SHAPES
    world: int                  # ranks FSDP2 shards over
    fake: bool                  # fake tensors + FSDP2's memory tracker; else real tensors and this process's RSS
    calls: list[Call] = field(default_factory=list)   # the first is the warm-up that creates AdamW's state


def read_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def by_kind(snapshot: dict) -> dict[str, int]:
    """FSDP2 tracker snapshot of the one (CPU) device -> {kind name: bytes}."""
    (per_kind,) = snapshot.values()
    return {getattr(kind, "value", kind): size for kind, size in per_kind.items()}


def global_peak_tracker():
    """FSDP2's memory tracker keeping only the rank's peak. The stock one also updates a peak per FSDP module on every
    op (61 modules at 7B), a third of the run time, for figures this plan does not print."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class GlobalPeakTracker(FSDPMemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if snapshot["Total"] > self._peak_mem.get(device, 0):
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return GlobalPeakTracker


def run_probe(probe: Probe) -> list[dict]:
    import torch.distributed as dist
    cfg = train.TrainConfig(**train.PRESETS[probe.preset])
    processor = build_processor(cfg)
    with tempfile.TemporaryDirectory() as work:   # the trajectories hold their images once built
        calls = [(call, [trajectory(processor, square_image(Path(work) / f"{call.image_pixels}.png", call.image_pixels),
                                    n) for n in call.lengths]) for call in probe.calls]
    cpu = torch.device("cpu")
    config = policy_config(probe.shape, processor)
    from transformers import AutoModelForImageTextToText
    if probe.fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore
        tracker_class = global_peak_tracker()
        mode, values_into_tensor = install_fake_value_propagation()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=probe.world)
        with mode:
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # what train.setup does: float32 master weights, the vision tower frozen unless trained, then sharding, then AdamW
    if not cfg.train_vision:
        model.model.visual.requires_grad_(False)
    train_model = train.wrap_model(model, cfg, train.Dist(0, probe.world, 0, cpu))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, foreach=True)
    # update() sees one rank: its cross-rank exchanges are Python numbers (object gathers, which a fake process group
    # cannot carry); FSDP2's own collectives still run over `probe.world` ranks
    one_rank = train.Dist(0, 1, 0, cpu)
    results = []
    for call, trajs in calls:
        call_cfg = dataclasses.replace(cfg, **call.settings)
        t0 = time.perf_counter()
        if probe.fake:
            with mode, values_into_tensor():
                tracker = tracker_class(train_model, optimizer)
                with tracker:
                    # the tracker refuses a module's second forward unless its per-module figures are reset; the
                    # global peak is kept (update() runs one forward per micro-batch, more with mini_batches > 1)
                    reset = train_model.register_forward_pre_hook(lambda *args: tracker.reset_mod_stats(), prepend=True)
                    start = tracker.get_tracker_snapshot("current")
                    train.update(train_model, optimizer, trajs, [1.0] * len(trajs), call_cfg, processor, one_rank)
                    end = tracker.get_tracker_snapshot("current")
                    reset.remove()
                peak = tracker.get_tracker_snapshot("peak")
                result = dict(start=by_kind(start), peak=by_kind(peak), end=by_kind(end))
        else:
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM restarts from the current RSS
            start_rss = read_status("VmRSS")
            train.update(train_model, optimizer, trajs, [1.0] * len(trajs), call_cfg, processor, one_rank)
            result = dict(start_rss=start_rss, peak_rss=read_status("VmHWM"))
        results.append(result | dict(label=call.label, tokens=[len(t.input_ids) for t in trajs],
                                     prompt_tokens=trajs[0].prompt_len, seconds=round(time.perf_counter() - t0, 1)))
    dist.destroy_process_group()
    return results


def run_probes(probes: dict[str, Probe], jobs: int) -> dict[str, list[dict]]:
    """Each probe in a fresh process (one process group per process; a clean RSS high-water mark), `jobs` at a time
    in the order given. Their output goes to files: a full pipe would stop a chatty probe."""
    waiting, running, results = list(probes), {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    name = waiting.pop(0)
                    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                    if not probes[name].fake:   # large blocks mmap'ed: a freed tensor leaves the RSS at once, as it
                        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)   # leaves a GPU's allocated bytes
                    with open(work / f"{name}.out", "w") as out, open(work / f"{name}.err", "w") as err:
                        running[name] = subprocess.Popen(
                            [sys.executable, __file__, "--probe", json.dumps(dataclasses.asdict(probes[name]))],
                            env=env, stdout=out, stderr=err)
                for name, process in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[name]
                    out = (work / f"{name}.out").read_text().splitlines()
                    lines = [line for line in out if line.startswith(RESULT_TAG)]
                    if process.returncode != 0 or not lines:
                        raise RuntimeError(f"memory probe {name!r} failed (exit {process.returncode}):\n"
                                           f"{(work / f'{name}.err').read_text()[-3000:]}")
                    results[name] = json.loads(lines[-1][len(RESULT_TAG):])
                time.sleep(0.2)
        finally:   # one failed: the others' results would not be read
            for process in running.values():
                process.kill()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------

# the tracker's kinds of memory, grouped as the report names them
PARTS = [
    ("sharded params", "float32 master weights, 1/N each", ("Sharded Param",)),
    ("gathered params", "compute-dtype copies: the root (embeddings, LM head) and the block running",
     ("Unsharded Param", "All Gather")),
    ("grads", "sharded float32 gradients and reduce-scatter buffers",
     ("Sharded Grad", "Unsharded Grad", "Reduce Scatter")),
    ("optimizer state", "AdamW's two float32 moments, 1/N each", ("OptState",)),
    ("activations", "saved for backward, and recomputed blocks", ("Activation", "Inputs", "Buffer")),
    ("temporaries", "backward temporaries, the LM-head chunk's logits among them", ("Temp",)),
]
RESIDENT = ("Sharded Param", "Sharded Grad", "OptState")   # what --offload keeps on the host
WARM_UP = Call("warm-up", [1024], 56 * 56)   # a short trajectory on the smallest image: it creates AdamW's state


def on_device(snapshot: dict[str, int], offload: bool) -> dict[str, int]:
    """The kinds of memory a GPU holds: with --offload the sharded state is on the host."""
    return {k: (0 if offload and k in RESIDENT else v) for k, v in snapshot.items() if k != "Total"}


@dataclass
class MicroBatchPeak:
    label: str
    tokens: list[int]
    seconds: float
    parts: dict[str, float]     # GiB per PARTS entry, at the peak
    carried_grads: float        # GiB of earlier micro-batches' gradients resident at this one's peak

    @property
    def total(self) -> float:
        return sum(self.parts.values()) + self.carried_grads


def micro_batch_peak(result: dict, offload: bool, later_in_mini_batch: bool) -> MicroBatchPeak:
    peak = on_device(result["peak"], offload)
    parts = {name: sum(peak.get(kind, 0) for kind in kinds) / GIB for name, _, kinds in PARTS}
    # the sharded gradients a whole backward leaves (its end state), minus those already present at the peak
    carried = 0.0 if offload or not later_in_mini_batch else max(
        0, result["end"].get("Sharded Grad", 0) - result["peak"].get("Sharded Grad", 0)) / GIB
    return MicroBatchPeak(result["label"], result["tokens"], result["seconds"], parts, carried)


def pack_call(cfg: train.TrainConfig, longest: int, prompt_len: int) -> Call | None:
    """The largest micro-batch the preset forms besides the longest trajectory alone."""
    if cfg.micro_batch_tokens > 0:
        # as many trajectories as the packer takes that together fill the budget, none longer than the longest
        count = min(cfg.micro_batch, max(2, -(-cfg.micro_batch_tokens // longest)))
        member = min(cfg.micro_batch_tokens // count, longest)
        if count > 1 and member >= prompt_len:
            # update() deals trajectories round-robin over its mini-batches: one mini-batch keeps the pack together
            # (the no-grad pass for old log-probs that mini_batches > 1 adds peaks lower than the training pass)
            return Call(f"a full token-budget pack ({count} x {member})", [member] * count, max_pixels(cfg),
                        {"mini_batches": 1})
        return None
    if cfg.micro_batch > 1:   # no budget: MICRO_BATCH trajectories padded to the longest
        return Call(f"a padded micro-batch ({cfg.micro_batch} x {longest})", [longest] * cfg.micro_batch,
                    max_pixels(cfg), {"mini_batches": 1})
    return None


def logits_calls(cfg: train.TrainConfig) -> list[Call]:
    """The same short trajectory with LM-head chunks of LOGPROB_CHUNK and twice that: at these sizes the head's backward
    is where the peak lies, so the difference of the two peaks is one chunk's logits and their temporaries."""
    chunk = cfg.logprob_chunk
    length = 2 * chunk + 1024   # at least 2 x LOGPROB_CHUNK action positions after the ~550-token prompt
    return [Call("logits chunk", [length], 56 * 56, {"logprob_chunk": chunk}),
            Call("logits two chunks", [length], 56 * 56, {"logprob_chunk": 2 * chunk})]


def cross_check_calls(tokens: int) -> list[Call]:
    """A warm-up, then the same trajectory twice: with the preset's LM-head chunk and with a chunk of 256. At 4,096
    tokens the first peaks in the LM head's backward, the second in a recomputed block's backward, as at 7B."""
    return [WARM_UP, Call("the preset's LM-head chunk", [tokens], 448 * 448),
            Call("LM-head chunk 256", [tokens], 448 * 448, {"logprob_chunk": 256})]


def knob(cfg: train.TrainConfig, worst: MicroBatchPeak, rollout_gib: float, update_gib: float,
         logits_gib: float) -> str:
    """The knob that removes most of what sets the peak."""
    if rollout_gib >= update_gib:
        if not cfg.offload:
            return ("--offload (the trainer's resident state leaves the GPU during rollouts) or a lower "
                    "--vllm-gpu-memory")
        return "a lower --vllm-gpu-memory (vLLM's reservation sets the peak)"
    if not cfg.grad_checkpointing:
        return "--grad-checkpointing (only each block's input is kept for the backward)"
    parts = worst.parts
    states = parts["sharded params"] + parts["optimizer state"] + parts["grads"] + worst.carried_grads
    tokens = parts["activations"] + parts["temporaries"] - logits_gib
    tokens_knob = ("--micro-batch-tokens (a smaller pack; the longest trajectory still goes alone)"
                   if len(worst.tokens) > 1 else "--max-response-tokens (the longest trajectory alone is too long)")
    choices = {"--offload (shards, gradients and AdamW state to the host) or more GPUs": 0 if cfg.offload else states,
               "--logprob-chunk (smaller LM-head chunks)": logits_gib, tokens_knob: tokens}
    return max(choices, key=choices.get)


def report(cfg: train.TrainConfig, args, results: dict[str, list[dict]], seconds: float) -> list[str]:
    text, vision = SHAPES[args.shape]
    lines = [f"memory plan: preset {args.preset} on {args.gpus} x {args.hbm_gib:g} GiB, {args.shape} shapes ("
             f"{text['num_hidden_layers']} layers of width {text['hidden_size']}, vocabulary {text['vocab_size']}; "
             f"vision {vision['depth']} blocks of width {vision['hidden_size']})",
             f"  preset: dtype {cfg.dtype}, parallel {cfg.parallel}, grad_checkpointing {cfg.grad_checkpointing}, "
             f"micro_batch {cfg.micro_batch}, micro_batch_tokens {cfg.micro_batch_tokens}, logprob_chunk "
             f"{cfg.logprob_chunk}, mini_batches {cfg.mini_batches}, offload {cfg.offload}, vllm_gpu_memory "
             f"{cfg.vllm_gpu_memory}, max_response_tokens {cfg.max_response_tokens}, max_pixels {cfg.max_pixels}",
             f"  method: train.wrap_model + train.update under FakeTensorMode and FSDP2's memory tracker, world size "
             f"{args.gpus} (a fake process group), full depth; allocated bytes of one rank"]
    if "real" in results:
        for real, fake in zip(results["real"][1:], results["fake"][1:]):
            measured = (real["peak_rss"] - real["start_rss"]) / GIB
            predicted = (fake["peak"]["Total"] - fake["start"]["Total"]) / GIB
            ratio = predicted / measured
            verdict = "agrees" if abs(ratio - 1) <= args.tolerance else "DOES NOT AGREE"
            lines.append(f"  cross-check, {real['label']} ({real['tokens'][0]} tokens, cross-check shapes, real "
                         f"tensors on this CPU): method {predicted:.3f} GiB, measured RSS growth {measured:.3f} GiB, "
                         f"ratio {ratio:.3f} ({verdict} within {args.tolerance:.0%})")
    _, longest, logits_chunk, logits_two = results["longest"]   # after the warm-up
    peaks = [micro_batch_peak(longest, cfg.offload, later_in_mini_batch=False)]
    if "pack" in results:
        peaks.append(micro_batch_peak(results["pack"][1], cfg.offload, later_in_mini_batch=True))
    logits_gib = max(0, logits_two["peak"]["Total"] - logits_chunk["peak"]["Total"]) / GIB
    lines.append(f"  longest trajectory: {longest['tokens'][0]} tokens = prompt {longest['prompt_tokens']} (one image "
                 f"of {max_pixels(cfg)} pixels) + {cfg.max_response_tokens} response tokens, all of them actions")
    for peak in peaks:
        lines.append(f"  update peak per GPU, {peak.label} ({sum(peak.tokens)} padded tokens; measured in "
                     f"{peak.seconds:.0f} s):")
        for name, what, _ in PARTS:
            offloaded = cfg.offload and name in ("sharded params", "optimizer state")
            where = " -> on the host (--offload)" if offloaded else ""
            lines.append(f"    {name:<17} {peak.parts[name]:6.2f} GiB  {what}{where}")
        if peak.carried_grads:
            lines.append(f"    {'carried grads':<17} {peak.carried_grads:6.2f} GiB  the earlier micro-batches' "
                         "gradients (a later micro-batch of its mini-batch)")
        lines.append(f"    {'trainer':<17} {peak.total:6.2f} GiB")
    lines.append(f"  logits chunk: {logits_gib:.2f} GiB ({cfg.logprob_chunk} positions x {text['vocab_size']}: how "
                 "much the peak of a short trajectory rises when the chunk doubles; 0 when the LM head is not where "
                 "that peak lies)")
    worst = max(peaks, key=lambda p: p.total)
    update_gib = worst.total + args.vllm_asleep_gib + args.cuda_context_gib
    resident = on_device(longest["end"], cfg.offload)
    resident_gib = sum(resident.get(kind, 0) for kind in RESIDENT) / GIB
    vllm_gib = cfg.vllm_gpu_memory * args.hbm_gib
    rollout_gib = vllm_gib + resident_gib + args.cuda_context_gib
    lines += [f"  update:  trainer {worst.total:.2f} ({worst.label}) + vLLM asleep {args.vllm_asleep_gib:.2f} "
              f"(assumed) + CUDA context {args.cuda_context_gib:.2f} (assumed) = {update_gib:.2f} GiB",
              f"  rollout: vLLM share {cfg.vllm_gpu_memory} x {args.hbm_gib:g} = {vllm_gib:.2f} + trainer resident "
              f"{resident_gib:.2f} (sharded weights, the last step's gradients, AdamW state"
              f"{' on the host' if cfg.offload else ''}) + CUDA context {args.cuda_context_gib:.2f} = "
              f"{rollout_gib:.2f} GiB"]
    peak_gib = max(update_gib, rollout_gib)
    ratio = peak_gib / args.hbm_gib
    turn = knob(cfg, worst, rollout_gib, update_gib, logits_gib)
    fits = ratio <= 0.90
    lines.append(f"  {'fits' if fits else 'does not fit'} the goal (ratio <= 0.90); "
                 f"{'the first knob to turn if it does not' if fits else 'turn'}: {turn}")
    lines.append(f"  ({seconds:.0f} s on this CPU)")
    lines.append(f"{args.preset} on {args.gpus} x {args.hbm_gib:g} GiB: peak {peak_gib:.1f} GiB per GPU, "
                 f"ratio {ratio:.2f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper-image", choices=sorted(train.PRESETS),
                        help="train.py preset whose settings are planned (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the policy is sharded over (default: %(default)s)")
    parser.add_argument("--hbm-gib", type=float, default=80.0, help="memory of one GPU in GiB (default: %(default)s)")
    parser.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES),
                        help="policy architecture: the paper's 7B, or the small cross-check one (the whole script in "
                             "a minute) (default: %(default)s)")
    parser.add_argument("--vllm-asleep-gib", type=float, default=2.0,
                        help="what a sleeping vLLM keeps during the update: CUDA-graph pool, buffers (assumed; "
                             "default: %(default)s)")
    parser.add_argument("--cuda-context-gib", type=float, default=1.0,
                        help="CUDA context and NCCL buffers, outside PyTorch's allocator (assumed; "
                             "default: %(default)s)")
    parser.add_argument("--cross-check-tokens", type=int, default=4096,
                        help="length of the cross-check's trajectory; 0 skips the cross-check (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="agreement the cross-check requires between method and measurement (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="measurements run side by side, one core each "
                                                             "(default: %(default)s)")
    parser.add_argument("--probe", default="",
                        help="internal: run one measurement described by this JSON in this process and print its "
                             "figures (the report runs every measurement in a fresh process)")
    args = parser.parse_args(argv)
    if args.probe:
        spec = json.loads(args.probe)
        probe = Probe(**spec | {"calls": [Call(**c) for c in spec["calls"]]})
        print(RESULT_TAG + json.dumps(run_probe(probe)), flush=True)
        return
    t0 = time.perf_counter()
    cfg = train.TrainConfig(**train.PRESETS[args.preset])
    with tempfile.TemporaryDirectory() as work:
        image = square_image(Path(work) / "image.png", max_pixels(cfg))
        prompt_len = first_turn(build_processor(cfg), image).prompt_len
    longest = prompt_len + cfg.max_response_tokens
    longest_call = Call("the longest trajectory", [longest], max_pixels(cfg))
    probes = {"longest": Probe(args.preset, args.shape, args.gpus, True, [WARM_UP, longest_call, *logits_calls(cfg)])}
    if (pack := pack_call(cfg, longest, prompt_len)) is not None:
        probes["pack"] = Probe(args.preset, args.shape, args.gpus, True, [WARM_UP, pack])
    if args.cross_check_tokens:
        for name, fake in (("real", False), ("fake", True)):
            probes[name] = Probe(args.preset, "cross-check", 1, fake, cross_check_calls(args.cross_check_tokens))
    results = run_probes(probes, args.jobs)
    print("\n".join(report(cfg, args, results, time.perf_counter() - t0)))


if __name__ == "__main__":
    main()

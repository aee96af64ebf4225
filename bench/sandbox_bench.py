"""Sandbox speed: trajectory start, warm-call latency and many-trajectory throughput, each against a fresh interpreter.

The baseline is what a sandbox without templates pays per call: a fresh `python -c "import numpy, PIL, matplotlib"`
(measured here, in the same run). For reference, the issue quotes the official runtime (no isolation) at ~11 ms per
trajectory start (a forked worker inheriting the imports) and ~4 ms per trivial call, and ~500 ms for a fresh
interpreter on its machine.

    python bench/sandbox_bench.py                       # defaults: 64 trajectories x 4 calls
    python bench/sandbox_bench.py --trajectories 16 --calls 2 --samples 20   # quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sandbox  # noqa: E402

FRESH = [sys.executable, "-c", "import numpy, PIL, matplotlib"]
CROP_AND_SHOW = ("crop = image_clue_0.crop((100, 100, 356, 356))\n"
                 "plt.figure(figsize=(2.56, 2.56), dpi=100)\nplt.imshow(crop)\nplt.axis('off')\nplt.show()")


def percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(name: str, samples: list[float], baseline_p50: float) -> None:
    p50, p95 = percentiles(samples)
    print(f"  {name:<44} p50 {p50 * 1e3:8.2f} ms   p95 {p95 * 1e3:8.2f} ms   "
          f"fresh interpreter / this = {baseline_p50 / p50:7.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=64, help="concurrent trajectories in the throughput run")
    ap.add_argument("--calls", type=int, default=4, help="crop-and-show calls per trajectory in the throughput run")
    ap.add_argument("--samples", type=int, default=50, help="samples per latency figure (trivial calls: 10x this)")
    ap.add_argument("--baseline-samples", type=int, default=10, help="fresh interpreters timed one at a time")
    ap.add_argument("--spares", type=int, default=4, help="idle pre-forked workers the pool keeps")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))

    # -- baseline: a fresh interpreter per call ----------------------------------------------------------------------
    subprocess.run(FRESH, check=True)   # warm the page cache
    fresh = [timed(lambda: subprocess.run(FRESH, check=True)) for _ in range(args.baseline_samples)]
    fresh_p50, fresh_p95 = percentiles(fresh)
    n_fresh = 16 * cores
    with ThreadPoolExecutor(cores) as ex:   # the best a fresh-interpreter sandbox can do on this machine
        wall = timed(lambda: list(ex.map(lambda _: subprocess.run(FRESH, check=True), range(n_fresh))))
    fresh_throughput = n_fresh / wall

    with sandbox.SandboxPool(spares=args.spares, max_live=max(256, args.trajectories)) as pool:
        print(f"machine: {cores} CPU cores, Python {sys.version.split()[0]}; sandbox isolation: {pool.isolation}"
              f"{', own uid per worker' if pool.own_uids else ''}")
        print(f"baseline, fresh `python -c \"import numpy, PIL, matplotlib\"`: p50 {fresh_p50 * 1e3:.1f} ms, "
              f"p95 {fresh_p95 * 1e3:.1f} ms, {fresh_throughput:.1f} calls/s with {cores} at a time")

        # -- trajectory start: sandbox ready, imports done, the 640x480 image loaded as image_clue_0 -----------------
        with tempfile.TemporaryDirectory() as tmp:
            jpeg = os.path.join(tmp, "input.jpg")
            image.save(jpeg, quality=90)
            pool.open(images=[image]).close()   # first use
            starts, starts_path = [], []
            for _ in range(args.samples):
                time.sleep(0.05)   # a trajectory every 50 ms: the spares are refilled in between
                start = time.perf_counter()
                sb = pool.open(images=[image])
                starts.append(time.perf_counter() - start)
                sb.close()
            for _ in range(args.samples):
                time.sleep(0.05)
                start = time.perf_counter()
                sb = pool.open(images=[jpeg])
                starts_path.append(time.perf_counter() - start)
                sb.close()
        burst, boxes = [], []
        for _ in range(args.trajectories):   # a rollout batch starting at once: spares run out, workers fork on demand
            start = time.perf_counter()
            boxes.append(pool.open(images=[image]))
            burst.append(time.perf_counter() - start)

        # -- warm calls ----------------------------------------------------------------------------------------------
        sb = boxes[0]
        assert sb.run("x = 1").ok and len(sb.run(CROP_AND_SHOW).images) == 1
        trivial = [timed(lambda: sb.run("x = 1")) for _ in range(10 * args.samples)]
        crop = [timed(lambda: sb.run(CROP_AND_SHOW)) for _ in range(args.samples)]

        # -- throughput: every trajectory makes `calls` crop-and-show calls, one round at a time ---------------------
        start = time.perf_counter()
        for _ in range(args.calls):
            results = pool.run_many([(b, CROP_AND_SHOW) for b in boxes])
            assert all(r.ok and len(r.images) == 1 for r in results)
        throughput = args.trajectories * args.calls / (time.perf_counter() - start)
        for b in boxes:
            b.close()

    print("\ntrajectory start (sandbox ready, numpy/PIL/matplotlib imported, 640x480 image_clue_0 loaded):")
    row("PIL image input, one every 50 ms", starts, fresh_p50)
    row("JPEG path input, one every 50 ms", starts_path, fresh_p50)
    row(f"burst of {args.trajectories} opened back to back", burst, fresh_p50)
    print("warm run() latency (same trajectory):")
    row("trivial call `x = 1`", trivial, fresh_p50)
    row("crop 256x256 + imshow + plt.show() -> 1 PNG", crop, fresh_p50)
    print(f"throughput, {args.trajectories} concurrent trajectories x {args.calls} crop-and-show calls, "
          f"{cores} running at a time (the pool's default):")
    print(f"  {throughput:8.1f} calls/s   vs fresh interpreters {fresh_throughput:.1f} calls/s "
          f"= {throughput / fresh_throughput:.1f}x")


if __name__ == "__main__":
    main()

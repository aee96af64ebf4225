"""sandbox.py — the policy's only tool: a persistent Python interpreter per trajectory  (docs/method.md §3).

What this file is
    PyVision-RL (arXiv 2602.20739) gives the policy one tool, Python: each trajectory owns one interpreter whose
    variables, imports and functions persist across its turns, like a notebook, and what the code prints and the
    figures it shows come back as the next observation (rollout.py wraps them, docs/method.md §2.3). This file is the
    part a researcher reads and edits. Where the code runs and how it is fenced in is isolation.py's: a template
    process forks one isolated worker per trajectory (namespaces, rlimits, its own uid, pool budgets, cleanup), with
    a weaker fallback where namespaces are unavailable; its docstring says what is isolated and what is not.
    * The runtime (`_preload_runtime`, `_Runtime`): the code sees `image_clue_0..` (the input images as PIL RGB at
      original resolution), for video `video_clue_0` (a decord-compatible `video_reader.VideoReader`), and `np`,
      `plt` (Agg), `Image`, `io`, `base64` and `display`.
    * Figure capture (`_Capture`, `display`): `plt.show()` (also from functions defined in earlier calls),
      `fig.show()`, `Image.show()` and `display(x)` for PIL images, numpy arrays and figures return images. They are
      checked twice from their headers before decoding (child before encoding, parent before decoding): min side
      `min_image_side`, aspect ratio < `max_aspect_ratio` (Qwen's 200), at most `max_image_pixels` (downscaled
      beyond) and `max_images` per call; each drop or downscale adds a line to `notes`.
    * The limits (`SandboxConfig`), the result (`ExecResult`) and the interface rollout.py and eval.py use:

        with Sandbox(images=["cat.jpg"], timeout=30) as sb:          # or a PIL image; video="clip.mp4"
            r = sb.run("w, h = image_clue_0.size\\nprint(w, h)")     # ExecResult(status="ok", text="640 480\\n", ...)
        pool = SandboxPool(max_live=256, spares=8)                   # many trajectories, bounded processes
        sbs = [pool.open(images=[img]) for img in batch]
        results = pool.run_many([(sb, code) for sb, code in zip(sbs, codes)])   # results in input order

Statuses
    ok | error (exception; `error` holds the traceback trimmed to the user's cells) | exit (SystemExit, state kept) |
    oom (MemoryError, state kept) | cpu_limit (per-call CPU seconds, state kept) | timeout (the call ran `timeout`
    wall-clock seconds from being sent, not from queueing) | crashed (segfault, os._exit, a kill) | disk_limit (the
    directory held more than `disk_mb` after the call; its files are removed) | sandbox_error (infrastructure
    failure; mask the sample rather than penalise it). After timeout, crashed and disk_limit the interpreter is
    restarted with the same inputs and the result has `state_reset=True`. The text keeps a head and a tail of
    `max_output_chars` (stdout, stderr and what C code or subprocesses write) and says how much was dropped.

How to run
    python -m pytest -q tests/test_sandbox.py tests/test_isolation.py
    python bench/sandbox_bench.py          # start latency, warm-call latency, 64-trajectory throughput

Differences from the official runtime (docs/method.md §3, §11.4, §11.5)
    * Isolation, limits, bounded output, process-tree kill and restart on timeout: the official worker has none of
      these, keeps running timed-out code and returns stale results to later calls. Here a reply is matched to its
      request id, a timed-out worker is killed, and the result says that state was reset.
    * `plt.show` is patched as a function, not rewritten in the source text, so it works inside functions from earlier
      calls and inside strings it does not misfire; `fig.show()`, `Image.show()` and `display()` are captured too.
      It shows every open figure, as matplotlib's own `plt.show()` does (the official code saves only the current one).
    * stderr and warnings are captured with stdout; the text is not `.strip()`ped (the rollout decides).
    * No forbidden-call regex: it was trivially bypassed and blocked nothing the isolation does not block.
    * Errors carry the traceback trimmed to the user's cells (official: `str(e)` only).
"""
from __future__ import annotations

import builtins
import dataclasses
import io
import json
import linecache
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from isolation import (START_TIMEOUT_S, Confinement, CpuLimitExceeded, SandboxError, Slot, Worker, WorkerPool, clip,
                       collect_images, fit_pixels, image_problem, load_image, result_file, stage_images)

# Names every runtime starts with (besides image_clue_<i> and video_clue_0); the rollout's prompt can list them.
PRELOADED_NAMES = ("np", "plt", "Image", "io", "base64", "display")
STATUSES = ("ok", "error", "exit", "oom", "cpu_limit", "timeout", "crashed", "disk_limit", "sandbox_error")


def preamble_names(num_images: int, has_video: bool) -> list[str]:
    """The global names a fresh runtime defines for this many input images / a video."""
    video = ["video_clue_0"] if has_video else []
    return list(PRELOADED_NAMES) + [f"image_clue_{i}" for i in range(num_images)] + video


@dataclass(frozen=True)
class SandboxConfig:
    """Per-sandbox limits. Everything is enforced per call unless said otherwise."""
    timeout: float = 30.0            # wall-clock seconds per run(); past it the tree is killed and restarted
    memory_mb: int = 4096            # RLIMIT_AS of the interpreter (virtual memory, so leave room for library mappings)
    cpu_s: float | None = None       # CPU seconds per call (soft RLIMIT_CPU); None = timeout
    file_mb: int = 64                # RLIMIT_FSIZE: the largest file the code may write
    disk_mb: int = 1024              # the most the sandbox's directory may hold after a call, inputs included
    max_open_files: int = 256        # RLIMIT_NOFILE
    max_procs: int = 64              # RLIMIT_NPROC, processes + threads; enforced when workers get their own uid
    max_output_chars: int = 16000    # head + tail of the captured text kept per call
    max_images: int = 8              # images returned per call
    max_image_pixels: int = 2_000_000  # larger images are downscaled (PyVision-RL's runs use 2M max pixels)
    min_image_side: int = 28         # smaller images are dropped (one Qwen2.5-VL merged patch)
    max_aspect_ratio: float = 200.0  # images at or beyond this ratio are dropped (Qwen's smart_resize MAX_RATIO)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "cpu_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SandboxConfig.{f.name} must be a positive number, got {value!r}")
        if self.max_aspect_ratio <= 1:
            raise ValueError(f"SandboxConfig.max_aspect_ratio must be > 1, got {self.max_aspect_ratio!r}")


@dataclass
class ExecResult:
    """What one run() returns. `images` are PIL RGB images; `notes` explain drops, downscales and resets."""
    status: str
    text: str = ""
    images: list = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    state_reset: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------------------------
# The interface: Sandbox (one trajectory) and SandboxPool (many)
# ---------------------------------------------------------------------------------------------------------------------

def _check_inputs(images, video) -> tuple[list, str | None]:
    if images is None:
        images = []
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of PIL images or file paths, got {type(images).__name__}")
    checked = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            checked.append(item)
        elif isinstance(item, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(item))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"images[{i}]: no such file: {path}")
            checked.append(path)
        else:
            raise TypeError(f"images[{i}] must be a PIL image or a file path, got {type(item).__name__}")
    if video is not None:
        if not isinstance(video, (str, os.PathLike)):
            raise TypeError(f"video must be a file path, got {type(video).__name__}")
        video = os.path.abspath(os.fspath(video))
        if not os.path.isfile(video):
            raise FileNotFoundError(f"video: no such file: {video}")
    return checked, video


def _clean_text(value, limit: int) -> str:
    """Untrusted text from the child: a str, valid UTF-8 (no lone surrogates), bounded."""
    text = value if isinstance(value, str) else ""
    return clip(text, limit).encode("utf-8", "replace").decode("utf-8")


class Sandbox:
    """One trajectory's interpreter. State persists across run() calls until a timeout or crash resets it.

    Sandbox(images=[...], video=None, *, pool=None, timeout=30.0, memory_mb=4096, ...) — options are SandboxConfig
    fields and default to the pool's. Without `pool`, a process-wide default pool is used."""

    def __init__(self, images=(), video=None, *, pool: SandboxPool | None = None, **options):
        self._pool = pool if pool is not None else default_pool()
        self.config = dataclasses.replace(self._pool.defaults, **options)
        self._images, self._video = _check_inputs(images, video)
        self._lock = threading.Lock()
        self.startup_notes: list[str] = []
        # waits while max_live sandboxes are open; a sandbox collected unclosed gives its slot back on its own
        self._slot: Slot = self._pool._workers.open_slot(self, self.config.memory_mb, self.config.disk_mb)
        try:
            self._slot.start(self._init_worker)
        except BaseException:
            self._slot.close()
            raise

    def _init_worker(self, worker: Worker) -> None:
        """Load this trajectory's inputs into a fresh worker: at the start and after every restart."""
        specs = stage_images(self._images, worker.workdir)
        reply = worker.request({"op": "init", "images": specs, "video": self._video,
                                "config": dataclasses.asdict(self.config)}, START_TIMEOUT_S)
        if reply.get("status") != "ok":
            raise SandboxError(f"sandbox start failed: {_clean_text(reply.get('error'), 4000)}")
        self.startup_notes = [_clean_text(n, 1000) for n in reply.get("notes", []) if isinstance(n, str)]

    def run(self, code: str) -> ExecResult:
        """Execute `code` in this trajectory's interpreter. Never raises for anything the code does."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        with self._lock:
            if self._slot.closed:
                raise SandboxError("run() on a closed sandbox")
            with self._slot.call():   # waits for a max_running place and for room in the pool's budgets
                start = time.monotonic()
                result = self._run(code)
                result.duration_s = time.monotonic() - start
        return result

    def _run(self, code: str) -> ExecResult:
        if self._slot.worker is None:   # an earlier restart failed; try again
            try:
                self._slot.start(self._init_worker)
            except SandboxError as e:
                return ExecResult("sandbox_error", error=str(e), state_reset=True)
        try:
            reply = self._slot.worker.request({"op": "run", "code": code}, self.config.timeout)
            result = self._result(reply)
        except TimeoutError:
            return self._restart("timeout", f"TimeoutError: the call ran longer than {self.config.timeout:g} s "
                                            "and was killed with all its processes")
        except EOFError as e:
            return self._restart("crashed", str(e))
        stored_mb = self._slot.disk_used_mb()
        if stored_mb > self.config.disk_mb:
            return self._restart("disk_limit", f"the sandbox's directory held {stored_mb:.0f} MB after the call, "
                                               f"more than disk_mb={self.config.disk_mb}; its files were removed")
        return result

    def _result(self, reply: dict) -> ExecResult:
        status, names, notes = reply.get("status"), reply.get("images"), reply.get("notes")
        if status not in STATUSES or not isinstance(names, list) or not isinstance(notes, list):
            raise EOFError("the worker sent a malformed reply")
        images, image_notes = collect_images(self._slot.worker.workdir, names[:64], self.config)
        error = reply.get("error")
        return ExecResult(status=status, text=_clean_text(reply.get("text"), self.config.max_output_chars + 200),
                          images=images, error=None if error is None else _clean_text(error, 8000),
                          notes=[_clean_text(n, 1000) for n in notes[:64]] + image_notes)

    def _restart(self, status: str, reason: str) -> ExecResult:
        ended = self._slot.retire()
        error = f"{ended} ({reason})" if status == "crashed" else reason
        notes = ["the interpreter was restarted: variables, imports and functions from earlier calls are gone "
                 "(the preloaded names are back)"]
        try:
            self._slot.start(self._init_worker)
        except SandboxError as e:
            notes.append(f"restart failed, the next call will try again: {e}")
        return ExecResult(status, error=error, notes=notes, state_reset=True)

    def close(self) -> None:
        """Kill the interpreter and everything it started, and remove its directory. Idempotent."""
        with self._lock:
            self._slot.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SandboxPool:
    """A template process, idle spare workers, and bounds on live trajectories and concurrently running calls.

    max_live: open sandboxes at once; open() waits up to `open_wait_s` for one to close, then raises (a rollout that
    opens more trajectories than this without closing any would otherwise wait forever); spares: idle pre-forked
    workers kept ready; max_running: calls executing at once (default: CPU count), so the wall-clock timeout is not
    eaten by queueing; isolation: "auto" (namespaces if possible, else one warning and "basic"), "namespaces", "basic"
    (see isolation.py).

    memory_budget_mb / disk_budget_mb (default: half the machine's physical memory / half the free space where the
    pool directory lives; the other half is the trainer's) bound what the sandboxes may take together. They reduce
    concurrency, never the limits, and never block open(): a call waits, first come first served, until the
    memory_mb of every call running at once, its own included, fits the memory budget, and the disk_mb of every
    running call plus what the idle sandboxes' directories held after their last call fits the disk budget. One call
    always runs, so idle sandboxes holding more than the disk budget slow the pool down to one call at a time but do
    not stop it. Memory an idle interpreter keeps is not counted (the trainer cannot see it): if it fills the machine,
    the kernel's OOM killer takes a sandbox, not the trainer (see isolation.py). open() refuses a sandbox whose own
    limit exceeds a budget. Other keywords are SandboxConfig defaults for the pool's sandboxes."""

    def __init__(self, *, max_live: int = 256, spares: int = 2, max_running: int | None = None,
                 isolation: str = "auto", open_wait_s: float = 60.0, memory_budget_mb: int | None = None,
                 disk_budget_mb: int | None = None, **defaults):
        self.defaults = SandboxConfig(**defaults)
        self._workers = WorkerPool(_TEMPLATE_PROGRAM, max_live=max_live, spares=spares, max_running=max_running,
                                   isolation=isolation, open_wait_s=open_wait_s, memory_budget_mb=memory_budget_mb,
                                   disk_budget_mb=disk_budget_mb)
        self.isolation = self._workers.isolation   # "namespaces" or "basic"
        self.own_uids = self._workers.own_uids     # workers run under their own unprivileged uid

    @property
    def root(self) -> str:
        """The directory holding every worker's private directory; removed on close."""
        return self._workers.root

    @property
    def memory_budget_mb(self) -> int:
        return self._workers.memory_budget_mb

    @property
    def disk_budget_mb(self) -> int:
        return self._workers.disk_budget_mb

    def open(self, images=(), video=None, **options) -> Sandbox:
        """A new trajectory's sandbox (waits while max_live sandboxes are open)."""
        return Sandbox(images, video, pool=self, **options)

    def run_many(self, calls: Sequence[tuple[Sandbox, str]]) -> list[ExecResult]:
        """Run (sandbox, code) pairs concurrently; results come back in input order, each to its own call.
        Two calls for the same sandbox run one after the other, in an unspecified order."""
        calls = list(calls)
        for i, pair in enumerate(calls):
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], Sandbox)):
                raise TypeError(f"calls[{i}] must be a (Sandbox, code) pair")
        return self._workers.map(lambda pair: pair[0].run(pair[1]), calls)

    def close(self) -> None:
        """Kill every sandbox of this pool and remove its directory (pools also close at exit, see isolation.py)."""
        self._workers.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT_POOL: SandboxPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool used by Sandbox(...) without `pool=`; created on first use (and anew in a forked child,
    whose copies of the parent's pools are closed)."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None or _DEFAULT_POOL._workers.closed:
            _DEFAULT_POOL = SandboxPool()
        return _DEFAULT_POOL


# ---------------------------------------------------------------------------------------------------------------------
# The runtime: what runs in the template (preload) and in each worker (_Runtime), i.e. what the model's code sees
# ---------------------------------------------------------------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))
# The program the template process runs (isolation.WorkerPool starts it with `python -I -c`). Isolated mode puts no
# directory of ours on sys.path, so that the model's code cannot import the trainer's modules: this directory is added
# for the two imports and dropped again before any worker exists.
_TEMPLATE_PROGRAM = (f"import sys; sys.path.insert(0, {_HERE!r}); import isolation, sandbox; "
                     f"sys.path.remove({_HERE!r}); isolation.template_main(sandbox._preload_runtime, sandbox._Runtime)")
_RUNTIME: dict = {}   # modules the template preloads for every worker


def _preload_runtime() -> None:
    """In the template, once: import and warm up what every worker's code sees, and patch the show functions."""
    import base64
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt
    import numpy as np
    Image.preinit()   # register the common image plugins once, here, not in every worker
    fig = plt.figure(figsize=(2, 2))
    plt.plot([0, 1])
    fig.savefig(io.BytesIO(), format="png")   # load fonts and the Agg renderer once
    plt.close("all")
    plt.show = _show_all_figures
    matplotlib.figure.Figure.show = lambda self, *args, **kwargs: _CAPTURE.figure(self)
    Image.Image.show = lambda self, *args, **kwargs: _CAPTURE.image(self)
    _RUNTIME.update(np=np, plt=plt, Image=Image, io=io, base64=base64, Figure=matplotlib.figure.Figure)
    sys.path.insert(0, _HERE)
    try:
        import video_reader   # PyAV-backed decord-compatible reader, shared by every video trajectory
        _RUNTIME["video_reader"] = video_reader
    except Exception as e:   # a broken video_reader must not take image sandboxes down with it
        _RUNTIME["video_reader_error"] = f"{type(e).__name__}: {e}"
    finally:
        sys.path.remove(_HERE)


class _Capture:
    """Images emitted during the current call, written as PNGs into the worker's directory after the header checks."""

    def __init__(self):
        self.seq = 0
        self.cfg: dict = {}
        self.names: list[str] = []
        self.notes: list[str] = []

    def begin(self, cfg: dict) -> None:
        self.cfg, self.names, self.notes = cfg, [], []

    def _admit(self, w: int, h: int, what: str) -> bool:
        if len(self.names) >= self.cfg["max_images"]:
            self.notes.append(f"{what} dropped: more than {self.cfg['max_images']} images in one call")
            return False
        problem = image_problem(w, h, self.cfg["min_image_side"], self.cfg["max_aspect_ratio"])
        if problem:
            self.notes.append(f"{what} dropped: {problem}")
        return problem is None

    def _next_name(self) -> str:
        self.seq += 1
        self.names.append(result_file(self.seq))
        return self.names[-1]

    def figure(self, fig) -> None:
        w, h = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
        try:
            if self._admit(w, h, "figure"):
                w2, h2 = fit_pixels(w, h, self.cfg["max_image_pixels"])
                if (w2, h2) != (w, h):   # lower the dpi instead of rendering a huge canvas and shrinking it
                    self.notes.append(f"figure downscaled from {w}x{h} to about {w2}x{h2} px")
                fig.savefig(self._next_name(), format="png", dpi=fig.dpi * w2 / w, pil_kwargs={"compress_level": 1})
        finally:
            _RUNTIME["plt"].close(fig)

    def image(self, img: Image.Image) -> None:
        w, h = img.size
        if not self._admit(w, h, "image"):
            return
        w2, h2 = fit_pixels(w, h, self.cfg["max_image_pixels"])
        if (w2, h2) != (w, h):
            img = img.resize((w2, h2), Image.BILINEAR)
            self.notes.append(f"image downscaled from {w}x{h} to {w2}x{h2} px")
        img.convert("RGB").save(self._next_name(), format="PNG", compress_level=1)


_CAPTURE = _Capture()


def _show_all_figures(*args, **kwargs) -> None:
    """plt.show(): every open figure becomes a result image and is closed, as matplotlib's own show() would."""
    plt = _RUNTIME["plt"]
    for number in plt.get_fignums():
        _CAPTURE.figure(plt.figure(number))


def _array_to_image(a) -> Image.Image:
    np = _RUNTIME["np"]
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"display() takes an (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":   # floats are read as [0, 1], like plt.imshow
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def display(*objects) -> None:
    """Show PIL images, numpy arrays (H, W[, C]) and matplotlib figures as result images; print anything else."""
    for obj in objects:
        if isinstance(obj, Image.Image):
            _CAPTURE.image(obj)
        elif isinstance(obj, _RUNTIME["Figure"]):
            _CAPTURE.figure(obj)
        elif isinstance(obj, _RUNTIME["np"].ndarray):
            _CAPTURE.image(_array_to_image(obj))
        else:
            print(repr(obj))


def _format_exception(exc: BaseException) -> str:
    """The traceback with only the frames of the user's cells (also for chained exceptions)."""
    try:
        te = traceback.TracebackException.from_exception(exc)
        node, seen = te, set()
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            node.stack = traceback.StackSummary.from_list([f for f in node.stack if f.filename.startswith("<cell ")])
            node = node.__cause__ or node.__context__
        return clip("".join(te.format()).rstrip(), 8000)
    except BaseException:   # e.g. a MemoryError while formatting
        return f"{type(exc).__name__}: (the traceback could not be formatted)"


class _Runtime:
    """One worker's interpreter: answers the parent's init and run requests (isolation.py passes them in)."""

    def __init__(self, confinement: Confinement):
        self.confinement = confinement
        self.globals: dict = {}
        self.cfg: dict = {}
        self.cells = 0
        # While still an idle spare: take the copy-on-write page faults of a first request now, not on the clock.
        json.loads(json.dumps({"warm": [1.0, "x"]}))
        Image.frombytes("RGB", (64, 48), bytes(64 * 48 * 3)).crop((0, 0, 8, 8))
        exec(compile("x = sum(range(10))", "<warm-up>", "exec"), {"np": _RUNTIME["np"]})
        _RUNTIME["np"].zeros((8, 8)).sum()

    def __call__(self, req: dict) -> dict:
        return self.init(req) if req["op"] == "init" else self.run(req["code"])

    def init(self, req: dict) -> dict:
        notes = []
        try:
            self.cfg = req["config"]
            self.globals = {"__name__": "__main__", "__builtins__": builtins, "display": display}
            self.globals.update({name: _RUNTIME[name] for name in ("np", "plt", "Image", "io", "base64")})
            for i, spec in enumerate(req["images"]):
                self.globals[f"image_clue_{i}"] = load_image(spec)
            if req["video"] is not None:
                self.globals["video_clue_0"] = self._open_video(req["video"], notes)
            self.confinement.set_limits(self.cfg["memory_mb"], self.cfg["file_mb"], self.cfg["max_open_files"],
                                        self.cfg["max_procs"])
        except Exception as e:
            return {"status": "error", "error": f"{type(e).__name__}: {e}"}
        return {"status": "ok", "notes": notes}

    def _open_video(self, path: str, notes: list[str]):
        video_reader = _RUNTIME.get("video_reader")
        if video_reader is None:
            notes.append(f"video_reader is not importable ({_RUNTIME['video_reader_error']}); "
                         "video_clue_0 is the video's path")
            return path
        video_reader.install_decord_alias()   # `from decord import VideoReader, cpu` works, as in the official code
        return video_reader.VideoReader(path)

    def run(self, code: str) -> dict:
        self.cells += 1
        name = f"<cell {self.cells}>"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)   # source lines for later tracebacks
        out = self.confinement.capture_output(self.cfg["max_output_chars"])
        _CAPTURE.begin(self.cfg)
        status, error = "ok", None
        cpu_s = self.cfg["cpu_s"] or self.cfg["timeout"]
        sys.stdout = sys.stderr = out
        try:
            self.confinement.arm_cpu_limit(cpu_s)
            exec(compile(code, name, "exec"), self.globals)
        except SystemExit as e:
            status, error = "exit", f"SystemExit: {e.code}"
        except MemoryError as e:
            status, error = "oom", _format_exception(e)
        except CpuLimitExceeded:
            status, error = "cpu_limit", f"CPU time limit exceeded: the call used more than {cpu_s:g} s of CPU"
        except BaseException as e:   # KeyboardInterrupt, RecursionError, SyntaxError, ... are the user's errors
            status, error = "error", _format_exception(e)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            self.confinement.disarm_cpu_limit()
        return {"status": status, "text": self.confinement.collect_output(out), "error": error,
                "images": _CAPTURE.names, "notes": _CAPTURE.notes}

"""sandbox.py — the policy's only tool: a stateful Python interpreter for model-written code, isolated and bounded.

What this file is
    PyVision-RL's policy acts by writing Python (method.md §2.2-2.3, §3). Each trajectory owns one interpreter whose
    variables, imports and functions persist across its turns, like a notebook. `image_clue_0..` (the input images as
    PIL RGB at original resolution) and, for video, `video_clue_0` (a decord-compatible `video_context.VideoReader`)
    are preloaded together with `np`, `plt` (Agg), `Image`, `io`, `base64` and `display`. Figures come back as images
    when the code calls `plt.show()` (also from functions defined in earlier calls), `fig.show()`, `Image.show()` or
    `display(x)` for PIL images, numpy arrays and figures.

        with Sandbox(images=["cat.jpg"], timeout=30) as sb:          # or a PIL image; video="clip.mp4"
            r = sb.run("w, h = image_clue_0.size\\nprint(w, h)")     # ExecResult(status="ok", text="640 480\\n", ...)
        pool = SandboxPool(max_live=256, spares=8)                   # many trajectories, bounded processes
        sbs = [pool.open(images=[img]) for img in batch]
        results = pool.run_many([(sb, code) for sb, code in zip(sbs, codes)])   # results in input order

How it runs (one template process per pool, one process tree per trajectory)
    * A template ("zygote") process, `python -I sandbox.py --zygote ...`, imports numpy, PIL, matplotlib and
      video_context once, renders one warm-up figure, then forks a worker per trajectory on request; idle spares are
      kept forked so opening a trajectory costs a file write and one round trip, not an interpreter start.
    * Parent <-> template: a SOCK_SEQPACKET socket carrying JSON (spawn / kill) and, on spawn, the worker's end of a
      fresh socketpair (SCM_RIGHTS). Parent <-> worker: that socket, length-prefixed JSON frames with a request id;
      replies with another id are dropped. Images travel as PNG files in the worker's directory. Nothing is unpickled.
    * Timeout: the parent waits `timeout` wall-clock seconds from sending the call (not from queueing), then has the
      template kill the worker's whole tree, starts a fresh worker with the same inputs and returns status "timeout"
      with `state_reset=True`. A crash (segfault, os._exit, kill) is reported the same way with status "crashed".
    * Statuses: ok | error (exception; `error` holds the traceback trimmed to the user's cells) | exit (SystemExit,
      state kept) | oom (MemoryError, state kept) | cpu_limit (per-call CPU seconds, state kept) | timeout | crashed
      | disk_limit (the directory held more than `disk_mb` after the call; its files are removed) (the last three:
      state reset) | sandbox_error (infrastructure failure; mask the sample rather than penalise it).
    * Output: stdout/stderr keep a head and a tail of `max_output_chars` in the child and count what was dropped, so a
      print loop costs neither side memory. Output written to the file descriptors directly (C code, subprocesses)
      goes to a file in the worker's directory and is folded in, head and tail, after the call.
    * Images are checked twice from their headers before decoding (child before encoding, parent before decoding):
      min side `min_image_side`, aspect ratio < `max_aspect_ratio` (Qwen's 200), at most `max_image_pixels`
      (downscaled beyond) and `max_images` per call; each drop or downscale adds a line to `notes`.

What is isolated ("namespaces" mode: Linux user, PID, mount, network and IPC namespaces; used when the kernel allows)
    * Process tree: each worker is PID 1 of its own PID namespace, so killing it kills every descendant, including
      ones that called setsid() or double-forked. The parent, the template and other workers are invisible to it:
      it cannot signal them, and its /proc is a fresh mount that shows only its own namespace (the trainer's launch
      environment in /proc/<pid>/environ, API keys included, cannot be read).
    * Network: none. The template's network namespace has only a loopback device, which is down. (Workers of one pool
      share it, so two workers could talk over an abstract unix socket; they cannot reach anything else.)
    * Filesystem: every mount is read-only except the worker's private directory (cwd, HOME and TMPDIR), which is
      removed on close. The pool directory is covered, in each worker's own mount namespace, by an empty tmpfs that
      holds only that worker's directory: other trajectories' files can be neither listed nor opened. /dev holds only
      null, zero, full, random and urandom (no GPUs, no /dev/shm).
    * Privileges: the worker drops every capability, bounding set included, so it cannot undo the read-only view, mount,
      or raise a limit again. When the trainer runs as root (the usual GPU container) each worker also runs under its
      own unprivileged uid, so RLIMIT_NPROC (`max_procs`) stops fork bombs and it cannot write files it does not own.
      That worker keeps CAP_DAC_READ_SEARCH alone so the Python installation stays importable (e.g. /root/.pyenv): it
      can READ any file root can read in the host filesystem, except files of unmapped (non-root) owners and the
      other workers' directories (hidden, see above).
    * Limits: RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE (`file_mb`), RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_NPROC (see above),
      and a per-call CPU limit (soft RLIMIT_CPU -> SIGXCPU -> status "cpu_limit"; code could lift this soft limit, the
      wall-clock timeout is the hard bound). Environment: an allow-list (no trainer variables), BLAS threads = 1.
    Pool-wide (both modes): a memory and a disk budget bound what the calls running at once may take (the pool reduces
    concurrency to fit them, see SandboxPool), and every sandbox process has oom_score_adj 1000, so when memory runs
    out anyway the kernel kills a sandbox (status "crashed") and not the trainer. Under a root trainer 1000 is also the
    floor (the template sets it with CAP_SYS_RESOURCE); under another user code could lower it to the trainer's own.
    Not isolated in any mode: reads as described above (input videos are read in place), CPU and memory-bandwidth
    contention, disk written within one call beyond `disk_mb` (checked after the call; `file_mb` bounds each file) or
    between calls by a background process, and the kernel's syscall surface (no seccomp).
    Not returned: output written before a timeout or crash (it is lost with the process).

Fallback ("basic" mode, when namespaces are unavailable, e.g. Docker's default seccomp profile)
    One RuntimeWarning names the failure. Kept: allow-listed environment, own working directory, rlimits, pool
    budgets and OOM score, CUDA hidden via CUDA_VISIBLE_DEVICES="", PR_SET_NO_NEW_PRIVS, and under a root trainer the
    per-worker uid (so the code cannot signal or ptrace the trainer or read its /proc environ, fork bombs hit
    RLIMIT_NPROC). Each worker is a child subreaper; a timeout SIGSTOPs then SIGKILLs its whole tree found through
    /proc. Lost: network isolation, the read-only filesystem, the private /proc and /dev, the hidden pool directory
    (trajectories can list it and read each other's files: a root trainer's workers read through permission bits with
    CAP_DAC_READ_SEARCH, a non-root trainer's share its uid), and, for a non-root trainer, protection of the trainer's
    environment and processes (same uid). Force a mode with `SandboxPool(isolation="namespaces" | "basic")`.

Cleanup
    close() (and the context manager) kills the worker tree and removes its directory; a sandbox garbage collected
    unclosed is retired by its pool's background thread. Pools close at exit (atexit) and on SIGTERM/SIGINT where the
    signal's disposition is the default (it would kill the process without exit handlers): we clean up, then die of
    the same signal. Python's KeyboardInterrupt and custom handlers are left alone (exit runs atexit). If the trainer
    dies hard (SIGKILL), the template sees its control socket close, kills every worker and removes the pool
    directory. Forked children of the trainer (e.g. DataLoader workers) drop their copies of the sockets at fork, so
    they neither keep a pool alive after the trainer is gone nor kill its sandboxes at their exit.

How to run
    python -m pytest -q tests/test_sandbox.py
    python bench/sandbox_bench.py          # start latency, warm-call latency, 64-trajectory throughput

Differences from the official runtime (method.md §3)
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

import atexit
import builtins
import collections
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import io
import json
import linecache
import math
import os
import re
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

# Names every runtime starts with (besides image_clue_<i> and video_clue_0); the rollout's prompt can list them.
PRELOADED_NAMES = ("np", "plt", "Image", "io", "base64", "display")
STATUSES = ("ok", "error", "exit", "oom", "cpu_limit", "timeout", "crashed", "disk_limit", "sandbox_error")
OOM_SCORE_ADJ = 1000   # every sandbox process is the OOM killer's first choice (see _volunteer_for_the_oom_killer)


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


class SandboxError(RuntimeError):
    """The sandbox machinery itself failed (not the user's code)."""


# ---------------------------------------------------------------------------------------------------------------------
# Shared by both sides: framing, clipping, image checks
# ---------------------------------------------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct(">I")
_MAX_REPLY_BYTES = 16 << 20      # a reply is bounded text plus file names; anything bigger is a broken or hostile child
_MAX_REQUEST_BYTES = 256 << 20   # code of any reasonable size
_MAX_PNG_BYTES = 64 << 20
_DECODE_FACTOR = 4               # the parent decodes at most this many times max_image_pixels before downscaling
_OUT_NAME = re.compile(r"out_[0-9]{1,9}\.png")
_INIT_TIMEOUT_S = 120.0          # worker start and media loading, generous for a loaded 2-core machine
_CTRL_TIMEOUT_S = 120.0


def _send_frame(sock: socket.socket, obj: dict, deadline: float | None = None) -> None:
    data = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    sock.settimeout(None if deadline is None else max(deadline - time.monotonic(), 1e-3))
    sock.sendall(_FRAME_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, deadline: float | None, max_bytes: int):
    (n,) = _FRAME_HEADER.unpack(_recv_exact(sock, _FRAME_HEADER.size, deadline))
    if n > max_bytes:
        raise EOFError(f"frame of {n} bytes exceeds {max_bytes}")
    try:
        return json.loads(_recv_exact(sock, n, deadline))
    except (ValueError, RecursionError) as e:
        raise EOFError(f"malformed frame: {e}") from None


def _drop_marker(dropped: int) -> str:
    return f"\n... [{dropped} characters of output dropped] ...\n"


def _clip(text: str, limit: int) -> str:
    """Keep the head and the tail of `text`, saying how much of the middle went."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + _drop_marker(len(text) - 2 * half) + text[len(text) - half:]


def _image_problem(w: int, h: int, min_side: int, max_aspect: float) -> str | None:
    if min(w, h) < min_side:
        return f"{w}x{h} px is below the {min_side} px minimum side"
    if max(w, h) / min(w, h) >= max_aspect:
        return f"aspect ratio {max(w, h) / min(w, h):.0f} is not below {max_aspect:g}"
    return None


def _fit_pixels(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    if w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * scale)), max(1, int(h * scale))


# ---------------------------------------------------------------------------------------------------------------------
# Linux plumbing (ctypes): namespaces, mounts, prctl, capabilities
# ---------------------------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 8, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH = 47, 2, 2
# A bind remount must repeat the flags the kernel locked on the mount, or it fails with EPERM.
_STATVFS_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                  (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _remount_readonly(target: str) -> None:
    flags = os.statvfs(target).f_flag
    locked = sum(ms for st, ms in _STATVFS_TO_MS if flags & st)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked)


def _prctl(option: int, arg: int, arg3: int = 0) -> None:
    args = (ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
    _check(_libc.prctl(option, *args), "prctl")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_privileges(uid: int | None) -> None:
    """Give up every capability for good (bounding set too, so no exec regains one); with `uid`, also switch to that
    unprivileged uid, keeping only CAP_DAC_READ_SEARCH (ambient: exec'd children keep it) to read the Python install."""
    keep = CAP_DAC_READ_SEARCH if uid is not None else None
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        if cap != keep:
            _prctl(PR_CAPBSET_DROP, cap)
    if uid is not None:
        _prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    bits = (_CapData * 2)()
    if keep is not None:
        bits[0] = _CapData(1 << keep, 1 << keep, 1 << keep)
    _check(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), bits), "capset")   # _LINUX_CAPABILITY_VERSION_3
    if keep is not None:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, keep)


class _UidRange:
    """Unprivileged uids for workers, handed out round robin: a uid comes back only after `count` more workers, long
    after every process of its previous worker is dead. A block per trainer process, so processes rarely share one."""

    def __init__(self, count: int = 65536):
        self.base, self.count = 1_000_000_000 + (os.getpid() % 4096) * count, count
        self._counter = itertools.count()

    def take(self) -> int:
        return self.base + next(self._counter) % self.count


def _uid_range_if_root() -> _UidRange | None:
    """Workers get their own uid only when we are root and the uids exist in our own user namespace."""
    if os.geteuid() != 0:
        return None
    uids = _UidRange()
    with open("/proc/self/uid_map") as f:
        extents = [tuple(map(int, line.split())) for line in f]
    return uids if any(lo <= uids.base and uids.base + uids.count <= lo + n for lo, _, n in extents) else None


# ---------------------------------------------------------------------------------------------------------------------
# Parent side: template process, worker handles, Sandbox, SandboxPool
# ---------------------------------------------------------------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))
_UIDS = _uid_range_if_root()
_NAMESPACE_FAILURE: str | None = None   # why namespaces did not work in this process (asked once, warned once)


def _template_env(root: str) -> dict[str, str]:
    """The whole environment of the template and its workers: an allow-list, nothing from the trainer."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": root,
            "TMPDIR": root, "MPLBACKEND": "Agg", "MPLCONFIGDIR": os.path.join(root, ".matplotlib"),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}


def _ctrl_send(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(obj).encode()], list(fds))


def _ctrl_recv(sock: socket.socket, timeout: float | None) -> tuple[dict, list[int]]:
    sock.settimeout(timeout)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    if not data:
        raise EOFError("template process closed its socket")
    return json.loads(data), fds


def _write_id_maps(pid: int) -> None:
    """Map ids into the template's new user namespace: root (and, if we are root, the worker uid block)."""
    if _UIDS is not None:
        block = f"{_UIDS.base} {_UIDS.base} {_UIDS.count}\n"
        uid_map, gid_map = "0 0 1\n" + block, f"0 {os.getegid()} 1\n" + block
    else:   # an unprivileged writer may map only itself, and must give up setgroups first
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        uid_map, gid_map = f"0 {os.geteuid()} 1\n", f"0 {os.getegid()} 1\n"
    for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


class _Template:
    """Parent-side handle of the template process."""

    def __init__(self, root: str, mode: str):
        self.root, self.lock = root, threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "--zygote", str(theirs.fileno()), mode, root],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=_template_env(root), cwd=root,
                pass_fds=[theirs.fileno()], start_new_session=True)   # Ctrl-C in a terminal reaches only the trainer
        finally:
            theirs.close()
        self.sock = ours
        try:
            msg, _ = _ctrl_recv(ours, _INIT_TIMEOUT_S)
            if msg.get("op") == "map":   # the template has unshared its user namespace; only we can map its ids
                try:
                    _write_id_maps(self.proc.pid)
                    _ctrl_send(ours, {"ok": True})
                except OSError as e:
                    _ctrl_send(ours, {"ok": False, "error": f"writing uid/gid maps: {e}"})
                msg, _ = _ctrl_recv(ours, _INIT_TIMEOUT_S)
            if msg.get("error"):
                raise SandboxError(msg["error"])
            self.isolation = msg["isolation"]
        except (OSError, EOFError, ValueError) as e:
            self.close()
            raise SandboxError(f"template process failed to start ({mode}): {e}") from None
        except BaseException:
            self.close()
            raise

    def _call(self, msg: dict, fds: Sequence[int] = ()) -> dict:
        with self.lock:
            try:
                _ctrl_send(self.sock, msg, fds)
                return _ctrl_recv(self.sock, _CTRL_TIMEOUT_S)[0]
            except (OSError, EOFError, ValueError) as e:
                raise SandboxError(f"template process is gone or not answering: {e}") from None

    def spawn(self, channel: socket.socket, workdir: str, uid: int | None) -> int:
        reply = self._call({"op": "spawn", "workdir": workdir, "uid": uid}, [channel.fileno()])
        if "pid" not in reply:
            raise SandboxError(f"spawning a worker failed: {reply.get('error')}")
        return reply["pid"]

    def kill(self, pid: int) -> int | None:
        """Kill the worker's whole tree and reap it; returns its exit code (negative: signal), if known."""
        return self._call({"op": "kill", "pid": pid}).get("code")

    def close(self) -> None:
        """Closing the socket tells the template to kill everything and exit. Takes no lock: signal-handler safe."""
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    """Parent-side handle of one worker process (an idle spare or a trajectory's interpreter)."""

    def __init__(self, pid: int, sock: socket.socket, workdir: str, uid: int | None):
        self.pid, self.sock, self.workdir, self.uid = pid, sock, workdir, uid
        self.last_id = 0

    def request(self, msg: dict, timeout: float) -> dict:
        """Send one request and wait for the reply with its id. Raises TimeoutError or EOFError (worker gone)."""
        self.last_id += 1
        msg["id"] = self.last_id
        deadline = time.monotonic() + timeout
        try:
            _send_frame(self.sock, msg, deadline)
            while True:
                reply = _recv_frame(self.sock, deadline, _MAX_REPLY_BYTES)
                if isinstance(reply, dict) and reply.get("fatal"):
                    raise EOFError(f"worker failed to start: {reply['fatal']}")
                if isinstance(reply, dict) and reply.get("id") == self.last_id:
                    return reply
                # anything else is stale or forged: never attribute it to this call
        except (socket.timeout, TimeoutError):
            raise TimeoutError from None
        except (ConnectionError, OSError) as e:
            raise EOFError(str(e)) from None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the interpreter disappeared"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        extra = " (a limit, or the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"the interpreter was killed by {name}{extra}"
    return f"the interpreter exited with code {code}"


def _read_checked_png(path: str, cfg: SandboxConfig, label: str) -> tuple[Image.Image | None, str | None]:
    """Open a PNG the child wrote, judging it from its header before decoding anything."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)   # no symlinks into our files, no FIFOs
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_PNG_BYTES:
            return None, f"{label} dropped: not a regular file under {_MAX_PNG_BYTES >> 20} MiB"
        with Image.open(f, formats=["PNG"]) as im:
            w, h = im.size
            problem = _image_problem(w, h, cfg.min_image_side, cfg.max_aspect_ratio)
            if problem is None and w * h > _DECODE_FACTOR * cfg.max_image_pixels:
                problem = f"{w}x{h} px is too large to decode"
            if problem:
                return None, f"{label} dropped: {problem}"
            rgb = im.convert("RGB")
    w2, h2 = _fit_pixels(w, h, cfg.max_image_pixels)
    if (w2, h2) == (w, h):
        return rgb, None
    return rgb.resize((w2, h2), Image.BILINEAR), f"{label} downscaled from {w}x{h} to {w2}x{h2} px"


def _collect_images(worker: _Worker, names, cfg: SandboxConfig) -> tuple[list[Image.Image], list[str]]:
    images, notes = [], []
    for name in names:
        if not isinstance(name, str) or not _OUT_NAME.fullmatch(name):
            notes.append("an invalid image name from the sandbox was ignored")
            continue
        path = os.path.join(worker.workdir, name)
        label = f"image {len(images) + 1}"
        try:
            if len(images) >= cfg.max_images:
                notes.append(f"{label} dropped: more than {cfg.max_images} images in one call")
                continue
            image, note = _read_checked_png(path, cfg, label)
        except Image.DecompressionBombError:   # PIL's own header check, for sizes far beyond ours
            image, note = None, f"{label} dropped: too large to decode"
        except (OSError, ValueError, SyntaxError) as e:
            image, note = None, f"{label} dropped: unreadable ({type(e).__name__}: {e})"
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if image is not None:
            images.append(image)
        if note:
            notes.append(note)
    return images, notes


def _clean_text(value, limit: int) -> str:
    """Untrusted text from the child: a str, valid UTF-8 (no lone surrogates), bounded."""
    text = value if isinstance(value, str) else ""
    return _clip(text, limit).encode("utf-8", "replace").decode("utf-8")


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


def _stage_inputs(images: list, worker: _Worker) -> list[dict]:
    """Copy the input images into the worker's directory. PIL images go as raw RGB: no encode/decode per trajectory.
    (The video is read in place: videos are large, and the worker can read what root can, see the docstring.)"""
    specs = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            rgb = item if item.mode == "RGB" else item.convert("RGB")
            name = f"in_{i}.rgb"
            with open(os.path.join(worker.workdir, name), "wb") as f:
                f.write(rgb.tobytes())                               # (H*W*3,) uint8
                os.fchmod(f.fileno(), 0o644)
            specs.append({"raw": name, "size": list(rgb.size)})
        else:
            name = f"in_{i}{os.path.splitext(item)[1][:16]}"
            shutil.copyfile(item, os.path.join(worker.workdir, name))
            os.chmod(os.path.join(worker.workdir, name), 0o644)
            specs.append({"file": name})
    return specs


class Sandbox:
    """One trajectory's interpreter. State persists across run() calls until a timeout or crash resets it.

    Sandbox(images=[...], video=None, *, pool=None, timeout=30.0, memory_mb=4096, ...) — options are SandboxConfig
    fields and default to the pool's. Without `pool`, a process-wide default pool is used."""

    def __init__(self, images=(), video=None, *, pool: SandboxPool | None = None, **options):
        self._pool = pool if pool is not None else default_pool()
        self.config = dataclasses.replace(self._pool.defaults, **options)
        self._pool._budget.check(self.config)
        self._images, self._video = _check_inputs(images, video)
        self._lock = threading.Lock()
        self._closed = False
        self._holder: list[_Worker | None] = [None]   # shared with the finalizer, which must not hold self
        self.startup_notes: list[str] = []
        self._pool._admit()
        # Garbage collection may run a finalizer anywhere, even inside a lock: it only queues the worker for the
        # pool's background thread. close() releases synchronously.
        self._finalizer = weakref.finalize(self, self._pool._release_later, self._holder)
        try:
            self._holder[0] = self._start_worker()
        except BaseException:
            self._finalizer.detach()
            self._pool._release(self._holder)
            raise
        self._pool._track(self)

    def _start_worker(self) -> _Worker:
        worker = self._pool._take_spare()
        try:
            specs = _stage_inputs(self._images, worker)
            reply = worker.request({"op": "init", "images": specs, "video": self._video,
                                    "config": dataclasses.asdict(self.config)}, _INIT_TIMEOUT_S)
            if reply.get("status") != "ok":
                raise SandboxError(f"sandbox start failed: {_clean_text(reply.get('error'), 4000)}")
        except (TimeoutError, EOFError, OSError) as e:
            self._pool._retire(worker)
            raise SandboxError(f"sandbox start failed: {e}") from None
        except BaseException:
            self._pool._retire(worker)
            raise
        finally:
            self._pool._refill()
        self.startup_notes = [_clean_text(n, 1000) for n in reply.get("notes", []) if isinstance(n, str)]
        self._pool._budget.store(id(self._holder), _disk_used_mb(worker.workdir))   # the staged inputs
        return worker

    def run(self, code: str) -> ExecResult:
        """Execute `code` in this trajectory's interpreter. Never raises for anything the code does."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        with self._lock:
            if self._closed:
                raise SandboxError("run() on a closed sandbox")
            with self._pool._running, self._pool._budget.call(id(self._holder), self.config):
                start = time.monotonic()
                result = self._run(code)
                result.duration_s = time.monotonic() - start
        return result

    def _run(self, code: str) -> ExecResult:
        if self._holder[0] is None:   # an earlier restart failed; try again
            try:
                self._holder[0] = self._start_worker()
            except SandboxError as e:
                return ExecResult("sandbox_error", error=str(e), state_reset=True)
        worker = self._holder[0]
        try:
            reply = worker.request({"op": "run", "code": code}, self.config.timeout)
            result = self._result(reply, worker)
        except TimeoutError:
            return self._restart("timeout", f"TimeoutError: the call ran longer than {self.config.timeout:g} s "
                                            "and was killed with all its processes")
        except EOFError as e:
            return self._restart("crashed", str(e))
        stored_mb = _disk_used_mb(worker.workdir)
        if stored_mb > self.config.disk_mb:
            return self._restart("disk_limit", f"the sandbox's directory held {stored_mb:.0f} MB after the call, "
                                               f"more than disk_mb={self.config.disk_mb}; its files were removed")
        self._pool._budget.store(id(self._holder), stored_mb)
        return result

    def _result(self, reply: dict, worker: _Worker) -> ExecResult:
        status, names, notes = reply.get("status"), reply.get("images"), reply.get("notes")
        if status not in STATUSES or not isinstance(names, list) or not isinstance(notes, list):
            raise EOFError("the worker sent a malformed reply")
        images, image_notes = _collect_images(worker, names[:64], self.config)
        error = reply.get("error")
        return ExecResult(status=status, text=_clean_text(reply.get("text"), self.config.max_output_chars + 200),
                          images=images, error=None if error is None else _clean_text(error, 8000),
                          notes=[_clean_text(n, 1000) for n in notes[:64]] + image_notes)

    def _restart(self, status: str, reason: str) -> ExecResult:
        code = self._pool._retire(self._holder[0])
        self._holder[0] = None
        error = f"{_describe_exit(code)} ({reason})" if status == "crashed" else reason
        notes = ["the interpreter was restarted: variables, imports and functions from earlier calls are gone "
                 "(the preloaded names are back)"]
        try:
            self._holder[0] = self._start_worker()
        except SandboxError as e:
            notes.append(f"restart failed, the next call will try again: {e}")
        return ExecResult(status, error=error, notes=notes, state_reset=True)

    def close(self) -> None:
        """Kill the interpreter and everything it started, and remove its directory. Idempotent."""
        with self._lock:
            self._closed = True
            if self._finalizer.detach() is not None:
                self._pool._release(self._holder)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _half_of_physical_memory_mb() -> int:
    """Half the machine's RAM (a container's memory limit is not read: pass memory_budget_mb there)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2 >> 20


def _half_of_free_disk_mb(path: str) -> int:
    st = os.statvfs(path)
    return max(1, st.f_bavail * st.f_frsize // 2 >> 20)


def _disk_used_mb(path: str) -> float:
    """MB allocated under `path` (allocated blocks: a sparse file counts what it occupies), links not followed. A
    directory the trainer may not read counts as unbounded: files hidden from the count must not escape the limit."""
    total, todo = 0, [path]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):   # removed meanwhile by a background process
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(entry.path)
        except FileNotFoundError:
            continue
        except PermissionError:
            return math.inf
    return total / 2**20


class _Budget:
    """A pool's memory and disk budgets, in MB, and what its sandboxes hold of them (see SandboxPool).

    Sandboxes are keys (any hashable that lives as long as the sandbox). An idle sandbox holds the disk space its
    directory took after its last call (`store`); a running call holds its full memory_mb and disk_mb limits."""

    def __init__(self, memory_mb: int, disk_mb: int):
        self.memory_mb, self.disk_mb = memory_mb, disk_mb
        self._cond = threading.Condition()
        self._stored_mb: dict = {}                        # key -> MB its directory held after its last call
        self._running: dict = {}                          # key -> (memory_mb, disk_mb) of its running call
        self._queue: collections.deque = collections.deque()   # waiting calls, first come first served

    def check(self, cfg: SandboxConfig) -> None:
        for what, limit, budget in (("memory", cfg.memory_mb, self.memory_mb), ("disk", cfg.disk_mb, self.disk_mb)):
            if limit > budget:
                raise SandboxError(f"a sandbox with {what}_mb={limit} could never run in a pool whose "
                                   f"{what}_budget_mb is {budget}: lower the one or raise the other")

    def store(self, key, mb: float) -> None:
        with self._cond:
            self._stored_mb[key] = mb
            self._cond.notify_all()

    def forget(self, key) -> None:
        with self._cond:
            self._stored_mb.pop(key, None)
            self._cond.notify_all()

    def _fits(self, key, cfg: SandboxConfig) -> bool:
        if not self._running:
            return True
        memory = cfg.memory_mb + sum(m for m, _ in self._running.values())
        disk = cfg.disk_mb + sum(d for _, d in self._running.values()) + sum(
            mb for k, mb in self._stored_mb.items() if k != key and k not in self._running)
        return memory <= self.memory_mb and disk <= self.disk_mb

    @contextlib.contextmanager
    def call(self, key, cfg: SandboxConfig):
        """Hold the call's limits while it runs; wait for its turn and for room first."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket and self._fits(key, cfg))
            finally:   # also when the wait is interrupted: a stale ticket at the head would stop every later call
                self._queue.remove(ticket)
                self._cond.notify_all()   # the next in line may fit as well
            self._running[key] = (cfg.memory_mb, cfg.disk_mb)
        try:
            yield
        finally:
            with self._cond:
                del self._running[key]
                self._cond.notify_all()


class SandboxPool:
    """A template process, idle spare workers, and bounds on live trajectories and concurrently running calls.

    max_live: open sandboxes at once; open() waits up to `open_wait_s` for one to close, then raises (a rollout that
    opens more trajectories than this without closing any would otherwise wait forever); spares: idle pre-forked
    workers kept ready; max_running: calls executing at once (default: CPU count), so the wall-clock timeout is not
    eaten by queueing; isolation: "auto" (namespaces if possible, else one warning and "basic"), "namespaces", "basic".

    memory_budget_mb / disk_budget_mb (default: half the machine's physical memory / half the free space where the
    pool directory lives; the other half is the trainer's) bound what the sandboxes may take together. They reduce
    concurrency, never the limits, and never block open(): a call waits, first come first served, until the
    memory_mb of every call running at once, its own included, fits the memory budget, and the disk_mb of every
    running call plus what the idle sandboxes' directories held after their last call fits the disk budget. One call
    always runs, so idle sandboxes holding more than the disk budget slow the pool down to one call at a time but do
    not stop it. Memory an idle interpreter keeps is not counted (the trainer cannot see it): if it fills the machine,
    the kernel's OOM killer takes a sandbox, not the trainer (see the module docstring). open() refuses a sandbox whose
    own limit exceeds a budget. Other keywords are SandboxConfig defaults for the pool's sandboxes."""

    def __init__(self, *, max_live: int = 256, spares: int = 2, max_running: int | None = None,
                 isolation: str = "auto", open_wait_s: float = 60.0, memory_budget_mb: int | None = None,
                 disk_budget_mb: int | None = None, **defaults):
        global _NAMESPACE_FAILURE
        if isolation not in ("auto", "namespaces", "basic"):
            raise ValueError(f"isolation must be 'auto', 'namespaces' or 'basic', got {isolation!r}")
        max_running = max_running or os.cpu_count() or 1
        for name, value in (("max_live", max_live), ("max_running", max_running),
                            ("memory_budget_mb", memory_budget_mb), ("disk_budget_mb", disk_budget_mb)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(spares, int) or spares < 0:
            raise ValueError(f"spares must be a non-negative int, got {spares!r}")
        self.defaults = SandboxConfig(**defaults)
        self._n_spares, self._max_running = spares, max_running
        self._max_live, self._open_wait_s = max_live, open_wait_s
        mode = "basic" if isolation == "basic" or (isolation == "auto" and _NAMESPACE_FAILURE) else "namespaces"
        if mode == "namespaces":
            try:
                self._template = self._start_template("namespaces")
            except SandboxError as e:
                if isolation == "namespaces":
                    raise
                _NAMESPACE_FAILURE, mode = str(e), "basic"   # asked once per process, warned once
                warnings.warn(f"sandbox: Linux namespaces are unavailable ({e}); running with basic isolation: no "
                              "network isolation, writable host filesystem, shared /proc (see sandbox.py docstring)",
                              RuntimeWarning, stacklevel=2)
        if mode == "basic":
            self._template = self._start_template("basic")
        self.isolation = self._template.isolation
        self.own_uids = _UIDS is not None   # workers run under their own unprivileged uid
        self._budget = _Budget(_half_of_physical_memory_mb() if memory_budget_mb is None else memory_budget_mb,
                               _half_of_free_disk_mb(self.root) if disk_budget_mb is None else disk_budget_mb)
        self._live = threading.BoundedSemaphore(max_live)
        self._running = threading.BoundedSemaphore(max_running)
        self._cond = threading.Condition()
        self._spares: collections.deque[_Worker] = collections.deque()
        self._sandboxes: weakref.WeakSet[Sandbox] = weakref.WeakSet()
        self._graveyard: collections.deque[list] = collections.deque()   # holders of collected, unclosed sandboxes
        self._closed = False
        self._owner_pid = os.getpid()
        self._executor: ThreadPoolExecutor | None = None
        _register_pool(self)
        threading.Thread(target=self._maintain, name="sandbox-pool", daemon=True).start()

    @staticmethod
    def _start_template(mode: str) -> _Template:
        root = tempfile.mkdtemp(prefix="pyvision-sandbox-")
        # workers may pass through to their own directory but not list the others; that stops only a worker without
        # CAP_DAC_READ_SEARCH, so in namespaces mode each worker's view of this directory holds its own alone
        os.chmod(root, 0o711)
        try:
            return _Template(root, mode)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    @property
    def root(self) -> str:
        """The directory holding every worker's private directory; removed on close."""
        return self._template.root

    @property
    def memory_budget_mb(self) -> int:
        return self._budget.memory_mb

    @property
    def disk_budget_mb(self) -> int:
        return self._budget.disk_mb

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
        with self._cond:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_running, thread_name_prefix="sandbox-run")
        return list(self._executor.map(lambda pair: pair[0].run(pair[1]), calls))

    # -- workers -----------------------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        workdir = tempfile.mkdtemp(prefix="w-", dir=self.root)
        uid = _UIDS.take() if _UIDS is not None else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = self._template.spawn(theirs, workdir, uid)
        except BaseException:
            ours.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            theirs.close()
        return _Worker(pid, ours, workdir, uid)

    def _retire(self, worker: _Worker | None) -> int | None:
        """Kill a worker's tree and remove its directory; returns its exit code if known."""
        if worker is None:
            return None
        if os.getpid() != self._owner_pid:   # a forked child of the trainer: the worker belongs to the parent
            worker.sock.close()
            return None
        code = None
        try:
            if not self._closed:
                code = self._template.kill(worker.pid)
        except SandboxError:
            pass   # the template is gone, and with it every worker
        worker.sock.close()
        shutil.rmtree(worker.workdir, ignore_errors=True)
        return code

    def _take_spare(self) -> _Worker:
        with self._cond:
            worker = self._spares.popleft() if self._spares else None
        return worker or self._spawn()

    def _refill(self) -> None:
        """Wake the background thread; called once a trajectory has started, so its fork does not compete with it."""
        with self._cond:
            self._cond.notify_all()

    def _maintain(self) -> None:
        """Background thread: keep `spares` idle workers forked, and retire sandboxes collected without close()."""
        while True:
            with self._cond:
                while not self._closed and len(self._spares) >= self._n_spares and not self._graveyard:
                    self._cond.wait(timeout=1.0)
                if self._closed:
                    return
            while self._graveyard:
                self._release(self._graveyard.popleft())
            if len(self._spares) >= self._n_spares:
                continue
            try:
                worker = self._spawn()
            except SandboxError:
                return   # closed meanwhile, or the template died: open() will report it
            with self._cond:
                if self._closed:
                    worker.sock.close()
                    return
                self._spares.append(worker)

    def _admit(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        if not self._live.acquire(timeout=self._open_wait_s):
            raise SandboxError(f"{self._max_live} sandboxes (max_live) stayed open for {self._open_wait_s:g} s: "
                               "close() finished trajectories or raise max_live")

    def _track(self, sandbox: Sandbox) -> None:
        self._sandboxes.add(sandbox)

    def _release(self, holder: list) -> None:
        worker, holder[0] = holder[0], None
        self._retire(worker)
        self._budget.forget(id(holder))
        self._live.release()

    def _release_later(self, holder: list) -> None:
        self._graveyard.append(holder)   # deque.append takes no lock

    # -- shutdown ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every worker of this pool (the template does it when its socket closes) and remove the directory."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._shutdown()

    def _shutdown(self) -> None:
        # lock-free: this also runs from signal handlers and atexit, possibly while another thread holds a lock
        if os.getpid() != self._owner_pid:
            return self._forget()
        self._closed = True
        for sandbox in list(self._sandboxes):
            sandbox._closed = True
        self._template.close()
        for worker in list(self._spares):
            worker.sock.close()
        shutil.rmtree(self.root, ignore_errors=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _forget(self) -> None:
        """In a forked child of the trainer: drop our copies of the sockets without touching the processes."""
        self._closed = True
        self._template.sock.close()
        for worker in list(self._spares):
            worker.sock.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_POOLS: weakref.WeakSet[SandboxPool] = weakref.WeakSet()
_DEFAULT_POOL: SandboxPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()
_SIGNALS_HOOKED = False


def default_pool() -> SandboxPool:
    """The process-wide pool used by Sandbox(...) without `pool=`; created on first use."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None or _DEFAULT_POOL._closed:
            _DEFAULT_POOL = SandboxPool()
        return _DEFAULT_POOL


def _register_pool(pool: SandboxPool) -> None:
    global _SIGNALS_HOOKED
    _POOLS.add(pool)
    if not _SIGNALS_HOOKED and threading.current_thread() is threading.main_thread():
        _SIGNALS_HOOKED = True
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            # Only where the signal would end the process without running exit handlers: Python's own SIGINT
            # handler raises KeyboardInterrupt (atexit runs), and a custom handler decides for itself.
            if previous == signal.SIG_DFL:
                signal.signal(signum, _on_fatal_signal)


def _close_all_pools() -> None:
    for pool in list(_POOLS):
        pool._shutdown()


def _on_fatal_signal(signum, frame) -> None:
    _close_all_pools()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _forget_pools_in_child() -> None:
    global _DEFAULT_POOL
    for pool in list(_POOLS):
        pool._forget()
    _POOLS.clear()
    _DEFAULT_POOL = None


atexit.register(_close_all_pools)
os.register_at_fork(after_in_child=_forget_pools_in_child)


# ---------------------------------------------------------------------------------------------------------------------
# Child side: the template process
# ---------------------------------------------------------------------------------------------------------------------

_RUNTIME: dict = {}   # modules the template preloads for every worker


def _template_main(ctrl_fd: int, mode: str, root: str) -> None:
    ctrl = socket.socket(fileno=ctrl_fd)
    namespaces = mode == "namespaces"
    try:
        _volunteer_for_the_oom_killer()
        if namespaces and not _enter_namespaces(ctrl, root):
            return   # we were the launcher: the template has exited and the directory is removed
        if not namespaces:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)   # orphans of dead workers come to us, to be killed and reaped
        _preload_runtime()
    except Exception as e:
        _ctrl_send(ctrl, {"op": "hello", "error": f"{type(e).__name__}: {e}"})
        return
    gc.freeze()   # keep the preloaded heap out of the children's garbage collections (fewer copy-on-write pages)
    _ctrl_send(ctrl, {"op": "hello", "isolation": mode})
    workers: dict[int, int | None] = {}   # pid -> exit code once reaped
    while True:
        try:
            req, fds = _ctrl_recv(ctrl, None)
        except (OSError, EOFError):
            break   # the trainer closed the pool or died
        _reap(workers)
        if req["op"] == "spawn":
            try:
                pid = _spawn_worker(fds[0], req["workdir"], req["uid"], namespaces, root)
                workers[pid] = None
                reply = {"pid": pid}
            except OSError as e:
                reply = {"error": str(e)}
            finally:
                os.close(fds[0])
        else:
            reply = {"code": _kill_worker(req["pid"], workers, namespaces)}
        _ctrl_send(ctrl, reply)
    for pid in list(workers):
        _kill_worker(pid, workers, namespaces)
    if not namespaces:   # in namespaces mode the launcher, outside our read-only view, removes the directory
        shutil.rmtree(root, ignore_errors=True)


def _volunteer_for_the_oom_killer() -> None:
    """oom_score_adj = 1000 for the template and, inherited at fork, every worker: when memory runs out the kernel
    kills a sandbox (the largest first), not the trainer. Written before any namespace is entered, so a root trainer's
    CAP_SYS_RESOURCE also makes 1000 the floor: code in a worker cannot lower it again."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(OOM_SCORE_ADJ))


def _enter_namespaces(ctrl: socket.socket, root: str) -> bool:
    """Create user/PID/net/IPC namespaces; the trainer maps our ids. Returns False in the launcher (after the template
    exits) and True in the template, which is PID 1 of the new PID namespace with a read-only mount view."""
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
    _ctrl_send(ctrl, {"op": "map"})
    reply, _ = _ctrl_recv(ctrl, _INIT_TIMEOUT_S)
    if not reply.get("ok"):
        raise OSError(reply.get("error"))
    pid = os.fork()
    if pid:
        # The launcher stays in the host's mount view, so it can remove the directory once the template is gone,
        # even when the trainer died without cleaning up.
        ctrl.close()
        os.waitpid(pid, 0)
        shutil.rmtree(root, ignore_errors=True)
        return False
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # the launcher is killed -> we die -> the whole namespace dies
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)   # nothing we mount propagates back to the host
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = os.path.join(root, ".dev")   # a minimal /dev: no GPUs, no /dev/shm
    os.mkdir(dev)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(os.path.join(dev, name), "w").close()
        _mount(f"/dev/{name}", os.path.join(dev, name), None, MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", os.path.join(dev, name))
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    _mount(dev, "/dev", None, MS_MOVE)
    _mount(root, root, None, MS_BIND | MS_REC)   # the pool directory stays writable (workers narrow it further)
    seen = {root}
    with open("/proc/self/mountinfo") as f:
        targets = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]
    for target in targets:
        if target in seen or target.startswith(root + "/"):
            continue
        seen.add(target)
        try:
            _remount_readonly(target)
        except FileNotFoundError:
            pass   # hidden under a later mount (e.g. the host's /dev/shm under our /dev)
    return True


def _preload_runtime() -> None:
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
        import video_context   # PyAV-backed decord-compatible reader, shared by every video trajectory
        _RUNTIME["video_context"] = video_context
    except Exception as e:   # a broken video_context must not take image sandboxes down with it
        _RUNTIME["video_context_error"] = f"{type(e).__name__}: {e}"
    finally:
        sys.path.remove(_HERE)


def _reap(workers: dict[int, int | None]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in workers:
            workers[pid] = os.waitstatus_to_exitcode(status)


def _spawn_worker(chan_fd: int, workdir: str, uid: int | None, namespaces: bool, root: str) -> int:
    template_pid = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            inner = 0
            if namespaces:
                # A middle process makes the worker PID 1 of its own namespace (unshare(CLONE_NEWPID) only applies to
                # children, and only once per process), then exits; the worker is re-parented to the template.
                _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC), "unshare")
                inner = os.fork()
            if inner == 0:
                _worker_main(chan_fd, workdir, uid, namespaces, root, template_pid)
            os.write(w, str(inner).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        reported = f.read()
    if namespaces:
        os.waitpid(pid, 0)
        if not reported:
            raise OSError("the worker could not be created")
        pid = int(reported)
    return pid


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":   # fields: state, ppid, ...
                children[int(fields[1])].append(int(entry))
    return children


def _kill_tree(pid: int) -> None:
    """Basic mode: freeze the tree with SIGSTOP until it stops growing, then SIGKILL all of it."""
    stopped: set[int] = set()
    for _ in range(1000):
        children, tree, todo = _proc_children(), {pid}, [pid]
        while todo:
            for child in children.get(todo.pop(), ()):
                tree.add(child)
                todo.append(child)
        new = tree - stopped
        if not new:
            break
        for p in new:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def _kill_worker(pid: int, workers: dict[int, int | None], namespaces: bool) -> int | None:
    if pid not in workers:
        return None
    if workers[pid] is None:
        if namespaces:
            os.kill(pid, signal.SIGKILL)   # PID 1 of its namespace: the kernel kills every process inside
        else:
            _kill_tree(pid)
        try:
            _, status = os.waitpid(pid, 0)
            workers[pid] = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
    if not namespaces:   # orphans of workers that died earlier were re-parented to us: kill those trees too
        for orphan in _proc_children().get(os.getpid(), []):
            if orphan not in workers:
                _kill_tree(orphan)
        _reap(workers)
    return workers.pop(pid)


# ---------------------------------------------------------------------------------------------------------------------
# Child side: the worker (one trajectory's interpreter)
# ---------------------------------------------------------------------------------------------------------------------

def _show_only_own_directory(root: str, workdir: str) -> None:
    """Cover the pool directory, in this worker's mount namespace, with an empty read-only tmpfs that holds only our
    own directory, bind-mounted back. No path and no listing reaches another worker's files, whatever our uid or
    capabilities (a root trainer's workers keep CAP_DAC_READ_SEARCH, which would read through any permission bits)."""
    own = os.open(workdir, os.O_PATH | os.O_DIRECTORY)   # still reachable through this descriptor once covered
    try:
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=711,size=16k")
        os.mkdir(workdir)
        _mount(f"/proc/self/fd/{own}", workdir, None, MS_BIND)
    finally:
        os.close(own)
    _remount_readonly(root)


class _CpuLimitExceeded(BaseException):
    """Raised by SIGXCPU; a BaseException so user code's `except Exception` does not swallow it."""


def _on_sigxcpu(signum, frame):
    raise _CpuLimitExceeded


def _worker_main(chan_fd: int, workdir: str, uid: int | None, namespaces: bool, root: str, template_pid: int) -> None:
    chan = None
    try:
        os.closerange(3, chan_fd)   # the template's control socket must not reach user code
        os.closerange(chan_fd + 1, os.sysconf("SC_OPEN_MAX"))
        chan = socket.socket(fileno=chan_fd)
        if namespaces:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)   # shows only this worker's namespace
            _show_only_own_directory(root, workdir)
        if uid is not None:
            os.chown(workdir, uid, uid)
        if namespaces or uid is not None:   # otherwise there is nothing to drop
            _drop_privileges(uid)
        if not namespaces:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # after the uid switch, which clears it
            if os.getppid() != template_pid:
                return
            _prctl(PR_SET_CHILD_SUBREAPER, 1)   # our descendants' orphans stay in our tree, so the tree kill finds them
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(workdir)
        os.umask(0o077)
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        tempfile.tempdir = None
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        output_fd = os.open(".output", os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXCPU, _on_sigxcpu)
        runtime = _Runtime(chan, output_fd, own_uid=uid is not None)
        runtime.warm_up()
        runtime.serve()
    except BaseException as e:
        if chan is not None:
            with contextlib.suppress(OSError):
                _send_frame(chan, {"id": 0, "fatal": f"{type(e).__name__}: {e}"})
    finally:
        os._exit(0)


class _BoundedText(io.TextIOBase):
    """sys.stdout/sys.stderr for one call: keeps the first and last `limit // 2` characters, counts the rest."""

    def __init__(self, limit: int):
        self.head_cap, self.tail_cap = limit // 2, limit - limit // 2
        self.head: list[str] = []
        self.head_len = 0
        self.tail: collections.deque[str] = collections.deque()
        self.tail_len = self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        if self.head_len < self.head_cap:
            take = s[: self.head_cap - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            s = s[len(take):]
        if s:
            self.tail.append(s)
            self.tail_len += len(s)
            while self.tail_len - len(self.tail[0]) >= self.tail_cap:   # whole chunks that are surely dropped
                chunk = self.tail.popleft()
                self.tail_len -= len(chunk)
                self.dropped += len(chunk)
        return n

    def skip(self, n: int) -> None:
        """Count `n` characters that were never read (the middle of the fd-level output) as dropped here."""
        self.head_len = self.head_cap
        self.dropped += n

    def getvalue(self) -> str:
        tail = "".join(self.tail)
        extra = max(len(tail) - self.tail_cap, 0)
        dropped = self.dropped + extra
        head = "".join(self.head)
        return head + (_drop_marker(dropped) if dropped else "") + tail[extra:]


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
        problem = _image_problem(w, h, self.cfg["min_image_side"], self.cfg["max_aspect_ratio"])
        if problem:
            self.notes.append(f"{what} dropped: {problem}")
        return problem is None

    def _next_name(self) -> str:
        self.seq += 1
        self.names.append(f"out_{self.seq}.png")
        return self.names[-1]

    def figure(self, fig) -> None:
        w, h = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
        try:
            if self._admit(w, h, "figure"):
                w2, h2 = _fit_pixels(w, h, self.cfg["max_image_pixels"])
                if (w2, h2) != (w, h):   # lower the dpi instead of rendering a huge canvas and shrinking it
                    self.notes.append(f"figure downscaled from {w}x{h} to about {w2}x{h2} px")
                fig.savefig(self._next_name(), format="png", dpi=fig.dpi * w2 / w, pil_kwargs={"compress_level": 1})
        finally:
            _RUNTIME["plt"].close(fig)

    def image(self, img: Image.Image) -> None:
        w, h = img.size
        if not self._admit(w, h, "image"):
            return
        w2, h2 = _fit_pixels(w, h, self.cfg["max_image_pixels"])
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
        return _clip("".join(te.format()).rstrip(), 8000)
    except BaseException:   # e.g. a MemoryError while formatting
        return f"{type(exc).__name__}: (the traceback could not be formatted)"


class _Runtime:
    """Serves init and run requests on the worker's socket."""

    def __init__(self, chan: socket.socket, output_fd: int, own_uid: bool):
        self.chan, self.output_fd, self.own_uid = chan, output_fd, own_uid
        self.globals: dict = {}
        self.cfg: dict = {}
        self.cells = 0

    def warm_up(self) -> None:
        """While still an idle spare: take the copy-on-write page faults of a first request now, not on the clock."""
        json.loads(json.dumps({"warm": [1.0, "x"]}))
        Image.frombytes("RGB", (64, 48), bytes(64 * 48 * 3)).crop((0, 0, 8, 8))
        exec(compile("x = sum(range(10))", "<warm-up>", "exec"), {"np": _RUNTIME["np"]})
        _RUNTIME["np"].zeros((8, 8)).sum()

    def serve(self) -> None:
        while True:
            try:
                req = _recv_frame(self.chan, None, _MAX_REQUEST_BYTES)
            except EOFError:
                return
            if req["op"] == "init":
                reply = self.init(req)
            else:
                reply = self.run(req["code"])
            reply["id"] = req["id"]
            _send_frame(self.chan, reply)

    def init(self, req: dict) -> dict:
        notes = []
        try:
            self.cfg = req["config"]
            self.globals = {"__name__": "__main__", "__builtins__": builtins, "display": display}
            self.globals.update({name: _RUNTIME[name] for name in ("np", "plt", "Image", "io", "base64")})
            for i, spec in enumerate(req["images"]):
                if "raw" in spec:
                    with open(spec["raw"], "rb") as f:
                        image = Image.frombytes("RGB", tuple(spec["size"]), f.read())
                else:
                    with Image.open(spec["file"]) as f:
                        image = f.convert("RGB")
                self.globals[f"image_clue_{i}"] = image
            if req["video"] is not None:
                self.globals["video_clue_0"] = self._open_video(req["video"], notes)
            self._set_limits()
        except Exception as e:
            return {"status": "error", "error": f"{type(e).__name__}: {e}"}
        return {"status": "ok", "notes": notes}

    def _open_video(self, path: str, notes: list[str]):
        video_context = _RUNTIME.get("video_context")
        if video_context is None:
            notes.append(f"video_context is not importable ({_RUNTIME['video_context_error']}); "
                         "video_clue_0 is the video's path")
            return path
        video_context.install_decord_alias()   # `from decord import VideoReader, cpu` works, as in the official code
        return video_context.VideoReader(path)

    def _set_limits(self) -> None:
        limits = [(resource.RLIMIT_AS, self.cfg["memory_mb"] << 20), (resource.RLIMIT_FSIZE, self.cfg["file_mb"] << 20),
                  (resource.RLIMIT_NOFILE, self.cfg["max_open_files"])]
        if self.own_uid:   # RLIMIT_NPROC counts every process of the uid: meaningful only for a uid of our own
            limits.append((resource.RLIMIT_NPROC, self.cfg["max_procs"]))
        for which, value in limits:
            _, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)   # soft <= hard, or setrlimit fails
            resource.setrlimit(which, (value, value))   # hard = soft: the code cannot raise it again

    def _arm_cpu_limit(self) -> float:
        cpu_s = self.cfg["cpu_s"] or self.cfg["timeout"]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = math.ceil(usage.ru_utime + usage.ru_stime + cpu_s)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        return cpu_s

    def run(self, code: str) -> dict:
        self.cells += 1
        name = f"<cell {self.cells}>"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)   # source lines for later tracebacks
        out = _BoundedText(self.cfg["max_output_chars"])
        _CAPTURE.begin(self.cfg)
        status, error = "ok", None
        sys.stdout = sys.stderr = out
        try:
            cpu_s = self._arm_cpu_limit()
            exec(compile(code, name, "exec"), self.globals)
        except SystemExit as e:
            status, error = "exit", f"SystemExit: {e.code}"
        except MemoryError as e:
            status, error = "oom", _format_exception(e)
        except _CpuLimitExceeded:
            status, error = "cpu_limit", f"CPU time limit exceeded: the call used more than {cpu_s:g} s of CPU"
        except BaseException as e:   # KeyboardInterrupt, RecursionError, SyntaxError, ... are the user's errors
            status, error = "error", _format_exception(e)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))   # no SIGXCPU between calls
        self._drain_fd_output(out)
        return {"status": status, "text": out.getvalue(), "error": error, "images": _CAPTURE.names,
                "notes": _CAPTURE.notes}

    def _drain_fd_output(self, out: _BoundedText) -> None:
        """Fold what was written to fds 1/2 directly (C code, subprocesses) into the text, head and tail."""
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(OSError):
                stream.flush()
        size = os.fstat(self.output_fd).st_size
        if not size:
            return
        keep = self.cfg["max_output_chars"] // 2
        if size <= 2 * keep:
            out.write(os.pread(self.output_fd, size, 0).decode("utf-8", "replace"))
        else:
            out.write(os.pread(self.output_fd, keep, 0).decode("utf-8", "replace"))
            out.skip(size - 2 * keep)   # bytes, counted as characters: exact for ASCII
            out.write(os.pread(self.output_fd, keep, size - keep).decode("utf-8", "replace"))
        os.ftruncate(self.output_fd, 0)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--zygote":
        _template_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)

"""isolation.py — where sandbox.py's interpreters run: isolated worker processes, their limits and their wire.

What this file is
    The machinery under the Python tool. sandbox.py decides what the model's code sees and what comes back; this file
    runs that code where it can do no harm and bounds what it may take. sandbox.py passes in what it needs: the
    program the template runs (which calls `template_main` with sandbox.py's preload and per-worker request handler)
    and each sandbox's limits; this file imports nothing of the project's. Images cross the boundary as files in the
    worker's directory (`stage_images`/`load_image` in, `collect_images` out), judged by `image_problem` and
    `fit_pixels` on both sides: the parent trusts nothing the child wrote.

How it runs (one template process per pool, one process tree per trajectory)
    * A template ("zygote") process, `python -I -c PROGRAM FD MODE ROOT` with sandbox.py's program, imports the
      runtime once (`preload`: numpy, PIL, matplotlib, video_reader, one warm-up figure), then forks a worker per
      trajectory on request; idle spares are kept forked so opening a trajectory costs a file write and one round
      trip, not an interpreter start.
    * Parent <-> template: a SOCK_SEQPACKET socket carrying JSON (spawn / kill) and, on spawn, the worker's end of a
      fresh socketpair (SCM_RIGHTS). Parent <-> worker: that socket, length-prefixed JSON frames with a request id;
      replies with another id are dropped. Nothing is unpickled.
    * A request that outlives its deadline raises TimeoutError, a worker that dies or sends garbage EOFError; the
      caller then retires the worker (the template kills its whole tree) and starts a fresh one (`Slot`).
    * Output: the worker's fds 1 and 2 go to a file in its directory; `Confinement.capture_output` keeps a head and a
      tail of Python-level output and counts what was dropped, so a print loop costs neither side memory, and
      `collect_output` folds in, head and tail, what C code and subprocesses wrote to the file descriptors.

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
      and a per-call CPU limit (soft RLIMIT_CPU -> SIGXCPU -> CpuLimitExceeded; code could lift this soft limit, the
      wall-clock timeout is the hard bound). Environment: an allow-list (no trainer variables), BLAS threads = 1.
    Pool-wide (both modes): a memory and a disk budget bound what the calls running at once may take (the pool reduces
    concurrency to fit them, see sandbox.SandboxPool), and every sandbox process has oom_score_adj 1000, so when
    memory runs out anyway the kernel kills a sandbox (status "crashed") and not the trainer. Under a root trainer 1000
    is also the floor (the template sets it with CAP_SYS_RESOURCE); under another user code could lower it to the
    trainer's own.
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
    Closing a sandbox kills the worker tree and removes its directory; a sandbox garbage collected unclosed is retired
    by its pool's background thread. Pools close at exit (atexit) and on SIGTERM/SIGINT where the signal's
    disposition is the default (it would kill the process without exit handlers): we clean up, then die of the same
    signal. Python's KeyboardInterrupt and custom handlers are left alone (exit runs atexit). If the trainer dies hard
    (SIGKILL), the template sees its control socket close, kills every worker and removes the pool directory. Forked
    children of the trainer (e.g. DataLoader workers) drop their copies of the sockets at fork, so they neither keep a
    pool alive after the trainer is gone nor kill its sandboxes at their exit.

How to run
    python -m pytest -q tests/test_isolation.py     # the properties above, through sandbox.py's interface
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import gc
import io
import itertools
import json
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
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from PIL import Image

OOM_SCORE_ADJ = 1000      # every sandbox process is the OOM killer's first choice (see _volunteer_for_the_oom_killer)
START_TIMEOUT_S = 120.0   # template and worker start, media loading included: generous for a loaded 2-core machine
_CTRL_TIMEOUT_S = 120.0


class SandboxError(RuntimeError):
    """The sandbox machinery itself failed (not the user's code)."""


# ---------------------------------------------------------------------------------------------------------------------
# The wire: length-prefixed JSON frames (parent <-> worker), JSON datagrams with descriptors (parent <-> template)
# ---------------------------------------------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct(">I")
_MAX_REPLY_BYTES = 16 << 20      # a reply is bounded text plus file names; anything bigger is a broken or hostile child
_MAX_REQUEST_BYTES = 256 << 20   # code of any reasonable size


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


def _ctrl_send(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(obj).encode()], list(fds))


def _ctrl_recv(sock: socket.socket, timeout: float | None) -> tuple[dict, list[int]]:
    sock.settimeout(timeout)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    if not data:
        raise EOFError("template process closed its socket")
    return json.loads(data), fds


def _drop_marker(dropped: int) -> str:
    return f"\n... [{dropped} characters of output dropped] ...\n"


def clip(text: str, limit: int) -> str:
    """Keep the head and the tail of `text`, saying how much of the middle went."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + _drop_marker(len(text) - 2 * half) + text[len(text) - half:]


# ---------------------------------------------------------------------------------------------------------------------
# Files through the worker's directory: input images in, result PNGs out, judged by the same two rules on both sides
# ---------------------------------------------------------------------------------------------------------------------

_MAX_PNG_BYTES = 64 << 20
_DECODE_FACTOR = 4               # the parent decodes at most this many times max_image_pixels before downscaling
_OUT_NAME = re.compile(r"out_[0-9]{1,9}\.png")


def result_file(seq: int) -> str:
    """The name, in the worker's directory, of the `seq`-th image a worker returns (the parent accepts no other)."""
    return f"out_{seq}.png"


def image_problem(w: int, h: int, min_side: int, max_aspect: float) -> str | None:
    """Why a w x h image is refused (a side too short, an aspect ratio too extreme), or None."""
    if min(w, h) < min_side:
        return f"{w}x{h} px is below the {min_side} px minimum side"
    if max(w, h) / min(w, h) >= max_aspect:
        return f"aspect ratio {max(w, h) / min(w, h):.0f} is not below {max_aspect:g}"
    return None


def fit_pixels(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """The size a w x h image is downscaled to so that it holds at most `max_pixels`."""
    if w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * scale)), max(1, int(h * scale))


def stage_images(images: list, workdir: str) -> list[dict]:
    """Parent: copy input images (PIL images or file paths) into the worker's directory; `load_image` reads each spec
    back. PIL images go as raw RGB: no encode/decode per trajectory. (The video is read in place: videos are large,
    and the worker can read what root can, see the docstring.)"""
    specs = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            rgb = item if item.mode == "RGB" else item.convert("RGB")
            name = f"in_{i}.rgb"
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(rgb.tobytes())                               # (H*W*3,) uint8
                os.fchmod(f.fileno(), 0o644)
            specs.append({"raw": name, "size": list(rgb.size)})
        else:
            name = f"in_{i}{os.path.splitext(item)[1][:16]}"
            shutil.copyfile(item, os.path.join(workdir, name))
            os.chmod(os.path.join(workdir, name), 0o644)
            specs.append({"file": name})
    return specs


def load_image(spec: dict) -> Image.Image:
    """Worker (its directory is the cwd): one staged input image, as PIL RGB."""
    if "raw" in spec:
        with open(spec["raw"], "rb") as f:
            return Image.frombytes("RGB", tuple(spec["size"]), f.read())
    with Image.open(spec["file"]) as f:
        return f.convert("RGB")


def _read_checked_png(path: str, cfg, label: str) -> tuple[Image.Image | None, str | None]:
    """Open a PNG the child wrote, judging it from its header before decoding anything."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)   # no symlinks into our files, no FIFOs
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_PNG_BYTES:
            return None, f"{label} dropped: not a regular file under {_MAX_PNG_BYTES >> 20} MiB"
        with Image.open(f, formats=["PNG"]) as im:
            w, h = im.size
            problem = image_problem(w, h, cfg.min_image_side, cfg.max_aspect_ratio)
            if problem is None and w * h > _DECODE_FACTOR * cfg.max_image_pixels:
                problem = f"{w}x{h} px is too large to decode"
            if problem:
                return None, f"{label} dropped: {problem}"
            rgb = im.convert("RGB")
    w2, h2 = fit_pixels(w, h, cfg.max_image_pixels)
    if (w2, h2) == (w, h):
        return rgb, None
    return rgb.resize((w2, h2), Image.BILINEAR), f"{label} downscaled from {w}x{h} to {w2}x{h2} px"


def collect_images(workdir: str, names, cfg) -> tuple[list[Image.Image], list[str]]:
    """Parent: the images a call returned, read from the worker's directory and removed from it, judged by `cfg`'s
    max_images, min_image_side, max_aspect_ratio and max_image_pixels (a sandbox.SandboxConfig)."""
    images, notes = [], []
    for name in names:
        if not isinstance(name, str) or not _OUT_NAME.fullmatch(name):
            notes.append("an invalid image name from the sandbox was ignored")
            continue
        path = os.path.join(workdir, name)
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


# ---------------------------------------------------------------------------------------------------------------------
# Linux plumbing (ctypes): namespaces, mounts, prctl, capabilities, uids
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
# Parent side: the template process, worker handles, budgets, slots, the pool
# ---------------------------------------------------------------------------------------------------------------------

_UIDS = _uid_range_if_root()
_NAMESPACE_FAILURE: str | None = None   # why namespaces did not work in this process (asked once, warned once)


def _template_env(root: str) -> dict[str, str]:
    """The whole environment of the template and its workers: an allow-list, nothing from the trainer."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": root,
            "TMPDIR": root, "MPLBACKEND": "Agg", "MPLCONFIGDIR": os.path.join(root, ".matplotlib"),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}


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

    def __init__(self, program: str, root: str, mode: str):
        self.root, self.lock = root, threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", program, str(theirs.fileno()), mode, root],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=_template_env(root), cwd=root,
                pass_fds=[theirs.fileno()], start_new_session=True)   # Ctrl-C in a terminal reaches only the trainer
        finally:
            theirs.close()
        self.sock = ours
        try:
            msg, _ = _ctrl_recv(ours, START_TIMEOUT_S)
            if msg.get("op") == "map":   # the template has unshared its user namespace; only we can map its ids
                try:
                    _write_id_maps(self.proc.pid)
                    _ctrl_send(ours, {"ok": True})
                except OSError as e:
                    _ctrl_send(ours, {"ok": False, "error": f"writing uid/gid maps: {e}"})
                msg, _ = _ctrl_recv(ours, START_TIMEOUT_S)
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


class Worker:
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
    """A pool's memory and disk budgets, in MB, and what its slots hold of them (see sandbox.SandboxPool).

    Slots are keys (any hashable that lives as long as the sandbox). An idle slot holds the disk space its directory
    took after its last call (`store`); a running call holds its full memory_mb and disk_mb limits."""

    def __init__(self, memory_mb: int, disk_mb: int):
        self.memory_mb, self.disk_mb = memory_mb, disk_mb
        self._cond = threading.Condition()
        self._stored_mb: dict = {}                        # key -> MB its directory held after its last call
        self._running: dict = {}                          # key -> (memory_mb, disk_mb) of its running call
        self._queue: collections.deque = collections.deque()   # waiting calls, first come first served

    def check(self, memory_mb: int, disk_mb: int) -> None:
        for what, limit, budget in (("memory", memory_mb, self.memory_mb), ("disk", disk_mb, self.disk_mb)):
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

    def _fits(self, key, memory_mb: int, disk_mb: int) -> bool:
        if not self._running:
            return True
        memory = memory_mb + sum(m for m, _ in self._running.values())
        disk = disk_mb + sum(d for _, d in self._running.values()) + sum(
            mb for k, mb in self._stored_mb.items() if k != key and k not in self._running)
        return memory <= self.memory_mb and disk <= self.disk_mb

    @contextlib.contextmanager
    def call(self, key, memory_mb: int, disk_mb: int):
        """Hold the call's limits while it runs; wait for its turn and for room first."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket and self._fits(key, memory_mb, disk_mb))
            finally:   # also when the wait is interrupted: a stale ticket at the head would stop every later call
                self._queue.remove(ticket)
                self._cond.notify_all()   # the next in line may fit as well
            self._running[key] = (memory_mb, disk_mb)
        try:
            yield
        finally:
            with self._cond:
                del self._running[key]
                self._cond.notify_all()


class Slot:
    """One open sandbox's place in its pool: it counts against max_live until closed, holds the sandbox's current
    worker (None after a failed restart, until the next start), and is the sandbox's key in the budgets."""

    def __init__(self, pool: WorkerPool, memory_mb: int, disk_mb: int):
        self.pool, self.memory_mb, self.disk_mb = pool, memory_mb, disk_mb
        self.worker: Worker | None = None
        self.closed = False
        self.finalizer: weakref.finalize | None = None   # set by WorkerPool.open_slot

    def start(self, init: Callable[[Worker], None]) -> None:
        """Take a fresh worker (an idle spare if there is one) and run `init(worker)`, the caller's first request, on
        it; the slot holds the worker once that succeeds. On failure the worker is retired, and one that died or did
        not answer raises SandboxError."""
        worker = self.pool._take_spare()
        try:
            init(worker)
        except (TimeoutError, EOFError, OSError) as e:
            self.pool._retire(worker)
            raise SandboxError(f"sandbox start failed: {e}") from None
        except BaseException:
            self.pool._retire(worker)
            raise
        finally:
            self.pool._refill()
        self.pool._budget.store(self, _disk_used_mb(worker.workdir))   # the staged inputs
        self.worker = worker

    def retire(self) -> str:
        """Kill the current worker's tree and remove its directory; says how its interpreter ended."""
        code = self.pool._retire(self.worker)
        self.worker = None
        return _describe_exit(code)

    @contextlib.contextmanager
    def call(self):
        """Hold one of the pool's max_running places, and the slot's limits in its budgets, while a call runs."""
        with self.pool._running, self.pool._budget.call(self, self.memory_mb, self.disk_mb):
            yield

    def disk_used_mb(self) -> float:
        """What the worker's directory holds now. Within the slot's disk_mb it is what the slot stores in the disk
        budget while idle; beyond it the caller is to restart the worker, which removes the directory."""
        mb = _disk_used_mb(self.worker.workdir)
        if mb <= self.disk_mb:
            self.pool._budget.store(self, mb)
        return mb

    def close(self) -> None:
        """Retire the worker and give the slot back; idempotent."""
        self.closed = True
        if self.finalizer.detach() is not None:
            self.pool._release(self)


class WorkerPool:
    """A template process, idle spare workers, and bounds on open slots (max_live), concurrently running calls
    (max_running) and the memory and disk those calls may take together (sandbox.SandboxPool documents each)."""

    def __init__(self, program: str, *, max_live: int, spares: int, max_running: int | None, isolation: str,
                 open_wait_s: float, memory_budget_mb: int | None, disk_budget_mb: int | None):
        """`program`: the Python source the template runs as `python -I -c program FD MODE ROOT`; it must call
        `template_main`."""
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
        self._n_spares, self._max_running = spares, max_running
        self._max_live, self._open_wait_s = max_live, open_wait_s
        mode = "basic" if isolation == "basic" or (isolation == "auto" and _NAMESPACE_FAILURE) else "namespaces"
        if mode == "namespaces":
            try:
                self._template = self._start_template(program, "namespaces")
            except SandboxError as e:
                if isolation == "namespaces":
                    raise
                _NAMESPACE_FAILURE, mode = str(e), "basic"   # asked once per process, warned once
                warnings.warn(f"sandbox: Linux namespaces are unavailable ({e}); running with basic isolation: no "
                              "network isolation, writable host filesystem, shared /proc (see isolation.py docstring)",
                              RuntimeWarning, stacklevel=3)   # the line that made the SandboxPool
        if mode == "basic":
            self._template = self._start_template(program, "basic")
        # read by sandbox.SandboxPool: the mode in force, the workers' uids, the pool directory, the budgets in MB
        self.isolation = self._template.isolation
        self.own_uids = _UIDS is not None   # workers run under their own unprivileged uid
        self.root = self._template.root     # holds every worker's private directory; removed on close
        self._budget = _Budget(_half_of_physical_memory_mb() if memory_budget_mb is None else memory_budget_mb,
                               _half_of_free_disk_mb(self.root) if disk_budget_mb is None else disk_budget_mb)
        self.memory_budget_mb, self.disk_budget_mb = self._budget.memory_mb, self._budget.disk_mb
        self._live = threading.BoundedSemaphore(max_live)
        self._running = threading.BoundedSemaphore(max_running)
        self._cond = threading.Condition()
        self._spares: collections.deque[Worker] = collections.deque()
        self._slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        self._graveyard: collections.deque[Slot] = collections.deque()   # slots of collected, unclosed sandboxes
        self.closed = False
        self._owner_pid = os.getpid()
        self._executor: ThreadPoolExecutor | None = None
        _register_pool(self)
        threading.Thread(target=self._maintain, name="sandbox-pool", daemon=True).start()

    @staticmethod
    def _start_template(program: str, mode: str) -> _Template:
        root = tempfile.mkdtemp(prefix="pyvision-sandbox-")
        # workers may pass through to their own directory but not list the others; that stops only a worker without
        # CAP_DAC_READ_SEARCH, so in namespaces mode each worker's view of this directory holds its own alone
        os.chmod(root, 0o711)
        try:
            return _Template(program, root, mode)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def open_slot(self, owner: object, memory_mb: int, disk_mb: int) -> Slot:
        """A slot for `owner` (a sandbox) with these limits, once fewer than max_live are open (waits up to
        open_wait_s). Refused at once if a limit exceeds its budget. If `owner` is garbage collected before the
        slot is closed, the pool's background thread closes it."""
        self._budget.check(memory_mb, disk_mb)
        if self.closed:
            raise SandboxError("the sandbox pool is closed")
        if not self._live.acquire(timeout=self._open_wait_s):
            raise SandboxError(f"{self._max_live} sandboxes (max_live) stayed open for {self._open_wait_s:g} s: "
                               "close() finished trajectories or raise max_live")
        slot = Slot(self, memory_mb, disk_mb)
        # Garbage collection may run a finalizer anywhere, even inside a lock: it only queues the slot for the
        # background thread (deque.append takes no lock). Slot.close() releases synchronously.
        slot.finalizer = weakref.finalize(owner, self._graveyard.append, slot)
        self._slots.add(slot)
        return slot

    def map(self, fn: Callable, items: Sequence) -> list:
        """fn over items on at most max_running threads; results in input order."""
        with self._cond:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_running, thread_name_prefix="sandbox-run")
        return list(self._executor.map(fn, items))

    # -- workers -----------------------------------------------------------------------------------------------------

    def _spawn(self) -> Worker:
        if self.closed:
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
        return Worker(pid, ours, workdir, uid)

    def _retire(self, worker: Worker | None) -> int | None:
        """Kill a worker's tree and remove its directory; returns its exit code if known."""
        if worker is None:
            return None
        if os.getpid() != self._owner_pid:   # a forked child of the trainer: the worker belongs to the parent
            worker.sock.close()
            return None
        code = None
        try:
            if not self.closed:
                code = self._template.kill(worker.pid)
        except SandboxError:
            pass   # the template is gone, and with it every worker
        worker.sock.close()
        shutil.rmtree(worker.workdir, ignore_errors=True)
        return code

    def _take_spare(self) -> Worker:
        with self._cond:
            worker = self._spares.popleft() if self._spares else None
        return worker or self._spawn()

    def _refill(self) -> None:
        """Wake the background thread; called once a trajectory has started, so its fork does not compete with it."""
        with self._cond:
            self._cond.notify_all()

    def _maintain(self) -> None:
        """Background thread: keep `spares` idle workers forked, and close slots of sandboxes collected unclosed."""
        while True:
            with self._cond:
                while not self.closed and len(self._spares) >= self._n_spares and not self._graveyard:
                    self._cond.wait(timeout=1.0)
                if self.closed:
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
                if self.closed:
                    worker.sock.close()
                    return
                self._spares.append(worker)

    def _release(self, slot: Slot) -> None:
        worker, slot.worker = slot.worker, None
        self._retire(worker)
        self._budget.forget(slot)
        self._live.release()

    # -- shutdown ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every worker of this pool (the template does it when its socket closes) and remove the directory."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._shutdown()

    def _shutdown(self) -> None:
        # lock-free: this also runs from signal handlers and atexit, possibly while another thread holds a lock
        if os.getpid() != self._owner_pid:
            return self._forget()
        self.closed = True
        for slot in list(self._slots):
            slot.closed = True
        self._template.close()
        for worker in list(self._spares):
            worker.sock.close()
        shutil.rmtree(self.root, ignore_errors=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _forget(self) -> None:
        """In a forked child of the trainer: drop our copies of the sockets without touching the processes."""
        self.closed = True
        self._template.sock.close()
        for worker in list(self._spares):
            worker.sock.close()


_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_SIGNALS_HOOKED = False


def _register_pool(pool: WorkerPool) -> None:
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
    """A forked child's pools are closed and forgotten (a later pool in the child is a new one)."""
    for pool in list(_POOLS):
        pool._forget()
    _POOLS.clear()


atexit.register(_close_all_pools)
os.register_at_fork(after_in_child=_forget_pools_in_child)


# ---------------------------------------------------------------------------------------------------------------------
# Child side: the template process
# ---------------------------------------------------------------------------------------------------------------------

def template_main(preload: Callable[[], None], runtime: Callable[[Confinement], Callable[[dict], dict]]) -> None:
    """The template process, with sys.argv = [-c, FD, MODE, ROOT] (see WorkerPool). `preload()` runs once, before any
    fork: what it imports every worker shares. `runtime(confinement)` runs in each new worker once it is isolated and
    returns that worker's request handler (a request dict -> its reply dict)."""
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    mode, root = sys.argv[2], sys.argv[3]
    namespaces = mode == "namespaces"
    try:
        _volunteer_for_the_oom_killer()
        if namespaces and not _enter_namespaces(ctrl, root):
            return   # we were the launcher: the template has exited and the directory is removed
        if not namespaces:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)   # orphans of dead workers come to us, to be killed and reaped
        preload()
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
                pid = _spawn_worker(fds[0], req["workdir"], req["uid"], namespaces, root, runtime)
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
    reply, _ = _ctrl_recv(ctrl, START_TIMEOUT_S)
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


def _spawn_worker(chan_fd: int, workdir: str, uid: int | None, namespaces: bool, root: str, runtime: Callable) -> int:
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
                _worker_main(chan_fd, workdir, uid, namespaces, root, template_pid, runtime)
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
# Child side: the worker (one trajectory's interpreter) and what its runtime gets
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


class CpuLimitExceeded(BaseException):
    """Raised by SIGXCPU; a BaseException so user code's `except Exception` does not swallow it."""


def _on_sigxcpu(signum, frame):
    raise CpuLimitExceeded


def _worker_main(chan_fd: int, workdir: str, uid: int | None, namespaces: bool, root: str, template_pid: int,
                 runtime: Callable) -> None:
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
        # Ctrl-C in the model's code is a KeyboardInterrupt, as in any interpreter, even under a trainer that was
        # started with SIGINT ignored (a background job of a non-interactive shell), which every fork inherits
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _serve(chan, runtime(Confinement(output_fd, own_uid=uid is not None)))
    except BaseException as e:
        if chan is not None:
            with contextlib.suppress(OSError):
                _send_frame(chan, {"id": 0, "fatal": f"{type(e).__name__}: {e}"})
    finally:
        os._exit(0)


def _serve(chan: socket.socket, handle: Callable[[dict], dict]) -> None:
    """Answer the parent's requests, each reply carrying its request's id, until the parent closes the channel."""
    while True:
        try:
            req = _recv_frame(chan, None, _MAX_REQUEST_BYTES)
        except EOFError:
            return
        reply = handle(req)
        reply["id"] = req["id"]
        _send_frame(chan, reply)


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


class Confinement:
    """What a worker's runtime gets from the machinery, once the worker is isolated: its limits and its output."""

    def __init__(self, output_fd: int, own_uid: bool):
        self.output_fd, self.own_uid = output_fd, own_uid

    def set_limits(self, memory_mb: int, file_mb: int, max_open_files: int, max_procs: int) -> None:
        """The interpreter's rlimits, for good: hard = soft, so the code cannot raise them again."""
        limits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, file_mb << 20),
                  (resource.RLIMIT_NOFILE, max_open_files)]
        if self.own_uid:   # RLIMIT_NPROC counts every process of the uid: meaningful only for a uid of our own
            limits.append((resource.RLIMIT_NPROC, max_procs))
        for which, value in limits:
            _, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)   # soft <= hard, or setrlimit fails
            resource.setrlimit(which, (value, value))

    def arm_cpu_limit(self, seconds: float) -> None:
        """Raise CpuLimitExceeded once this call has used `seconds` more CPU time (soft RLIMIT_CPU -> SIGXCPU)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))

    def disarm_cpu_limit(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))   # no SIGXCPU between calls

    def capture_output(self, limit: int) -> io.TextIOBase:
        """A stream for sys.stdout/sys.stderr during one call that keeps a head and a tail of `limit` characters."""
        return _BoundedText(limit)

    def collect_output(self, out: _BoundedText) -> str:
        """The call's text: `out`, with what was written to fds 1/2 directly (C code, subprocesses) folded in, head
        and tail; the output file is emptied for the next call."""
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(OSError):
                stream.flush()
        size = os.fstat(self.output_fd).st_size
        if size:
            keep = out.head_cap
            if size <= 2 * keep:
                out.write(os.pread(self.output_fd, size, 0).decode("utf-8", "replace"))
            else:
                out.write(os.pread(self.output_fd, keep, 0).decode("utf-8", "replace"))
                out.skip(size - 2 * keep)   # bytes, counted as characters: exact for ASCII
                out.write(os.pread(self.output_fd, keep, size - keep).decode("utf-8", "replace"))
            os.ftruncate(self.output_fd, 0)
        return out.getvalue()

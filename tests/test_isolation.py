"""Adversarial tests for isolation.py, through sandbox.py's interface: one test (or more) per property it promises.

Processes that must die are found by a unique token in their command line (PIDs inside a sandbox are namespace-local).
"""
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

import isolation
from sandbox import SandboxConfig, SandboxError, SandboxPool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(spares=2, max_running=4, timeout=15) as p:
        yield p


def _procs_with(token: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                continue
    return found


def _wait_until(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature plus an IHDR chunk claiming the given size: tiny on disk, a bomb if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- files from the child ---------------------------------------------------------------------------------------------

def test_parent_judges_child_pngs_from_headers_and_never_follows_links(tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (50, 50), "blue").save(outside)
    work = tmp_path / "work"
    work.mkdir()
    (work / "out_1.png").write_bytes(_png_header_only(100_000, 100_000))   # would need 30 GB to decode
    (work / "out_2.png").symlink_to(outside)                                # a link to a file of ours
    (work / "out_3.png").write_bytes(b"\xff\xd8\xff\xe0 not a png")
    Image.new("RGB", (3000, 1000), "red").save(work / "out_4.png")
    cfg = SandboxConfig(max_image_pixels=1_000_000)   # 3000x1000 decodes (< 4x), then shrinks
    images, notes = isolation.collect_images(str(work), ["out_1.png", "out_2.png", "out_3.png", "../secret.png",
                                                          "out_4.png"], cfg)
    assert [im.size for im in images] == [(1732, 577)]
    assert "too large to decode" in notes[0] and "unreadable" in notes[1] and "unreadable" in notes[2]
    assert "invalid image name" in notes[3] and "downscaled from 3000x1000" in notes[4]
    assert not any(work.iterdir()) and outside.exists()


# --- must hold: timeouts, attribution -------------------------------------------------------------------------------

def test_timeout_kills_whole_tree_restarts_and_never_misattributes(pool):
    token1, token2 = uuid.uuid4().hex, uuid.uuid4().hex
    with pool.open(timeout=2) as sb:
        assert sb.run("x = 1").ok
        start = time.monotonic()
        r = sb.run(textwrap.dedent(f"""
            import os, subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # {token1}"], start_new_session=True)
            if os.fork() == 0:          # a daemon: new session, double fork, exec
                os.setsid()
                if os.fork() == 0:
                    os.execv("/bin/sh", ["sh", "-c", "sleep 600 # {token2}"])
                os._exit(0)
            print("one")
            time.sleep(100)
        """))
        assert r.status == "timeout" and r.state_reset and time.monotonic() - start < 20   # 2 s, not 100 s
        assert "restarted" in r.notes[0] and "2 s" in r.error
        assert _wait_until(lambda: not _procs_with(token1) and not _procs_with(token2), 15)
        r = sb.run("print('two')\nprint(x)")          # the old output never shows up; the old state is gone
        assert r.status == "error" and r.text == "two\n" and "NameError" in r.error and not r.state_reset


def test_forged_or_stale_frames_from_the_child_are_not_results(pool):
    find_socket = ("import os, json, struct\n"
                   "fd = next(int(f) for f in os.listdir('/proc/self/fd') "
                   "if os.readlink(f'/proc/self/fd/{f}').startswith('socket:'))\n")
    with pool.open() as sb:
        assert sb.run("kept = 7").ok
        forged = json.dumps({"id": -5, "status": "ok", "text": "FORGED", "images": [], "notes": []})
        r = sb.run(find_socket + f"data = {forged!r}.encode()\n"
                   "os.write(fd, struct.pack('>I', len(data)) + data)\nprint('real')")
        assert (r.status, r.text) == ("ok", "real\n")
        r = sb.run(find_socket + "os.write(fd, struct.pack('>I', 2**31))")   # a header announcing 2 GB
        assert r.status == "crashed" and r.state_reset and "exceeds" in r.error
        assert sb.run("print(kept)").status == "error"       # restarted: clean state, not a stale reply
        assert sb.run("print(3)").text == "3\n"


# --- must hold: limits -----------------------------------------------------------------------------------------------

def test_memory_bomb_is_oom_and_the_interpreter_survives(pool):
    with pool.open(memory_mb=1024) as sb:
        assert sb.run("y = 5").ok
        r = sb.run("x = bytearray(8 << 30)")
        assert r.status == "oom" and "MemoryError" in r.error and not r.state_reset
        r = sb.run("a = np.ones((40000, 40000))")
        assert r.status == "oom"
        assert sb.run("print(y)").text == "5\n"


def test_cpu_time_file_size_and_open_file_limits(pool):
    with pool.open(cpu_s=1, timeout=20, file_mb=1, max_open_files=64) as sb:
        start = time.monotonic()
        r = sb.run("while True:\n    pass")
        assert r.status == "cpu_limit" and time.monotonic() - start < 15 and not r.state_reset   # not the 20 s clock
        r = sb.run("open('big', 'wb').write(b'x' * (2 << 20))")
        assert r.status == "error" and "File too large" in r.error
        r = sb.run("files = [open(f'f{i}', 'w') for i in range(200)]")
        assert r.status == "error" and "Too many open files" in r.error
        assert sb.run("print('fine')").text == "fine\n"


def test_fork_bomb_hits_the_process_limit(pool):
    if not pool.own_uids:
        pytest.skip("RLIMIT_NPROC binds only when workers run under their own uid (root trainer)")
    token = uuid.uuid4().hex
    with pool.open(max_procs=16) as sb:
        r = sb.run(f"import subprocess\nps = [subprocess.Popen(['/bin/sh', '-c', 'sleep 60 # {token}']) "
                   "for _ in range(100)]")
        assert r.status == "error" and "Resource temporarily unavailable" in r.error
        assert 0 < len(_procs_with(token)) < 16
    assert _wait_until(lambda: not _procs_with(token), 15)


def test_a_directory_grown_past_disk_mb_is_removed_with_the_state(pool):
    with pool.open(disk_mb=2, file_mb=4) as sb:
        assert sb.run("open('keep.bin', 'wb').write(b'x' * (1 << 20))\nstate = 1").ok       # 1 MB: within the limit
        r = sb.run("for i in range(3):\n    open(f'more{i}.bin', 'wb').write(b'x' * (1 << 20))")   # 4 MB in all
        assert r.status == "disk_limit" and r.state_reset and "disk_mb=2" in r.error
        r = sb.run("import os\nprint(sorted(f for f in os.listdir('.') if f.endswith('.bin')), 'state' in globals())")
        assert r.text == "[] False\n"


def test_sandboxes_are_the_oom_killers_first_choice_not_the_trainer(pool):
    with pool.open() as sb:
        r = sb.run("print(open('/proc/self/oom_score_adj').read().strip())\n"
                   "try:\n    open('/proc/self/oom_score_adj', 'w').write('0')\n    print('lowered')\n"
                   "except OSError:\n    print('refused')")
    score, lowering = r.text.split()
    assert score == "1000"
    if os.geteuid() == 0:                       # a root trainer makes 1000 the floor
        assert lowering == "refused"
    assert Path(f"/proc/{pool._workers._template.proc.pid}/oom_score_adj").read_text().strip() == "1000"
    assert int(Path("/proc/self/oom_score_adj").read_text()) < 1000     # the trainer keeps its own


def test_output_is_bounded_head_and_tail(pool):
    import resource
    n = 200_000
    total = sum(len(str(i)) + 1 for i in range(n))
    with pool.open(max_output_chars=1000, memory_mb=1024) as sb:
        r = sb.run(f"for i in range({n}):\n    print(i)")
        assert r.status == "ok" and r.text.startswith("0\n1\n2\n") and r.text.endswith(f"{n - 1}\n")
        assert f"[{total - 1000} characters of output dropped]" in r.text and len(r.text) < 1100
        r = sb.run("import os\nfor _ in range(10000):\n    os.write(1, b'y' * 1000)")   # below Python, 10 MB
        assert r.status == "ok" and "[9999000 characters of output dropped]" in r.text and len(r.text) < 1100
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = sb.run("for _ in range(2000):\n    print('z' * 1_000_000)")      # 2 GB of text: kept, it would not fit
        assert r.status == "ok" and len(r.text) < 1100
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 30_000   # KiB: the parent stays flat


# --- must hold: isolation --------------------------------------------------------------------------------------------

def test_environment_network_signals_and_filesystem_are_isolated(pool):
    with pool.open() as sb:
        r = sb.run("import os\nprint(sorted(os.environ))")
        allowed = set(isolation._template_env("/x"))
        assert r.ok and set(eval(r.text)) <= allowed
        r = sb.run(f"import os\ntry:\n    os.kill({os.getpid()}, 0)\n    print('reached')\n"
                   "except (ProcessLookupError, PermissionError) as e:\n    print('blocked', type(e).__name__)")
        assert r.text.startswith("blocked"), r.text
        if pool.isolation != "namespaces":
            pytest.skip("network, /proc and filesystem isolation need namespaces")
        r = sb.run("import socket\nfor addr in [('1.1.1.1', 53), ('127.0.0.1', 22)]:\n"
                   "    s = socket.socket()\n    s.settimeout(2)\n    try:\n        s.connect(addr)\n"
                   "        print('connected')\n    except OSError as e:\n        print(e.errno)")
        assert "connected" not in r.text and r.ok
        r = sb.run(f"import os\nprint(os.getppid(), [p for p in os.listdir('/proc') if p.isdigit()], "
                   f"os.path.exists('/proc/{os.getpid()}'), sorted(os.listdir('/dev')))")
        dev = ['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']
        assert r.text == f"0 ['1'] False {dev}\n"
        probe = str(ROOT / f"sandbox_probe_{uuid.uuid4().hex}")
        r = sb.run(f"import os\nfor p in [{probe!r}, '/tmp/probe', os.path.join(os.path.dirname(os.getcwd()), 'x'), "
                   "'ok.txt']:\n    try:\n        open(p, 'w').close()\n        print('wrote', p)\n"
                   "    except OSError as e:\n        print('denied', e.errno)\nprint(os.getcwd())")
        lines = r.text.splitlines()
        assert lines[:3] == ["denied 30"] * 3 and lines[3] == "wrote ok.txt" and not os.path.exists(probe)
        assert lines[4].startswith(pool.root + "/")
        r = sb.run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"    # MS_REMOUNT | MS_BIND: back to rw
                   "print(libc.mount(None, b'/', None, ctypes.c_ulong(32 | 4096), None), ctypes.get_errno())")
        assert r.text == "-1 1\n"   # EPERM: no capabilities left to undo the read-only view


def test_a_trajectory_sees_neither_the_files_nor_the_directories_of_the_others(pool):
    if pool.isolation != "namespaces":
        pytest.skip("a worker's private view of the pool directory needs a mount namespace (see basic mode)")
    with pool.open() as a, pool.open() as b:
        a_dir = a.run("import os\nopen('private.txt', 'w').write('secret of A')\nprint(os.getcwd())").text.strip()
        assert (Path(a_dir) / "private.txt").read_text() == "secret of A"   # it is there, seen from the trainer
        r = b.run(f"import os\nprint(os.listdir({pool.root!r}) == [os.path.basename(os.getcwd())])\n"
                  f"for probe in [lambda: os.listdir({a_dir!r}), lambda: open({a_dir + '/private.txt'!r}).read()]:\n"
                  "    try:\n        print(probe())\n    except OSError as e:\n        print(type(e).__name__)")
        assert r.text == "True\nFileNotFoundError\nFileNotFoundError\n", r.text


# The trainer: two sandboxes, each with a background process that escaped into its own session; then it waits.
_TRAINER_SCRIPT = r'''
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)   # a trainer as a shell starts it, whatever ran this test
sys.path.insert(0, ROOT)
import sandbox
pool = sandbox.SandboxPool(spares=1)
boxes = [pool.open() for _ in range(2)]
for sb in boxes:
    sb.run("import subprocess; subprocess.Popen(['/bin/sh', '-c', 'sleep 600 # TOKEN'], start_new_session=True)")
probe = """
import os
found = []
for p in os.listdir('/proc'):               # every process this sandbox can see
    try:
        if b'SECRET' in open(f'/proc/{p}/environ', 'rb').read():
            found.append(p)
    except OSError:
        pass
try:                                        # and the trainer itself, by its host pid
    found.append(open('/proc/TRAINER_PID/environ', 'rb').read().count(b'SECRET'))
except OSError:
    pass
print(found)
"""
leak = boxes[0].run(probe.replace("TRAINER_PID", str(os.getpid())))
loader = os.fork()                           # like a fork-started DataLoader worker: it outlives the trainer
if loader == 0:
    time.sleep(600)
    os._exit(0)
print(loader, pool.root, leak.text.strip(), "READY", flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_leaks_when_the_trainer_is_signalled_and_its_environment_stays_private(signum):
    token, secret = uuid.uuid4().hex, "SECRET" + uuid.uuid4().hex
    script = _TRAINER_SCRIPT.replace("ROOT", repr(str(ROOT))).replace("TOKEN", token).replace("SECRET", secret)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TRAINER_SECRET": secret})   # in the trainer's launch environment
    loader = None
    try:
        line = trainer.stdout.readline()
        assert line.endswith("READY\n"), line
        loader, root, found = int(line.split()[0]), line.split()[1], line.split(" ", 2)[2].rsplit(" ", 1)[0]
        assert found == "[]", f"the trainer's launch environment leaked: {found}"
        assert len(set(_procs_with(token)) - {trainer.pid, loader}) >= 2 and _procs_with(root)   # their argv has it
        os.kill(trainer.pid, signum)
        trainer.wait(timeout=20)
        def clean():
            survivors = set(_procs_with(token)) - {trainer.pid, loader}
            return not survivors and not _procs_with(root) and not os.path.exists(root)
        if signum == signal.SIGKILL:
            # nothing ran in the trainer: the template saw its socket close (the forked child dropped its copy at
            # fork, or it would keep the pool alive) and cleaned up on its own
            assert _wait_until(clean, 15), (_procs_with(token), loader, trainer.pid, _procs_with(root), root)
        else:
            assert clean()   # cleaned up before the trainer exited, not later by the template's fallback
    finally:
        trainer.kill()
        trainer.wait()
        if loader:
            os.kill(loader, signal.SIGKILL)


def test_parent_never_unpickles(pool, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")
    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    with pool.open(images=[Image.new("RGB", (64, 64))]) as sb:
        r = sb.run("import pickle\nplt.imshow(image_clue_0)\nplt.show()\nraise ValueError(pickle.dumps(1))")
        assert r.status == "error" and len(r.images) == 1 and "ValueError" in r.error


# --- must hold: cleanup ----------------------------------------------------------------------------------------------

def test_close_and_exceptions_leave_no_processes_or_directories():
    token = uuid.uuid4().hex
    pool = SandboxPool(spares=1)
    start_sleeper = f"import subprocess; subprocess.Popen(['/bin/sh', '-c', 'sleep 600 # {token}'])"
    sb = pool.open()
    workdir = sb._slot.worker.workdir
    assert sb.run(start_sleeper).ok and _wait_until(lambda: len(_procs_with(token)) == 1, 15)
    sb.close()
    sb.close()
    assert not os.path.exists(workdir) and _wait_until(lambda: not _procs_with(token), 15)
    with pytest.raises(RuntimeError, match="boom"):
        with pool.open() as sb:
            workdir = sb._slot.worker.workdir
            sb.run(start_sleeper)
            assert _wait_until(lambda: len(_procs_with(token)) == 1, 15)
            raise RuntimeError("boom")
    assert not os.path.exists(workdir) and _wait_until(lambda: not _procs_with(token), 15)
    with pytest.raises(SandboxError, match="closed"):
        sb.run("1")
    leftover = pool.open()                  # left open: pool.close() must take it down too
    leftover.run(start_sleeper)
    assert _wait_until(lambda: len(_procs_with(token)) == 1, 15)
    root, template = pool.root, pool._workers._template.proc
    pool.close()
    assert template.poll() is not None and not os.path.exists(root)
    assert _wait_until(lambda: not _procs_with(token) and not _procs_with(root), 15)


def test_a_forked_child_of_the_trainer_does_not_touch_the_sandboxes(pool):
    with pool.open() as sb:
        assert sb.run("v = 'kept'").ok
        pid = os.fork()
        if pid == 0:                         # what a fork-started DataLoader worker does at exit
            isolation._close_all_pools()
            os._exit(0)
        os.waitpid(pid, 0)
        assert sb.run("print(v)").text == "kept\n" and os.path.isdir(pool.root)


# --- pool bounds and budgets -----------------------------------------------------------------------------------------

def test_pool_bounds_live_sandboxes():
    with SandboxPool(max_live=1, spares=0, open_wait_s=0.3) as pool, pool.open():
        with pytest.raises(SandboxError, match="max_live"):
            pool.open()                      # no deadlock: a clear error once the wait is over
    with SandboxPool(max_live=2, spares=0) as pool:
        a, b = pool.open(), pool.open()
        opened = threading.Event()
        third = []
        thread = threading.Thread(target=lambda: (third.append(pool.open()), opened.set()))
        thread.start()
        assert not opened.wait(0.5)          # a third live sandbox waits for a slot
        a.close()
        assert opened.wait(10)
        thread.join()
        assert third[0].run("print(1)").text == "1\n"
        b.close()
        third[0].close()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])   # an end before a start
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_pool_budgets_reduce_concurrency_and_count_what_idle_sandboxes_store():
    timed_nap = "import time\nstart = time.time()\ntime.sleep(0.6)\nprint(start, time.time())"

    def spans(boxes):
        return [tuple(map(float, r.text.split())) for r in pool.run_many([(sb, timed_nap) for sb in boxes])]

    with SandboxPool(spares=4, max_running=4, memory_budget_mb=2048, disk_budget_mb=8, timeout=10, memory_mb=1024,
                     disk_mb=1) as pool:
        assert (pool.memory_budget_mb, pool.disk_budget_mb) == (2048, 8)
        with pytest.raises(SandboxError, match="memory_budget_mb is 2048"):
            pool.open(memory_mb=4096)                  # could never run: refused at once
        with pytest.raises(SandboxError, match="disk_budget_mb is 8"):
            pool.open(disk_mb=9)
        boxes = [pool.open() for _ in range(4)]
        assert _most_at_once(spans(boxes)) == 2        # max_running alone would let all 4 run
        for sb in boxes:
            sb.close()
        hoarder = pool.open(memory_mb=512, disk_mb=6)
        assert hoarder.run("open('hoard.bin', 'wb').write(b'x' * (5 << 20))").ok   # idle, it still holds 5 MB
        boxes = [pool.open(memory_mb=512, disk_mb=2) for _ in range(3)]
        assert _most_at_once(spans(boxes)) == 1        # 5 + 2 + 2 > 8; without the 5 MB all 3 would fit
        hoarder.close()                                # closing gives the space back
        assert _most_at_once(spans(boxes)) == 3


# --- fallback --------------------------------------------------------------------------------------------------------

def test_basic_isolation_still_kills_escaped_trees_and_scrubs_the_environment():
    token = uuid.uuid4().hex
    with SandboxPool(isolation="basic", spares=0, timeout=2) as pool:
        assert pool.isolation == "basic"
        with pool.open() as sb:
            r = sb.run(textwrap.dedent(f"""
                import os, time
                if os.fork() == 0:
                    os.setsid()
                    if os.fork() == 0:
                        os.execv("/bin/sh", ["sh", "-c", "sleep 600 # {token}"])
                    os._exit(0)
                time.sleep(100)
            """))
            assert r.status == "timeout" and r.state_reset
            assert _wait_until(lambda: not _procs_with(token), 15)
            r = sb.run(f"import os\nprint(sorted(os.environ))\ntry:\n    os.kill({os.getpid()}, 0)\n"
                       "except PermissionError:\n    print('blocked')\n"
                       f"try:\n    open('/proc/{os.getpid()}/environ', 'rb').read()\nexcept PermissionError:\n"
                       "    print('blocked')")
            assert set(eval(r.text.splitlines()[0])) <= set(isolation._template_env("/x"))
            if pool.own_uids:   # its own uid: neither signals nor the trainer's launch environment
                assert r.text.splitlines()[1:] == ["blocked", "blocked"]


def test_unavailable_namespaces_fall_back_with_a_single_warning(monkeypatch):
    def deny(pid):
        raise PermissionError("denied for the test")
    monkeypatch.setattr(isolation, "_write_id_maps", deny)
    monkeypatch.setattr(isolation, "_NAMESPACE_FAILURE", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pools = [SandboxPool(spares=0), SandboxPool(spares=0)]
    try:
        assert [p.isolation for p in pools] == ["basic", "basic"]
        assert [str(w.message) for w in caught if w.category is RuntimeWarning and "namespaces" in str(w.message)]
        assert len([w for w in caught if "namespaces are unavailable" in str(w.message)]) == 1
        with pools[0].open() as sb:
            assert sb.run("print(1 + 1)").text == "2\n"
        with pytest.raises(SandboxError):
            SandboxPool(isolation="namespaces", spares=0)
    finally:
        for p in pools:
            p.close()

"""Running untrusted candidate programs, each in its own limited subprocess, for pass@k.

The program (`build_program`, HumanEval's convention) is, concatenated as is:
    prompt + completion + "\\n" + tests + "\\n" + f"check({entry_point})\\n"
(the last part only when an entry point is given); it passes when it exits with status 0.

Each run (`run_program`; `run_programs` for many, in order, with a small thread pool):
  - a fresh temporary directory, owned by the sandbox user and private to it (mode 0700), is
    its working directory, HOME and TMPDIR, and holds the program as program.py; it is
    deleted afterwards;
  - the interpreter runs as `python -I -B` (isolated: no PYTHON* variables, user site or
    script directory on sys.path; no bytecode written), with stdin /dev/null (reads get EOF),
    in a new session and process group, with an environment of only PATH and LANG (from
    this process, when set), HOME, TMPDIR and PYTHONDONTWRITEBYTECODE=1;
  - before any candidate code runs, a short bootstrap sets the rlimits and then execs the
    program (there rather than in a `preexec_fn`, which is not safe with the threads
    `run_programs` uses; hard limits already lower are kept):
      RLIMIT_CPU    `Sandbox.cpu_seconds`: SIGXCPU, and SIGKILL one second later;
      RLIMIT_AS     `memory_mb`: allocations past it fail (in Python: MemoryError);
      RLIMIT_FSIZE  `file_size_mb` per file: writes past it fail (Python ignores SIGXFSZ
                    and gets OSError EFBIG);
      RLIMIT_NPROC  `max_processes`: no fork or thread once the user has that many
                    processes and threads, all of the user's counted;
      RLIMIT_CORE   0;
  - stdout and stderr share one pipe, drained as the program runs, so a chatty program never
    blocks on it; only the last `output_bytes` are kept (`Result.output`);
  - at `timeout` wall-clock seconds the whole process group is killed (SIGKILL); when the
    program exits first, what is left of its group is killed too.

Privileges: run as root, the child drops to `Sandbox.user` ("nobody" by default: uid and gid
from the password database, no supplementary groups) before exec, so that file permissions
and RLIMIT_NPROC, which root ignores, hold. It can then write only its own directory and
world-writable places (/tmp, /dev/shm; each file capped by RLIMIT_FSIZE). The interpreter
must be one that user can run: `Sandbox.python`, else this process's own (sys.executable),
else python3 from the system path (/bin:/usr/bin), the first that starts as that user
(`identity` says which; a system python3 does not see this environment's packages).
Run as another user, candidates run as that same user: the rlimits apply, but they can write
wherever the user can and see its processes; this is not a boundary against a hostile
program then.

Leftovers, when dropping privileges: this process makes itself a child subreaper (Linux
prctl PR_SET_CHILD_SUBREAPER, once, on the first run), so the processes a program leaves
behind, also those that left its process group (setsid), are handed to it rather than to
init (some containers' init never reaps them, and zombies count against RLIMIT_NPROC). After
each run, those of the sandbox user are reaped, and killed too when no other run is in
progress: with `run_programs`, at the latest when its last program ends. Until then they live
on as the sandbox user under the rlimits. There is no network or filesystem namespace: this is
a sandbox against accidents and simple hostility, not a jail. Linux only.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

STATUSES = ("passed", "failed", "timed_out", "crashed")  # the values of Result.status

_POLL_S = 0.01  # how often a run checks whether its program has exited
_CHUNK = 65536
_MAX_DRAIN = 16  # chunks read after the program is gone (what the pipe still holds)
_SYSTEM_PATH = "/bin:/usr/bin"
_SWEEPS = 100  # passes of killing and reaping leftovers, _POLL_S apart
_PR_SET_CHILD_SUBREAPER = 36

# Held while a process of the sandbox user is started (and its pid put in _running) and while
# leftovers are reaped, so a program's own process is never reaped by another thread's sweep.
_lock = threading.Lock()
_running: set[int] = set()

# Runs as the sandbox user, before any candidate code: the limits, then exec of the program.
# A hard limit already lower than asked for is kept (raising it is not allowed).
_BOOTSTRAP = """\
import os, resource, sys
cpu, memory, fsize, nproc = map(int, sys.argv[1:5])
for name, soft, hard in (("CORE", 0, 0), ("CPU", cpu, cpu + 1), ("AS", memory, memory),
                         ("FSIZE", fsize, fsize), ("NPROC", nproc, nproc)):
    limit = getattr(resource, "RLIMIT_" + name)
    cap = resource.getrlimit(limit)[1]
    if cap != resource.RLIM_INFINITY:
        soft, hard = min(soft, cap), min(hard, cap)
    resource.setrlimit(limit, (soft, hard))
os.execv(sys.executable, [sys.executable, "-I", "-B", sys.argv[5]])
"""


class SandboxError(RuntimeError):
    """The sandbox itself cannot run programs (unknown user, no interpreter that user can run)."""


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """Limits and identity of a run (see the module docstring)."""

    timeout: float = 10.0  # wall-clock seconds
    memory_mb: int = 1024  # RLIMIT_AS
    cpu_seconds: int | None = None  # RLIMIT_CPU; None: the timeout rounded up, plus one
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_processes: int = 64  # RLIMIT_NPROC
    output_bytes: int = 8192  # output tail kept
    user: str = "nobody"  # who runs the programs when this process is root
    python: str | None = None  # the interpreter; None: see `identity`

    def __post_init__(self):
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        for name in ("memory_mb", "file_size_mb", "max_processes", "output_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ValueError(f"cpu_seconds must be >= 1, got {self.cpu_seconds!r}")

    @property
    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout) + 1


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who runs the programs and with which interpreter. dropped: the child changes to this
    uid/gid (this process is root); otherwise programs run as this process's own user."""

    uid: int
    gid: int
    user: str
    python: str
    dropped: bool


@dataclasses.dataclass(frozen=True)
class Result:
    """How one program ended.

    status:
      "passed"     exited with status 0;
      "failed"     exited with another status: an uncaught exception (a failed assert, a
                   SyntaxError, a MemoryError past RLIMIT_AS, an OSError past RLIMIT_FSIZE or
                   RLIMIT_NPROC, ...) or sys.exit(nonzero);
      "timed_out"  still running at the timeout, so its process group was killed;
      "crashed"    ended by a signal before the timeout: RLIMIT_CPU (SIGXCPU, then SIGKILL), a
                   fault (SIGSEGV, SIGABRT), the kernel's out-of-memory killer, or a signal it
                   sent itself.
    exit_code: the exit status, None when a signal ended it.
    signal: the name of the signal that ended it ("SIGKILL" for timed_out), else None.
    seconds: wall-clock time from start to exit (or to the kill).
    output: the last `Sandbox.output_bytes` of stdout and stderr together (UTF-8, undecodable
      bytes replaced); output_truncated: more was written than kept.
    """

    status: str
    exit_code: int | None
    signal: str | None
    seconds: float
    output: str
    output_truncated: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def build_program(prompt: str, completion: str, tests: str, entry_point: str | None = None) -> str:
    """The source run for one candidate (see the module docstring). Raises ValueError on an
    entry point that is not a Python identifier."""
    if entry_point is not None and not entry_point.isidentifier():
        raise ValueError(f"entry point must be a Python identifier, got {entry_point!r}")
    source = prompt + completion + "\n" + tests + "\n"
    return source + f"check({entry_point})\n" if entry_point is not None else source


def identity(sandbox: Sandbox = Sandbox()) -> Identity:
    """Who runs the programs of `sandbox`, and the interpreter (see the module docstring).
    Raises SandboxError when, as root, the user is unknown or is root, or cannot run any
    interpreter."""
    return _identity(sandbox.user, sandbox.python, os.geteuid())


@functools.lru_cache(maxsize=None)
def _identity(user: str, python: str | None, euid: int) -> Identity:
    if euid != 0:
        try:
            name = pwd.getpwuid(euid).pw_name
        except KeyError:
            name = str(euid)
        return Identity(euid, os.getegid(), name, python or sys.executable, dropped=False)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(f"sandbox user {user!r} does not exist") from None
    if entry.pw_uid == 0:
        raise SandboxError(f"sandbox user {user!r} is root: candidates would run with every privilege")
    tried = [python] if python else [sys.executable, shutil.which("python3", path=_SYSTEM_PATH)]
    for exe in filter(None, tried):
        try:
            with _lock:
                probe = subprocess.run([exe, "-I", "-c", "pass"], stdin=subprocess.DEVNULL, capture_output=True,
                                       cwd="/", env=_environment("/"), timeout=60,
                                       **_drop(entry.pw_uid, entry.pw_gid))
        except OSError:  # not found, or not executable by that user
            continue
        if probe.returncode == 0:
            return Identity(entry.pw_uid, entry.pw_gid, user, exe, dropped=True)
    raise SandboxError(f"user {user!r} (uid {entry.pw_uid}) cannot run any of the interpreters "
                       f"{', '.join(filter(None, tried))}; give one it can (Sandbox.python)")


def _drop(uid: int, gid: int) -> dict:
    return dict(user=uid, group=gid, extra_groups=[])


def _environment(home: str) -> dict:
    env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    env.setdefault("PATH", os.defpath)
    return {**env, "HOME": home, "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1"}


def run_program(source: str, sandbox: Sandbox = Sandbox()) -> Result:
    """Runs `source` once in its own subprocess under `sandbox` (see the module docstring).
    Raises SandboxError when the sandbox cannot run programs at all (see `identity`)."""
    who = identity(sandbox)
    workdir = tempfile.mkdtemp(prefix="calm-exec-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        if who.dropped:
            os.chown(path, who.uid, who.gid)
            os.chown(workdir, who.uid, who.gid)
        return _run(sandbox, who, workdir)
    finally:
        _remove(workdir)


def run_programs(sources: Sequence[str], sandbox: Sandbox = Sandbox(), workers: int = 4) -> list[Result]:
    """`run_program` for each source, `workers` at a time (each in its own subprocess); results in order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    identity(sandbox)  # fails once, here, rather than in every thread
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, sandbox), sources))


def _run(sandbox: Sandbox, who: Identity, workdir: str) -> Result:
    limits = [sandbox.cpu_limit, sandbox.memory_mb << 20, sandbox.file_size_mb << 20, sandbox.max_processes]
    tail = _Tail(sandbox.output_bytes)
    start = time.monotonic()
    if who.dropped:
        _become_subreaper()
    with _lock:
        proc = subprocess.Popen([who.python, "-I", "-B", "-c", _BOOTSTRAP, *map(str, limits), "program.py"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                bufsize=0, cwd=workdir, env=_environment(workdir), start_new_session=True,
                                umask=0o077, **(_drop(who.uid, who.gid) if who.dropped else {}))
        _running.add(proc.pid)
    with proc.stdout:
        timed_out = _follow(proc, start + sandbox.timeout, tail)
        # The program is done or out of time (and not yet reaped, so its pid still names its
        # group): kill the group, with whatever it started that is still running.
        for kill in (os.kill, os.killpg):
            try:
                kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = proc.wait()
        seconds = time.monotonic() - start
        with _lock:
            _running.discard(proc.pid)
        for _ in range(_MAX_DRAIN):  # what the pipe still holds; bounded, as an escaped process may hold it open
            chunk = _read(proc.stdout.fileno())
            if not chunk:
                break
            tail.add(chunk)
    if who.dropped:
        _sweep(who.uid)
    if timed_out:
        status = "timed_out"
    else:
        status = "passed" if code == 0 else "failed" if code > 0 else "crashed"
    return Result(status, code if code >= 0 else None, _signal_name(-code) if code < 0 else None,
                  round(seconds, 3), tail.text(), tail.truncated)


def _follow(proc: subprocess.Popen, deadline: float, tail: "_Tail") -> bool:
    """Keeps the program's output until it exits (False) or the deadline passes (True); does
    not reap it."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            # With the pipe at EOF (unregistered) this only waits.
            if selector.select(min(left, _POLL_S)):
                chunk = _read(fd)
                if chunk == b"":
                    selector.unregister(fd)
                elif chunk:
                    tail.add(chunk)
    return False


@functools.lru_cache(maxsize=None)
def _become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def _sweep(uid: int) -> None:
    """Reaps the leftovers of finished programs (see the module docstring); when no run is in
    progress, kills them too, until none is left."""
    for _ in range(_SWEEPS):
        with _lock:
            kill = not _running
            left = _leftovers(uid)
            for pid, zombie in left:
                try:
                    if zombie:
                        os.waitpid(pid, 0)
                    elif kill:
                        os.kill(pid, signal.SIGKILL)
                except (ChildProcessError, ProcessLookupError):  # reaped or gone meanwhile
                    pass
        if not kill or not left:
            return
        time.sleep(_POLL_S)


def _leftovers(uid: int) -> list[tuple[int, bool]]:
    """(pid, is a zombie) of this process's children run by `uid` that are no program's own
    process: those handed to it as their subreaper. Call with _lock held."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in _running:
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # already gone
            continue
        if int(fields["PPid"]) == me and int(fields["Uid"].split()[0]) == uid:
            found.append((int(name), fields["State"].split()[0] == "Z"))
    return found


def _read(fd: int) -> bytes | None:
    """One read of a non-blocking pipe: b"" at EOF, None when nothing is there yet."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None


class _Tail:
    """The last `size` bytes of a stream."""

    def __init__(self, size: int):
        self.size, self.data, self.truncated = size, bytearray(), False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.size:
            del self.data[:len(self.data) - self.size]
            self.truncated = True

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _remove(workdir: str) -> None:
    """Deletes a run's directory, also when the program (running as this same user) took away
    permissions inside it. Never follows symbolic links."""
    try:
        shutil.rmtree(workdir)
    except OSError:
        os.chmod(workdir, 0o700)
        for parent, dirs, _ in os.walk(workdir):
            for d in dirs:
                if not os.path.islink(os.path.join(parent, d)):
                    os.chmod(os.path.join(parent, d), 0o700)
        shutil.rmtree(workdir, ignore_errors=True)

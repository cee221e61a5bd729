"""calm_jax.execution: candidates pass or fail as they should, and hostile ones stay contained.

The hostile cases need the real sandbox (this process root, candidates as an unprivileged
user); without it they are skipped, since e.g. a fork bomb would then run unchecked.
"""

import json
import os
import shutil
import tempfile
import time
import uuid

import pytest

from calm_jax import execution
from calm_jax.execution import Sandbox, build_program, run_program, run_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLACK_S = 2.0  # start-up and clean-up allowance on busy CPUs

try:
    IDENTITY = execution.identity()
except execution.SandboxError:  # root, but no unprivileged user to run as: the run tests fail, saying why
    IDENTITY = None
SANDBOXED = IDENTITY is not None and IDENTITY.dropped and IDENTITY.uid != 0
needs_sandbox = pytest.mark.skipif(not SANDBOXED, reason="needs root, to run candidates as an unprivileged user")


def _processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/status") as f:
                if any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in f):
                    pids.append(int(name))
        except (OSError, ValueError):
            continue
    return pids


def test_build_program_is_humaneval_concatenation():
    assert build_program("def f():\n", "    return 1\n", "def check(g):\n    assert g() == 1\n", "f") == (
        "def f():\n    return 1\n\ndef check(g):\n    assert g() == 1\n\ncheck(f)\n")
    assert build_program("P", "C", "T") == "PC\nT\n"
    with pytest.raises(ValueError, match="entry point must be a Python identifier, got 'f\\); import os'"):
        build_program("P", "C", "T", "f); import os")


def test_sandbox_validates_limits():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Sandbox(timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be >= 1"):
        Sandbox(memory_mb=0)
    assert Sandbox(timeout=2.5).cpu_limit == 4 and Sandbox(cpu_seconds=7).cpu_limit == 7


@pytest.mark.parametrize("completion, status, exit_code, said", [
    ("    return a + b\n", "passed", 0, ""),
    ("    return a - b\n", "failed", 1, "AssertionError"),
    ("    return a +\n", "failed", 1, "SyntaxError"),
    ("    import sys; sys.exit(3)\n", "failed", 3, ""),
])
def test_outcomes(completion, status, exit_code, said):
    source = build_program("def add(a, b):\n", completion, "def check(f):\n    assert f(1, 2) == 3\n", "add")
    result = run_program(source, Sandbox(timeout=20))
    assert (result.status, result.exit_code, result.signal) == (status, exit_code, None), result
    assert said in result.output and not result.output_truncated


def test_killed_by_a_signal_is_crashed():
    result = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", Sandbox(timeout=20))
    assert (result.status, result.exit_code, result.signal) == ("crashed", None, "SIGSEGV")


def test_the_child_environment():
    """Identity, environment, isolation flags, limits, working directory; stdin gives EOF."""
    source = """
import json, os, resource, sys
limits = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n)) for n in ("CPU", "AS", "FSIZE", "NPROC", "CORE")}
try:
    input()
    eof = False
except EOFError:
    eof = True
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "env": dict(os.environ),
                  "cwd": os.getcwd(), "mode": oct(os.stat(".").st_mode & 0o777), "owner": os.stat(".").st_uid,
                  "isolated": sys.flags.isolated, "no_bytecode": sys.flags.dont_write_bytecode,
                  "limits": limits, "eof": eof, "stdin": sys.stdin.read(), "pgid": os.getpgid(0), "pid": os.getpid()}))
"""
    result = run_program(source, Sandbox(timeout=20, memory_mb=300, cpu_seconds=5, file_size_mb=2, max_processes=500))
    assert result.status == "passed", result
    seen = json.loads(result.output)
    assert set(seen["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE"}
    assert seen["env"]["HOME"] == seen["env"]["TMPDIR"] == seen["cwd"] and seen["mode"] == "0o700"
    assert seen["isolated"] == 1 and seen["no_bytecode"] == 1 and seen["eof"] and seen["stdin"] == ""
    assert seen["pgid"] == seen["pid"]  # its own process group (and session)
    assert seen["limits"] == {"CPU": [5, 6], "AS": [300 << 20] * 2, "FSIZE": [2 << 20] * 2, "NPROC": [500, 500],
                              "CORE": [0, 0]}
    assert not os.path.exists(seen["cwd"])  # removed afterwards
    if SANDBOXED:
        assert (seen["uid"], seen["gid"], seen["owner"]) == (IDENTITY.uid, IDENTITY.gid, IDENTITY.uid)
        assert set(seen["groups"]) <= {IDENTITY.gid}  # no supplementary groups (root's in particular)


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", Sandbox(timeout=1.5))
    assert (result.status, result.exit_code, result.signal) == ("timed_out", None, "SIGKILL")
    assert 1.5 <= result.seconds < 1.5 + SLACK_S and time.monotonic() - start < 1.5 + SLACK_S


def test_cpu_limit_crashes_before_the_timeout():
    result = run_program("while True:\n    pass\n", Sandbox(timeout=30, cpu_seconds=1))
    assert (result.status, result.signal) == ("crashed", "SIGXCPU") and result.seconds < 30


@pytest.mark.parametrize("bomb", ["x = bytearray(10 * 1024 ** 3)\n",
                                  "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n"])
def test_memory_bomb_is_refused(bomb):
    result = run_program(bomb, Sandbox(timeout=20, memory_mb=256))
    assert result.status in ("failed", "crashed"), result
    assert result.status == "crashed" or "MemoryError" in result.output


def test_file_size_limit():
    result = run_program("open('big', 'wb').write(b'x' * (3 << 20))\n", Sandbox(timeout=20, file_size_mb=1))
    assert result.status == "failed" and "File too large" in result.output, result


def test_infinite_print_is_capped():
    result = run_program("while True:\n    print('spam' * 100)\n", Sandbox(timeout=1.5, output_bytes=1000))
    assert result.status == "timed_out" and result.output_truncated
    assert len(result.output.encode()) <= 1000 and result.output.endswith("spam\n")


def test_chatty_program_is_drained_not_blocked():
    """Far more output than a pipe holds: the program is not stalled, and the tail is kept."""
    result = run_program("for i in range(200000):\n    print(i)\nprint('end')\n", Sandbox(timeout=30, output_bytes=64))
    assert result.status == "passed" and result.output_truncated and result.output.endswith("199999\nend\n")


def test_run_programs_keeps_order():
    sources = [f"import time\ntime.sleep({0.3 * (i % 3)})\nprint({i})\n" for i in range(6)]
    results = run_programs(sources, Sandbox(timeout=20), workers=3)
    assert [r.output for r in results] == [f"{i}\n" for i in range(6)]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_programs(sources, workers=0)


def _snapshot(path: str) -> dict:
    """Names, sizes, mtimes and contents of a directory's entries, and its own mtime."""
    out = {".": os.stat(path).st_mtime_ns}
    for e in os.scandir(path):
        st = e.stat(follow_symlinks=False)
        out[e.name] = (st.st_mtime_ns, st.st_size, st.st_mode, open(e.path, "rb").read() if e.is_file() else None)
    return out


@needs_sandbox
def test_cannot_write_outside_its_directory():
    """Attempts on the repository, an output directory it can read (root's, mode 0755, as the
    CLI's --out may be) and root's home. The output directory is the test's own; the names in
    the repository and /root are unique and removed if a broken sandbox made them."""
    token = f"calm-exec-probe-{uuid.uuid4().hex}"
    out = tempfile.mkdtemp(prefix="calm-exec-test-out-")
    os.chmod(out, 0o755)
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write("{}\n")
    os.chmod(os.path.join(out, "results.json"), 0o644)
    targets = [os.path.join(REPO, token), os.path.join(out, token), os.path.join("/root", token)]
    source = f"""
import os, shutil
out, targets = {out!r}, {targets!r}
for t in targets:
    os.system(f"touch {{t}} 2>/dev/null")
    try:
        open(t, "w").write("pwned")
        print("WROTE", t)
    except OSError as e:
        print("refused", t, type(e).__name__)
for attempt in (lambda: open(os.path.join(out, "results.json"), "a").write("pwned"),
                lambda: os.remove(os.path.join(out, "results.json")),
                lambda: os.chmod(out, 0o777), lambda: shutil.rmtree(out)):
    try:
        attempt()
        print("CHANGED", out)
    except OSError as e:
        print("refused", type(e).__name__)
open("mine.txt", "w").write("its own directory is writable")
print("own", open("mine.txt").read())
"""
    shared = {d: set(os.listdir(d)) for d in (REPO, "/root")}
    before = _snapshot(out)
    try:
        result = run_program(source, Sandbox(timeout=20))
        assert result.status == "passed", result
        assert "WROTE" not in result.output and "CHANGED" not in result.output, result.output
        assert result.output.count("refused") == len(targets) + 4 and "own its own" in result.output
        assert _snapshot(out) == before
        for t in targets:
            assert not os.path.exists(t)
        # Others edit the repository and /root meanwhile: of their listings, only our names are checked.
        for d, names in shared.items():
            assert not [n for n in set(os.listdir(d)) - names if token in n]
    finally:
        for t in targets:
            if os.path.lexists(t):
                os.remove(t)
        shutil.rmtree(out, ignore_errors=True)  # a broken sandbox may have removed it


@needs_sandbox
def test_fork_bomb_is_contained_and_cleaned_up():
    base = len(_processes_of(IDENTITY.uid))  # others of the user count against RLIMIT_NPROC too
    start = time.monotonic()
    result = run_program("import os\nwhile True:\n    os.fork()\n", Sandbox(timeout=10, max_processes=base + 16))
    assert result.status in ("failed", "timed_out", "crashed")
    assert time.monotonic() - start < 10 + SLACK_S
    assert len(_processes_of(IDENTITY.uid)) <= base  # every process it made killed and reaped


@needs_sandbox
def test_processes_escaping_the_group_are_killed_afterwards():
    """A daemon (new session: out of reach of the group kill) outlives the program; the run
    kills and reaps it once the program is done, whether it passed or timed out."""
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(300)\n"
    base = len(_processes_of(IDENTITY.uid))
    for tail, status in (("print('done')\n", "passed"), ("time.sleep(300)\n", "timed_out")):
        result = run_program(daemon + tail, Sandbox(timeout=1.5))
        assert result.status == status
        assert len(_processes_of(IDENTITY.uid)) <= base

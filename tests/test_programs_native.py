"""Native runs of the multi-process guest programs in guest/programs/.

Every program is compiled once (static musl, with the same `ziglang cc` the
project uses for guests) into a temporary directory and run as an ordinary
Linux process.  The expected stdout below is exact; the VM tests compare the
thread-fork and VM-clone runs of the same binaries against these same values
(in the thread-fork VM only semantics.c differs, see SEMANTICS_THREAD_FORK).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM_DIR = ROOT / "guest" / "programs"

PROGRAMS = [
    "fork_exit_wait",
    "pipe_throughput",
    "token_ring",
    "dup2_pipe",
    "pipe_eof",
    "sigpipe",
    "semantics",
    "ids",
    "wait_variants",
    "kill_test",
    "pgroup_rules",
    "fork_bomb",
    "fd_independent",
    "deadlock",
    "prefork_server",
    "vfork_test",
    "orphan",
    "nested_fork",
]


def _lines(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def fnv1a_pattern(nbytes: int) -> str:
    """Reference checksum of pipe_throughput's stream (FNV-1a 64 over pattern(i))."""
    h = 0xCBF29CE484222325
    mask = (1 << 64) - 1
    for i in range(nbytes):
        x = i & 0xFFFFFFFF
        x ^= x >> 7
        x = (x * 0x9E3779B1) & 0xFFFFFFFF
        h ^= x >> 24
        h = (h * 0x100000001B3) & mask
    return f"{h:016x}"


# Computed once with fnv1a_pattern(64 << 20) (it takes about a minute in Python).
CHECKSUM_64MIB = "e49d43a8b87a8265"

SEMANTICS_NATIVE = _lines(
    "global=private",
    "stack=private",
    "heap_from_stack=private",
    "heap_from_global=private",
    "errno=private",
    "fd_table=private",
)
# What the thread-fork VM must print instead (the documented difference).
SEMANTICS_THREAD_FORK = _lines(
    "global=shared",
    "stack=private",
    "heap_from_stack=private",
    "heap_from_global=shared",
    "errno=private",
    "fd_table=private",
)

# (test id, program, args, expected exit status, exact expected stdout)
CASES: list[tuple[str, str, list[str], int, str]] = [
    ("fork_exit_wait", "fork_exit_wait", [], 0, _lines("ok 100 children")),
    ("fork_exit_wait-n0", "fork_exit_wait", ["-n", "0"], 0, _lines("ok 0 children")),
    ("fork_exit_wait-n7", "fork_exit_wait", ["-n", "7"], 0, _lines("ok 7 children")),
    (
        "pipe_throughput",
        "pipe_throughput",
        [],
        0,
        _lines(f"bytes={64 << 20} checksum={CHECKSUM_64MIB}"),
    ),
    (
        "pipe_throughput-m1",
        "pipe_throughput",
        ["-m", "1"],
        0,
        _lines(f"bytes={1 << 20} checksum={fnv1a_pattern(1 << 20)}"),
    ),
    (
        "pipe_throughput-m0",
        "pipe_throughput",
        ["-m", "0"],
        0,
        _lines("bytes=0 checksum=cbf29ce484222325"),
    ),
    ("token_ring", "token_ring", [], 0, _lines("token=80")),
    ("token_ring-n1", "token_ring", ["-n", "1", "-r", "3"], 0, _lines("token=3")),
    ("token_ring-n2", "token_ring", ["-n", "2", "-r", "1"], 0, _lines("token=2")),
    ("token_ring-n16", "token_ring", ["-n", "16", "-r", "50"], 0, _lines("token=800")),
    ("token_ring-r0", "token_ring", ["-n", "3", "-r", "0"], 0, _lines("token=0")),
    (
        "dup2_pipe",
        "dup2_pipe",
        [],
        0,
        _lines(
            "from child: line 1 of 5: stdout is a pipe now",
            "from child: line 2 of 5: printed with printf",
            "from child: line 3 of 5: 0x2a 42 -42",
            "from child: line 4 of 5: " + "x" * 100,
            "from child: line 5 of 5: last line",
            "child exited 0",
        ),
    ),
    (
        "pipe_eof",
        "pipe_eof",
        [],
        0,
        _lines(
            "writers: parent, A, B",
            "parent closed its write end",
            'A wrote "hello from A" and closed its write end',
            'parent read "hello from A"',
            'parent read "hello from B" (B still holds its write end)',
            "parent read returned 0 (EOF) after B, the last writer, closed",
            "reaped A and B: status 0",
        ),
    ),
    (
        "sigpipe",
        "sigpipe",
        [],
        0,
        _lines(
            "case A: writer killed by SIGPIPE",
            "case B: write returned -1 errno=EPIPE",
            "parent SIGPIPE disposition still SIG_DFL",
        ),
    ),
    ("semantics", "semantics", [], 0, SEMANTICS_NATIVE),
    (
        "ids",
        "ids",
        [],
        0,
        _lines(
            "ok fork() returned the child's getpid()",
            "ok child getppid() == parent getpid()",
            "ok gettid() == getpid() in parent",
            "ok gettid() == getpid() in child",
            "ok gettid() == getpid() in grandchild",
            "ok grandchild getppid() == child's pid",
            "ok parent, child and grandchild pids distinct",
            "ok child inherited errno and set its own",
            "ok parent errno unchanged by the child",
            "ok child and grandchild exited 0",
        ),
    ),
    (
        "wait_variants",
        "wait_variants",
        [],
        0,
        _lines(
            "WNOHANG: 0 while child alive",
            "waitpid: reaped released child, status 0",
            "wait: reaped 3 children, statuses 11 12 13",
            "waitpid: reaped 2 children in chosen order",
            "ECHILD: waitpid(-1), waitpid(-1, WNOHANG) and wait() with no children",
            "wait4: status 5, rusage filled",
            "exit(3): WIFEXITED status=3",
            "raise(SIGTERM): WIFSIGNALED sig=SIGTERM",
            "abort(): WIFSIGNALED sig=SIGABRT",
            "kill(getpid(), SIGKILL): WIFSIGNALED sig=SIGKILL",
            "NULL store: WIFSIGNALED sig=SIGSEGV",
        ),
    ),
    (
        "pgroup_rules",
        "pgroup_rules",
        [],
        0,
        _lines(
            "setpgid(0, -1): Invalid argument",
            "setpgid(no such pid, 0): No such process",
            "setpgid(0, 0): ok",
            "setsid() as a group leader: Operation not permitted",
            "setpgid(0, the group it started in): ok",
            "setpgid(0, 0) again: ok",
            "waitpid(0) after the child's setsid: No child process",
            "setpgid(child in another session, my group): Operation not permitted",
            "child with its own session: reaped, exit 0",
            "setpgid(child, 0x3ffffff1: no such group): Operation not permitted",
            "setpgid(child, child): ok",
            "waitpid(0) after moving the child: No child process",
            "waitpid(-child) while it runs: ok",
            "child moved by its parent, waitpid(-child): reaped, exit 0",
            "waitpid(0) after the child's setpgid(0, 0): No child process",
            "child in a group of its own, waitpid(-child): reaped, exit 0",
            "waitpid(0) with a child in my group: ok",
            "child in my group, waitpid(0): reaped, exit 0",
        ),
    ),
    (
        "kill_test",
        "kill_test",
        [],
        0,
        _lines(
            "kill(child, 0) = 0 while child alive",
            "kill(child, SIGTERM): WIFSIGNALED sig=SIGTERM",
            "kill(reaped child, 0) = -1 ESRCH",
            "setpgid: both children in a new group, parent not",
            "kill(-pgid, SIGKILL): both children WIFSIGNALED sig=SIGKILL",
            "kill(-pgid, 0) = -1 ESRCH after reaping",
        ),
    ),
    ("fork_bomb", "fork_bomb", [], 0, _lines("reached max", "forked=64", "reaped=64")),
    ("fork_bomb-n5", "fork_bomb", ["-n", "5"], 0, _lines("reached max", "forked=5", "reaped=5")),
    ("fork_bomb-n0", "fork_bomb", ["-n", "0"], 0, _lines("reached max", "forked=0", "reaped=0")),
    (
        "fd_independent",
        "fd_independent",
        [],
        0,
        _lines(
            "child closed its copy of both ends (write there: EBADF)",
            'parent\'s pipe still works: read "ping"',
            "parent closed its copy of both ends of a second pipe",
            'child\'s pipe still works: read "pong"',
            "reaped child, status 0",
        ),
    ),
    # Natively only the usage path: with --forever it really hangs.
    ("deadlock-usage", "deadlock", [], 2, ""),
    ("deadlock-badflag", "deadlock", ["--now"], 2, ""),
    ("prefork_server", "prefork_server", [], 0, _lines("jobs=200 ok")),
    ("prefork_server-w1", "prefork_server", ["-w", "1", "-j", "50"], 0, _lines("jobs=50 ok")),
    ("prefork_server-j0", "prefork_server", ["-w", "3", "-j", "0"], 0, _lines("jobs=0 ok")),
    (
        "prefork_server-big",
        "prefork_server",
        ["-w", "8", "-j", "5000"],
        0,
        _lines("jobs=5000 ok"),
    ),
    ("vfork_test", "vfork_test", [], 0, _lines("vfork ok")),
    (
        "orphan",
        "orphan",
        [],
        0,
        _lines("child exited 0 and was reaped", "reparented=yes"),
    ),
    ("nested_fork", "nested_fork", [], 0, _lines("leaves=27 total=378")),
]

TIMEOUT = 60


def _compile(name: str, outdir: Path) -> tuple[str, Path, subprocess.CompletedProcess]:
    src = PROGRAM_DIR / f"{name}.c"
    out = outdir / name
    cmd = [
        sys.executable, "-m", "ziglang", "cc",
        "-target", "x86_64-linux-musl", "-static", "-O2", "-Wall", "-Wextra",
        str(src), "-o", str(out),
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(Path.home() / ".cache" / "unifork" / "zig"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return name, out, proc


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outdir = tmp_path_factory.mktemp("programs")
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda n: _compile(n, outdir), PROGRAMS))
    failures = []
    for name, _out, proc in results:
        if proc.returncode != 0 or "warning:" in proc.stderr:
            failures.append(f"{name}: rc={proc.returncode}\n{proc.stderr}")
    assert not failures, "compilation failed or warned:\n" + "\n".join(failures)
    return {name: out for name, out, _ in results}


@contextmanager
def _no_core() -> Iterator[None]:
    """abort() and SIGSEGV children must not leave core files behind. The limit is
    lowered in this process around the spawn, not in a preexec_fn: Python code run in
    a forked child of a process with gRPC threads can abort in gRPC's fork handlers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def run(binary: Path, args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    with _no_core():
        return subprocess.run(
            [str(binary), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def test_every_program_has_a_case() -> None:
    assert {case[1] for case in CASES} == set(PROGRAMS)
    for name in PROGRAMS:
        assert (PROGRAM_DIR / f"{name}.c").is_file(), name


@pytest.mark.parametrize(
    ("prog", "args", "rc", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_native_output(
    binaries: dict[str, Path], prog: str, args: list[str], rc: int, expected: str
) -> None:
    proc = run(binaries[prog], args)
    assert proc.returncode == rc, (
        f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert proc.stdout == expected, f"stderr:\n{proc.stderr}"
    if rc == 0:
        assert proc.stderr == ""


def test_deadlock_usage_on_stderr(binaries: dict[str, Path]) -> None:
    proc = run(binaries["deadlock"], [])
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "--forever" in proc.stderr


def test_semantics_is_stable(binaries: dict[str, Path]) -> None:
    # The probe must not depend on scheduling: run it a few more times.
    for _ in range(5):
        proc = run(binaries["semantics"], [])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == SEMANTICS_NATIVE


def test_fork_exit_wait_timing(binaries: dict[str, Path]) -> None:
    proc = run(binaries["fork_exit_wait"], ["-t", "-n", "20"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 21
    for line in lines[:-1]:
        m = re.fullmatch(r"fork_wait_us=(\d+\.\d{3})", line)
        assert m, line
        assert float(m.group(1)) > 0
    assert lines[-1] == "ok 20 children"


def test_pipe_throughput_timing(binaries: dict[str, Path]) -> None:
    proc = run(binaries["pipe_throughput"], ["-t", "-m", "2"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"bytes={2 << 20} checksum={fnv1a_pattern(2 << 20)}"
    m = re.fullmatch(r"mib_per_s=(\d+\.\d{3})", lines[1])
    assert m and float(m.group(1)) > 0, lines
    assert len(lines) == 2


@pytest.mark.parametrize("prog", ["fork_exit_wait", "token_ring", "prefork_server", "fork_bomb"])
def test_bad_option_exits_2(binaries: dict[str, Path], prog: str) -> None:
    proc = run(binaries[prog], ["-Z"])
    assert proc.returncode == 2
    assert proc.stdout == ""

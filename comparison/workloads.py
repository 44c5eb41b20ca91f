"""The workloads of ``unifork compare``: guest programs, their arguments, their figure.

Each workload names a built-in guest program (``guest/programs/<name>.c``,
whose header comment documents its options and output), its arguments in a
quick and a full run, the figure taken from one run, and a check of the
run's output: a run whose output is not what the program prints when it
worked raises :class:`OutputError` instead of giving a number.

Figures come either from the program itself (``key=<value>`` lines, timed
with ``CLOCK_MONOTONIC`` inside the program: the guest's clock is the host's)
or, for whole-program workloads, from the host: launch to exit, which in a VM
includes creating the VM(s).

The real-program workloads (issue 14) run programs of one baked image
(:data:`BAKED`): dash from Debian's sources and our ``cat`` (both from
``tender_service.toolchain.thirdparty``, the builds tests/test_shell.py runs)
and ``system_loop``; natively the very same binaries from one directory on
PATH.  Where dash cannot be had they are skipped, with the reason.  A mode
that cannot run a workload for a documented reason (``known_limits``) still
shows its cell FAILED with the error, counted apart from the failures.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comparison.modes import Outcome

SEMANTICS_ITEMS = ("global", "stack", "heap_from_stack", "heap_from_global", "errno", "fd_table")
HAZARD_ITEMS = (
    "int_looking_like_stack_ptr",
    "heap_second_level",
    "hoisted_errno",
    "int_looking_like_global_ptr",
)


class OutputError(RuntimeError):
    """A run exited 0 but its output is not what the program prints when it worked."""


def values(stdout: str, key: str) -> list[float]:
    """Every ``key=<float>`` at the start of a line."""
    found = [float(m) for m in re.findall(rf"^{re.escape(key)}=([0-9.eE+-]+)$", stdout, re.M)]
    if not found:
        raise OutputError(f"no {key}= line in the output: {stdout[-300:]!r}")
    return found


def words(stdout: str, items: tuple[str, ...]) -> dict[str, str]:
    """``item=<word>`` lines for every item (e.g. ``global=shared``)."""
    out = {}
    for item in items:
        m = re.search(rf"^{re.escape(item)}=(\w+)$", stdout, re.M)
        if m is None:
            raise OutputError(f"no {item}= line in the output: {stdout[-300:]!r}")
        out[item] = m.group(1)
    return out


def _need(*lines: str) -> Callable[[str], None]:
    def check(stdout: str) -> None:
        have = stdout.splitlines()
        missing = [ln for ln in lines if ln not in have]
        if missing:
            raise OutputError(f"missing line(s) {missing} in the output: {stdout[-300:]!r}")

    return check


@dataclass(frozen=True)
class Workload:
    key: str
    title: str  # what the figure is, for the legend and the plots
    program: str
    quick_args: tuple[str, ...]
    full_args: tuple[str, ...]
    metric: str  # name of the figure in the JSON/CSV
    unit: str  # us | ms | MiB/s
    better: str  # lower | higher
    extract: Callable[[Outcome], list[float]]
    check: Callable[[str], None]
    notes: tuple[str, ...] = field(default=())
    #: leading figures of every run kept apart from the median (the first fork of a loop);
    #: they are stored in the run's ``excluded`` list and shown by the report, never dropped
    exclude_first: int = 0
    #: "" : ``program`` is a built-in guest image; :data:`BAKED`: ``program`` is a path in the
    #: real-program image (natively: that binary of the directory on PATH); ``{bin}`` in the
    #: arguments is that directory (``/bin`` in a VM)
    image: str = ""
    #: a run of the same program with these arguments precedes each run in the same task; its
    #: launch-to-exit time is the run's ``baseline_wall`` (what the figure subtracts)
    baseline_args: tuple[str, ...] | None = None
    #: (mode, why): modes known not to run this workload (a documented limit); their cell
    #: still runs and shows FAILED with the error, listed apart from the failures
    known_limits: tuple[tuple[str, str], ...] = ()
    #: in a run without --only; the issue-14 micro-benchmarks (exec, tmpfs) run on request
    default: bool = True

    def args(self, quick: bool) -> tuple[str, ...]:
        return self.quick_args if quick else self.full_args


def _wall_ms(o: Outcome) -> list[float]:
    return [o.wall * 1e3]


def _fork_us(o: Outcome) -> list[float]:
    return values(o.stdout, "fork_us")


def _fork_wait_us(o: Outcome) -> list[float]:
    return values(o.stdout, "fork_wait_us")


def _mib_per_s(o: Outcome) -> list[float]:
    return values(o.stdout, "mib_per_s")[:1]


def _shell_loop_ms(o: Outcome) -> list[float]:
    """Per iteration: (launch to exit of N iterations - of 0 iterations) / N, so that starting
    the VM (natively the process) and dash is left out."""
    n = int(values(o.stdout, "iterations")[0])
    if o.baseline_wall is None or n <= 0:
        raise OutputError("shell_loop: no baseline run or no iterations")
    return [(o.wall - o.baseline_wall) / n * 1e3]


def _check_shell_loop(stdout: str) -> None:
    n = int(values(stdout, "iterations")[0])
    if n > 0 and values(stdout, "last") != [n - 1]:
        raise OutputError(f"shell_loop: /tmp/f does not hold {n - 1}: {stdout[-300:]!r}")


def _exec_us(o: Outcome) -> list[float]:
    return values(o.stdout, "exec_us")


def _check_exec_chain(stdout: str) -> None:
    n = values(stdout, "execs")
    if not n or n[0] <= 0 or len(values(stdout, "exec_us")) != n[0]:
        raise OutputError(f"exec_chain: not one exec_us line per exec: {stdout[-300:]!r}")


def _write_mib_per_s(o: Outcome) -> list[float]:
    return values(o.stdout, "write_mib_per_s")


def _read_mib_per_s(o: Outcome) -> list[float]:
    return values(o.stdout, "read_mib_per_s")


def _check_fs_bench(stdout: str) -> None:
    n = int(TMPFS_MIB) << 20
    _need(f"wrote {n} bytes", f"read {n} bytes")(stdout)


def _system_us(o: Outcome) -> list[float]:
    return values(o.stdout, "system_us")


def _check_system_loop(stdout: str) -> None:
    if not re.search(r"^system_summary .* ok=1$", stdout, re.M):
        raise OutputError(f"system_loop: no 'ok=1' summary line: {stdout[-300:]!r}")


def _check_semantics(stdout: str) -> None:
    bad = {
        k: v for k, v in words(stdout, SEMANTICS_ITEMS).items() if v not in ("shared", "private")
    }
    if bad:
        raise OutputError(f"semantics: unexpected values {bad}")


def _check_hazards(stdout: str) -> None:
    words(stdout, HAZARD_ITEMS)


def _check_fork_time(stdout: str) -> None:
    if not re.search(r"^fork_summary .* ok=1$", stdout, re.M):
        raise OutputError(f"fork_time: no 'ok=1' summary line: {stdout[-300:]!r}")


def _rtt_us(o: Outcome) -> list[float]:
    return values(o.stdout, "rtt_us")


def _check_pingpong(stdout: str) -> None:
    m = re.search(r"^pingpong rounds=(\d+) ok=1$", stdout, re.M)
    if m is None or len(values(stdout, "rtt_us")) != int(m.group(1)):
        raise OutputError(f"poll_pingpong: not one rtt_us line per round: {stdout[-300:]!r}")


def _check_pipe_bw(stdout: str) -> None:
    m = re.search(r"^bytes=(\d+) blocks=(\d+)$", stdout, re.M)
    if m is None or int(m.group(1)) != int(m.group(2)) * 65536:
        raise OutputError(f"pipe_bw: no bytes= line: {stdout[-300:]!r}")


#: the real-program image: what the baked workloads run, at these paths
BAKED = "baked"
SHELL, CAT, SYSTEM_LOOP = "/bin/sh", "/bin/cat", "/bin/system_loop"
EXEC_CHAIN = "/bin/exec_chain"
EXEC_CHAIN_N = (20, 100)
#: tmpfs throughput: this many MiB written then read in 64 KiB blocks, in /dev/shm (a
#: tmpfs natively; the instance's tree in a VM, the supervisor's in VM-clone mode)
TMPFS_MIB = "8"
SHELL_LOOP_N = (20, 100)  # iterations (quick, full)
SYSTEM_LOOP_N = (10, 50)


def shell_loop_script(n: int) -> str:
    """The pipeline loop of issue 14 (fork + exec + pipe + file per iteration), then what
    /tmp/f holds (``read``, a builtin: no fork) and the count."""
    return (
        f'i=0; while [ $i -lt {n} ]; do echo $i | cat > "$W/f"; i=$((i+1)); done; '
        '[ $i -eq 0 ] || { read last < "$W/f"; echo "last=$last"; }; echo "iterations=$i"'
    )


_THREAD_SHELL = (
    "thread fork shares globals and the heap with the parent (docs/semantics.md): dash's "
    "forked pipeline children run shell code that overwrites the parent's state"
)

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "fork_time",
        "fork, parent side (listing 4.1 style: fork_time -n N)",
        "fork_time",
        ("-n", "20"),
        ("-n", "50"),
        "fork_us",
        "us",
        "lower",
        _fork_us,
        _check_fork_time,
        (
            "time from just before fork() to its return in the parent, per fork; the first "
            "fork of every run excluded (kept in the JSON as each run's 'excluded'; the cold "
            "first fork is measured on its own, see the cold-first-fork table)",
        ),
        1,
    ),
    Workload(
        "pipe_talk",
        "parent and child talk over a pipe (listing 4.2 style), launch to exit",
        "pipe_talk",
        (),
        (),
        "wall_ms",
        "ms",
        "lower",
        _wall_ms,
        _need("parent: EOF after 3 messages", "parent: child exited with status 0"),
        (
            "whole program, launch to exit (a VM's creation included); the child edits a copy "
            "of the message, not the literal (that would crash natively)",
        ),
    ),
    Workload(
        "fork_exit_wait",
        "fork + _exit + waitpid x100 (fork_exit_wait -t)",
        "fork_exit_wait",
        ("-t", "-n", "100"),
        ("-t", "-n", "100"),
        "fork_wait_us",
        "us",
        "lower",
        _fork_wait_us,
        _need("ok 100 children"),
        (
            "per iteration: fork, the child exits, the parent reaps it and checks its status; "
            "first iteration of every run excluded (kept in the JSON as each run's "
            "'excluded')",
        ),
        1,
    ),
    Workload(
        "pipe_bw",
        "pipe throughput in 64 KiB writes (pipe_bw -m MiB)",
        "pipe_bw",
        ("-m", "64"),
        ("-m", "64"),
        "mib_per_s",
        "MiB/s",
        "higher",
        _mib_per_s,
        _check_pipe_bw,
        (
            "child writes, parent reads and checks every block's sequence words; timed from "
            "the first read to EOF inside the program",
        ),
    ),
    Workload(
        "poll_pingpong",
        "a byte back and forth over two pipes, each side waiting in poll() (poll_pingpong)",
        "poll_pingpong",
        ("-n", "40"),
        ("-n", "200"),
        "rtt_us",
        "us",
        "lower",
        _rtt_us,
        _check_pingpong,
        (
            "per round trip, timed by the parent: how soon a process waiting in poll() learns "
            "that another process wrote to its pipe (two such wake-ups a round trip); the "
            "first round trip of every run excluded (kept in the JSON as 'excluded')",
            "across VMs a pipe ring (shm) wakes a poller itself; over tcp the broker sends "
            "the poller's VM a POLL_WAKE, which then asks the broker again",
        ),
        1,
    ),
    Workload(
        "poll_accept",
        "a TCP connection a round to a listener the child waits on in poll() (poll_pingpong -l)",
        "poll_pingpong",
        ("-l", "-n", "20"),
        ("-l", "-n", "100"),
        "rtt_us",
        "us",
        "lower",
        _rtt_us,
        _check_pingpong,
        (
            "per round, timed by the parent: connect over loopback, send a byte, the child "
            "(in poll() on the listener it inherited) accepts, waits in poll() for the byte "
            "and answers (an event-driven server's accept path); first round of every run "
            "excluded (kept in the JSON as 'excluded')",
        ),
        1,
    ),
    Workload(
        "token_ring",
        "8-process token ring, 10 rounds (token_ring -n 8), launch to exit",
        "token_ring",
        ("-n", "8"),
        ("-n", "8"),
        "wall_ms",
        "ms",
        "lower",
        _wall_ms,
        _need("token=80"),
    ),
    Workload(
        "prefork_server",
        "prefork server: 4 workers, 200 jobs on one pipe, launch to exit",
        "prefork_server",
        ("-w", "4", "-j", "200"),
        ("-w", "4", "-j", "200"),
        "wall_ms",
        "ms",
        "lower",
        _wall_ms,
        _need("jobs=200 ok"),
    ),
    Workload(
        "semantics",
        "semantics probe (what a child's writes reach), launch to exit",
        "semantics",
        (),
        (),
        "wall_ms",
        "ms",
        "lower",
        _wall_ms,
        _check_semantics,
    ),
    Workload(
        "fork_hazards",
        "fork hazards probe (limits of the in-VM forks), launch to exit",
        "fork_hazards",
        (),
        (),
        "wall_ms",
        "ms",
        "lower",
        _wall_ms,
        _check_hazards,
    ),
    Workload(
        "shell_loop",
        "dash: while loop of `echo $i | cat > /tmp/f`, per iteration",
        SHELL,
        ("-c", shell_loop_script(SHELL_LOOP_N[0])),
        ("-c", shell_loop_script(SHELL_LOOP_N[1])),
        "iteration_ms",
        "ms",
        "lower",
        _shell_loop_ms,
        _check_shell_loop,
        (
            "dash (Debian's source, unifork cc) with our cat, one baked image; per iteration "
            "(a pipeline: dash forks for echo and for cat, cat is exec'd, its output goes to "
            "a file) = (launch to exit of the script with N iterations - with 0 iterations, "
            "run just before in the same task) / N: starting the VM and dash left out; "
            "W=/tmp in a VM, a fresh directory natively",
        ),
        image=BAKED,
        baseline_args=("-c", shell_loop_script(0)),
        known_limits=(("thread", _THREAD_SHELL),),
    ),
    Workload(
        "system_loop",
        'system("exit K") with dash as /bin/sh, per call (system_loop -n N)',
        SYSTEM_LOOP,
        ("-n", str(SYSTEM_LOOP_N[0]), "-s", "{bin}/sh"),
        ("-n", str(SYSTEM_LOOP_N[1]), "-s", "{bin}/sh"),
        "system_us",
        "us",
        "lower",
        _system_us,
        _check_system_loop,
        (
            "per call, in-program CLOCK_MONOTONIC: what musl's system() does (posix_spawn: "
            "clone(CLONE_VM|CLONE_VFORK) + execve of dash -c 'exit K', then waitpid; the "
            "status checked) with the shell's path given ({bin}/sh: /bin/sh in a VM, natively "
            "the same dash from the directory on PATH); "
            "first call of every run excluded (kept in the JSON as each run's 'excluded')",
        ),
        1,
        image=BAKED,
    ),
    Workload(
        "exec_chain",
        "execve of a static-PIE from the file system, per exec (exec_chain N)",
        EXEC_CHAIN,
        (str(EXEC_CHAIN_N[0]),),
        (str(EXEC_CHAIN_N[1]),),
        "exec_us",
        "us",
        "lower",
        _exec_us,
        _check_exec_chain,
        (
            "the program execs itself N times (no fork): per exec, in-program CLOCK_MONOTONIC "
            "from just before execve to the new image's main; each exec loads the ELF from the "
            "instance's file system (the supervisor's in VM-clone mode) and starts musl; "
            "first exec of every run excluded (the cold one: kept in the JSON as each run's "
            "'excluded')",
        ),
        1,
        image=BAKED,
        default=False,
    ),
    Workload(
        "tmpfs_write",
        f"tmpfs write, {TMPFS_MIB} MiB in 64 KiB blocks (fs_bench)",
        "fs_bench",
        ("/dev/shm/", TMPFS_MIB, "figures"),
        ("/dev/shm/", TMPFS_MIB, "figures"),
        "mib_per_s",
        "MiB/s",
        "higher",
        _write_mib_per_s,
        _check_fs_bench,
        (
            "write(2) of 64 KiB blocks to a new file in /dev/shm (natively Linux's tmpfs), "
            "in-program CLOCK_MONOTONIC; VM-clone: every block goes to the supervisor",
        ),
        default=False,
    ),
    Workload(
        "tmpfs_read",
        f"tmpfs read, {TMPFS_MIB} MiB in 64 KiB blocks (fs_bench)",
        "fs_bench",
        ("/dev/shm/", TMPFS_MIB, "figures"),
        ("/dev/shm/", TMPFS_MIB, "figures"),
        "mib_per_s",
        "MiB/s",
        "higher",
        _read_mib_per_s,
        _check_fs_bench,
        ("read(2), in 64 KiB blocks, of the file the same run just wrote",),
        default=False,
    ),
)

BY_KEY = {w.key: w for w in WORKLOADS}

#: the cold first fork, the thesis's way (listing 4.1): ``fork_time`` with no arguments forks
#: once and each process prints ``fork took: <s>s`` (gettimeofday around the fork) and then
#: ``parent`` or ``child``; shown next to this workload's warm loop
COLD_PROGRAM = "fork_time"
COLD_WORKLOAD = "fork_time"
_PARENT_TOOK = re.compile(r"^fork took: ([0-9]+\.[0-9]+)s\nparent$", re.M)
_CHILD_TOOK = re.compile(r"^fork took: ([0-9]+\.[0-9]+)s\nchild$", re.M)


def parent_fork_us(stdout: str) -> float:
    """The parent's ``fork took`` of one single-fork ``fork_time`` run, in microseconds.

    Each process prints its two lines with one write (the parent flushes, the
    child's stdout is flushed at exit), so the parent's pair is contiguous in
    the merged stream; exactly one parent and one child pair must be there.
    """
    parent, child = _PARENT_TOOK.findall(stdout), _CHILD_TOOK.findall(stdout)
    if len(parent) != 1 or len(child) != 1:
        raise OutputError(
            f"fork_time: expected one parent and one child 'fork took' line: {stdout[-300:]!r}"
        )
    return round(float(parent[0]) * 1e6, 3)


#: the program for the memory and scaling experiments: N children blocked on a pipe
SCALE_PROGRAM = "fork_scale"


def scale_ready_us(o: Outcome, n: int) -> tuple[float, float]:
    """(fork_all_us, ready_all_us) of one ``fork_scale -n N`` run, its output checked."""
    _need(f"children={n}", f"reaped={n}")(o.stdout)
    return values(o.stdout, "fork_all_us")[0], values(o.stdout, "ready_all_us")[0]

"""VM-clone fork: every process in a VM of its own, in a tender process of a warm pool.

Real tender processes, real sockets and shared memory, nothing mocked.  One
``WarmPool`` of 2 tender processes serves the whole module; after every
instance the module checks that nothing is left behind: no VM on any tender
process, no ``/dev/shm`` segment of the shm transport, no child process of
this test process other than the pool's tender processes.

1. the thread-fork programs give exactly their native stdout, over shm and tcp;
2. the POSIX copy semantics (semantics, fork_hazards) against thread fork;
3. pipes across VMs: a 16 MiB fan-in of atomic records (pipe_fanin.c), a
   4-VM ring, EOF and SIGPIPE, 100 children reaped;
4. the process tree, wait across VMs, an orphan VM that outlives its parent;
5. one console stream, per-process order, every chunk tagged with its pid;
6. faults: a tender process killed, a transport connection dropped;
7. deadlock across VMs; 8. the time limit; 9. cleanup and the CLI;
10. the snapshot format: refusals, and a property test on mutated snapshots.

New guest programs: guest/programs/pipe_fanin.c and vmclone_probe.c (their
header comments give the expected output).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import functools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import channel_segments, image_path, native, vm, wait_until
from test_programs_native import CASES, SEMANTICS_NATIVE, SEMANTICS_THREAD_FORK
from test_thread_fork import FORK_HAZARDS_NATIVE, FORK_HAZARDS_VM, deadlock_report

from tender_service import protos
from tender_service.fork import snapshot
from tender_service.fork.snapshot import MAGIC, SNAPSHOT_VERSION, SnapshotError
from tender_service.instance import localstart
from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import PoolStartError, WarmPool
from tender_service.instance.supervisor import ProcRec, Supervisor
from tender_service.instance.worker import PeerServicer
from tender_service.machine.errors import GuestError
from tender_service.rump.console import Console
from tender_service.rump.vminfo import FORK_PHASES, ProcInfo, RunResult, VmConfig
from tender_service.toolchain.cc import HOST_LIBRARIES
from tender_service.toolchain.images import build_image
from tender_service.toolchain.paths import images_dir, zig_cache_dir
from tender_service.transports.channel import connect_channel
from tender_service.transports.frames import HELLO_MAGIC, ChannelClosed, encode_hello
from tender_service.transports.pipe_ring import PipeRing, new_token, wake_pipe
from tender_service.transports.protocol import PIPE_REFS
from tender_service.transports.shm_names import owner
from tender_service.transports.vmlink import call_payload
from tender_service.vm import DEFAULT_ENV, CaptureSink, create_vm, run_vm

INIT_PID, MAIN_PID = 1, 2
SIGKILL, SIGPIPE, SIGSEGV = signal.SIGKILL.value, signal.SIGPIPE.value, signal.SIGSEGV.value
TRANSPORTS = ["shm", "tcp"]
POOL_SIZE = 2
PIPE_CAPACITY = 64 << 10
WAIT = 20.0  # seconds to wait for a condition before failing


def lines(*text: str) -> str:
    return "".join(t + "\n" for t in text)


def wait_for(cond: Callable[[], object], what: str, timeout: float = WAIT) -> object:
    return wait_until(cond, timeout, what, 0.02)


# -- host processes and shared memory ---------------------------------------------------
def ppid_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def child_pids() -> set[int]:
    """This test process's children (zombies included), from /proc; not counted:
    Python's multiprocessing resource tracker, a helper that lives as long as we do."""
    me = os.getpid()
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {
        int(d)
        for d in os.listdir("/proc")
        if d.isdigit() and ppid_of(int(d)) == me and int(d) != tracker
    }


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def processes_with_env(marker: str) -> set[int]:
    """Pids of processes whose environment holds ``marker`` (NAME=VALUE)."""
    found = set()
    needle = marker.encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                    found.add(int(d))
    return found


def shm_segments() -> set[str]:
    """unifork's names in /dev/shm (pipe rings, wake-up FIFOs: transports/shm_names.py)."""
    return {n for n in os.listdir("/dev/shm") if owner(n) is not None}


def leaked_segments(before: set[str], ours: set[int]) -> set[str]:
    """New names in /dev/shm, except those of live processes that are not ours
    (another test run on this machine may be using its own meanwhile)."""
    return {n for n in shm_segments() - before if owner(n) in ours or not pid_exists(owner(n) or 0)}


def vms_on(address: str) -> int:
    """How many VMs the tender process at ``address`` hosts (Peer.GetLoad)."""
    pb2, pb2_grpc = protos.peer()
    with grpc.insecure_channel(address) as ch:
        return pb2_grpc.PeerStub(ch).GetLoad(pb2.LoadRequest(), timeout=10).vms


# -- instances ------------------------------------------------------------------------------
@dataclass
class Run:
    result: RunResult
    sink: CaptureSink

    @property
    def out(self) -> str:
        return bytes(self.sink.stdout).decode(errors="replace")

    @property
    def err(self) -> str:
        return bytes(self.sink.stderr).decode(errors="replace")

    @property
    def rows(self) -> dict[int, ProcInfo]:
        return {p.pid: p for p in self.result.processes}

    def children(self, pid: int) -> list[ProcInfo]:
        return [p for p in self.result.processes if p.ppid == pid and p.pid != INIT_PID]

    def lines_by_pid(self, fd: int = 1) -> dict[int, list[str]]:
        return lines_by_pid(self.sink.chunks, fd)

    def why(self) -> str:
        return (
            f"stdout={self.out!r}\nstderr={self.err!r}\nreports={self.result.reports}\n"
            f"processes={self.result.processes}"
        )


def lines_by_pid(chunks: list[tuple[int, int, bytes]], fd: int = 1) -> dict[int, list[str]]:
    """Each pid's own stream (its chunks in arrival order), split into lines."""
    streams: dict[int, bytearray] = {}
    for pid, f, data in chunks:
        if f == fd:
            streams.setdefault(pid, bytearray()).extend(data)
    return {pid: s.decode(errors="replace").splitlines() for pid, s in streams.items()}


def host_pid(row: ProcInfo) -> int:
    """The OS pid of the tender process that ran a process (its name: vm@HOST/PID)."""
    m = re.fullmatch(r"vm@.*[/:](\d+)", row.name)
    assert m, row
    return int(m.group(1))


@dataclass
class Env:
    """The module's pool and what the host looked like before it started."""

    pool: WarmPool
    children_before: set[int]
    shm_before: set[str]
    workers_seen: set[int] = field(default_factory=set)

    def worker_pids(self) -> set[int]:
        pids = {w.pid for w in self.pool.workers}
        self.workers_seen |= pids
        return pids

    def run(self, prog: str | Path, *args: str, transport: str = "shm", **config) -> Run:
        config.setdefault("timeout", 60)
        sink = CaptureSink()
        result = run_vmclone(
            image_path(prog),
            list(args),
            config=VmConfig(**config),
            sink=sink,
            transport=transport,
            pool=self.pool,
        )
        self.check_clean()
        return Run(result, sink)

    def supervisor(self, transport: str, sink: CaptureSink, **config) -> Supervisor:
        config.setdefault("timeout", 60)
        return Supervisor(self.pool, transport, sink, VmConfig(**config))

    def check_clean(self) -> None:
        """After an instance: no VM left on any tender process, no shm name or segment left,
        no child process of ours other than the pool's tender processes."""
        self.pool.wait_ready(60)
        for w in list(self.pool.workers):
            if w.alive:
                wait_for(
                    lambda w=w: vms_on(w.address) == 0, f"the VMs on tender process {w.pid} to end"
                )
        wait_for(
            lambda: not (child_pids() - self.children_before - self.worker_pids()),
            "no child process other than the pool's tender processes "
            f"(children: {child_pids()}, workers: {self.worker_pids()})",
        )
        ours = {os.getpid()} | self.worker_pids() | self.workers_seen
        assert leaked_segments(self.shm_before, ours) == set()
        # the supervisor's mappings are freed (a VM's serving thread may be closing one)
        wait_for(lambda: channel_segments() == [], "no channel segment mapped or open")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    children, segments = child_pids(), shm_segments()
    e = Env(WarmPool(POOL_SIZE), children, segments)
    try:
        e.pool.wait_ready(60)
        e.worker_pids()
        yield e
    finally:
        pool_dir = e.pool.dir
        workers = e.worker_pids() | e.workers_seen
        e.pool.close()
    # at the end of the module: the pool's processes and files are all gone
    assert not Path(pool_dir).exists()
    assert not {pid for pid in workers if pid_exists(pid)}
    assert child_pids() - e.children_before == set()
    assert leaked_segments(e.shm_before, {os.getpid()} | workers) == set()


# -- 1. the thread-fork programs: exactly the native stdout, over both transports ---------
#: the test_programs_native case that gives each program's expected output
SAME_AS_NATIVE = [
    "fork_exit_wait", "token_ring", "dup2_pipe", "pipe_eof", "sigpipe", "ids", "wait_variants",
    "kill_test", "pgroup_rules", "fd_independent", "vfork_test", "orphan", "nested_fork", "prefork_server",
    "fork_bomb-n5",
]  # fmt: skip
CASE = {case[0]: case for case in CASES}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case_id", SAME_AS_NATIVE)
def test_same_output_as_native(env: Env, case_id: str, transport: str) -> None:
    _, prog, args, rc, expected = CASE[case_id]
    assert rc == 0
    r = env.run(prog, *args, transport=transport)
    assert r.out == expected, r.why()
    assert r.err == "", r.why()
    assert (r.result.outcome, r.result.status) == ("exited", 0), r.why()
    assert r.result.forks >= 1
    assert len(r.result.fork_seconds) == r.result.forks
    # every process ran in a VM of its own and ended
    assert len(r.result.processes) == 1 + 1 + r.result.forks
    assert all(p.status is not None for p in r.result.processes if p.pid != INIT_PID)


PIPE_TALK_PARENT = [
    "parent: pipe fds 3 and 4",
    "parent: fork returned a child pid",
    "parent: waiting to read...",
    *[
        line
        for i, first in enumerate("HSQ", start=1)
        for line in (
            "parent: read 30 bytes",
            f"parent: got message {i}: {first}ello from another unikernel!",
        )
    ],
    "parent: EOF after 3 messages",
    "parent: child exited with status 0",
]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pipe_talk_write_literal(env: Env, transport: str) -> None:
    """The child edits a string literal (RWX memory, like Rumprun) in its own VM."""
    r = env.run("pipe_talk", "--write-literal", transport=transport)
    assert (r.result.outcome, r.result.status) == ("exited", 0), r.why()
    by_pid = r.lines_by_pid()
    assert sorted(by_pid) == [MAIN_PID, 3], r.why()
    assert by_pid[MAIN_PID] == PIPE_TALK_PARENT
    assert by_pid[3] == ["child: wrote 30 bytes"] * 3
    assert r.err == ""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fork_time_runs(env: Env, transport: str) -> None:
    r = env.run("fork_time", "-n", "5", transport=transport)
    assert (r.result.outcome, r.result.status) == ("exited", 0), r.why()
    out = r.out.splitlines()
    assert len(out) == 6, r.why()
    assert all(re.fullmatch(r"fork_us=\d+\.\d{3}", line) for line in out[:5]), out
    assert re.fullmatch(r"fork_summary runs=5 mean_us=\S+ min_us=\S+ max_us=\S+ ok=1", out[5])
    assert r.result.forks == 5 and len(r.result.fork_seconds) == 5
    # each fork's steps (the breakdown `unifork run --stats` prints): the lease, the
    # snapshot and the start took time; the child's restore, after StartVm answered, is
    # reported by the child's VM (test_a_child_restored_after_the_answer_...)
    phases = r.result.fork_phases
    assert len(phases) == 5 and all(set(p) == set(FORK_PHASES) for p in phases), phases
    assert all(
        p["lease"] > 0 and p["capture"] > 0 and p["start"] > 0 and p["restore"] > 0 for p in phases
    )
    # a fork's time in the parent's kernel is its four steps, the lease too (each step
    # and the whole in whole microseconds), and less than the fork its program timed
    timed = [float(line.split("=")[1]) for line in out[:5]]
    for took, p, us in zip(r.result.fork_seconds, phases, timed, strict=True):
        steps = sum(p[k] for k in ("lease", "share", "capture", "start"))
        assert steps - 1e-6 <= took <= steps + 5e-6 and took * 1e6 < us, (took, p, us)
    # child i exited with i % 100, and the parent reaped it
    assert [(p.status, p.state) for p in r.children(MAIN_PID)] == [
        (i << 8, "reaped") for i in range(5)
    ]


# -- 2. POSIX copy semantics, unlike thread fork --------------------------------------------
def differing(a: str, b: str) -> dict[str, tuple[str, str]]:
    pairs = [
        (x.split("=", 1), y.split("=", 1))
        for x, y in zip(a.splitlines(), b.splitlines(), strict=True)
    ]
    assert all(x[0] == y[0] for x, y in pairs)
    return {x[0]: (x[1], y[1]) for x, y in pairs if x[1] != y[1]}


def thread_fork_stdout(prog: str) -> str:
    sink = CaptureSink()
    res = run_vm(image_path(prog), [], config=VmConfig(timeout=60), sink=sink, fork="thread")
    assert res.status == 0, bytes(sink.stderr)
    return bytes(sink.stdout).decode()


def test_semantics_all_private_in_vmclone_not_in_thread_fork(env: Env) -> None:
    r = env.run("semantics")
    assert r.result.status == 0, r.why()
    assert r.out == SEMANTICS_NATIVE  # every line "private": POSIX
    thread = thread_fork_stdout("semantics")
    assert thread == SEMANTICS_THREAD_FORK
    # the difference, both ways: globals are shared only by thread fork
    assert differing(r.out, thread) == {
        "global": ("private", "shared"),
        "heap_from_global": ("private", "shared"),
    }
    assert differing(thread, r.out) == {
        "global": ("shared", "private"),
        "heap_from_global": ("shared", "private"),
    }


def test_fork_hazards_vmclone_answers_are_the_native_ones(env: Env) -> None:
    r = env.run("fork_hazards")
    assert r.result.status == 0, r.why()
    n = native("fork_hazards")
    assert n.returncode == 0, n.stderr
    assert r.out == n.stdout.decode() == FORK_HAZARDS_NATIVE
    thread = thread_fork_stdout("fork_hazards")
    assert thread == FORK_HAZARDS_VM
    assert differing(r.out, thread) == {
        "int_looking_like_stack_ptr": ("unchanged", "rebased"),
        "heap_second_level": ("private", "shared"),
    }


# -- 3. pipes across VMs -----------------------------------------------------------------------
FANIN_WRITER = re.compile(r"writer (\d+): records=(\d+) bytes=(\d+) fnv=[0-9a-f]{16}")


@pytest.mark.parametrize(
    ("transport", "args"),
    [("shm", []), ("tcp", []), ("shm", ["-w", "7", "-b", "1000003"])],
    ids=["shm-16MiB", "tcp-16MiB", "shm-w7-odd"],
)
def test_pipe_fanin_many_writers_one_reader(env: Env, transport: str, args: list[str]) -> None:
    n = native("pipe_fanin", *args)
    assert n.returncode == 0, n.stderr
    expected = n.stdout.decode()
    r = env.run("pipe_fanin", *args, transport=transport)
    assert r.out == expected, r.why()
    assert (r.result.outcome, r.result.status) == ("exited", 0), r.why()
    writers = int(args[1]) if args else 4
    total = int(args[3]) if args else 16 << 20
    found = [FANIN_WRITER.fullmatch(line) for line in r.out.splitlines()[:writers]]
    assert all(found), r.out
    assert [int(m.group(1)) for m in found] == list(range(writers))
    assert sum(int(m.group(3)) for m in found) == total
    assert f"reader: {total} bytes in " in r.out
    assert r.result.forks == writers + 1
    assert [p.status for p in r.children(MAIN_PID)] == [0] * (writers + 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_ring_of_4_vms(env: Env, transport: str) -> None:
    r = env.run("token_ring", "-n", "4", "-r", "25", transport=transport)
    assert r.out == "token=100\n", r.why()
    assert r.result.status == 0
    n = native("token_ring", "-n", "4", "-r", "25")
    assert n.stdout.decode() == r.out
    rows = r.rows
    assert sorted(rows) == [INIT_PID, MAIN_PID, 3, 4, 5]
    # with more than one tender process, a clone never runs next to its parent
    for child in r.children(MAIN_PID):
        assert host_pid(child) != host_pid(rows[MAIN_PID]), r.result.processes
        assert (child.state, child.status) == ("reaped", 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_eof_across_vms(env: Env, transport: str) -> None:
    r = env.run("pipe_eof", transport=transport)
    assert r.out == CASE["pipe_eof"][4], r.why()
    kids = r.children(MAIN_PID)
    assert len(kids) == 2 and all(p.status == 0 for p in kids), r.result.processes


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigpipe_across_vms(env: Env, transport: str) -> None:
    r = env.run("sigpipe", transport=transport)
    assert r.out == CASE["sigpipe"][4], r.why()
    statuses = sorted(p.status for p in r.children(MAIN_PID))
    # case A's writer died of SIGPIPE in its own VM; case B's ignored it and exited 0
    assert SIGPIPE in statuses, r.result.processes
    assert statuses.count(0) == len(statuses) - 1


def test_hundred_vm_children_reaped_with_their_statuses(env: Env) -> None:
    r = env.run("fork_exit_wait")
    assert r.out == "ok 100 children\n", r.why()
    assert r.result.status == 0
    assert r.result.forks == 100 and len(r.result.fork_seconds) == 100
    kids = r.children(MAIN_PID)
    assert len(kids) == 100
    assert all(p.state == "reaped" for p in kids)
    assert sorted(p.status >> 8 for p in kids) == sorted(i % 7 for i in range(100))
    assert all(p.status & 0xFF == 0 for p in kids)


# -- 4. the process tree and wait across VMs ---------------------------------------------------
def test_process_tree_of_nested_vms(env: Env) -> None:
    """nested_fork: depth 3, fan-out 3; leaf i exits i+1, inner nodes the sum of their leaves."""
    r = env.run("nested_fork")
    assert r.out == "leaves=27 total=378\n", r.why()
    rows = r.rows
    assert len(rows) == 2 + 3 + 9 + 27
    assert rows[INIT_PID].ppid == 0 and rows[MAIN_PID].ppid == INIT_PID
    assert rows[MAIN_PID].status == 0

    def subtree_sum(pid: int) -> int:
        kids = r.children(pid)
        return sum(subtree_sum(k.pid) for k in kids) if kids else rows[pid].status >> 8

    levels = [[MAIN_PID]]
    for _ in range(3):
        levels.append([k.pid for pid in levels[-1] for k in r.children(pid)])
    assert [len(level) for level in levels] == [1, 3, 9, 27]
    assert sorted(rows[pid].status >> 8 for pid in levels[3]) == list(range(1, 28))
    for pid in levels[1] + levels[2]:
        assert rows[pid].status >> 8 == subtree_sum(pid), rows[pid]
    assert all(
        p.state == "reaped" and p.status & 0xFF == 0
        for p in rows.values()
        if p.pid not in (INIT_PID, MAIN_PID)
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_orphan_vm_keeps_running_and_is_heard(env: Env, transport: str) -> None:
    r = env.run("vmclone_probe", "orphan", transport=transport)
    # the instance's status is the launched program's, although a child outlived it
    assert r.result.status == 5 << 8, r.why()
    assert r.result.exit_code == 5
    assert r.result.outcome == "exited"
    by_pid = r.lines_by_pid()
    assert by_pid[MAIN_PID] == ["parent exits 5"], r.why()
    assert by_pid[3] == ["orphan alive ppid=1"], r.why()  # adopted by init
    assert r.out == lines("parent exits 5", "orphan alive ppid=1")
    row = r.rows[3]
    assert (row.ppid, row.status) == (INIT_PID, 0), r.result.processes


# -- 5. one console ---------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_console_of_every_vm_in_one_stream(env: Env, transport: str) -> None:
    r = env.run("vmclone_probe", "console", transport=transport)
    assert r.result.status == 0, r.why()
    assert r.err == ""
    by_pid = r.lines_by_pid()
    kids = sorted(set(by_pid) - {MAIN_PID})
    assert len(kids) == 3, r.why()
    assert kids == sorted(p.pid for p in r.children(MAIN_PID))
    for pid in kids:
        # complete, in order, and only the lines that process printed itself
        assert by_pid[pid] == [f"pid {pid} line {i}" for i in range(1, 51)]
    assert by_pid[MAIN_PID] == ["children done"]
    assert len(r.out.splitlines()) == 3 * 50 + 1
    assert r.out.endswith("children done\n")


# -- 6. faults ---------------------------------------------------------------------------------
def start(sup: Supervisor, prog: str, *args: str) -> None:
    """What run_vmclone does: boot the launched program as pid 2."""
    sup.start(str(image_path(prog).resolve()), list(args), list(DEFAULT_ENV), prog)


def blocked_in(sup: Supervisor, pid: int, what: str) -> ProcRec | None:
    """pid's record once it is running and its VM said it waits in ``what``."""
    with sup.lock:
        rec = sup.procs.get(pid)
        if rec is not None and rec.state == "running" and what in rec.idle_report:
            return rec
    return None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_child_tender_process_killed(env: Env, transport: str) -> None:
    sink = CaptureSink()
    sup = env.supervisor(transport, sink)
    try:
        start(sup, "vmclone_probe", "block_read")
        child = wait_for(lambda: blocked_in(sup, 3, "read"), "the child blocked reading")
        parent = sup.procs[MAIN_PID]
        assert child.host_pid != parent.host_pid
        assert child.host_pid in env.worker_pids()
        victim = child.host_pid
        os.kill(victim, SIGKILL)
        res = sup.wait()
    finally:
        sup.close()
    assert not Path(sup._tmp).exists()
    run = Run(res, sink)
    assert (res.outcome, res.status) == ("exited", 0), run.why()
    # the parent's waitpid saw its child die of SIGKILL
    assert run.lines_by_pid() == {MAIN_PID: ["child: killed by SIGKILL"]}, run.why()
    assert run.rows[3].status == SIGKILL and run.rows[3].state == "reaped"
    assert any("pid 3" in rep for rep in res.reports), res.reports
    # the pool replaces the dead tender process: a later instance still runs
    later = env.run("fork_exit_wait", "-n", "3", transport=transport)
    assert later.out == "ok 3 children\n", later.why()
    wait_for(
        lambda: len([w for w in env.pool.workers if w.alive]) == POOL_SIZE,
        "the pool to be full again",
    )
    assert victim not in env.worker_pids()
    assert not pid_exists(victim) or ppid_of(victim) != os.getpid()


class _SilentPeer:
    """A pool process of this host that takes every VM (its local StartVm answers) and
    never runs one: its VMs never say hello to their supervisor."""

    def __init__(self, path: Path) -> None:
        self.started: list[int] = []
        self.address = f"unix:{path}"
        self.server = localstart.Server(str(path) + localstart.SUFFIX, self._launch)

    def _launch(self, start: dict, size: int, receive) -> localstart.Started:
        receive(memoryview(bytearray(size)))
        self.started.append(int(start["pid"]))
        return localstart.Started(int(start["pid"]), os.getpid(), "silent", 0.0)


@dataclass(eq=False)
class _SilentHandle:
    address: str
    host: str = "silent"
    remote = False
    pid: int = 1


class _ChildrenToSilentPeer:
    """The module's pool for the first VM; every fork's child goes to the silent peer."""

    def __init__(self, pool: WarmPool, silent: _SilentPeer) -> None:
        self.pool, self.silent = pool, silent

    def acquire(self, avoid: int = 0, timeout: float = 60.0):
        return _SilentHandle(self.silent.address) if avoid else self.pool.acquire()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_child_that_never_says_hello_is_lost_and_its_parent_sees_it(
    env: Env, transport: str, tmp_path: Path
) -> None:
    """StartVm answers before the child's VM connects (the parent's fork does not wait
    for it): a child whose VM never says hello is reported lost after the supervisor's
    hello deadline, its parent's waitpid sees it killed by SIGKILL, the pipe end it held
    is given back, and a hello that comes after that is refused."""
    silent = _SilentPeer(tmp_path / "silent.sock")
    sink = CaptureSink()
    sup = Supervisor(
        _ChildrenToSilentPeer(env.pool, silent),
        transport,
        sink,
        VmConfig(timeout=60),
        hello_deadline=1.0,
    )
    try:
        start(sup, "vmclone_probe", "block_read")
        res = sup.wait()
        held = [pipe for pipe in sup.broker._pipes.values() if 3 in pipe.refs]
        port = int(sup.tcp_address.rsplit(":", 1)[1])
        late = _refused(port, encode_hello("tcp", {"token": sup.token, "pid": 3}))
    finally:
        sup.close()
        silent.server.close()
    run = Run(res, sink)
    assert silent.started == [3]
    assert (res.outcome, res.status) == ("exited", 0), run.why()
    assert run.lines_by_pid() == {MAIN_PID: ["child: killed by SIGKILL"]}, run.why()
    assert run.rows[3].status == SIGKILL and run.rows[3].state == "reaped", run.why()
    assert any("pid 3" in r and "never connected" in r for r in res.reports), res.reports
    assert held == []
    assert late == b""
    env.check_clean()


class _UnrestorablePeer:
    """A pool process of this host (a real ``PeerServicer`` in this process) that gets
    every fork's snapshot with its process's pid made 1: the snapshot still parses, so
    StartVm answers, and the restore after the answer refuses it."""

    def __init__(self, path: Path) -> None:
        self.servicer = PeerServicer(threading.Event())
        self.address = f"unix:{path}"
        self.server = localstart.Server(str(path) + localstart.SUFFIX, self._launch)

    def _launch(self, start: dict, size: int, receive) -> localstart.Started:
        buf = bytearray(size)
        receive(memoryview(buf))
        head = snapshot._HEADER
        magic, version, flags, meta_len, nranges = head.unpack_from(buf)
        meta = json.loads(bytes(buf[head.size : head.size + meta_len]))
        meta["process"]["pid"] = 1
        m = json.dumps(meta).encode()
        bad = head.pack(magic, version, flags, len(m), nranges) + m + buf[head.size + meta_len :]
        snapshot.decode(bad)  # it parses: only the restore can tell

        def fill(into: memoryview) -> None:
            into[:] = bad

        return self.servicer.start_local(start, len(bad), fill)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_child_restored_after_the_answer_that_cannot_be_is_killed_at_once(
    env: Env, transport: str, tmp_path: Path
) -> None:
    """A fork's StartVm on this host answers once the snapshot parses; the restore runs
    on the child VM's thread after the answer (the parent's fork does not wait for it).
    One that fails there is told to the supervisor: the child is killed by SIGKILL at
    once (not after the hello deadline), its parent's waitpid sees it, and what the
    StartVm held of the process's receive budget is given back."""
    peer = _UnrestorablePeer(tmp_path / "bad.sock")
    sink = CaptureSink()
    sup = Supervisor(_ChildrenToSilentPeer(env.pool, peer), transport, sink, VmConfig(timeout=60))
    try:
        start(sup, "vmclone_probe", "block_read")
        res = sup.wait()
    finally:
        sup.close()
        peer.server.close()
    run = Run(res, sink)
    assert (res.outcome, res.status) == ("exited", 0), run.why()
    assert run.lines_by_pid() == {MAIN_PID: ["child: killed by SIGKILL"]}, run.why()
    assert run.rows[3].status == SIGKILL and run.rows[3].state == "reaped", run.why()
    assert any("pid 3" in r and "could not be restored" in r for r in res.reports), res.reports
    assert not any("never connected" in r for r in res.reports), res.reports
    s = peer.servicer
    wait_for(
        lambda: (s.receiving, s.starting, s.vms) == (0, 0, {}),
        "the peer to give back what the StartVm held",
    )
    env.check_clean()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_dropped_mid_pipe(env: Env, transport: str) -> None:
    sink = CaptureSink()
    sup = env.supervisor(transport, sink, timeout=60)
    writer = 4  # drop_writer forks the reader (3), then the writer (4)

    def pipe_full() -> bool:
        with sup.lock:
            s = sup.broker.stats()
        return s["parked_writes"] >= 1 and s["bytes_buffered"] >= PIPE_CAPACITY

    try:
        start(sup, "vmclone_probe", "drop_writer")
        wait_for(lambda: blocked_in(sup, writer, "write"), "the writer blocked writing")
        wait_for(pipe_full, "the cross-VM pipe to be full")
        sup.procs[writer].channel.close()
        res = sup.wait()
    finally:
        sup.close()
    run = Run(res, sink)
    assert res.outcome != "timeout", run.why()
    assert (res.outcome, res.status) == ("exited", 0), run.why()
    assert run.rows[writer].status == SIGKILL  # its VM was killed
    by_pid = run.lines_by_pid()
    assert by_pid[MAIN_PID] == ["writer: killed by SIGKILL", "reader: exited 0"], run.why()
    # what the writer had put into the pipe stays readable, then EOF
    assert by_pid[3] == [f"reader: {PIPE_CAPACITY} bytes, pattern ok, then EOF"], run.why()
    assert writer not in by_pid
    env.check_clean()  # the writer's VM is gone from its tender process


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fork_bomb_hits_max_procs_across_vms(env: Env, transport: str) -> None:
    """A fork bomb of VMs stops at max_procs (init and pid 2 count): fork gets EAGAIN,
    every child VM is reaped, and nothing is left on the pool's tender processes."""
    r = env.run("fork_bomb", "-n", "5000", transport=transport, max_procs=8)
    assert r.out == "fork failed errno=EAGAIN\nforked=6\nreaped=6\n", r.why()
    assert (r.result.outcome, r.result.status) == ("exited", 0), r.why()
    assert r.result.forks == 6 and r.result.reports == []


def test_a_vm_fault_report_reaches_the_instance_result(env: Env) -> None:
    """The fault report of a VM's process (rip, address, instruction) is in the
    instance's reports and its process row, as in thread mode: without it a VM-clone
    child that dies of SIGSEGV says nothing about where."""
    r = env.run("fault_segv")
    here = vm(image_path("fault_segv"))
    assert (r.result.status, here.result.status) == (SIGSEGV, SIGSEGV), r.why()
    assert r.result.reports == here.result.reports, r.why()
    assert re.fullmatch(
        r"pid 2: SIGSEGV: write of unmapped address 0x0 at rip=0x[0-9a-f]+ "
        r"address=0x0 insn=.*",
        r.result.reports[0],
    ), r.result.reports
    assert r.rows[MAIN_PID].report == r.result.reports[0]


class _PublishedOnly:
    """An observer with one method, none of the supervisor's (as the CLI's printer)."""

    def published(self, bound: list[tuple[str, int, int]]) -> None:
        raise AssertionError("no port is published")


class _FailingForkDone:
    """An observer whose fork_done raises (a defect of ours, wherever it is)."""

    def fork_done(self, seconds: float, snapshot: int, remote: bool) -> None:
        raise RuntimeError("observer failed")


def test_an_observer_without_the_supervisors_methods_is_not_called(env: Env) -> None:
    """The CLI passes an observer that only prints published ports; a VM-clone fork
    once called its missing fork_done, killed the supervisor's thread and hung every
    `unifork run --fork vmclone` (stop 20's CI).  Observers may have any subset."""
    sink = CaptureSink()
    r = run_vmclone(image_path("token_ring"), config=VmConfig(timeout=60), sink=sink,
                    pool=env.pool, observer=_PublishedOnly())  # fmt: skip
    env.check_clean()
    assert (r.status, bytes(sink.stdout)) == (0, b"token=80\n"), r.reports


def test_a_supervisor_defect_ends_the_process_not_the_run(env: Env) -> None:
    """An exception while the supervisor serves a VM (here the observer's) kills that
    process with SIGKILL and says why; its parent and the run go on to their end
    instead of waiting forever on a VM nobody serves."""
    sink = CaptureSink()
    r = run_vmclone(image_path("fork_exit_wait"), config=VmConfig(timeout=60), sink=sink,
                    pool=env.pool, observer=_FailingForkDone())  # fmt: skip
    env.check_clean()
    assert any("the supervisor failed serving it: RuntimeError: observer failed" in x
               for x in r.reports), r.reports  # fmt: skip
    assert r.status == SIGKILL, r.processes


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_cross_vm_pipe_read_cut_by_a_mapping_end_loses_nothing(env: Env, transport: str) -> None:
    """tests/guest/read_short.c reads a pipe into a buffer 4 bytes before an unmapped
    page, then readv()s another into two iovecs, the second cut short by it.  Linux
    fails both with EFAULT and keeps the bytes in the pipe; so do a local pipe and a
    cross-VM one (the VM tells the broker how much its buffers can take).
    Before, the broker's 8 bytes were fetched, the copy faulted, and they were lost."""
    prog = Path(__file__).with_name("guest") / "read_short.c"
    linux = (
        'read at the edge: -1 Bad address ""\nthen: 8  "abcdefgh"\n'
        'readv into the edge: -1 Bad address ""\nthen: 12  "0123456789AB"\n'
    )
    n = native(image_path(prog))
    assert (n.returncode, n.stdout.decode()) == (0, linux), n.stderr
    assert vm(image_path(prog)).out == linux  # a local pipe, as Linux's
    r = env.run(prog, transport=transport)
    assert r.out == linux, r.why()


def test_an_emulator_crash_is_contained_in_its_tender_process(env: Env) -> None:
    """A block Unicorn 2.1.4 cannot translate (``tests/guest/x87_block.c``) kills the
    process that emulates it (SIGSEGV inside Unicorn).  In VM-clone mode that is one
    pool process: the VM counts as killed by SIGKILL, the supervisor (here: pytest)
    lives on, the pool refills and the next instance runs."""
    before = env.worker_pids()
    sink = CaptureSink()
    res = run_vmclone(
        build_image(Path(__file__).with_name("guest") / "x87_block.c"),
        [],
        config=VmConfig(timeout=60),
        sink=sink,
        transport="shm",
        pool=env.pool,
    )
    assert (res.outcome, res.status) == ("signaled", SIGKILL), res
    assert any("its VM was lost" in rep for rep in res.reports), res.reports
    assert bytes(sink.stdout) == b""
    later = env.run("fork_exit_wait", "-n", "3")
    assert later.out == "ok 3 children\n", later.why()
    wait_for(
        lambda: (
            len([w for w in env.pool.workers if w.alive]) == POOL_SIZE
            and env.worker_pids() != before
        ),
        "the pool to replace the crashed process",
    )


def test_a_vm_gives_pipe_ends_only_to_a_child_it_is_forking(env: Env) -> None:
    """A fork registers its child's ends of every pipe in one call (``pipe_refs_many``):
    only for a child the calling VM leased (another pid: ESRCH), only ends the VM holds
    itself, all or none (a pipe that does not exist or is not its: EBADF with nothing
    added; a torn entry: EINVAL)."""
    sup = env.supervisor("tcp", CaptureSink())
    try:
        parent = sup._new_proc(MAIN_PID, INIT_PID, INIT_PID, INIT_PID)
        stranger = sup._new_proc(MAIN_PID + 1, INIT_PID, INIT_PID, INIT_PID)
        child, _ = sup._call(parent, call_payload("fork_lease", ()))
        assert child > stranger.pid
        pipe = sup.broker.create(MAIN_PID, b"", readers=1, writers=1)
        theirs = sup.broker.create(stranger.pid, b"", readers=1, writers=0)
        ends = PIPE_REFS.pack(pipe, 1, 0) + PIPE_REFS.pack(pipe, 0, 1)

        def refs(holder: int, data: bytes) -> int:
            return sup._call(parent, call_payload("pipe_refs_many", (holder,), data))[0]

        assert refs(stranger.pid, ends) == -errno.ESRCH
        assert refs(child, ends + PIPE_REFS.pack(pipe + 99, 1, 0)) == -errno.EBADF
        assert refs(child, ends[:-1]) == -errno.EINVAL
        assert refs(child, ends + PIPE_REFS.pack(theirs, 1, 0)) == -errno.EBADF  # not its
        assert not sup.broker.holds(pipe, child, "r") and not sup.broker.holds(pipe, child, "w")
        assert not sup.broker.holds(pipe, stranger.pid, "r")
        assert not sup.broker.holds(theirs, child, "r")
        assert refs(child, ends) == 0
        assert sup.broker.holds(pipe, child, "r") and sup.broker.holds(pipe, child, "w")
    finally:
        sup.close()
    env.check_clean()


def test_a_vm_gives_listeners_only_it_holds_to_a_child_it_is_forking(env: Env) -> None:
    """``listen_refs`` as ``pipe_refs_many``: only for a child the calling VM leased
    (ESRCH), only a listener the VM holds itself (another VM's, or none: EBADF, nothing
    added)."""
    sup = env.supervisor("tcp", CaptureSink())
    try:
        parent = sup._new_proc(MAIN_PID, INIT_PID, INIT_PID, INIT_PID)
        stranger = sup._new_proc(MAIN_PID + 1, INIT_PID, INIT_PID, INIT_PID)
        child, _ = sup._call(parent, call_payload("fork_lease", ()))
        mine = sup.listen_broker.create(MAIN_PID, socket.AF_INET, 0)
        theirs = sup.listen_broker.create(stranger.pid, socket.AF_INET, 0)

        def refs(lid: int, holder: int) -> int:
            return sup._call(parent, call_payload("listen_refs", (lid, holder)))[0]

        assert refs(mine, stranger.pid) == -errno.ESRCH
        assert refs(theirs, child) == -errno.EBADF
        assert refs(mine + theirs + 99, child) == -errno.EBADF
        assert not sup.listen_broker.holds(theirs, child)
        assert not sup.listen_broker.holds(mine, stranger.pid)
        assert refs(mine, child) == 0
        assert sup.listen_broker.holds(mine, child)
    finally:
        sup.close()
    env.check_clean()


def test_a_ring_fd_goes_only_to_a_vm_holding_an_end_each_its_own_file(env: Env) -> None:
    """A pipe ring has no name: a VM gets its segment's fd from the supervisor
    (``ring_fd``), and only for a pipe it holds an end of (EBADF otherwise, EINVAL for
    a brokered pipe).  Each fd is an open file description of its own: the ring's
    ``flock`` must exclude two VMs that were sent it (one description shared would not)."""
    sup = env.supervisor("shm", CaptureSink())
    try:
        parent = sup._new_proc(MAIN_PID, INIT_PID, INIT_PID, INIT_PID)
        stranger = sup._new_proc(MAIN_PID + 1, INIT_PID, INIT_PID, INIT_PID)
        ringed, label = sup._call(parent, call_payload("pipe_create", (1, 1, 1), b"unread"))
        brokered, none = sup._call(parent, call_payload("pipe_create", (1, 1, 0), b""))
        assert label.startswith(b"memfd:") and none == b""

        def ring_fd(rec: ProcRec, pipe: int) -> tuple[int, bytes, int | None]:
            return sup._answer(rec, call_payload("ring_fd", (pipe,)))

        assert ring_fd(stranger, ringed) == (-errno.EBADF, b"", None)
        assert ring_fd(parent, brokered) == (-errno.EINVAL, b"", None)
        assert ring_fd(parent, ringed + brokered + 9) == (-errno.EBADF, b"", None)
        got = [ring_fd(parent, ringed) for _ in range(2)]
        try:
            for value, ino, fd in got:
                assert value == 0 and fd is not None
                assert str(os.fstat(fd).st_ino).encode() == ino == label.removeprefix(b"memfd:")
            a, b = (fd for _, _, fd in got)
            fcntl.flock(a, fcntl.LOCK_EX)
            with pytest.raises(BlockingIOError):  # a second description: excluded
                fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(a, fcntl.LOCK_UN)
            ring = PipeRing.from_fd(os.dup(b))
            assert ring.read(100, 100, None) == b"unread"
            ring.close()
        finally:
            for _, _, fd in got:
                if fd is not None:
                    os.close(fd)
    finally:
        sup.close()
    env.check_clean()


def test_a_wake_fd_goes_only_to_a_vm_of_the_instance(env: Env) -> None:
    """A VM's wake-up pipe has no name: the supervisor made it and keeps it by token;
    another VM of the instance that must wake it asks for it (``wake_fd``).  A token
    it does not know (another instance's, made up, or of a VM gone) is ENOENT."""
    sup = env.supervisor("shm", CaptureSink())
    mine = wake_pipe()
    try:
        parent = sup._new_proc(MAIN_PID, INIT_PID, INIT_PID, INIT_PID)
        token = new_token()
        sup.wakers.add(token, os.dup(mine))  # as its connection does for a VM

        def wake_fd(t: int) -> tuple[int, bytes, int | None]:
            return sup._answer(parent, call_payload("wake_fd", (t,)))

        assert wake_fd(token ^ 2) == (-errno.ENOENT, b"", None)
        value, ino, fd = wake_fd(token)
        assert value == 0 and fd is not None
        try:
            assert str(os.fstat(fd).st_ino).encode() == ino == str(os.fstat(mine).st_ino).encode()
            os.write(fd, b"!")  # what a waker does
            assert os.read(mine, 10) == b"!"  # what the woken kernel reads
        finally:
            os.close(fd)
        sup.wakers.remove(token)  # its VM is gone
        assert wake_fd(token) == (-errno.ENOENT, b"", None)
    finally:
        os.close(mine)
        sup.close()
    env.check_clean()


def test_a_childs_hello_carries_its_rings_and_the_other_vms_wake_up_pipes(env: Env) -> None:
    """A fork's child gets, with its supervisor's hello, the fds of the rings its
    parent gave it and of the wake-up pipes of the instance's other VMs (none of its
    first ring reads or wakes is then a round trip); the reply names them in order,
    and names nothing the child does not hold."""
    sup = env.supervisor("shm", CaptureSink())
    theirs = wake_pipe()
    try:
        parent = sup._new_proc(MAIN_PID, INIT_PID, INIT_PID, INIT_PID)
        child, _ = sup._call(parent, call_payload("fork_lease", ()))
        held, _ = sup._call(parent, call_payload("pipe_create", (1, 1, 1), b""))
        other, _ = sup._call(parent, call_payload("pipe_create", (1, 1, 1), b""))
        refs = PIPE_REFS.pack(held, 1, 0)
        assert sup._call(parent, call_payload("pipe_refs_many", (child,), refs))[0] == 0
        parent_token, mine = new_token(), new_token()
        sup.wakers.add(parent_token, os.dup(theirs))
        sup.wakers.add(mine, wake_pipe())  # the child's own, made for its hello
        reply: dict = {}
        fds = sup._hello_fds(child, mine, reply)
        try:
            assert reply == {"rings": [held], "wakers": [parent_token]}
            ring = PipeRing.from_fd(os.dup(fds[0]))
            assert ring.ino == sup.broker.ring_of(held).ino
            ring.close()
            assert os.fstat(fds[1]).st_ino == os.fstat(theirs).st_ino
            assert other not in reply["rings"]
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(theirs)
        sup.close()
    env.check_clean()


def _refused(port: int, data: bytes) -> bytes:
    """Connect to a supervisor, send ``data``, return all it answers until it hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        with contextlib.suppress(OSError):  # it may hang up before we are done sending
            s.sendall(data)
        got = b""
        with contextlib.suppress(ConnectionResetError):  # hung up with our bytes unread
            while chunk := s.recv(65536):
                got += chunk
        return got


def test_hostile_connections_to_the_supervisor_are_refused(env: Env) -> None:
    """Anyone can reach an instance's TCP port: garbage, a wrong or missing token,
    malformed fields, an oversized hello and a flood of connections are each refused
    (the connection closed without a byte of answer, and one asking for shm gets no
    segment), no thread dies of it, and the instance runs on unharmed."""
    sink = CaptureSink()
    sup = env.supervisor("tcp", sink)
    port = int(sup.tcp_address.rsplit(":", 1)[1])
    died: list[BaseException] = []
    hook, threading.excepthook = threading.excepthook, lambda a: died.append(a.exc_value)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        start(sup, "token_ring", "-n", "4", "-r", "40")
        attacks = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            encode_hello("tcp", {"token": "0" * 32, "pid": MAIN_PID}),
            encode_hello("tcp", {"pid": MAIN_PID}),
            encode_hello("tcp", {"token": 7, "pid": MAIN_PID}),
            encode_hello("tcp", {"token": sup.token[:-1] + "x", "pid": "2"}),
            encode_hello("tcp", {"token": None, "pid": 10**30}),
            encode_hello("tcp", {"token": "t", "pid": [2], "host_pid": "me"}),
            encode_hello("tcp", {"token": "\u00e9\u4e2d" * 16, "pid": MAIN_PID}),
            encode_hello("tcp", {"token": "t", "pid": 3}) + b"\x00" * 100_000,
            HELLO_MAGIC + b"\xff" * 64,
        ]  # a silent connection is dropped after HELLO_TIMEOUT: test_transports.py
        for data in attacks:
            assert _refused(port, data) == b"", data[:40]
        # a stranger asking for shm where shm is served: no answer, no segment made
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sup.unix_address.removeprefix("unix:"))
        with pytest.raises(ChannelClosed):
            connect_channel("shm", sock, True, {"token": "0" * 32, "pid": MAIN_PID})
        socks = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(64)]
        for s in socks:
            s.close()
        res = sup.wait()
    finally:
        sup.close()
        threading.excepthook = hook
    run = Run(res, sink)
    assert (res.outcome, res.status) == ("exited", 0), run.why()
    assert run.out == "token=160\n", run.why()
    assert died == []
    assert sup.threads == 0  # every thread it started has ended (and left its set)
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, "our fds back to before")
    env.check_clean()


# -- 7. deadlock across VMs ---------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deadlock_across_vms(env: Env, transport: str) -> None:
    r = env.run("thread_fork_probe", "wait_deadlock", transport=transport)
    assert r.result.outcome == "deadlock", r.why()
    assert r.out == "parent waits for a child that reads a pipe nobody writes\n"
    waits = deadlock_report(r.result.reports)
    assert sorted(waits) == [MAIN_PID, 3]
    assert "wait4" in waits[MAIN_PID]
    assert re.fullmatch(r"read remote pipe:\d+:r", waits[3]), waits
    assert r.result.status == SIGKILL
    assert all(p.status == SIGKILL for p in r.result.processes if p.pid != INIT_PID), r.why()


# -- 8. time limit ---------------------------------------------------------------------------------
def test_time_limit_ends_every_vm(env: Env) -> None:
    r = env.run("vmclone_probe", "spin", timeout=3)  # check_clean: no VM left anywhere
    assert r.result.outcome == "timeout", r.why()
    assert r.out == "parent waits for a spinning child\n"
    assert any("time limit of 3 s exceeded" in rep for rep in r.result.reports), r.why()
    assert r.result.status == SIGKILL
    rows = r.rows
    assert sorted(rows) == [INIT_PID, MAIN_PID, 3]
    assert all(
        p.state != "alive" and p.status == SIGKILL for p in rows.values() if p.pid != INIT_PID
    ), r.result.processes


# -- 9. cleanup and the CLI ------------------------------------------------------------------------
def test_cli_vmclone_tcp_tag_pids(env: Env) -> None:
    unifork = Path(sys.executable).with_name("unifork")
    assert unifork.is_file(), unifork
    mark = uuid.uuid4().hex  # in the environment of the CLI and of every process it starts
    before = shm_segments()
    p = subprocess.run(
        [str(unifork), "run", "token_ring", "--fork", "vmclone", "--pipe", "tcp", "--tag-pids"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, check=False,
        env={**os.environ, "UNIFORK_TEST_MARK": mark},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out, p.stderr
    assert all(re.fullmatch(r"\[\d+\] .*", line) for line in out), out
    assert out == ["[2] token=80"]
    # the CLI's tender processes (they inherit its environment) are all gone; so is its
    # multiprocessing resource tracker, which ends on its own once the CLI has exited
    wait_for(lambda: not processes_with_env(f"UNIFORK_TEST_MARK={mark}"), "no CLI process left")
    assert leaked_segments(before, {os.getpid()}) == set()


def test_a_pool_whose_process_dies_starting_says_so_at_once(tmp_path: Path) -> None:
    """A tender process that dies before it is ready (here: its image cache is a file,
    so its warm-up cannot build the vDSO) makes ``wait_ready`` fail at once with the
    reason, not after START_TIMEOUT with a TimeoutError (unjailed: the jail scrubs the
    environment this test sets)."""
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file")
    pool = WarmPool(1, env={"UNIFORK_CACHE_DIR": str(not_a_dir)}, jailed=False)
    try:
        with pytest.raises(PoolStartError, match=r"died while starting \(exit code 1"):
            pool.wait_ready(600)
        assert pool.workers == []
    finally:
        pool.close()


def test_a_pool_starts_its_processes_without_importing_the_worker() -> None:
    """The pool's process names the workers' entry point without importing the worker
    module (the VM stack and gRPC, ~0.35 s): a spawn waited for that import before, on
    the path of every ``unifork run --fork vmclone`` (its first output 1.14 -> 0.83 s).
    In a fresh interpreter: two processes started and ready, the module still absent."""
    code = (
        "import sys\n"
        "from tender_service.instance.pool import WarmPool\n"
        "if __name__ == '__main__':\n"
        "    with WarmPool(2) as pool:\n"
        "        pool.wait_ready(120)\n"
        "        print(len(pool.workers), 'tender_service.instance.worker' in sys.modules)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr


def test_a_pool_builds_what_its_jailed_processes_cannot(tmp_path: Path) -> None:
    """The pool builds the vDSO and the host libraries before it starts its tender
    processes: a jailed process cannot run the compiler, and a cache without them (a
    new install, a changed runtime source) left every process dead in its warm-up and
    ``unifork run --fork vmclone`` waiting 60 s for a pool that never came."""
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    for built in images_dir().iterdir():  # the guest images, not the runtime
        if built.suffix == ".elf":
            (cache / "images" / built.name).symlink_to(built)
    env = {
        **os.environ,
        "UNIFORK_CACHE_DIR": str(cache),
        "UNIFORK_ZIG_CACHE_DIR": str(zig_cache_dir()),
    }
    p = subprocess.run(
        [sys.executable, "-m", "unifork", "run", "--fork", "vmclone", "hello"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert (p.returncode, p.stdout) == (0, "Hello, unikernel!\n"), p.stderr
    assert {f.name.split("-")[0] for f in (cache / "images").glob("*.so")} >= set(HOST_LIBRARIES)


def test_pool_close_leaves_nothing() -> None:
    before_children, before_shm = child_pids(), shm_segments()
    pool = WarmPool(POOL_SIZE)
    try:
        pool.wait_ready(60)
        workers = {w.pid for w in pool.workers}
        assert len(workers) == POOL_SIZE
        assert child_pids() - before_children == workers
        sink = CaptureSink()
        res = run_vmclone(
            image_path("fork_exit_wait"),
            ["-n", "3"],
            config=VmConfig(timeout=60),
            sink=sink,
            transport="shm",
            pool=pool,
        )
        assert bytes(sink.stdout) == b"ok 3 children\n"
        assert res.status == 0
    finally:
        pool.close()
    assert not Path(pool.dir).exists()
    assert not {pid for pid in workers if pid_exists(pid)}
    assert child_pids() - before_children == set()
    assert leaked_segments(before_shm, {os.getpid()} | workers) == set()


# -- 10. the snapshot format ---------------------------------------------------------------------
HEADER = struct.Struct("<8sHHII")
RANGE = struct.Struct("<QQ")


class CapturingForker:
    """A forker that snapshots the VM as a child would see it, then fails the fork."""

    mode = "capture"

    def __init__(self) -> None:
        self.snapshots: list[bytes] = []

    def fork(self, k, lwp, vfork: bool) -> int:
        self.snapshots.append(snapshot.capture(k, lwp, 99))
        raise GuestError(errno.EAGAIN)


@dataclass
class Layout:
    """Where the parts of a snapshot are."""

    meta: dict
    meta_end: int
    ranges: list[tuple[int, int, int]]  # (offset of the range header, addr, length)


def layout(data: bytes) -> Layout:
    _, _, _, meta_len, nranges = HEADER.unpack_from(data, 0)
    pos = HEADER.size + meta_len
    meta = json.loads(data[HEADER.size : pos])
    ranges = []
    for _ in range(nranges):
        addr, n = RANGE.unpack_from(data, pos)
        ranges.append((pos, addr, n))
        pos += RANGE.size + n
    assert pos == len(data)
    return Layout(meta, HEADER.size + meta_len, ranges)


def rebuild(
    data: bytes, meta: dict | None = None, *, magic: bytes = MAGIC, version: int = SNAPSHOT_VERSION
) -> bytes:
    """The snapshot ``data`` with its header fields or metadata replaced."""
    lay = layout(data)
    meta_b = json.dumps(lay.meta if meta is None else meta).encode()
    body = data[lay.meta_end :]
    return HEADER.pack(magic, version, 0, len(meta_b), len(lay.ranges)) + meta_b + body


def refuse_file(state: dict):
    raise ValueError(f"no file of kind {state.get('kind')!r} here")


def console() -> Console:
    return Console(lambda pid, fd, data: None, stdin=None, tty=True)


@functools.cache
def take_snapshot() -> bytes:
    """A snapshot taken by a real fork() (fork_time's), in a small VM."""
    sink = CaptureSink()
    k = create_vm(image_path("fork_time"), [], config=VmConfig(timeout=60, ram=8 << 20), sink=sink)
    forker = CapturingForker()
    k.forker = forker
    try:
        res = k.run()
    finally:
        k.close()
    assert bytes(sink.stderr) == b"fork: Resource temporarily unavailable\n"
    assert res.status == 1 << 8
    assert len(forker.snapshots) == 1
    return forker.snapshots[0]


@pytest.fixture
def real_snapshot() -> bytes:
    return take_snapshot()


def test_snapshot_restores_and_the_child_returns_0_from_fork(real_snapshot: bytes) -> None:
    snap = snapshot.decode(real_snapshot)
    assert snap.meta["process"]["pid"] == 99 and snap.meta["process"]["ppid"] == MAIN_PID
    sink = CaptureSink()
    k = snapshot.restore(snap, Console(sink, stdin=None, tty=True), None, refuse_file, timeout=60)
    try:
        res = k.run()
    finally:
        k.close()
    assert res.status == 0, res.reports
    # the child's half of fork_time: it returned 0 from fork() and printed "child"
    assert re.fullmatch(r"fork took: \d+\.\d{6}s\nchild\n", bytes(sink.stdout).decode())
    assert {(p.pid, p.ppid) for p in res.processes} >= {(99, MAIN_PID)}


def test_a_snapshot_leaves_out_pages_of_zeros_and_restores_the_same_memory() -> None:
    """A restore starts from zeroed RAM, so a snapshot carries no whole page of zeros
    (a booted VM's stack is mostly zeros: most of the bytes it would carry), and the
    restored VM's memory is byte for byte the parent's in every region and block."""
    k = create_vm(image_path("fork_time"), [], config=VmConfig(ram=8 << 20), sink=CaptureSink())
    try:
        assert k.main is not None
        k.mem.write(k.main.lwps[0].thread.stack_base + 3 * 4096 + 100, b"\1" * 8)  # a lone page
        snap = snapshot.decode(snapshot.capture(k, k.main.lwps[0], 99))
        zero = bytes(4096)
        for addr, data in snap.ranges:
            first = -addr % 4096
            pages = range(first, len(data) - 4095, 4096)
            assert all(data[o : o + 4096] != zero for o in pages), hex(addr)
        spans = [(r.base, r.size) for r in k.mem.regions if r.name != "heap"]
        spans += k.pages.allocated_blocks()
        assert snap.memory_bytes < sum(n for _, n in spans) // 2  # the stack's zeros stayed
        child = snapshot.restore(snap, Console(CaptureSink(), stdin=None), None, refuse_file)
        vdso = [r.base for r in k.mem.regions if r.name == "vdso"]
        try:
            for addr, n in spans:
                if addr in vdso:  # each kernel writes its own clock page there
                    continue
                assert child.mem.read(addr, n) == k.mem.read(addr, n), hex(addr)
        finally:
            child.close()
    finally:
        k.close()


def test_snapshot_bad_magic(real_snapshot: bytes) -> None:
    with pytest.raises(SnapshotError, match="bad magic"):
        snapshot.decode(rebuild(real_snapshot, magic=b"ELF\0\0\0\0\0"))


@pytest.mark.parametrize("version", [0, SNAPSHOT_VERSION + 1, 0xFFFF])
def test_snapshot_unknown_version(real_snapshot: bytes, version: int) -> None:
    with pytest.raises(SnapshotError, match=f"unsupported snapshot version {version}"):
        snapshot.decode(rebuild(real_snapshot, version=version))


@pytest.mark.parametrize("where", ["header", "metadata", "range header", "range data"])
def test_snapshot_truncated(real_snapshot: bytes, where: str) -> None:
    lay = layout(real_snapshot)
    first, _, n = lay.ranges[0]
    cut = {
        "header": HEADER.size - 1,
        "metadata": lay.meta_end - 1,
        "range header": first + RANGE.size - 1,
        "range data": first + RANGE.size + n // 2,
    }[where]
    expected = "no header" if where == "header" else where
    with pytest.raises(SnapshotError, match=rf"truncated \({expected}\)"):
        snapshot.decode(real_snapshot[:cut])
    with pytest.raises(SnapshotError, match="truncated"):
        snapshot.decode(b"")


@pytest.mark.parametrize("how", ["below", "past the end", "huge"])
def test_snapshot_range_outside_regions(real_snapshot: bytes, how: str) -> None:
    lay = layout(real_snapshot)
    pos, addr, n = lay.ranges[-1]
    region = next(r for r in lay.meta["regions"] if r["base"] <= addr < r["base"] + r["size"])
    new_addr = {
        "below": 0,
        "past the end": region["base"] + region["size"] - n + 4096,
        "huge": (1 << 64) - 4096,
    }[how]
    data = bytearray(real_snapshot)
    RANGE.pack_into(data, pos, new_addr, n)
    with pytest.raises(SnapshotError, match="outside the snapshot's regions"):
        snapshot.decode(bytes(data))


def test_snapshot_trailing_bytes(real_snapshot: bytes) -> None:
    with pytest.raises(SnapshotError, match="trailing bytes"):
        snapshot.decode(real_snapshot + b"\0")


def test_snapshot_regions_larger_than_ram(real_snapshot: bytes) -> None:
    meta = copy.deepcopy(layout(real_snapshot).meta)
    meta["config"]["ram"] = 4 << 20
    with pytest.raises(SnapshotError, match="exceed its RAM"):
        snapshot.decode(rebuild(real_snapshot, meta))


@pytest.mark.parametrize("key", ["ram", "stack_size", "quantum", "max_procs"])
def test_snapshot_number_too_big_for_an_int(real_snapshot: bytes, key: str) -> None:
    """A JSON number like 8E88608 parses as an infinite float: a SnapshotError, not
    the OverflowError of int(inf) (found by the mutation test below)."""
    lay = layout(real_snapshot)
    text = json.dumps(lay.meta).replace(f'"{key}": {lay.meta["config"][key]}', f'"{key}": 8E88608')
    assert "8E88608" in text
    meta_b = text.encode()
    blob = (
        HEADER.pack(MAGIC, SNAPSHOT_VERSION, 0, len(meta_b), len(lay.ranges))
        + meta_b
        + real_snapshot[lay.meta_end :]
    )
    with pytest.raises(SnapshotError, match="bad snapshot"):
        snapshot.restore(snapshot.decode(blob), console(), None, refuse_file)


def test_snapshot_file_of_unknown_kind_refused_by_restore(real_snapshot: bytes) -> None:
    meta = copy.deepcopy(layout(real_snapshot).meta)
    meta["fds"].append(
        {
            "fd": 7,
            "cloexec": False,
            "file": 99,
            "state": {"kind": "rpipe", "pipe": 1, "end": "r", "flags": 0},
        }
    )
    snap = snapshot.decode(rebuild(real_snapshot, meta))
    with pytest.raises(SnapshotError, match="no file of kind 'rpipe' here"):
        snapshot.restore(snap, console(), None, refuse_file)


@pytest.mark.parametrize("state", [None, [], "console", 7])
def test_snapshot_file_state_that_is_not_an_object(real_snapshot: bytes, state) -> None:
    meta = copy.deepcopy(layout(real_snapshot).meta)
    meta["fds"][0]["state"] = state
    snap = snapshot.decode(rebuild(real_snapshot, meta))
    with pytest.raises(SnapshotError):
        snapshot.restore(snap, console(), None, refuse_file)


# hypothesis: whatever is done to a real snapshot, decode()+restore() either build a VM
# or raise SnapshotError -- never anything else (a tender must survive any snapshot)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.sampled_from([0, -1, 1, 4095, 4096, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def json_paths(value, prefix=()) -> list[tuple]:
    """Every path (keys / indexes) into a JSON document, inner nodes included."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, v in value.items():
            paths += json_paths(v, (*prefix, key))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):  # long lists: their first items are enough
            paths += json_paths(v, (*prefix, i))
    return paths


@st.composite
def mutations(draw, data: bytes) -> tuple:
    """A change to the snapshot ``data``, as a short description (see ``mutate``)."""
    lay = layout(data)
    kind = draw(st.sampled_from(["meta", "bytes", "range", "truncate", "extend"]))
    if kind == "meta":  # replace or delete one part of the metadata
        path = draw(st.sampled_from(json_paths(lay.meta)))
        return ("meta", path, "delete" if draw(st.booleans()) else draw(JSON_VALUES))
    if kind == "bytes":  # overwrite bytes, mostly in the header, metadata and range headers
        hot = [0, lay.meta_end, *[p for p, _, _ in lay.ranges]]
        spots = st.tuples(st.sampled_from(hot), st.integers(0, 64), st.integers(0, 255))
        return ("bytes", draw(st.lists(spots, min_size=1, max_size=4)))
    if kind == "range":  # a range header with other numbers
        i = draw(st.integers(0, len(lay.ranges) - 1))
        _, addr, n = lay.ranges[i]
        new_addr = draw(st.one_of(st.just(addr), st.integers(0, (1 << 64) - 1)))
        new_n = draw(
            st.one_of(
                st.just(n), st.integers(0, (1 << 64) - 1), st.integers(max(0, n - 4096), n + 4096)
            )
        )
        return ("range", i, new_addr, new_n)
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, len(data) - 1)))
    return ("extend", draw(st.binary(min_size=1, max_size=64)))


def mutate(data: bytes, change: tuple) -> bytes:
    lay = layout(data)
    kind = change[0]
    if kind == "meta":
        _, path, value = change
        meta = copy.deepcopy(lay.meta)
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if value == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return rebuild(data, meta)
    out = bytearray(data)
    if kind == "bytes":
        for base, off, byte in change[1]:
            out[min(len(out) - 1, base + off)] = byte
    elif kind == "range":
        _, i, addr, n = change
        RANGE.pack_into(out, lay.ranges[i][0], addr, n)
    elif kind == "truncate":
        del out[change[1] :]
    else:
        out += change[1]
    return bytes(out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_snapshots_raise_only_snapshot_error(data) -> None:
    real = take_snapshot()
    blob = mutate(real, data.draw(mutations(real), label="change"))
    try:
        k = snapshot.restore(snapshot.decode(blob), console(), None, refuse_file)
    except SnapshotError as e:
        assert str(e)  # a message that says what is wrong
        return
    k.close()


@pytest.mark.parametrize(
    "change",
    [("meta", ("process", "sigactions"), {"": None}), ("meta", ("process", "mmaps"), [[]])],
    ids=["empty-sigaction", "empty-mmap"],
)
def test_a_snapshot_with_an_entry_too_short_is_a_snapshot_error(change) -> None:
    """Found by the fuzz test above: an entry with fewer fields than it needs was an
    IndexError out of restore (the child's tender process logged a traceback)."""
    with pytest.raises(SnapshotError, match="inconsistent snapshot"):
        snapshot.restore(
            snapshot.decode(mutate(take_snapshot(), change)), console(), None, refuse_file
        )


def test_a_supervisor_keeps_no_thread_of_an_ended_vm(env: Env) -> None:
    """Each VM's connection is served by a thread of the supervisor; once the VM has
    ended its thread is gone from the supervisor's set (a long-lived instance that
    runs thousands of processes held one Thread object per ended VM until close)."""
    sink = CaptureSink()
    sup = env.supervisor("shm", sink)
    try:
        start(sup, "fork_exit_wait", "-t", "-n", "24")
        res = sup.wait()
        assert (res.outcome, res.status) == ("exited", 0), Run(res, sink).why()
        assert len(res.processes) == 1 + 1 + 24
        # the accept loops and at most the last VMs' threads still closing their channels
        wait_for(lambda: sup.threads <= 4, f"the supervisor's threads to end ({sup.threads})")
    finally:
        sup.close()
    assert sup.threads == 0
    env.check_clean()

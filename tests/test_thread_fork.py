"""Thread fork inside one VM: the child is a new thread of the same unikernel.

Every multi-process guest program runs in a thread-fork VM with exactly the
stdout it has natively (the expected values are test_programs_native's); the
documented differences (globals and heap blocks reachable only from globals
stay shared, the conservative stack scan, second-level heap blocks) are each
shown by a probe whose native output differs; then the VM-specific parts:
init (pid 1) and re-parenting, the instance's exit status, deadlock reports,
process and memory limits, memory returned by exited children, ``--ps``,
``clone`` and signals.

New probe programs: guest/programs/fork_hazards.c and thread_fork_probe.c
(their header comments give the expected output of every mode).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import image_path, native, vm
from test_programs_native import CASES, SEMANTICS_NATIVE, SEMANTICS_THREAD_FORK

from tender_service.machine.layout import DEFAULT_STACK, PAGE_SIZE
from tender_service.rump.kernel import Kernel
from tender_service.rump.stacks import KEEP, KEPT_OWNER
from tender_service.rump.syscalls import sys_process
from tender_service.rump.vminfo import VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, create_vm

SIGKILL = 9
INIT_PID, MAIN_PID = 1, 2
PROBE = "thread_fork_probe"

MULTI_PROCESS = {
    "fork_exit_wait", "pipe_throughput", "token_ring", "dup2_pipe", "pipe_eof", "sigpipe",
    "ids", "wait_variants", "kill_test", "pgroup_rules", "fork_bomb", "fd_independent", "prefork_server",
    "vfork_test", "orphan", "nested_fork",
}  # fmt: skip
# semantics differs by design (tested below); deadlock needs --forever (tested below)
SAME_AS_NATIVE = [case for case in CASES if case[1] in MULTI_PROCESS]
SAME_AS_NATIVE.append(
    ("prefork_server-w8-j2000", "prefork_server", ["-w", "8", "-j", "2000"], 0, "jobs=2000 ok\n")
)
CASE_OUT = {case[0]: case[4] for case in CASES}


def lines(*text: str) -> str:
    return "".join(t + "\n" for t in text)


@contextmanager
def built_vm(name: str, *args: str, **config) -> Iterator[tuple[Kernel, CaptureSink]]:
    """A VM built with create_vm (so that its kernel can be inspected after run())."""
    config.setdefault("timeout", 120)
    sink = CaptureSink()
    k = create_vm(image_path(name), list(args), config=VmConfig(**config), sink=sink)
    try:
        yield k, sink
    finally:
        k.close()


def chunk_bytes(k: Kernel) -> int:
    """Bytes of the page allocator that are not bucket pages (stacks, big blocks, mmaps).

    Bucket pages stay bucket pages once carved (memalloc.py, as in Rumprun),
    so only these must go back to the page allocator when processes exit.
    """
    return k.pages.used_bytes - k.heap.bucket_pages * PAGE_SIZE


# -- 1. every multi-process program: exactly the native stdout, exit 0 ----------------
def test_every_multi_process_program_is_covered() -> None:
    assert {case[1] for case in SAME_AS_NATIVE} == MULTI_PROCESS


@pytest.mark.parametrize(
    ("prog", "args", "rc", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in SAME_AS_NATIVE],
)
def test_same_output_as_native(prog: str, args: list[str], rc: int, expected: str) -> None:
    assert rc == 0
    r = vm(prog, *args)
    assert r.out == expected, f"stderr: {r.stderr!r}\nreports: {r.result.reports}"
    assert r.stderr == b""
    assert r.result.outcome == "exited"
    assert r.result.status == 0


def test_wait4_reaps_before_it_copies_the_status_out() -> None:
    """A bad status pointer: Linux reaps the child, then returns EFAULT (kernel_wait4)."""
    prog = Path(__file__).with_name("guest") / "wait_efault.c"
    expected = (
        "WNOHANG, child running: 0\n"
        "bad status pointer: -1 Bad address\n"
        "waited again: -1 No child process\n"
    )
    n = native(build_image(prog))
    assert (n.returncode, n.stdout.decode()) == (0, expected), n.stderr
    r = vm(build_image(prog))
    assert (r.result.status, r.out) == (0, expected), r.result.reports


# -- 2. documented semantics -------------------------------------------------------------
def test_semantics_globals_shared_rest_private() -> None:
    r = vm("semantics")
    assert r.result.status == 0, r.stderr
    assert r.out == SEMANTICS_THREAD_FORK
    n = native("semantics")
    assert n.returncode == 0, n.stderr
    assert n.stdout.decode() == SEMANTICS_NATIVE
    differ = {
        a.split("=")[0]
        for a, b in zip(r.out.splitlines(), SEMANTICS_NATIVE.splitlines(), strict=True)
        if a != b
    }
    assert differ == {"global", "heap_from_global"}


FORK_HAZARDS_VM = lines(
    "int_looking_like_stack_ptr=rebased",
    "heap_second_level=shared",
    "hoisted_errno=private",
    "int_looking_like_global_ptr=unchanged",
)
FORK_HAZARDS_NATIVE = lines(
    "int_looking_like_stack_ptr=unchanged",
    "heap_second_level=private",
    "hoisted_errno=private",
    "int_looking_like_global_ptr=unchanged",
)


def test_fork_hazards_in_vm() -> None:
    r = vm("fork_hazards")
    assert r.result.status == 0, r.stderr
    assert r.out == FORK_HAZARDS_VM


def test_fork_hazards_native() -> None:
    n = native("fork_hazards")
    assert n.returncode == 0, n.stderr
    assert n.stdout.decode() == FORK_HAZARDS_NATIVE


# -- 3. ids and errno --------------------------------------------------------------------
def test_ids_and_errno_private() -> None:
    r = vm("ids")
    assert r.result.status == 0
    assert r.out == CASE_OUT["ids"]
    assert r.result.forks == 2  # child and grandchild


def test_launched_program_is_pid_2_child_of_init() -> None:
    r = vm(PROBE, "ids")
    assert r.result.status == 0
    assert r.out == f"pid={MAIN_PID} ppid={INIT_PID}\n"
    assert {c[0] for c in r.chunks} == {MAIN_PID}
    assert [(p.pid, p.ppid, p.name) for p in r.result.processes] == [
        (INIT_PID, 0, "init"),
        (MAIN_PID, INIT_PID, PROBE),
    ]


# -- 4. process trees, pipes, wait --------------------------------------------------------
def test_hundred_children_each_own_exit_code() -> None:
    expected = "reaped 100 children, each with its own exit code\n"
    r = vm(PROBE, "exit_codes")
    assert r.out == expected, r.stderr
    assert r.result.status == 0
    assert r.result.forks == 100
    n = native(PROBE, "exit_codes")
    assert (n.returncode, n.stdout.decode()) == (0, expected)


def test_a_vm_keeps_its_first_forks_times_in_the_kernel(monkeypatch) -> None:
    """Each fork's time in the kernel is kept in fork order (``RunResult.fork_seconds``),
    up to ``FORK_TIMES_KEPT`` of them: a loop of forks never grows the VM's memory."""
    r = vm("fork_time", "-n", "5")
    assert r.result.forks == 5 and len(r.result.fork_seconds) == 5
    # the kernel's part of each fork is less than the whole fork the program timed
    timed = [float(x) for x in re.findall(r"fork_us=([0-9.]+)", r.out)]
    assert len(timed) == 5
    assert all(0 < k * 1e6 < t for k, t in zip(r.result.fork_seconds, timed, strict=True))
    monkeypatch.setattr(sys_process, "FORK_TIMES_KEPT", 3)
    r = vm("fork_time", "-n", "5")
    assert r.result.forks == 5 and len(r.result.fork_seconds) == 3


def test_fork_exit_wait_reaps_all() -> None:
    r = vm("fork_exit_wait")
    assert r.out == "ok 100 children\n"
    assert r.result.forks == 100
    # every child was reaped by the program, with the status it exited with
    children = [p for p in r.result.processes if p.pid not in (INIT_PID, MAIN_PID)]
    assert len(children) == 100
    assert all(p.state == "reaped" and p.ppid == MAIN_PID for p in children)
    assert sorted((p.status >> 8) for p in children) == sorted(i % 7 for i in range(100))


def test_nested_fork_tree() -> None:
    r = vm("nested_fork")
    assert r.out == "leaves=27 total=378\n"
    assert r.result.forks == 3 + 9 + 27


def test_token_ring_of_8_processes() -> None:
    r = vm("token_ring")
    assert r.out == "token=80\n"
    assert r.result.forks == 7  # the parent and 7 children


def test_dup2_child_stdout_goes_to_pipe() -> None:
    r = vm("dup2_pipe")
    assert r.out == CASE_OUT["dup2_pipe"]
    # the child's lines reached the console only through the parent
    assert {pid for pid, fd, _ in r.chunks} == {MAIN_PID}


def test_sig_ign_sigpipe_write_returns_epipe() -> None:
    r = vm("sigpipe")
    out = r.out.splitlines()
    assert "case A: writer killed by SIGPIPE" in out
    assert "case B: write returned -1 errno=EPIPE" in out


def test_kill_zero_after_reap_is_esrch() -> None:
    r = vm("kill_test")
    out = r.out.splitlines()
    assert "kill(reaped child, 0) = -1 ESRCH" in out
    assert "kill(-pgid, 0) = -1 ESRCH after reaping" in out


# -- 5. init, orphans, the instance's exit status ----------------------------------------
def test_orphan_adopted_by_init() -> None:
    r = vm(PROBE, "orphan_ppid")
    assert r.result.status == 0, r.stderr
    assert r.out == lines(f"grandchild_ppid={INIT_PID}", "reparented=yes")
    n = native(PROBE, "orphan_ppid")
    assert n.returncode == 0, n.stderr
    assert re.fullmatch(r"grandchild_ppid=\d+\nreparented=yes\n", n.stdout.decode())


def test_exit_status_is_the_launched_programs_while_a_child_lives_on() -> None:
    with built_vm(PROBE, "exit_early") as (k, sink):
        res = k.run()
        # the VM halted only once the last process had exited
        assert not k.sched.threads
        assert [p.pid for p in k.procs.values() if p.alive] == [INIT_PID]
    assert res.status == 3 << 8
    assert res.exit_code == 3
    assert res.outcome == "exited"
    assert bytes(sink.stdout) == (b"parent exits 3\nchild 3: parent gone, ppid=1, exiting 0\n")
    # the child wrote after the parent had exited: last chunk is the child's
    assert [pid for pid, _, _ in sink.chunks] == [MAIN_PID, 3]


def test_process_table_shows_child_that_outlived_the_program() -> None:
    r = vm(PROBE, "exit_early")
    assert r.result.status == 3 << 8
    rows = {p.pid: p for p in r.result.processes}
    assert rows[MAIN_PID].status == 3 << 8
    assert 3 in rows, f"child pid 3 missing from RunResult.processes: {r.result.processes}"
    assert rows[3].ppid == INIT_PID
    assert rows[3].status == 0  # exited 0


# -- 6. deadlock -----------------------------------------------------------------------
REPORT_LINE = re.compile(r"^\s+pid (\d+) \((.*?)\): (.+)$")


def deadlock_report(reports: list[str]) -> dict[int, str]:
    (report,) = [r for r in reports if r.startswith("deadlock")]
    found = [REPORT_LINE.match(line) for line in report.splitlines()[1:]]
    assert all(found), report
    return {int(m.group(1)): m.group(3) for m in found}


def test_deadlock_forever_is_detected() -> None:
    r = vm("deadlock", "--forever")
    assert r.result.outcome == "deadlock"
    assert r.out == "deadlock: reading a pipe whose only writer is myself\n"
    assert r.result.status == SIGKILL  # killed when the deadlock was found
    waits = deadlock_report(r.result.reports)
    assert list(waits) == [MAIN_PID]
    assert re.fullmatch(r"read pipe:\d+:r", waits[MAIN_PID])


def test_two_process_deadlock_lists_both() -> None:
    r = vm(PROBE, "wait_deadlock")
    assert r.result.outcome == "deadlock"
    assert r.out == "parent waits for a child that reads a pipe nobody writes\n"
    waits = deadlock_report(r.result.reports)
    assert sorted(waits) == [MAIN_PID, 3]
    assert "wait4" in waits[MAIN_PID]
    assert re.fullmatch(r"read pipe:\d+:r", waits[3])
    assert r.result.status == SIGKILL


# -- 7. limits ---------------------------------------------------------------------------
@pytest.mark.parametrize("max_procs", [50, 3, 2])
def test_fork_bomb_hits_max_procs(max_procs: int) -> None:
    # max_procs counts every live pid: init (1) and the launched program (2) too
    forked = max_procs - 2
    r = vm("fork_bomb", "-n", "5000", max_procs=max_procs)
    assert r.out == lines("fork failed errno=EAGAIN", f"forked={forked}", f"reaped={forked}")
    assert r.result.status == 0
    assert r.result.forks == forked
    assert r.result.reports == []  # nobody crashed: the VM stayed healthy


def test_fork_bomb_runs_out_of_memory() -> None:
    ram = 8 << 20
    r = vm("fork_bomb", "-n", "5000", ram=ram)
    m = re.fullmatch(r"fork failed errno=ENOMEM\nforked=(\d+)\nreaped=(\d+)\n", r.out)
    assert m, r.out
    assert m.group(1) == m.group(2)
    assert 1 <= int(m.group(1)) < ram // DEFAULT_STACK
    assert r.result.status == 0 and r.result.outcome == "exited"
    assert r.result.reports == []


# -- 8. memory is returned --------------------------------------------------------------
def test_children_memory_returned_after_exit() -> None:
    with built_vm("hello") as (k, _):
        assert k.run().status == 0
        k.drop_caches()
        hello_chunks = chunk_bytes(k)
    # cooperative: the parent forks all 100 before any child runs, so all were alive at once
    with built_vm("fork_exit_wait", quantum=0) as (k, sink):
        res = k.run()
        assert bytes(sink.stdout) == b"ok 100 children\n"
        assert res.peak_memory >= 100 * DEFAULT_STACK  # the children did hold memory
        # what is left is the stacks and TLS blocks the kernel keeps for the next
        # fork, and only them
        assert len(k.stacks.kept) == len(k.tls_blocks.kept) == KEEP
        kept = sorted(k.stacks.kept + k.tls_blocks.kept)
        assert k.heap.live_count == 2 * KEEP
        assert sorted(a.user for a in k.heap.owned(KEPT_OWNER)) == kept
        assert k.drop_caches() == 2 * KEEP
        assert k.heap.live_count == 0
        assert k.heap.live_bytes == 0
        assert all(k.heap.owned_count(pid) == 0 for pid in range(1, 103))
        # stacks and other page chunks all went back; only bucket pages remain
        assert chunk_bytes(k) == hello_chunks


def test_committed_memory_per_blocked_child() -> None:
    n = 10
    base = vm("fork_bomb", "-n", "0")
    full = vm("fork_bomb", "-n", str(n))
    assert full.out == lines("reached max", f"forked={n}", f"reaped={n}")
    per_child = (full.result.peak_memory - base.result.peak_memory) / n
    assert per_child >= DEFAULT_STACK  # every child has a stack of its own
    assert per_child <= DEFAULT_STACK + (16 << 10), f"{per_child:.0f} bytes per child"


# -- 9. --ps -------------------------------------------------------------------------------
def test_cli_ps_process_table() -> None:
    unifork = Path(sys.executable).with_name("unifork")
    assert unifork.is_file(), unifork
    p = subprocess.run(
        [str(unifork), "run", "nested_fork", "--ps"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "leaves=27 total=378\n"
    err = p.stderr.splitlines()
    (header,) = [i for i, line in enumerate(err) if re.match(r"\s*PID\s+PPID\b", line)]
    rows = {int(cols[0]): cols for cols in (line.split() for line in err[header + 1 :])}
    assert rows[MAIN_PID][1] == str(INIT_PID) and rows[MAIN_PID][-1] == "nested_fork"
    assert rows[INIT_PID][1] == "0" and rows[INIT_PID][-1] == "init"


# -- 10. clone -------------------------------------------------------------------------------
def test_clone_with_sharing_flags_is_enosys() -> None:
    r = vm(PROBE, "clone_vm")
    assert r.out == "clone(CLONE_VM|SIGCHLD)=-1 errno=ENOSYS\n"
    assert r.result.status == 0
    assert r.result.forks == 0


def test_clone_sigchld_is_fork() -> None:
    expected = lines("clone(SIGCHLD): returned the child's pid", "clone(SIGCHLD): child exited 42")
    r = vm(PROBE, "clone_fork")
    assert r.out == expected, r.stderr
    assert r.result.status == 0
    assert r.result.forks == 1
    n = native(PROBE, "clone_fork")
    assert (n.returncode, n.stdout.decode()) == (0, expected)


# -- 11. signals with a guest handler ----------------------------------------------------------
def test_caught_signal_runs_its_handler_as_natively() -> None:
    """The handler runs and returns (issue 15; tests/test_signals.py has the rest)."""
    expected = lines("handler_ran=1 pending_usr1=0", "still running")
    r = vm(PROBE, "sigusr1")
    assert (r.result.outcome, r.result.status) == ("exited", 0)
    assert r.out == expected
    n = native(PROBE, "sigusr1")
    assert n.stdout.decode() == expected

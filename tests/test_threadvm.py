"""Thread-fork VMs in processes of their own (instance/threadvm.py, instance/vmserver.py).

Everything here is real: the tender's ``ThreadVmHost`` spawns the fork server,
which forks one process per VM running real guest images.  A VM in its own
process must give exactly what the same VM gives in-process (status, console,
process table, fork count); a crash of the emulator must end only that VM; a
dead fork server is replaced; a VM whose tender hangs up stops.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import image_path, wait_until

from tender_service.instance.threadvm import ThreadVm, ThreadVmHost
from tender_service.rump.signals import SIGKILL, signaled_status
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, run_vm

GUEST = Path(__file__).with_name("guest")
WAIT = 60.0


@pytest.fixture(scope="module")
def host() -> Iterator[ThreadVmHost]:
    h = ThreadVmHost()
    try:
        yield h
    finally:
        h.close()


def launch(
    host: ThreadVmHost, image: str | Path, *args: str, timeout: float = 60.0, **config
) -> tuple[ThreadVm, CaptureSink, list[float]]:
    sink, forks = CaptureSink(), []
    path, name = (image, image.stem) if isinstance(image, Path) else (image_path(image), image)
    vm = host.launch(
        "test",
        str(path),
        list(args),
        ["PATH=/bin"],
        VmConfig(timeout=timeout, tty=False, **config),
        name,
        sink,
        forks.append,
    )
    return vm, sink, forks


def in_background(vm: ThreadVm) -> tuple[threading.Thread, list[RunResult]]:
    out: list[RunResult] = []
    t = threading.Thread(target=lambda: out.append(vm.wait()), daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize(
    "image,args",
    [
        ("hello", []),
        ("token_ring", ["-n", "4", "-r", "3"]),
        ("fork_exit_wait", ["-n", "5"]),
        ("exit_code", ["7"]),
        ("fault_segv", []),
        ("semantics", []),
    ],
)
def test_a_vm_in_its_own_process_gives_what_it_gives_in_process(host, image, args):
    vm, sink, forks = launch(host, image, *args)
    r = vm.wait()
    here = CaptureSink()
    ref = run_vm(
        image_path(image), args, ["PATH=/bin"], VmConfig(timeout=60, tty=False), here, argv0=image
    )
    assert (r.status, r.outcome, r.forks, r.reports) == (
        ref.status,
        ref.outcome,
        ref.forks,
        ref.reports,
    )
    assert (bytes(sink.stdout), bytes(sink.stderr)) == (bytes(here.stdout), bytes(here.stderr))
    assert {pid for pid, _, _ in sink.chunks} == {pid for pid, _, _ in here.chunks}
    assert [(p.pid, p.ppid, p.name, p.state, p.status) for p in r.processes] == [
        (p.pid, p.ppid, p.name, p.state, p.status) for p in ref.processes
    ]
    assert len(forks) == r.forks and all(0 < s < WAIT for s in forks)
    # each fork's time in the kernel comes with the result, the same as the observer's
    assert r.fork_seconds == forks and len(ref.fork_seconds or []) == ref.forks
    assert vm.exited.wait(WAIT) and vm.wait_status == 0
    assert vm.os_pid not in (0, os.getpid())


def test_fork_latencies_come_in_batches_and_all_arrive(host):
    vm, _, forks = launch(host, "fork_time", "-n", "600")
    r = vm.wait()
    assert (r.outcome, r.forks) == ("exited", 600), r
    assert len(forks) == 600


def test_console_output_larger_than_a_frame_arrives_whole(host):
    vm, sink, _ = launch(host, build_image(GUEST / "big_write.c"), "3")
    r = vm.wait()
    assert (r.outcome, r.status) == ("exited", 0), r
    n = 3 << 20
    assert bytes(sink.stdout) == bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def test_query_then_kill(host):
    vm, sink, _ = launch(host, "spin")
    t, out = in_background(vm)
    wait_until(lambda: b"spinning" in sink.stdout, WAIT, "spin to start")
    st = vm.query()
    assert [(p.pid, p.state) for p in st.processes] == [(1, "alive"), (2, "alive")]
    assert st.committed_memory > 0
    vm.kill("killed")
    t.join(WAIT)
    (r,) = out
    assert (r.outcome, r.status) == ("killed", SIGKILL), r
    assert vm.query().processes == st.processes  # a finished VM: the last known table


def test_time_limit(host):
    vm, _, _ = launch(host, "spin", timeout=1.0)
    r = vm.wait()
    assert (r.outcome, r.status) == ("timeout", SIGKILL), r
    assert any("time limit" in line for line in r.reports), r.reports


def test_an_image_the_loader_refuses_is_a_clear_error(host, tmp_path):
    bad = tmp_path / "not-elf"
    bad.write_bytes(b"#!/bin/sh\necho hi\n")
    vm, _, _ = launch(host, bad)
    with pytest.raises(RuntimeError, match="not an ELF file"):
        vm.wait()
    assert vm.exited.wait(WAIT) and vm.wait_status == 0


def test_an_emulator_crash_loses_only_its_vm(host):
    beside, sink, _ = launch(host, "spin")
    t, out = in_background(beside)
    wait_until(lambda: b"spinning" in sink.stdout, WAIT, "spin to start")
    vm, crashed_sink, _ = launch(host, build_image(GUEST / "x87_block.c"))
    r = vm.wait()
    assert (r.outcome, r.status) == ("signaled", signaled_status(SIGKILL)), r
    assert os.WIFSIGNALED(vm.wait_status) and os.WTERMSIG(vm.wait_status) == signal.SIGSEGV
    assert r.reports == [
        f"its VM was lost: the process that ran it (pid {vm.os_pid}) died "
        "of SIGSEGV (the emulator crashed)"
    ]
    assert bytes(crashed_sink.stdout) == b""
    assert [p.state for p in beside.query().processes] == ["alive", "alive"]
    beside.kill()
    t.join(WAIT)
    assert out[0].outcome == "killed"


def test_a_dead_fork_server_is_replaced(host):
    running, sink, _ = launch(host, "spin")
    t, out = in_background(running)
    wait_until(lambda: b"spinning" in sink.stdout, WAIT, "spin to start")
    old = host._server.proc
    old.kill()
    old.join(WAIT)
    # its VM lives on (it is the server's child, not part of it) and still answers
    assert [p.state for p in running.query().processes] == ["alive", "alive"]
    later, later_sink, _ = launch(host, "hello")
    assert later.wait().outcome == "exited" and later_sink.stdout == b"Hello, unikernel!\n"
    assert host._server.proc is not old and host._server.proc.is_alive()
    running.kill()
    t.join(WAIT)
    assert out[0].outcome == "killed"
    assert running.wait_status is None  # nobody was left to say how its process ended


def test_a_vm_stops_when_its_tender_hangs_up(host):
    vm, sink, _ = launch(host, "spin")
    t, out = in_background(vm)
    wait_until(lambda: b"spinning" in sink.stdout, WAIT, "spin to start")
    pid = vm.os_pid
    vm.conn.close()  # what the tender's death does to the connection
    t.join(WAIT)
    assert vm.exited.wait(WAIT), f"VM process {pid} still runs after its tender hung up"
    assert vm.wait_status == 0


def test_many_at_once(host):
    vms = [launch(host, "token_ring", "-n", "3", "-r", "5") for _ in range(12)]
    for vm, sink, _ in vms:
        r = vm.wait()
        assert (r.outcome, r.status, bytes(sink.stdout)) == ("exited", 0, b"token=15\n"), r


def test_the_fork_servers_warm_up_forks_in_every_one_vm_mode() -> None:
    """The server runs a musl program's forks in each one-VM mode before it forks
    any VM process (issue 17), and every one of them exits cleanly."""
    from tender_service.instance.vmserver import WARM_FORKS, warm_up_fork_paths
    from tender_service.vm import FORKERS

    assert WARM_FORKS >= 8  # CPython specializes a code object after its first runs
    assert warm_up_fork_paths() == {mode: 0 for mode in FORKERS}


def _faults_of_a_full_collection_in_a_child(freeze: bool) -> int:
    """Fork; in the child, the minor page faults a full garbage collection takes."""
    import gc
    import resource

    from tender_service.instance.vmserver import freeze_for_fork

    if freeze:
        freeze_for_fork(full=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave at once
        code = 1
        try:
            os.close(r)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            gc.collect()
            after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            os.write(w, str(after - before).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        faults = int(os.read(r, 64))
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if freeze:
            gc.unfreeze()
    assert status == 0
    return faults


def test_the_fork_server_freezes_its_objects_before_a_fork() -> None:
    """A collection in a forked VM process leaves the server's objects alone once the
    server has frozen them (``freeze_for_fork``): without it, the child's first full
    collection writes to every object's header and copies the pages they are on."""
    held = [[i] for i in range(200_000)]  # a server's long-lived objects, ~6k pages
    try:
        plain = _faults_of_a_full_collection_in_a_child(freeze=False)
        frozen = _faults_of_a_full_collection_in_a_child(freeze=True)
    finally:
        del held
    assert plain > 1000, plain  # the collection touched the inherited pages
    assert frozen < plain / 10, (frozen, plain)

"""The jail of VM processes (instance/jail.py; issue 12, finding 8).

The attack: a guest that takes over the emulator owns its host process, and
with it every host syscall that process may make.  These tests stand in for
that guest: they run code in the VM process itself, through the real code
path (the tender's ``ThreadVmHost`` spawns the real fork server, which forks
the real per-instance process; the warm pool spawns real workers), and call
the host directly.  The only thing swapped in, in that spawned server, is what
the VM runs: ``create_vm`` returns a real VM whose ``run`` is the probe.

The same probe in an unjailed process (``jailed=False``) does reach the host:
the positive control, so a probe that silently stopped trying would fail.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import image_path, wait_until

from tender_service.instance import jail, vmserver, worker
from tender_service.instance import pool as pool_module
from tender_service.instance.pool import WarmPool
from tender_service.instance.threadvm import ThreadVm, ThreadVmHost
from tender_service.rump.kernel import Kernel
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.vm import CaptureSink

WAIT = 60.0
SECRET = "UNIFORK_TEST_SECRET"
_REAL_SERVE = vmserver.serve
_REAL_CREATE_VM = vmserver.create_vm
_REAL_WORKER_SERVE = worker.serve
_REAL_RUN_WORKER = worker.run_worker


def _attempt(name: str, call: Callable[[], object]) -> str:
    """``name=ok`` or ``name=ERRNO`` (the refusal's errno name)."""
    try:
        out = call()
    except OSError as e:
        return f"{name}={errno.errorcode.get(e.errno or 0, e.errno)}"
    if isinstance(out, socket.socket):
        out.close()
    elif isinstance(out, int) and name == "open":
        os.close(out)
    return f"{name}=ok"


def _fork() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _thread() -> None:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


HOST_CALLS: list[tuple[str, Callable[[], object]]] = [
    ("open", lambda: os.open("/etc/passwd", os.O_RDONLY)),
    ("stat", lambda: os.stat("/etc/passwd")),
    ("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
    ("socket_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
    ("fork", _fork),
    # a path that does not exist: refused, EPERM; allowed, ENOENT (nothing is replaced)
    ("execv", lambda: os.execv("/nonexistent/unifork-probe", ["probe"])),
    ("kill_init", lambda: os.kill(1, 0)),
    ("thread", _thread),  # allowed: the VM's own threads
]


# -- in the spawned fork server and its VM processes ----------------------------------------
def _probe_run(k: Kernel, sink) -> RunResult:
    """What the taken-over VM process does: call the host, say what it got, then stay
    until the tender kills the VM (so that the test can look at the process)."""
    results = [_attempt(name, call) for name, call in HOST_CALLS]
    results.append("env=" + ",".join(sorted(os.environ)))
    sink(2, 1, ("probe " + " ".join(results) + "\n").encode())
    while k._stop_reason is None:
        select.select([k._wakeup_r], [], [])
    return RunResult(
        status=0, outcome="exited", reports=results, elapsed=0.0, forks=0, syscalls=0, peak_memory=0
    )


def _probe_create_vm(*args, sink=None, **kw) -> Kernel:
    k = _REAL_CREATE_VM(*args, sink=sink, **kw)
    k.run = lambda: _probe_run(k, sink)
    return k


def _probe_serve(conn, level: int, jailed: bool = True) -> None:
    """The fork server, with the probe for a VM (the spare's warm-up runs a real one)."""
    vmserver.create_vm = _probe_create_vm
    _REAL_SERVE(conn, level, jailed)


def _open_closed(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY))


def _probe_worker_serve(listen: str, ready=None, parent_fd=None) -> None:
    results = [_attempt(name, call) for name, call in HOST_CALLS if name != "thread"]
    tender = os.getppid()  # the pool's owner: the tender or `unifork run`
    results += [
        _attempt("socket_packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
        _attempt("socket_netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
        # the tender's memory (its supervisors, every instance's) and its secrets
        _attempt("tender_mem", lambda: _open_closed(f"/proc/{tender}/mem")),
        _attempt("tender_environ", lambda: _open_closed(f"/proc/{tender}/environ")),
    ]
    results.append("env=" + ",".join(sorted(os.environ)))
    logging.getLogger("unifork.test.probe").warning("probe %s", " ".join(results))
    _REAL_WORKER_SERVE(listen, ready, parent_fd)


def _probe_run_worker(*args) -> None:
    worker.serve = _probe_worker_serve
    _REAL_RUN_WORKER(*args)


# -- the tests ------------------------------------------------------------------------------
@pytest.fixture
def secret_env(monkeypatch) -> str:
    """A secret in the tender's environment, as a bearer token was."""
    value = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv(SECRET, value)
    return value


def _probe_host(monkeypatch, jailed: bool) -> Iterator[ThreadVmHost]:
    monkeypatch.setattr(vmserver, "serve", _probe_serve)  # the spawned server's target
    h = ThreadVmHost(jailed=jailed)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def jailed_host(monkeypatch, secret_env) -> Iterator[ThreadVmHost]:
    yield from _probe_host(monkeypatch, True)


@pytest.fixture
def open_host(monkeypatch, secret_env) -> Iterator[ThreadVmHost]:
    yield from _probe_host(monkeypatch, False)


def _run_probe(
    host: ThreadVmHost, listener: socket.socket | None = None
) -> tuple[ThreadVm, CaptureSink, list[RunResult]]:
    """``listener``: the VM process serves it as a published port (its wider filter)."""
    sink = CaptureSink()
    publish = [("127.0.0.1", listener.getsockname()[1], 80)] if listener is not None else []
    vm = host.launch(
        "jail-test",
        str(image_path("hello")),
        [],
        ["PATH=/bin"],
        VmConfig(timeout=WAIT, tty=False),
        "hello",
        sink,
        lambda s: None,
        publish=publish,
        listeners=[listener.fileno()] if listener is not None else [],
    )
    out: list[RunResult] = []
    threading.Thread(target=lambda: out.append(vm.wait()), daemon=True).start()
    wait_until(lambda: b"probe " in sink.stdout or out, WAIT, "the probe's report")
    return vm, sink, out


def _results(sink: CaptureSink) -> dict[str, str]:
    line = sink.stdout.decode().split("probe ", 1)[1].split("\n", 1)[0]
    return dict(item.split("=", 1) for item in line.split())


def _field(pid: int, name: str) -> str:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(name + ":"):
            return row.split(":", 1)[1].split()[0]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def _end(vm: ThreadVm, out: list[RunResult]) -> None:
    """Kill the VM; its process must be gone afterwards (nothing leaked)."""
    pid = vm.os_pid
    vm.kill()
    wait_until(lambda: out, WAIT, "the probed VM to end")
    wait_until(vm.exited.is_set, WAIT, "the fork server to report the VM process's end")
    assert not Path(f"/proc/{pid}").exists() or _field(pid, "State") == "Z"


def test_a_jailed_vm_process_cannot_reach_the_host(jailed_host, secret_env):
    vm, sink, out = _run_probe(jailed_host)
    try:
        got = _results(sink)
        # every host syscall is refused with EPERM; the process is not killed (SIGSYS)
        # and carries on: it makes threads, reports, and ends when killed
        for name in ("open", "stat", "socket_inet", "socket_unix", "fork", "execv", "kill_init"):
            assert got[name] == "EPERM", (name, got)
        assert got["thread"] == "ok"
        assert got["env"] == "LANG,PATH" or set(got["env"].split(",")) <= set(jail.BASE_ENV)
        pid = vm.os_pid
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert secret_env.encode() not in environ and SECRET.encode() not in environ
        assert _field(pid, "NoNewPrivs") == "1"
        assert _field(pid, "Seccomp") == "2"  # a filter
        assert _field(pid, "Uid") == "65534"  # nobody on the host: a user namespace, no map
        for ns in ("user", "mnt", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max address space" in limits and "unlimited" not in next(
            r for r in limits.splitlines() if "address space" in r
        )
        assert next(r for r in limits.splitlines() if "core file" in r).split()[4:6] == ["0", "0"]
    finally:
        _end(vm, out)
    assert out[0].outcome == "exited"


def test_a_vm_process_serving_published_ports_still_opens_nothing(jailed_host, secret_env):
    """With published ports (a tender's thread-fork instance launched with publish)
    the filter also allows accept4, recvfrom, sendto, shutdown, ioctl(FIONBIO) and
    640 fds: every other host call is refused as before, socket() included."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        vm, sink, out = _run_probe(jailed_host, listener)
    try:
        got = _results(sink)
        for name in ("open", "stat", "socket_inet", "socket_unix", "fork", "execv", "kill_init"):
            assert got[name] == "EPERM", (name, got)
        limits = Path(f"/proc/{vm.os_pid}/limits").read_text()
        assert next(r for r in limits.splitlines() if "open files" in r).split()[3:5] == [
            "640",
            "640",
        ]
    finally:
        _end(vm, out)


def test_unjailed_the_same_probe_reaches_the_host(open_host, secret_env):
    """The positive control: without the jail the probe's calls succeed."""
    vm, sink, out = _run_probe(open_host)
    try:
        got = _results(sink)
        for name in ("open", "stat", "socket_inet", "socket_unix", "fork", "thread", "kill_init"):
            assert got[name] == "ok", (name, got)
        assert got["execv"] == "ENOENT"
        assert SECRET in got["env"].split(",")
        assert _field(vm.os_pid, "Seccomp") == "0"
    finally:
        _end(vm, out)


@pytest.mark.parametrize("jailed", [True, False])
def test_pool_workers_are_jailed(monkeypatch, caplog, secret_env, jailed):
    """A VM-clone worker keeps what it needs (Unix/inet sockets, files: see
    docs/reliability.md) and loses exec, fork, other socket families, its secrets."""
    monkeypatch.setattr(pool_module, "_worker_main", _probe_run_worker)  # the pool's entry point
    caplog.set_level(logging.WARNING, "unifork.test.probe")
    with WarmPool(1, jailed=jailed) as pool:
        pool.wait_ready()
        wait_until(
            lambda: any(r.name == "unifork.test.probe" for r in caplog.records),
            WAIT,
            "the worker's probe report",
        )
        pid = pool.workers[0].pid
        report = next(r.getMessage() for r in caplog.records if r.name == "unifork.test.probe")
        got = dict(item.split("=", 1) for item in report.split("probe ", 1)[1].split())
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        if not jailed:  # the positive control
            assert (got["execv"], got["fork"]) == ("ENOENT", "ok")
            assert (got["tender_mem"], got["tender_environ"]) == ("ok", "ok")
            assert got["socket_packet"] == "ok" and got["socket_netlink"] == "ok"
            assert secret_env.encode() in environ
            return
        for name in ("fork", "execv", "socket_packet", "socket_netlink", "kill_init"):
            assert got[name] == "EPERM", (name, got)
        # ptrace access to the tender's memory, which it lacks (a root worker still
        # reads its environ and maps: test_shielded_processes_are_closed_to_their_peers)
        assert got["tender_mem"] in ("EACCES", "EPERM"), got
        for name in ("open", "stat", "socket_inet", "socket_unix"):  # what it still needs
            assert got[name] == "ok", (name, got)
        assert SECRET not in got["env"].split(",")
        assert secret_env.encode() not in environ
        assert _field(pid, "NoNewPrivs") == "1"
        assert _field(pid, "Seccomp") == "2"
        for ns in ("ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")


#: a host (shielded or not) whose child, shielded as a pool process is, opens the
#: host's /proc files: what a taken-over pool process would read or write
_PEER_PROBE = """
import os, sys
from tender_service.instance import jail
if sys.argv[1] == "1":
    jail.shield_host()
pid = os.fork()
if pid == 0:
    jail.shield_from_peers(jail.JailReport())
    out = []
    for name in ("mem", "fd/0", "environ", "maps"):
        try:
            os.close(os.open(f"/proc/{os.getppid()}/{name}", os.O_RDONLY))
            out.append("ok")
        except OSError as e:
            out.append(str(e.errno))
    print(" ".join(out))
    os._exit(0)
os.waitpid(pid, 0)
"""
DENIED = str(errno.EACCES)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv(1) to run the host as another uid",
)
@pytest.mark.parametrize(
    ("uid", "shielded", "expect"),
    [
        (10001, False, ["ok", "ok", "ok", "ok"]),  # the same uid opens everything
        (10001, True, [DENIED] * 4),  # deploy/: the tender's uid, no capability
        (0, True, [DENIED, DENIED, "ok", "ok"]),  # root: environ, maps stay readable
    ],
    ids=["uid10001-open", "uid10001-shielded", "root-shielded"],
)
def test_shielded_processes_are_closed_to_their_peers(uid, shielded, expect):
    """``shield_host`` (the tender, ``unifork run``) and ``shield_from_peers`` (each
    pool process): a pool process runs as the tender's uid, and could open the
    tender's /proc/PID/mem and fd links (its memory: every instance's supervisor)."""
    cmd = [sys.executable, "-c", _PEER_PROBE, "1" if shielded else "0"]
    if uid:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=WAIT, cwd=root, check=True
    ).stdout
    assert out.split() == expect  # mem, fd/0, environ, maps


@pytest.mark.parametrize("value,on", [("", True), ("0", True), ("1", False), ("yes", False)])
def test_the_debug_switch(monkeypatch, value, on):
    """UNIFORK_NO_JAIL=1 (what --no-jail means for the tender's children) turns it off."""
    monkeypatch.setenv(jail.NO_JAIL_ENV, value)
    assert jail.enabled() is on

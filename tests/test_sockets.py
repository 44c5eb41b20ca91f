"""Guest sockets and readiness (issue 16, first step): AF_UNIX sockets, poll,
select, epoll, eventfd, with the same output natively and in every fork mode.

guest/programs/sock_unix.c (one process: names, datagrams, SCM_RIGHTS, options,
errnos and bad input), sock_poll.c (readiness, timeouts, EINTR, a forked
writer) and sock_pair.c (a stream socketpair shared across fork: ping-pong,
bulk, half-close, EPIPE/SIGPIPE) print what the static binary prints as an
ordinary Linux process; each mode must print exactly that.  `sock_unix fork`
(a path server with a forked client, SCM_RIGHTS from a child) needs one kernel:
native and thread fork; in VM-clone mode the child VM cannot reach a name bound
in its parent's VM (ECONNREFUSED, docs/semantics.md).  sock_pass.c passes files
with SCM_RIGHTS over a socketpair shared across fork, both ways (pipe ends, a
file with its shared offset, socket ends, a TCP listener; dropped and stranded
ones): the same natively, in thread and copy fork, and across VMs.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import image_path, native, vm

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.instance.supervisor import ProcRec, Supervisor
from tender_service.rump.vminfo import VmConfig
from tender_service.transports.broker import IN_FLIGHT_HOLDER, PIPE_CAPACITY
from tender_service.transports.frames import Frame
from tender_service.transports.protocol import FILES, NONBLOCK, Msg, pack_files
from tender_service.vm import DEFAULT_ENV, CaptureSink, create_vm

PROGRAMS = [("sock_unix", []), ("sock_poll", []), ("sock_pair", [])]
#: sock_inet in VM-clone: the parent's TCP listener is the instance's (the supervisor
#: holds its queue), the child VM's connect reaches it (transports/listeners.py)
VMCLONE_PROGRAMS = [*PROGRAMS, ("sock_inet", [])]
VMCLONE = ["shm", "tcp"]


def vmclone_out(pool: WarmPool, transport: str, name: str, *args: str) -> str:
    """``name`` run to its end in VM-clone mode (it must exit 0): its stdout."""
    sink = CaptureSink()
    result = run_vmclone(
        image_path(name),
        list(args),
        config=VmConfig(timeout=120),
        sink=sink,
        transport=transport,
        pool=pool,
    )
    out = bytes(sink.stdout).decode(errors="replace")
    assert (result.outcome, result.status) == ("exited", 0), (out, sink.stderr, result.reports)
    return out


@pytest.fixture(scope="module")
def native_outs() -> Iterator[dict[str, str]]:
    top = Path(tempfile.mkdtemp(prefix="unifork-sock-", dir="/dev/shm"))
    outs: dict[str, str] = {}
    try:
        for name, args in [*VMCLONE_PROGRAMS, ("sock_unix", ["fork"])]:
            n = native(name, *args, str(top / name))
            assert n.returncode == 0, (name, n.stdout, n.stderr)
            outs[" ".join([name, *args])] = n.stdout.decode()
        yield outs
    finally:
        shutil.rmtree(top)


def test_native_outputs_are_complete(native_outs: dict[str, str]) -> None:
    for out in native_outs.values():
        assert out.endswith("done\n")
    assert "connect before listen = -1 ECONNREFUSED" in native_outs["sock_unix"]
    assert "epoll_wait again (ET: nothing new) = 0" in native_outs["sock_poll"]
    assert "write = -1 EPIPE, SIGPIPE 1" in native_outs["sock_pair"]


@pytest.mark.parametrize("name,args", [*PROGRAMS, ("sock_unix", ["fork"])])
def test_thread_mode_matches_native(
    native_outs: dict[str, str], name: str, args: list[str]
) -> None:
    r = vm(name, *args, f"/tmp/{name}")
    assert r.result.status == 0, (r.out, r.stderr, r.result.reports)
    assert r.out == native_outs[" ".join([name, *args])]


@pytest.mark.parametrize("transport", VMCLONE)
@pytest.mark.parametrize("name,args", VMCLONE_PROGRAMS)
def test_vmclone_matches_native(
    native_outs: dict[str, str], pool: WarmPool, transport: str, name: str, args: list[str]
) -> None:
    out = vmclone_out(pool, transport, name, *args, f"/tmp/{name}")
    assert out == native_outs[" ".join([name, *args])]


#: the lines of sock_across that differ in VM-clone mode, and what they are there
ACROSS_VMCLONE = {
    "child: connect to the parent's name": "-1 ECONNREFUSED",
    "child: accept on the inherited listener": "-1 EOPNOTSUPP",
}


def across_vmclone(native_out: str) -> str:
    """sock_across's native output with the documented VM-clone differences: a name
    bound in the parent's VM is not in the child's, a listening AF_UNIX socket does
    not cross VMs.  Everything else (SCM_RIGHTS included) is the native output."""
    lines = []
    for line in native_out.splitlines(keepends=True):
        what = line.split(" = ", 1)[0]
        lines.append(f"{what} = {ACROSS_VMCLONE[what]}\n" if what in ACROSS_VMCLONE else line)
    return "".join(lines)


def test_inherited_sockets_in_one_kernel() -> None:
    """Natively and in thread fork the child reaches its parent's name, accepts on
    the listener it inherited and passes a pipe end up (the parent's recvmsg takes
    the byte sent with it, reads the pipe's byte, then recv takes the rest)."""
    n = native("sock_across")
    assert n.returncode == 0, n.stderr
    assert "child: accept on the inherited listener = " in n.stdout.decode()
    assert "EOPNOTSUPP" not in n.stdout.decode()
    r = vm("sock_across")
    assert r.result.status == 0, (r.out, r.result.reports)
    assert r.out == n.stdout.decode()


@pytest.mark.parametrize("transport", VMCLONE)
def test_inherited_sockets_across_vms(pool: WarmPool, transport: str) -> None:
    """The documented VM-clone limits: a name bound in the parent's VM is not in the
    child's, a listening AF_UNIX socket does not cross VMs; the pair's bytes and the
    fd the child passes up with SCM_RIGHTS do, as natively."""
    n = native("sock_across")
    assert n.returncode == 0, n.stderr
    out = vmclone_out(pool, transport, "sock_across")
    assert out == across_vmclone(n.stdout.decode())
    assert "child: sendmsg SCM_RIGHTS = 1\n" in out


@pytest.fixture(scope="module")
def pass_native() -> Iterator[str]:
    top = Path(tempfile.mkdtemp(prefix="unifork-pass-", dir="/dev/shm"))
    try:
        n = native("sock_pass", str(top / "f"))
        assert n.returncode == 0, (n.stdout, n.stderr)
        yield n.stdout.decode()
    finally:
        shutil.rmtree(top)


def test_sock_pass_native_is_complete(pass_native: str) -> None:
    """The reference: every kind arrives and works (a TCP listener too: the child
    accepts on it), the file's offset is shared, dropped and stranded files are
    closed (their pipe's writer sees EPIPE)."""
    assert "parent: got a file with 'b', reads '5', then 6" in pass_native
    assert "child: recvmsg without room gives fd -1, MSG_CTRUNC 1" in pass_native
    assert "parent: the child's connection says 'L'" in pass_native
    assert "parent: then write to the one = -1 (EPIPE)" in pass_native
    assert "parent: and read the other = 0 (EOF)" in pass_native
    assert pass_native.endswith("child exited 0\ndone\n")


@pytest.mark.parametrize("fork", ["thread", "copy"])
def test_sock_pass_in_one_kernel(pass_native: str, fork: str) -> None:
    r = vm("sock_pass", "/tmp/sock_pass", fork=fork)
    assert r.result.status == 0, (r.out, r.stderr, r.result.reports)
    assert r.out == pass_native


@pytest.mark.parametrize("transport", VMCLONE)
def test_sock_pass_across_vms(pool: WarmPool, pass_native: str, transport: str) -> None:
    """SCM_RIGHTS across VMs: pipe ends, a file of the instance's file system (its
    offset shared) and socket pair ends cross both ways, a shared TCP listener too; a file without room (or read
    by read(2)) is closed, one in flight when its receiver exits too: as natively."""
    assert vmclone_out(pool, transport, "sock_pass", "/tmp/sock_pass") == pass_native


def test_files_in_flight_leave_nothing_held(pool: WarmPool, pass_native: str) -> None:
    """Once sock_pass's instance has ended (files received, dropped, and one left in
    flight when its receiver exited) the supervisor holds nothing: no pipe, no open
    file description."""
    sink = CaptureSink()
    sup = Supervisor(pool, "shm", sink, VmConfig(timeout=120))
    try:
        sup.start(
            str(image_path("sock_pass").resolve()), ["/tmp/sock_pass"], list(DEFAULT_ENV), "p"
        )
        res = sup.wait()
        pipes = dict(sup.broker._pipes)
        holds = {pid: dict(h) for pid, h in sup.fs.holds.items() if h}
        listeners = dict(sup.listen_broker._listeners)
    finally:
        sup.close()
    assert (res.outcome, res.status) == ("exited", 0), res.reports
    assert bytes(sink.stdout).decode() == pass_native
    assert pipes == {} and holds == {} and listeners == {}


class _Frames:
    """A VM's channel as the supervisor sees it: what it is sent."""

    def __init__(self) -> None:
        self.sent: list[Frame] = []

    def send(self, frame: Frame, fd: int | None = None) -> None:
        self.sent.append(frame)


def test_forged_files_are_refused(pool: WarmPool) -> None:
    """A VM can send only files it holds: a pipe end or an open file description it
    has no ref of is EBADF (nothing written), a bad FILES header EINVAL; one it holds
    goes into the pipe with a ref held for it (IN_FLIGHT_HOLDER)."""
    sup = Supervisor(pool, "shm", CaptureSink(), VmConfig(timeout=60))
    ch = _Frames()
    rec = ProcRec(5, 1, 5, 5, state="running", channel=ch)  # type: ignore[arg-type]
    try:
        pipe = sup.broker.create(5)
        other = sup.broker.create(5, readers=0, writers=1)

        def write(payload: bytes, flags: int = FILES) -> int:
            sup._handle(rec, Frame(Msg.PIPE_WRITE, flags | NONBLOCK, 7, pipe, 0, payload))
            return ch.sent.pop().arg

        rpipe = {"kind": "rpipe", "pipe": other, "end": "r", "flags": 0}
        assert write(pack_files([rpipe], b"x")) == -errno.EBADF
        assert write(pack_files([{"kind": "fsfile", "ofd": 99}], b"x")) == -errno.EBADF
        assert write(pack_files([{"kind": "epoll"}], b"x")) == -errno.EBADF
        assert write(b"\xff\xff\xff\xff{") == -errno.EINVAL
        assert sup.broker.stats()["bytes_buffered"] == 0
        assert not sup.broker.holds(other, IN_FLIGHT_HOLDER, "w")
        assert write(pack_files([{**rpipe, "end": "w"}], b"x")) == 1
        assert sup.broker.holds(other, IN_FLIGHT_HOLDER, "w")
        # a write that puts nothing in (EAGAIN on a full pipe) gives the refs back
        assert write(b"f" * PIPE_CAPACITY, flags=0) == PIPE_CAPACITY - 1
        full = pack_files([{**rpipe, "end": "w"}], b"y")
        assert write(full, flags=FILES | NONBLOCK) == -errno.EAGAIN
        # one ref of the first message's still in flight, none of the refused one
        sup._release_files(IN_FLIGHT_HOLDER, [{**rpipe, "end": "w"}])
        assert not sup.broker.holds(other, IN_FLIGHT_HOLDER, "w")
    finally:
        sup.close()


def test_unsupported_kind_across_vms(pool: WarmPool) -> None:
    """An epoll fd cannot cross VMs: EOPNOTSUPP, nothing sent (natively it goes)."""
    out = vmclone_out(pool, "shm", "sock_pass", "/tmp/sock_pass", "epoll")
    assert out == "child: send an epoll fd = -1 EOPNOTSUPP\nchild exited 0\ndone\n"


def test_loopback_tcp_udp_in_one_kernel() -> None:
    """guest/programs/sock_inet.c: TCP over 127.0.0.1 with a forked client, a
    non-blocking connect/accept, UDP echo, TCP over ::1; natively over the host's
    loopback, in thread fork over the instance's private network (rump/inet.py).
    Only port-independent facts are printed."""
    n = native("sock_inet")
    assert n.returncode == 0, n.stderr
    out = n.stdout.decode()
    assert "connect to a closed port = -1 ECONNREFUSED" in out
    assert out.endswith("done\n")
    r = vm("sock_inet")
    assert r.result.status == 0, (r.out, r.result.reports)
    assert r.out == out


@pytest.mark.parametrize("name", ["sock_unix", "sock_inet", "sock_poll"])
def test_nothing_is_left_bound_or_waiting(name: str) -> None:
    """Bad input and churn leave nothing behind: once every process has exited, no
    AF_UNIX name, no port and no poll waiter remains in the kernel."""
    sink = CaptureSink()
    k = create_vm(image_path(name), [f"/tmp/{name}"], None, VmConfig(timeout=120), sink)
    try:
        result = k.run()
        assert (result.outcome, result.status) == ("exited", 0), result.reports
        assert not k.unix_names.by_ino and not k.unix_names.abstract
        assert not k.inet.ports
        assert not k.poll_wq.waiters
    finally:
        k.close()


def _untimed(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if not ln.startswith("rtt_us=")]


@pytest.mark.parametrize("transport", VMCLONE)
def test_a_vm_polling_a_shared_listener_is_woken_by_a_connection(
    pool: WarmPool, transport: str
) -> None:
    """poll_pingpong -l: the child VM waits in poll() on the listener it inherited, the
    parent connects (a new connection a round): the connection wakes the child (no
    timer re-checks the listener), with the native output."""
    want = _untimed(native("poll_pingpong", "-l", "-n", "10").stdout.decode())
    out = vmclone_out(pool, transport, "poll_pingpong", "-l", "-n", "10")
    assert _untimed(out) == want == ["pingpong rounds=10 ok=1"]
    assert out.count("rtt_us=") == 10


def test_a_vm_polling_a_listener_nobody_will_connect_to_is_a_deadlock(pool: WarmPool) -> None:
    """The child waits in poll() on the listener, the parent in waitpid for the child:
    no VM can make a connection and no port is published, so the instance is ended as
    deadlocked (when a shared listener's poll re-checked every 20 ms, the child never
    went idle and the instance ran to its time limit)."""
    r = run_vmclone(
        image_path("poll_pingpong"),
        ["-l", "-d", "-n", "1"],
        config=VmConfig(timeout=30),
        transport="tcp",
        pool=pool,
    )
    assert r.outcome == "deadlock", (r.outcome, r.reports)

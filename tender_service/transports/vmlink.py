"""The VM side of a VM-clone instance: one channel to the supervisor.

A ``VmLink`` is the rump kernel's ``RemoteHost``: it reports the process's
exit and reaped children, forwards signals and process-tree calls for pids of
other VMs, carries console output, and moves pipe requests.  A reader thread
receives the supervisor's messages and hands them to the VM's own thread as
kernel events (``Kernel.post_event``), so kernel state is only ever touched
by the VM thread.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from tender_service.bmk.sched import WaitQueue
from tender_service.fork.snapshot import SnapshotError, file_from_state, file_state
from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.fdtable import FdEntry
from tender_service.rump.files import FsFile
from tender_service.rump.inet import LOOP4, LOOP6, InetSocket, is_any
from tender_service.rump.outcomes import Block
from tender_service.rump.pipe import PIPE_CAPACITY, Pipe, PipeEnd
from tender_service.rump.poll import Epoll
from tender_service.rump.published import ip_bytes
from tender_service.rump.socket import (
    AF_INET,
    AF_UNIX,
    SOCK_STREAM,
    Segment,
    Socket,
    UnixSocket,
    UnsharedSocket,
    drop_files,
)
from tender_service.rump.vfs import Vfs
from tender_service.transports.channel import Channel, ChannelClosed
from tender_service.transports.frames import MAX_PAYLOAD, Frame, ProtocolError
from tender_service.transports.pipe_ring import (
    HELLO_RINGS_KEY,
    HELLO_WAKERS_KEY,
    IDLE_RINGS,
    WAKE_KEY,
    PipeRing,
    Waiter,
    Wakers,
)
from tender_service.transports.protocol import (
    END_WRITE,
    FILES,
    MAX_PIPE_CHUNK,
    NONBLOCK,
    PIPE_REFS,
    SIGNAL_INFO,
    Msg,
    pack_files,
    unpack_files,
)
from tender_service.transports.remote_fs import RemoteFs
from tender_service.transports.remote_pipe import RemotePipeEnd
from tender_service.transports.remote_socket import RemoteSocket

if TYPE_CHECKING:
    from tender_service.rump.files import File
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

log = logging.getLogger(__name__)

CALL_TIMEOUT = 60.0
#: a call to the supervisor: its op, its integer arguments and its data
Call = tuple[str, tuple[int, ...], bytes]


class _Call:
    __slots__ = ("event", "value", "payload")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: int = -errno.EIO
        self.payload: bytes = b""


class _NotConnected:
    """The channel of a link whose VM has not said hello yet: nothing goes out (the
    VM does not run before ``VmLink.connect``), and closing it is a no-op."""

    kind = "none"
    bytes_sent = 0
    bytes_received = 0
    peer_hello: dict = {}
    fallback = ""
    takes_fds = False

    def send(self, frame: Frame, fd: int | None = None) -> None:
        raise ChannelClosed("not connected to the supervisor yet")

    def recv(self, timeout: float | None = None) -> Frame | None:
        raise ChannelClosed("not connected to the supervisor yet")

    def take_fd(self, timeout: float) -> int:
        raise ChannelClosed("not connected to the supervisor yet")

    def close(self) -> None:
        pass


class VmLink:
    def __init__(self, channel: Channel | None, pid: int) -> None:
        """``channel`` None: the VM is built first, its channel given by ``connect``."""
        self.channel: Channel = channel if channel is not None else _NotConnected()
        self.pid = pid
        self.kernel: Kernel | None = None
        self.wq = WaitQueue("remote", host=True)
        self._reqs = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._pending: dict[int, Lwp] = {}  # pipe requests in flight
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None
        #: supervisor messages that could wake the VM, handled so far (see ``idle``)
        self.events_done = 0
        #: the instance's file system, which the supervisor holds
        self.fs_tree = RemoteFs(self)
        #: the pipe rings this VM has mapped, by pipe (transports/pipe_ring.py; a
        #: pipe's id is never reused in an instance)
        self._rings: dict[int, PipeRing] = {}
        self._rings_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        #: the wake-up pipes of the instance's VMs that this VM's ring changes wake
        self.wakers = Wakers(self._fetch_waker)
        #: the token of the wake-up pipe the supervisor made for this VM (0 until the
        #: channel's hello said which); the count of its ring waits so far
        self._wake_token = 0
        self._ring_epoch = 0
        #: the ring pipes, with epochs, each thread waits on (a poll: several; idle report)
        self._ring_waits: dict[int, dict[int, int]] = {}

    # -- wiring ------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return not isinstance(self.channel, _NotConnected)

    def connect(self, channel: Channel) -> None:
        """The channel to the supervisor, opened after the VM was built (before attach);
        a link closed meanwhile closes it at once."""
        self.channel = channel
        if self._closed.is_set():
            channel.close()

    def attach(self, k: Kernel) -> None:
        self.kernel = k
        k.remote = self
        k.fs = Vfs(self.fs_tree)  # one tree per instance: the supervisor's
        token = getattr(self.channel, "peer_hello", {}).get(WAKE_KEY)
        if type(token) is int and token > 0:  # the instance's pipes are rings
            self.channel.takes_fds = True  # ring fds come (before the reader starts)
            try:  # its wake-up pipe came with the supervisor's hello
                wake = self.channel.take_fd(0)
            except ChannelClosed as e:
                raise GuestError(errno.EIO, f"no wake-up pipe came with the hello: {e}") from None
            self.wakers.add(token, os.dup(wake))  # its own threads wake each other too
            k.use_wake_fd(wake)
            self._wake_token = token
            self._take_hello_fds()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"vmlink-{self.pid}", daemon=True
        )
        self._reader.start()

    def console_sink(self, pid: int, fd: int, data: bytes) -> None:
        for off in range(0, len(data), MAX_PAYLOAD):
            self._notify(Frame(Msg.CONSOLE, 0, 0, fd, pid, bytes(data[off : off + MAX_PAYLOAD])))

    def make_file(self, state: dict) -> File:
        """Snapshot factory for remote pipe ends and files (see fork/snapshot.py)."""
        if state.get("kind") == "fsfile":
            return FsFile(
                self.fs_tree,
                int(state["ofd"]),
                int(state["ino"]),
                bool(state["dir"]),
                int(state.get("flags", 0)),
                str(state.get("path", "")).encode("latin-1"),
            )
        if state.get("kind") == "rsock":
            rx, tx = int(state["rx"]), int(state["tx"])
            return RemoteSocket(
                self,
                rx if rx >= 0 else None,
                tx if tx >= 0 else None,
                int(state["stype"]),
                int(state.get("flags", 0)),
                int(state.get("family", AF_UNIX)),
                bytes.fromhex(str(state.get("name", ""))),
                bytes.fromhex(str(state.get("peer_name", ""))),
            )
        if state.get("kind") == "unshared":
            return UnsharedSocket(
                int(state.get("stype", 0)), int(state.get("flags", 0)), str(state.get("what", ""))
            )
        if state.get("kind") != "rpipe":
            raise ValueError(f"unknown file kind {state.get('kind')!r} in snapshot")
        return RemotePipeEnd(
            self,
            int(state["pipe"]),
            state["end"] == "w",
            int(state.get("flags", 0)),
            str(state.get("ring", "")),
        )

    def stdin(self) -> RemoteStdin:
        return RemoteStdin(self)

    def close(self) -> None:
        self._closed.set()
        self.channel.close()
        self._fail_calls()
        rings, self._rings = self._rings, {}
        for ring in rings.values():
            ring.close()
        self.wakers.close()

    # -- pipe rings ------------------------------------------------------------------
    def ring(self, pipe: int) -> PipeRing:
        """The mapping of ring pipe ``pipe``: mapped when its fd came (with the
        ``pipe_create`` answer, with the hello), else at its first use here, asking
        the supervisor (``ring_fd``: only a VM that holds an end gets it).  A ring has
        no name anyone could open: no other VM reaches it."""
        ring = self._rings.get(pipe)
        if ring is not None:
            return ring
        with self._rings_lock:
            ring = self._rings.get(pipe)
            if ring is None:
                ring = self._rings[pipe] = self._fetch_ring(pipe)
        return ring

    def _take_hello_fds(self) -> None:
        """The rings this VM holds and the other VMs' wake-up pipes, sent with the
        hello after its own (the supervisor's ``_hello_fds``)."""
        hello = self.channel.peer_hello
        pipes, tokens = hello.get(HELLO_RINGS_KEY), hello.get(HELLO_WAKERS_KEY)
        if not isinstance(pipes, list) or not isinstance(tokens, list):
            return
        try:
            for pipe in pipes:
                self._rings[int(pipe)] = self._map_ring(self.channel.take_fd(0), int(pipe))
            for t in tokens:
                self.wakers.add(int(t), self.channel.take_fd(0))
        except (ChannelClosed, TypeError, ValueError) as e:
            raise GuestError(errno.EIO, f"the hello's fds: {e}") from None

    def _fetch_ring(self, pipe: int) -> PipeRing:
        value, _, fd = self._call_fd("ring_fd", pipe)
        if fd is None:
            raise GuestError(-value if value < 0 else errno.EIO, f"pipe ring of pipe {pipe}")
        return self._map_ring(fd, pipe)

    def _map_ring(self, fd: int, pipe: int) -> PipeRing:
        try:
            return PipeRing.from_fd(fd, self.wakers)
        except (OSError, ValueError) as e:
            raise GuestError(errno.EIO, f"pipe ring of pipe {pipe}: {e}") from None

    def _fetch_waker(self, token: int) -> int:
        """The wake-up pipe of ``token``'s VM (-1: no VM of this instance has it)."""
        try:
            fd = self._call_fd("wake_fd", token)[2]
        except GuestError as e:
            log.debug("pid %d: no wake-up pipe for token %#x: %s", self.pid, token, e)
            return -1
        return -1 if fd is None else fd

    def _call_fd(self, op: str, *args: int, data: bytes = b"") -> tuple[int, bytes, int | None]:
        """A call the supervisor may answer with an fd: when it does, the answer ends
        with the fd's inode (``...:<ino>``).  One such batch at a time, so the next
        fds that come are its (EIO if one does not come)."""
        return self._call_fds([(op, args, data)])[0]

    def _call_fds(self, calls: list[Call]) -> list[tuple[int, bytes, int | None]]:
        """``_call_fd`` for several calls in flight at once (``_call_many``), each
        answer with its fd (the supervisor sends them in the order it answers)."""
        with self._fd_lock:
            out: list[tuple[int, bytes, int | None]] = []
            try:
                for (op, _, _), (value, payload) in zip(calls, self._call_many(calls), strict=True):
                    fd = None if value < 0 or not payload else self._take_fd(op, payload)
                    out.append((value, payload, fd))
            except GuestError:
                for _, _, fd in out:
                    if fd is not None:
                        os.close(fd)
                raise
            return out

    def _take_fd(self, op: str, payload: bytes) -> int:
        """The fd an answer names by its inode (the end of ``payload``: ``...:<ino>``)."""
        ino = payload.rpartition(b":")[2]
        try:
            while True:  # an fd of a call that timed out here may come first
                fd = self.channel.take_fd(CALL_TIMEOUT)
                if str(os.fstat(fd).st_ino).encode() == ino:
                    return fd
                os.close(fd)
        except (ChannelClosed, OSError) as e:
            raise GuestError(errno.EIO, f"{op}: {e}") from None

    def waiter(self, lwp: Lwp, pipe: int) -> Waiter:
        """Who ``lwp`` is in ring pipe ``pipe``'s waiter table if it must wait there,
        with a new epoch (the idle report names the pipe and the epoch)."""
        self._ring_epoch += 1
        self._ring_waits[lwp.thread.tid] = {pipe: self._ring_epoch}
        return Waiter(self._wake_token, self.pid, self._ring_epoch)

    def poll_waiter(self, lwp: Lwp, pipe: int) -> Waiter:
        """``waiter`` for a poll, select or epoll_wait, which waits on every ring it
        polls (``polls_begin`` started its list)."""
        self._ring_epoch += 1
        self._ring_waits.setdefault(lwp.thread.tid, {})[pipe] = self._ring_epoch
        return Waiter(self._wake_token, self.pid, self._ring_epoch)

    def polls_begin(self, lwp: Lwp) -> None:
        """``lwp`` looks at its files' readiness anew: the rings of its last look are
        not what it waits on any more."""
        self._ring_waits.pop(lwp.thread.tid, None)

    # -- RemoteHost (called on the VM thread) ---------------------------------------
    def process_exited(self, proc: Process) -> None:
        k = self.kernel
        peak = k.peak_memory if k is not None else 0
        # a fault's or an internal error's report (not a plain kill's): the instance's
        # result lists it, as a thread-fork instance's does
        report = proc.report if k is not None and proc.report in k.reports else ""
        # a clone(CLONE_VM)/vfork child that has not exec'd yet still runs in this VM (it
        # may have killed us): the VM goes on, and its exec or exit needs the supervisor
        hosting = k is not None and any(
            p.alive and not p.remote and p is not proc and p is not k.init for p in k.procs.values()
        )
        if not hosting:
            self._closed.set()  # from now on the supervisor may hang up: expected
        info = {"peak_memory": peak, "report": report[:1000], "hosting": hosting}
        self._notify(Frame(Msg.EXITED, 0, 0, 0, proc.status, json.dumps(info).encode()))

    def child_reaped(self, parent: Process, child: Process) -> None:
        self._notify(Frame(Msg.REAPED, 0, 0, 0, child.pid, b""))

    def signal(
        self, sender: Process, pid: int, sig: int, code: int = signals.SI_USER, value: int = 0
    ) -> int:
        """kill/tkill/sigqueue to a process of another VM; its siginfo carries ``code``
        and ``value`` (and our pid, which the supervisor knows)."""
        if (code, value) == (signals.SI_USER, 0):
            return self.call("kill", pid, sig)
        return self.call("kill", pid, sig, code, value)

    def child_state(self, proc: Process, status: int) -> None:
        """Our process stopped or continued: the supervisor tells its parent's VM."""
        with contextlib.suppress(GuestError):
            self.call("child_state", status)

    def idle(self, blocked: list[str]) -> None:
        """Every thread waits for another VM; ``events_done`` lets the supervisor tell
        whether a message it sent since could still wake us (then this is no deadlock).
        The first line names the ring pipes our threads wait on: their waiter entries,
        registered before this, are gone once another VM has woken us."""
        k = self.kernel
        waiting = set()
        if k is not None:  # in a read or write of a ring, or a poll that may include some
            waiting = {t.tid for wq in (k.ring_wq, k.poll_wq) for t in wq.waiters}
        self._ring_waits = {tid: w for tid, w in self._ring_waits.items() if tid in waiting}
        named = {(p, e) for w in self._ring_waits.values() for p, e in w.items()}
        rings = " ".join(f"{p}:{e}" for p, e in sorted(named))
        report = f"{IDLE_RINGS} {rings}\n" + "\n".join(blocked)
        self._notify(Frame(Msg.IDLE, 0, 0, 0, self.events_done, report.encode()[:MAX_PAYLOAD]))

    def notify_call(self, op: str, *args: int, data: bytes = b"") -> None:
        """A request whose answer nobody waits for (request number 0)."""
        self._notify(Frame(Msg.CALL, 0, 0, 0, 0, call_payload(op, args, data)))

    # -- /proc of the instance ----------------------------------------------------------
    def renamed(self, pid: int, name: str, exe: bytes) -> None:
        """``pid`` (of this VM, or leased by it) runs program ``exe`` under ``name`` now."""
        self.notify_call("proc_comm", pid, data=name.encode()[:15] + b"\0" + exe)

    def proc_stat(self, pid: int) -> tuple[int, int, int, int, str, str, bytes] | None:
        """(pid, ppid, pgid, sid, state, comm, exe) of a process of another VM; None: no such."""
        value, payload = self.call_full("proc_stat", pid)
        if value < 0:
            return None
        pid_, ppid, pgid, sid, state, comm, exe = json.loads(payload)
        return (
            int(pid_), int(ppid), int(pgid), int(sid), str(state), str(comm),
            str(exe).encode(errors="surrogateescape"),
        )  # fmt: skip

    def proc_list(self) -> list[int]:
        """Every pid of the instance that /proc lists."""
        value, payload = self.call_full("proc_list")
        return [int(p) for p in json.loads(payload)] if value >= 0 else []

    def call(self, op: str, *args: int) -> int:
        """A synchronous request the supervisor answers at once."""
        return self.call_full(op, *args)[0]

    def call_full(self, op: str, *args: int, data: bytes = b"") -> tuple[int, bytes]:
        """One call, and its answer.  Every file syscall of a VM-clone VM comes here: it
        builds no lists (through ``_call_many`` a call cost ~2-4 us more)."""
        req = next(self._reqs)
        c = _Call()
        with self._lock:
            self._calls[req] = c
        try:
            self._send(Frame(Msg.CALL, 0, req, 0, 0, call_payload(op, args, data)))
            if not c.event.wait(CALL_TIMEOUT):
                raise GuestError(errno.ETIMEDOUT, f"supervisor did not answer {op}")
        finally:
            with self._lock:
                self._calls.pop(req, None)
        return c.value, c.payload

    def _call_many(self, calls: list[Call]) -> list[tuple[int, bytes]]:
        """``call_full`` for several calls: every one sent, then the answers awaited (in
        order): one round trip to the supervisor for all, not one each (a fork that
        shares eight pipes made eight)."""
        pending = [(next(self._reqs), _Call()) for _ in calls]
        with self._lock:
            self._calls.update(pending)
        try:
            for (req, _), (op, args, data) in zip(pending, calls, strict=True):
                self._send(Frame(Msg.CALL, 0, req, 0, 0, call_payload(op, args, data)))
            deadline = time.monotonic() + CALL_TIMEOUT
            for (_, c), (op, _, _) in zip(pending, calls, strict=True):
                if not c.event.wait(max(0.0, deadline - time.monotonic())):
                    raise GuestError(errno.ETIMEDOUT, f"supervisor did not answer {op}")
        finally:
            with self._lock:
                for req, _ in pending:
                    self._calls.pop(req, None)
        return [(c.value, c.payload) for _, c in pending]

    # -- pipes ----------------------------------------------------------------------
    def request(
        self,
        lwp: Lwp,
        msg: Msg,
        pipe: int,
        arg: int = 0,
        payload: bytes = b"",
        nonblock: bool = False,
        flags: int = 0,
    ) -> None:
        req = next(self._reqs)
        lwp.remote_req, lwp.remote_result = req, None
        self._pending[req] = lwp
        flags |= NONBLOCK if nonblock else 0
        self._send(Frame(msg, flags, req, pipe, arg, bytes(payload)))

    def in_flight(self, lwp: Lwp) -> bool:
        """A request of ``lwp`` is on its way: a call restarted after a signal handler
        must wait for its answer, not send another."""
        return lwp.remote_req != 0 and lwp.remote_result is None and lwp.remote_req in self._pending

    def take_reply(self, lwp: Lwp) -> tuple[int, bytes, int] | None:
        """The reply to ``lwp``'s request, if it came (a restarted syscall asks)."""
        r = lwp.remote_result
        if r is not None:
            lwp.remote_result, lwp.remote_req = None, 0
        return r

    def read_stdin(self, k: Kernel, lwp: Lwp, addr: int, n: int, nonblocking: bool) -> int:
        """The console's fd 0 (a ``StdinSource``): the instance's stdin, via the supervisor."""
        reply = self.take_reply(lwp)
        if reply is None:
            room = k.mem.room([(addr, n)], min(n, MAX_PIPE_CHUNK))
            if not room:
                raise GuestError(errno.EFAULT)
            self.request(lwp, Msg.STDIN_READ, 0, arg=room, nonblock=nonblocking)
            raise Block(self.wq, "read console stdin")
        arg, data, _ = reply
        if arg < 0:
            raise GuestError(-arg)
        k.mem.write(addr, data[:n])
        return min(len(data), n)

    def send_close(self, pipe: int, end: int) -> None:
        self._notify(Frame(Msg.PIPE_CLOSE, 0, 0, pipe, end, b""))

    def close_ring_end(self, pipe: int, end: int) -> None:
        """The close of a ring pipe's end, done when this returns (a call, not a
        message: see ``RemotePipeEnd.release``); a supervisor gone is no error.  Once
        our process has said it exited, the supervisor answers nothing more (it drops
        what the VM held when the VM ends): a message then, as for a broker pipe."""
        if self._closed.is_set():
            self.send_close(pipe, end)
            return
        with contextlib.suppress(GuestError):
            self.call("pipe_close", pipe, end)

    def share_files(self, k: Kernel, proc: Process, child_pid: int) -> None:
        """Before a fork: make every pipe end in ``proc``'s table remote, count the child's.

        A local pipe moves into the broker with whatever it has buffered; the
        child's references are registered before the child exists, so the
        parent closing its end right after fork cannot cause an early EOF.
        """
        self.make_remote([proc])
        self.add_holder([e.file for e in proc.fds.entries.values()], child_pid)

    def make_remote(self, procs: list[Process]) -> dict[int, File]:
        """Every local pipe end in these processes' tables becomes a broker pipe end
        (one conversion per open pipe end, however many tables and fds hold it);
        the new file of each converted one, by ``id`` of the old."""
        converted: dict[int, File] = {}
        failed: GuestError | None = None
        try:  # every pipe in one round trip (those shared already are skipped)
            self._share_pipes(
                [
                    e.file.pipe
                    for p in procs
                    for e in p.fds.entries.values()
                    if isinstance(e.file, PipeEnd)
                ]
            )
        except GuestError as err:  # the pipes that went are converted all the same
            failed = err
        for proc in procs:
            for fd, e in list(proc.fds.entries.items()):
                if failed is not None and _local_pipe(e.file):
                    continue  # not shared: it stays local
                new = self._share_file(e.file, converted)
                if new is not None:
                    proc.fds.entries[fd] = FdEntry(new, e.cloexec)
        for proc in procs:  # epoll sets watch the new ends, not the ones replaced
            for e in proc.fds.entries.values():
                if isinstance(e.file, Epoll):
                    e.file.replace_files(converted)
        if failed is not None:
            raise failed
        return converted

    def _share_file(self, f: File, converted: dict[int, File]) -> File | None:
        """The broker's counterpart of a local pipe end or connected stream socket,
        with its refs (None: a file of another kind, which stays as it is)."""
        new = converted.get(id(f))
        if new is not None:
            return new
        if isinstance(f, UnixSocket) and f.stream and f.peer is not None:
            return self._share_socket(f, converted)
        if not isinstance(f, PipeEnd):
            return None
        p = f.pipe
        self._share_pipes([p])
        assert p.broker_id is not None  # shared, or _share_pipes raised
        new = converted[id(f)] = RemotePipeEnd(self, p.broker_id, f.write_end, f.flags, p.ring)
        new.refs = f.refs
        return new

    # -- SCM_RIGHTS across VMs -----------------------------------------------------
    def file_states(self, proc: Process, files: list[File]) -> tuple[list[dict], list[File]]:
        """The snapshot states of files sent on a socket to another VM, and the files
        themselves: local pipes and socket pairs become the broker's first, as a fork
        makes them (the converted files then stand for the ones given).  A kind that
        cannot cross VMs (epoll, eventfd, datagram and listening AF_UNIX sockets, ...)
        is EOPNOTSUPP, with nothing converted."""
        for f in files:
            if not _needs_share(f) and _crossing_state(f) is None:
                raise GuestError(errno.EOPNOTSUPP, f"a {f.kind} file cannot cross VMs")
        if any(_needs_share(f) for f in files):
            converted = self.make_remote([proc])  # the sender's fds name the new ones
            files = [self._share_file(f, converted) or f for f in files]
        states = [_crossing_state(f) for f in files]
        return [st for st in states if st is not None], files

    def files_from_states(self, k: Kernel, states: list[dict]) -> list[File]:
        """The files of a message received from another VM, each with one (in-flight)
        reference; their refs in the supervisor are this VM's already."""
        out: list[File] = []
        for st in states:
            try:
                f = file_from_state(st, self.make_file)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("pid %d: a received file is lost: %s", self.pid, e)
                continue
            if isinstance(f, InetSocket):
                f.register(k)
            f.refs = 1
            out.append(f)
        return out

    def drop_states(self, k: Kernel, states: list[dict]) -> None:
        """Files received where nobody takes them (read(2) on a socket): closed."""
        drop_files(k, self.files_from_states(k, states))

    def _share_pipes(self, pipes: list[Pipe]) -> None:
        """The local pipes among ``pipes`` move into the broker with whatever they hold
        (into rings, if the instance's VMs all run on this host over shm: each ring's
        name and fd come back with its answer, so no ring_fd later), all in one round
        trip; if one cannot be shared, the others are, and the error is raised."""
        local = list({id(p): p for p in pipes if p.broker_id is None}.values())
        if not local:
            return
        answers = self._call_fds(
            [("pipe_create", (p.readers, p.writers, 1), bytes(p.buf)) for p in local]
        )
        error: GuestError | None = None
        for p, (value, ring, fd) in zip(local, answers, strict=True):
            if value < 0:
                error = error or GuestError(-value, "cannot share a pipe")
                continue
            p.broker_id, p.ring = value, ring.decode("ascii", "replace")
            p.buf.clear()
            if fd is not None:
                try:
                    self._rings[value] = self._map_ring(fd, value)
                except GuestError as e:  # (mapped at its first use, then)
                    error = error or e
        if error is not None:
            raise error

    def _share_socket(self, a: UnixSocket, converted: dict[int, File]) -> RemoteSocket:
        """A connected stream socket of this VM becomes two broker pipes, one per
        direction (the first end shared creates both; its peer gets the same).

        Their unread bytes go along, and so do the files in flight in them (shared
        as a fork shares them, which may share this very socket again: it is in
        ``converted`` before that)."""
        b = a.peer
        assert b is not None  # only connected sockets are shared
        rests: list[tuple[int, list[Segment], bool]] = []
        if a.broker is None:
            ab, ab_rest, ab_temp = self._direction(a, b)
            ba, ba_rest, ba_temp = self._direction(b, a)
            a.broker, b.broker = (ab, ba), (ba, ab)
            rests = [(ab, ab_rest, ab_temp), (ba, ba_rest, ba_temp)]
        tx, rx = a.broker
        new = RemoteSocket(
            self,
            rx if rx >= 0 else None,
            tx if tx >= 0 else None,
            a.stype,
            a.flags,
            a.family,
            a.name,
            a.peer_name,
        )
        new.refs = a.refs
        converted[id(a)] = new
        for pipe, rest, temp in rests:
            self._carry(pipe, rest, temp, converted)
        return new

    def _direction(self, src: UnixSocket, dst: UnixSocket) -> tuple[int, list[Segment], bool]:
        """The broker pipe for src -> dst (-1 if that direction is over), made with
        dst's unread bytes up to the first that carry files; the segments from
        there on, for ``_carry``; whether the pipe has a writer ref only for them."""
        writers = 0 if src.closed or src.shut_wr else 1
        readers = 0 if dst.closed or dst.shut_rd else 1
        segs = [Segment(bytearray(seg.data), seg.files) for seg in dst.rx]
        for seg in dst.rx:  # the files go with the copies (or are closed)
            seg.files = None
        if not readers:  # nobody will read them: files in flight are closed
            assert self.kernel is not None  # attached before any fork
            for seg in segs:
                drop_files(self.kernel, seg.files)
            segs = []
        if not writers and not readers:
            return -1, [], False
        head = bytearray()
        while segs and not segs[0].files and len(head) + len(segs[0].data) <= PIPE_CAPACITY:
            head += segs.pop(0).data
        temp = bool(segs) and not writers  # what follows is written: a writer ref for it
        value, _ = self.call_full("pipe_create", readers, writers or int(temp), data=bytes(head))
        if value < 0:
            raise GuestError(-value, "cannot share a socket")
        return value, segs, temp

    def _carry(
        self, pipe: int, segs: list[Segment], temp: bool, converted: dict[int, File]
    ) -> None:
        """Write ``segs`` into ``pipe`` in order with writes nobody waits for (the
        broker queues them), each segment's files with its first byte; files that
        cannot cross VMs are closed.  Then drop the writer ref taken for this."""
        k = self.kernel
        assert k is not None  # attached before any fork
        for seg in segs:
            files: list[File] = []
            states: list[dict] = []
            for f in seg.files or []:
                new = self._share_file(f, converted) or f
                st = _crossing_state(new)
                if st is not None:
                    states.append(st)
                files.append(new)
            seg.files = None
            for off in range(0, len(seg.data), MAX_PIPE_CHUNK):
                data = bytes(seg.data[off : off + MAX_PIPE_CHUNK])
                attach = bool(states) and not off
                flags = FILES if attach else 0
                payload = pack_files(states, data) if attach else data
                self._notify(Frame(Msg.PIPE_WRITE, flags, 0, pipe, 0, payload))
            drop_files(k, files)  # the supervisor holds them for the pipe now
        if temp:
            self.send_close(pipe, END_WRITE)

    def add_holder(self, files: list[File], pid: int) -> None:
        """Register ``pid`` (a fork's or a VM-clone exec's new VM) as holding one
        ref of each broker pipe end and each open file description among ``files``
        (every pipe end's in one call)."""
        seen: set[int] = set()
        ends: list[RemotePipeEnd] = []
        for f in files:
            if id(f) in seen:
                continue
            seen.add(id(f))
            if isinstance(f, FsFile):
                self.fs_tree.hold(f.ofd, pid)  # the same open file description
            elif isinstance(f, RemotePipeEnd):
                ends.append(f)
            elif isinstance(f, RemoteSocket):
                ends += [end for end in (f.rx, f.tx) if end is not None]
            elif (
                isinstance(f, InetSocket)
                and f.shared
                and f.listening
                and self.call("listen_refs", f.shared, pid) < 0
            ):
                raise GuestError(errno.EBADF, "cannot share a listener")
        if ends:
            refs = b"".join(
                PIPE_REFS.pack(f.pipe, 0 if f.write_end else 1, 1 if f.write_end else 0)
                for f in ends
            )
            value, _ = self.call_full("pipe_refs_many", pid, data=refs)
            if value < 0:
                raise GuestError(-value, "cannot share a pipe")

    # -- shared listeners (transports/listeners.py) ---------------------------------
    def listening(self, family: int, port: int) -> int:
        """A listen() here: the supervisor holds the listener's queue, so that every
        VM of the instance (and the host, if the port is published) can connect."""
        lid = self.call("listen", family, port)
        if lid <= 0:
            raise GuestError(-lid if lid < 0 else errno.EIO, "cannot share a listener")
        return lid

    def accept_shared(self, k: Kernel, lwp: Lwp, sock: InetSocket) -> Socket:
        """The supervisor's next connection for ``sock`` (the request parks there while
        none is queued, and the calling thread waits for its answer)."""
        reply = self.take_reply(lwp)
        if reply is None:
            if not self.in_flight(lwp):  # not a restart after a signal handler
                self.request(lwp, Msg.ACCEPT, sock.shared, nonblock=sock.nonblocking)
            raise Block(self.wq, f"accept {sock.describe()}")
        arg, data, _ = reply
        if arg < 0:
            raise GuestError(-arg)
        return self._accepted(sock, data)

    def connect_shared(self, k: Kernel, sock: InetSocket, lid: int, ip: bytes, port: int) -> None:
        """A connect to a shared listener: the supervisor queues it there, and a
        RemoteSocket over its two pipes takes ``sock``'s place in this VM's files."""
        local = sock.ip if not is_any(sock.ip) else ip
        value, payload = self.call_full(
            "listen_connect",
            lid,
            sock.family,
            port,
            sock.port,
            data=str(ipaddress.ip_address(local)).encode(),
        )
        if value < 0:
            raise GuestError(-value)
        self._connected(k, sock, payload, sock.sockaddr(local, sock.port), sock.sockaddr(ip, port))

    def connect_out(self, k: Kernel, lwp: Lwp, sock: InetSocket, ip: bytes, port: int) -> None:
        """A connect out of the instance: the supervisor makes it (if the allow-list
        has it), the calling thread waiting for its answer."""
        reply = self.take_reply(lwp)
        if reply is None:
            if not self.in_flight(lwp):  # not a restart after a signal handler
                want = {"ip": str(ipaddress.ip_address(ip)), "port": port}
                self.request(lwp, Msg.CONNECT, 0, payload=json.dumps(want).encode())
            raise Block(self.wq, f"connect {sock.describe()}")
        arg, data, _ = reply
        if arg < 0:
            raise GuestError(-arg)
        local = LOOP4 if sock.family == AF_INET else LOOP6
        name = sock.sockaddr(sock.ip if not is_any(sock.ip) else local, sock.port)
        self._connected(k, sock, data, name, sock.sockaddr(ip, port))

    def _connected(
        self, k: Kernel, sock: InetSocket, data: bytes, name: bytes, peer: bytes
    ) -> None:
        """``sock`` is connected over the two pipes ``data`` names: a RemoteSocket over
        them takes its place in every fd table and epoll set of this VM."""
        new = self._over_pipes(json.loads(data), sock.family, sock.flags, name, peer)
        new.refs = sock.refs
        new.connect_owed = sock.nonblocking  # its connect answers EINPROGRESS
        swapped: dict[int, File] = {id(sock): new}
        for proc in k.procs.values():
            if proc.remote:
                continue
            for fd, e in list(proc.fds.entries.items()):
                if e.file is sock:
                    proc.fds.entries[fd] = FdEntry(new, e.cloexec)
            for e in proc.fds.entries.values():
                if isinstance(e.file, Epoll):
                    e.file.replace_files(swapped)
        sock.release(k)  # its port goes back; the connection is the new socket's

    def _accepted(self, sock: InetSocket, data: bytes) -> RemoteSocket:
        """The guest's end of an accepted connection: its two broker pipes."""
        info = json.loads(data)
        peer_ip, peer_port = str(info["peer"][0]), int(info["peer"][1])
        local = LOOP4 if sock.family == AF_INET else LOOP6
        try:
            peer = ip_bytes(sock.family, peer_ip)
        except ValueError:
            peer = local
        name = sock.sockaddr(local, sock.port)
        return self._over_pipes(info, sock.family, 0, name, sock.sockaddr(peer, peer_port))

    def _over_pipes(
        self, info: dict, family: int, flags: int, name: bytes, peer: bytes
    ) -> RemoteSocket:
        """A TCP connection's end over the two broker pipes ``info`` names (rx, tx)."""
        return RemoteSocket(
            self, int(info["rx"]), int(info["tx"]), SOCK_STREAM, flags, family, name, peer
        )

    def listener_poll(self, lid: int) -> int:
        try:
            return max(self.call("listen_poll", lid, 1), 0)  # its next connection wakes us
        except GuestError:
            return 0

    def listener_closed(self, lid: int) -> None:
        self.notify_call("listen_close", lid)

    # -- the reader thread ---------------------------------------------------------
    def _notify(self, frame: Frame) -> None:
        """Send a message nobody waits for; a lost supervisor is handled elsewhere."""
        with contextlib.suppress(GuestError):
            self._send(frame)

    def _send(self, frame: Frame) -> None:
        try:
            self.channel.send(frame)
        except (ChannelClosed, OSError) as e:
            if not self._closed.is_set():
                log.warning("pid %d: supervisor channel lost (%s)", self.pid, e)
                self._lost()
            raise GuestError(errno.EIO, "supervisor unreachable") from e

    def _read_loop(self) -> None:
        k = self.kernel
        assert k is not None  # attach() set it before starting this thread
        try:
            while not self._closed.is_set():
                f = self.channel.recv()
                if f is None:
                    continue
                self._handle(k, f)
        except (ChannelClosed, ProtocolError, OSError) as e:
            if not self._closed.is_set():
                log.warning("pid %d: supervisor channel closed: %s", self.pid, e)
                self._lost()

    def _lost(self) -> None:
        self._closed.set()
        self._fail_calls()
        if self.kernel is not None:
            self.kernel.request_stop("supervisor lost")

    def _fail_calls(self) -> None:
        with self._lock:
            calls = list(self._calls.values())
        for c in calls:
            c.value = -errno.EIO
            c.event.set()

    def _handle(self, k: Kernel, f: Frame) -> None:
        t = f.type
        if t == Msg.RESULT:
            with self._lock:
                c = self._calls.get(f.req)
            if c is not None:
                c.value, c.payload = f.arg, f.payload
                c.event.set()
        elif t in (Msg.PIPE_DATA, Msg.PIPE_WROTE):
            self._event(k, lambda: self._deliver(f))
        elif t == Msg.CHILD_EXIT:
            self._event(k, lambda: k.remote_child_exited(f.pipe, f.arg))
        elif t == Msg.SIGNAL:
            # only a signal that ends the process for sure stops a running guest at
            # once; any other is taken at its next syscall, block or time slice
            target = _signal_target(k, f.req)
            info = _siginfo(f)
            self._event(
                k,
                lambda: target is not None and k.post_signal(target, f.arg, info),
                interrupt=target is not None and signals.kills_at_once(target, f.arg),
            )
        elif t == Msg.CHILD_STATE:
            self._event(k, lambda: k.remote_child_state(f.pipe, f.arg))
        elif t == Msg.POLL_WAKE:
            self._event(k, k.poll_wake)
        elif t == Msg.REPARENT:
            self._event(k, lambda: _set_ppid(k, f.arg))
        else:
            log.warning("pid %d: unexpected message %d from supervisor", self.pid, t)

    def _event(self, k: Kernel, fn, interrupt: bool = False) -> None:
        def run() -> None:
            self.events_done += 1
            fn()

        k.post_event(run, interrupt)

    def _deliver(self, f: Frame) -> None:
        lwp = self._pending.pop(f.req, None)
        if lwp is None or lwp.remote_req != f.req:
            if f.type == Msg.PIPE_DATA and f.flags & FILES and self.kernel is not None:
                # files for a thread that is gone: their refs are ours, close them
                with contextlib.suppress(ValueError):
                    self.drop_states(self.kernel, unpack_files(f.payload)[0])
            return
        lwp.remote_result = (f.arg, f.payload, f.flags)
        assert self.kernel is not None  # only an attached link has calls pending
        self.kernel.sched.make_runnable(lwp.thread)


#: file kinds that can cross VMs (fork/snapshot.py ``file_from_state`` rebuilds them)
CROSSING_KINDS = {"console", "null", "zero", "urandom", "rpipe", "rsock", "fsfile", "inet_listener"}


def _needs_share(f: File) -> bool:
    """A local pipe end or connected stream socket: the broker's once shared."""
    return isinstance(f, PipeEnd) or (isinstance(f, UnixSocket) and f.stream and f.peer is not None)


def _crossing_state(f: File) -> dict | None:
    try:
        st = file_state(f)
    except SnapshotError:
        return None
    return st if st.get("kind") in CROSSING_KINDS else None


def _local_pipe(f: File) -> bool:
    """An end of a pipe of this VM's that is not in the broker yet."""
    return isinstance(f, PipeEnd) and f.pipe.broker_id is None


def call_payload(op: str, args: tuple[int, ...], data: bytes = b"") -> bytes:
    """A CALL frame's payload: the request as one JSON line, then the data as it is
    (no base64: file writes are the bulk of it; the supervisor splits at the newline,
    which JSON never holds unescaped)."""
    head = json.dumps({"op": op, "args": list(args)}).encode()
    return head + b"\n" + data if data else head


def _signal_target(k: Kernel, pid: int) -> Process | None:
    """The process a SIGNAL names: the VM's own (0), or a clone(CLONE_VM) child of it that
    still runs here (never a proxy of another VM's process: that would send it back)."""
    if not pid:
        return k.main
    proc = k.procs.get(pid)
    return proc if proc is not None and proc.vm_parent and not proc.remote else None


def _set_ppid(k: Kernel, ppid: int) -> None:
    """The supervisor re-parented our process (its parent exited)."""
    if k.main is not None:
        k.main.ppid = ppid


class RemoteStdin:
    """The console's input in a VM of a VM-clone instance (see instance/stdin.py)."""

    host_fd: int | None = None  # nothing for the kernel to wait on: replies wake it

    def __init__(self, link: VmLink) -> None:
        self.link = link
        self._tty: bool | None = None

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int, nonblocking: bool) -> int:
        return self.link.read_stdin(k, lwp, addr, n, nonblocking)

    def isatty(self) -> bool:
        if self._tty is None:  # asked once per VM, on the first terminal ioctl of fd 0
            self._tty = self.link.call("stdin_isatty") > 0
        return self._tty


def _siginfo(f: Frame) -> signals.SigInfo:
    """The siginfo of a SIGNAL frame: a kill from pid ``f.pipe``, or what its payload says."""
    code, value = signals.SI_USER, 0
    if len(f.payload) == SIGNAL_INFO.size:
        code, value = SIGNAL_INFO.unpack(f.payload)
    return signals.SigInfo(f.arg, code, f.pipe, 0, value)

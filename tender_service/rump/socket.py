"""AF_UNIX sockets inside one kernel, with Linux semantics.

A socket is an open file description (``File``) like a pipe end: fds share
it, fork copies the fd and not the socket.  A connected pair of stream
sockets is two byte streams: each socket's receive queue is its peer's send
target, bounded like a pipe (``SOCK_BUF`` bytes), with the same wait-queue
discipline (an operation that cannot progress raises ``Block`` on the queue
of the socket whose state it waits for, and the syscall restarts when woken;
a long blocking send resumes from ``lwp.progress``).  A datagram socket's
queue holds whole messages.  Every change also wakes the kernel's poll
queue (``Kernel.poll_wake``) so poll/select/epoll re-check.

Messages may carry open files (SCM_RIGHTS): a file in flight holds a
reference, so closing the sender's fd meanwhile leaves the receiver a working
descriptor, as Linux.  (A socket sent over itself keeps itself alive: Linux
has a garbage collector for such cycles, this kernel does not.)

Names: a path binds a socket inode in the instance's file system
(``FileSystem.mksock``) and the socket is found by that inode number; an
abstract name (a leading NUL) lives only in the kernel.  Both are in
:class:`UnixNames`, one per kernel: a VM-clone VM cannot connect to a name
bound in another VM (ECONNREFUSED), see docs/semantics.md.
"""

from __future__ import annotations

import errno
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.fdtable import drop
from tender_service.rump.files import (
    FIONREAD,
    O_NONBLOCK,
    O_RDWR,
    POLLERR,
    POLLHUP,
    POLLRDHUP,
    POLLWRBAND,
    READABLE,
    S_IFSOCK,
    WRITABLE,
    File,
)
from tender_service.rump.outcomes import Block

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
MSG_OOB, MSG_PEEK, MSG_DONTROUTE, MSG_CTRUNC, MSG_TRUNC = 0x1, 0x2, 0x4, 0x8, 0x20
MSG_DONTWAIT, MSG_EOR, MSG_WAITALL, MSG_NOSIGNAL, MSG_CMSG_CLOEXEC = (
    0x40,
    0x80,
    0x100,
    0x4000,
    0x40000000,
)
#: bytes one direction of a stream (or a datagram queue) holds: Linux's default
#: socket buffer (net.core.wmem_default)
SOCK_BUF = 212992
#: the largest datagram: what fits a default send buffer, less Linux's overhead
MAX_DGRAM = SOCK_BUF - 32
SOMAXCONN = 4096
SUN_PATH_MAX = 108
SCM_MAX_FD = 253


@dataclass(eq=False, slots=True)
class Segment:
    """One send: its bytes, the files it carries, the sender's name (datagrams)."""

    data: bytearray
    files: list[File] | None = None
    sender: bytes = b""


@dataclass(eq=False)
class UnixNames:
    """The bound AF_UNIX names of one kernel: an inode (path) or an abstract name."""

    by_ino: dict[int, UnixSocket] = field(default_factory=dict)
    abstract: dict[bytes, UnixSocket] = field(default_factory=dict)
    autobind: itertools.count = field(default_factory=lambda: itertools.count(1))


class Socket(File):
    """What the socket syscalls need of a socket: this kernel's AF_UNIX sockets, and
    (VM-clone) a stream socket whose pair crossed VMs (transports/remote_socket.py)."""

    kind = "socket"
    mode = S_IFSOCK

    def __init__(self, stype: int, flags: int = 0) -> None:
        super().__init__(O_RDWR | (flags & O_NONBLOCK))
        self.family = AF_UNIX
        self.protocol = 0
        self.stype = stype
        self.name = b""  # sun_path as bound (b"\0..." abstract), b"" unnamed
        self.peer_name = b""
        self.connected = False
        self.listening = False
        self.so_error = 0
        #: a non-blocking connect answered EINPROGRESS, then completed: the next
        #: connect returns 0 once (Linux), EISCONN after
        self.connect_owed = False
        self.sndbuf = SOCK_BUF
        self.rcvbuf = SOCK_BUF
        self.options: dict[tuple[int, int], bytes] = {}

    @property
    def stream(self) -> bool:
        return self.stype != SOCK_DGRAM

    @property
    def pollable(self) -> bool:
        return True

    @property
    def has_peer(self) -> bool:
        return self.connected

    def out_name(self, name: bytes) -> bytes:
        """The sockaddr getsockname/getpeername/accept/recvfrom copy out for ``name``."""
        return unix_sockaddr(name)

    def send(
        self,
        k: Kernel,
        lwp: Lwp,
        n: int,
        chunk,
        files: list[File] | None,
        flags: int,
        dest: UnixSocket | None = None,
    ) -> int:
        _drop_files(k, files)
        raise GuestError(errno.EOPNOTSUPP)

    def recv(
        self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]], flags: int
    ) -> tuple[int, list[File] | None, bytes, int]:
        raise GuestError(errno.EOPNOTSUPP)

    def shutdown(self, k: Kernel, how: int) -> None:
        raise GuestError(errno.EOPNOTSUPP)

    def _changed(self, k: Kernel, gen: bool = True) -> None:
        k.poll_wake()


class UnsharedSocket(Socket):
    """A VM-clone child's copy of a socket that cannot cross VMs (a listening or
    datagram socket, an unconnected one): every operation is EOPNOTSUPP
    (docs/semantics.md); closing it is all it can do."""

    def __init__(self, stype: int, flags: int, what: str) -> None:
        super().__init__(stype, flags)
        self.what = what

    def describe(self) -> str:
        return f"{self.what} (left in the parent's VM)"

    def read(self, k, lwp, addr, n):
        raise GuestError(errno.EOPNOTSUPP)

    def readv(self, k, lwp, vecs):
        raise GuestError(errno.EOPNOTSUPP)

    def write(self, k, lwp, addr, n):
        raise GuestError(errno.EOPNOTSUPP)

    def write_bytes(self, k, lwp, data):
        raise GuestError(errno.EOPNOTSUPP)

    def poll(self, k: Kernel) -> int:
        return POLLERR

    def snapshot_state(self) -> dict:
        return {"kind": "unshared", "what": self.what, "stype": self.stype, "flags": self.flags}


class UnixSocket(Socket):
    """One AF_UNIX socket (see the module docstring)."""

    _ids = itertools.count(1)

    def __init__(self, stype: int, flags: int = 0) -> None:
        super().__init__(stype, flags)
        self.id = next(UnixSocket._ids)
        self.wq = WaitQueue(f"socket:{self.id}")
        self.rx: deque[Segment] = deque()
        self.rx_bytes = 0
        self.peer: UnixSocket | None = None  # stream: the other end; dgram: connect()'s target
        self.backlog = 0
        self.pending: deque[UnixSocket] = deque()  # connections accept() has not taken
        self.ino = 0  # the socket inode of a path name
        self.shut_rd = False  # no more receiving (shutdown(SHUT_RD) or the peer closed)
        self.shut_wr = False  # no more sending
        self.closed = False
        self.gen = 0  # readiness changes, for edge-triggered epoll
        #: VM-clone: the two broker pipes (send, receive) this pair became
        self.broker: tuple[int, int] | None = None

    def new_conn(self) -> UnixSocket:
        """The socket accept() will return for a connection to this listener."""
        return UnixSocket(self.stype)

    def accept_conn(self, k: Kernel, lwp: Lwp) -> Socket:
        """The next connection of this listener's queue (EAGAIN, or wait for one)."""
        if not self.pending:
            if self.nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(self.wq, f"accept {self.describe()}")
        conn = self.pending.popleft()
        self._changed(k, gen=False)  # a connect waiting for room in the queue
        return conn

    def snapshot_state(self) -> dict:
        """Only a stream pair crosses VMs (shared first, see transports/vmlink.py); any
        other socket stays in this VM and the child's copy is an UnsharedSocket."""
        return {
            "kind": "unshared",
            "what": self.describe(),
            "stype": self.stype,
            "flags": self.flags,
        }

    # -- File --------------------------------------------------------------------------
    def describe(self) -> str:
        kind = {SOCK_STREAM: "stream", SOCK_DGRAM: "dgram"}.get(self.stype, "seqpacket")
        return f"socket:[{self.id}] unix {kind}"

    def poll_gen(self) -> int:
        return self.gen

    @property
    def has_peer(self) -> bool:
        return self.peer is not None

    def poll(self, k: Kernel) -> int:
        """Linux's unix_poll / unix_dgram_poll."""
        if self.listening:
            return READABLE if self.pending else 0
        mask = 0
        if self.rx or self.shut_rd:
            mask |= READABLE
        if self.shut_rd:
            mask |= POLLRDHUP
        if self.shut_rd and self.shut_wr:
            mask |= POLLHUP
        if self.stream and not self.connected:
            mask |= POLLHUP
        if self._can_send():
            mask |= WRITABLE | POLLWRBAND
        return mask

    def _can_send(self) -> bool:
        if self.stream and not self.connected:
            return True  # a write fails at once (ENOTCONN): it never waits
        p = self.peer
        if p is None or p.closed or self.shut_wr or p.shut_rd:
            return True  # fails at once
        return p.rx_bytes < min(p.rcvbuf, self.sndbuf)

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        return self.readv(k, lwp, [(addr, n)])

    def readv(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]]) -> int:
        got, files, _, _ = self.recv(k, lwp, vecs, 0)
        _drop_files(k, files)  # read(2) cannot take files: they are closed
        return got

    def write(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        k.mem.offset(addr, n)
        return self.send(k, lwp, n, lambda off, size: k.mem.read(addr + off, size), None, 0)

    def write_bytes(self, k: Kernel, lwp: Lwp, data: bytes) -> int:
        return self.send(k, lwp, len(data), lambda off, size: data[off : off + size], None, 0)

    def ioctl(self, k: Kernel, lwp: Lwp, req: int, arg: int) -> int:
        if req == FIONREAD:
            size = self.rx_bytes if self.stream else (len(self.rx[0].data) if self.rx else 0)
            k.mem.write_u32(arg, size)
            return 0
        raise GuestError(errno.ENOTTY)

    def release(self, k: Kernel) -> None:
        self.closed = self.shut_rd = self.shut_wr = True
        names = k.unix_names
        if self.ino and names.by_ino.get(self.ino) is self:
            del names.by_ino[self.ino]
        if self.name.startswith(b"\0") and names.abstract.get(self.name) is self:
            del names.abstract[self.name]
        while self.pending:  # connections never accepted: their clients see a reset
            s = self.pending.popleft()
            s.refs = 1
            drop(k, s)
        for seg in self.rx:
            _drop_files(k, seg.files)
        self.rx.clear()
        self.rx_bytes = 0
        p = self.peer
        if p is not None and self.stream:
            p.shut_rd = p.shut_wr = True  # the peer reads EOF, its writes get EPIPE
            p.gen += 1
            k.sched.wake_all(p.wq)
        self._changed(k)

    def _changed(self, k: Kernel, gen: bool = True) -> None:
        """Wake who waits on this socket (and poll); ``gen``: readiness arrived here."""
        if gen:
            self.gen += 1
        if self.wq.waiters:
            k.sched.wake_all(self.wq)
        k.poll_wake()

    # -- sending -----------------------------------------------------------------------
    def send(
        self,
        k: Kernel,
        lwp: Lwp,
        n: int,
        chunk,
        files: list[File] | None,
        flags: int,
        dest: UnixSocket | None = None,
    ) -> int:
        """Send ``n`` bytes read by ``chunk(offset, size)``; ``files`` ride with the
        first byte.  The caller took a reference on each file: it is ours now."""
        try:
            if self.stream:
                return self._send_stream(k, lwp, n, chunk, files, flags)
            return self._send_dgram(k, lwp, n, chunk, files, flags, dest)
        except GuestError:
            if not lwp.progress:
                _drop_files(k, files)
            raise
        except Block:
            if not lwp.progress:
                _drop_files(k, files)  # the restarted call takes them again
            raise

    def _pipe_error(self, k: Kernel, lwp: Lwp, flags: int) -> int:
        if not flags & MSG_NOSIGNAL:
            k.post_signal(lwp.proc, signals.SIGPIPE)
        done, lwp.progress = lwp.progress, 0
        if done:
            return done
        raise GuestError(errno.EPIPE)

    def _send_stream(self, k, lwp, n, chunk, files, flags) -> int:
        if self.listening or not self.connected:
            raise GuestError(errno.ENOTCONN)
        p = self.peer
        if self.shut_wr or p is None or p.closed or p.shut_rd:
            return self._pipe_error(k, lwp, flags)
        done = lwp.progress
        if done >= n and n:
            lwp.progress = 0
            return n
        room = min(p.rcvbuf, self.sndbuf) - p.rx_bytes
        if room <= 0:
            if self.nonblocking or flags & MSG_DONTWAIT:
                lwp.progress = 0
                if done:
                    return done
                raise GuestError(errno.EAGAIN)
            raise Block(p.wq, f"send {self.describe()}")
        take = min(room, n - done)
        data = bytearray(chunk(done, take))
        if done == 0 and files:
            p.rx.append(Segment(data, files))  # files mark where they were sent
        elif p.rx and not p.rx[-1].files:
            p.rx[-1].data += data  # one stream: no boundaries between sends
        else:
            p.rx.append(Segment(data))
        p.rx_bytes += take
        k.pipe_bytes += take
        p._changed(k)
        done += take
        if done < n and not (self.nonblocking or flags & MSG_DONTWAIT):
            lwp.progress = done
            raise Block(p.wq, f"send {self.describe()}")
        lwp.progress = 0
        return done

    def _send_dgram(self, k, lwp, n, chunk, files, flags, dest, sender=None) -> int:
        target = dest if dest is not None else self.peer
        if target is None:
            raise GuestError(errno.ENOTCONN)
        if self.shut_wr:
            return self._pipe_error(k, lwp, flags)
        if target.closed:
            raise GuestError(errno.ECONNREFUSED)
        if n > MAX_DGRAM or n > self.sndbuf:
            raise GuestError(errno.EMSGSIZE)
        if dest is not None and target.peer is not None and target.peer is not self:
            raise GuestError(errno.EPERM)  # it takes only its connected peer's datagrams
        if target.rx_bytes + n > target.rcvbuf and target.rx:
            if self.nonblocking or flags & MSG_DONTWAIT:
                raise GuestError(errno.EAGAIN)
            raise Block(target.wq, f"sendto {self.describe()}")
        data = bytearray(chunk(0, n))
        target.rx.append(Segment(data, files, self.name if sender is None else sender))
        target.rx_bytes += n
        k.pipe_bytes += n
        target._changed(k)
        return n

    # -- receiving ---------------------------------------------------------------------
    def recv(
        self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]], flags: int
    ) -> tuple[int, list[File] | None, bytes, int]:
        """(bytes returned, files received, the sender's name, msg_flags out).

        The caller owns the files (install or drop them)."""
        vecs = [(b, n) for b, n in vecs if n]
        want = sum(n for _, n in vecs)
        if self.listening:
            raise GuestError(errno.EINVAL)
        if self.stream and not self.connected:
            raise GuestError(errno.EINVAL)  # as Linux's unix_stream_read_generic
        if not self.rx:
            if self.shut_rd or (self.stream and want == 0):
                return 0, None, b"", 0
            if self.nonblocking or flags & MSG_DONTWAIT:
                raise GuestError(errno.EAGAIN)
            raise Block(self.wq, f"recv {self.describe()}")
        if not self.stream:
            return self._recv_dgram(k, vecs, flags)
        return self._recv_stream(k, vecs, want, flags)

    def _recv_stream(
        self, k: Kernel, vecs: list[tuple[int, int]], want: int, flags: int
    ) -> tuple[int, list[File] | None, bytes, int]:
        if (
            flags & MSG_WAITALL
            and not flags & MSG_PEEK
            and self.rx_bytes < want
            and not self.shut_rd
            and not self.rx[-1].files
            and not (self.nonblocking or flags & MSG_DONTWAIT)
        ):
            raise Block(self.wq, f"recv {self.describe()}")
        # gather: stop after a segment with files (plain bytes before it come along,
        # as unix(7) says and unix_stream_read_generic does)
        out = bytearray()
        files: list[File] | None = None
        for seg in self.rx:
            if len(out) >= want:
                break
            out += seg.data[: want - len(out)]
            if seg.files:
                files = seg.files
                break
        if k.mem.room(vecs, len(out)) < len(out):
            raise GuestError(errno.EFAULT)
        _scatter(k, vecs, out)
        if not flags & MSG_PEEK:
            self._consume(k, len(out), files)
        elif files is not None:
            files = _dup_refs(files)
        return len(out), files, b"", 0

    def _consume(self, k: Kernel, n: int, files: list[File] | None) -> None:
        """Take ``n`` bytes off the receive queue (the files went with them)."""
        left = n
        while left:
            seg = self.rx[0]
            take = min(left, len(seg.data))
            del seg.data[:take]
            left -= take
            if seg.files and seg.files is files:
                seg.files = None
            if not seg.data:
                self.rx.popleft()
        self.rx_bytes -= n
        if self.peer is not None:
            self.peer.gen += 1  # room: the sender's writable edge
        self._changed(k, gen=False)  # senders wait on this socket's queue

    def _recv_dgram(self, k, vecs, flags) -> tuple[int, list[File] | None, bytes, int]:
        seg = self.rx[0]
        size = sum(n for _, n in vecs)
        data = seg.data[:size]
        if k.mem.room(vecs, len(data)) < len(data):
            raise GuestError(errno.EFAULT)
        _scatter(k, vecs, data)
        msg_flags = MSG_TRUNC if len(seg.data) > size else 0
        files = seg.files
        if flags & MSG_PEEK:
            files = _dup_refs(files) if files else None
        else:
            self.rx.popleft()
            self.rx_bytes -= len(seg.data)
            self._changed(k, gen=False)
        got = len(seg.data) if flags & MSG_TRUNC else len(data)
        return got, files, seg.sender, msg_flags

    # -- connections -------------------------------------------------------------------
    def shutdown(self, k: Kernel, how: int) -> None:
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise GuestError(errno.EINVAL)
        p = self.peer if self.stream else None  # unconnected: nothing else to do (Linux)
        if how in (SHUT_RD, SHUT_RDWR):
            self.shut_rd = True
            if p is not None:
                p.shut_wr = True
        if how in (SHUT_WR, SHUT_RDWR):
            self.shut_wr = True
            if p is not None:
                p.shut_rd = True
        self._changed(k)
        if p is not None:
            p._changed(k)

    def connect_to(self, k: Kernel, lwp: Lwp, server: UnixSocket) -> int:
        """A stream connect to a listening socket: a new socket joins the server's
        queue for accept, already paired with this one (AF_UNIX connects at once)."""
        if self.connected:
            raise GuestError(errno.EISCONN)
        if server.stype != self.stype:
            raise GuestError(errno.EPROTOTYPE)
        if not server.listening or server.closed:
            raise GuestError(errno.ECONNREFUSED)
        if len(server.pending) > server.backlog:
            if self.nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(server.wq, f"connect {self.describe()}")
        mine = server.new_conn()
        mine.name = server.name
        mine.peer_name = self.name
        mine.sndbuf, mine.rcvbuf = server.sndbuf, server.rcvbuf
        pair(self, mine)
        self.peer_name = server.name
        server.pending.append(mine)
        server._changed(k)
        self._changed(k)
        return 0


def unix_sockaddr(name: bytes) -> bytes:
    """A sockaddr_un as Linux copies it out: the family, then a path with its NUL, an
    abstract name as bound, or nothing for an unnamed socket."""
    family = AF_UNIX.to_bytes(2, "little")
    if not name or name.startswith(b"\0"):
        return family + name
    return family + name + b"\0"


def pair(a: UnixSocket, b: UnixSocket) -> None:
    a.peer, b.peer = b, a
    a.connected = b.connected = True


def make_pair(stype: int, flags: int) -> tuple[UnixSocket, UnixSocket]:
    a, b = UnixSocket(stype, flags), UnixSocket(stype, flags)
    pair(a, b)
    return a, b


def _scatter(k: Kernel, vecs: list[tuple[int, int]], data: bytes | bytearray) -> None:
    done = 0
    view = memoryview(data)
    for base, length in vecs:
        if done == len(data):
            break
        part = min(length, len(data) - done)
        k.mem.write(base, view[done : done + part])
        done += part


def _dup_refs(files: list[File]) -> list[File]:
    """MSG_PEEK hands out the files and leaves them queued: one more reference each."""
    for f in files:
        f.refs += 1
    return list(files)


def _drop_files(k: Kernel, files: list[File] | None) -> None:
    if not files:
        return
    for f in files:
        drop(k, f)


def drop_files(k: Kernel, files: list[File] | None) -> None:
    """Give back the in-flight references of files nobody will receive."""
    _drop_files(k, files)

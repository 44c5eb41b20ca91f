"""A stream socket whose pair crossed VMs (VM-clone mode): two broker pipes.

A connected stream socketpair is two byte streams, one each way, so when a
fork shares it (``VmLink.make_remote``) each direction becomes a pipe in the
supervisor's broker, exactly as a shared pipe does, and each end of the pair
becomes a ``RemoteSocket``: it reads its receive pipe and writes its send pipe
(``RemotePipeEnd`` does the requests and the waiting).  shutdown closes one
direction; closing the socket closes both, which the peer sees as EOF and
EPIPE as with a local pair.

Files in SCM_RIGHTS messages cross VMs when a fork could hand them on
(``VmLink.file_states``: pipe ends and stream socket pairs, made the broker's
first if they were this VM's, files of the instance's file system, shared TCP
listeners, the console, /dev/null and kin).  The write's first chunk carries
their states; the supervisor holds their refs for the pipe until a reader gets
them (with the first byte of that write, as Linux) and the reader rebuilds them
(``VmLink.files_from_states``).  Other kinds (epoll, eventfd, datagram or
listening AF_UNIX sockets) are EOPNOTSUPP, the message not sent.

Not across VMs (docs/semantics.md): MSG_PEEK (EOPNOTSUPP), MSG_WAITALL (a read
returns what came).
poll/select/epoll ask the broker for each pipe's state (a synchronous call)
and, while waiting, ask again on a short timer: no message tells a VM when
a pipe in the broker changes.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.files import (
    O_NONBLOCK,
    POLLERR,
    POLLHUP,
    POLLRDHUP,
    POLLWRBAND,
    READABLE,
    WRITABLE,
    File,
)
from tender_service.rump.inet import IPPROTO_TCP
from tender_service.rump.socket import (
    AF_UNIX,
    MSG_DONTWAIT,
    MSG_NOSIGNAL,
    MSG_PEEK,
    SHUT_RD,
    SHUT_RDWR,
    SHUT_WR,
    Socket,
    UnixSocket,
    drop_files,
    unix_sockaddr,
)
from tender_service.transports.remote_pipe import RemotePipeEnd

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp
    from tender_service.transports.vmlink import VmLink


class RemoteSocket(Socket):
    def __init__(
        self,
        link: VmLink,
        rx: int | None,
        tx: int | None,
        stype: int,
        flags: int,
        family: int = AF_UNIX,
        name: bytes = b"",
        peer_name: bytes = b"",
    ) -> None:
        super().__init__(stype, flags)
        self.link = link
        self.connected = True
        self.rx = RemotePipeEnd(link, rx, False, 0) if rx is not None else None
        self.tx = RemotePipeEnd(link, tx, True, 0) if tx is not None else None
        #: what getsockname/getpeername give: a sockaddr as it is (TCP), or a path
        self.family, self.name, self.peer_name = family, name, peer_name
        if family != AF_UNIX:
            self.protocol = IPPROTO_TCP

    def out_name(self, name: bytes) -> bytes:
        return unix_sockaddr(name) if self.family == AF_UNIX else name

    def describe(self) -> str:
        rx = self.rx.pipe if self.rx else "-"
        tx = self.tx.pipe if self.tx else "-"
        return f"remote socket (pipes rx {rx}, tx {tx})"

    def snapshot_state(self) -> dict:
        return {
            "kind": "rsock",
            "rx": self.rx.pipe if self.rx else -1,
            "tx": self.tx.pipe if self.tx else -1,
            "stype": self.stype,
            "flags": self.flags,
            "family": self.family,
            "name": self.name.hex(),
            "peer_name": self.peer_name.hex(),
        }

    @property
    def poll_rechecks(self) -> bool:
        return False  # its pipes' changes wake the VMs that polled them (remote_pipe.py)

    def poll(self, k: Kernel) -> int:
        """The two pipes' events as a socket's: the peer's write side gone is
        IN|RDHUP, both directions gone HUP, as unix_poll."""
        rx = self.rx.poll(k) if self.rx is not None else POLLHUP
        tx = self.tx.poll(k) if self.tx is not None else POLLERR
        mask = rx & READABLE
        rx_done, tx_done = bool(rx & POLLHUP), bool(tx & POLLERR)
        if rx_done:
            mask |= READABLE | POLLRDHUP
        if tx_done or tx & WRITABLE:
            mask |= WRITABLE | POLLWRBAND
        if rx_done and tx_done:
            mask |= POLLHUP
        return mask

    def poll_gen(self) -> int:
        return (self.rx.poll_gen() if self.rx else 0) + (self.tx.poll_gen() if self.tx else 0)

    def _end(self, end: RemotePipeEnd, flags: int) -> RemotePipeEnd:
        nonblock = self.nonblocking or flags & MSG_DONTWAIT
        end.flags = (end.flags & ~O_NONBLOCK) | (O_NONBLOCK if nonblock else 0)
        end.sigpipe = not flags & MSG_NOSIGNAL
        return end

    # -- File ----------------------------------------------------------------------
    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        return self.readv(k, lwp, [(addr, n)])

    def readv(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]]) -> int:
        got, files, _, _ = self.recv(k, lwp, vecs, 0)
        drop_files(k, files)  # read(2) has no room for them: closed, as Linux
        return got

    def write(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        k.mem.offset(addr, n)
        return self.send(k, lwp, n, lambda off, size: k.mem.read(addr + off, size), None, 0)

    def write_bytes(self, k: Kernel, lwp: Lwp, data: bytes) -> int:
        return self.send(k, lwp, len(data), lambda off, size: data[off : off + size], None, 0)

    def release(self, k: Kernel) -> None:
        for end in (self.rx, self.tx):
            if end is not None:
                end.release(k)
        self.rx = self.tx = None

    # -- Socket --------------------------------------------------------------------
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
        """``files`` go with the first chunk (sys_sendmsg gives them again on each
        restart while nothing was written: only the first call sends them).  TCP
        ignores them, as Linux's tcp_sendmsg does (its peer may be the host)."""
        if files and self.family != AF_UNIX:
            drop_files(k, files)
            files = None
        if not files:
            if self.tx is None:
                return self._broken(k, lwp, flags)
            return self._end(self.tx, flags)._write(k, lwp, n, chunk)
        try:
            first = lwp.remote_result is None and not self.link.in_flight(lwp)
            if self.tx is None:
                return self._broken(k, lwp, flags)
            if not first or n == 0:  # Linux sends no files without a byte
                return self._end(self.tx, flags)._write(k, lwp, n, chunk)
            states, files = self.link.file_states(lwp.proc, files)
            return self._end(self.tx, flags)._write(k, lwp, n, chunk, states)
        finally:
            # after the request went out: the supervisor took the pipe's refs from ours
            drop_files(k, files)

    def _broken(self, k: Kernel, lwp: Lwp, flags: int) -> int:
        if not flags & MSG_NOSIGNAL:
            k.post_signal(lwp.proc, signals.SIGPIPE)
        raise GuestError(errno.EPIPE)

    def recv(
        self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]], flags: int
    ) -> tuple[int, list[File] | None, bytes, int]:
        if flags & MSG_PEEK:
            raise GuestError(errno.EOPNOTSUPP)
        if self.rx is None:
            return 0, None, b"", 0
        got, states = self._end(self.rx, flags)._read_files(k, lwp, vecs, "recv")
        files = self.link.files_from_states(k, states) if states else None
        return got, files or None, b"", 0

    def shutdown(self, k: Kernel, how: int) -> None:
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise GuestError(errno.EINVAL)
        if how in (SHUT_RD, SHUT_RDWR) and self.rx is not None:
            self.rx.release(k)
            self.rx = None
        if how in (SHUT_WR, SHUT_RDWR) and self.tx is not None:
            self.tx.release(k)
            self.tx = None

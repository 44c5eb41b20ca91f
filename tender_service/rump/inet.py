"""AF_INET and AF_INET6 loopback sockets: a private network inside one kernel.

TCP and UDP between the processes of one kernel over 127.0.0.0/8 and ::1
(and the any-addresses, which reach the same loopback).  The transport is
this kernel's AF_UNIX machinery (``rump/socket.py``): a TCP connection is a
connected stream pair, a UDP socket a datagram queue; what differs is the
naming: a name is an (address, port) in a sockaddr_in/sockaddr_in6, ports
are bound per family and protocol (``InetNames``), an unbound socket gets
an ephemeral port when it connects, listens or sends.

Not Linux (docs/semantics.md): IPv4 and IPv6 are separate (an AF_INET6
socket bound to :: does not take IPv4 connections); a close with unread
data is an EOF to the peer, not a reset; a write to a peer that closed
fails with EPIPE at once.  Any other destination is ENETUNREACH: nothing
leaves the instance, unless ``unifork run --allow-outbound`` lists it; then a
TCP connect is made on the host (rump/published.py ``PublishedPorts.dial``)
and the socket is the guest's end of that host connection.
"""

from __future__ import annotations

import errno
import itertools
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.files import POLLERR, READABLE, File
from tender_service.rump.outcomes import Block
from tender_service.rump.socket import (
    AF_INET,
    AF_INET6,
    SOCK_DGRAM,
    SOCK_STREAM,
    SOMAXCONN,
    Socket,
    UnixSocket,
    drop_files,
)

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

IPPROTO_IP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_IPV6 = 0, 6, 17, 41
SOL_SOCKET, SO_REUSEPORT = 1, 15
MAX_UDP = 65507  # the largest IPv4 UDP payload
EPHEMERAL = (32768, 60999)  # net.ipv4.ip_local_port_range
ANY4, LOOP4 = bytes(4), bytes([127, 0, 0, 1])
ANY6, LOOP6 = bytes(16), bytes(15) + b"\x01"
SOCKADDR_IN = struct.Struct(">HH4s8x")  # family is little-endian: packed apart
SOCKADDR_IN6 = struct.Struct(">HHI16sI")


@dataclass(eq=False)
class InetNames:
    """The bound ports of one kernel: (family, type, port) -> sockets."""

    ports: dict[tuple[int, int, int], list[InetSocket]] = field(default_factory=dict)
    next_port: itertools.cycle = field(
        default_factory=lambda: itertools.cycle(range(EPHEMERAL[0], EPHEMERAL[1] + 1))
    )


def is_any(ip: bytes) -> bool:
    return ip in (ANY4, ANY6)


def is_loopback(ip: bytes) -> bool:
    return (len(ip) == 4 and ip[0] == 127) or ip == LOOP6


class InetSocket(UnixSocket):
    """A TCP or UDP socket of the instance's private loopback network."""

    def __init__(self, family: int, stype: int, flags: int = 0) -> None:
        super().__init__(stype, flags)
        self.family = family
        self.protocol = IPPROTO_TCP if stype == SOCK_STREAM else IPPROTO_UDP
        self.ip = ANY4 if family == AF_INET else ANY6
        self.port = 0
        self.peer_addr: tuple[bytes, int] | None = None  # UDP connect()
        #: a host connection's guest end (rump/published.py): its number there, and
        #: whether the host side waits for room here before it reads more
        self.host_cid = 0
        self.host_paused = False
        #: an outbound connect under way: the host connection's number (0: none), and
        #: whether a connect() still owes its result (Linux's SS_CONNECTING: the next
        #: connect, or a blocking one's restart, returns 0 or the error, once)
        self.dialing = 0
        self.dial_owed = False
        #: VM-clone: every TCP listener is the instance's (transports/listeners.py): its
        #: id in the supervisor, which holds its queue (0: this kernel's alone)
        self.shared = 0
        self._shared_ready = False

    def describe(self) -> str:
        proto = "tcp" if self.stype == SOCK_STREAM else "udp"
        return f"socket:[{self.id}] {proto}{'6' if self.family == AF_INET6 else ''}"

    # -- addresses ----------------------------------------------------------------
    def sockaddr(self, ip: bytes, port: int) -> bytes:
        if self.family == AF_INET:
            return struct.pack("<H", AF_INET) + SOCKADDR_IN.pack(0, port, ip)[2:]
        return struct.pack("<H", AF_INET6) + SOCKADDR_IN6.pack(0, port, 0, ip, 0)[2:]

    def out_name(self, name: bytes) -> bytes:
        """What getsockname/getpeername/accept/recvfrom copy out."""
        return name or self.sockaddr(self.ip, 0)

    def parse(self, k: Kernel, addr: int, addrlen: int, bind: bool) -> tuple[bytes, int]:
        """(ip, port) of a sockaddr_in/in6 passed in."""
        n = addrlen if addrlen < (1 << 31) else -1
        need = 16 if self.family == AF_INET else 24
        if n < need:
            raise GuestError(errno.EINVAL)
        raw = k.mem.read(addr, min(n, 28))
        (family,) = struct.unpack_from("<H", raw)
        if family != self.family:
            raise GuestError(errno.EAFNOSUPPORT)
        if self.family == AF_INET:
            _, port, ip = SOCKADDR_IN.unpack_from(raw)
        else:
            _, port, _, ip, _ = SOCKADDR_IN6.unpack_from(raw + bytes(28 - len(raw)))
        return ip, port

    # -- ports ----------------------------------------------------------------------
    def _key(self, port: int, stype: int | None = None) -> tuple[int, int, int]:
        return (self.family, self.stype if stype is None else stype, port)

    def _conflicts(self, k: Kernel, ip: bytes, port: int) -> bool:
        for other in k.inet.ports.get(self._key(port), []):
            if other.closed:
                continue
            if not (is_any(ip) or is_any(other.ip) or ip == other.ip):
                continue
            if self._reuses(other):
                continue
            return True
        return False

    def _reuses(self, other: InetSocket) -> bool:
        """SO_REUSEPORT on both (Linux also wants the same owner: every process here
        is root)."""
        return self._reuseport() and other._reuseport()

    def _reuseport(self) -> bool:
        return self.options.get((SOL_SOCKET, SO_REUSEPORT), bytes(4))[:4] != bytes(4)

    def bind_to(self, k: Kernel, ip: bytes, port: int) -> None:
        if self.port:
            raise GuestError(errno.EINVAL)
        if not (is_any(ip) or is_loopback(ip)):
            raise GuestError(errno.EADDRNOTAVAIL)
        if port == 0:
            for _ in range(EPHEMERAL[1] - EPHEMERAL[0] + 1):
                port = next(k.inet.next_port)
                if not self._conflicts(k, ip, port):
                    break
            else:
                raise GuestError(errno.EADDRINUSE)
        elif self._conflicts(k, ip, port):
            raise GuestError(errno.EADDRINUSE)
        self.ip, self.port = ip, port
        self.name = self.sockaddr(ip, port)
        self.register(k)

    def register(self, k: Kernel) -> None:
        """Hold this socket's port in ``k``'s table (bind; a VM-clone child's listener)."""
        k.inet.ports.setdefault(self._key(self.port), []).append(self)

    def autobind(self, k: Kernel) -> None:
        if not self.port:
            self.bind_to(k, self.ip, 0)

    def release(self, k: Kernel) -> None:
        if self.port:
            held = k.inet.ports.get(self._key(self.port), [])
            if self in held:
                held.remove(self)
            if not held:
                k.inet.ports.pop(self._key(self.port), None)
        super().release(k)
        if self.shared and k.remote is not None:
            k.remote.listener_closed(self.shared)
        if self.host_cid and k.published is not None:
            k.published.guest_closed(k, self.host_cid)  # the host end sends what is left

    def _find(self, k: Kernel, ip: bytes, port: int, listening: bool) -> InetSocket | None:
        for s in k.inet.ports.get(self._key(port), []):
            if s.closed or (listening and not s.listening):
                continue
            if is_any(s.ip) or is_any(ip) or s.ip == ip:
                return s
        return None

    # -- connections ------------------------------------------------------------------
    def listen_inet(self, k: Kernel, backlog: int) -> None:
        if self.stype != SOCK_STREAM:
            raise GuestError(errno.EOPNOTSUPP)
        if self.connected:
            raise GuestError(errno.EINVAL)
        self.autobind(k)
        self.backlog = SOMAXCONN if backlog < 0 or backlog > SOMAXCONN else backlog
        self.listening = True
        if k.published is not None and k.published.covers(self.port):
            self.wq.host = True  # clients come from the host: its accept is no deadlock
        if k.remote is not None and not self.shared:  # VM-clone: the instance's listener
            self.shared = k.remote.listening(self.family, self.port)
        self._changed(k)

    def accept_conn(self, k: Kernel, lwp: Lwp) -> Socket:
        """A shared listener's connections wait in the supervisor (every connect to it
        goes there: ``connect_inet``)."""
        if not self.shared or k.remote is None or self.pending:
            return super().accept_conn(k, lwp)
        return k.remote.accept_shared(k, lwp, self)

    def snapshot_state(self) -> dict:
        """A shared listener crosses VMs by its id and name; any other socket stays."""
        if not (self.shared and self.listening):
            return super().snapshot_state()
        return {
            "kind": "inet_listener",
            "lid": self.shared,
            "family": self.family,
            "ip": self.ip.hex(),
            "port": self.port,
            "backlog": self.backlog,
            "flags": self.flags,
        }

    @classmethod
    def from_state(cls, state: dict) -> InetSocket:
        """A child VM's copy of a shared listener (``snapshot_state``); fork/snapshot.py
        registers its port once the child's kernel exists."""
        family = int(state["family"])
        if family not in (AF_INET, AF_INET6):
            raise ValueError(f"bad listener family {family}")
        s = cls(family, SOCK_STREAM, int(state.get("flags", 0)))
        ip = bytes.fromhex(str(state["ip"]))
        port = int(state["port"])
        if len(ip) != (4 if family == AF_INET else 16) or not 0 < port < 65536:
            raise ValueError("bad listener address")
        s.ip, s.port, s.name = ip, port, s.sockaddr(ip, port)
        s.backlog = min(max(int(state["backlog"]), 0), SOMAXCONN)
        s.listening, s.shared = True, int(state["lid"])
        if s.shared <= 0:
            raise ValueError("bad listener id")
        return s

    def connect_inet(self, k: Kernel, lwp: Lwp, ip: bytes, port: int) -> int:
        if self.listening:
            raise GuestError(errno.EINVAL)
        if self.dial_owed:
            return self._dial_result()
        if not (is_any(ip) or is_loopback(ip)):
            return self._connect_out(k, lwp, ip, port)
        dial = (LOOP4 if self.family == AF_INET else LOOP6) if is_any(ip) else ip
        if self.stype == SOCK_DGRAM:
            self.autobind(k)
            self.peer_addr = (dial, port)
            self.peer_name = self.sockaddr(dial, port)
            return 0
        if self.connected:
            raise GuestError(errno.EISCONN)
        server = self._find(k, dial, port, listening=True)
        if k.remote is not None and (server is None or server.shared):
            # VM-clone: a listener shared by the instance's VMs, or one in another VM
            # (the supervisor's to find): any VM holding it may accept (ECONNREFUSED:
            # none listens on the port)
            self.autobind(k)
            k.remote.connect_shared(k, self, server.shared if server else 0, dial, port)
            if self.nonblocking:
                raise GuestError(errno.EINPROGRESS)  # as below: connected when it polls
            return 0
        if server is None:
            raise GuestError(errno.ECONNREFUSED)
        if len(server.pending) > server.backlog and not self.nonblocking:
            raise Block(server.wq, f"connect {self.describe()}")
        self.autobind(k)
        if self.ip != dial and is_any(self.ip):
            self.name = self.sockaddr(dial, self.port)
        self.connect_to(k, lwp, server)
        conn = server.pending[-1]
        assert isinstance(conn, InetSocket)
        conn.name = self.sockaddr(dial, port)
        conn.ip, conn.port = dial, port
        conn.peer_name = self.name
        self.peer_name = conn.name
        if self.nonblocking:
            raise GuestError(errno.EINPROGRESS)  # as Linux: connected by the time it polls
        return 0

    def _connect_out(self, k: Kernel, lwp: Lwp, ip: bytes, port: int) -> int:
        """A TCP connect to a destination outside the instance: made on the host if
        the instance's allow-list has it (ENETUNREACH otherwise, as with no route)."""
        ports = k.published
        if self.stype == SOCK_STREAM and ports is None and k.remote is not None:
            # VM-clone: the supervisor connects (if the instance may), and this socket
            # becomes the guest's end of that connection (a non-blocking connect waits
            # too: the answer is EINPROGRESS, or the error)
            if self.connected:
                raise GuestError(errno.EISCONN)
            self.autobind(k)
            try:
                k.remote.connect_out(k, lwp, self, ip, port)
            except GuestError as e:
                if e.errno not in (errno.ENETUNREACH, errno.EADDRNOTAVAIL):
                    self.shut_rd = self.shut_wr = True  # as dial_done: send is EPIPE
                raise
            if self.nonblocking:
                raise GuestError(errno.EINPROGRESS)
            return 0
        if self.stype != SOCK_STREAM or ports is None:
            raise GuestError(errno.ENETUNREACH)
        if self.connected:
            raise GuestError(errno.EISCONN)
        self.autobind(k)
        ports.dial(k, self, ip, port)  # ENETUNREACH if not allowed
        self.dial_owed = True
        if self.nonblocking:
            raise GuestError(errno.EINPROGRESS)
        raise Block(self.wq, f"connect {self.describe()}")

    def _dial_result(self) -> int:
        """connect() while an outbound connect is under way (EALREADY, or wait), then
        once its result: 0, or the error (ECONNABORTED if SO_ERROR took it)."""
        if self.dialing:
            if self.nonblocking:
                raise GuestError(errno.EALREADY)
            raise Block(self.wq, f"connect {self.describe()}")
        self.dial_owed = False
        if self.connected:
            return 0
        err, self.so_error = self.so_error or errno.ECONNABORTED, 0
        raise GuestError(err)

    def dial_done(self, k: Kernel, err: int) -> None:
        """The host connect ended (0: connected, paired already): wake the connect."""
        self.dialing = 0
        if err:
            self.so_error = err
            self.shut_rd = self.shut_wr = True  # Linux: POLLERR | POLLHUP, reads EOF
        self._changed(k)

    @property
    def poll_rechecks(self) -> bool:
        return False  # a shared listener's next connection wakes the VMs that polled it

    def poll(self, k: Kernel) -> int:
        if self.dialing:
            return 0  # a TCP connect under way: neither readable nor writable yet
        mask = super().poll(k)
        if self.shared and self.listening and not mask and k.remote is not None:
            ready = k.remote.listener_poll(self.shared) & READABLE
            if ready and not self._shared_ready:
                self.gen += 1  # a connection arrived: the edge for epoll
            self._shared_ready = bool(ready)
            mask |= ready
        return mask | POLLERR if self.so_error else mask

    def _changed(self, k: Kernel, gen: bool = True) -> None:
        super()._changed(k, gen)
        if self.host_paused and self.rx_bytes < self.rcvbuf and k.published is not None:
            self.host_paused = False
            k.published.link.resume(self.host_cid)  # room again: the next chunk

    def new_conn(self) -> InetSocket:
        return InetSocket(self.family, self.stype)

    def send_to(
        self,
        k: Kernel,
        lwp: Lwp,
        n: int,
        chunk,
        files: list[File] | None,
        flags: int,
        dest: tuple[bytes, int] | None,
    ) -> int:
        """UDP: a datagram to the socket bound at ``dest`` (or the connected peer);
        with nobody there it is gone, as on a network."""
        if files:
            drop_files(k, files)
            raise GuestError(errno.EOPNOTSUPP)
        if dest is None:
            dest = self.peer_addr
        if dest is None:
            raise GuestError(errno.EDESTADDRREQ)
        ip, port = dest
        if not (is_any(ip) or is_loopback(ip)):
            raise GuestError(errno.ENETUNREACH)
        self.autobind(k)
        target = self._find(k, ip, port, listening=False)
        if n > MAX_UDP:
            raise GuestError(errno.EMSGSIZE)
        if target is None or (target.peer_name and target.peer_name != self.name):
            return n  # nobody takes it there (or it is connected elsewhere): lost
        src = self.sockaddr(self._source(ip), self.port) if is_any(self.ip) else self.name
        return self._send_dgram(k, lwp, n, chunk, None, flags, target, src)

    def _source(self, dest_ip: bytes) -> bytes:
        """The address a packet from an any-bound socket leaves from: loopback's."""
        if is_loopback(dest_ip):
            return dest_ip if self.family == AF_INET6 else LOOP4
        return LOOP4 if self.family == AF_INET else LOOP6

    # -- Socket --------------------------------------------------------------------------
    def send(self, k, lwp, n, chunk, files, flags, dest=None) -> int:
        if self.stype == SOCK_DGRAM:
            return self.send_to(k, lwp, n, chunk, files, flags, dest)
        drop_files(k, files)  # TCP ignores SCM_RIGHTS, as Linux's tcp_sendmsg
        if not self.connected and self.shut_wr:  # a failed outbound connect: as Linux
            return self._pipe_error(k, lwp, flags)
        return super().send(k, lwp, n, chunk, None, flags, None)

    def recv(self, k, lwp, vecs, flags):
        if self.stream and not self.connected:
            raise GuestError(errno.ENOTCONN)
        return super().recv(k, lwp, vecs, flags)

    def shutdown(self, k: Kernel, how: int) -> None:
        if self.stream and not self.connected:
            raise GuestError(errno.ENOTCONN)
        super().shutdown(k, how)

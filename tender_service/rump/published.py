"""Published ports, the guest's side: a connection from the host is an accepted socket.

``unifork run --publish HOST:GUEST`` (instance/publish.py) accepts TCP
connections on a host port and hands each to the instance's listener on
GUEST port, as a container runtime's port mapping does.  Inside the kernel a
host connection is one more connected stream pair of the private network
(rump/inet.py): the guest's end (:class:`PublishedConn`) joins the listener's
accept queue like a local client's, the other end (:class:`HostEnd`) stands
for the host client.  Bytes from the host are appended to the guest's
receive queue; bytes the guest sends land in the host end's queue and are
handed to the host side (:class:`HostLink`), one batch at a time: the next
batch goes when the host side says the last one was written (``drained``), so
a slow host client fills the socket buffer and blocks the guest's send, as on
Linux.  The host side reads one chunk at a time too and reads the next when
the guest's receive queue has room (``HostLink.resume``).

Everything here runs on the VM's thread: the host side calls in through
``Kernel.post_event``.  Wait queues that only the host can wake (the
listener's accept, a read from the host, a send to it) are marked ``host``,
so a server waiting for clients is not a deadlock.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tender_service.machine.errors import GuestError
from tender_service.rump.inet import LOOP4, LOOP6, InetSocket
from tender_service.rump.socket import AF_INET, AF_INET6, SHUT_WR, SOCK_STREAM, Segment, pair

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel

log = logging.getLogger(__name__)


class HostLink(Protocol):
    """What the kernel asks of the host side (thread safe, never blocks)."""

    def send(self, cid: int, data: bytes) -> None:
        """Write ``data`` to the host client; answer with ``PublishedPorts.drained``."""

    def shut_write(self, cid: int) -> None:
        """The guest will send no more: shutdown(SHUT_WR) once the data is out."""

    def close_conn(self, cid: int) -> None:
        """The guest closed: close the host connection once the data is out."""

    def resume(self, cid: int) -> None:
        """The guest's receive queue has room: read the next chunk from the host."""

    def open(self, host_ip: str, port: int) -> int:
        """Connect to host_ip:port on the host (an allowed outbound connection);
        return its number and answer with ``PublishedPorts.opened``."""


class PublishedConn(InetSocket):
    """The guest's end of a host client's connection (what accept returns).  An
    outbound connection's guest end is the guest's own socket, marked the same way
    (``host_cid``): InetSocket asks for the next chunk when it has room and tells
    the host end when it is closed."""

    def __init__(self, family: int, cid: int) -> None:
        super().__init__(family, SOCK_STREAM)
        self.host_cid = cid
        self.wq.host = True  # a read waits for the host client

    def describe(self) -> str:
        return f"{super().describe()} published #{self.host_cid}"


class HostEnd(InetSocket):
    """The host client's end of the pair: what the guest sends lands here."""

    def __init__(self, family: int, ports: PublishedPorts, cid: int) -> None:
        super().__init__(family, SOCK_STREAM)
        self.ports = ports
        self.cid = cid
        self.busy = False  # a batch is with the host side
        self.shut_sent = False
        self.wq.host = True  # a guest's send waits for the host side to take a batch

    def _changed(self, k: Kernel, gen: bool = True) -> None:
        super()._changed(k, gen)
        self.pump(k)

    def pump(self, k: Kernel) -> None:
        """Hand the queued bytes to the host side; end the connection when the guest did."""
        ports = self.ports
        if self.cid not in ports.conns:
            return
        if self.rx and not self.busy:
            data = b"".join(bytes(seg.data) for seg in self.rx)
            self.rx.clear()
            self.rx_bytes = 0
            self.busy = True
            ports.bytes_out += len(data)
            ports.link.send(self.cid, data)
            if self.peer is not None:
                self.peer.gen += 1  # room: the guest's writable edge
            InetSocket._changed(self, k, gen=False)  # a guest blocked in send
        if self.rx or self.busy:
            return
        conn = self.peer
        if conn is None or conn.closed:
            ports.forget(k, self)
            ports.link.close_conn(self.cid)
        elif self.shut_rd and not self.shut_sent:
            self.shut_sent = True
            ports.link.shut_write(self.cid)


#: outbound connections one instance may hold at once (open or being made)
MAX_OUTBOUND = 512
#: the host as the guest sees it (QEMU's user-mode network has it there too): a connect
#: to HOST_GATEWAY:port is a connect to the host's 127.0.0.1:port, if allowed
HOST_GATEWAY = "10.0.2.2"


@dataclass(frozen=True)
class OutboundRule:
    """One destination an instance may connect to on the host: an IP and a port (0:
    any port)."""

    ip: str
    port: int = 0

    def covers(self, ip: str, port: int) -> bool:
        return self.ip == ip and self.port in (0, port)


@dataclass(eq=False)
class PublishedPorts:
    """The kernel's published guest ports and the host connections it holds: clients
    of the published ports, and the allowed outbound connections (``allow``; never
    to ``deny``, the host addresses the instance itself serves)."""

    link: HostLink
    guest_ports: frozenset[int]
    allow: tuple[OutboundRule, ...] = ()
    deny: frozenset[tuple[str, int]] = frozenset()
    conns: dict[int, HostEnd] = field(default_factory=dict)
    dialing: dict[int, InetSocket] = field(default_factory=dict)
    #: the outbound connections open or being made (at most MAX_OUTBOUND: each holds
    #: a host fd of the VM's process)
    out: set[int] = field(default_factory=set)
    accepted: int = 0
    refused: int = 0
    outbound: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def covers(self, port: int) -> bool:
        return port in self.guest_ports

    # -- events from the host side (run on the VM's thread) -----------------------------
    def arrive(self, k: Kernel, cid: int, guest_port: int, peer: tuple[str, int]) -> None:
        """A host client connected: queue it on the guest's listener, or refuse it."""
        listener = _listener(k, guest_port)
        if listener is None:
            self.refused += 1
            self.link.close_conn(cid)  # nobody listens: closed at once
            return
        # no backlog check: the host side holds at most MAX_INFLIGHT connections and
        # leaves the others in its host listener's queue (a full queue is the host's)
        fam = listener.family
        mine = PublishedConn(fam, cid)
        theirs = HostEnd(fam, self, cid)
        pair(mine, theirs)
        local_ip = LOOP4 if fam == AF_INET else LOOP6
        try:
            peer_ip = ip_bytes(fam, peer[0])
        except ValueError:
            peer_ip = local_ip
        # its port stays 0: it holds no entry of the port table (as an accepted socket)
        mine.ip = local_ip
        mine.name = mine.sockaddr(local_ip, guest_port)
        mine.peer_name = mine.sockaddr(peer_ip, peer[1])
        mine.sndbuf, mine.rcvbuf = listener.sndbuf, listener.rcvbuf
        theirs.name, theirs.peer_name = mine.peer_name, mine.name
        self.conns[cid] = theirs
        self.accepted += 1
        listener.pending.append(mine)
        listener._changed(k)

    def data(self, k: Kernel, cid: int, data: bytes) -> None:
        """Bytes from the host client for the guest (the host side sent one chunk)."""
        end = self.conns.get(cid)
        conn = end.peer if end is not None else None
        if end is None or not isinstance(conn, InetSocket) or conn.closed or conn.shut_rd:
            return  # the guest is gone or reads no more: dropped (Linux would reset)
        conn.rx.append(Segment(bytearray(data)))
        conn.rx_bytes += len(data)
        self.bytes_in += len(data)
        conn._changed(k)
        if conn.rx_bytes < conn.rcvbuf:
            self.link.resume(cid)
        else:
            conn.host_paused = True

    def eof(self, k: Kernel, cid: int) -> None:
        """The host client shut its writing side: the guest reads EOF after the data."""
        end = self.conns.get(cid)
        if end is not None and not end.closed:
            end.shutdown(k, SHUT_WR)

    def reset(self, k: Kernel, cid: int) -> None:
        """The host connection failed or is gone: the guest sees EOF and EPIPE."""
        self.out.discard(cid)
        end = self.conns.pop(cid, None)
        if end is not None and not end.closed:
            end.refs = 0
            end.release(k)

    def drained(self, k: Kernel, cid: int) -> None:
        """The host side wrote the last batch: send the next (or finish)."""
        end = self.conns.get(cid)
        if end is not None:
            end.busy = False
            end.pump(k)

    def guest_closed(self, k: Kernel, cid: int) -> None:
        """The guest closed its end: the host end sends what is queued, then closes."""
        end = self.conns.get(cid)
        if end is not None:
            end.pump(k)

    # -- outbound connections ---------------------------------------------------------
    def route(self, ip: bytes, port: int) -> str | None:
        return route(self.allow, self.deny, ip, port)

    def dial(self, k: Kernel, sock: InetSocket, ip: bytes, port: int) -> None:
        """Start the host connection of ``sock``'s connect to ip:port (ENETUNREACH if
        the instance may not): ``opened`` ends it."""
        host = self.route(ip, port)
        if host is None:
            raise GuestError(errno.ENETUNREACH)  # as a network with no route there
        if len(self.out) >= MAX_OUTBOUND:
            raise GuestError(errno.EADDRNOTAVAIL)  # as Linux out of ephemeral ports
        cid = self.link.open(host, port)
        sock.dialing = sock.host_cid = cid
        sock.wq.host = True  # the host answers: a connect or read waiting is no deadlock
        sock.peer_name = sock.sockaddr(ip, port)
        self.dialing[cid] = sock
        self.out.add(cid)
        self.outbound += 1

    def opened(self, k: Kernel, cid: int, err: int) -> None:
        """The host connect ended: ``err`` 0 pairs the guest's socket with a host end."""
        sock = self.dialing.pop(cid, None)
        if sock is None or sock.closed:
            self.out.discard(cid)
            self.link.close_conn(cid)
            return
        if err:
            self.out.discard(cid)
            sock.host_cid = 0
            sock.dial_done(k, err)
            return
        end = HostEnd(sock.family, self, cid)
        pair(sock, end)
        end.name, end.peer_name = sock.peer_name, sock.name
        self.conns[cid] = end
        sock.dial_done(k, 0)

    def forget(self, k: Kernel, end: HostEnd) -> None:
        self.out.discard(end.cid)
        if self.conns.get(end.cid) is end:
            del self.conns[end.cid]
        if not end.closed:
            end.refs = 0
            end.release(k)

    def close_all(self, k: Kernel) -> None:
        for cid in list(self.conns):
            self.link.close_conn(cid)
            self.reset(k, cid)
        for cid in list(self.dialing):
            self.link.close_conn(cid)
            self.opened(k, cid, errno.ECONNABORTED)


def route(
    allow: tuple[OutboundRule, ...], deny: frozenset[tuple[str, int]], ip: bytes, port: int
) -> str | None:
    """The host address a guest's connect to ip:port goes to, if ``allow`` has it and
    ``deny`` does not (HOST_GATEWAY is the host's 127.0.0.1)."""
    import ipaddress

    text = str(ipaddress.ip_address(ip))
    host = "127.0.0.1" if text == HOST_GATEWAY else text
    if (host, port) in deny or not any(r.covers(host, port) for r in allow):
        return None
    return host


def _listener(k: Kernel, port: int) -> InetSocket | None:
    """The guest's listener on ``port``: IPv4 first, then IPv6 (a [::] socket)."""
    for family in (AF_INET, AF_INET6):
        for s in k.inet.ports.get((family, SOCK_STREAM, port), []):
            if isinstance(s, InetSocket) and s.listening and not s.closed:
                return s
    return None


def ip_bytes(family: int, text: str) -> bytes:
    """A host address as a guest socket of ``family`` sees it (ValueError: it cannot)."""
    import ipaddress

    ip = ipaddress.ip_address(text)
    if family == AF_INET6 and ip.version == 4:
        return bytes(10) + b"\xff\xff" + ip.packed  # a v4-mapped address, as Linux
    if family == AF_INET and ip.version == 6:
        raise ValueError(text)
    return ip.packed

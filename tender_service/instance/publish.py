"""Published ports, the host's side: ``unifork run --publish [IP:]HOST:GUEST``.

A container runtime's port mapping for an in-VM instance (thread and copy
fork, one VM in this process): one I/O thread accepts TCP connections on
each host port (by default on 127.0.0.1) and hands each to the guest's
listener on the GUEST port of the instance's private network
(rump/published.py), then moves bytes both ways and passes on half-closes
and closes.  The guest's kernel runs on another thread: everything this
thread tells it goes through ``Kernel.post_event``; what the kernel tells
this thread (:class:`HostLink` calls) is queued here and the thread woken.

Flow control both ways is one chunk at a time: a chunk read from the host
goes to the guest and the next is read when the guest's receive queue has
room (``resume``); a batch the guest sent is written out before the next is
taken (``drained``).  A connection to a guest port nobody listens on is
closed at once (the client sees a reset or an EOF, as with a container
whose server is not up).

The same thread makes the instance's allowed outbound connections
(``unifork run --allow-outbound IP:PORT``): a guest's connect to an allowed
destination is a non-blocking connect here, answered with ``opened``, then
served like a published connection.

A VM-clone instance uses the same thread in its supervisor, with the
listener broker as its guest side (``instance/clone_ports.py``).  A
thread-fork instance of a tender: the tender binds the ports and hands the
listening sockets to the VM's process, which adopts them (it may accept on
them, but open nothing: instance/jail.py).  Not here (docs/semantics.md):
outbound connections of a tender's thread-fork instance (its jailed VM
process may not connect).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import selectors
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tender_service.rump.kernel import Kernel
from tender_service.rump.published import OutboundRule, PublishedPorts

log = logging.getLogger(__name__)

DEFAULT_HOST_IP = "127.0.0.1"
CHUNK = 65536
BACKLOG = 1024
#: host connections handed to the guest and not yet closed; beyond, the next ones wait
#: in the host listener's queue (the guest's listen backlog as the host's)
MAX_INFLIGHT = 512
ASYNC_SIGNALS = {
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGALRM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGPIPE,
    signal.SIGWINCH,
}


class PublishError(ValueError):
    """A mapping that cannot be parsed or a host port that cannot be bound."""


@dataclass(frozen=True)
class PortMapping:
    """One ``--publish``: TCP connections to host_ip:host_port reach guest_port."""

    host_port: int
    guest_port: int
    host_ip: str = DEFAULT_HOST_IP

    @classmethod
    def parse(cls, text: str) -> PortMapping:
        """``HOST:GUEST`` or ``IP:HOST:GUEST`` (``[::1]:HOST:GUEST`` for IPv6), as docker -p."""
        rest, sep, guest = text.rpartition(":")
        if not sep:
            raise PublishError(f"--publish {text!r}: expected [IP:]HOST_PORT:GUEST_PORT")
        ip, sep, host = rest.rpartition(":")
        ip = ip.strip("[]") if sep else DEFAULT_HOST_IP
        try:
            m = cls(int(host), int(guest.removesuffix("/tcp")), ip or DEFAULT_HOST_IP)
        except ValueError:
            raise PublishError(f"--publish {text!r}: ports must be numbers") from None
        if not (0 <= m.host_port < 65536 and 0 < m.guest_port < 65536):
            raise PublishError(f"--publish {text!r}: a port out of range")
        return m

    def __str__(self) -> str:
        ip = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{ip}:{self.host_port} -> guest port {self.guest_port}"


def parse_outbound(text: str) -> OutboundRule:
    """``IP:PORT`` or ``IP:*`` (``[::1]:PORT`` for IPv6): a destination on the host."""
    ip, sep, port = text.rpartition(":")
    try:
        if not sep:
            raise ValueError
        addr = str(ipaddress.ip_address(ip.strip("[]")))
        number = 0 if port == "*" else int(port)
        if not 0 < number < 65536 and port != "*":
            raise ValueError
    except ValueError:
        raise PublishError(f"--allow-outbound {text!r}: expected IP:PORT or IP:*") from None
    return OutboundRule(addr, number)


@dataclass(eq=False)
class _Conn:
    """One host connection as the I/O thread sees it."""

    sock: socket.socket
    dialing: bool = False  # an outbound connect under way
    out: bytearray = field(default_factory=bytearray)
    reading: bool = True  # wants the next chunk from the host
    host_eof: bool = False
    want_shut: bool = False
    want_close: bool = False
    events: int = 0  # what the selector watches


class Publisher:
    """The host ports of one instance, its allowed outbound connections, and the
    thread that serves them (a ``HostLink``)."""

    def __init__(
        self,
        mappings: Sequence[PortMapping],
        outbound: Sequence[OutboundRule] = (),
        listeners: Sequence[socket.socket] | None = None,
    ) -> None:
        """Bind every host port now, so a port in use fails the run before it starts;
        or adopt ``listeners``, one listening socket per mapping, bound by another
        process (a tender hands its thread-fork VM process the ports it bound)."""
        self.mappings = list(mappings)
        self.outbound = tuple(outbound)
        self._listeners: dict[int, tuple[socket.socket, PortMapping]] = {}
        if listeners is not None:
            for s, m in zip(listeners, self.mappings, strict=True):
                s.setblocking(False)
                self._listeners[s.fileno()] = (s, m)
        try:
            for m in self.mappings if listeners is None else ():
                family = socket.AF_INET6 if ":" in m.host_ip else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                self._listeners[s.fileno()] = (s, m)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((m.host_ip, m.host_port))
                except OSError as e:
                    raise PublishError(f"cannot publish {m}: {e.strerror or e}") from None
                s.listen(BACKLOG)
                s.setblocking(False)
        except BaseException:
            self._close_listeners()
            raise
        # asked once, now: a jailed VM process may not call getsockname later
        self._bound = [
            (m.host_ip, s.getsockname()[1], m.guest_port) for s, m in self._listeners.values()
        ]
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel = selectors.DefaultSelector()
        self._stop = False
        self._accepts_paused = False
        self._thread: threading.Thread | None = None
        self._deliver: Callable[[Callable[..., None]], None] | None = None
        self.ports: PublishedPorts | None = None
        self.accepted = 0
        self.opened_out = 0  # outbound connections made

    def listener_fds(self) -> list[int]:
        """The listening sockets' fds, in the order of ``mappings`` (to hand over)."""
        by_mapping = {id(m): fd for fd, (_, m) in self._listeners.items()}
        return [by_mapping[id(m)] for m in self.mappings]

    def bound(self) -> list[tuple[str, int, int]]:
        """(host IP, host port as bound, guest port) of each mapping (port 0 picks one)."""
        return list(self._bound)

    @property
    def guest_ports(self) -> frozenset[int]:
        return frozenset(m.guest_port for m in self.mappings)

    def own_addresses(self) -> frozenset[tuple[str, int]]:
        """The host addresses the instance serves: never an outbound destination (a
        loop back into itself)."""
        return frozenset(
            (ip if ip not in ("0.0.0.0", "::") else "127.0.0.1", port)
            for ip, port, _ in self.bound()
        )

    def attach(self, kernel: Kernel) -> None:
        """Give the kernel its published ports and start serving them."""
        ports = self.ports = PublishedPorts(
            self, self.guest_ports, self.outbound, self.own_addresses()
        )
        kernel.published = ports
        self.serve(lambda fn: kernel.post_event(lambda: fn(kernel, ports)))

    def serve(self, deliver: Callable[[Callable[..., None]], None]) -> None:
        """Start the I/O thread.  Its events for the guest side are functions of
        (kernel, ports), each given to ``deliver``: a one-VM instance runs them on its
        VM's thread; a VM-clone instance's supervisor under its lock, with no kernel
        (instance/clone_ports.py)."""
        self._deliver = deliver
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        for fd in self._listeners:
            self._sel.register(fd, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="publish", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; close every host connection and listener."""
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for c in self._conns.values():
            with contextlib.suppress(OSError):
                c.sock.close()
        self._conns.clear()
        self._close_listeners()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _close_listeners(self) -> None:
        for s, _ in self._listeners.values():
            s.close()
        self._listeners.clear()

    # -- HostLink: called on the VM's thread ----------------------------------------------
    def send(self, cid: int, data: bytes) -> None:
        self._command(lambda: self._send(cid, data))

    def shut_write(self, cid: int) -> None:
        self._command(lambda: self._shut_write(cid))

    def close_conn(self, cid: int) -> None:
        self._command(lambda: self._close(cid, graceful=True))

    def resume(self, cid: int) -> None:
        self._command(lambda: self._resume(cid))

    def open(self, host_ip: str, port: int) -> int:
        cid = next(self._ids)
        self._command(lambda: self._open(cid, host_ip, port))
        return cid

    def _command(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(fn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    # -- to the kernel ---------------------------------------------------------------------
    def _post(self, fn: Callable[..., None]) -> None:
        assert self._deliver is not None  # serve() set it before the thread started
        self._deliver(fn)

    # -- the I/O thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        # asynchronous signals are the VM thread's (^C, SIGTERM): one taken here would
        # leave it asleep in its poll with Python's flag set and nobody to see it
        signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
        try:
            while not self._stop:
                for key, mask in self._sel.select():
                    fd = key.fd
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif fd in self._listeners:
                        self._accept(*self._listeners[fd])
                    else:
                        self._ready(key.data, mask)
                while True:
                    with self._lock:
                        if not self._commands:
                            break
                        fn = self._commands.popleft()
                    fn()
        except Exception:
            log.exception("publish: the I/O thread failed; published ports are closed")

    def _accept(self, listener: socket.socket, m: PortMapping) -> None:
        for _ in range(64):
            if len(self._conns) >= MAX_INFLIGHT:
                self._pause_accepts(True)
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the client waits in the backlog
                log.warning("publish: accept on %s: %s", m, e)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cid = next(self._ids)
            self._conns[cid] = _Conn(sock)
            self.accepted += 1
            self._update(cid)
            self._arrived(cid, m.guest_port, (str(peer[0]), int(peer[1])))

    def _arrived(self, cid: int, port: int, addr: tuple[str, int]) -> None:
        """Tell the kernel (a function of its own: each event binds its own values)."""
        self._post(lambda k, ports: ports.arrive(k, cid, port, addr))

    def _open(self, cid: int, host_ip: str, port: int) -> None:
        """A guest's allowed connect: a non-blocking connect, answered when it ends."""
        fam = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM)
        except OSError as e:
            code = e.errno or errno.ENOBUFS
            self._post(lambda k, ports: ports.opened(k, cid, code))
            return
        sock.setblocking(False)
        err = sock.connect_ex((host_ip, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._post(lambda k, ports: ports.opened(k, cid, err))
            return
        self._conns[cid] = c = _Conn(sock, dialing=True, reading=False)
        self.opened_out += 1
        if err == 0:
            self._connected(cid, c)
        else:
            self._update(cid)

    def _connected(self, cid: int, c: _Conn) -> None:
        """An outbound connect ended: tell the guest how, then serve it (or drop it)."""
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._post(lambda k, ports: ports.opened(k, cid, err))
        if err:
            self._drop(cid)
            return
        c.dialing, c.reading = False, True
        with contextlib.suppress(OSError):
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._update(cid)

    def _ready(self, cid: int, mask: int) -> None:
        c = self._conns.get(cid)
        if c is None:
            return
        if c.dialing:
            self._connected(cid, c)
            return
        if mask & selectors.EVENT_READ and c.reading:
            try:
                data = c.sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._drop(cid)
                self._post(lambda k, ports: ports.reset(k, cid))
                return
            if data == b"":
                c.host_eof, c.reading = True, False
                self._post(lambda k, ports: ports.eof(k, cid))
            elif data:
                c.reading = False  # until the guest has room (resume)
                self._post(lambda k, ports: ports.data(k, cid, data))
        if mask & selectors.EVENT_WRITE and c.out:
            self._flush(cid, c)
            return
        self._update(cid)

    def _flush(self, cid: int, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(cid)
            self._post(lambda k, ports: ports.reset(k, cid))
            return
        del c.out[:n]
        if not c.out:
            self._post(lambda k, ports: ports.drained(k, cid))
            if c.want_close:
                self._drop(cid)
                return
            if c.want_shut:
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_WR)
        self._update(cid)

    def _send(self, cid: int, data: bytes) -> None:
        c = self._conns.get(cid)
        if c is None:
            self._post(lambda k, ports: ports.reset(k, cid))
            return
        c.out += data
        self._flush(cid, c)

    def _shut_write(self, cid: int) -> None:
        c = self._conns.get(cid)
        if c is None:
            return
        c.want_shut = True
        if not c.out:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)

    def _close(self, cid: int, graceful: bool) -> None:
        c = self._conns.get(cid)
        if c is None:
            return
        c.want_close = True
        if not c.out or not graceful:
            self._drop(cid)

    def _resume(self, cid: int) -> None:
        c = self._conns.get(cid)
        if c is not None and not c.host_eof:
            c.reading = True
            self._update(cid)

    def _update(self, cid: int) -> None:
        """Watch what the connection waits for: the host's bytes, room to write."""
        c = self._conns[cid]
        want = (selectors.EVENT_READ if c.reading and not c.host_eof else 0) | (
            selectors.EVENT_WRITE if c.out or c.dialing else 0
        )
        if want == c.events:
            return
        if c.events and want:
            self._sel.modify(c.sock, want, cid)
        elif want:
            self._sel.register(c.sock, want, cid)
        else:
            self._sel.unregister(c.sock)
        c.events = want

    def _pause_accepts(self, pause: bool) -> None:
        if pause == self._accepts_paused:
            return
        self._accepts_paused = pause
        for fd in self._listeners:
            if pause:
                self._sel.unregister(fd)
            else:
                self._sel.register(fd, selectors.EVENT_READ)

    def _drop(self, cid: int) -> None:
        c = self._conns.pop(cid, None)
        if c is None:
            return
        if self._accepts_paused and len(self._conns) < MAX_INFLIGHT // 2:
            self._pause_accepts(False)
        if c.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(c.sock)
        with contextlib.suppress(OSError):
            c.sock.close()

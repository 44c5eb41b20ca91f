"""The host side of a VM-clone instance: published ports and outbound connections.

``unifork run --fork vmclone --publish HOST:GUEST`` (or a tender's Launch):
the supervisor (in the launching process, or the tender) owns the host port;
``instance/publish.py``'s ``Publisher`` accepts there and moves bytes, as for
a one-VM instance.  What differs is the guest side.  A one-VM instance hands
each connection to its kernel (``rump/published.py``); here every listener
is the instance's (``transports/listeners.py``), so each host connection
becomes two broker pipes, one per direction, queued on the listener of its
guest port; whichever VM's ``accept`` takes it reads and writes those pipes
(``transports/remote_socket.py``), on this host or another.  An allowed
outbound connect (``--allow-outbound``) is made by the same Publisher thread
and handed to the connecting VM the same way (``dial``).

This side holds the host's end of both pipes (holder ``HOST``), as a guest's
connect holds the client's ends.  Flow control is one chunk at a time each
way: the next chunk is read from the host once the broker took the last one
(the pipe's 64 KiB is the guest's receive buffer), and the next read of the
guest's pipe is made once the host socket took what it gave.  Everything
here runs under the supervisor's lock: from the Publisher's thread (its
events) or a VM's thread (the broker's replies); what it tells the Publisher
is queued there.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tender_service.instance.observer import notify
from tender_service.rump.published import MAX_OUTBOUND, HostLink, OutboundRule, route
from tender_service.transports.broker import HOST_HOLDER, POLL_ERR, PipeBroker
from tender_service.transports.listeners import ListenerBroker

log = logging.getLogger(__name__)

#: the broker holder of the host side of published and outbound connections
HOST = HOST_HOLDER
#: bytes of the guest's output taken from its pipe at a time
CHUNK = 65536
DialReply = Callable[[dict | int], None]
"""Called with the connection's pipes ({"rx", "tx"}) or ``-errno``."""


@dataclass
class _Flow:
    """One host connection: its two pipes and which of our ends are still open."""

    rx: int  # host -> guest: we write it
    tx: int  # guest -> host: we read it
    writing: bool = True
    reading: bool = True


class ClonePorts:
    """The guest side of a VM-clone instance's Publisher (its events' target)."""

    def __init__(
        self,
        broker: PipeBroker,
        listeners: ListenerBroker,
        link: HostLink,
        guest_ports: frozenset[int],
        observer: object | None = None,
        allow: tuple[OutboundRule, ...] = (),
        deny: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        self.broker, self.listeners, self.link = broker, listeners, link
        self.guest_ports = guest_ports
        self.observer = observer  # conn_published, conn_bytes (instance/observer.py)
        #: outbound connections: where the instance may connect, and never (its own
        #: published ports, the tender's)
        self.allow, self.deny = allow, deny
        self.flows: dict[int, _Flow] = {}
        #: connects under way: cid -> (pid, its reply; None once its VM is gone)
        self.dialing: dict[int, tuple[int, DialReply | None]] = {}
        self.out: set[int] = set()  # outbound connections open or being made
        self.accepted = 0
        self.refused = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def covers(self, port: int) -> bool:
        return port in self.guest_ports

    # -- Publisher events (the second argument is the one-VM kernel's: none here) -------
    def arrive(self, _k: object, cid: int, guest_port: int, peer: tuple[str, int]) -> None:
        """A host client connected: queue it on the guest port's listener, or refuse."""
        lid = self.listeners.for_port(guest_port)
        conn = self.listeners.connect(lid, HOST, peer) if lid is not None else None
        if conn is None:
            self.refused += 1
            notify(self.observer, "conn_published", "refused")
            self.link.close_conn(cid)  # nobody listens: closed at once, as one VM does
            return
        # the guest reads what we write to its rx, and writes its tx for us
        self.flows[cid] = _Flow(conn.rx, conn.tx)
        self.accepted += 1
        notify(self.observer, "conn_published", "accepted")
        self._pull(cid)

    def data(self, _k: object, cid: int, data: bytes) -> None:
        """A chunk from the host client: into the guest's pipe, then the next one."""
        f = self.flows.get(cid)
        if f is None or not f.writing:
            return
        self.bytes_in += len(data)
        notify(self.observer, "conn_bytes", "in", len(data))
        # EPIPE (the guest reads no more): dropped, as a one-VM instance drops it
        self.broker.write(f.rx, HOST, data, False, lambda n, sig: self._resume(cid))

    def eof(self, _k: object, cid: int) -> None:
        """The host client shut its writing side: the guest reads EOF after the data."""
        f = self.flows.get(cid)
        if f is None:
            return
        if f.writing:
            f.writing = False
            self.broker.close(f.rx, HOST, "w")
        if not f.reading:
            self._end(cid)

    def reset(self, _k: object, cid: int) -> None:
        """The host connection is gone: the guest sees EOF and EPIPE."""
        self._release(cid)

    def drained(self, _k: object, cid: int) -> None:
        """The host took the guest's last chunk: read the next."""
        self._pull(cid)

    def opened(self, _k: object, cid: int, err: int) -> None:
        """An outbound connect ended: ``err`` 0 gives the guest its two pipes."""
        pid, reply = self.dialing.pop(cid, (0, None))
        if reply is None:  # its VM is gone
            self.out.discard(cid)
            self.link.close_conn(cid)
            return
        if err:
            self.out.discard(cid)
            reply(-err)
            return
        rx = self.broker.create(HOST, readers=0, writers=1)  # host -> guest
        self.broker.add_refs(rx, pid, 1, 0)
        tx = self.broker.create(HOST, readers=1, writers=0)  # guest -> host
        self.broker.add_refs(tx, pid, 0, 1)
        self.flows[cid] = _Flow(rx, tx)
        self._pull(cid)
        reply({"rx": rx, "tx": tx})

    # -- outbound connections -----------------------------------------------------------
    def dial(self, pid: int, ip: bytes, port: int, reply: DialReply) -> None:
        """``pid`` connects to ip:port outside the instance: made by the Publisher's
        thread if the allow-list has it (else ENETUNREACH, as with no route)."""
        host = route(self.allow, self.deny, ip, port)
        if host is None:
            reply(-errno.ENETUNREACH)
        elif len(self.out) >= MAX_OUTBOUND:
            reply(-errno.EADDRNOTAVAIL)  # as Linux out of ephemeral ports
        else:
            cid = self.link.open(host, port)
            self.dialing[cid] = (pid, reply)
            self.out.add(cid)

    def drop_holder(self, pid: int) -> None:
        """``pid``'s VM is gone: its connects under way are dropped when they end."""
        for cid, (who, _) in list(self.dialing.items()):
            if who == pid:
                self.dialing[cid] = (pid, None)

    # -- internals ----------------------------------------------------------------------
    def _resume(self, cid: int) -> None:
        if cid in self.flows:
            self.link.resume(cid)

    def _pull(self, cid: int) -> None:
        f = self.flows.get(cid)
        if f is not None and f.reading:
            self.broker.read(
                f.tx, HOST, CHUNK, False, lambda res, files=None: self._from_guest(cid, res, files)
            )

    def _from_guest(self, cid: int, res: bytes | int, files: object = None) -> None:
        if files is not None and self.broker.discard is not None:
            self.broker.discard(files)  # the host takes no files (a guest's TCP drops them)
        f = self.flows.get(cid)
        if f is None or not f.reading:
            return
        if isinstance(res, bytes) and res:
            self.bytes_out += len(res)
            notify(self.observer, "conn_bytes", "out", len(res))
            self.link.send(cid, res)  # its drained() reads the next chunk
            return
        # EOF (or the pipe is gone): the guest sends no more
        f.reading = False
        self.broker.close(f.tx, HOST, "r")
        guest_reads = f.writing and not self.broker.poll(f.rx, True) & POLL_ERR
        if guest_reads:
            self.link.shut_write(cid)  # a half-close: the guest may still read
        else:
            self._end(cid)

    def _end(self, cid: int) -> None:
        """Both directions are done: the host connection closes once its data is out."""
        self.link.close_conn(cid)
        self._release(cid)

    def _release(self, cid: int) -> None:
        self.out.discard(cid)
        f = self.flows.pop(cid, None)
        if f is None:
            return
        if f.writing:
            self.broker.close(f.rx, HOST, "w")
        if f.reading:
            self.broker.close(f.tx, HOST, "r")

    def close_all(self) -> None:
        for cid in list(self.flows):
            self.link.close_conn(cid)
            self._release(cid)

"""The listener broker: TCP listeners shared by several VMs in VM-clone mode.

A pre-forking server listens, then forks workers that all call ``accept`` on
the same socket.  In VM-clone mode the workers are VMs of their own, so the
listener's queue cannot live in any of them: it lives here, in the instance
supervisor, next to the pipe broker, from the moment a VM listens.  Clients
connect here: a process in any VM of the instance (``connect`` finds the
listener by its port), or the host's side of a published port
(``instance/clone_ports.py``).  Each connection is two broker pipes, one per
direction (a connected socket that crossed VMs is the same thing:
``transports/remote_socket.py``); ``accept`` in any VM holding the listener
takes the next one, and a VM that waits parks its request here.

Semantics are Linux's where Linux fixes them: one connection goes to one
accept; accepts wait in arrival order (Linux wakes one exclusive waiter per
connection, so the order among waiters is its scheduler's; here it is FIFO);
a nonblocking accept with nothing queued is EAGAIN; closing the last
reference drops what is still queued (the clients see EOF).  Like the pipe
broker this is a plain single-threaded object the supervisor calls under its
lock; replies are called after the state is consistent.
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from tender_service.transports.broker import POLL_IN, QUEUED_HOLDER, PipeBroker

log = logging.getLogger(__name__)

Holder: TypeAlias = int
#: the holder of a queued connection's server ends until an accept takes them
QUEUED = QUEUED_HOLDER


@dataclass(frozen=True)
class Connection:
    """One connection in a listener's queue: the broker pipe the server reads (``rx``)
    and the one it writes (``tx``), and the client's address."""

    rx: int
    tx: int
    peer: tuple[str, int]
    queued: float = field(default_factory=time.monotonic)  # for the accept latency


AcceptReply: TypeAlias = Callable[[Connection | int], None]
"""Called with the connection (its server ends the accepter's now) or ``-errno``."""


@dataclass
class _ParkedAccept:
    holder: Holder
    reply: AcceptReply


@dataclass
class _Listener:
    id: int
    family: int
    port: int
    refs: dict[Holder, int] = field(default_factory=dict)
    queue: deque[Connection] = field(default_factory=deque)
    accepts: deque[_ParkedAccept] = field(default_factory=deque)
    #: who polled it since its last connection, and how each is told of the next one
    watchers: dict[Holder, Callable[[], None]] = field(default_factory=dict)


class ListenerBroker:
    """All shared listeners of one instance; their connections' pipes live in ``pipes``."""

    def __init__(self, pipes: PipeBroker) -> None:
        self.pipes = pipes
        self._listeners: dict[int, _Listener] = {}
        self._ids = itertools.count(1)
        self._turn = itertools.count()  # round robin among listeners of one port
        self.accepted = 0
        self.dropped = 0

    # -- refs -------------------------------------------------------------------------
    def create(self, holder: Holder, family: int, port: int) -> int:
        lst = _Listener(next(self._ids), family, port, {holder: 1})
        self._listeners[lst.id] = lst
        log.debug("listener %d (port %d) shared by %d", lst.id, port, holder)
        return lst.id

    def add_ref(self, lid: int, holder: Holder) -> None:
        """``holder`` (a forked child's VM) holds the listener too."""
        lst = self._listeners.get(lid)
        if lst is None:
            raise ValueError(f"no listener {lid}")
        lst.refs[holder] = lst.refs.get(holder, 0) + 1

    def holds(self, lid: int, holder: Holder) -> bool:
        """Whether ``holder`` has a ref of listener ``lid``."""
        lst = self._listeners.get(lid)
        return lst is not None and lst.refs.get(holder, 0) > 0

    def close(self, lid: int, holder: Holder) -> None:
        lst = self._listeners.get(lid)
        if lst is None or not lst.refs.get(holder):
            log.debug("ignoring close of listener %d by %d, which holds none", lid, holder)
            return
        lst.refs[holder] -= 1
        if not lst.refs[holder]:
            del lst.refs[holder]
        self._maybe_end(lst)

    def drop_holder(self, holder: Holder) -> None:
        """``holder``'s VM is gone: its references and its parked accepts go."""
        for lst in list(self._listeners.values()):
            lst.refs.pop(holder, None)
            lst.watchers.pop(holder, None)
            self._forget_accepts(lst, holder)
            self._maybe_end(lst)

    # -- connections ------------------------------------------------------------------
    def for_port(self, port: int, family: int | None = None) -> int | None:
        """The listener a connection to ``port`` goes to (of ``family``, or any): one
        with an accept waiting, else the next in turn (several VMs may listen with
        SO_REUSEPORT)."""
        live = [
            lst
            for lst in self._listeners.values()
            if lst.port == port and family in (None, lst.family)
        ]
        if not live:
            return None
        waiting = [lst for lst in live if lst.accepts]
        pool = waiting or live
        return pool[next(self._turn) % len(pool)].id

    def connect(self, lid: int, client: Holder, peer: tuple[str, int]) -> Connection | None:
        """A client (a VM's process, or the host side of a published port) connects:
        two pipes, the client's ends held by ``client``, queued on the listener.
        None: no such listener (connection refused)."""
        lst = self._listeners.get(lid)
        if lst is None:
            return None
        rx = self.pipes.create(client, readers=0, writers=1)  # client -> server
        self.pipes.add_refs(rx, QUEUED, 1, 0)
        tx = self.pipes.create(client, readers=1, writers=0)  # server -> client
        self.pipes.add_refs(tx, QUEUED, 0, 1)
        conn = Connection(rx, tx, peer)
        lst.queue.append(conn)
        self._serve(lst)
        watchers, lst.watchers = lst.watchers, {}
        for wake in watchers.values():
            wake()
        return conn

    def accept(self, lid: int, holder: Holder, nonblock: bool, reply: AcceptReply) -> None:
        lst = self._listeners.get(lid)
        if lst is None or not (holder in lst.refs or any(a.holder == holder for a in lst.accepts)):
            reply(-errno.EBADF)
        elif lst.queue and not lst.accepts:
            reply(self._hand_over(lst.queue.popleft(), holder))
        elif nonblock:
            reply(-errno.EAGAIN)
        else:
            lst.accepts.append(_ParkedAccept(holder, reply))
            self._serve(lst)

    def poll(self, lid: int, watch: tuple[Holder, Callable[[], None]] | None = None) -> int:
        """POLLIN if a connection waits; ``watch``: (holder, callback) of a VM in
        poll, called once, at the next connection."""
        lst = self._listeners.get(lid)
        if lst is None:
            raise ValueError(f"no listener {lid}")
        if watch is not None:
            lst.watchers[watch[0]] = watch[1]
        return POLL_IN if lst.queue else 0

    def blocked(self) -> dict[Holder, str]:
        """Holders waiting in accept, for deadlock reports."""
        return {
            a.holder: f"accept listener {lst.id} (port {lst.port})"
            for lst in self._listeners.values()
            for a in lst.accepts
        }

    def stats(self) -> dict[str, int]:
        return {
            "listeners": len(self._listeners),
            "queued": sum(len(lst.queue) for lst in self._listeners.values()),
            "accepting": sum(len(lst.accepts) for lst in self._listeners.values()),
            "accepted": self.accepted,
            "dropped": self.dropped,
        }

    # -- internals --------------------------------------------------------------------
    def _serve(self, lst: _Listener) -> None:
        while lst.queue and lst.accepts:
            a = lst.accepts.popleft()
            a.reply(self._hand_over(lst.queue.popleft(), a.holder))

    def _hand_over(self, conn: Connection, holder: Holder) -> Connection:
        """The server ends of ``conn`` are ``holder``'s now (taken before given back:
        no EOF in between)."""
        self.accepted += 1
        self.pipes.add_refs(conn.rx, holder, 1, 0)
        self.pipes.add_refs(conn.tx, holder, 0, 1)
        self._discard(conn)
        return conn

    def _discard(self, conn: Connection) -> None:
        self.pipes.close(conn.rx, QUEUED, "r")
        self.pipes.close(conn.tx, QUEUED, "w")

    def _forget_accepts(self, lst: _Listener, holder: Holder) -> None:
        lst.accepts = deque(a for a in lst.accepts if a.holder != holder)

    def _maybe_end(self, lst: _Listener) -> None:
        """No reference and no accept in flight (a parked accept holds the listener,
        as a syscall in progress holds its file on Linux): it is gone."""
        if lst.refs or lst.accepts:
            return
        del self._listeners[lst.id]
        while lst.queue:  # never accepted: their clients see EOF
            self.dropped += 1
            self._discard(lst.queue.popleft())
        log.debug("listener %d (port %d) closed by all holders", lst.id, lst.port)

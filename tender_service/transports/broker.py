"""The pipe broker: pipes shared by several VMs in VM-clone mode.

In VM-clone mode every guest process runs in its own VM, so a pipe whose ends
are held by more than one VM cannot live in any of them. It lives here, in the
instance supervisor; VMs send read/write/close requests over their channel and
get replies. The broker never blocks: a request that cannot complete yet is
*parked* and answered later, when another VM's request (or death) makes it
possible. It is a plain single-threaded object; the supervisor calls it from
one thread.

Semantics are Linux's, as in the in-VM pipe (``tender_service.rump.pipe``):
64 KiB capacity; reads return what is there, park while a writer ref remains,
see EOF (``b""``) once the last writer ref of any holder is gone; a write of
at most ``PIPE_BUF`` bytes is atomic; a larger blocking write moves what fits
and is answered only when all is written; writing with no reader ref left
answers ``-EPIPE`` (or the count already accepted) with the SIGPIPE flag set.

Where Linux leaves the order to the CPU scheduler, the broker is FIFO: parked
readers are served in arrival order, parked writes complete in arrival order
(so a pipe's data is in request order and no write is ever interleaved with
another), and a nonblocking request behind parked ones of its kind gets
``EAGAIN`` rather than overtaking them. Parked readers are served before
parked writers refill the buffer.

Refs are counted per holder (the pid of the process in a VM). A parked request
counts as a reader or writer while it waits, as an in-flight syscall keeps its
file open on Linux: another thread of the VM closing the fd meanwhile does not
turn the pipe into EOF or EPIPE under it. Replies go out after the broker's
state is consistent, so a reply callback may call the broker again.

A write may carry *attachments* (the files of an SCM_RIGHTS message sent on a
socket whose directions are broker pipes), opaque to the broker: they mark the
bytes the write's first piece put in the buffer, as Linux's unix stream socket
keeps them on that piece's skb.  A read reaching a mark's first byte returns
its files with the data (the second argument of its reply) and stops at the
mark's last byte; so no read ever returns two marks' files.  Marked bytes that
nobody can read any more (the last reader gone) hand their files to
``discard``, as do writes with files dropped unanswered; a write's files are
the broker's only once it has put at least one byte in (a positive count).
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tender_service.rump.pipe import PIPE_BUF, PIPE_CAPACITY
from tender_service.transports.pipe_ring import READ as RING_READ
from tender_service.transports.pipe_ring import WRITE as RING_WRITE
from tender_service.transports.pipe_ring import PipeRing

log = logging.getLogger(__name__)

#: poll(2) bits (rump/files.py's): IN|RDNORM, OUT|WRNORM, ERR, HUP
POLL_IN, POLL_OUT, POLL_ERR, POLL_HUP = 0x41, 0x104, 0x8, 0x10

Holder: TypeAlias = int
#: holders that are no VM (a VM holds refs under its process's pid, always > 1): the
#: host side of published and outbound connections (instance/clone_ports.py), the
#: server ends of connections no VM has accepted yet (transports/listeners.py), and
#: the files of SCM_RIGHTS messages nobody has read yet (the supervisor)
HOST_HOLDER: Holder = -1
QUEUED_HOLDER: Holder = -2
IN_FLIGHT_HOLDER: Holder = -3
ReadReply: TypeAlias = Callable[..., None]
"""Called with the bytes read (``b""`` = EOF, or a 0-byte read) or ``-errno``; when
the bytes carry a mark, with its files as the second argument."""
WriteReply: TypeAlias = Callable[[int, bool], None]
"""Called with (bytes written or ``-errno``, raise SIGPIPE in the writer)."""

__all__ = ["PIPE_BUF", "PIPE_CAPACITY", "Holder", "PipeBroker", "ReadReply", "WriteReply"]


@dataclass
class _Refs:
    """One holder's open ends of one pipe."""

    readers: int = 0
    writers: int = 0


@dataclass
class _ParkedRead:
    holder: Holder
    n: int
    reply: ReadReply
    room: int | None = None  # what the reader's buffer can take (None: n)


@dataclass
class _ParkedWrite:
    """A write in progress; ``done`` bytes of ``data`` are already in the buffer."""

    holder: Holder
    data: bytes
    reply: WriteReply
    done: int = 0
    files: Any = None  # attachments of the first byte (see the module docstring)

    @property
    def complete(self) -> bool:
        return self.done == len(self.data)


@dataclass
class _Mark:
    """Files attached to the stream bytes [start, end) (offsets since the pipe began)."""

    start: int
    end: int
    files: Any


@dataclass
class _Pipe:
    id: int
    buf: bytearray
    refs: dict[Holder, _Refs] = field(default_factory=dict)
    reads: deque[_ParkedRead] = field(default_factory=deque)
    writes: deque[_ParkedWrite] = field(default_factory=deque)
    head: int = 0  # stream offset of buf[0]
    marks: deque[_Mark] = field(default_factory=deque)
    #: a ring pipe's segment: its VMs move the bytes; the broker keeps the refs and
    #: writes their totals into it (transports/pipe_ring.py)
    ring: PipeRing | None = None
    #: who polled it since it last changed, and how each is told that it changed
    watchers: dict[Holder, Callable[[], None]] = field(default_factory=dict)

    @property
    def has_readers(self) -> bool:
        """A reader ref or a parked read: someone may still read what is written."""
        return bool(self.reads) or any(r.readers for r in self.refs.values())

    @property
    def has_writers(self) -> bool:
        """A writer ref or a parked write: more data may still come."""
        return bool(self.writes) or any(r.writers for r in self.refs.values())


@dataclass
class _Counters:
    bytes_written: int = 0  # accepted into a pipe buffer (incl. what a pipe had when shared)
    bytes_read: int = 0  # delivered to readers
    bytes_discarded: int = 0  # buffered when the last reader went
    pipes_created: int = 0


class PipeBroker:
    """All shared pipes of one instance, with their holders' refs and parked requests."""

    def __init__(
        self,
        discard: Callable[[Any], None] | None = None,
        ring_done: Callable[[int], None] | None = None,
    ) -> None:
        #: called (after the state is consistent) with the files of marks nobody can read
        self.discard = discard
        #: called with the bytes written into a ring pipe when it goes (metrics)
        self.ring_done = ring_done
        self._pipes: dict[int, _Pipe] = {}
        self._next_id = 1
        self._counters = _Counters()
        self._outbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._flushing = False
        self._warned: set[str] = set()

    # -- refs ---------------------------------------------------------------

    def create(
        self,
        holder: Holder,
        buffered: bytes = b"",
        readers: int = 1,
        writers: int = 1,
        ring: PipeRing | None = None,
    ) -> int:
        """A local pipe becomes shared (its holder forks): register it with its unread
        data, or with ``ring``, which holds that data already and gets the counts."""
        if readers < 0 or writers < 0 or readers + writers == 0:
            raise ValueError(f"a shared pipe needs refs, got readers={readers} writers={writers}")
        if len(buffered) > PIPE_CAPACITY:
            raise ValueError(f"{len(buffered)} buffered bytes exceed the pipe capacity")
        in_ring = ring is not None
        pipe = _Pipe(self._next_id, bytearray(buffered if readers and not in_ring else b""))
        pipe.ring = ring
        self._next_id += 1
        pipe.refs[holder] = _Refs(readers, writers)
        self._pipes[pipe.id] = pipe
        self._counters.pipes_created += 1
        self._counters.bytes_written += len(pipe.buf)  # written in the VM, still to be read
        log.debug(
            "pipe %d shared by %d (r=%d w=%d, %d bytes buffered)",
            pipe.id,
            holder,
            readers,
            writers,
            len(pipe.buf),
        )
        return pipe.id

    def add_refs(self, pipe: int, holder: Holder, readers: int, writers: int) -> None:
        """Give ``holder`` more ends, e.g. a forked child's copies, before the child can use them."""
        if readers < 0 or writers < 0:
            raise ValueError(f"negative refs: readers={readers} writers={writers}")
        p = self._pipes.get(pipe)
        if p is None:
            raise ValueError(f"add_refs on unknown pipe {pipe}")
        refs = p.refs.setdefault(holder, _Refs())
        refs.readers += readers
        refs.writers += writers
        if not refs.readers and not refs.writers:
            del p.refs[holder]
        self._mirror(p)

    def add_refs_many(self, holder: Holder, refs: list[tuple[int, int, int]]) -> None:
        """``add_refs`` of each (pipe, readers, writers), all or none: ValueError, with
        nothing added, if one names an unknown pipe or a negative count."""
        for pipe, readers, writers in refs:
            if readers < 0 or writers < 0 or pipe not in self._pipes:
                raise ValueError(f"bad refs {readers}/{writers} of pipe {pipe}")
        for pipe, readers, writers in refs:
            self.add_refs(pipe, holder, readers, writers)

    def close(self, pipe: int, holder: Holder, end: str) -> None:
        """Release one ref of ``end`` ("r" or "w"); the last one may mean EOF or EPIPE for others."""
        if end not in ("r", "w"):
            raise ValueError(f"pipe end must be 'r' or 'w', not {end!r}")
        p = self._pipes.get(pipe)
        refs = p.refs.get(holder) if p is not None else None
        if p is None or refs is None or (refs.readers if end == "r" else refs.writers) == 0:
            self._warn_once(
                "extra-close",
                f"ignoring close of pipe {pipe}:{end} by {holder}, which holds no such ref",
            )
            return
        if end == "r":
            refs.readers -= 1
        else:
            refs.writers -= 1
        if not refs.readers and not refs.writers:
            del p.refs[holder]
        self._refs_changed(p)
        self._flush()

    def holds(self, pipe: int, holder: Holder, end: str) -> bool:
        """Whether ``holder`` has a ref of ``end`` ("r" or "w") of ``pipe``."""
        p = self._pipes.get(pipe)
        refs = p.refs.get(holder) if p is not None else None
        return refs is not None and (refs.readers if end == "r" else refs.writers) > 0

    def rings_held(self, holder: Holder) -> list[tuple[int, PipeRing]]:
        """(pipe, ring) of every ring pipe ``holder`` has an end of."""
        held = []
        for p in self._pipes.values():
            refs = p.refs.get(holder)
            if p.ring is not None and refs is not None and (refs.readers or refs.writers):
                held.append((p.id, p.ring))
        return held

    def drop_holder(self, holder: Holder) -> None:
        """``holder``'s VM is gone: forget its parked requests unanswered and release all its refs."""
        for p in list(self._pipes.values()):
            for w in p.writes:
                if w.holder == holder and not w.done and w.files is not None:
                    self._discard(w.files)  # never put in: still the writer's
            p.reads = deque(r for r in p.reads if r.holder != holder)
            p.writes = deque(w for w in p.writes if w.holder != holder)
            p.refs.pop(holder, None)
            p.watchers.pop(holder, None)
            self._refs_changed(p)
        self._flush()

    # -- data ---------------------------------------------------------------

    def read(
        self,
        pipe: int,
        holder: Holder,
        n: int,
        nonblock: bool,
        reply: ReadReply,
        room: int | None = None,
    ) -> None:
        """Read up to ``n`` bytes; ``n == 0`` gives ``b""`` at once (0 bytes, as read(fd, buf, 0)).

        ``room``: the reader's buffer ends after that many bytes.  Linux's pipe_read
        fails with EFAULT, leaving the bytes in the pipe, when what it would copy
        does not fit; so does this.
        """
        p = self._pipes.get(pipe)
        refs = p.refs.get(holder) if p is not None else None
        if p is None or refs is None or refs.readers == 0 or p.ring is not None:
            self._send(reply, -errno.EBADF)  # a ring pipe's bytes are in the ring
        elif n < 0:
            self._send(reply, -errno.EINVAL)
        elif n == 0:
            self._send(reply, b"")
        elif not p.reads and (p.buf or not p.has_writers):
            self._send(reply, *self._take(p, n, room))  # b"" here is EOF
        elif nonblock:
            self._send(reply, -errno.EAGAIN)
        else:
            p.reads.append(_ParkedRead(holder, n, reply, room))
        if p is not None:
            self._settle(p)
        self._flush()

    def write(
        self,
        pipe: int,
        holder: Holder,
        data: bytes,
        nonblock: bool,
        reply: WriteReply,
        files: Any = None,
    ) -> None:
        """Write ``data``: atomically if it is at most PIPE_BUF bytes, completely unless nonblocking.

        ``files``: attachments of its first byte (the broker's once the reply count
        is positive; the caller's to release otherwise)."""
        p = self._pipes.get(pipe)
        refs = p.refs.get(holder) if p is not None else None
        if p is None or refs is None or refs.writers == 0 or p.ring is not None:
            self._send(reply, -errno.EBADF, False)  # a ring pipe's bytes are in the ring
        elif not data:
            self._send(reply, 0, False)  # Linux: a null write succeeds before any check
        elif not p.has_readers:
            self._send(reply, -errno.EPIPE, True)
        elif p.writes:  # never overtake a parked write: data order is request order
            if nonblock:
                self._send(reply, -errno.EAGAIN, False)
            else:
                p.writes.append(_ParkedWrite(holder, bytes(data), reply, files=files))
        else:
            w = _ParkedWrite(holder, bytes(data), reply, files=files)
            self._put(p, w)
            if w.complete:
                self._send(reply, w.done, False)
            elif nonblock:
                self._send(reply, w.done or -errno.EAGAIN, False)
            else:
                p.writes.append(w)
        if p is not None:
            self._settle(p)
        self._flush()

    # -- introspection ------------------------------------------------------

    def poll(
        self,
        pipe: int,
        write_end: bool,
        watch: tuple[Holder, Callable[[], None]] | None = None,
    ) -> int:
        """poll(2)'s events of one end of a shared pipe, as Linux's pipe_poll:
        readers IN (data) / HUP (no writer left), writers OUT (room) / ERR (no reader).

        ``watch``: (holder, callback) of a VM in poll: the callback is called once,
        at the pipe's next change (data, room, refs), whatever the events now."""
        p = self._pipes.get(pipe)
        if p is None:
            raise ValueError(f"poll of unknown pipe {pipe}")
        if watch is not None:
            p.watchers[watch[0]] = watch[1]
        if p.ring is not None:
            return p.ring.poll(write_end)
        if write_end:
            room = len(p.buf) < PIPE_CAPACITY and not p.writes
            return (POLL_OUT if room else 0) | (0 if p.has_readers else POLL_ERR)
        return (POLL_IN if p.buf else 0) | (0 if p.has_writers else POLL_HUP)

    def blocked(self) -> dict[Holder, str]:
        """Holders with a parked request and what they wait on, for deadlock reports and ``--ps``."""
        waits: dict[Holder, list[str]] = {}
        for p in self._pipes.values():
            for pid, kind, _ in p.ring.waiting() if p.ring is not None else ():
                what = "read" if kind == RING_READ else "write"
                waits.setdefault(pid, []).append(f"{what} pipe {p.id}")
            for r in p.reads:
                waits.setdefault(r.holder, []).append(f"read pipe {p.id}")
            for w in p.writes:
                waits.setdefault(w.holder, []).append(f"write pipe {p.id}")
        return {h: ", ".join(dict.fromkeys(what)) for h, what in waits.items()}

    def stats(self) -> dict[str, int]:
        """Counters for metrics: live pipes, bytes moved, bytes buffered, parked requests."""
        c = self._counters
        rings = [p.ring for p in self._pipes.values() if p.ring is not None]
        ring_waits = [kind for ring in rings for _, kind, _ in ring.waiting()]
        return {
            "pipes": len(self._pipes),
            "pipes_created": c.pipes_created,
            "bytes_written": c.bytes_written,
            "bytes_read": c.bytes_read,
            "bytes_discarded": c.bytes_discarded,
            "bytes_buffered": sum(len(p.buf) for p in self._pipes.values())
            + sum(ring.buffered() for ring in rings),
            # a ring's waiters count as parked requests: the same wait, in the ring
            "parked_reads": sum(len(p.reads) for p in self._pipes.values())
            + ring_waits.count(RING_READ),
            "parked_writes": sum(len(p.writes) for p in self._pipes.values())
            + ring_waits.count(RING_WRITE),
        }

    # -- internals ----------------------------------------------------------

    def _take(self, p: _Pipe, n: int, room: int | None = None) -> tuple[Any, ...]:
        """The reply of a read: up to ``n`` bytes from the front of the buffer, with
        the files of a mark it reaches (stopping at that mark's end); -EFAULT,
        taking nothing, if more than ``room`` would come."""
        mark = p.marks[0] if p.marks and p.marks[0].start < p.head + n else None
        if mark is not None:
            n = min(n, mark.end - p.head)
        if room is not None and min(n, len(p.buf)) > room:
            return (-errno.EFAULT,)
        data = bytes(p.buf[:n])
        del p.buf[:n]
        p.head += len(data)
        self._counters.bytes_read += len(data)
        if mark is None or not data:
            return (data,)
        p.marks.popleft()
        return (data, mark.files)

    def _put(self, p: _Pipe, w: _ParkedWrite) -> int:
        """Move what may go of ``w`` into the buffer: all or nothing up to PIPE_BUF, else what fits."""
        room = PIPE_CAPACITY - len(p.buf)
        left = len(w.data) - w.done
        take = min(room, left)
        if len(w.data) <= PIPE_BUF and take < left:
            take = 0  # atomic: all at once or not yet
        if take:
            if not w.done and w.files is not None:
                end = p.head + len(p.buf)
                p.marks.append(_Mark(end, end + take, w.files))
            p.buf += w.data[w.done : w.done + take]
            w.done += take
            self._counters.bytes_written += take
        return take

    def _settle(self, p: _Pipe) -> None:
        """After an operation on ``p``: answer what can complete, tell its pollers."""
        self._answer_parked(p)
        if p.watchers:
            for wake in p.watchers.values():
                self._send(wake)
            p.watchers.clear()

    def _answer_parked(self, p: _Pipe) -> None:
        """Answer the parked requests that can complete now, each queue in FIFO order."""
        while True:
            while p.reads and (p.buf or not p.has_writers):
                r = p.reads.popleft()
                self._send(r.reply, *self._take(p, r.n, r.room))  # b"" here is EOF
            if not p.has_readers:
                if p.buf:  # nobody can ever read it
                    self._counters.bytes_discarded += len(p.buf)
                    p.head += len(p.buf)
                    p.buf.clear()
                    while p.marks:
                        self._discard(p.marks.popleft().files)
                while p.writes:
                    w = p.writes.popleft()
                    self._send(w.reply, w.done or -errno.EPIPE, True)
                return
            if not p.writes:
                return
            head = p.writes[0]
            if not self._put(p, head):
                return
            if head.complete:
                p.writes.popleft()
                self._send(head.reply, head.done, False)

    def _refs_changed(self, p: _Pipe) -> None:
        """After refs or requests went away: answer EOF/EPIPE, delete an unheld pipe."""
        self._settle(p)
        self._mirror(p)
        if not p.refs:
            assert not p.reads and not p.writes, "settle answers everything once no refs remain"
            del self._pipes[p.id]
            if p.ring is not None:
                self._ring_gone(p.ring)
            log.debug("pipe %d released by all holders", p.id)

    def _mirror(self, p: _Pipe) -> None:
        """A ring pipe's reader and writer totals, as its VMs see them (EOF, EPIPE)."""
        if p.ring is not None:
            p.ring.set_counts(
                sum(r.readers for r in p.refs.values()), sum(r.writers for r in p.refs.values())
            )

    def ring_of(self, pipe: int) -> PipeRing | None:
        """The segment of ring pipe ``pipe`` (None: not a ring pipe, or gone)."""
        p = self._pipes.get(pipe)
        return p.ring if p is not None else None

    def close_rings(self) -> None:
        """The instance is over: the supervisor lets go of every ring (VMs still running
        keep their mappings)."""
        for p in self._pipes.values():
            if p.ring is not None:
                self._ring_gone(p.ring)
                p.ring = None
        self._flush()

    def _ring_gone(self, ring: PipeRing) -> None:
        written = ring.written()
        self._counters.bytes_written += written
        ring.close()
        if self.ring_done is not None and written:
            self._send(self.ring_done, written)

    def _discard(self, files: Any) -> None:
        if self.discard is not None:
            self._send(self.discard, files)

    def _send(self, reply: Callable[..., None], *args: Any) -> None:
        self._outbox.append((reply, args))

    def _flush(self) -> None:
        """Call queued replies in order; a reply that calls the broker again only queues more."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._outbox:
                reply, args = self._outbox.popleft()
                try:
                    reply(*args)
                except Exception:
                    log.exception("pipe broker: a reply callback failed")
        finally:
            self._flushing = False

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            log.debug("%s", message)
            return
        self._warned.add(key)
        log.warning("%s (further ones are logged at debug level)", message)

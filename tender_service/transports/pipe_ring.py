"""A pipe that the VMs holding its ends read and write directly (VM-clone, one host).

A broker pipe costs four messages through the supervisor per 64 KiB moved (write,
written, read, data) and as many thread hand-offs in three processes: ~180 MiB/s
where the same two programs in one VM move ~1,100.  A ring pipe keeps the bytes in a
shared-memory segment that every VM holding an end maps; a read or a write is a copy
under the segment's lock, and the supervisor is not on the data path at all.

The segment is a memfd (``shm_segment.make_segment``): it has no name in /dev/shm
that another process of the tender's uid could open (a pool process that takes over
its emulator would read and write every instance's pipes), and it is sealed against
resizing before any VM has it.  Its fd reaches a VM over the channel's Unix socket
only from the supervisor and only for a pipe the VM holds an end of: with the answer
to the ``pipe_create`` that made the ring, with a fork's child's hello (the rings its
parent gave it), or on asking (``VmLink.ring``: ``ring_fd``, for ends that came
later, e.g. by SCM_RIGHTS).

The broker stays the authority for who holds what (``PipeBroker``'s refs: forks,
SCM_RIGHTS, a VM that dies): it writes the total reader and writer counts into the
header (``set_counts``), so that a reader sees EOF once the ring is empty and no
writer is left, and a writer EPIPE once no reader is.  A VM closes a ring end with a
call, not a message (``VmLink.close_ring_end``): what it writes next to another VM
passes no supervisor and must find the counts changed already.  Semantics are Linux's, as in
``rump/pipe.py``: 64 KiB capacity, a write of at most PIPE_BUF bytes is atomic (all
or wait), a larger one moves what fits and waits for room for the rest.

Locking: ``flock`` on the segment's file descriptor (each ``PipeRing`` has an open
file description of its own, ``reopen``, so two VMs in one process exclude each
other too) and a thread lock for the threads
sharing one object (the supervisor's).  flock is a system call on both sides of the
critical section: the header and data loads and stores inside it are ordered.

Waiting: a VM whose read or write cannot proceed registers a *waiter* (its pid and the
token of its kernel's wake-up pipe) in the header, in the same locked step that found
it must wait, so no wake-up is lost.  Whoever changes what a waiter waits for (data,
room, a count) clears every waiter and writes a byte to each one's pipe after
unlocking (``Wakers``: the supervisor makes each VM's wake-up pipe, a pipe with no
name, and hands its fd to the instance's VMs: with their hello, or on asking); a
woken VM runs its syscall again and registers again if it must still wait.  A full waiter table makes room by waking its oldest entry (a
spurious wake-up: it re-registers if it still waits).  Each entry carries the VM's
count of its waits (``Waiter.epoch``): the supervisor calls an instance deadlocked
only if the entries its VMs' idle reports named are all still there, unchanged
(instance/supervisor.py ``_ring_stuck``).

Layout: a 4 KiB header (magic, head, tail, readers, writers, the waiter table), then
the 64 KiB of data.  head and tail count bytes forever.

The supervisor does not map a ring (``mapped=False``): it reads and writes the header
with ``pread``/``pwrite`` under the lock (before rings were sealed, a VM process could
truncate one, and a mapping's next touch was a SIGBUS: the tender's death).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tender_service.rump.files import POLLERR, POLLHUP, READABLE, WRITABLE
from tender_service.rump.pipe import PIPE_CAPACITY
from tender_service.transports.shm_segment import SEALS, make_segment

log = logging.getLogger(__name__)

#: the supervisor's hello answer to a VM of an instance with ring pipes: its wake token
WAKE_KEY = "wake"
#: ... and the pipes (ids) and wake-up pipes (tokens) whose fds follow its own
HELLO_RINGS_KEY, HELLO_WAKERS_KEY = "rings", "wakers"
#: the first line of a VM's idle report: the ring pipes its threads wait on
IDLE_RINGS = "rings"
_MAGIC = 0x31474E4952504655  # "UFPRING1"
_HEAD = struct.Struct("<QQQII")  # magic, head, tail, readers, writers
_NWAIT = struct.Struct("<I")  # slots in use, the first ones (most operations find none)
_NWAIT_AT = 32
#: token, pid, what it waits for (READ, WRITE), the waiter's epoch
_SLOT = struct.Struct("<QIII")
_SLOTS_AT = 64
SLOTS = 32
#: what a waiter waits for: data (or EOF), room (or EPIPE)
READ, WRITE = 1, 2
_MEMFD_NAME = "unifork-pipe-ring"
#: the wake-up pipes a VM keeps open at most (an instance's VMs that wait on its rings)
_MAX_WAKERS = 1024
HEADER_SIZE = 4096
SIZE = HEADER_SIZE + PIPE_CAPACITY
#: what a read or write returns when it must wait (its waiter is registered)
WAIT = object()


def new_token() -> int:
    """A wake-up token: 63 random bits (never 0: 0 is a free slot)."""
    return secrets.randbits(62) << 1 | 1


@dataclass(frozen=True)
class Waiter:
    """Who waits: a kernel's wake-up token, the guest pid and which of its waits this
    is (``epoch``, counted by the VM: the supervisor's deadlock check tells by it
    that an entry is the one an idle report named, not a later one)."""

    token: int
    pid: int
    epoch: int = 0


class PipeRing:
    """One ring pipe's segment as one process sees it (see the module docstring)."""

    def __init__(self, fd: int, mapped: bool = True, wakers: Wakers | None = None) -> None:
        self._fd = fd
        #: who this party can wake (waiters it finds in the table; none if not given)
        self.wakers = wakers if wakers is not None else Wakers()
        #: the inode of its memfd: what a VM checks the fd it is sent against
        self.ino = os.fstat(fd).st_ino
        self.name = f"memfd:{self.ino}"
        self._mmap: mmap.mmap | None = None
        #: the header as this object sees it: the mapping, or (not mapped) a copy read
        #: when the lock is taken and written back, if changed, before it is let go
        self._map: mmap.mmap | bytearray = bytearray(HEADER_SIZE)
        self._loaded = b""
        if mapped:
            self._mmap = self._map = mmap.mmap(fd, SIZE)
            self._data = memoryview(self._mmap)[HEADER_SIZE:]
        self._lock = threading.Lock()

    # -- life -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        data: bytes = b"",
        readers: int = 1,
        writers: int = 1,
        mapped: bool = True,
        wakers: Wakers | None = None,
    ) -> PipeRing:
        """A new segment holding ``data`` (a local pipe's unread bytes): a memfd sealed
        against resizing (``shm_segment.make_segment``; ShmExhausted, an OSError, if
        none can be made).  The supervisor's is not ``mapped`` (module docstring)."""
        if len(data) > PIPE_CAPACITY:
            raise ValueError(f"{len(data)} bytes exceed the pipe capacity")
        fd = make_segment(SIZE, _MEMFD_NAME)
        try:
            os.pwrite(fd, data, HEADER_SIZE)
            os.pwrite(fd, _HEAD.pack(_MAGIC, 0, len(data), readers, writers), 0)
            return cls(fd, mapped, wakers)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, wakers: Wakers | None = None) -> PipeRing:
        """Map the segment ``fd`` (a VM, sent it by its supervisor), which it then owns;
        ValueError (fd closed) if it is not a sealed ring."""
        try:
            if os.fstat(fd).st_size != SIZE:
                raise ValueError("not a pipe ring: wrong size")
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
                raise ValueError("not a pipe ring: not sealed against resizing")
            ring = cls(fd, True, wakers)
        except BaseException:
            os.close(fd)
            raise
        if _HEAD.unpack_from(ring._map, 0)[0] != _MAGIC:
            ring.close()
            raise ValueError(f"{ring.name} is not a pipe ring")
        return ring

    def fileno(self) -> int:
        return self._fd

    def reopen(self) -> int:
        """A new fd of the segment with an open file description of its own, for
        another VM: ``flock`` excludes open file descriptions, not fds (one passed
        as it is, by ``SCM_RIGHTS`` or ``dup``, would share this one's lock)."""
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self._mmap is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._data.release()
                self._mmap.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- the lock ---------------------------------------------------------------------
    def _acquire(self) -> None:
        self._lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if self._mmap is None:
                self._load()
        except BaseException:
            self._lock.release()
            raise

    def _release(self) -> None:
        try:
            if self._mmap is None and self._map != self._loaded:
                os.pwrite(self._fd, self._map, 0)
        finally:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._lock.release()

    def _load(self) -> None:
        """The header into our copy; what a truncated file no longer has reads as 0."""
        header = self._map
        assert isinstance(header, bytearray)
        got = os.preadv(self._fd, [header], 0)
        header[got:] = bytes(HEADER_SIZE - got)
        self._loaded = bytes(header)

    @contextlib.contextmanager
    def _locked(self):
        self._acquire()
        try:
            yield
        finally:
            self._release()

    # -- data -------------------------------------------------------------------------
    def read(
        self, n: int, room: int, waiter: Waiter | None, into: memoryview | None = None
    ) -> bytes | int | object:
        """Up to ``n`` bytes (b"": EOF), or their count when copied ``into`` a buffer
        (guest memory: no copy in between); -EFAULT, taking nothing, if more than
        ``room`` would come; ``WAIT`` (``waiter`` registered) or -EAGAIN (no waiter)
        if empty."""
        wake: list[int] = []
        self._acquire()
        try:
            _, head, tail, _, writers = _HEAD.unpack_from(self._map, 0)
            avail = tail - head
            if not avail:
                if not writers:
                    return b"" if into is None else 0
                if waiter is None:
                    return -errno.EAGAIN
                self._register(waiter, READ, wake)
                out: bytes | int | object = WAIT
            else:
                take = min(n, avail)
                if take > room:
                    return -errno.EFAULT
                out = self._copy_out(head, take, into)
                self._map[8:16] = (head + take).to_bytes(8, "little")
                self._take_waiters(wake)  # writers waiting for room
        finally:
            self._release()
        self.wakers.wake(wake)
        return out

    def write(self, data: bytes | memoryview, atomic: bool, waiter: Waiter | None) -> int | object:
        """Put what may go of ``data`` (all of it or nothing when ``atomic``: a write
        of at most PIPE_BUF bytes): the count taken; -EPIPE when no reader is left;
        ``WAIT`` (``waiter`` registered) or -EAGAIN (no waiter) when nothing fits."""
        n = len(data)
        wake: list[int] = []
        self._acquire()
        try:
            _, head, tail, readers, _ = _HEAD.unpack_from(self._map, 0)
            if not readers:
                return -errno.EPIPE
            room = PIPE_CAPACITY - (tail - head)
            take = min(room, n)
            if atomic and take < n:
                take = 0
            if not take:
                if waiter is None:
                    return -errno.EAGAIN
                self._register(waiter, WRITE, wake)
                out: int | object = WAIT
            else:
                self._copy_in(tail, data[:take])
                self._map[16:24] = (tail + take).to_bytes(8, "little")
                self._take_waiters(wake)  # readers waiting for data
                out = take
        finally:
            self._release()
        self.wakers.wake(wake)
        return out

    def poll(self, write_end: bool, waiter: Waiter | None = None) -> int:
        """poll(2)'s events of one end, as Linux's pipe_poll (and the broker's).

        ``waiter`` (a VM in poll, select or epoll_wait) is registered whatever the
        events: the next change of the ring wakes it, and it polls again (an
        edge-triggered epoll waits for a change even when data is there)."""
        wake: list[int] = []
        with self._locked():
            _, head, tail, readers, writers = _HEAD.unpack_from(self._map, 0)
            if waiter is not None:
                self._register(waiter, WRITE if write_end else READ, wake)
        self.wakers.wake(wake)
        if write_end:
            return (WRITABLE if tail - head < PIPE_CAPACITY else 0) | (0 if readers else POLLERR)
        return (READABLE if tail > head else 0) | (0 if writers else POLLHUP)

    def written(self) -> int:
        """Bytes written into the ring since it was made (its tail)."""
        with self._locked():
            return _HEAD.unpack_from(self._map, 0)[2]

    def set_counts(self, readers: int, writers: int) -> None:
        """The broker's totals (every holder's refs); every waiter re-checks."""
        wake: list[int] = []
        with self._locked():
            struct.pack_into("<II", self._map, 24, readers, writers)
            self._take_waiters(wake)
        self.wakers.wake(wake)

    def waiting(self) -> list[tuple[int, int, int]]:
        """(pid, READ or WRITE, epoch) of each waiter (deadlock checks, the broker's
        figures): an entry is there only while nothing it waits for has changed
        (every change takes them all)."""
        with self._locked():
            return [(pid, kind, epoch) for _, pid, kind, epoch in self._slots()]

    def buffered(self) -> int:
        with self._locked():
            _, head, tail, _, _ = _HEAD.unpack_from(self._map, 0)
        return tail - head

    # -- internals ----------------------------------------------------------------------
    def _copy_in(self, pos: int, chunk: bytes | memoryview) -> None:
        off, n = pos % PIPE_CAPACITY, len(chunk)
        first = min(n, PIPE_CAPACITY - off)
        self._data[off : off + first] = chunk[:first]
        if first < n:
            self._data[: n - first] = chunk[first:]

    def _copy_out(self, pos: int, n: int, into: memoryview | None) -> bytes | int:
        off = pos % PIPE_CAPACITY
        first = min(n, PIPE_CAPACITY - off)
        if into is None:
            if first == n:
                return bytes(self._data[off : off + n])
            return bytes(self._data[off:]) + bytes(self._data[: n - first])
        into[:first] = self._data[off : off + first]
        if first < n:
            into[first:n] = self._data[: n - first]
        return n

    def _slots(self) -> list[tuple[int, int, int, int]]:
        """The waiters: the first ``nwait`` slots (the table is kept packed)."""
        m, n = self._map, _NWAIT.unpack_from(self._map, _NWAIT_AT)[0]
        return [_SLOT.unpack_from(m, _SLOTS_AT + i * _SLOT.size) for i in range(min(n, SLOTS))]

    def _register(self, waiter: Waiter, kind: int, wake: list[int]) -> None:
        slots = self._slots()
        entry = (waiter.token, waiter.pid, kind, waiter.epoch)
        # the same waiter again (woken for something else): its entry, the new epoch
        at = next((i for i, slot in enumerate(slots) if slot[:3] == entry[:3]), len(slots))
        if at == SLOTS:  # full: the oldest is woken (spurious: it re-registers)
            wake.append(slots[0][0])
            at = 0
        elif at == len(slots):
            _NWAIT.pack_into(self._map, _NWAIT_AT, at + 1)
        _SLOT.pack_into(self._map, _SLOTS_AT + at * _SLOT.size, *entry)

    def _take_waiters(self, wake: list[int]) -> None:
        if _NWAIT.unpack_from(self._map, _NWAIT_AT)[0]:
            wake.extend(slot[0] for slot in self._slots())
            _NWAIT.pack_into(self._map, _NWAIT_AT, 0)


class Wakers:
    """The wake-up pipes one party writes to, by token: a supervisor's (those of its
    VMs), or a VM's (each asked of its supervisor once, ``fetch``; the tokens in a
    ring's waiter table are any VM's word, so one its supervisor does not know is
    remembered as nobody).  No wake-up pipe has a name: only the VMs of an instance
    and their supervisor hold them."""

    def __init__(self, fetch: Callable[[int], int] | None = None) -> None:
        self._fetch = fetch
        self._fds: dict[int, int] = {}  # -1: nobody
        self._lock = threading.Lock()

    def add(self, token: int, fd: int) -> None:
        """``fd`` (which this object then owns) wakes the kernel of ``token``."""
        with self._lock:
            old = self._fds.pop(token, -1)
            self._fds[token] = fd
        if old >= 0:
            os.close(old)

    def dup(self, token: int) -> int:
        """A new fd of ``token``'s pipe (the caller owns it); -1 if there is none."""
        with self._lock:
            fd = self._fds.get(token, -1)
            return os.dup(fd) if fd >= 0 else -1

    def dup_some(self, limit: int, but: int = 0) -> list[tuple[int, int]]:
        """(token, a new fd) of up to ``limit`` pipes other than token ``but``'s, the
        latest added first (the caller owns the fds)."""
        with self._lock:
            known = [(t, fd) for t, fd in reversed(self._fds.items()) if fd >= 0 and t != but]
            return [(t, os.dup(fd)) for t, fd in known[:limit]]

    def remove(self, token: int) -> None:
        with self._lock:
            fd = self._fds.pop(token, -1)
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            if fd >= 0:
                os.close(fd)

    def wake(self, tokens: list[int]) -> None:
        """A byte to each waiter's pipe; a full pipe is fine (it wakes anyway).  The
        write is made under the lock: a pipe removed meanwhile is not written to (its
        fd number may be another file's by then)."""
        for token in dict.fromkeys(tokens):
            with self._lock:
                fd = self._fd_locked(token)
                if fd >= 0:
                    with contextlib.suppress(BlockingIOError):
                        os.write(fd, b"!")

    def _fd_locked(self, token: int) -> int:
        fd = self._fds.get(token)
        if fd is not None or self._fetch is None:
            return -1 if fd is None else fd
        fd = self._fds[token] = self._fetch(token)
        if len(self._fds) > _MAX_WAKERS:  # the oldest goes (asked again if needed)
            old = self._fds.pop(next(iter(self._fds)))
            if old >= 0:
                os.close(old)
        return fd


def wake_pipe() -> int:
    """A new wake-up pipe: one fd open for reading and writing (its read end reopened
    through /proc, as a FIFO would be, but with no name), nonblocking."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        return os.open(f"/proc/self/fd/{r}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.close(w)

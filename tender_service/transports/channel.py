"""The one duplex message channel between a VM-clone worker and its supervisor.

Two transports behind one ``Channel`` protocol, chosen per instance:

``tcp`` (``TcpChannel``)
    Frames over a connected stream socket (TCP or Unix).  Works across hosts.

``shm`` (``ShmChannel``), the ivshmem analogue, same host only
    One ``multiprocessing.shared_memory`` segment holds two single-producer /
    single-consumer byte rings, one per direction.  A stream socket between
    the two processes carries only one-byte doorbells (and tells, by EOF,
    that the peer died).

The shm doorbell protocol
-------------------------
Each ring has four 8-byte counters, each on its own cache line, each written
by one side only with one aligned store (``ctypes.c_uint64`` on the mapping,
so never torn): ``head`` (consumer), ``tail`` (producer), ``data_waiting``
(consumer: "I am about to sleep until there is data") and ``space_waiting``
(producer: "I am about to sleep until there is room").  head and tail count
bytes forever; a frame (the wire header, then the payload) is published by
one store of ``tail`` after all its bytes are in the ring, so the consumer
never sees half a frame.

Consumer going to sleep::        Producer after publishing::
    data_waiting = 1                 tail = new_tail
    FENCE                            FENCE
    if tail != head: don't sleep     if data_waiting: send a doorbell byte
    sleep in poll() on the socket

This is Dekker's pattern: with both fences, either the consumer's re-check
sees the new tail, or the producer's check sees ``data_waiting == 1`` and
rings; a wake-up cannot be lost, and a busy consumer (flag 0) costs the
producer no syscall.  The "space" direction is the same with the roles
swapped (producer sets ``space_waiting`` and re-checks ``head``; the consumer
rings after advancing ``head``).  Nothing spins: a sleeper sits in ``poll``.

The fence must order a store before a later load, which x86-TSO does not do
by itself.  Python has no fence primitive, so ``_Fence`` releases and
re-acquires a private ``threading.Lock``: CPython implements that with
``sem_post``/``sem_trywait``, i.e. locked read-modify-write instructions
(full barriers on x86-64), and on AArch64 a release followed by an acquire is
ordered too (RCsc).  The same fence separates ring data from the counter
stores and loads.

Both rings share the one socket, so a blocked sender (waiting for space) and
a blocked receiver (waiting for data) in one process must not both read it:
one of them polls and drains the doorbell bytes (the leader), any other waits
on a condition until the leader has drained, and then everyone re-checks its
ring.  A doorbell byte means only "re-check".  ``_epoch`` counts drains; a
thread notes it before its final re-check and does not sleep if a drain
happened since, so a byte drained by another thread is not lost either.

Setup and cleanup: the initiator (a VM's worker) offers shm in its hello; the
responder (the supervisor) answers with its hello and, attached to it
(``SCM_RIGHTS``, so the socket must be a Unix socket: same host), the fd of a
new memfd sealed against resizing (``transports/shm_segment.py``: the VM cannot
shrink it under the supervisor).  Both map it and close the fd; the memory goes
when the last mapping does.  It never has a name, so a killed process leaves
nothing in /dev/shm.  When no segment can be made (``ShmExhausted``: no memory,
or a file size limit below it), the responder answers ``tcp``
with the reason under ``SHM_FALLBACK_KEY`` and frames travel over the same
socket (``channel.fallback`` says why, on both sides).

The handshake (both kinds): the initiating side ("creator") sends a hello
with its caller's JSON; the responder answers with a hello of the same kind.
A supervisor accepts workers of either kind on one listening socket with
``accept_channel``.  If a handshake fails, the socket is closed.
"""

from __future__ import annotations

import array
import contextlib
import logging
import math
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from ctypes import c_uint64
from typing import Any, Protocol

from tender_service.transports.frames import (
    HEADER_SIZE,
    HELLO_TIMEOUT,
    MAX_FRAME,
    ChannelClosed,
    Frame,
    Hello,
    ProtocolError,
    TransportKind,
    decode_header,
    encode_header,
    read_hello,
    write_hello,
)
from tender_service.transports.shm_segment import ShmExhausted, make_segment

log = logging.getLogger(__name__)

MIN_RING_SIZE = 2 * MAX_FRAME
#: the least that holds two maximal frames, in whole pages (2 MiB + 4 KiB); a segment's
#: pages are not reserved: a channel costs the pages its traffic has touched
DEFAULT_RING_SIZE = (MIN_RING_SIZE + 4095) & ~4095
MAX_RING_SIZE = 64 << 20

_RECV_CHUNK = 256 << 10  # TcpChannel reads up to this much per syscall
_COALESCE = 16 << 10  # payloads up to this size are copied behind the header: one send
_SEND_FLAGS = socket.MSG_NOSIGNAL

_SEGMENT = struct.Struct("<8sQ")  # magic, ring size
_SEGMENT_MAGIC = b"UFSHM001"
_CTL_BASE = 64
_CTL_STRIDE = 256  # per ring: head, tail, data_waiting, space_waiting, 64 bytes apart
_DATA_BASE = 4096
_DOORBELL = b"\x01"
#: fds one read takes at most (a read stops after a message that carries some: one)
_FDS_PER_READ = 4
_FD_SPACE = socket.CMSG_SPACE(_FDS_PER_READ * 4)
#: seconds a sender waits for room in the socket to pass an fd
FD_SEND_TIMEOUT = 10.0
_SHM_KEY = "_shm"


#: seconds a TCP peer may stay silent (no ACK, no keepalive answer) before its
#: channel is declared dead; a host that vanishes without a FIN or RST (power
#: lost, link down) is otherwise only noticed after Linux's ~15 minutes of
#: retransmissions
PEER_TIMEOUT = 60.0
MAX_PEER_TIMEOUT = 86400.0


def check_peer_timeout(seconds: float) -> float:
    """``seconds`` if it is a usable peer timeout, else ValueError (NaN included)."""
    if not 1.0 <= seconds <= MAX_PEER_TIMEOUT:
        raise ValueError(f"peer timeout {seconds!r} s outside 1..{MAX_PEER_TIMEOUT:g}")
    return seconds


def keep_alive(sock: socket.socket, silence: float = PEER_TIMEOUT) -> None:
    """Make a TCP socket fail with ETIMEDOUT once the peer is silent for ``silence`` s.

    Keepalive probes cover an idle connection, TCP_USER_TIMEOUT one with
    unacknowledged data; a silence shorter than that (a link flapping) is
    ridden out by TCP's retransmissions.  Unix sockets need neither: the
    kernel closes them when the peer process dies.
    """
    check_peer_timeout(silence)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, int(silence / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(silence * 1000))


class Channel(Protocol):
    """A duplex, message-framed, thread-safe connection to one peer."""

    kind: str
    bytes_sent: int
    bytes_received: int
    peer_hello: dict[str, Any]
    #: why this channel is tcp where shm was asked for ("": it is what was asked)
    fallback: str
    #: whether fds sent after the hello are kept for ``take_fd`` (see _ChannelBase)
    takes_fds: bool

    def send(self, frame: Frame, fd: int | None = None) -> None:
        """Queue one frame; frames from concurrent senders are never interleaved.
        ``fd`` (Unix sockets only) goes with it: the peer's ``take_fd``, called once
        its ``recv`` has the frame, has it (in the order sent)."""
        ...

    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame, None on timeout; ChannelClosed / ProtocolError otherwise."""
        ...

    def take_fd(self, timeout: float) -> int:
        """The next fd the peer sent (the initiator's side only: see ``takes_fds``);
        ChannelClosed if none comes in ``timeout`` seconds."""
        ...

    def close(self) -> None:
        """Idempotent; a blocked recv or send raises ChannelClosed."""
        ...


class _ChannelBase:
    """Counters, close state, and deferred release shared by both transports.

    The socket and any mapping are released only when no send/recv is inside
    them (``_users``), so close() from another thread never pulls memory or a
    file descriptor from under a running operation; it shuts the socket down,
    which wakes those operations promptly.
    """

    kind = ""

    #: each transport receives its own way (TcpChannel, ShmChannel define it)
    _recv_locked: Callable[[float | None], Frame | None]

    def __init__(self, sock: socket.socket, peer_hello: dict[str, Any]) -> None:
        sock.settimeout(None)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.peer_hello = peer_hello
        self.fallback = ""
        self.bytes_sent = 0
        self.bytes_received = 0
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._state = threading.Lock()
        self._users = 0
        self._closed = False
        self._released = False
        #: whether fds the peer sends after its hello are kept for ``take_fd`` (set by
        #: a VM whose supervisor will send pipe rings: reading them costs ~3 us more
        #: a read); otherwise none is taken, and the kernel closes any that comes (a
        #: supervisor never takes one from a VM).  Fds sent with the hello are kept
        #: on the initiator's side of a Unix socket whatever this says.
        self.takes_fds = False
        self._fds: deque[int] = deque()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):  # the peer may have gone already
            self._sock.shutdown(socket.SHUT_RDWR)
        self._wake_sleepers()
        self._release_if_idle()

    def __enter__(self) -> _ChannelBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Release in the right order (views before the mapping) even if the owner forgot.
        if not getattr(self, "_released", True):
            with contextlib.suppress(Exception):  # never raise from a finalizer
                self.close()

    def _enter(self) -> None:
        with self._state:
            if self._closed:
                raise ChannelClosed("channel closed")
            self._users += 1

    def _leave(self) -> None:
        with self._state:
            self._users -= 1
            release = self._closed and not self._users and not self._released
            if release:
                self._released = True
        if release:
            self._release()

    def _release_if_idle(self) -> None:
        with self._state:
            if not self._closed or self._users or self._released:
                return
            self._released = True
        self._release()

    def _release(self) -> None:
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    def _wake_sleepers(self) -> None:
        """Threads blocked on the socket wake from its shutdown; subclasses add others."""

    def _recv_into(self, buf: memoryview | bytearray) -> int:
        """One nonblocking read of the socket; fds that come with the bytes are kept
        (``takes_fds``).  BlockingIOError if there is nothing."""
        if not self.takes_fds:
            return self._sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        n, anc, flags, _ = self._sock.recvmsg_into(
            [buf], _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            log.warning(
                "channel: fds sent by the peer were lost (more than %d at once)", _FDS_PER_READ
            )
        return n

    def _send_fd(self, data: bytes, fd: int) -> int:
        """``sendmsg`` of ``data`` (at least a byte) with ``fd``; the bytes sent.  Waits
        up to ``FD_SEND_TIMEOUT`` for room: a peer that reads nothing has its channel
        closed (ChannelClosed) rather than the sender held."""
        if self._sock.family != socket.AF_UNIX:
            raise ValueError("an fd travels only over a Unix socket")
        # not socket.send_fds: Python 3.11's ignores its flags (MSG_DONTWAIT)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        deadline = time.monotonic() + FD_SEND_TIMEOUT
        while True:
            try:
                return self._sock.sendmsg([data], anc, socket.MSG_DONTWAIT | _SEND_FLAGS)
            except BlockingIOError:
                left = deadline - time.monotonic()
                room = select.poll()  # not select(): a tender has fds above 1024
                room.register(self._sock.fileno(), select.POLLOUT)
                if left <= 0 or not room.poll(_poll_ms(left)):
                    self.close()
                    raise ChannelClosed("the peer does not read its socket") from None

    def take_fd(self, timeout: float) -> int:
        """Default (TcpChannel): the fd came with the bytes of the frame before it."""
        if self._fds:
            return self._fds.popleft()
        raise ChannelClosed("no fd came with the frame")

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + max(0.0, timeout)

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame; None on timeout.  Each kind supplies ``_recv_locked``."""
        deadline = self._deadline(timeout)
        self._enter()
        try:
            if not self._lock_recv(deadline):
                return None
            try:
                return self._recv_locked(deadline)
            finally:
                self._recv_lock.release()
        finally:
            self._leave()

    def _lock_recv(self, deadline: float | None) -> bool:
        remaining = self._remaining(deadline)
        return self._recv_lock.acquire(timeout=-1 if remaining is None else remaining)


def _poll_ms(remaining: float | None) -> int:
    return -1 if remaining is None else math.ceil(remaining * 1000)


class TcpChannel(_ChannelBase):
    """Frames over a connected stream socket; reads in large chunks, keeps leftovers."""

    kind = "tcp"

    def __init__(self, sock: socket.socket, peer_hello: dict[str, Any] | None = None) -> None:
        super().__init__(sock, peer_hello or {})
        # Room for a whole maximal frame after compaction, plus one read chunk.
        self._rbuf = bytearray(MAX_FRAME + _RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self._eof = False
        self._error: OSError | None = None
        self._send_error: OSError | None = None  # sending failed: the stream out is gone
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def _release(self) -> None:
        # the receive buffer (over a MiB) goes with the socket, not with the object,
        # which whoever held the channel may keep for a long time
        with contextlib.suppress(BufferError):  # a slice still out: dropped with it
            self._rview.release()
        del self._rbuf, self._rview
        super()._release()

    def send(self, frame: Frame, fd: int | None = None) -> None:
        header = encode_header(frame)
        payload = frame.payload
        self._enter()
        try:
            with self._send_lock:
                if self._send_error is not None:
                    raise ChannelClosed(f"send failed: {self._send_error}")
                try:
                    if fd is not None:  # with the frame's first bytes
                        data = header + payload
                        sent = self._send_fd(data, fd)
                        if sent < len(data):
                            self._send_parts(memoryview(data)[sent:])
                    elif len(payload) <= _COALESCE:
                        self._sock.sendall(header + payload, _SEND_FLAGS)
                    else:
                        self._send_parts(memoryview(header), memoryview(payload))
                except OSError as e:
                    # A partial frame may be on the wire: nothing more goes out. The
                    # channel stays open for reading: what the peer sent before it went
                    # (its last frames, an exit) is still delivered, then its EOF.
                    self._send_error = e
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_WR)
                    raise ChannelClosed(f"send failed: {e}") from None
                self.bytes_sent += HEADER_SIZE + len(payload)
        finally:
            self._leave()

    def _send_parts(self, *parts: memoryview) -> None:
        """sendmsg until every byte of every part is out (no copy of the payload)."""
        pending = list(parts)
        while pending:
            sent = self._sock.sendmsg(pending, (), _SEND_FLAGS)
            while sent:
                if sent >= len(pending[0]):
                    sent -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][sent:]
                    sent = 0

    def _recv_locked(self, deadline: float | None) -> Frame | None:
        while True:
            if self._closed:
                raise ChannelClosed("channel closed")
            try:
                frame = self._take_frame()
            except ProtocolError:
                self.close()
                raise
            if frame is not None:
                return frame
            if self._eof:
                left = self._rend - self._rstart
                detail = f" in the middle of a frame ({left} bytes)" if left else ""
                if self._error is not None:
                    raise ChannelClosed(f"receive failed{detail}: {self._error}")
                raise ChannelClosed(f"peer closed the channel{detail}")
            if not self._poller.poll(_poll_ms(self._remaining(deadline))):
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            self._fill()

    def _take_frame(self) -> Frame | None:
        avail = self._rend - self._rstart
        if avail < HEADER_SIZE:
            return None
        typ, flags, req, pipe, arg, length = decode_header(self._rbuf, self._rstart)
        total = HEADER_SIZE + length
        if avail < total:
            if self._rstart + total > len(self._rbuf):
                self._compact()
            return None
        start = self._rstart + HEADER_SIZE
        payload = bytes(self._rview[start : start + length])
        self._rstart += total
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        self.bytes_received += total
        return Frame(typ, flags, req, pipe, arg, payload)

    def _compact(self) -> None:
        left = self._rend - self._rstart
        self._rview[:left] = self._rview[self._rstart : self._rend]
        self._rstart, self._rend = 0, left

    def _fill(self) -> None:
        if self._rend == len(self._rbuf):
            self._compact()
        try:
            n = self._recv_into(self._rview[self._rend :])
        except BlockingIOError:
            return
        except OSError as e:
            if self._closed:
                raise ChannelClosed("channel closed") from None
            self._error = e  # reset, timed out (keep_alive): the stream ends here
            n = 0
        if n == 0:
            self._eof = True
        self._rend += n


class _Fence:
    """A full memory barrier (see the module docstring); one per role lock holder."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def __call__(self) -> None:
        self._lock.release()
        self._lock.acquire()


class _Ring:
    """One direction of the segment: a byte ring with its four control words."""

    __slots__ = ("size", "data", "head", "tail", "data_waiting", "space_waiting")

    def __init__(self, buf: memoryview, index: int, size: int) -> None:
        ctl = _CTL_BASE + index * _CTL_STRIDE
        start = _DATA_BASE + index * size
        self.size = size
        self.data = buf[start : start + size]
        self.head = c_uint64.from_buffer(buf, ctl)
        self.tail = c_uint64.from_buffer(buf, ctl + 64)
        self.data_waiting = c_uint64.from_buffer(buf, ctl + 128)
        self.space_waiting = c_uint64.from_buffer(buf, ctl + 192)

    def put(self, pos: int, chunk: bytes | memoryview) -> None:
        """Copy chunk in at stream position pos, wrapping at the end of the ring."""
        off = pos % self.size
        n = len(chunk)
        first = min(n, self.size - off)
        self.data[off : off + first] = chunk[:first]
        if first < n:
            self.data[: n - first] = chunk[first:]

    def get(self, pos: int, n: int) -> bytes:
        off = pos % self.size
        end = off + n
        if end <= self.size:
            return bytes(self.data[off:end])
        return bytes(self.data[off:]) + bytes(self.data[: end - self.size])

    def release(self) -> None:
        """Drop every export of the mapping, even if a frame (say, in a kept
        traceback) still references this ring; later use raises AttributeError."""
        del self.head, self.tail, self.data_waiting, self.space_waiting
        self.data.release()
        del self.data


#: hello key of an answer that offers tcp instead of the shm asked for (the reason)
SHM_FALLBACK_KEY = "shm_fallback"


def segment_size(ring_size: int) -> int:
    """The bytes of a segment holding two rings of ``ring_size``; ValueError if that
    ring size is not one a channel may have."""
    if not MIN_RING_SIZE <= ring_size <= MAX_RING_SIZE:
        raise ValueError(f"ring size {ring_size} outside {MIN_RING_SIZE}..{MAX_RING_SIZE}")
    return _DATA_BASE + 2 * ring_size


class ShmChannel(_ChannelBase):
    """Frames through two rings in one shared-memory segment, doorbells over a socket."""

    kind = "shm"

    def __init__(
        self,
        sock: socket.socket,
        segment: mmap.mmap,
        creator: bool,
        ring_size: int,
        peer_hello: dict[str, Any],
        label: str,
    ) -> None:
        super().__init__(sock, peer_hello)
        self._segment = segment
        self.segment = label  # the same on both ends (memfd and its inode)
        self.ring_size = ring_size
        self._buf = memoryview(segment)
        self._tx = _Ring(self._buf, 0 if creator else 1, ring_size)
        self._rx = _Ring(self._buf, 1 if creator else 0, ring_size)
        self._tx_tail = self._tx.tail.value  # only we write it: no need to load it again
        self._rx_head = self._rx.head.value
        self._send_fence = _Fence()
        self._recv_fence = _Fence()
        self._cond = threading.Condition(threading.Lock())
        self._polling = False  # one thread at a time polls the doorbell socket
        self._followers = 0  # threads waiting for the poller (notify only if any)
        self._epoch = 0  # bumped after every poll (and on close)
        self._peer_gone = False
        self._bell_buf = bytearray(4096)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    # -- setup ---------------------------------------------------------------

    @classmethod
    def offer(
        cls, sock: socket.socket, hello: dict[str, Any], timeout: float | None = HELLO_TIMEOUT
    ) -> Channel:
        """The initiator: ask for shm, map the segment that comes with the answer (or
        go on over tcp if the answer says there is no memory for one).  Any other fds
        the answer carries are the channel's to ``take_fd``."""
        fds: list[int] = []
        try:
            if _SHM_KEY in hello:
                raise ValueError(f"hello key {_SHM_KEY!r} is reserved")
            write_hello(sock, "shm", hello)
            answer = read_hello(sock, timeout, fds)
            info = dict(answer.info)
            if answer.kind == "tcp" and isinstance(info.get(SHM_FALLBACK_KEY), str):
                tcp = TcpChannel(sock, info)
                tcp.fallback = info.pop(SHM_FALLBACK_KEY)
                tcp._fds.extend(fds)
                fds = []
                return tcp
            if answer.kind != "shm":
                raise ProtocolError(f"peer answered with transport {answer.kind}, expected shm")
            spec = info.pop(_SHM_KEY, None)
            ring_size = spec.get("ring_size") if isinstance(spec, dict) else None
            if type(ring_size) is not int or not fds:
                raise ProtocolError(f"shm answer without a segment ({len(fds)} fds, {spec!r})")
            size = segment_size(ring_size)
            if os.fstat(fds[0]).st_size != size:
                raise ProtocolError(f"the segment sent is not of {size} bytes")
            segment = mmap.mmap(fds[0], size)
            label = f"memfd:{os.fstat(fds[0]).st_ino}"
        except BaseException:
            sock.close()
            for fd in fds[1:]:
                os.close(fd)
            raise
        finally:
            for fd in fds[:1]:
                os.close(fd)
        rest = fds[1:]
        if _SEGMENT.unpack_from(segment, 0) != (_SEGMENT_MAGIC, ring_size):
            segment.close()
            sock.close()
            for fd in rest:
                os.close(fd)
            raise ProtocolError(f"{label} is not a channel segment of {ring_size}-byte rings")
        log.debug("shm channel %s mapped, %d-byte rings", label, ring_size)
        channel = cls(sock, segment, True, ring_size, info, label)
        channel._fds.extend(rest)
        return channel

    @classmethod
    def answer(
        cls,
        sock: socket.socket,
        offer: Hello,
        reply: dict[str, Any],
        ring_size: int = DEFAULT_RING_SIZE,
        fds: Sequence[int] = (),
    ) -> Channel:
        """The responder: make the segment, send it (and ``fds``) with our hello."""
        try:
            if _SHM_KEY in reply or SHM_FALLBACK_KEY in reply:
                raise ValueError(f"hello keys {_SHM_KEY!r}, {SHM_FALLBACK_KEY!r} are reserved")
            if sock.family != socket.AF_UNIX:  # the segment's fd cannot travel
                raise ProtocolError("an shm channel needs a Unix socket (a VM of this host)")
            size = segment_size(ring_size)
            fd = make_segment(size)
        except ShmExhausted as e:
            why = e.strerror or str(e)
            log.warning("shm channel: %s: the channel is tcp", why)
            return _answer_tcp(sock, offer, {**reply, SHM_FALLBACK_KEY: why}, why, fds)
        except BaseException:
            sock.close()
            raise
        segment = None
        try:
            segment = mmap.mmap(fd, size)
            label = f"memfd:{os.fstat(fd).st_ino}"
            _SEGMENT.pack_into(segment, 0, _SEGMENT_MAGIC, ring_size)
            channel = cls(sock, segment, False, ring_size, offer.info, label)
        except BaseException:
            if segment is not None:
                segment.close()
            os.close(fd)
            sock.close()
            raise
        try:
            write_hello(sock, "shm", {**reply, _SHM_KEY: {"ring_size": ring_size}}, [fd, *fds])
        except BaseException:
            channel.close()
            raise
        finally:
            os.close(fd)
        log.debug("shm channel %s offered, %d-byte rings", label, ring_size)
        return channel

    # -- data path -------------------------------------------------------------

    def send(self, frame: Frame, fd: int | None = None) -> None:
        header = encode_header(frame)
        payload = frame.payload
        need = HEADER_SIZE + len(payload)
        self._enter()
        try:
            with self._send_lock:
                self._send_locked(header, payload, need, fd is None)
                if fd is not None:  # the frame's doorbell, rung whatever: it carries fd
                    self._send_fd(_DOORBELL, fd)
        finally:
            self._leave()

    def take_fd(self, timeout: float) -> int:
        """The fd comes on the socket with the doorbell of its frame (one wake-up for
        both if the reader sleeps): whoever drains the doorbells next has it (this
        thread, if no other is polling); it may come just after the frame."""
        deadline = self._deadline(timeout)
        self._enter()
        try:
            while True:
                with self._cond:
                    if self._fds:
                        return self._fds.popleft()
                    epoch = self._epoch
                if self._closed or self._peer_gone:
                    raise ChannelClosed("channel closed before the fd came")
                if deadline is not None and time.monotonic() >= deadline:
                    raise ChannelClosed(f"no fd came in {timeout:g} s")
                self._sleep(deadline, epoch)
        finally:
            self._leave()

    def _send_locked(self, header: bytes, payload: bytes, need: int, bell: bool = True) -> None:
        """Put one frame into the ring (waiting for room); ring the doorbell if the
        peer sleeps and ``bell`` (else the caller rings it)."""
        ring, fence = self._tx, self._send_fence
        tail = self._tx_tail
        while True:
            if self._closed:
                raise ChannelClosed("channel closed")
            if self._peer_gone:
                raise ChannelClosed("peer closed the channel")
            if ring.size - (tail - ring.head.value) >= need:
                break
            ring.space_waiting.value = 1
            fence()
            epoch = self._epoch
            if ring.size - (tail - ring.head.value) < need:
                self._sleep(None, epoch)
            ring.space_waiting.value = 0
        fence()  # the head load above before our stores into the freed bytes
        if len(payload) <= _COALESCE:
            ring.put(tail, header + payload)
        else:
            ring.put(tail, header)
            ring.put(tail + HEADER_SIZE, memoryview(payload))
        fence()  # frame bytes before the tail that publishes them
        self._tx_tail = tail + need
        ring.tail.value = tail + need
        fence()  # tail store before the data_waiting load (Dekker)
        if bell and ring.data_waiting.value:
            self._ring_doorbell()
        self.bytes_sent += need
        if self._peer_gone:
            raise ChannelClosed("peer closed the channel")

    def _recv_locked(self, deadline: float | None) -> Frame | None:
        ring, fence = self._rx, self._recv_fence
        expired = False
        while True:
            if self._closed:
                raise ChannelClosed("channel closed")
            gone = self._peer_gone  # before the tail load: frames sent before EOF still count
            if ring.tail.value != self._rx_head:
                try:
                    return self._read_frame()
                except ProtocolError:
                    self.close()
                    raise
            if gone:
                raise ChannelClosed("peer closed the channel")
            if expired:
                return None
            ring.data_waiting.value = 1
            fence()
            epoch = self._epoch
            if ring.tail.value == self._rx_head:
                self._sleep(deadline, epoch)
            ring.data_waiting.value = 0
            expired = deadline is not None and time.monotonic() >= deadline

    def _read_frame(self) -> Frame:
        ring, fence = self._rx, self._recv_fence
        head = self._rx_head
        avail = ring.tail.value - head
        fence()  # the tail load before the loads of the bytes it publishes
        if not HEADER_SIZE <= avail <= ring.size:
            raise ProtocolError(f"shm ring holds {avail} bytes: not whole frames")
        typ, flags, req, pipe, arg, length = decode_header(ring.get(head, HEADER_SIZE))
        total = HEADER_SIZE + length
        if total > avail:
            raise ProtocolError(f"frame of {total} bytes but only {avail} published")
        payload = ring.get(head + HEADER_SIZE, length) if length else b""
        fence()  # our loads of the frame before the head store that frees it
        self._rx_head = head + total
        ring.head.value = head + total
        fence()  # head store before the space_waiting load (Dekker)
        if ring.space_waiting.value:
            self._ring_doorbell()
        self.bytes_received += total
        return Frame(typ, flags, req, pipe, arg, payload)

    # -- doorbells ---------------------------------------------------------------

    def _ring_doorbell(self) -> None:
        try:
            self._sock.send(_DOORBELL, socket.MSG_DONTWAIT | _SEND_FLAGS)
        except BlockingIOError:
            pass  # the socket is full of unread doorbells: the peer will wake anyway
        except OSError as e:
            log.debug("shm channel %s: doorbell failed: %s", self.segment, e)
            self._peer_gone = True

    def _sleep(self, deadline: float | None, epoch: int) -> None:
        """Wait for a doorbell, EOF, close or the deadline; callers then re-check."""
        remaining = self._remaining(deadline)
        with self._cond:
            if self._epoch != epoch or self._closed or self._peer_gone:
                return  # a doorbell was drained since the caller's re-check
            if self._polling:
                self._followers += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._followers -= 1
                return
            self._polling = True
        try:
            if self._poller.poll(_poll_ms(remaining)):
                self._drain_doorbells()
        finally:
            with self._cond:
                self._polling = False
                self._epoch += 1
                if self._followers:
                    self._cond.notify_all()

    def _drain_doorbells(self) -> None:
        """Swallow pending doorbell bytes (keeping the fds some carry); a short read
        means there are no more (or a byte carrying an fd, where a read stops: it is
        still there, so the next poll returns at once)."""
        while True:
            try:
                n = self._recv_into(self._bell_buf)
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("shm channel %s: doorbell socket: %s", self.segment, e)
                n = 0
            if n == 0:
                self._peer_gone = True
                return
            if n < len(self._bell_buf):
                return  # a byte left with an fd (a read stops there) wakes us again

    def _wake_sleepers(self) -> None:
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def _release(self) -> None:
        # The ctypes words and the ring views export the mapping's buffer:
        # drop them before closing it.
        for ring in (getattr(self, "_tx", None), getattr(self, "_rx", None)):
            if ring is not None and hasattr(ring, "data"):
                ring.release()
        try:
            self._buf.release()
            self._segment.close()
        except BufferError as e:
            log.warning("shm channel %s: mapping still in use at close: %s", self.segment, e)
        super()._release()


def _answer_tcp(
    sock: socket.socket,
    offer: Hello,
    reply: dict[str, Any],
    fallback: str = "",
    fds: Sequence[int] = (),
) -> TcpChannel:
    """Answer with a tcp hello (carrying ``fds``): frames then go over the socket."""
    try:
        write_hello(sock, "tcp", reply, fds)
    except BaseException:
        sock.close()
        raise
    channel = TcpChannel(sock, offer.info)
    channel.fallback = fallback
    return channel


def _answer(
    sock: socket.socket,
    hello: Hello,
    reply: dict[str, Any],
    ring_size: int = DEFAULT_RING_SIZE,
    fds: Sequence[int] = (),
) -> Channel:
    """Answer an initiator's hello with ours (``fds`` with it: a Unix socket only);
    the socket is closed if that fails."""
    if fds and sock.family != socket.AF_UNIX:
        fds = ()  # nothing can carry them: the peer, on another host, has no use for them
    if hello.kind == "shm":
        return ShmChannel.answer(sock, hello, reply, ring_size, fds)
    return _answer_tcp(sock, hello, reply, fds=fds)


def connect_channel(
    kind: str,
    sock: socket.socket,
    creator: bool,
    hello: dict[str, Any],
    *,
    ring_size: int = DEFAULT_RING_SIZE,
    timeout: float | None = HELLO_TIMEOUT,
) -> Channel:
    """Open a channel of ``kind`` over a connected socket.

    ``creator`` is the initiating side (a worker): it sends ``hello`` first.  The
    other side reads that hello, checks the kind, and answers with ``hello`` (for
    shm, with a segment of ``ring_size`` rings: the socket must be a Unix socket).
    Either way the peer's JSON ends up in ``channel.peer_hello``.
    """
    kind = TransportKind.parse(kind).label
    if creator:
        channel: Channel
        if kind == "shm":
            channel = ShmChannel.offer(sock, hello, timeout)
        else:
            fds: list[int] = []
            try:
                write_hello(sock, "tcp", hello)
                ack = read_hello(sock, timeout, fds if sock.family == socket.AF_UNIX else None)
                if ack.kind != "tcp":
                    raise ProtocolError(f"peer answered with transport {ack.kind}, expected tcp")
            except BaseException:
                sock.close()
                for fd in fds:
                    os.close(fd)
                raise
            channel = TcpChannel(sock, ack.info)
            channel._fds.extend(fds)
        return channel
    try:
        offer = read_hello(sock, timeout)
        if offer.kind != kind:
            raise ProtocolError(f"peer offered transport {offer.kind}, expected {kind}")
    except BaseException:
        sock.close()
        raise
    return _answer(sock, offer, hello, ring_size)


def accept_channel(
    sock: socket.socket,
    reply: dict[str, Any] | None = None,
    *,
    timeout: float | None = HELLO_TIMEOUT,
    admit: Callable[[dict[str, Any]], bool] | None = None,
    ring_size: int = DEFAULT_RING_SIZE,
    fds: Sequence[int] = (),
) -> tuple[Channel, dict[str, Any]]:
    """Answer whichever kind the initiator offers; returns the channel and its hello JSON.

    ``admit`` sees the initiator's JSON first: when it says no, the socket is closed
    without an answer (and no segment is made for it).  An shm channel's rings are
    of ``ring_size`` bytes.  ``fds`` go with the answer over a Unix socket (the
    initiator's ``take_fd`` has them, in order; the caller still owns them); they
    are read after ``admit``, which may add to them.
    """
    try:
        offer = read_hello(sock, timeout)
        if admit is not None and not admit(offer.info):
            raise ProtocolError("hello refused (not a member of this instance)")
    except BaseException:
        sock.close()
        raise
    channel = _answer(sock, offer, reply or {}, ring_size, fds)
    return channel, channel.peer_hello

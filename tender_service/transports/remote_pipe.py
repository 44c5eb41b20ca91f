"""Pipe ends whose pipe lives in the instance supervisor's broker (VM-clone mode).

A read or write becomes a request to the broker; the calling thread blocks
(the syscall is parked and restarted, as for any blocking call) until the
reply arrives, which may take a while: the broker answers a read only when
there is data or the last writer anywhere has closed.  Semantics are those
of a local pipe (tender_service/rump/pipe.py); the broker enforces them.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.files import O_RDONLY, O_WRONLY, POLLERR, S_IFIFO, File
from tender_service.rump.outcomes import Block
from tender_service.rump.pipe import PIPE_BUF, PIPE_CAPACITY
from tender_service.transports.pipe_ring import WAIT, Waiter
from tender_service.transports.protocol import (
    END_READ,
    END_WRITE,
    FILES,
    MAX_PIPE_CHUNK,
    Msg,
    pack_files,
    unpack_files,
)

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp
    from tender_service.transports.vmlink import VmLink


class RemotePipeEnd(File):
    kind = "pipe"
    mode = S_IFIFO

    def __init__(
        self, link: VmLink, pipe: int, write_end: bool, flags: int, ring: str = ""
    ) -> None:
        super().__init__((flags & ~3) | (O_WRONLY if write_end else O_RDONLY))
        self.link, self.pipe, self.write_end = link, pipe, write_end
        #: a ring pipe's segment (transports/pipe_ring.py: ``VmLink.ring`` maps it) is
        #: read and written here directly; "" for a pipe whose bytes the broker holds
        self.ring = ring
        #: a write with no reader left raises SIGPIPE (a socket's MSG_NOSIGNAL clears it)
        self.sigpipe = True
        self._spin = SpinPolicy()
        self._last_mask = -1
        self._gen = 0

    def describe(self) -> str:
        return f"remote pipe:{self.pipe}:{'w' if self.write_end else 'r'}"

    @property
    def pollable(self) -> bool:
        return True

    @property
    def poll_rechecks(self) -> bool:
        return False  # its change wakes the VMs that polled it (below)

    def poll(self, k: Kernel) -> int:
        """Ask the ring, or the broker (a synchronous call).  A thread in poll, select
        or epoll_wait is woken by the pipe's next change: it is one of the ring's
        waiters, or the broker sends this VM a POLL_WAKE."""
        lwp = k.current
        try:
            if self.ring:
                waiter = None if lwp is None else self.link.poll_waiter(lwp, self.pipe)
                mask = self.link.ring(self.pipe).poll(self.write_end, waiter)
            else:
                mask = self.link.call(
                    "pipe_poll", self.pipe, int(self.write_end), int(lwp is not None)
                )
        except GuestError:
            mask = -1
        if mask < 0:
            return POLLERR
        if mask != self._last_mask:
            self._last_mask = mask
            self._gen += 1
        return mask

    def poll_gen(self) -> int:
        """Edge-triggered epoll: a change of the ready events seen by poll (the
        broker's state between two polls is not seen)."""
        return self._gen

    def snapshot_state(self) -> dict:
        state = {
            "kind": "rpipe",
            "pipe": self.pipe,
            "end": "w" if self.write_end else "r",
            "flags": self.flags,
        }
        if self.ring:
            state["ring"] = self.ring
        return state

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        return self._read(k, lwp, [(addr, n)], "read")

    def readv(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]]) -> int:
        return self._read(k, lwp, vecs, "readv")

    def _read(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]], what: str) -> int:
        """``_read_files`` for a plain read: files the bytes carry are closed."""
        done, states = self._read_files(k, lwp, vecs, what)
        if states:
            self.link.drop_states(k, states)
        return done

    def _read_files(
        self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]], what: str
    ) -> tuple[int, list[dict] | None]:
        """One broker read for all the buffers, scattered on return; with the states
        of the files the bytes carry (a socket's SCM_RIGHTS), whose refs are this VM's.

        Not one read per iovec: a second request sent once the first iovec
        was filled could not be taken back, and its reply (the pipe's next
        bytes) would be lost or taken by this process's next pipe syscall.
        The broker is told how much the buffers can take when guest memory
        ends first: bytes it hands over are gone from the pipe, so it fails
        such a read with EFAULT and keeps them, as Linux's pipe_read does.
        """
        if self.write_end:
            raise GuestError(errno.EBADF)
        vecs = [(base, length) for base, length in vecs if length]
        if not vecs:
            return 0, None
        if self.ring:
            return self._ring_read(k, lwp, vecs, what), None
        reply = self.link.take_reply(lwp)
        if reply is None and self.link.in_flight(lwp):  # restarted after a signal handler
            raise Block(self.link.wq, f"{what} {self.describe()}")
        if reply is None:
            want = min(sum(length for _, length in vecs), MAX_PIPE_CHUNK)
            room = k.mem.room(vecs, want)
            if not room:
                raise GuestError(errno.EFAULT)
            self.link.request(
                lwp,
                Msg.PIPE_READ,
                self.pipe,
                arg=want,
                payload=room.to_bytes(8, "little") if room < want else b"",
                nonblock=self.nonblocking,
            )
            raise Block(self.link.wq, f"{what} {self.describe()}")
        arg, data, flags = reply
        if arg < 0:
            raise GuestError(-arg)
        states = None
        if flags & FILES:
            states, data = unpack_files(data)
        return _scatter(k, vecs, data), states

    def _ring_read(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]], what: str) -> int:
        """A read of the ring: what is there (up to what the buffers take), EOF once
        it is empty with no writer left, or a wait (the ring wakes this VM)."""
        want = min(sum(length for _, length in vecs), PIPE_CAPACITY)
        room = k.mem.room(vecs, want)
        if not room:
            raise GuestError(errno.EFAULT)
        ring, waiter = self.link.ring(self.pipe), self._waiter(lwp)
        if len(vecs) == 1:  # straight into guest memory
            into = k.mem.slice(vecs[0][0], room)
            out = self._spin.spin(partial(ring.read, want, room, waiter, into))
        else:
            out = self._spin.spin(partial(ring.read, want, room, waiter))
        if out is WAIT:
            raise Block(k.ring_wq, f"{what} {self.describe()}")
        if isinstance(out, int):
            if out < 0:
                raise GuestError(-out)
            return out
        assert isinstance(out, bytes)
        return _scatter(k, vecs, out)

    def _ring_write(self, k: Kernel, lwp: Lwp, n: int, chunk) -> int:
        """A write into the ring: at most PIPE_BUF bytes at once or not yet, more in
        what fits, waiting for room for the rest (``lwp.progress`` counts what went)."""
        ring = self.link.ring(self.pipe)
        waiter = self._waiter(lwp)
        while lwp.progress < n:
            data = chunk(lwp.progress, min(n - lwp.progress, PIPE_CAPACITY))
            out = self._spin.spin(partial(ring.write, data, n <= PIPE_BUF, waiter))
            if out is WAIT:
                raise Block(k.ring_wq, f"write {self.describe()}")
            assert isinstance(out, int)
            if out < 0:
                if out == -errno.EPIPE and self.sigpipe:
                    k.post_signal(lwp.proc, signals.SIGPIPE)
                done, lwp.progress = lwp.progress, 0
                if done:
                    return done
                raise GuestError(-out)
            lwp.progress += out
        done, lwp.progress = lwp.progress, 0
        k.pipe_bytes += done
        return done

    def _waiter(self, lwp: Lwp) -> Waiter | None:
        """Who waits if the ring cannot serve now (None: a nonblocking end, EAGAIN)."""
        return None if self.nonblocking else self.link.waiter(lwp, self.pipe)

    def write(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        if not self.write_end:
            raise GuestError(errno.EBADF)
        k.mem.offset(addr, n)
        if self.ring:  # straight from guest memory
            return self._ring_write(k, lwp, n, lambda off, size: k.mem.slice(addr + off, size))
        return self._write(k, lwp, n, lambda off, size: k.mem.read(addr + off, size))

    def write_bytes(self, k: Kernel, lwp: Lwp, data: bytes) -> int:
        if not self.write_end:
            raise GuestError(errno.EBADF)
        return self._write(k, lwp, len(data), lambda off, size: data[off : off + size])

    def _write(self, k: Kernel, lwp: Lwp, n: int, chunk, states: list[dict] | None = None) -> int:
        """Send the write in chunks; ``lwp.progress`` counts what the broker took.
        ``states``: files (SCM_RIGHTS) that go with the first chunk."""
        if self.ring and not states:
            return self._ring_write(k, lwp, n, chunk)
        reply = self.link.take_reply(lwp)
        if reply is not None:
            arg, _, flags = reply
            if flags and self.sigpipe:  # the last reader is gone
                k.post_signal(lwp.proc, signals.SIGPIPE)
            if arg < 0:
                done, lwp.progress = lwp.progress, 0
                if done:
                    return done
                raise GuestError(-arg)
            lwp.progress += arg
            if lwp.progress >= n or self.nonblocking or flags:
                done, lwp.progress = lwp.progress, 0
                return done
        elif self.link.in_flight(lwp):  # restarted after a signal handler
            raise Block(self.link.wq, f"write {self.describe()}")
        if n == 0:
            return 0
        size = min(n - lwp.progress, MAX_PIPE_CHUNK)
        data = chunk(lwp.progress, size)
        attach = bool(states) and not lwp.progress
        self.link.request(
            lwp,
            Msg.PIPE_WRITE,
            self.pipe,
            payload=pack_files(states or [], data) if attach else data,
            nonblock=self.nonblocking,
            flags=FILES if attach else 0,
        )
        raise Block(self.link.wq, f"write {self.describe()}")

    def release(self, k: Kernel) -> None:
        end = END_WRITE if self.write_end else END_READ
        if self.ring:
            # answered once the ring's counts say so: the bytes this VM writes next
            # (a "go" to the last writer, say) pass no supervisor and must not overtake
            # the close (sigpipe: the writer must find no reader)
            self.link.close_ring_end(self.pipe, end)
        else:
            self.link.send_close(self.pipe, end)


#: the longest a ring read or write that must wait tries again before its thread
#: parks: the other VM runs on another CPU, mostly microseconds from giving it data or
#: room, where parking and waking (the FIFO, the run loop, the syscall's restart) cost
#: ~100 us a block (pipe_bw over shm: ~420 MiB/s parking at once, 1.1-2.0 GiB/s with it)
RING_SPIN = 50e-6 if (os.cpu_count() or 1) > 1 else 0.0
#: a wait that ends this soon after its thread parked would have ended in a longer spin
SHORT_WAIT = 4 * RING_SPIN


@dataclass
class SpinPolicy:
    """How long the waits of one ring end spin, learnt from how long they last (as an
    adaptive mutex does).  A wait that ended soon after its thread parked would have
    been caught by spinning: the next spins are twice as long, up to ``RING_SPIN``.
    One that lasted long (a token ring's turn, a shell at its prompt) spun for
    nothing, burning a CPU the other VMs could use: the next spins are half as long,
    down to none (and a short wait makes them grow again)."""

    budget: float = RING_SPIN
    parked_at: float = 0.0

    def resumed(self, now: float) -> None:
        """A call on the end: if its thread had parked, learn from how long it waited."""
        if not self.parked_at:
            return
        waited, self.parked_at = now - self.parked_at, 0.0
        if waited <= SHORT_WAIT:
            self.budget = min(RING_SPIN, self.budget * 2 + 5e-6)
        else:
            self.budget = self.budget / 2 if self.budget > 2e-6 else 0.0

    def spin(self, op: Callable[[], object]) -> object:
        """``op`` until it need not wait or the budget has passed (each try takes the
        ring's lock: the other VM gets it in between); a last ``WAIT`` parks."""
        if self.parked_at:  # the clock is read only around waits: not on every call
            self.resumed(time.perf_counter())
        out = op()
        if out is WAIT:
            end = time.perf_counter() + self.budget
            while out is WAIT and time.perf_counter() < end:
                out = op()
            if out is WAIT:
                self.parked_at = time.perf_counter()
        return out


def _scatter(k: Kernel, vecs: list[tuple[int, int]], data: bytes) -> int:
    """Copy ``data`` into the buffers in order; it all fits (the broker or the ring
    gave at most the room they take)."""
    done = 0
    for base, length in vecs:
        if done == len(data):
            break
        chunk = data[done : done + length]
        k.mem.write(base, chunk)
        done += len(chunk)
    return done

"""In-VM pipes with Linux semantics.

64 KiB capacity; a write of at most PIPE_BUF bytes is atomic (all or wait);
a larger blocking write transfers what fits and waits for the rest, returning
only when all is written (the restarted syscall resumes from ``lwp.progress``);
reads return what is there, wait while writers remain, see EOF (0) once the
last writer has gone; a write with no reader left gets EPIPE and raises
SIGPIPE in the writer.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.files import (
    FIONREAD,
    O_RDONLY,
    O_WRONLY,
    POLLERR,
    POLLHUP,
    READABLE,
    S_IFIFO,
    WRITABLE,
    File,
)
from tender_service.rump.outcomes import Block

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

PIPE_BUF = 4096
PIPE_CAPACITY = 65536


class Pipe:
    _ids = 0

    def __init__(self) -> None:
        Pipe._ids += 1
        self.id = Pipe._ids
        self.buf = bytearray()
        self.readers = 0
        self.writers = 0
        self.readable_wq = WaitQueue(f"pipe:{self.id}:read")
        self.writable_wq = WaitQueue(f"pipe:{self.id}:write")
        self.bytes_through = 0
        #: readiness counters for edge-triggered epoll: data or EOF for readers,
        #: room or a gone reader for writers
        self.in_gen = 0
        self.out_gen = 0
        #: set once the pipe moved into the supervisor's broker (VM-clone fork), with
        #: the name of its ring if the broker made one ("" if it holds the bytes itself)
        self.broker_id: int | None = None
        self.ring = ""


class PipeEnd(File):
    kind = "pipe"
    mode = S_IFIFO

    def __init__(self, pipe: Pipe, write_end: bool, flags: int) -> None:
        super().__init__((flags & ~3) | (O_WRONLY if write_end else O_RDONLY))
        self.pipe = pipe
        self.write_end = write_end
        if write_end:
            pipe.writers += 1
        else:
            pipe.readers += 1

    def describe(self) -> str:
        return f"pipe:{self.pipe.id}:{'w' if self.write_end else 'r'}"

    @property
    def pollable(self) -> bool:
        return True

    def poll(self, k: Kernel) -> int:
        """Linux's pipe_poll."""
        p = self.pipe
        if self.write_end:
            mask = WRITABLE if len(p.buf) < PIPE_CAPACITY else 0
            return mask | (POLLERR if p.readers == 0 else 0)
        mask = READABLE if p.buf else 0
        return mask | (POLLHUP if p.writers == 0 else 0)

    def poll_gen(self) -> int:
        return self.pipe.out_gen if self.write_end else self.pipe.in_gen

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        return self.readv(k, lwp, [(addr, n)])

    def readv(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]]) -> int:
        """One pipe read over all the buffers, as Linux's pipe_read: bytes that would
        run past guest memory make it fail with EFAULT, taking nothing."""
        if self.write_end:
            raise GuestError(errno.EBADF)
        p = self.pipe
        vecs = [(base, length) for base, length in vecs if length]
        if not vecs:
            return 0
        if not p.buf:
            if p.writers == 0:
                return 0
            if self.nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(p.readable_wq, f"read {self.describe()}")
        if len(vecs) == 1:  # read(), the hot path: one region lookup, EFAULT before a take
            base, length = vecs[0]
            take = min(length, len(p.buf))
            k.mem.write(base, memoryview(p.buf)[:take])
        else:
            take = min(sum(length for _, length in vecs), len(p.buf))
            if k.mem.room(vecs, take) < take:
                raise GuestError(errno.EFAULT)
            done = 0
            for base, length in vecs:
                if done == take:
                    break
                part = min(length, take - done)
                k.mem.write(base, memoryview(p.buf)[done : done + part])
                done += part
        del p.buf[:take]
        p.out_gen += 1
        if p.writable_wq.waiters:
            k.sched.wake_all(p.writable_wq)
        k.poll_wake()
        return take

    def write(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        if not self.write_end:
            raise GuestError(errno.EBADF)
        k.mem.offset(addr, n)  # EFAULT before anything moves
        return self._write(k, lwp, addr, n, None)

    def write_bytes(self, k: Kernel, lwp: Lwp, data: bytes) -> int:
        if not self.write_end:
            raise GuestError(errno.EBADF)
        return self._write(k, lwp, 0, len(data), data)

    def _write(self, k: Kernel, lwp: Lwp, addr: int, n: int, data: bytes | None) -> int:
        p = self.pipe
        done = lwp.progress
        if p.readers == 0:
            k.post_signal(lwp.proc, signals.SIGPIPE)
            lwp.progress = 0
            if done:
                return done
            raise GuestError(errno.EPIPE)
        room = PIPE_CAPACITY - len(p.buf)
        left = n - done
        if left <= 0:
            lwp.progress = 0
            return n
        if (n <= PIPE_BUF and room < left) or room == 0:
            if self.nonblocking:
                lwp.progress = 0
                if done:
                    return done
                raise GuestError(errno.EAGAIN)
            raise Block(p.writable_wq, f"write {self.describe()}")
        take = min(room, left)
        if data is None:
            p.buf += k.mem.slice(addr + done, take)
        else:
            p.buf += data[done : done + take]
        p.bytes_through += take
        k.pipe_bytes += take
        p.in_gen += 1
        if p.readable_wq.waiters:
            k.sched.wake_all(p.readable_wq)
        k.poll_wake()
        done += take
        if done < n and not self.nonblocking:
            lwp.progress = done
            raise Block(p.writable_wq, f"write {self.describe()}")
        lwp.progress = 0
        return done

    def ioctl(self, k: Kernel, lwp: Lwp, req: int, arg: int) -> int:
        if req == FIONREAD:
            k.mem.write_u32(arg, len(self.pipe.buf))
            return 0
        raise GuestError(errno.ENOTTY)

    def release(self, k: Kernel) -> None:
        p = self.pipe
        if self.write_end:
            p.writers -= 1
            if p.writers == 0:
                p.in_gen += 1
                k.sched.wake_all(p.readable_wq)
        else:
            p.readers -= 1
            if p.readers == 0:
                p.buf.clear()
                p.out_gen += 1
                k.sched.wake_all(p.writable_wq)
        k.poll_wake()


def make_pipe(flags: int) -> tuple[PipeEnd, PipeEnd]:
    p = Pipe()
    return PipeEnd(p, False, flags), PipeEnd(p, True, flags)

"""Readiness objects: eventfd counters and epoll instances.

poll/select/epoll ask each file for its ready events (``File.poll``) and, if
nothing is ready, sleep on the kernel's poll queue, which every change of a
pipe, socket or eventfd wakes (``Kernel.poll_wake``): broad wake-ups, the
sleepers re-check.  Edge-triggered epoll reports a file again only once its
``poll_gen`` counter moved (new data, new room, a hang-up), which is when
Linux's wake-up callback would queue it again.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError
from tender_service.rump.files import O_NONBLOCK, O_RDWR, POLLERR, POLLHUP, READABLE, WRITABLE, File
from tender_service.rump.outcomes import Block

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

EFD_SEMAPHORE = 1
EVENTFD_MAX = (1 << 64) - 2
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
EPOLL_FLAGS = EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET


class EventFd(File):
    """eventfd2: a 64-bit counter; read takes it (or 1 with EFD_SEMAPHORE)."""

    kind = "eventfd"

    def __init__(self, value: int, flags: int) -> None:
        super().__init__(O_RDWR | (flags & O_NONBLOCK))
        self.value = value
        self.semaphore = bool(flags & EFD_SEMAPHORE)
        self.wq = WaitQueue("eventfd")
        self.gen = 0

    @property
    def pollable(self) -> bool:
        return True

    def poll(self, k: Kernel) -> int:
        return (READABLE if self.value else 0) | (WRITABLE if self.value < EVENTFD_MAX else 0)

    def poll_gen(self) -> int:
        return self.gen

    def snapshot_state(self) -> dict:
        return {"kind": "unshared", "what": "eventfd", "stype": 0, "flags": self.flags}

    def _changed(self, k: Kernel) -> None:
        self.gen += 1
        k.sched.wake_all(self.wq)
        k.poll_wake()

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        if n < 8:
            raise GuestError(errno.EINVAL)
        k.mem.offset(addr, 8)
        if not self.value:
            if self.nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(self.wq, "read eventfd")
        got = 1 if self.semaphore else self.value
        self.value -= got
        k.mem.write_u64(addr, got)
        self._changed(k)
        return 8

    def readv(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]]) -> int:
        vecs = [v for v in vecs if v[1]]
        return self.read(k, lwp, vecs[0][0], vecs[0][1]) if vecs else self.read(k, lwp, 0, 0)

    def write(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        if n < 8:
            raise GuestError(errno.EINVAL)
        return self._add(k, k.mem.read_u64(addr))

    def write_bytes(self, k: Kernel, lwp: Lwp, data: bytes) -> int:
        if len(data) < 8:
            raise GuestError(errno.EINVAL)
        return self._add(k, int.from_bytes(data[:8], "little"))

    def _add(self, k: Kernel, v: int) -> int:
        if v == (1 << 64) - 1:
            raise GuestError(errno.EINVAL)
        if self.value + v > EVENTFD_MAX:
            if self.nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(self.wq, "write eventfd")
        if v:
            self.value += v
            self._changed(k)
        return 8


@dataclass(eq=False, slots=True)
class EpollItem:
    fd: int
    file: File
    events: int
    data: int
    seen_gen: int = -1  # the file's poll_gen when last reported (edge-triggered)
    disabled: bool = False  # EPOLLONESHOT fired


class Epoll(File):
    """An epoll instance: the interest list; a closed file leaves it, as Linux."""

    kind = "eventpoll"

    def __init__(self, flags: int = 0) -> None:
        super().__init__(O_RDWR)
        self.items: dict[tuple[int, int], EpollItem] = {}

    def describe(self) -> str:
        return "anon_inode:[eventpoll]"

    def snapshot_state(self) -> dict:
        return {"kind": "unshared", "what": "epoll", "stype": 0, "flags": self.flags}

    @property
    def pollable(self) -> bool:
        return True

    def _live(self) -> list[EpollItem]:
        for key in [key for key, it in self.items.items() if it.file.refs <= 0]:
            del self.items[key]  # its file was closed everywhere
        return list(self.items.values())

    def poll(self, k: Kernel) -> int:
        return READABLE if self.ready(k, 1, peek=True) else 0

    def ctl_add(self, fd: int, f: File, events: int, data: int) -> None:
        key = (fd, id(f))
        self._live()
        if key in self.items:
            raise GuestError(errno.EEXIST)
        self.items[key] = EpollItem(fd, f, events, data)

    def ctl_mod(self, fd: int, f: File, events: int, data: int) -> None:
        it = self.items.get((fd, id(f)))
        if it is None or it.file.refs <= 0:
            raise GuestError(errno.ENOENT)
        if it.events & EPOLLEXCLUSIVE:
            raise GuestError(errno.EINVAL)
        it.events, it.data, it.seen_gen, it.disabled = events, data, -1, False

    def ctl_del(self, fd: int, f: File) -> None:
        if self.items.pop((fd, id(f)), None) is None:
            raise GuestError(errno.ENOENT)

    def replace_files(self, new: dict[int, File]) -> None:
        """VM-clone fork: files of this VM became their cross-VM versions (keyed by the
        id() of the old ones); the interest list follows them."""
        items, self.items = self.items, {}
        for it in items.values():
            if id(it.file) in new:
                it.file, it.seen_gen = new[id(it.file)], -1
            self.items[(it.fd, id(it.file))] = it

    def ready(self, k: Kernel, limit: int, peek: bool = False) -> list[tuple[int, int]]:
        """Up to ``limit`` (events, data) ready now; edge and one-shot state advance
        unless ``peek``."""
        out: list[tuple[int, int]] = []
        for it in self._live():
            if len(out) >= limit:
                break
            if it.disabled:
                continue
            mask = it.file.poll(k) & (it.events | POLLERR | POLLHUP)
            if not mask:
                continue
            if it.events & EPOLLET:
                gen = it.file.poll_gen()
                if gen == it.seen_gen:
                    continue
                if not peek:
                    it.seen_gen = gen
            if not peek and it.events & EPOLLONESHOT:
                it.disabled = True
            out.append((mask, it.data))
        return out

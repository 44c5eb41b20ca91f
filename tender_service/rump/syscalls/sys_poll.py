"""Readiness: poll/ppoll, select/pselect6, epoll_*, eventfd.

Each asks the files (``File.poll``) and, with nothing ready and time left,
parks on the kernel's poll queue with the deadline as a timer; the woken
syscall restarts and asks again (``lwp.deadline`` keeps the deadline across
restarts).  A signal interrupts the wait: EINTR, never restarted (sigframe's
NO_RESTART), as Linux.  ppoll/pselect6/epoll_pwait swap the signal mask for
the wait as sigsuspend does.
"""

from __future__ import annotations

import contextlib
import errno
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.files import (
    O_CLOEXEC,
    O_NONBLOCK,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    POLLPRI,
    POLLRDNORM,
    POLLWRNORM,
    ConsoleFile,
    File,
)
from tender_service.rump.outcomes import Block
from tender_service.rump.poll import EFD_SEMAPHORE, EPOLL_FLAGS, EPOLLEXCLUSIVE, Epoll, EventFd
from tender_service.rump.signals import UNBLOCKABLE
from tender_service.rump.syscalls.abi import TIMESPEC, i32, read_timespec

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

POLLFD = struct.Struct("<ihh")
TIMEVAL = struct.Struct("<qq")
EPOLL_EVENT = struct.Struct("<IQ")  # packed on x86-64
EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
FD_SETSIZE = 1024
NOFILE = 1024
#: a console fd 0 fed by a host fd: nothing wakes the poll queue when it has input,
#: so a wait that includes it re-checks this often
HOST_RECHECK = 0.02
SELECT_IN = POLLIN | POLLRDNORM | POLLHUP | POLLERR
SELECT_OUT = POLLOUT | POLLWRNORM | POLLERR
SELECT_EX = POLLPRI


# -- the wait shared by every call -------------------------------------------------------
def _deadline(lwp: Lwp, seconds: float | None) -> float | None:
    """The absolute deadline of this call (kept across restarts); None: no limit."""
    if seconds is None:
        return None
    if not lwp.deadline:
        lwp.deadline = time.monotonic() + seconds if seconds > 0 else -1.0
    return lwp.deadline


def _finish(lwp: Lwp) -> None:
    lwp.deadline = 0.0
    if lwp.saved_sigmask is not None:
        lwp.sigmask, lwp.saved_sigmask = lwp.saved_sigmask, None


def _wait(k: Kernel, lwp: Lwp, deadline: float | None, why: str, host: bool) -> int:
    """Nothing is ready: 0 if the time is up, else park (Block)."""
    now = time.monotonic()
    if deadline is not None and (deadline < 0 or now >= deadline):
        _finish(lwp)
        return 0
    until = deadline
    if host:
        until = min(until, now + HOST_RECHECK) if until is not None else now + HOST_RECHECK
    wq = k.poll_wq
    # a signal from another VM, or a client of a published port, may end the wait
    wq.host = k.remote is not None or k.published is not None
    raise Block(wq, why, until=until)


def _set_mask(k: Kernel, lwp: Lwp, sigmask: int, size: int) -> None:
    if sigmask and lwp.saved_sigmask is None:
        if size != 8:
            raise GuestError(errno.EINVAL)
        new = k.mem.read_u64(sigmask)
        lwp.saved_sigmask, lwp.sigmask = lwp.sigmask, new & ~UNBLOCKABLE


@contextlib.contextmanager
def _undo_on_error(lwp: Lwp) -> Iterator[None]:
    """A call that fails gives the signal mask back (a wait keeps it: Block)."""
    try:
        yield
    except GuestError:
        _finish(lwp)
        raise


def _polls_begin(k: Kernel, lwp: Lwp) -> None:
    """A new look at the files: the pipe rings it polls register it as their waiter
    anew (transports/remote_pipe.py), so a ring that changes wakes it."""
    if k.remote is not None:
        k.remote.polls_begin(lwp)


def _waits_on_host(k: Kernel, f: File) -> bool:
    if isinstance(f, ConsoleFile):
        return f.fdno == 0 and k.console.input.host_fd is not None
    return f.poll_rechecks


def _timespec_seconds(k: Kernel, addr: int) -> float | None:
    if not addr:
        return None
    sec, nsec = read_timespec(k.mem, addr)
    return sec + nsec / 1e9


# -- poll -----------------------------------------------------------------------------------
def _poll(k: Kernel, lwp: Lwp, fds: int, nfds: int, seconds: float | None, why: str) -> int:
    if nfds > NOFILE:
        raise GuestError(errno.EINVAL)
    raw = k.mem.read(fds, POLLFD.size * nfds)
    k.mem.offset(fds, POLLFD.size * nfds)
    table = lwp.proc.fds
    out = bytearray(raw)
    ready = 0
    host = False
    _polls_begin(k, lwp)
    for i in range(nfds):
        fd, events, _ = POLLFD.unpack_from(raw, 8 * i)
        rev = 0
        if fd >= 0:
            e = table.entries.get(fd)
            if e is None:
                rev = POLLNVAL
            else:
                rev = e.file.poll(k) & ((events & 0xFFFF) | POLLERR | POLLHUP)
                host = host or _waits_on_host(k, e.file)
        struct.pack_into("<h", out, 8 * i + 6, rev - 0x10000 if rev & 0x8000 else rev)
        ready += bool(rev)
    deadline = _deadline(lwp, seconds)
    if not ready:
        _wait(k, lwp, deadline, why, host)
    k.mem.write(fds, out)
    _finish(lwp)
    return ready


def sys_poll(k: Kernel, lwp: Lwp, fds: int, nfds: int, timeout: int) -> int:
    ms = i32(timeout)
    return _poll(k, lwp, fds, nfds & 0xFFFF_FFFF, None if ms < 0 else ms / 1000, "poll")


def sys_ppoll(k: Kernel, lwp: Lwp, fds: int, nfds: int, tsp: int, sigmask: int, size: int) -> int:
    seconds = _timespec_seconds(k, tsp)
    _set_mask(k, lwp, sigmask, size)
    with _undo_on_error(lwp):
        return _poll(k, lwp, fds, nfds & 0xFFFF_FFFF, seconds, "ppoll")


# -- select ---------------------------------------------------------------------------------
def _select_ready(k: Kernel, lwp: Lwp, nfds: int, ins: list[int]) -> tuple[list[int], bool]:
    """The ready bits of each set, and whether a file needs re-checking on a timer."""
    table = lwp.proc.fds
    outs = [0, 0, 0]
    host = False
    _polls_begin(k, lwp)
    wanted = (SELECT_IN, SELECT_OUT, SELECT_EX)
    for fd in range(nfds):
        bit = 1 << fd
        if not (ins[0] | ins[1] | ins[2]) & bit:
            continue
        e = table.entries.get(fd)
        if e is None:
            raise GuestError(errno.EBADF)
        mask = e.file.poll(k)
        host = host or _waits_on_host(k, e.file)
        for i in range(3):
            if ins[i] & bit and mask & wanted[i]:
                outs[i] |= bit
    return outs, host


def _select(
    k: Kernel, lwp: Lwp, nfds: int, sets: tuple[int, int, int], seconds: float | None, why: str
) -> tuple[int, float | None]:
    nfds = i32(nfds)
    if nfds < 0 or nfds > FD_SETSIZE:
        raise GuestError(errno.EINVAL)
    size = (nfds + 63) // 64 * 8
    ins = [int.from_bytes(k.mem.read(a, size), "little") if a else 0 for a in sets]
    for a in sets:
        if a:
            k.mem.offset(a, size)
    outs, host = _select_ready(k, lwp, nfds, ins)
    ready = sum(bin(o).count("1") for o in outs)
    deadline = _deadline(lwp, seconds)
    left = None
    if not ready:
        _wait(k, lwp, deadline, why, host)
    if deadline is not None:
        left = max(deadline - time.monotonic(), 0.0) if deadline > 0 else 0.0
    for a, o in zip(sets, outs, strict=True):
        if a:
            k.mem.write(a, o.to_bytes(size, "little"))
    _finish(lwp)
    return ready, left


def sys_select(k: Kernel, lwp: Lwp, nfds: int, r: int, w: int, x: int, tvp: int) -> int:
    seconds = None
    if tvp:
        sec, usec = k.mem.unpack(TIMEVAL, tvp)
        if sec < 0 or usec < 0:
            raise GuestError(errno.EINVAL)
        seconds = sec + usec / 1e6
    ready, left = _select(k, lwp, nfds, (r, w, x), seconds, "select")
    if tvp and left is not None:  # Linux tells what was left
        us = int(left * 1e6)
        k.mem.pack(TIMEVAL, tvp, us // 1_000_000, us % 1_000_000)
    return ready


def sys_pselect6(k: Kernel, lwp: Lwp, nfds: int, r: int, w: int, x: int, tsp: int, sig: int) -> int:
    seconds = _timespec_seconds(k, tsp)
    if sig:
        mask, size = k.mem.unpack(struct.Struct("<QQ"), sig)
        _set_mask(k, lwp, mask, size)
    with _undo_on_error(lwp):
        ready, left = _select(k, lwp, nfds, (r, w, x), seconds, "pselect6")
    if tsp and left is not None:
        ns = int(left * 1e9)
        k.mem.pack(TIMESPEC, tsp, ns // 1_000_000_000, ns % 1_000_000_000)
    return ready


# -- epoll ----------------------------------------------------------------------------------
def sys_epoll_create1(k: Kernel, lwp: Lwp, flags: int) -> int:
    flags = i32(flags)
    if flags & ~O_CLOEXEC:
        raise GuestError(errno.EINVAL)
    return lwp.proc.fds.install(Epoll(), cloexec=bool(flags & O_CLOEXEC))


def sys_epoll_create(k: Kernel, lwp: Lwp, size: int) -> int:
    if i32(size) <= 0:
        raise GuestError(errno.EINVAL)
    return sys_epoll_create1(k, lwp, 0)


def _epoll(lwp: Lwp, epfd: int) -> Epoll:
    f = lwp.proc.fds.get(i32(epfd))
    if not isinstance(f, Epoll):
        raise GuestError(errno.EINVAL)
    return f


def sys_epoll_ctl(k: Kernel, lwp: Lwp, epfd: int, op: int, fd: int, event: int) -> int:
    op, fd = i32(op), i32(fd)
    ep_file = lwp.proc.fds.get(i32(epfd))
    f = lwp.proc.fds.get(fd)
    events = data = 0
    if op != EPOLL_CTL_DEL:
        events, data = k.mem.unpack(EPOLL_EVENT, event)
    if not isinstance(ep_file, Epoll) or f is ep_file:
        raise GuestError(errno.EINVAL)
    if not f.pollable:
        raise GuestError(errno.EPERM)
    if op == EPOLL_CTL_ADD:
        if events & EPOLLEXCLUSIVE and events & ~(EPOLLEXCLUSIVE | 0x1F | EPOLL_FLAGS):
            raise GuestError(errno.EINVAL)
        ep_file.ctl_add(fd, f, events, data)
    elif op == EPOLL_CTL_MOD:
        ep_file.ctl_mod(fd, f, events, data)
    elif op == EPOLL_CTL_DEL:
        ep_file.ctl_del(fd, f)
    else:
        raise GuestError(errno.EINVAL)
    return 0


def _epoll_wait(k: Kernel, lwp: Lwp, epfd: int, events: int, maxevents: int, seconds) -> int:
    maxevents = i32(maxevents)
    if maxevents <= 0 or maxevents > 0x7FFF_FFFF // EPOLL_EVENT.size:
        raise GuestError(errno.EINVAL)
    ep = _epoll(lwp, epfd)  # the buffer is checked when written, as Linux
    _polls_begin(k, lwp)
    if not ep.ready(k, 1, peek=True):
        host = any(_waits_on_host(k, it.file) for it in ep.items.values())
        _wait(k, lwp, _deadline(lwp, seconds), "epoll_wait", host)
        return 0
    got = ep.ready(k, maxevents)
    k.mem.write(events, b"".join(EPOLL_EVENT.pack(m, d) for m, d in got))
    _finish(lwp)
    return len(got)


def sys_epoll_wait(
    k: Kernel, lwp: Lwp, epfd: int, events: int, maxevents: int, timeout: int
) -> int:
    ms = i32(timeout)
    return _epoll_wait(k, lwp, epfd, events, maxevents, None if ms < 0 else ms / 1000)


def sys_epoll_pwait(
    k: Kernel, lwp: Lwp, epfd: int, events: int, maxevents: int, timeout: int, sig: int, size: int
) -> int:
    _set_mask(k, lwp, sig, size)
    ms = i32(timeout)
    with _undo_on_error(lwp):
        return _epoll_wait(k, lwp, epfd, events, maxevents, None if ms < 0 else ms / 1000)


def sys_epoll_pwait2(
    k: Kernel, lwp: Lwp, epfd: int, events: int, maxevents: int, tsp: int, sig: int, size: int
) -> int:
    seconds = _timespec_seconds(k, tsp)
    _set_mask(k, lwp, sig, size)
    with _undo_on_error(lwp):
        return _epoll_wait(k, lwp, epfd, events, maxevents, seconds)


# -- eventfd --------------------------------------------------------------------------------
def sys_eventfd2(k: Kernel, lwp: Lwp, initval: int, flags: int) -> int:
    flags = i32(flags)
    if flags & ~(O_CLOEXEC | O_NONBLOCK | EFD_SEMAPHORE):
        raise GuestError(errno.EINVAL)
    f = EventFd(initval & 0xFFFF_FFFF, flags)
    return lwp.proc.fds.install(f, cloexec=bool(flags & O_CLOEXEC))


def sys_eventfd(k: Kernel, lwp: Lwp, initval: int) -> int:
    return sys_eventfd2(k, lwp, initval, 0)

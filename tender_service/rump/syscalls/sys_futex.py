"""futex: wait and wake on a 32-bit word of guest memory.

In thread-fork mode processes share globals, so a futex word may be waited
on by one process and woken by another.  A woken waiter returns 0 even if
the word still holds the old value (the flag survives the syscall restart).
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError
from tender_service.rump.outcomes import Block
from tender_service.rump.syscalls.abi import i32, read_timespec

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE = 0, 1, 3, 4
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME = 128, 256


def _queue(k: Kernel, addr: int) -> WaitQueue | None:
    return k.futexes.get(addr)


def _new_queue(k: Kernel, addr: int) -> WaitQueue:
    """The wait queue of ``addr``, made on first use."""
    q = k.futexes.get(addr)
    if q is None:
        q = k.futexes[addr] = WaitQueue(f"futex:{addr:#x}")
    return q


def sys_futex(
    k: Kernel, lwp: Lwp, uaddr: int, op: int, val: int, timeout: int, uaddr2: int, val3: int
) -> int:
    cmd = i32(op) & ~(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME)
    if uaddr & 3:
        raise GuestError(errno.EINVAL)
    if cmd in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        if lwp.futex_woken:
            lwp.futex_woken = False
            lwp.deadline = 0.0
            return 0
        if lwp.deadline and time.monotonic() >= lwp.deadline:
            lwp.deadline = 0.0
            raise GuestError(errno.ETIMEDOUT)
        if k.mem.read_u32(uaddr) != val & 0xFFFF_FFFF:
            lwp.deadline = 0.0
            raise GuestError(errno.EAGAIN)
        if timeout and not lwp.deadline:
            sec, nsec = read_timespec(k.mem, timeout)
            lwp.deadline = time.monotonic() + sec + nsec / 1e9  # FUTEX_WAIT: relative
        raise Block(_new_queue(k, uaddr), f"futex wait {uaddr:#x}", until=lwp.deadline or None)
    if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
        k.mem.offset(uaddr, 4)
        return _wake(k, uaddr, i32(val))
    if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
        if cmd == FUTEX_CMP_REQUEUE and k.mem.read_u32(uaddr) != val3 & 0xFFFF_FFFF:
            raise GuestError(errno.EAGAIN)
        woken = _wake(k, uaddr, i32(val))
        src = _queue(k, uaddr)
        if src is not None and src.waiters:
            dst = _new_queue(k, uaddr2)
            moved, src.waiters = src.waiters[: max(0, timeout)], src.waiters[max(0, timeout) :]
            for t in moved:
                t.waiting_on = dst
            dst.waiters.extend(moved)
            woken += len(moved)
        return woken
    raise GuestError(errno.ENOSYS)


def _wake(k: Kernel, uaddr: int, n: int) -> int:
    q = _queue(k, uaddr)
    if q is None or n <= 0:
        return 0
    woken = q.waiters[:n]
    for t in woken:
        t.cookie.futex_woken = True
        k.sched.make_runnable(t)
    if not q.waiters:
        del k.futexes[uaddr]
    return len(woken)

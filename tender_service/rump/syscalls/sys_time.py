"""Clocks and sleeping.  Sleeping parks the thread on the scheduler's timer."""

from __future__ import annotations

import errno
import struct
import time
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.outcomes import Block
from tender_service.rump.syscalls.abi import TIMESPEC, i32, read_timespec

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID = 0, 1, 2, 3
CLOCK_MONOTONIC_RAW, CLOCK_REALTIME_COARSE, CLOCK_MONOTONIC_COARSE, CLOCK_BOOTTIME = 4, 5, 6, 7
TIMER_ABSTIME = 1
TIMEVAL = struct.Struct("<qq")
_MONO = (CLOCK_MONOTONIC, CLOCK_MONOTONIC_RAW, CLOCK_MONOTONIC_COARSE, CLOCK_BOOTTIME)
_REAL = (CLOCK_REALTIME, CLOCK_REALTIME_COARSE)
_CPU = (CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID)


def _now_ns(k: Kernel, clock: int) -> int:
    if clock in _MONO:
        return k.clock.now_ns(real=False)
    if clock in _REAL:
        return k.clock.now_ns(real=True)
    if clock in _CPU:
        return time.thread_time_ns()  # the VM's host thread: all its processes together
    raise GuestError(errno.EINVAL)


def sys_clock_gettime(k: Kernel, lwp: Lwp, clock: int, tp: int) -> int:
    ns = _now_ns(k, i32(clock))
    k.mem.pack(TIMESPEC, tp, ns // 1_000_000_000, ns % 1_000_000_000)
    return 0


def sys_clock_getres(k: Kernel, lwp: Lwp, clock: int, res: int) -> int:
    _now_ns(k, i32(clock))
    if res:
        k.mem.pack(TIMESPEC, res, 0, 1)
    return 0


def sys_gettimeofday(k: Kernel, lwp: Lwp, tv: int, tz: int) -> int:
    ns = k.clock.now_ns(real=True)
    if tv:
        k.mem.pack(TIMEVAL, tv, ns // 1_000_000_000, (ns // 1000) % 1_000_000)
    if tz:
        k.mem.write(tz, bytes(8))
    return 0


def sys_time(k: Kernel, lwp: Lwp, tloc: int) -> int:
    now = k.clock.now_ns(real=True) // 1_000_000_000
    if tloc:
        k.mem.write_u64(tloc, now)
    return now


def _sleep_until(lwp: Lwp, deadline_mono: float) -> int:
    """Block until ``deadline_mono``; the restarted syscall then finds it passed."""
    if lwp.progress == 0:
        lwp.progress = int(deadline_mono * 1e9) or 1
    deadline = lwp.progress / 1e9
    if time.monotonic() >= deadline:
        lwp.progress = 0
        return 0
    raise Block(None, "sleep", until=deadline)


def sys_nanosleep(k: Kernel, lwp: Lwp, req: int, rem: int) -> int:
    if lwp.progress == 0:
        sec, nsec = read_timespec(k.mem, req)
        return _sleep_until(lwp, time.monotonic() + sec + nsec / 1e9)
    return _sleep_until(lwp, 0)


def sys_clock_nanosleep(k: Kernel, lwp: Lwp, clock: int, flags: int, req: int, rem: int) -> int:
    clock = i32(clock)
    if clock in _CPU or clock not in (*_MONO, *_REAL):
        return -errno.EINVAL if clock not in _CPU else -errno.ENOTSUP
    if lwp.progress == 0:
        sec, nsec = read_timespec(k.mem, req)
        delay = sec + nsec / 1e9
        if flags & TIMER_ABSTIME:
            delay -= _now_ns(k, clock) / 1e9
        return _sleep_until(lwp, time.monotonic() + max(0.0, delay))
    return _sleep_until(lwp, 0)

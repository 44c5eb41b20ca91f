"""POSIX per-process timers (timer_create & co): what one timer is and how it counts.

A timer belongs to one process (not inherited by fork, gone at exec and exit, as
on Linux).  It expires on the VM's host thread (``Kernel.fire_ptimer``, armed on
the watchdog like ITIMER_REAL) and then sends its signal, or, with SIGEV_NONE,
nothing: such a timer is only read back with timer_gettime, so it is never armed
on the host at all and its expiries are worked out when read.  Linux keeps one
preallocated signal per timer: while that signal is still pending an expiry only
counts an overrun, which the delivered siginfo's ``si_overrun`` and
timer_getoverrun report (the count as of the last delivery).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
#: Linux's DELAYTIMER_MAX: overrun counts saturate here
DELAYTIMER_MAX = 2**31 - 1
#: timers a process may hold (Linux's limit is RLIMIT_SIGPENDING; ours is fixed)
MAX_TIMERS = 1024


@dataclass(slots=True)
class PosixTimer:
    """One timer of a process: its clock, how it notifies, and when it expires next."""

    id: int
    clock: int
    notify: int  # SIGEV_SIGNAL or SIGEV_NONE
    signo: int
    value: int  # sigev_value, delivered as si_value
    #: next expiry in time.monotonic seconds (0: disarmed), and the period (0: one-shot)
    deadline: float = 0.0
    interval: float = 0.0
    token: int = 0  # the watchdog's, while armed on the host
    #: its signal is queued and not yet delivered: expiries only count overruns
    queued: bool = False
    overrun: int = 0  # expiries missed since the queued signal was sent
    overrun_last: int = 0  # what timer_getoverrun says: the count of the last delivery

    def missed(self, now: float) -> int:
        """Move a periodic timer's deadline past ``now``; the periods it skipped."""
        if not self.interval or self.deadline > now:
            return 0
        n = int((now - self.deadline) // self.interval)
        self.deadline += (n + 1) * self.interval
        return n

    def left(self, now: float | None = None) -> tuple[float, float]:
        """(time to the next expiry, period) as timer_gettime reports them."""
        if not self.deadline:
            return 0.0, self.interval
        now = time.monotonic() if now is None else now
        if self.notify == SIGEV_NONE and self.deadline <= now:
            if not self.interval:
                self.deadline = 0.0  # a one-shot that expired unseen: disarmed
                return 0.0, 0.0
            self.missed(now)
        left = self.deadline - now
        return (left if left > 0 else 1e-9), self.interval  # due, not yet fired: armed

    def delivered(self) -> int:
        """Its signal is being delivered: the overrun count it carries (si_overrun)."""
        self.queued = False
        self.overrun_last, self.overrun = min(self.overrun, DELAYTIMER_MAX), 0
        return self.overrun_last

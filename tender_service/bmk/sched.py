"""bmk threads and the cooperative scheduler (Rumprun's ``bmk_sched``).

Threads switch only when they block, yield, exit or (optionally) when an
instruction quantum runs out.  A blocked thread waits on a ``WaitQueue`` and
is woken by whoever changes the condition (a pipe write, a child's exit...);
woken threads re-check their condition, so wake-ups may be broad.  A thread
may also sleep until a time (``bt_wakeup_time``).  The scheduler knows
whether anything outside the VM could still wake a thread: if not, and
nothing can run, the VM is deadlocked.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class ThreadState(enum.Enum):
    RUNNABLE = "runnable"
    BLOCKED = "blocked"
    DEAD = "dead"


@dataclass(eq=False, slots=True)
class WaitQueue:
    """Threads waiting for one condition; ``host`` if a host event can wake them."""

    name: str
    host: bool = False
    waiters: list[BmkThread] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class BmkThread:
    tid: int
    name: str
    ctx: Any = None  # the CPU context while not running
    state: ThreadState = ThreadState.RUNNABLE
    stack_base: int = 0
    stack_size: int = 0
    wakeup_time: float | None = None
    waiting_on: WaitQueue | None = None
    why: str = ""
    cookie: Any = None  # the rump LWP this thread runs

    @property
    def stack_top(self) -> int:
        return self.stack_base + self.stack_size


class Scheduler:
    def __init__(self) -> None:
        self.runq: deque[BmkThread] = deque()
        self._sleepers: list[tuple[float, int, BmkThread]] = []
        self._seq = itertools.count()
        self.threads: dict[int, BmkThread] = {}
        self.switches = 0

    def add(self, t: BmkThread) -> None:
        self.threads[t.tid] = t
        t.state = ThreadState.RUNNABLE
        self.runq.append(t)

    def make_runnable(self, t: BmkThread) -> None:
        if t.state is ThreadState.BLOCKED:
            wq = t.waiting_on
            if wq is not None and t in wq.waiters:
                wq.waiters.remove(t)
            t.waiting_on, t.wakeup_time, t.why = None, None, ""
            t.state = ThreadState.RUNNABLE
            self.runq.append(t)

    def block(
        self, t: BmkThread, wq: WaitQueue | None, why: str, until: float | None = None
    ) -> None:
        """Park ``t`` on ``wq`` and/or until time ``until`` (time.monotonic)."""
        t.state = ThreadState.BLOCKED
        t.waiting_on, t.why, t.wakeup_time = wq, why, until
        if wq is not None:
            wq.waiters.append(t)
        if until is not None:
            heapq.heappush(self._sleepers, (until, next(self._seq), t))

    def wake_all(self, wq: WaitQueue) -> None:
        waiters, wq.waiters = wq.waiters, []
        for t in waiters:
            t.waiting_on = None
            self.make_runnable(t)

    def kill(self, t: BmkThread) -> None:
        wq = t.waiting_on
        if t.state is ThreadState.BLOCKED and wq is not None and t in wq.waiters:
            wq.waiters.remove(t)
        t.state = ThreadState.DEAD
        t.waiting_on = None
        self.threads.pop(t.tid, None)
        if t in self.runq:
            self.runq.remove(t)

    def wake_sleepers(self, now: float) -> None:
        while self._sleepers and self._sleepers[0][0] <= now:
            until, _, t = heapq.heappop(self._sleepers)
            if t.state is ThreadState.BLOCKED and t.wakeup_time == until:
                self.make_runnable(t)

    def next_timer(self) -> float | None:
        while self._sleepers:
            until, _, t = self._sleepers[0]
            if t.state is ThreadState.BLOCKED and t.wakeup_time == until:
                return until
            heapq.heappop(self._sleepers)
        return None

    def pick(self) -> BmkThread | None:
        """The next runnable thread (round robin), or None."""
        if self._sleepers:
            self.wake_sleepers(time.monotonic())
        while self.runq:
            t = self.runq.popleft()
            if t.state is ThreadState.RUNNABLE:
                return t
        return None

    def blocked(self) -> list[BmkThread]:
        return [t for t in self.threads.values() if t.state is ThreadState.BLOCKED]

    def host_wakeable(self) -> bool:
        """Could a timer or a host event still wake a blocked thread?"""
        return any(
            t.wakeup_time is not None or (t.waiting_on is not None and t.waiting_on.host)
            for t in self.blocked()
        )

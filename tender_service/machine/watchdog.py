"""One host thread that fires deadlines: instance time limits.

A guest that spins without making syscalls never returns to the kernel, so
the time limit must come from outside the emulation loop.  Unicorn's own
``emu_start`` timeout starts a host thread per call (~180 us each); here one
daemon thread serves every VM of the process and calls ``Cpu.stop`` (which is
thread safe) when a deadline passes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, fire: Callable[[], None]) -> int:
        """Call ``fire()`` at ``deadline`` (time.monotonic) unless cancelled first."""
        token = next(self._ids)
        with self._cond:
            heapq.heappush(self._heap, (deadline, token, fire))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="unifork-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._cancelled.add(token)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, fire = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            try:
                fire()
            except Exception:  # one bad callback must not end every later time limit
                log.exception("watchdog callback failed")


WATCHDOG = Watchdog()

"""Preemption by wall-clock time slice: one host thread for every CPU of the process.

A guest that computes without syscalls never returns to the run loop by itself;
cooperative scheduling (Rumprun's) then starves its siblings, its parent and its
own pending signals.  Counting instructions (Unicorn's ``count``) costs every
guest instruction a hook and made ``cpu_loop`` 2.7 times slower; a ticker costs
nothing per instruction: every slice it looks at each registered CPU, and one
still inside the very run it saw at the previous tick (so it has run a whole
slice) is stopped, as a timer interrupt would.  The run loop then puts that
thread at the back of the run queue.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol


class Preemptible(Protocol):
    """A CPU: ``runs`` counts its entries into the guest, ``in_run`` says it is inside."""

    runs: int
    in_run: bool

    def stop(self) -> None: ...


@dataclass(eq=False)
class _Entry:
    cpu: Preemptible
    slice: float
    seen: int = -1
    due: float = 0.0


class Preempter:
    """Stops a CPU that has run one guest thread for a whole time slice."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.preemptions = 0

    def add(self, cpu: Preemptible, slice_seconds: float) -> None:
        with self._cond:
            self._entries[id(cpu)] = _Entry(cpu, slice_seconds)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="unifork-preempt", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def remove(self, cpu: Preemptible) -> None:
        """After this returns the CPU is never touched again (it may be freed)."""
        with self._cond:
            self._entries.pop(id(cpu), None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                if not self._entries:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                for e in self._entries.values():
                    if now < e.due:
                        continue
                    e.due = now + e.slice
                    cpu = e.cpu
                    if cpu.in_run and cpu.runs == e.seen:
                        cpu.stop()  # a whole slice in one run: preempt it
                        self.preemptions += 1
                    e.seen = cpu.runs
                wait = min(e.due for e in self._entries.values()) - time.monotonic()
                self._cond.wait(max(wait, 0.001))


PREEMPTER = Preempter()

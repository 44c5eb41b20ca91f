"""A progress bar on stderr, and logging that does not tear it.

On a terminal the bar is redrawn in place (``\\r``); anywhere else (a pipe, a
CI log) it prints one line whenever the step's label changes or another tenth
of the work is done, so logs stay short.  Log records pass through
:class:`BarAwareHandler`, which clears the bar, writes the record and redraws
the bar.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from typing import TextIO

WIDTH = 28


class ProgressBar:
    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(1, total)
        self.done = 0
        self.label = ""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self._drawn = False
        self._last_tenth = -1
        self._last_group = ""
        self._lock = threading.RLock()

    def _line(self) -> str:
        frac = min(1.0, self.done / self.total)
        full = int(frac * WIDTH)
        elapsed = time.monotonic() - self.t0
        eta = f" eta {elapsed / frac * (1 - frac):4.0f}s" if 0.02 < frac < 1 else ""
        return (f"[{'#' * full}{'.' * (WIDTH - full)}] {self.done}/{self.total} "
                f"{frac * 100:3.0f}% {elapsed:5.1f}s{eta}  {self.label}")

    def step(self, label: str) -> None:
        """Start a step: show its label (the count advances in :meth:`advance`)."""
        with self._lock:
            self.label = label
            self._draw()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + self._fit(self._line()))
            self.stream.flush()
            self._drawn = True
            return
        tenth = int(self.done * 10 / self.total)
        group = self.label.split(":", 1)[0]
        if tenth != self._last_tenth or group != self._last_group:
            self._last_tenth, self._last_group = tenth, group
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    @staticmethod
    def _fit(line: str) -> str:
        """Cut to the terminal's width: a wrapped line could not be redrawn in place."""
        return line[: max(20, shutil.get_terminal_size().columns - 1)]

    def clear(self) -> None:
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def redraw(self) -> None:
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write("\r\x1b[K" + self._fit(self._line()))
                self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            self.done = self.total
            if self.enabled and self.tty:
                self.stream.write("\r\x1b[K" + self._fit(self._line()) + "\n")
                self.stream.flush()
                self._drawn = False
            elif self.enabled:
                self._draw()


class BarAwareHandler(logging.StreamHandler):
    """A stderr handler that clears the progress bar around each record."""

    def __init__(self, bar: ProgressBar | None = None, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        bar = self.bar
        if bar is None:
            super().emit(record)
            return
        with bar._lock:
            bar.clear()
            super().emit(record)
            bar.redraw()

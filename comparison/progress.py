"""The harness's one progress display: a tqdm bar on stderr, and logging that does not tear it.

tqdm keeps the count, the elapsed time and the estimate, and formats the line.  On a
terminal it redraws the bar in place (cut to the terminal's width); anywhere else (a pipe,
a CI log) a redrawn line would pile up as ``\\r`` noise, so the bar draws nowhere and its
line is printed once per step instead (or, for long runs, once per step group: when the
label's part before ``:`` changes or another tenth of the work is done).  Log records go through tqdm's
``logging_redirect_tqdm``, which clears the bar, writes the record and redraws the bar.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

WIDTH = 28
BAR_FORMAT = (
    f"[{{bar:{WIDTH}}}] {{n_fmt}}/{{total_fmt}} {{percentage:3.0f}}% "
    "{elapsed_s:5.1f}s eta {remaining}  {desc}"
)


class _Nowhere(io.TextIOBase):
    """Where the bar draws off a terminal: its line is printed per step by :meth:`step`."""

    def write(self, s: str) -> int:
        return len(s)


class ProgressBar:
    """``total`` steps; :meth:`step` names the one starting, :meth:`advance` counts it done."""

    def __init__(
        self, total: int, stream: TextIO | None = None, enabled: bool = True, by_group: bool = False
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.by_group = by_group
        self._last: tuple[str, int] | None = None  # (group, tenth) of the last line printed
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._total = max(1, total)  # tqdm's own may be None (unknown), never here
        self.bar = tqdm(
            total=self._total,
            file=self.stream if self.tty else _Nowhere(),
            disable=not enabled,
            ascii=".#",
            bar_format=BAR_FORMAT,
            dynamic_ncols=True,
            leave=True,
        )

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, n: int) -> None:
        """Set once the steps are known (the clock keeps running from the start)."""
        self._total = self.bar.total = max(1, n)
        self.bar.refresh()

    def step(self, label: str) -> None:
        """Start a step: show its label (the count advances in :meth:`advance`)."""
        self.bar.set_description_str(label)
        self._line()

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def finish(self) -> None:
        if self.enabled:
            self.bar.update(self._total - self.bar.n)
            self._line()
        self.bar.close()

    def close(self) -> None:
        """Stop drawing where the bar stands (a run that failed part way)."""
        self.bar.close()

    def _line(self) -> None:
        """Off a terminal: the bar's line, once (on a terminal tqdm redraws it in place)."""
        if not self.enabled or self.tty:
            return
        if self.by_group:
            key = (self.bar.desc.split(":", 1)[0], int(self.bar.n * 10 / self._total))
            if key == self._last:
                return
            self._last = key
        tqdm.write(str(self.bar), file=self.stream)

    @contextlib.contextmanager
    def logging(self, logger: logging.Logger | None = None) -> Iterator[None]:
        """While inside: ``logger``'s (default root's) stderr/stdout handler writes around the bar.

        tqdm's redirect keeps that handler's formatter and filters, not its level: give the
        level as a filter (``handler.addFilter(lambda r: r.levelno >= level)``).
        """
        with logging_redirect_tqdm(loggers=[logger or logging.getLogger()]):
            yield

"""The figures a running instance reports as they happen, and how they are reported.

Its own module (below the supervisor and the backends) so that every part of an
instance reports the same way: an observer may have any subset of the methods,
and a part calls only those it has.
"""

from __future__ import annotations

from typing import Protocol


class InstanceObserver(Protocol):
    """Figures a running instance reports as they happen (the tender's metrics).

    Every method is optional: the backends and the supervisor call only those the
    observer has (``notify``), so the harness can pass an object with just
    ``fork_done`` and the CLI one with just ``published``.
    """

    def fork_done(self, seconds: float, snapshot: int, remote: bool) -> None: ...

    def pipe_write(self, nbytes: int, seconds: float) -> None: ...

    def pipe_bytes(self, nbytes: int) -> None: ...

    def shm_exhausted(self) -> None: ...

    def vm_started(self) -> None: ...

    def vm_ended(self) -> None: ...

    def emulator_crashed(self) -> None: ...

    def published(self, bound: list[tuple[str, int, int]]) -> None: ...

    def conn_published(self, outcome: str) -> None:
        """A host client connected to a published port: "accepted" (queued for the
        guest's listener) or "refused" (no listener on the guest port)."""

    def conn_bytes(self, direction: str, nbytes: int) -> None:
        """Bytes through a published port: "in" (host to guest) or "out"."""

    def conn_accepted(self, seconds: float) -> None:
        """A VM accepted a connection of a shared listener, queued ``seconds`` before."""


def notify(observer: object | None, event: str, *args: object) -> None:
    """Call ``observer.event(*args)`` if there is an observer and it has that method."""
    method = getattr(observer, event, None)
    if method is not None:
        method(*args)

"""The guest RAM a tender has promised its VMs, against its limit (``--max-guest-memory``).

Every VM a tender hosts reserves its declared RAM before it starts and gives
it back when it ends: a thread-fork instance one VM, a VM-clone instance one
per VM placed on this tender, reserved as it forks.  The declared size
counts, not what is touched so far: a guest may touch all of its RAM at any
moment, and a tender that overcommits is killed by the host's OOM killer
with every instance in it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

FLAG = "--max-guest-memory"


def format_bytes(n: int) -> str:
    """1 GiB, 1.5 GiB, 64 MiB: sizes as an operator reads them in an error."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def host_memory() -> int:
    """The RAM this process may use: the host's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # cgroup v2: "max" or a byte count (a container's memory limit)
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(text)) if text.isdigit() else total


def default_limit() -> int:
    """Half of what the host (or the container) has: room for the tender and its pool."""
    return host_memory() // 2


@dataclass
class MemoryBudget:
    """Bytes of guest RAM reserved on this tender, at most ``limit``."""

    limit: int
    flag: str = FLAG
    used: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.limit <= 0:
            raise ValueError(f"{self.flag} must be positive")

    def state(self) -> str:
        return (
            f"guest memory: {format_bytes(self.used)} in use of a "
            f"{format_bytes(self.limit)} limit ({self.flag})"
        )

    def reserve(self, nbytes: int) -> None:
        """Take ``nbytes``, or raise OverflowError naming the limit and what is in use."""
        with self._lock:
            if self.used + nbytes > self.limit:
                raise OverflowError(f"{self.state()}; {format_bytes(nbytes)} more asked")
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)

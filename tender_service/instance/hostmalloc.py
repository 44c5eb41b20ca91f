"""glibc malloc arenas of a long-running tender process.

Every thread gets a malloc arena that keeps what it freed; with a thread per
VM (VMs in a pool's tender process) or per request (the tender's gRPC
threads) a process that serves for hours creeps up in RSS.  Two arenas keep it flat
(the soak in docs/reliability.md measures it).
"""

from __future__ import annotations

import contextlib
import ctypes

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2


def limit_malloc_arenas() -> None:
    """Cap this process's malloc arenas (a libc without mallopt is left alone)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, ARENAS)

"""The word scan of thread and copy fork, in C (guest/runtime/relocate.c).

A forked child's copied memory is scanned word by word for pointers into its
parent's regions.  In Python that scan was the largest part of a thread fork
(issue 17); the host library does it in one pass, in one call per fork (the
call itself costs what scanning a thousand words does), which also makes the
copies it scans (thread fork's stack and TLS block).  The library is built
by the toolchain (``make images``, or on first use) and loaded when a fork
strategy is made, before a VM process jails itself.
"""

from __future__ import annotations

import ctypes
import functools
from array import array
from collections.abc import Sequence

from tender_service.toolchain.images import build_host_library

#: (lo, hi, delta): words in [lo, hi) move by delta
Region = tuple[int, int, int]
#: (host address, number of 8-byte words) of memory to scan
Span = tuple[int, int]
#: (destination, source, bytes), host addresses: a copy made before the scan
Copy = tuple[int, int, int]
MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def preload() -> None:
    """Load the library and make its first call now: when a fork strategy is made
    (a VM's creation, the fork server's warm-up), not in a VM's first fork."""
    rebase([], [], (0, 1))


@functools.cache
def _relocate():
    fn = ctypes.CDLL(str(build_host_library("relocate"))).unifork_relocate
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_uint64
    return fn


class Rebaser:
    """One caller's scans, with its job and index buffers kept between calls: a VM's
    fork strategy keeps one (building them was a sixth of a thread fork's handler).
    Not shared between VMs: the C call releases the GIL while it fills them."""

    def __init__(self) -> None:
        self._fn = _relocate()
        self._job = array("Q", bytes(8 * 32))  # a thread fork's job, with room
        self._out = array("I", bytes(4 * 1024))
        self._job_at, self._out_at = self._job.buffer_info()[0], self._out.buffer_info()[0]

    def run(
        self,
        spans: Sequence[Span],
        regions: Sequence[Region],
        other: tuple[int, int] = (0, 0),
        copies: Sequence[Copy] = (),
    ) -> tuple[list[int], int]:
        """Make ``copies``, then rebase every word of ``spans`` that lies in one of
        ``regions`` (sorted by lo, disjoint).  Returns the indices (counted across
        the spans in order) of the words in no region but in ``other`` [lo, hi), for
        the caller to classify, and the number of words rebased."""
        job, out = self._job, self._out
        need = 5 + 3 * len(copies) + 2 * len(spans) + 3 * len(regions)
        if len(job) < need:
            job.frombytes(bytes(8 * (need - len(job))))
            self._job_at = job.buffer_info()[0]
        job[0], job[1], job[2] = len(copies), len(spans), len(regions)
        job[3], job[4] = other
        i, total = 5, 0
        for dst, src, size in copies:
            job[i], job[i + 1], job[i + 2] = dst, src, size
            i += 3
        for addr, count in spans:
            job[i], job[i + 1] = addr, count
            i += 2
            total += count
        for lo, hi, delta in regions:
            job[i], job[i + 1], job[i + 2] = lo, hi, delta & MASK64
            i += 3
        record = other[1] > other[0] and total > 0
        if record and len(out) < total:
            out.frombytes(bytes(4 * (total - len(out))))
            self._out_at = out.buffer_info()[0]
        found = self._fn(self._job_at, self._out_at if record else None)
        return (out[:found].tolist() if found else []), job[1]


def rebase(
    spans: Sequence[Span],
    regions: Sequence[Region],
    other: tuple[int, int] = (0, 0),
    copies: Sequence[Copy] = (),
) -> tuple[list[int], int]:
    """:meth:`Rebaser.run` once, with buffers of its own."""
    return Rebaser().run(spans, regions, other, copies)

"""The word scan of thread and copy fork, in C (guest/runtime/relocate.c).

A forked child's copied memory is scanned word by word for pointers into its
parent's regions.  In Python that scan was the largest part of a thread fork
(issue 17); the host library does it in one pass, in one call per fork (the
call itself costs what scanning a thousand words does).  The library is built
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


def rebase(
    spans: Sequence[Span], regions: Sequence[Region], other: tuple[int, int] = (0, 0)
) -> tuple[list[int], int]:
    """Rebase every word of ``spans`` that lies in one of ``regions`` (sorted by lo,
    disjoint).  Returns the indices (counted across the spans in order) of the words
    in no region but in ``other`` [lo, hi), for the caller to classify, and the
    number of words rebased.

    The job is a Python array, not a ctypes structure: ctypes makes a new type for
    every array length (~15 us each time)."""
    lo, hi = other
    job = array("Q", [len(spans), len(regions), lo, hi])
    for addr, count in spans:
        job.append(addr)
        job.append(count)
    for r in regions:
        job.extend([r[0], r[1], r[2] & MASK64])
    total = sum(count for _, count in spans)
    out = array("I", bytes(4 * total)) if hi > lo and total else None
    found = _relocate()(job.buffer_info()[0], out.buffer_info()[0] if out is not None else None)
    return (out[:found].tolist() if found and out is not None else []), job[0]

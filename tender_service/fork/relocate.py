"""The word scan of thread and copy fork, in C (guest/runtime/relocate.c).

A forked child's copied memory is scanned word by word for pointers into its
parent's regions.  In Python that scan was the largest part of a thread fork
(issue 17); the host library does it in one pass.  The library is built by
the toolchain (``make images``, or on first use) and loaded once per process,
before a VM process jails itself (the fork server's warm-up forks).
"""

from __future__ import annotations

import ctypes
import functools
from array import array
from collections.abc import Sequence

from tender_service.toolchain.images import build_host_library

#: (lo, hi, delta): words in [lo, hi) move by delta
Region = tuple[int, int, int]
MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_U64 = ctypes.c_uint64


def preload() -> None:
    """Load the library and make its first call now: when a fork strategy is made
    (a VM's creation, the fork server's warm-up), not in a VM's first fork."""
    rebase(0, 0, region_table([]), (0, 1))


@functools.cache
def _scan():
    fn = ctypes.CDLL(str(build_host_library("relocate"))).unifork_relocate
    fn.argtypes = [
        ctypes.c_void_p,
        _U64,
        ctypes.c_void_p,
        _U64,
        _U64,
        _U64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    fn.restype = _U64
    return fn


def region_table(regions: Sequence[Region]) -> array:
    """``regions`` (sorted by lo, disjoint) as the C scan takes them: an array of
    ``struct unifork_region`` (lo, hi, delta; delta mod 2**64).  A Python array, not a
    ctypes one: ctypes makes a new type for every length, ~15 us each time."""
    return array("Q", [x & MASK64 for r in regions for x in r])


def rebase(addr: int, count: int, table: array, other: tuple[int, int] = (0, 0)) -> list[int]:
    """Rebase the ``count`` words at host address ``addr`` that lie in a region of
    ``table``; return the indices of the other words in ``other`` [lo, hi), for the
    caller to classify."""
    lo, hi = other
    out = array("I", bytes(4 * count)) if hi > lo else None
    found = _scan()(
        addr,
        count,
        table.buffer_info()[0],
        len(table) // 3,
        lo,
        hi,
        out.buffer_info()[0] if out is not None else None,
        None,
    )
    return out[:found].tolist() if found and out is not None else []


def rebase_spans(addr: int, spans: Sequence[tuple[int, int]], table: array) -> int:
    """Rebase every word of the buffer spans (offset from ``addr``, length in bytes)
    that lies in a region of ``table``; the number of words changed."""
    scan, changed, m = _scan(), _U64(), len(table) // 3
    ptr, pchanged = table.buffer_info()[0], ctypes.byref(changed)
    total = 0
    for offset, n in spans:
        scan(addr + offset, n >> 3, ptr, m, 0, 0, None, pchanged)
        total += changed.value
    return total

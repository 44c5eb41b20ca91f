"""Binary buddy page allocator for the bmk heap (Rumprun's bmk page allocator).

The heap [base, base+size) is split into pages; blocks are 2**order pages,
aligned to their own size relative to ``base``.  A size that is not a power of
two is covered by maximal aligned power-of-two blocks, which can never merge
past each other because a buddy outside the heap is never free.

Free lists are insertion-ordered dicts (O(1) pop, O(1) removal of a buddy) and
a bitmask of non-empty orders finds the smallest fitting order in O(1), so
``alloc``/``free`` cost O(orders split or merged), never a scan.  Everything is
Python-side bookkeeping: nothing is read from guest memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_ABSENT = object()


def _int(value: Any, what: str) -> int:
    """An int from snapshot data (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"page allocator state: {what} must be an int, got {value!r}")
    return value


class PageAllocator:
    """Buddy allocator over page indices; addresses are guest addresses."""

    __slots__ = (
        "base",
        "page_size",
        "page_shift",
        "npages",
        "max_order",
        "_free",
        "_nonempty",
        "_alloc",
        "_used_pages",
        "peak_pages",
        "reclaim",
    )

    def __init__(self, base: int, size: int, page_size: int = 4096) -> None:
        self._setup(base, size, page_size)
        page = 0
        while page < self.npages:
            order = (page & -page).bit_length() - 1 if page else self.max_order
            order = min(order, self.max_order)
            while page + (1 << order) > self.npages:
                order -= 1
            self._push(page, order)
            page += 1 << order

    def _setup(self, base: int, size: int, page_size: int) -> None:
        """Validate the geometry and create empty bookkeeping (shared by __init__/from_state)."""
        if page_size < 64 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 64, got {page_size}")
        if base < 0 or base % page_size:
            raise ValueError(f"heap base {base:#x} is not page aligned")
        npages = size // page_size  # a partial last page is not usable
        if npages < 1:
            raise ValueError(f"heap of {size} bytes holds no {page_size}-byte page")
        self.base = base
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.npages = npages
        self.max_order = npages.bit_length() - 1
        self._free: list[dict[int, None]] = [{} for _ in range(self.max_order + 1)]
        self._nonempty = 0  # bit k set <=> _free[k] is not empty
        self._alloc: dict[int, int] = {}  # first page of a live block -> order
        self._used_pages = 0
        #: the most pages ever in use at once (the VM's peak guest memory)
        self.peak_pages = 0
        #: gives back cached blocks (the kernel's kept program images) when an
        #: allocation would fail; returns how many it freed
        self.reclaim: Callable[[], int] | None = None

    # -- free-list primitives -------------------------------------------------

    def _push(self, page: int, order: int) -> None:
        self._free[order][page] = None
        self._nonempty |= 1 << order

    # -- public API ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Usable heap bytes (whole pages)."""
        return self.npages << self.page_shift

    @property
    def used_bytes(self) -> int:
        return self._used_pages << self.page_shift

    @property
    def peak_bytes(self) -> int:
        return self.peak_pages << self.page_shift

    @property
    def free_bytes(self) -> int:
        return (self.npages - self._used_pages) << self.page_shift

    @staticmethod
    def order_for(npages: int) -> int:
        """Buddy order a request of npages is rounded up to."""
        return (npages - 1).bit_length()

    def alloc(self, npages: int) -> int | None:
        """A block of at least npages pages (rounded up to a power of two), or None."""
        if npages < 1:
            raise ValueError(f"cannot allocate {npages} pages")
        order = (npages - 1).bit_length()
        avail = self._nonempty >> order
        if not avail:
            if self.reclaim is None or not self.reclaim():
                return None
            avail = self._nonempty >> order
            if not avail:
                return None
        k = order + (avail & -avail).bit_length() - 1
        free_k = self._free[k]
        page, _ = free_k.popitem()
        if not free_k:
            self._nonempty &= ~(1 << k)
        while k > order:  # split, keeping the lower half
            k -= 1
            self._push(page + (1 << k), k)
        self._alloc[page] = order
        self._used_pages += 1 << order
        if self._used_pages > self.peak_pages:
            self.peak_pages = self._used_pages
        return self.base + (page << self.page_shift)

    def free(self, addr: int) -> None:
        """Return a block and merge it with free buddies as far as possible."""
        off = addr - self.base
        if off < 0 or off & (self.page_size - 1):
            raise ValueError(f"{addr:#x} is not the start of a page block")
        page = off >> self.page_shift
        order = self._alloc.pop(page, None)
        if order is None:
            raise ValueError(f"{addr:#x} is not the start of a live page block")
        self._used_pages -= 1 << order
        while order < self.max_order:
            free_k = self._free[order]
            if free_k.pop(page ^ (1 << order), _ABSENT) is _ABSENT:
                break  # the buddy is not a free block of this order
            if not free_k:
                self._nonempty &= ~(1 << order)
            page &= ~(1 << order)
            order += 1
        self._push(page, order)

    def block_pages(self, addr: int) -> int:
        """Pages in the live block starting at addr (ValueError if there is none)."""
        off = addr - self.base
        aligned = off >= 0 and not off & (self.page_size - 1)
        order = self._alloc.get(off >> self.page_shift) if aligned else None
        if order is None:
            raise ValueError(f"{addr:#x} is not the start of a live page block")
        return 1 << order

    def allocated_blocks(self) -> list[tuple[int, int]]:
        """(address, bytes) of every live block, sorted: the used ranges to snapshot."""
        return sorted(
            (self.base + (p << self.page_shift), self.page_size << o)
            for p, o in self._alloc.items()
        )

    def free_blocks(self) -> list[tuple[int, int]]:
        """(address, bytes) of every free block, sorted (diagnostics and tests)."""
        return sorted(
            (self.base + (p << self.page_shift), self.page_size << k)
            for k, free_k in enumerate(self._free)
            for p in free_k
        )

    # -- snapshots ----------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Plain JSON-able state; free-list order is kept so a restore behaves identically."""
        return {
            "version": STATE_VERSION,
            "base": self.base,
            "size": self.size,
            "page_size": self.page_size,
            "free": [list(free_k) for free_k in self._free],
            "allocated": [[p, o] for p, o in self._alloc.items()],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PageAllocator:
        """Rebuild from export_state() output, checking that the blocks tile the heap."""
        if not isinstance(state, dict):
            raise ValueError("page allocator state must be a dict")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"unsupported page allocator state version {version!r} (expected {STATE_VERSION})"
            )
        try:
            return cls._restore(state)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed page allocator state: {exc!r}") from exc

    @classmethod
    def _restore(cls, state: dict[str, Any]) -> PageAllocator:
        self = cls.__new__(cls)
        self._setup(
            _int(state["base"], "base"),
            _int(state["size"], "size"),
            _int(state["page_size"], "page_size"),
        )
        free_lists = state["free"]
        if not isinstance(free_lists, list) or len(free_lists) != self.max_order + 1:
            raise ValueError("page allocator state: free lists do not match the heap size")
        blocks: list[tuple[int, int]] = []
        for order, pages in enumerate(free_lists):
            for p in pages:
                page = _int(p, "free page")
                blocks.append((page, order))
                self._push(page, order)
        for entry in state["allocated"]:
            page, order = _int(entry[0], "block page"), _int(entry[1], "block order")
            if not 0 <= order <= self.max_order or page in self._alloc:
                raise ValueError(f"page allocator state: bad live block {entry!r}")
            blocks.append((page, order))
            self._alloc[page] = order
            self._used_pages += 1 << order
        blocks.sort()
        expect = 0
        for page, order in blocks:
            if page != expect or page & ((1 << order) - 1):
                raise ValueError(f"page allocator state: block at page {page} breaks the tiling")
            expect = page + (1 << order)
        if expect != self.npages:
            raise ValueError("page allocator state: blocks do not cover the heap")
        self.peak_pages = self._used_pages  # a restored heap starts at its current use
        for order, free_k in enumerate(self._free[:-1]):
            if any(p ^ (1 << order) in free_k for p in free_k):
                raise ValueError("page allocator state: two free buddies were not merged")
        return self

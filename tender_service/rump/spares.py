"""Program images kept after their last user left, with their translated code.

Unicorn translates guest code per VM and per address.  A program loaded at
fresh addresses (an exec, a copy fork's image copy) runs its start-up code
through the translator again: ~1 ms for an exec of a small musl program
against ~0.17 ms with its code still translated (issue 17).  So an image
whose last process exits is not freed at once but kept here (its pages and
the translations of its text), up to ``PER_PROGRAM`` per program and
``MAX_IMAGES`` in all; the next exec or copy fork of the same program takes
it, after checking that its text still holds what the program's does.

Kept images are a cache, like Linux's page cache: the page allocator gives
them back (``drop``, its ``reclaim`` hook) before it fails an allocation, so
no guest ever sees ENOMEM that the cache caused.  A VM-clone snapshot drops
them first: a child VM would inherit the pages but not the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tender_service.bmk.pagealloc import PageAllocator
from tender_service.rump.process import Program

log = logging.getLogger(__name__)

#: kept images of one program (a pipeline runs the same program at once in few processes)
PER_PROGRAM = 2
#: kept images in all (the oldest program's go first)
MAX_IMAGES = 16

#: a program's identity here: its path and its image's size in pages
Key = tuple[bytes, int]


class ImageSpares:
    """Freed program images by program, oldest program first."""

    def __init__(self, pages: PageAllocator, forget_code: Callable[[int, int], None]) -> None:
        self._pages = pages
        self._forget = forget_code
        self._kept: dict[Key, list[tuple[int, int]]] = {}  # key -> [(base, size)]
        #: kept images taken again (their code still translated), and refused (changed)
        self.hits = 0
        self.stale = 0

    @property
    def count(self) -> int:
        return sum(map(len, self._kept.values()))

    def keep(self, prog: Program) -> None:
        """``prog`` lost its last user (``Program.recycle``): keep its pages."""
        key = (prog.path, prog.size)
        bases = self._kept.pop(key, [])
        self._kept[key] = bases  # now the most recent program
        bases.append((prog.base, prog.size))
        if len(bases) > PER_PROGRAM:
            self._free(*bases.pop(0))
        while self.count > MAX_IMAGES:
            oldest = next(iter(self._kept))
            self._free(*self._kept[oldest].pop(0))
            if not self._kept[oldest]:
                del self._kept[oldest]

    def take(self, key: Key, intact: Callable[[int], bool]) -> int | None:
        """The base of a kept image of ``key`` whose text is ``intact`` (its bytes are
        the program's: its translations are valid), or None.  A kept image that fails
        the check is freed (a process wrote into its text)."""
        bases = self._kept.get(key)
        while bases:
            base, size = bases.pop()
            if intact(base):
                if not bases:
                    del self._kept[key]
                self.hits += 1
                return base
            self.stale += 1
            self._free(base, size)
        self._kept.pop(key, None)
        return None

    def drop(self) -> int:
        """Free every kept image (memory is short, or a snapshot is taken); how many."""
        n = 0
        for bases in self._kept.values():
            for base, size in bases:
                self._free(base, size)
            n += len(bases)
        self._kept.clear()
        if n:
            log.debug("dropped %d kept program images", n)
        return n

    def _free(self, base: int, size: int) -> None:
        # freed pages may become a stack or a buffer the kernel writes into: their
        # translations must not outlive them (a host write is not seen by Unicorn)
        self._forget(base, size)
        self._pages.free(base)

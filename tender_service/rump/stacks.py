"""Thread memory: the kernel's stacks and forked threads' TLS blocks, and the few it keeps.

A fork (thread and copy mode) and an exec each need a thread stack, a chunk of
the bmk heap of ``VmConfig.stack_size``; a thread fork also needs a copy of the
parent's TLS block (fork/thread.py); an ending process gives both back.  Taking
a chunk from the allocator and giving it back cost a fork about 4 us of its
~35 (issue 17), so the kernel keeps the last ``KEEP`` blocks of each kind that
processes left, as Linux keeps two thread stacks per CPU for the next fork
(kernel/fork.c, ``cached_stacks``).  A kept block is a live allocation of the
heap, owned by ``KEPT_OWNER``; the kernel frees them (:meth:`KeptBlocks.drop`)
before an allocation would fail and before a VM-clone snapshot.  The guest sees
no difference: a block is never zeroed, fresh or kept.
"""

from __future__ import annotations

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK, MemAlloc

#: blocks of each kind kept for the next fork or exec
KEEP = 2
#: the heap owner of a kept block: no pid (> 0) and no exec's temporary owner (-pid)
KEPT_OWNER = -(1 << 40)
#: the alignment of a thread stack, and of a TLS block (musl's descriptor; a cache line)
STACK_ALIGN = 16
TLS_ALIGN = 64


class KeptBlocks:
    """Kernel blocks of one size and alignment (thread stacks, or the TLS blocks of
    one program), with the last few that were given back."""

    def __init__(self, heap: MemAlloc, size: int, align: int) -> None:
        self.heap = heap
        #: bytes asked of the allocator for each block
        self.size = size
        self.align = align
        self.kept: list[int] = []
        #: blocks a fork or exec took from ``kept`` (statistics and tests)
        self.reused = 0

    def take(self, owner: int, size: int | None = None) -> int:
        """A block for ``owner``: a kept one if there is one, else a new one (0 if
        there is no room).  ``size``: blocks of another size from now on (the TLS
        block of another program); the kept ones are freed."""
        if size is not None and size != self.size:
            self.drop()
            self.size = size
        if self.kept:
            block = self.kept.pop()
            self.heap.give(block, owner)
            self.reused += 1
            return block
        return self.heap.malloc(self.size, self.align, owner=owner, who=MEMWHO_WIREDBMK)

    def put(self, block: int) -> None:
        """A block no thread uses any more: kept, or freed if ``KEEP`` are kept (or it
        is not one of this size and alignment: a snapshot's stack, say)."""
        a = self.heap.get(block)
        if (
            a is not None
            and a.size == self.size
            and a.user - a.block == self.align
            and len(self.kept) < KEEP
        ):
            self.heap.give(block, KEPT_OWNER)
            self.kept.append(block)
        else:
            self.heap.free(block, who=MEMWHO_WIREDBMK)

    def drop(self) -> int:
        """Free the kept blocks; how many there were."""
        kept, self.kept = self.kept, []
        for block in kept:
            self.heap.free(block, who=MEMWHO_WIREDBMK)
        return len(kept)

    @classmethod
    def stacks(cls, heap: MemAlloc, size: int) -> KeptBlocks:
        """The thread stacks of one VM's kernel."""
        return cls(heap, size, STACK_ALIGN)

    @classmethod
    def tls(cls, heap: MemAlloc) -> KeptBlocks:
        """The TLS blocks thread fork copies for its children (the program's size)."""
        return cls(heap, 0, TLS_ALIGN)

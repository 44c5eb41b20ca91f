"""Thread stacks: the kernel's allocation of them, and the few it keeps.

A fork (thread and copy mode) and an exec each need a thread stack, a chunk of
the bmk heap of ``VmConfig.stack_size``; an ending process gives its stack
back.  Taking a chunk from the allocator and giving it back cost a fork about
4 us of its ~35 (issue 17), so the kernel keeps the last ``KEEP`` stacks that
processes left, as Linux keeps two thread stacks per CPU for the next fork
(kernel/fork.c, ``cached_stacks``).  A kept stack is a live allocation of the
heap, owned by ``KEPT_OWNER``; the kernel frees them (:meth:`Stacks.drop`)
before an allocation would fail and before a VM-clone snapshot.  The guest sees
no difference: a stack is never zeroed, fresh or kept.
"""

from __future__ import annotations

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK, MemAlloc

#: stacks kept for the next fork or exec
KEEP = 2
#: the heap owner of a kept stack: no pid (> 0) and no exec's temporary owner (-pid)
KEPT_OWNER = -(1 << 40)


class Stacks:
    """The thread stacks of one VM's kernel."""

    def __init__(self, heap: MemAlloc, size: int) -> None:
        self.heap = heap
        #: bytes asked of the allocator for each stack
        self.size = size
        self.kept: list[int] = []
        #: stacks a fork or exec took from ``kept`` (statistics and tests)
        self.reused = 0

    def take(self, owner: int) -> int:
        """A stack for ``owner``: a kept one if there is one, else a new one (0 if
        there is no room)."""
        if self.kept:
            stack = self.kept.pop()
            self.heap.give(stack, owner)
            self.reused += 1
            return stack
        return self.heap.malloc(self.size, 16, owner=owner, who=MEMWHO_WIREDBMK)

    def put(self, stack: int) -> None:
        """A stack no thread runs on any more: kept, or freed if ``KEEP`` are kept
        (or it is not one of this size: a snapshot's, say)."""
        a = self.heap.get(stack)
        if a is not None and a.size == self.size and len(self.kept) < KEEP:
            self.heap.give(stack, KEPT_OWNER)
            self.kept.append(stack)
        else:
            self.heap.free(stack, who=MEMWHO_WIREDBMK)

    def drop(self) -> int:
        """Free the kept stacks; how many there were."""
        kept, self.kept = self.kept, []
        for stack in kept:
            self.heap.free(stack, who=MEMWHO_WIREDBMK)
        return len(kept)

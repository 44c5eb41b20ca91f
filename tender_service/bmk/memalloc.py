"""Bucket + chunk allocator for the bmk heap (Rumprun's ``bmk_memalloc``).

Every guest ``malloc`` is a hypercall into this module, and the thread-fork
stack scan calls :meth:`MemAlloc.addr_is_managed` for every candidate word, so
all hot paths are O(1): a per-page kind byte locates the block holding any
address, dicts map blocks and user pointers to their :class:`Allocation`.

Small requests take a slot of a bucket page (slot sizes ``32 << i`` up to half a
page, every slot aligned to its size); larger ones take a page chunk from the
:class:`PageAllocator`, returned to it on free.  Bucket pages stay bucket pages,
as in Rumprun.  Each user pointer is preceded by the thesis's 8-byte
``struct memalloc_hdr`` written into guest memory for the guest's benefit only:
the bookkeeping lives in Python and nothing is ever read back from the guest,
so a guest scribbling over headers cannot confuse the allocator.

Placement rule: a request of ``size`` bytes aligned to ``align`` needs a block of
at least ``max(size, 1) + align`` bytes; blocks are aligned to their size, so
the user pointer is always ``block + align`` (``mh_alignpad == align``) and the
header fits in front of it.  The same offset in any other block of the same
index is equally aligned, which is what :meth:`MemAlloc.duplicate` relies on.
The price, as in Rumprun, is power-of-two rounding: malloc(4096) takes 8 KiB.

One MemAlloc serves one VM and is not locked: call it from the VM's thread only.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

from tender_service.bmk.pagealloc import PageAllocator

logger = logging.getLogger(__name__)

STATE_VERSION = 1

#: struct memalloc_hdr { uint32 mh_alignpad; uint16 mh_magic; uint8 mh_index; uint8 mh_who; }
HDR = struct.Struct("<IHBB")
HDR_SIZE = HDR.size
MAGIC = 0xB3C5

MEMWHO_WIREDBMK = 0  #: kernel memory: thread stacks, TLS blocks
MEMWHO_RUMPKERN = 1  #: rump kernel memory
MEMWHO_USER = 2  #: guest malloc

MIN_SLOT_SHIFT = 5  #: smallest bucket slot is 32 bytes
MIN_ALIGN = 16  #: musl's malloc alignment; smaller requests are raised to it
SIZE_MAX = (1 << 64) - 1

#: _page_kind values: 0 = not ours, 1..127 = bucket index + 1, CHUNK_KIND + order = chunk page
CHUNK_KIND = 128


@dataclass(slots=True)
class Allocation:
    """One live block; the authoritative record (the guest header is only a copy)."""

    user: int  #: user pointer (guest address)
    block: int  #: start of the block (guest address)
    block_size: int  #: bytes in the block, header and padding included
    size: int  #: bytes requested
    owner: int  #: owning process (pid), freed with it
    who: int  #: MEMWHO_*
    index: int  #: bucket index, or nbuckets + page order for page chunks


def _int(value: Any, what: str) -> int:
    """An int from snapshot data (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"memalloc state: {what} must be an int, got {value!r}")
    return value


class MemAlloc:
    """malloc/free over a PageAllocator, with per-owner accounting for fork/exit."""

    __slots__ = (
        "mem",
        "base",
        "pages",
        "nbuckets",
        "_hbase",
        "_hsize",
        "_pshift",
        "_max_slot",
        "_slot_masks",
        "_free_slots",
        "_page_kind",
        "_bucket_pages",
        "_by_user",
        "_by_block",
        "_owners",
        "_chunk_bytes",
        "_live_bytes",
        "_zeros",
        "_base_align",
    )

    def __init__(self, mem: memoryview, base: int, pages: PageAllocator) -> None:
        mem = memoryview(mem)
        if mem.format != "B" or mem.ndim != 1:
            mem = mem.cast("B")
        if mem.readonly:
            raise ValueError("heap memoryview must be writable")
        if pages.base < base or pages.base + pages.size > base + len(mem):
            raise ValueError("the page allocator's heap lies outside the memoryview")
        self.mem = mem
        self.base = base  #: guest address of mem[0]
        self.pages = pages
        self._pshift = pages.page_shift
        self.nbuckets = self._pshift - MIN_SLOT_SHIFT  #: slots 32 .. page_size/2
        self._hbase = pages.base
        self._hsize = pages.size
        self._max_slot = pages.page_size >> 1
        # kind byte -> mask that rounds a heap offset down to its slot (index 0 unused)
        self._slot_masks = [0] + [~((32 << i) - 1) for i in range(self.nbuckets)]
        self._free_slots: list[list[int]] = [[] for _ in range(self.nbuckets)]
        self._page_kind = bytearray(pages.npages)
        self._bucket_pages: list[int] = []  # page addresses, in the order they were carved
        self._by_user: dict[int, Allocation] = {}
        self._by_block: dict[int, Allocation] = {}
        self._owners: dict[int, dict[int, Allocation]] = {}  # owner -> user ptr -> allocation
        self._chunk_bytes = 0
        self._live_bytes = 0
        self._zeros = memoryview(bytes(pages.page_size))
        # page chunks are aligned to min(block size, this), so larger alignments are refused
        self._base_align = self._hbase & -self._hbase if self._hbase else 1 << 64

    # -- block management ---------------------------------------------------------

    def _take_block(self, index: int) -> int:
        """A free block of bucket index / chunk index, or 0 when memory is exhausted."""
        if index < self.nbuckets:
            slots = self._free_slots[index]
            if not slots:
                page = self.pages.alloc(1)
                if page is None:
                    return 0
                self._page_kind[(page - self._hbase) >> self._pshift] = index + 1
                self._bucket_pages.append(page)
                step = 32 << index
                # pop() hands out the lowest slot first
                slots.extend(range(page + self.pages.page_size - step, page - 1, -step))
            return slots.pop()
        order = index - self.nbuckets
        block = self.pages.alloc(1 << order)
        if block is None:
            return 0
        first = (block - self._hbase) >> self._pshift
        self._page_kind[first : first + (1 << order)] = bytes([CHUNK_KIND + order]) * (1 << order)
        self._chunk_bytes += self.pages.page_size << order
        return block

    def _record(self, a: Allocation) -> None:
        self._by_user[a.user] = a
        self._by_block[a.block] = a
        self._own(a)
        self._live_bytes += a.block_size

    def _own(self, a: Allocation) -> None:
        owned = self._owners.get(a.owner)
        if owned is None:
            owned = self._owners[a.owner] = {}
        owned[a.user] = a

    def _release(self, a: Allocation) -> None:
        """Give the block back; the caller removes it from the owner's dict."""
        del self._by_user[a.user]
        del self._by_block[a.block]
        self._live_bytes -= a.block_size
        if a.index < self.nbuckets:
            self._free_slots[a.index].append(a.block)
            return
        first = (a.block - self._hbase) >> self._pshift
        npages = a.block_size >> self._pshift
        self._page_kind[first : first + npages] = bytes(npages)
        self._chunk_bytes -= a.block_size
        self.pages.free(a.block)

    def _unown(self, a: Allocation) -> None:
        owned = self._owners[a.owner]
        del owned[a.user]
        if not owned:
            del self._owners[a.owner]

    # -- malloc family ------------------------------------------------------------

    def malloc(
        self, size: int, align: int = MIN_ALIGN, owner: int = 0, who: int = MEMWHO_USER
    ) -> int:
        """User pointer aligned to align, or 0 when out of memory.

        ValueError for a negative size, an alignment that is not a power of two
        (or exceeds the heap base's alignment) and a who that is not a uint8.
        """
        if size < 0 or align <= 0 or align & (align - 1) or not 0 <= who <= 0xFF:
            raise ValueError(f"bad malloc arguments: size {size}, align {align}, who {who}")
        if align < MIN_ALIGN:
            align = MIN_ALIGN
        need = (size or 1) + align
        if need <= self._max_slot:  # the hot path: pop a bucket slot
            index = (need - 1).bit_length() - MIN_SLOT_SHIFT
            if index < 0:
                index = 0
            block_size = 32 << index
            slots = self._free_slots[index]
            block = slots.pop() if slots else self._take_block(index)
        else:
            if align > self._base_align:
                raise ValueError(f"alignment {align:#x} exceeds the heap base's alignment")
            order = ((need - 1) >> self._pshift).bit_length()
            if order > self.pages.max_order:
                return 0
            index = self.nbuckets + order
            block_size = self.pages.page_size << order
            block = self._take_block(index)
        if not block:
            logger.debug("malloc(%d, %d): out of memory", size, align)
            return 0
        user = block + align
        HDR.pack_into(self.mem, user - HDR_SIZE - self.base, align, MAGIC, index, who)
        a = Allocation(user, block, block_size, size, owner, who, index)
        self._by_user[user] = a
        self._by_block[block] = a
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = {}
        owned[user] = a
        self._live_bytes += block_size
        return user

    def calloc(self, nmemb: int, size: int, owner: int = 0, who: int = MEMWHO_USER) -> int:
        """Zeroed allocation of nmemb*size bytes; 0 on overflow of size_t or no memory."""
        if nmemb < 0 or size < 0:
            raise ValueError(f"negative calloc arguments {nmemb}, {size}")
        nbytes = nmemb * size
        if nbytes > SIZE_MAX:
            return 0
        user = self.malloc(nbytes, MIN_ALIGN, owner, who)
        if user and nbytes:  # recycled memory is not zero
            off = user - self.base
            zeros = self._zeros[:nbytes] if nbytes <= len(self._zeros) else bytes(nbytes)
            self.mem[off : off + nbytes] = zeros
        return user

    def realloc(self, ptr: int, size: int, owner: int = 0, who: int | None = MEMWHO_USER) -> int:
        """Resize; 0 on failure (bad pointer, wrong who, no memory) with the old block intact.

        In place (same allocation, same owner) when the new size fits the block;
        otherwise the data moves to a new block owned by ``owner`` with the old
        block's who.  ``realloc(0, n)`` is ``malloc(n)``.
        """
        if ptr == 0:
            return self.malloc(size, MIN_ALIGN, owner, MEMWHO_USER if who is None else who)
        if size < 0:
            raise ValueError(f"negative allocation size {size}")
        a = self._by_user.get(ptr)
        if a is None or (who is not None and a.who != who):
            return 0
        end = a.block + a.block_size
        if ptr + (size or 1) <= end:
            a.size = size
            return ptr
        new = self.malloc(size, MIN_ALIGN, owner, a.who)
        if not new:
            return 0
        keep = min(size, end - ptr)
        src, dst = ptr - self.base, new - self.base
        self.mem[dst : dst + keep] = self.mem[src : src + keep]
        self._unown(a)
        self._release(a)
        return new

    def free(self, ptr: int, who: int | None = MEMWHO_USER) -> bool:
        """Free a live allocation's user pointer; False (and no change) for anything else.

        ``who`` must match the allocation's (so guest free() cannot release a
        kernel stack); None skips that check.
        """
        a = self._by_user.get(ptr)
        if a is None or (who is not None and a.who != who):
            return False
        owned = self._owners[a.owner]
        del owned[ptr]
        if not owned:
            del self._owners[a.owner]
        if a.index < self.nbuckets:  # the hot path: push the slot back
            del self._by_user[ptr]
            del self._by_block[a.block]
            self._live_bytes -= a.block_size
            self._free_slots[a.index].append(a.block)
        else:
            self._release(a)
        return True

    def usable_size(self, ptr: int) -> int:
        """Bytes usable from ptr to the end of its block, -1 if ptr is not live."""
        a = self._by_user.get(ptr)
        return -1 if a is None else a.block + a.block_size - ptr

    def get(self, ptr: int) -> Allocation | None:
        """The live allocation whose user pointer is ptr."""
        return self._by_user.get(ptr)

    def addr_is_managed(self, addr: int) -> Allocation | None:
        """The live allocation whose block (header included) contains addr; O(1)."""
        off = addr - self._hbase
        if off < 0 or off >= self._hsize:
            return None
        kind = self._page_kind[off >> self._pshift]
        if kind == 0:
            return None
        if kind < CHUNK_KIND:
            return self._by_block.get(self._hbase + (off & self._slot_masks[kind]))
        shift = self._pshift + kind - CHUNK_KIND
        return self._by_block.get(self._hbase + (off >> shift << shift))

    # -- fork support -------------------------------------------------------------

    def duplicate(self, a: Allocation, owner: int) -> Allocation | None:
        """Copy a's whole block (header included) into a new block owned by owner.

        The user pointer keeps its offset in the block, so interior pointers
        rebase by ``new.block - a.block``.  None when out of memory.
        """
        if self._by_block.get(a.block) is not a:
            raise ValueError(f"duplicate of an allocation that is not live: {a!r}")
        block = self._take_block(a.index)
        if not block:
            logger.debug("duplicate of %#x (%d bytes): out of memory", a.user, a.block_size)
            return None
        src, dst = a.block - self.base, block - self.base
        self.mem[dst : dst + a.block_size] = self.mem[src : src + a.block_size]
        new = Allocation(
            block + (a.user - a.block), block, a.block_size, a.size, owner, a.who, a.index
        )
        self._record(new)
        return new

    def free_owner(self, owner: int) -> int:
        """Free every allocation of owner (process exit); bytes of blocks freed."""
        owned = self._owners.pop(owner, None)
        if not owned:
            return 0
        freed = 0
        for a in owned.values():
            freed += a.block_size
            self._release(a)
        return freed

    def reown(self, old_owner: int, new_owner: int) -> int:
        """Hand every allocation of old_owner to new_owner; number of allocations moved."""
        owned = self._owners.get(old_owner)
        if not owned or old_owner == new_owner:
            return len(owned) if owned else 0
        del self._owners[old_owner]
        for a in owned.values():
            a.owner = new_owner
        dest = self._owners.get(new_owner)
        if dest is None:
            self._owners[new_owner] = owned
        else:
            dest.update(owned)
        return len(owned)

    def give(self, ptr: int, owner: int) -> None:
        """Hand the live allocation ``ptr`` to ``owner`` (a kept thread stack taken by
        a fork: rump/stacks.py); KeyError if ``ptr`` is not live."""
        a = self._by_user[ptr]
        self._unown(a)
        a.owner = owner
        self._own(a)

    def owned(self, owner: int) -> list[Allocation]:
        """Live allocations of owner, oldest first."""
        owned = self._owners.get(owner)
        return list(owned.values()) if owned else []

    def owned_bytes(self, owner: int) -> int:
        """Sum of the block sizes owned by owner."""
        owned = self._owners.get(owner)
        return sum(a.block_size for a in owned.values()) if owned else 0

    def owned_count(self, owner: int) -> int:
        owned = self._owners.get(owner)
        return len(owned) if owned else 0

    # -- accounting ---------------------------------------------------------------

    @property
    def committed_bytes(self) -> int:
        """Bytes taken from the page allocator: bucket pages plus page chunks."""
        return (len(self._bucket_pages) << self._pshift) + self._chunk_bytes

    @property
    def live_bytes(self) -> int:
        """Sum of the block sizes of live allocations."""
        return self._live_bytes

    @property
    def live_count(self) -> int:
        return len(self._by_user)

    @property
    def bucket_pages(self) -> int:
        return len(self._bucket_pages)

    @property
    def heap_range(self) -> tuple[int, int]:
        """[start, end) of the heap: a cheap (vectorisable) pre-filter for stack scans."""
        return self._hbase, self._hbase + self._hsize

    # -- snapshots ----------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Plain JSON-able state; list orders are kept so a restore behaves identically.

        The page allocator and guest memory are snapshotted separately.
        """
        return {
            "version": STATE_VERSION,
            "heap_base": self._hbase,
            "page_size": self.pages.page_size,
            "bucket_pages": [
                [page, self._page_kind[(page - self._hbase) >> self._pshift] - 1]
                for page in self._bucket_pages
            ],
            "free_slots": [list(slots) for slots in self._free_slots],
            "allocations": [
                [a.user, a.block, a.block_size, a.size, a.owner, a.who, a.index]
                for owned in self._owners.values()
                for a in owned.values()
            ],
        }

    @classmethod
    def from_state(
        cls, mem: memoryview, base: int, pages: PageAllocator, state: dict[str, Any]
    ) -> MemAlloc:
        """Rebuild from export_state() over a restored PageAllocator, checking consistency."""
        if not isinstance(state, dict):
            raise ValueError("memalloc state must be a dict")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"unsupported memalloc state version {version!r} (expected {STATE_VERSION})"
            )
        try:
            return cls._restore(mem, base, pages, state)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed memalloc state: {exc!r}") from exc

    @classmethod
    def _restore(
        cls, mem: memoryview, base: int, pages: PageAllocator, state: dict[str, Any]
    ) -> MemAlloc:
        if state["heap_base"] != pages.base or state["page_size"] != pages.page_size:
            raise ValueError("memalloc state does not match the page allocator's heap")
        self = cls(mem, base, pages)
        for entry in state["bucket_pages"]:
            self._restore_bucket_page(entry, pages)
        seen: set[int] = set()  # every block restored so far: none may appear twice
        for index, slots in enumerate(state["free_slots"]):
            for s in slots:
                block = _int(s, "free slot")
                if self._restored_bucket_of(block) != index or block in seen:
                    raise ValueError(f"memalloc state: bad free slot {block:#x}")
                seen.add(block)
                self._free_slots[index].append(block)
        for entry in state["allocations"]:
            self._restore_allocation(entry, pages, seen)
        self._check_every_slot_accounted()
        return self

    def _restore_bucket_page(self, entry: Any, pages: PageAllocator) -> None:
        page, index = _int(entry[0], "bucket page"), _int(entry[1], "bucket index")
        if not 0 <= index < self.nbuckets or pages.block_pages(page) != 1:
            raise ValueError(f"memalloc state: bad bucket page {entry!r}")
        kind_at = (page - self._hbase) >> self._pshift
        if self._page_kind[kind_at]:
            raise ValueError(f"memalloc state: bucket page {page:#x} listed twice")
        self._page_kind[kind_at] = index + 1
        self._bucket_pages.append(page)

    def _restored_bucket_of(self, block: int) -> int:
        """The bucket whose restored page holds slot ``block``; refused if none does."""
        off = block - self._hbase
        kind = self._page_kind[off >> self._pshift] if 0 <= off < self._hsize else 0
        if not 0 < kind < CHUNK_KIND or off & ((32 << (kind - 1)) - 1):
            raise ValueError(f"memalloc state: {block:#x} is not a bucket slot")
        return kind - 1

    def _restore_allocation(self, entry: Any, pages: PageAllocator, seen: set[int]) -> None:
        nb, pshift = self.nbuckets, self._pshift
        if not isinstance(entry, list | tuple) or len(entry) != 7:
            raise ValueError(f"memalloc state: bad allocation record {entry!r}")
        a = Allocation(*(_int(v, "allocation field") for v in entry))
        if not 0 <= a.who <= 0xFF or not 0 <= a.index <= nb + pages.max_order:
            raise ValueError(f"memalloc state: bad allocation {entry!r}")
        if a.index < nb:
            if self._restored_bucket_of(a.block) != a.index or a.block_size != 32 << a.index:
                raise ValueError(f"memalloc state: bad bucket allocation {entry!r}")
        else:
            npages = 1 << (a.index - nb)
            if pages.block_pages(a.block) != npages or a.block_size != npages << pshift:
                raise ValueError(f"memalloc state: bad chunk allocation {entry!r}")
            first = (a.block - self._hbase) >> pshift
            if any(self._page_kind[first : first + npages]):
                raise ValueError(f"memalloc state: chunk {a.block:#x} overlaps")
            self._page_kind[first : first + npages] = bytes([CHUNK_KIND + a.index - nb]) * npages
            self._chunk_bytes += a.block_size
        if a.block in seen or not a.block + HDR_SIZE <= a.user < a.block + a.block_size:
            raise ValueError(f"memalloc state: bad allocation {entry!r}")
        seen.add(a.block)
        self._record(a)

    def _check_every_slot_accounted(self) -> None:
        """Each slot of a restored bucket page is either free or allocated."""
        pshift, nb, page_size = self._pshift, self.nbuckets, self.pages.page_size
        slots_total = sum(
            page_size >> (MIN_SLOT_SHIFT + self._page_kind[(p - self._hbase) >> pshift] - 1)
            for p in self._bucket_pages
        )
        slots_used = sum(len(slots) for slots in self._free_slots) + sum(
            1 for a in self._by_block.values() if a.index < nb
        )
        if slots_used != slots_total:
            raise ValueError("memalloc state: some bucket slots are neither free nor allocated")

"""bmk memory layer: buddy page allocator and bucket/chunk malloc over real guest memory."""

from __future__ import annotations

import json
import mmap
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tender_service.bmk.memalloc import (
    HDR_SIZE,
    MAGIC,
    MEMWHO_RUMPKERN,
    MEMWHO_USER,
    MEMWHO_WIREDBMK,
    Allocation,
    MemAlloc,
)
from tender_service.bmk.pagealloc import PageAllocator

BASE = 0x4000_0000_0000
PAGE = 4096


def make(npages: int = 64, *, use_mmap: bool = False) -> tuple[memoryview, PageAllocator, MemAlloc]:
    """A heap of npages pages at BASE, backed by a bytearray (or an anonymous mmap)."""
    size = npages * PAGE
    buf = mmap.mmap(-1, size) if use_mmap else bytearray(size)
    mem = memoryview(buf)
    pages = PageAllocator(BASE, size)
    return mem, pages, MemAlloc(mem, BASE, pages)


def header(mem: memoryview, user: int) -> tuple[int, int, int, int]:
    return struct.unpack_from("<IHBB", mem, user - HDR_SIZE - BASE)


def fill(mem: memoryview, a: Allocation, seed: int) -> bytes:
    """Write a recognisable pattern over the user part of a and return it."""
    n = a.block + a.block_size - a.user
    data = random.Random(seed).randbytes(n)
    mem[a.user - BASE : a.user - BASE + n] = data
    return data


def user_bytes(mem: memoryview, ptr: int, n: int) -> bytes:
    return bytes(mem[ptr - BASE : ptr - BASE + n])


def assert_disjoint(allocs: list[Allocation]) -> None:
    spans = sorted((a.block, a.block + a.block_size) for a in allocs)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start


# --------------------------------------------------------------------------- page allocator


def test_pages_cover_non_power_of_two_heap() -> None:
    pages = PageAllocator(BASE, 13 * PAGE + 100)  # the partial page is dropped
    assert pages.size == 13 * PAGE
    assert pages.free_blocks() == [
        (BASE, 8 * PAGE),
        (BASE + 8 * PAGE, 4 * PAGE),
        (BASE + 12 * PAGE, PAGE),
    ]
    got = [pages.alloc(1) for _ in range(13)]
    assert None not in got and len(set(got)) == 13
    assert pages.alloc(1) is None and pages.free_bytes == 0
    for addr in reversed(got):
        pages.free(addr)
    assert pages.free_blocks() == [
        (BASE, 8 * PAGE),
        (BASE + 8 * PAGE, 4 * PAGE),
        (BASE + 12 * PAGE, PAGE),
    ]
    assert pages.used_bytes == 0


@pytest.mark.parametrize("seed", range(8))
def test_pages_random_alignment_disjoint_and_full_merge(seed: int) -> None:
    rng = random.Random(seed)
    pages = PageAllocator(BASE, 256 * PAGE)
    live: dict[int, int] = {}
    for _ in range(600):
        if live and rng.random() < 0.45:
            addr = rng.choice(list(live))
            pages.free(addr)
            del live[addr]
        else:
            n = rng.choice([1, 1, 2, 3, 4, 5, 8, 13, 32])
            addr = pages.alloc(n)
            if addr is None:
                assert pages.free_bytes < PAGE << PageAllocator.order_for(n) or live
                continue
            npages = pages.block_pages(addr)
            assert npages >= n and npages & (npages - 1) == 0
            assert (addr - BASE) % (npages * PAGE) == 0
            live[addr] = npages
        assert pages.used_bytes == sum(live.values()) * PAGE
        assert pages.used_bytes + pages.free_bytes == pages.size
        spans = sorted((a, a + n * PAGE) for a, n in live.items())
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:], strict=False))
        assert sorted(pages.allocated_blocks()) == sorted((a, n * PAGE) for a, n in live.items())
    for addr in live:
        pages.free(addr)
    assert pages.free_blocks() == [(BASE, 256 * PAGE)]
    assert pages.used_bytes == 0


def test_pages_misuse_raises_and_changes_nothing() -> None:
    pages = PageAllocator(BASE, 16 * PAGE)
    a = pages.alloc(2)
    assert a is not None
    before = pages.export_state()
    for bad in (a + PAGE, a + 8, BASE - PAGE, BASE + 64 * PAGE, 0):
        with pytest.raises(ValueError):
            pages.free(bad)
        with pytest.raises(ValueError):
            pages.block_pages(bad)
    with pytest.raises(ValueError):
        pages.alloc(0)
    assert pages.alloc(32) is None  # larger than the heap
    assert pages.export_state() == before
    pages.free(a)
    with pytest.raises(ValueError):
        pages.free(a)  # double free
    with pytest.raises(ValueError):
        PageAllocator(BASE + 8, 16 * PAGE)
    with pytest.raises(ValueError):
        PageAllocator(BASE, 16 * PAGE, page_size=3000)


def test_pages_exhaustion_then_recovery() -> None:
    pages = PageAllocator(BASE, 8 * PAGE)
    big = pages.alloc(5)  # rounds to 8 pages: the whole heap
    assert big is not None and pages.block_pages(big) == 8
    assert pages.alloc(1) is None and pages.free_bytes == 0
    pages.free(big)
    assert pages.alloc(8) == BASE


def test_pages_state_round_trip_behaves_identically() -> None:
    rng = random.Random(7)
    pages = PageAllocator(BASE, 100 * PAGE)
    live = [a for a in (pages.alloc(rng.randint(1, 6)) for _ in range(20)) if a is not None]
    for addr in live[::3]:
        pages.free(addr)
    live = [a for i, a in enumerate(live) if i % 3]
    clone = PageAllocator.from_state(json.loads(json.dumps(pages.export_state())))
    assert clone.export_state() == pages.export_state()
    for _ in range(200):
        if live and rng.random() < 0.5:
            addr = live.pop(rng.randrange(len(live)))
            pages.free(addr)
            clone.free(addr)
        else:
            n = rng.randint(1, 9)
            addr = pages.alloc(n)
            assert clone.alloc(n) == addr
            if addr is not None:
                live.append(addr)
    assert clone.export_state() == pages.export_state()


def test_pages_state_rejects_bad_input() -> None:
    pages = PageAllocator(BASE, 16 * PAGE)
    pages.alloc(1)
    state = pages.export_state()
    with pytest.raises(ValueError, match="version"):
        PageAllocator.from_state({**state, "version": 99})
    with pytest.raises(ValueError, match="version"):
        PageAllocator.from_state({k: v for k, v in state.items() if k != "version"})
    with pytest.raises(ValueError):
        PageAllocator.from_state({**state, "allocated": []})  # a hole in the tiling
    with pytest.raises(ValueError):
        PageAllocator.from_state({**state, "allocated": state["allocated"] * 2})
    with pytest.raises(ValueError, match="malformed"):
        PageAllocator.from_state({k: v for k, v in state.items() if k != "free"})
    with pytest.raises(ValueError):
        PageAllocator.from_state({**state, "base": "0x4000"})


# --------------------------------------------------------------------------- malloc family


def test_header_layout_and_alignment() -> None:
    mem, pages, ma = make()
    cases = [
        (0, 16),
        (1, 16),
        (24, 16),
        (100, 32),
        (1000, 64),
        (2032, 16),
        (3000, 16),
        (5000, 4096),
        (1, 4096),
        (70_000, 16),
        (10, 8),
        (10, 1),
    ]
    for i, (size, align) in enumerate(cases):
        who = (MEMWHO_USER, MEMWHO_RUMPKERN, MEMWHO_WIREDBMK)[i % 3]
        ptr = ma.malloc(size, align, owner=5, who=who)
        assert ptr
        a = ma.get(ptr)
        assert a is not None and (a.size, a.owner, a.who) == (size, 5, who)
        assert ptr % max(align, 16) == 0
        assert a.block <= ptr - HDR_SIZE and ptr + size <= a.block + a.block_size
        assert ma.usable_size(ptr) >= size
        alignpad, magic, index, mh_who = header(mem, ptr)
        assert (alignpad, magic, index, mh_who) == (ptr - a.block, MAGIC, a.index, who)
        if a.index < ma.nbuckets:
            assert a.block_size == 32 << a.index
        else:
            assert a.block_size == PAGE << (a.index - ma.nbuckets)
    assert ma.live_count == len(cases)


def test_size_zero_is_unique() -> None:
    _, _, ma = make()
    ptrs = {ma.malloc(0) for _ in range(300)}
    assert 0 not in ptrs and len(ptrs) == 300
    assert all(ma.usable_size(p) >= 0 for p in ptrs)


def test_bad_arguments_raise() -> None:
    _, _, ma = make()
    for align in (0, 3, 24, -16):
        with pytest.raises(ValueError):
            ma.malloc(8, align)
    with pytest.raises(ValueError):
        ma.malloc(-1)
    with pytest.raises(ValueError):
        ma.malloc(8, who=256)
    with pytest.raises(ValueError):
        ma.calloc(-1, 4)
    assert ma.live_count == 0 and ma.committed_bytes == 0


def test_calloc_zeroes_recycled_memory() -> None:
    mem, _, ma = make()
    for size in (24, 1000, 9000):
        ptr = ma.malloc(size)
        mem[ptr - BASE : ptr - BASE + size] = b"\xff" * size
        assert ma.free(ptr)
        again = ma.calloc(1, size)
        assert again == ptr  # the same block was handed out again
        assert user_bytes(mem, again, size) == bytes(size)
    assert ma.calloc(1 << 33, 1 << 33) == 0  # size_t overflow
    assert ma.calloc(1 << 40, 1) == 0  # more than the heap
    assert ma.calloc(0, 10) != 0


def test_realloc_in_place_grow_shrink_and_failure() -> None:
    mem, _, ma = make(16)
    p = ma.malloc(10)
    data = fill(mem, ma.get(p), 1)
    assert ma.realloc(p, 16) == p  # still fits the 32-byte slot
    q = ma.realloc(p, 100)
    assert q != p and ma.get(p) is None
    assert user_bytes(mem, q, 16) == data[:16]
    data = fill(mem, ma.get(q), 2)
    r = ma.realloc(q, 20_000)  # into a page chunk
    assert user_bytes(mem, r, len(data)) == data
    assert ma.realloc(r, 5) == r and ma.get(r).size == 5  # shrinking stays in place
    before = (ma.export_state(), bytes(mem))
    assert ma.realloc(r, 10 * 16 * PAGE) == 0  # too big: the old block is untouched
    assert ma.realloc(r + 16, 10) == 0  # not a user pointer
    assert (ma.export_state(), bytes(mem)) == before
    assert ma.realloc(0, 40) != 0


def test_misuse_is_refused_without_change() -> None:
    mem, _, ma = make()
    p = ma.malloc(100)
    stack = ma.malloc(8192, 16, owner=1, who=MEMWHO_WIREDBMK)
    before = ma.export_state()
    assert not ma.free(p + 8)  # interior pointer
    assert not ma.free(p - HDR_SIZE)
    assert not ma.free(0)
    assert not ma.free(BASE - 16)
    assert not ma.free(stack)  # a kernel stack through the user path
    assert ma.realloc(stack, 10) == 0
    assert ma.usable_size(p + 1) == -1
    assert ma.export_state() == before
    assert ma.free(p)
    assert not ma.free(p)  # double free
    assert ma.usable_size(p) == -1
    assert ma.free(stack, who=MEMWHO_WIREDBMK)


def test_exhaustion_returns_zero_and_state_stays_consistent() -> None:
    mem, pages, ma = make(16)
    ptrs = []
    while (p := ma.malloc(3000)) != 0:
        ptrs.append(p)
    assert len(ptrs) == 16 and pages.free_bytes == 0
    assert ma.malloc(1) == 0 and ma.calloc(1, 1) == 0  # no page left for a bucket
    assert ma.duplicate(ma.get(ptrs[0]), owner=9) is None
    assert ma.committed_bytes == pages.used_bytes == 16 * PAGE
    for p in ptrs:
        assert ma.free(p)
    assert pages.used_bytes == 0 and pages.free_blocks() == [(BASE, 16 * PAGE)]
    # small objects: fill bucket pages until nothing is left, then free everything
    small = []
    while (p := ma.malloc(40)) != 0:
        small.append(p)
    assert len(small) == 16 * (PAGE // 64)
    for p in small:
        assert ma.free(p)
    assert ma.live_bytes == 0 and ma.bucket_pages == 16  # bucket pages stay bucket pages
    assert ma.committed_bytes == pages.used_bytes == 16 * PAGE
    assert ma.malloc(40) != 0 and ma.malloc(5000) == 0


def test_addr_is_managed() -> None:
    mem, pages, ma = make()
    p = ma.malloc(40)  # 64-byte slot
    q = ma.malloc(40)
    big = ma.malloc(3 * PAGE, 4096)  # 4 pages
    a, b, c = ma.get(p), ma.get(q), ma.get(big)
    for alloc in (a, b, c):
        for addr in (
            alloc.block,
            alloc.user - HDR_SIZE,
            alloc.user,
            alloc.block + alloc.block_size - 1,
        ):
            assert ma.addr_is_managed(addr) is alloc
        assert ma.addr_is_managed(alloc.block + alloc.block_size) is not alloc
    assert a.block + a.block_size == b.block
    assert ma.addr_is_managed(a.block + a.block_size) is b
    assert ma.addr_is_managed(big + 2 * PAGE + 123) is c
    assert ma.addr_is_managed(b.block + b.block_size) is None  # a free slot
    for addr in (0, BASE - 1, BASE + pages.size, BASE + pages.size + 10, 1 << 63):
        assert ma.addr_is_managed(addr) is None
    ma.free(q)
    ma.free(big)
    assert ma.addr_is_managed(q) is None
    assert ma.addr_is_managed(big) is None and ma.addr_is_managed(c.block + PAGE) is None
    free_page = max(pages.free_blocks(), key=lambda blk: blk[1])[0]
    assert ma.addr_is_managed(free_page + 5) is None


def test_duplicate_copies_block_and_header() -> None:
    mem, _, ma = make()
    for size, align in ((40, 16), (500, 128), (10_000, 16), (100, 4096)):
        ptr = ma.malloc(size, align, owner=1, who=MEMWHO_RUMPKERN)
        a = ma.get(ptr)
        fill(mem, a, size)
        copy = ma.duplicate(a, owner=2)
        assert copy is not None and copy.block != a.block
        assert (copy.block_size, copy.size, copy.who, copy.index, copy.owner) == (
            a.block_size,
            a.size,
            a.who,
            a.index,
            2,
        )
        assert copy.user - copy.block == a.user - a.block and copy.user % align == 0
        assert user_bytes(mem, copy.block, a.block_size) == user_bytes(mem, a.block, a.block_size)
        assert header(mem, copy.user) == header(mem, a.user)
        assert ma.get(copy.user) is copy and ma.addr_is_managed(copy.block) is copy
        assert ma.get(ptr) is a  # the original is untouched
    stale = ma.get(ma.malloc(8))
    ma.free(stale.user)
    with pytest.raises(ValueError):
        ma.duplicate(stale, owner=3)


def test_owner_accounting_free_owner_and_reown() -> None:
    _, pages, ma = make()
    sizes = {1: [10, 100, 5000], 2: [40, 40], 3: [20_000]}
    for owner, lst in sizes.items():
        for s in lst:
            assert ma.malloc(s, owner=owner)
    stack = ma.malloc(8000, owner=2, who=MEMWHO_WIREDBMK)
    blocks = {o: sum(a.block_size for a in ma.owned(o)) for o in (1, 2, 3)}
    assert blocks == {1: 32 + 128 + 8192, 2: 64 + 64 + 8192, 3: 32768}
    for o in (1, 2, 3):
        assert ma.owned_bytes(o) == blocks[o]
    assert [ma.owned_count(o) for o in (1, 2, 3, 4)] == [3, 3, 1, 0]
    assert ma.live_bytes == sum(blocks.values())
    assert ma.reown(2, 1) == 3
    assert ma.owned_count(2) == 0 and ma.owned_count(1) == 6
    assert ma.get(stack).owner == 1
    assert ma.reown(7, 1) == 0 and ma.reown(1, 1) == 6
    assert ma.free_owner(1) == blocks[1] + blocks[2]
    assert ma.free_owner(1) == 0
    assert ma.get(stack) is None and ma.live_bytes == blocks[3]
    assert ma.free_owner(3) == 32768
    assert ma.live_count == 0 and ma.committed_bytes == ma.bucket_pages * PAGE == pages.used_bytes


def test_realloc_ownership() -> None:
    _, _, ma = make()
    p = ma.malloc(10, owner=1)
    assert ma.realloc(p, 16, owner=2) == p and ma.get(p).owner == 1  # in place: same allocation
    q = ma.realloc(p, 500, owner=2)
    assert ma.get(q).owner == 2 and ma.owned_count(1) == 0


def random_ops(
    ma: MemAlloc, mem: memoryview, rng: random.Random, steps: int, live: list[int]
) -> list:
    """Drive ma with random calls; return every observable result."""
    out: list = []
    for _ in range(steps):
        r = rng.random()
        if live and r < 0.35:
            p = live.pop(rng.randrange(len(live)))
            out.append(ma.free(p))
        elif live and r < 0.5:
            i = rng.randrange(len(live))
            q = ma.realloc(
                live[i], rng.choice([0, 8, 64, 300, 3000, 9000]), owner=rng.randint(1, 3)
            )
            if q:
                live[i] = q
            out.append(q)
        elif live and r < 0.55:
            a = ma.duplicate(ma.get(rng.choice(live)), owner=rng.randint(1, 3))
            if a is not None:
                live.append(a.user)
            out.append(a)
        elif r < 0.6:
            owner = rng.randint(1, 3)
            out.append(ma.free_owner(owner))
            live[:] = [p for p in live if ma.get(p) is not None]
        else:
            size = rng.choice([0, 1, 16, 24, 100, 1000, 2040, 5000, 17_000])
            p = ma.malloc(size, rng.choice([16, 16, 64, 4096]), owner=rng.randint(1, 3))
            if p:
                live.append(p)
                mem[p - BASE : p - BASE + size] = rng.randbytes(size)
            out.append(p)
    return out


def test_export_import_round_trip_behaves_identically() -> None:
    mem, pages, ma = make(128)
    rng = random.Random(11)
    live: list[int] = []
    random_ops(ma, mem, rng, 400, live)
    state = json.loads(json.dumps({"pages": pages.export_state(), "mem": ma.export_state()}))
    mem2 = memoryview(bytearray(mem))
    pages2 = PageAllocator.from_state(state["pages"])
    ma2 = MemAlloc.from_state(mem2, BASE, pages2, state["mem"])
    assert ma2.export_state() == ma.export_state()
    assert (ma2.committed_bytes, ma2.live_bytes, ma2.live_count) == (
        ma.committed_bytes,
        ma.live_bytes,
        ma.live_count,
    )
    for p in live[:50]:
        assert ma2.get(p) == ma.get(p)
        assert ma2.addr_is_managed(p + 3) == ma.addr_is_managed(p + 3)
    seed = rng.random()
    out1 = random_ops(ma, mem, random.Random(seed), 600, list(live))
    out2 = random_ops(ma2, mem2, random.Random(seed), 600, list(live))
    assert out1 == out2
    assert bytes(mem) == bytes(mem2)
    assert ma2.export_state() == ma.export_state()
    assert pages2.export_state() == pages.export_state()


def test_from_state_rejects_bad_state() -> None:
    mem, pages, ma = make()
    ma.malloc(10)
    ma.malloc(10_000)
    state = ma.export_state()
    with pytest.raises(ValueError, match="version"):
        MemAlloc.from_state(mem, BASE, pages, {**state, "version": 2})
    with pytest.raises(ValueError):
        MemAlloc.from_state(mem, BASE, pages, {**state, "free_slots": [[]] * ma.nbuckets})
    bad_alloc = [list(state["allocations"][0])]
    bad_alloc[0][1] += 8  # block not on a slot boundary
    with pytest.raises(ValueError):
        MemAlloc.from_state(mem, BASE, pages, {**state, "allocations": bad_alloc})
    with pytest.raises(ValueError):
        MemAlloc.from_state(mem, BASE, PageAllocator(BASE, 64 * PAGE), state)  # pages not taken
    with pytest.raises(ValueError, match="malformed"):
        MemAlloc.from_state(mem, BASE, pages, {"version": 1})
    with pytest.raises(ValueError):
        MemAlloc.from_state(mem, BASE, pages, {**state, "allocations": [[1, 2]]})


@pytest.mark.parametrize("seed", range(4))
def test_scribbled_heap_never_confuses_the_allocator(seed: int) -> None:
    mem, pages, ma = make(64, use_mmap=True)
    rng = random.Random(seed)
    live: list[int] = []
    random_ops(ma, mem, rng, 300, live)
    expected = {p: ma.get(p) for p in live}
    mem[:] = rng.randbytes(len(mem))  # the guest overwrites every header and free slot
    probes = [rng.randrange(BASE - PAGE, BASE + pages.size + PAGE) for _ in range(3000)]
    probes += [p + d for p in live for d in (-HDR_SIZE, -1, 0, 1, 7)]
    for addr in probes:
        hit = ma.addr_is_managed(addr)
        assert hit is None or hit.block <= addr < hit.block + hit.block_size
        ma.usable_size(addr)
        if addr not in expected:
            assert not ma.free(addr)
    assert {p: ma.get(p) for p in live} == expected
    random_ops(ma, mem, rng, 300, live)  # keeps working on garbage memory
    for owner in (1, 2, 3):
        ma.free_owner(owner)
    assert ma.live_count == 0 and ma.committed_bytes == pages.used_bytes


# --------------------------------------------------------------------------- stateful model


class HeapMachine(RuleBasedStateMachine):
    """Random malloc/calloc/realloc/free/duplicate against a model of contents."""

    def __init__(self) -> None:
        super().__init__()
        self.mem, self.pages, self.ma = make(48)
        self.data: dict[int, bytes] = {}  # user pointer -> bytes the model wrote

    def _write(self, ptr: int, size: int, tag: int) -> None:
        payload = bytes((tag + i) & 0xFF for i in range(size))
        self.mem[ptr - BASE : ptr - BASE + size] = payload
        self.data[ptr] = payload

    @rule(
        size=st.integers(0, 20_000),
        align=st.sampled_from([1, 16, 32, 64, 256, 4096, 8192]),
        owner=st.integers(1, 3),
        tag=st.integers(0, 255),
    )
    def malloc(self, size: int, align: int, owner: int, tag: int) -> None:
        ptr = self.ma.malloc(size, align, owner)
        if ptr == 0:
            return
        assert ptr % max(align, 16) == 0 and ptr not in self.data
        assert header(self.mem, ptr)[1:3] == (MAGIC, self.ma.get(ptr).index)
        self._write(ptr, size, tag)

    @rule(n=st.integers(0, 50), size=st.integers(0, 300), tag=st.integers(0, 255))
    def calloc(self, n: int, size: int, tag: int) -> None:
        ptr = self.ma.calloc(n, size, owner=1)
        if ptr:
            assert user_bytes(self.mem, ptr, n * size) == bytes(n * size)
            self._write(ptr, n * size, tag)

    @precondition(lambda self: self.data)
    @rule(
        pick=st.randoms(use_true_random=False), size=st.integers(0, 12_000), tag=st.integers(0, 255)
    )
    def realloc(self, pick: random.Random, size: int, tag: int) -> None:
        ptr = pick.choice(sorted(self.data))
        old = self.data[ptr]
        new = self.ma.realloc(ptr, size, owner=2)
        if new == 0:
            assert self.ma.get(ptr) is not None
            return
        keep = min(len(old), size)
        assert user_bytes(self.mem, new, keep) == old[:keep]
        del self.data[ptr]
        self._write(new, size, tag)

    @precondition(lambda self: self.data)
    @rule(pick=st.randoms(use_true_random=False))
    def free(self, pick: random.Random) -> None:
        ptr = pick.choice(sorted(self.data))
        assert self.ma.free(ptr)
        assert not self.ma.free(ptr)
        del self.data[ptr]

    @precondition(lambda self: self.data)
    @rule(pick=st.randoms(use_true_random=False))
    def duplicate(self, pick: random.Random) -> None:
        ptr = pick.choice(sorted(self.data))
        copy = self.ma.duplicate(self.ma.get(ptr), owner=3)
        if copy is not None:
            self.data[copy.user] = self.data[ptr]

    @rule(owner=st.integers(1, 3))
    def free_owner(self, owner: int) -> None:
        freed = self.ma.free_owner(owner)
        gone = [p for p in self.data if self.ma.get(p) is None]
        assert freed >= 32 * len(gone)
        for p in gone:
            del self.data[p]

    @invariant()
    def consistent(self) -> None:
        allocs = [self.ma.get(p) for p in self.data]
        assert None not in allocs and self.ma.live_count == len(self.data)
        assert_disjoint(allocs)
        assert self.ma.live_bytes == sum(a.block_size for a in allocs)
        assert self.ma.committed_bytes == self.pages.used_bytes
        assert sum(self.ma.owned_bytes(o) for o in (1, 2, 3)) == self.ma.live_bytes
        for ptr, payload in self.data.items():
            a = self.ma.get(ptr)
            assert ptr + len(payload) <= a.block + a.block_size
            assert user_bytes(self.mem, ptr, len(payload)) == payload
            assert self.ma.addr_is_managed(ptr + len(payload) // 2) is a

    def teardown(self) -> None:
        for ptr in list(self.data):
            assert self.ma.free(ptr)
        assert self.ma.live_bytes == 0
        assert self.pages.used_bytes == self.ma.bucket_pages * PAGE


HeapMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHeap = HeapMachine.TestCase


@given(sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=40))
@settings(max_examples=50, deadline=None)
def test_chunks_merge_back_to_one_block(sizes: list[int]) -> None:
    """Only page chunks: freeing everything returns the heap to a single free block."""
    _, pages, ma = make(64)
    ptrs = [p for p in (ma.malloc(s + 2100) for s in sizes) if p]
    assert ma.bucket_pages == 0
    for p in ptrs:
        assert ma.free(p)
    assert pages.used_bytes == 0 and pages.free_blocks() == [(BASE, 64 * PAGE)]


def test_memoryview_may_start_below_the_heap() -> None:
    """mem can be the whole guest RAM: guest address a is mem[a - mem_base]."""
    mem_base = BASE - 8 * PAGE
    mem = memoryview(bytearray(24 * PAGE))
    pages = PageAllocator(BASE, 16 * PAGE)
    ma = MemAlloc(mem, mem_base, pages)
    assert ma.heap_range == (BASE, BASE + 16 * PAGE)
    p = ma.calloc(3, 100)
    assert BASE <= p < BASE + 16 * PAGE
    assert struct.unpack_from("<IHBB", mem, p - HDR_SIZE - mem_base)[1] == MAGIC
    assert bytes(mem[: 8 * PAGE]) == bytes(8 * PAGE)  # nothing written below the heap
    with pytest.raises(ValueError):
        MemAlloc(memoryview(bytearray(16 * PAGE)), mem_base, pages)  # heap outside mem
    with pytest.raises(ValueError):
        MemAlloc(memoryview(bytes(24 * PAGE)), mem_base, pages)  # read-only

"""Micro-benchmark of the bmk allocator hot paths (not a test).

Every guest malloc is a hypercall into MemAlloc and the thread-fork stack scan
calls addr_is_managed once per stack word, so these are the numbers that bound
guest malloc throughput and fork latency.  Run: ``python -m comparison.bench_alloc``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from comparison.report import grid
from tender_service.bmk.memalloc import MemAlloc
from tender_service.bmk.pagealloc import PageAllocator

BASE = 0x4000_0000_0000


def per_call_ns(fn: Callable[[], None], calls_per_run: int, repeat: int = 5) -> float:
    """Best of repeat runs, in ns per call."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        best = min(best, time.perf_counter_ns() - t0)
    return best / calls_per_run


def _pairs(ma: MemAlloc, size: int, align: int = 16, *, count: int) -> Callable[[], None]:
    def run() -> None:
        malloc, free = ma.malloc, ma.free
        for _ in range(count):
            free(malloc(size, align, 2))

    return run


def _lifo_batch(ma: MemAlloc, size: int, n: int) -> Callable[[], None]:
    def run() -> None:
        ptrs = [ma.malloc(size, 16, 2) for _ in range(n)]
        for p in ptrs:
            ma.free(p)

    return run


def _pages_pairs(pages: PageAllocator, n: int) -> Callable[[], None]:
    def run() -> None:
        alloc, free = pages.alloc, pages.free
        for _ in range(n):
            free(alloc(1))  # type: ignore[arg-type]  # room for one page: not None (unchecked: timed)

    return run


def _managed(ma: MemAlloc, words: list[int]) -> Callable[[], None]:
    def run() -> None:
        f = ma.addr_is_managed
        for w in words:
            f(w)

    return run


def _empty_loop(n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            pass

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heap-mib", type=int, default=64)
    parser.add_argument("-n", type=int, default=100_000, help="calls per timed run")
    args = parser.parse_args()
    n = args.n
    mem = memoryview(bytearray(args.heap_mib << 20))
    pages = PageAllocator(BASE, len(mem))
    ma = MemAlloc(mem, BASE, pages)
    rng = random.Random(1)
    # background population so dicts and free lists are not trivially small
    live = [ma.malloc(rng.choice([24, 100, 700, 3000]), owner=1) for _ in range(20_000)]
    for p in live[::2]:
        ma.free(p)

    hits = [p + rng.randrange(0, 16) for p in live[1::2]]
    words_hit = (hits * (n // len(hits) + 1))[:n]
    words_miss_heap = [BASE + rng.randrange(pages.size) for _ in range(n)]
    words_outside = [rng.randrange(0, 1 << 32) for _ in range(n)]

    loop = per_call_ns(_empty_loop(n), n)
    rows = [
        ("malloc+free pair, 24 B (bucket)", per_call_ns(_pairs(ma, 24, count=n), n)),
        ("malloc+free pair, 1000 B (bucket)", per_call_ns(_pairs(ma, 1000, count=n), n)),
        ("malloc+free pair, 64 B align 64", per_call_ns(_pairs(ma, 64, 64, count=n), n)),
        ("malloc+free pair, 20000 B (page chunk)", per_call_ns(_pairs(ma, 20_000, count=n), n)),
        (
            "malloc+free pair, 1 MiB (page chunk)",
            per_call_ns(_pairs(ma, 1 << 20, count=n // 10), n // 10),
        ),
        ("malloc then free, batch of n x 64 B", per_call_ns(_lifo_batch(ma, 64, n), n)),
        ("PageAllocator alloc(1)+free pair", per_call_ns(_pages_pairs(pages, n), n)),
        ("addr_is_managed, live block hit", per_call_ns(_managed(ma, words_hit), n)),
        ("addr_is_managed, heap address (mixed)", per_call_ns(_managed(ma, words_miss_heap), n)),
        ("addr_is_managed, outside the heap", per_call_ns(_managed(ma, words_outside), n)),
    ]
    print(f"heap {args.heap_mib} MiB, {ma.live_count} live allocations, n={n}, best of 5")
    body = [(name, f"{ns:.0f}") for name, ns in [*rows, ("(empty Python loop iteration)", loop)]]
    print("\n".join(grid(("operation", "ns/op"), body, {1})))


if __name__ == "__main__":
    main()

"""The thread fork's stack scan: the scan in C (guest/runtime/relocate.c) must rebase
exactly the words that a plain word-by-word pass over the same stack would."""

from __future__ import annotations

import ctypes
import struct
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from tender_service.fork.thread import _Relocator
from tender_service.machine.layout import HEAP_BASE

S_BASE = HEAP_BASE + 0x10_0000  # the parent's stack, inside the heap as in a VM
S_TOP = S_BASE + 0x4_0000
DELTA = 0x8_0000


class _NoHeapBlocks:
    """A heap with no live user block: only stack and TLS words move."""

    def __init__(self, size: int) -> None:
        self.heap_range = (HEAP_BASE, HEAP_BASE + size)

    def addr_is_managed(self, v: int) -> None:
        return None


def _interesting(tls_lo: int, tls_hi: int, heap_size: int):
    return st.one_of(
        st.integers(0, 2**64 - 1),
        st.integers(0, 1 << 20),
        st.integers(S_BASE - 64, S_TOP + 64),
        st.integers(tls_lo - 64, tls_hi + 64),
        st.integers(HEAP_BASE - 8, HEAP_BASE + heap_size + 8),
    )


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    heap_size=st.sampled_from([64 << 20, 4 << 30]),
    # below the heap, straddling a byte boundary, in the heap, inside the stack
    tls_lo=st.sampled_from([0x0123_4000, 0x00FF_FF00, HEAP_BASE + 0x20_0000, S_BASE + 0x1000]),
    pad=st.integers(0, 7),
)
def test_scan_rebases_the_same_words_as_a_plain_pass(data, heap_size, tls_lo, pad) -> None:
    tls_hi, tdelta = tls_lo + 0x300, 0x1_0000
    words = data.draw(st.lists(_interesting(tls_lo, tls_hi, heap_size), max_size=300))
    buf = bytearray(pad) + bytearray(struct.pack(f"<{len(words)}Q", *words)) + bytearray(9)
    r = _Relocator(_NoHeapBlocks(heap_size), 7, S_BASE, S_TOP, DELTA, tls_lo, tls_hi, tdelta)
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    # the registers go through the same scan; the buffer's words past nregs do not
    regs = (ctypes.c_uint64 * 16)(*words[:16])
    before = list(regs)
    r.relocate(buf, addr, (pad, len(words)), (0, 0), regs, 13)
    got = list(struct.unpack_from(f"<{len(words)}Q", buf, pad))
    assert got == [r.value(w) for w in words]
    assert list(regs) == [r.value(w) for w in before[:13]] + before[13:]
    assert buf[:pad] == bytearray(pad) and buf[-9:] == bytearray(9)  # nothing outside touched


def test_rebase_moves_region_words_and_reports_the_others_in_range() -> None:
    """The C scan over two spans: a word in a region moves by its delta (the last
    word of a region too, not the one past it); a word in ``other`` comes back as
    its index, counted across the spans."""
    from tender_service.fork.relocate import rebase

    first = [0x1000, 0x1FF8, 0x2000, 0x5000]
    second = [0x5008, 0x9000, 7, 2**64 - 1]
    bufs = [array("Q", first), array("Q", second)]
    spans = [(b.buffer_info()[0], len(b)) for b in bufs]
    others, moved = rebase(
        spans, [(0x1000, 0x2000, 0x100), (0x5000, 0x5008, -0x1000)], (0x2000, 0x9001)
    )
    assert bufs[0].tolist() == [0x1100, 0x20F8, 0x2000, 0x4000]
    assert bufs[1].tolist() == second
    assert moved == 3
    assert others == [2, 4, 5]  # 0x2000, 0x5008, 0x9000: in range, in no region


def test_a_kept_rebaser_gives_what_a_fresh_scan_gives() -> None:
    """``Rebaser`` keeps its buffers between scans (a fork strategy keeps one): a
    scan after a bigger one (stale indices in the buffer), after a smaller one (the
    buffers grow) and with more regions than the buffer first had room for reports
    exactly what a one-off ``rebase`` reports."""
    from tender_service.fork.relocate import Rebaser, rebase

    kept = Rebaser()
    regions = [(0x1000 * i, 0x1000 * i + 0x800, 0x10 * i) for i in range(1, 9)]
    for n in (300, 5, 2000, 1):
        words = [(0x800 + 0x123 * i) % 0x9000 for i in range(n)]
        a, b = array("Q", words), array("Q", words)
        got = kept.run([(a.buffer_info()[0], n)], regions, (0, 0x9000))
        want = rebase([(b.buffer_info()[0], n)], regions, (0, 0x9000))
        assert got == want and a == b
        assert n < 300 or (got[0] and got[1])  # both kinds of word were there

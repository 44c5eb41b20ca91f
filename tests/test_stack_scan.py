"""The thread fork's stack scan: the fast candidate search must rebase exactly the
words that a plain word-by-word pass over the same stack would."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tender_service.fork.thread import _Relocator, word_tails
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
    tls_lo=st.sampled_from([0x0123_4000, 0x00FF_FF00, HEAP_BASE + 0x20_0000]),
    pad=st.integers(0, 7),
)
def test_scan_rebases_the_same_words_as_a_plain_pass(data, heap_size, tls_lo, pad) -> None:
    tls_hi, tdelta = tls_lo + 0x300, 0x1_0000
    words = data.draw(st.lists(_interesting(tls_lo, tls_hi, heap_size), max_size=300))
    buf = bytearray(pad) + bytearray(struct.pack(f"<{len(words)}Q", *words)) + bytearray(9)
    r = _Relocator(_NoHeapBlocks(heap_size), 7, S_BASE, S_TOP, DELTA, tls_lo, tls_hi, tdelta)
    r.relocate_words(buf, pad, len(words))
    got = list(struct.unpack_from(f"<{len(words)}Q", buf, pad))
    assert got == [r.value(w) for w in words]
    assert buf[:pad] == bytearray(pad) and buf[-9:] == bytearray(9)  # nothing outside touched


def testword_tails_cover_a_range_that_crosses_4_gib() -> None:
    lo, hi = 0x1_FFFF_FF00, 0x2_0000_0100
    tails = word_tails(lo, hi)
    assert len(tails) == 2
    for v in (lo, 0x1_FFFF_FFFF, 0x2_0000_0000, hi - 1):
        b = struct.pack("<Q", v)
        assert any(b[skip:] == tail for tail, skip in tails)

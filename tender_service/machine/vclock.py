"""The guest's clocks without a syscall: a vDSO and the page of clock data it reads.

Linux maps a vDSO into every process, whose ``clock_gettime`` reads a page the
kernel keeps ("vvar") and the CPU's time-stamp counter, so asking the time
costs no system call.  A syscall here is a trip out of the emulator into
Python (about 2 us); the vDSO's dozen instructions run in the translated
code.  The guest's ``rdtsc`` is the host's TSC (Unicorn passes it through),
so the clock advances while the guest computes.

Layout, at ``VDSO_BASE`` (a region of its own, in every VM): the vvar page,
then the vDSO image (``guest/runtime/vdso.c``, built by the toolchain), flat
as the file is.  The loader puts ``AT_SYSINFO_EHDR`` in the auxv; musl looks
``__vdso_clock_gettime`` up there.

Time on the page is ``base + ((tsc - tsc_base) * mult >> SHIFT)``.  The host
keeps the same numbers (``GuestClock``), so the kernel's clock syscalls give
what the vDSO gives: one clock, whichever way it is read.  The rate is the
TSC's, measured against the host's CLOCK_MONOTONIC since the host process
started (the baseline grows, the error shrinks: about 1e-7 after a second).
``rebase`` (from the run loop, every ``REBASE_EVERY``) starts a new segment:
a guest clock behind the host's catches up, one ahead holds (CLOCK_MONOTONIC
never goes back); a gap over ``STEP_NS`` (a snapshot resumed on another
host, whose clocks are not this host's) is stepped.  The page is rewritten
only while the guest is stopped; its ``seq`` makes a reader that a time
slice interrupted read again.  A guest that never enters the kernel runs on
one segment: its clock drifts by the rate's error only.

No vDSO (the page's ``seq`` stays 0, the clock syscalls read the host's
clocks) where the host's TSC does not tick at a constant rate, or the vDSO
cannot be built.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from tender_service.machine.layout import PAGE_SIZE
from tender_service.machine.memory import GuestMemory, Region
from tender_service.toolchain.images import build_vdso

log = logging.getLogger(__name__)

#: the page layout of ``struct vvar`` in guest/runtime/vdso.c
VVAR = struct.Struct("<IIQQqq")
SHIFT = 32
#: a guest clock this far ahead of the host's is stepped back to it (another host's)
STEP_NS = 50_000_000
#: how often the run loop starts a new segment
REBASE_EVERY = 0.25
#: the shortest baseline the TSC rate is measured over
MIN_CALIBRATION_NS = 2_000_000
REGION = "vdso"

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f3148c1e2204809d0c3")


def _make_rdtsc() -> Callable[[], int]:
    """The host's TSC as a Python call: ten bytes of code in an executable page."""
    page = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_RDTSC_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._page = page  # type: ignore[attr-defined]  # the code lives as long as the function
    return fn


@functools.cache
def tsc_is_constant() -> bool:
    """Whether the host's TSC ticks at one rate whatever the CPU does (Linux's
    ``constant_tsc`` and ``nonstop_tsc``): the condition for a TSC clock."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"constant_tsc", "nonstop_tsc"} <= flags
    except OSError:
        pass
    return False


read_tsc = _make_rdtsc()


def _pair() -> tuple[int, int]:
    """(host CLOCK_MONOTONIC ns, TSC) read as close together as three tries allow."""
    best = None
    for _ in range(3):
        a = time.monotonic_ns()
        tsc = read_tsc()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, (a + b) // 2, tsc)
    assert best is not None
    return best[1], best[2]


#: the process's calibration baseline: the TSC rate is measured from here to now
_ORIGIN = _pair()


def host_mult() -> int:
    """The host's TSC rate as ``mult`` (ns per tick << SHIFT), measured since this
    process started (a longer baseline each time: it only gets better)."""
    ns, tsc = _pair()
    while ns - _ORIGIN[0] < MIN_CALIBRATION_NS:  # a process's first VM, at once
        ns, tsc = _pair()
    return ((ns - _ORIGIN[0]) << SHIFT) // max(1, tsc - _ORIGIN[1])


@functools.cache
def vdso_image() -> bytes | None:
    """The vDSO's bytes (built and cached by the toolchain), or None where a VM gets none.

    Called before a VM process jails itself (``warm_up``), so the file is read
    once per host process.
    """
    if not tsc_is_constant():
        log.warning("no vDSO: the host's TSC does not tick at a constant rate")
        return None
    try:
        data = build_vdso().read_bytes()
    except Exception as e:  # a VM without a vDSO still runs: its clock calls are syscalls
        log.warning("no vDSO: %s", e)
        return None
    if len(data) > 4 * PAGE_SIZE:
        log.warning("no vDSO: %d bytes is more than it may take", len(data))
        return None
    return data


def region_size(image: bytes) -> int:
    """The region for the vvar page and ``image``."""
    return PAGE_SIZE + -(-len(image) // PAGE_SIZE) * PAGE_SIZE


def vdso_region(mem: GuestMemory) -> Region | None:
    return next((r for r in mem.regions if r.name == REGION), None)


def sysinfo_ehdr(mem: GuestMemory) -> int:
    """AT_SYSINFO_EHDR for a program in ``mem``: the vDSO's ELF header (0: none)."""
    region = vdso_region(mem)
    return region.base + PAGE_SIZE if region is not None else 0


@dataclass
class GuestClock:
    """The VM's CLOCK_MONOTONIC and CLOCK_REALTIME, one segment of a TSC line at a time.

    ``page`` is the vvar page's guest address (0: no vDSO; the host's clocks
    are read directly).
    """

    mem: GuestMemory
    page: int = 0
    seq: int = 0
    tsc_base: int = 0
    mult: int = 0
    mono_base: int = 0
    real_base: int = 0
    _next_rebase: float = 0.0

    @classmethod
    def for_memory(cls, mem: GuestMemory) -> GuestClock:
        """The clock of a VM whose memory is ``mem``: it goes on from the page a
        snapshot carried (or steps if that clock is far off), else starts
        at the host's time."""
        region = vdso_region(mem)
        clock = cls(mem, region.base if region is not None else 0)
        if clock.page:
            seq, shift, tsc_base, mult, mono, real = VVAR.unpack(mem.read(clock.page, VVAR.size))
            if seq and shift == SHIFT and 0 < mult < 1 << 40:  # a page this module wrote
                clock.seq, clock.tsc_base, clock.mult = seq, tsc_base, mult
                clock.mono_base, clock.real_base = mono, real
            clock.rebase()
        return clock

    def now_ns(self, real: bool) -> int:
        """The guest's CLOCK_REALTIME (``real``) or CLOCK_MONOTONIC, in ns."""
        if not self.page:
            return time.time_ns() if real else time.monotonic_ns()
        delta = ((read_tsc() - self.tsc_base) * self.mult) >> SHIFT
        return (self.real_base if real else self.mono_base) + delta

    def tick(self) -> None:
        """From the run loop: a new segment every ``REBASE_EVERY`` seconds."""
        if self.page and time.monotonic() >= self._next_rebase:
            self.rebase()

    def rebase(self) -> None:
        """Start a segment at the current TSC, at the host's time if the guest's clock
        is behind it, where the guest's clock stands if it is ahead (CLOCK_MONOTONIC
        never goes back), at the rate measured now; write it to the page."""
        host_ns, tsc = _pair()
        real_offset = time.time_ns() - host_ns
        guest_ns = host_ns
        if self.seq:
            guest_ns = self.mono_base + (((tsc - self.tsc_base) * self.mult) >> SHIFT)
            if guest_ns < host_ns or guest_ns - host_ns > STEP_NS:
                guest_ns = host_ns
        self.tsc_base, self.mult = tsc, host_mult()
        self.mono_base, self.real_base = guest_ns, guest_ns + real_offset
        self.seq = (self.seq + 1) & 0xFFFF_FFFF or 1
        self.mem.write(
            self.page,
            VVAR.pack(self.seq, SHIFT, tsc, self.mult, self.mono_base, self.real_base),
        )
        self._next_rebase = time.monotonic() + REBASE_EVERY

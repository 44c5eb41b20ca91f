"""Thread fork: the child is a new thread of the same VM on a copy of the stack.

The seed thesis (ch. 4) made its child a new Rumprun thread whose stack is a
copy of the parent's; globals stay shared and heap blocks the stack points to
are duplicated (``addr_is_managed``).  Made sound here:

1. new process: pid, ppid, copied fd table and dispositions, its own LWP;
2. a stack of the same size; the parent's live stack (from rsp minus the
   128-byte red zone to the top) is copied to the same offset;
3. the copy and the general registers are scanned word by word: words that
   point into the parent's stack are rebased onto the child's; words that
   point into a live user heap allocation get that allocation (header
   included) duplicated once for the child and are rebased into the copy;
   words that point into the parent's TLS block are rebased onto the child's;
   anything else (text, data, bss, integers) is left as is: globals stay
   shared;
4. the child gets its own copy of the TLS block / musl thread descriptor
   (``errno``, ``tid``, ``self``), its fs base pointing into it; the copy's
   words that point into the TLS block or the parent's stack are rebased as
   the stack's are (its pointers into the heap stay shared); steps 3 and 4
   are one scan in C (fork/relocate.py);
5. the child's context is the parent's with rax = 0 and rsp/rbp/registers
   relocated; it is queued to run; the parent returns the child's pid at
   once (the parent keeps the CPU, as a real fork's caller mostly does).

Known limits (documented in docs/semantics.md): globals and heap blocks not
reachable from the stack or registers stay shared; the scan is conservative
and can rebase an integer that happens to equal a stack, TLS or heap address;
only blocks pointed to directly are copied (not what they point to).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct
from collections.abc import Callable, Sequence
from ctypes import addressof

from tender_service.bmk.memalloc import MEMWHO_USER, Allocation
from tender_service.fork.relocate import Copy, Rebaser, preload, rebase
from tender_service.machine.cpu import FS_BASE, GPRS, RIP, SYSCALL_INSN_LEN, RegSet
from tender_service.machine.errors import GuestError
from tender_service.rump.kernel import Kernel
from tender_service.rump.process import Lwp, Process

log = logging.getLogger(__name__)

RED_ZONE = 128
MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_U64 = struct.Struct("<Q")
#: td->self, td->dtv: the first two words of musl's thread descriptor
_TD_HEAD = struct.Struct("<QQ")
#: bytes of musl's ``struct pthread`` at and above the thread pointer (208 in
#: musl 1.2.5), rounded up; the TLS block below it starts at ``td->dtv``
PTHREAD_SPAN = 240
#: registers relocated like stack words; rax is the return value, rcx/r11 are
#: clobbered by ``syscall``, rsp is rebased explicitly
_SCAN_NAMES = ("rbx", "rbp", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r12", "r13", "r14", "r15")
#: the child's context, read, relocated and written in one buffer (Cpu.read_into):
#: the scanned registers and the fs base (the scan rebases it into the TLS copy),
#: then rsp, rip and rax, set here
_CHILD_REGS = RegSet(*(GPRS[r] for r in _SCAN_NAMES), FS_BASE, GPRS["rsp"], RIP, GPRS["rax"])
_FS, _RSP, _RIP, _RAX = range(len(_SCAN_NAMES), len(_SCAN_NAMES) + 4)
_SCANNED = _FS + 1


class ThreadFork:
    """The in-VM fork of the thesis, made sound (see module docstring)."""

    mode = "thread"
    #: every process lives in the VM's one memory: clone(CLONE_VM) shares it
    one_address_space = True

    def __init__(self) -> None:
        preload()
        self._rebaser = Rebaser()

    def fork(self, k: Kernel, lwp: Lwp, vfork: bool) -> int:
        pt = lwp.thread
        regs = k.cpu.read_into(_CHILD_REGS)
        if not pt.stack_base < regs[_RSP] <= pt.stack_base + pt.stack_size:
            raise GuestError(errno.EINVAL, "fork on a stack the kernel did not allocate")
        child = k.new_child(lwp.proc)
        try:
            self._build(k, lwp, child, regs)
        except GuestError:
            k.discard_process(child)
            raise
        return child.pid

    def _build(self, k: Kernel, lwp: Lwp, child: Process, regs: ctypes.Array) -> None:
        """``regs``: the parent's registers in ``_CHILD_REGS``'s buffer.  Every step
        here is on the parent's fork path, which is measured against native fork:
        no object or call that the step does not need (issue 17)."""
        pt, mem = lwp.thread, k.mem
        rsp = regs[_RSP]
        s_base, size = pt.stack_base, pt.stack_size
        cstack = k.stacks.take(child.pid)
        if not cstack:
            raise GuestError(errno.ENOMEM, "no memory for the child's stack")

        # 2. the live stack, red zone included (copied by the scan's call, below)
        lo = max(s_base, (rsp - RED_ZONE) & ~7)
        n = s_base + size - lo
        delta = cstack - s_base
        host = mem.host_addr
        dst = mem.offset(lo + delta, n)
        copies = [(host + dst, host + mem.offset(lo, n), n)]

        # 4. the TLS block / thread descriptor
        tls_lo, tls_hi, ctls, tls_at = _tls_copy(k, child.pid, regs[_FS], copies)

        # 3. copy, then relocate stack words, the TLS copy and the registers (fs too):
        # one call
        r = _Relocator(
            k.heap,
            child.pid,
            s_base,
            s_base + size,
            delta,
            tls_lo,
            tls_hi,
            ctls - tls_lo,
            self._rebaser.run,
        )
        tls = (tls_at, (tls_hi - tls_lo) >> 3)
        r.relocate(mem.buf, host, (dst, n >> 3), tls, regs, _SCANNED, copies)

        # 5. the child's context: the parent's, with rax = 0 and rebased pointers
        regs[_RSP] = rsp + delta
        regs[_RIP] += SYSCALL_INSN_LEN
        regs[_RAX] = 0
        cpu = k.cpu
        ctx = cpu.new_context()
        cpu.write_context(ctx, _CHILD_REGS)
        clwp = k.new_lwp(child, cstack, cstack, size, ctx)
        clwp.tls = ctls
        clwp.sigmask, clwp.altstack = lwp.sigmask, lwp.altstack  # inherited, as fork(2)


def _tls_copy(k: Kernel, pid: int, fs: int, copies: list[Copy]) -> tuple[int, int, int, int]:
    """A block for the copy of musl's TLS block [td->dtv, fs + PTHREAD_SPAN) (relocated
    with the stack), the copy added to ``copies``; (lo, hi, address of the copy, its
    offset in guest RAM), or zeros if there is no musl descriptor at ``fs``."""
    mem = k.mem
    try:
        td = mem.offset(fs, PTHREAD_SPAN) if fs else -1
    except GuestError:
        td = -1
    if td < 0:
        return 0, 0, 0, 0
    self_, dtv = _TD_HEAD.unpack_from(mem.buf, td)
    if self_ != fs:  # not musl's layout (td->self == td): leave it shared
        k.warn_once("tls-layout", "thread pointer %#x has no musl descriptor: TLS shared", fs)
        return 0, 0, 0, 0
    hi = fs + PTHREAD_SPAN
    lo, src = fs, td
    if fs - (1 << 20) < dtv < fs and not dtv & 7 and mem.contains(dtv, hi - dtv):
        lo, src = dtv, td - (fs - dtv)  # the block below it, in the descriptor's region
    ctls = k.tls_blocks.take(pid, hi - lo)
    if not ctls:
        raise GuestError(errno.ENOMEM, "no memory for the child's TLS block")
    dst = mem.offset(ctls, hi - lo)
    copies.append((mem.host_addr + dst, mem.host_addr + src, hi - lo))
    return lo, hi, ctls, dst


class _Relocator:
    """Rebases words: stack -> child stack, TLS -> child TLS, heap -> duplicate."""

    __slots__ = (
        "heap",
        "pid",
        "s_base",
        "s_top",
        "delta",
        "tls_lo",
        "tls_hi",
        "tdelta",
        "dups",
        "scan",
    )

    def __init__(
        self,
        heap,
        pid: int,
        s_base: int,
        s_top: int,
        delta: int,
        tls_lo: int,
        tls_hi: int,
        tdelta: int,
        scan: Callable[..., tuple[list[int], int]] = rebase,
    ) -> None:
        self.heap, self.pid = heap, pid
        self.s_base, self.s_top, self.delta = s_base, s_top, delta
        self.tls_lo, self.tls_hi, self.tdelta = tls_lo, tls_hi, tdelta
        #: parent block -> child copy, made at the first heap word found (most forks
        #: find none)
        self.dups: dict[int, Allocation] | None = None
        self.scan = scan  # the C scan, with its owner's buffers (``ThreadFork``)

    def value(self, v: int) -> int:
        if self.s_base <= v < self.s_top:
            return v + self.delta
        if self.tls_lo <= v < self.tls_hi:
            return v + self.tdelta
        h_lo, h_hi = self.heap.heap_range
        if h_lo <= v < h_hi:
            a = self.heap.addr_is_managed(v)
            if a is None or a.who != MEMWHO_USER:
                return v
            if self.dups is None:
                self.dups = {}
            d = self.dups.get(a.block)
            if d is None:
                d = self.heap.duplicate(a, self.pid)
                if d is None:
                    raise GuestError(errno.ENOMEM, "no memory to copy a heap block for the child")
                self.dups[a.block] = d
            return v + d.block - a.block
        return v

    def relocate(
        self,
        buf,
        addr: int,
        stack: tuple[int, int],
        tls: tuple[int, int],
        regs: ctypes.Array,
        nregs: int,
        copies: Sequence[Copy] = (),
    ) -> None:
        """Make ``copies`` (the stack's and the TLS block's), then relocate the stack
        copy and the TLS copy (each ``(offset in buf, words)``; ``addr``: where
        ``buf`` starts in host memory) and the first ``nregs`` register values of
        the buffer ``regs``, in one C call (fork/relocate.py).

        Stack and TLS words move by their region's delta there; the other words
        in the heap come back as indices and are classified here, since a live
        user block is duplicated for the child (in the TLS copy they stay shared).
        No numpy: importing it cost the first fork of every VM 40-80 ms.
        """
        (s_off, s_words), (t_off, t_words) = stack, tls
        tls_span = (addr + t_off, t_words)
        other = self.heap.heap_range
        regions = _regions(
            self.s_base, self.s_top, self.delta, self.tls_lo, self.tls_hi, self.tdelta
        )
        if regions is None:  # a TLS block inside the stack: ``value`` orders them, word
            other = (0, MASK64)  # by word, and the TLS copy is rebased on its own
            self.scan([tls_span], [(self.tls_lo, self.tls_hi, self.tdelta)], (0, 0), copies)
            regions, t_words, tls_span = [(self.s_base, self.s_top, self.delta)], 0, (0, 0)
            copies = ()
        spans = [(addr + s_off, s_words), tls_span, (addressof(regs), nregs)]
        others, _ = self.scan(spans, regions, other, copies)
        if not others:
            return
        value = self.value  # a word in a live user heap block: into the child's duplicate
        for i in others:
            if i < s_words:
                at = s_off + 8 * i
                (v,) = _U64.unpack_from(buf, at)
                nv = value(v)
                if nv != v:
                    _U64.pack_into(buf, at, nv)
            elif i >= s_words + t_words:  # (in the TLS copy heap words stay shared)
                j = i - s_words - t_words
                regs[j] = value(regs[j])


def _regions(
    s_base: int, s_top: int, delta: int, tls_lo: int, tls_hi: int, tdelta: int
) -> list[tuple[int, int, int]] | None:
    """The scan's regions, in order: the stack and the TLS block (if any) with their
    deltas; None when the TLS block overlaps the stack (no order by address)."""
    stack = (s_base, s_top, delta)
    if not tls_hi:
        return [stack]
    if tls_hi <= s_base:
        return [(tls_lo, tls_hi, tdelta), stack]
    if s_top <= tls_lo:
        return [stack, (tls_lo, tls_hi, tdelta)]
    return None

"""Copy fork: private memory inside one VM, by copy and relocation (issue 18).

Thread fork shares globals and libc's state (stdio buffers) between parent
and child; VM-clone fork gets private memory by cloning the whole VM.  This
strategy, after uFork (SOSP 2025), gives the child a private copy of all of
its parent's memory at fresh addresses of the same VM:

1. new process (pid, copied fd table and dispositions), as thread fork;
2. copies: the program image (a static-PIE: its code runs at any base through
   RIP-relative addressing) into page-allocator pages, every anonymous mmap,
   every heap block the parent's ``malloc`` owns (``MEMWHO_USER``), the live
   part of the stack, the TLS block the kernel made for the parent if any;
3. relocation: every 8-byte word of the copies that may hold a pointer (the
   image's writable segments, the mmaps, the heap blocks, the stack, the TLS)
   and every register, rip and fs base included, that points into one of the
   parent's regions is rebased by that region's offset to its copy; so are
   the kernel's own pointers into the process (signal handlers and
   restorers, the alternate signal stack, the break);
4. the child's context is queued with rax = 0; the parent returns the pid.

What the parent waits for is only the copy (memcpy of the image's writable
part, the heap blocks, the mmaps, the live stack) and the registers: the scan
of the copies for pointers runs when the child is first scheduled
(``Lwp.first_run``), since only the child's memory changes and nothing reads
it before the child runs.  A child's image copy is not freed when the child
ends: the kernel keeps it (rump/spares.py, as it keeps an exec'd program's
image) for the next fork or exec of the same program, which finds its text
already there and its code already translated by the emulator (a fresh
address would be translated again).

The scan is conservative, like thread fork's stack scan: an integer equal to
an address in one of the parent's regions is rebased too, and a pointer the
program hides (xor, arithmetic, SSE registers) is not.  docs/semantics.md
("Copy fork") says where that matters.  A non-PIE program cannot run at
another base: its fork fails with ENOSYS.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import logging
from dataclasses import dataclass, field

from tender_service.bmk.memalloc import MEMWHO_USER
from tender_service.fork.relocate import Region, preload, rebase
from tender_service.fork.thread import RED_ZONE
from tender_service.machine.cpu import FS_BASE, GPRS, RIP, SYSCALL_INSN_LEN, RegSet
from tender_service.machine.errors import GuestError
from tender_service.machine.layout import PAGE_SIZE
from tender_service.machine.loader import read_only_spans
from tender_service.rump.kernel import Kernel
from tender_service.rump.process import Lwp, Process, Program

log = logging.getLogger(__name__)

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
#: registers rebased like memory words (rax is the return value; rcx/r11 are
#: clobbered by ``syscall``)
_SCAN_NAMES = ("rbx", "rbp", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r12", "r13", "r14", "r15")
#: the child's context, edited in its buffer (Cpu.read_into): every register but rax
#: is rebased (rip too: the child runs its own copy of the image), then rip moves
#: past the syscall and rax is 0
_CHILD_REGS = RegSet(*(GPRS[r] for r in _SCAN_NAMES), GPRS["rsp"], FS_BASE, RIP, GPRS["rax"])
_RIP, _RAX = _CHILD_REGS.n - 2, _CHILD_REGS.n - 1


@dataclass
class RegionMap:
    """The parent's regions [lo, hi) and where their copies lie (lo + delta)."""

    los: list[int] = field(default_factory=list)
    his: list[int] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)
    #: (child address, length) of the copies to scan for pointers
    scan: list[tuple[int, int]] = field(default_factory=list)
    _pending: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, lo: int, size: int, delta: int, scan: bool = True) -> None:
        self._pending.append((lo, lo + size, delta))
        if scan:
            self.scan.append((lo + delta, size))

    def seal(self) -> None:
        """Sort the regions for lookups (they never overlap)."""
        self._pending.sort()
        self.los = [r[0] for r in self._pending]
        self.his = [r[1] for r in self._pending]
        self.deltas = [r[2] for r in self._pending]

    def value(self, v: int) -> int:
        """``v`` rebased into the child's copy if it points into a parent region."""
        i = bisect.bisect_right(self.los, v) - 1
        if i >= 0 and v < self.his[i]:
            return v + self.deltas[i]
        return v

    def regions(self) -> list[Region]:
        """(lo, hi, delta) of each region, sorted: what the C scan takes."""
        return list(zip(self.los, self.his, self.deltas, strict=True))


class CopyFork:
    """fork with a private copy of the parent's memory in the same VM."""

    mode = "copy"
    #: every process lives in the VM's one address space (clone(CLONE_VM) shares it)
    one_address_space = True
    #: a process's memory is its own: an exiting parent's memory is freed, not
    #: handed to a child (ProcessTable.release_memory)
    private_memory = True

    def __init__(self) -> None:
        preload()

    def fork(self, k: Kernel, lwp: Lwp, vfork: bool) -> int:
        pt, parent = lwp.thread, lwp.proc
        rsp = k.cpu.reg(GPRS["rsp"])
        if not pt.stack_base < rsp <= pt.stack_top:
            raise GuestError(errno.EINVAL, "fork on a stack the kernel did not allocate")
        prog = parent.program
        if prog is None or not prog.pie:
            raise GuestError(errno.ENOSYS, "copy fork needs a static-PIE program")
        child = k.new_child(parent)
        try:
            self._build(k, lwp, child, prog, rsp)
        except GuestError:
            for addr in list(child.mmaps):
                k.pages.free(addr)
            child.mmaps.clear()
            k.discard_process(child)  # its image copy is kept (rump/spares.py)
            raise
        return child.pid

    def _image(self, k: Kernel, prog: Program) -> int:
        """The child's copy of ``prog``: a kept image of the program whose text is
        intact (only the writable segments are copied, the emulator's translations
        stay valid; rump/spares.py), else fresh pages (all copied, translations of
        those addresses dropped)."""
        mem, view = k.mem, k.mem.view
        src = mem.offset(prog.base, prog.size)
        host = mem.host_addr

        def intact(base: int) -> bool:
            dst = host + mem.offset(base, prog.size)
            return not any(_memcmp(host + src + a, dst + a, n) for a, n in _read_only(prog))

        base = k.spares.take((prog.path, prog.size), intact)
        if base is not None:
            dst = mem.offset(base, prog.size)
            for off, n in prog.writable:
                view[dst + off : dst + off + n] = view[src + off : src + off + n]
            return base
        fresh = k.pages.alloc(prog.size // PAGE_SIZE)
        if fresh is None:
            raise GuestError(errno.ENOMEM, "no memory for the child's copy of the program")
        dst = mem.offset(fresh, prog.size)
        view[dst : dst + prog.size] = view[src : src + prog.size]
        k.cpu.forget_code(fresh, prog.size)  # the pages may have held another program
        return fresh

    def _build(self, k: Kernel, lwp: Lwp, child: Process, prog: Program, rsp: int) -> None:
        mem, heap, pages, parent = k.mem, k.heap, k.pages, lwp.proc
        regions = RegionMap()

        # the image: text is copied, only the writable segments can hold pointers
        base = self._image(k, prog)
        copy = Program(prog.path, base, prog.size, True, 0, prog.writable, True)
        copy.recycle = k.spares.keep
        k.use_program(child, copy)
        regions.add(prog.base, prog.size, base - prog.base, scan=False)
        regions.scan.extend((base + off, n) for off, n in prog.writable)

        # anonymous mappings (file mappings are private copies here too)
        for start, length in parent.mmaps.items():
            dest = pages.alloc(length // PAGE_SIZE)
            if dest is None:
                raise GuestError(errno.ENOMEM, "no memory for the child's mappings")
            child.mmaps[dest] = length
            _copy(mem, start, dest, length)
            regions.add(start, length, dest - start)

        # the heap blocks of the parent's malloc
        for a in heap.owned(parent.pid):
            if a.who != MEMWHO_USER:
                continue
            d = heap.duplicate(a, child.pid)
            if d is None:
                raise GuestError(errno.ENOMEM, "no memory to copy the parent's heap")
            regions.add(a.block, a.block_size, d.block - a.block)

        # the stack (its live part) and a TLS block the kernel made
        pt = lwp.thread
        cstack = k.stacks.take(child.pid)
        if not cstack:
            raise GuestError(errno.ENOMEM, "no memory for the child's stack")
        delta = cstack - pt.stack_base
        regions.add(pt.stack_base, pt.stack_size, delta, scan=False)
        lo = max(pt.stack_base, (rsp - RED_ZONE) & ~7)
        _copy(mem, lo, lo + delta, pt.stack_top - lo)
        regions.scan.append((lo + delta, pt.stack_top - lo))
        ctls = 0
        if lwp.tls:
            t = heap.get(lwp.tls)
            dt = heap.duplicate(t, child.pid) if t is not None else None
            if t is not None and dt is None:
                raise GuestError(errno.ENOMEM, "no memory for the child's TLS block")
            if t is not None and dt is not None:
                regions.add(t.block, t.block_size, dt.block - t.block)
                ctls = dt.user

        # the registers and the kernel's pointers now; the copies when the child
        # first runs (nothing reads or writes them before)
        regions.seal()
        regs = k.cpu.read_into(_CHILD_REGS)
        for i in range(_RAX):
            regs[i] = regions.value(regs[i])
        regs[_RIP] += SYSCALL_INSN_LEN  # the child resumes after the syscall
        regs[_RAX] = 0
        ctx = k.cpu.new_context()
        k.cpu.write_context(ctx, _CHILD_REGS)
        child.sigactions = {
            sig: (regions.value(h), fl, regions.value(r), m)
            for sig, (h, fl, r, m) in child.sigactions.items()
        }
        child.brk = base + prog.size  # the break cannot move: it stays at the image's end
        clwp = k.new_lwp(child, cstack, cstack, pt.stack_size, ctx)
        clwp.tls = ctls
        clwp.sigmask = lwp.sigmask
        sp, size = lwp.altstack
        clwp.altstack = (regions.value(sp), size)
        spans = [(mem.offset(a, n), n) for a, n in regions.scan]
        clwp.first_run = functools.partial(relocate, mem.host_addr, spans, regions)


def _read_only(prog: Program) -> tuple[tuple[int, int], ...]:
    """(offset, length) of the image outside its writable segments (text, rodata)."""
    return read_only_spans(prog.size, prog.writable)


def _copy(mem, src: int, dst: int, n: int) -> None:
    s, d = mem.offset(src, n), mem.offset(dst, n)
    mem.view[d : d + n] = mem.view[s : s + n]


def relocate(addr: int, spans: list[tuple[int, int]], regions: RegionMap) -> int:
    """Rebase every word of the buffer ``spans`` (offset from host address ``addr``,
    length) that points into a parent region; the number of words changed.  One
    pass in C (fork/relocate.py); a word is rebased at most once: afterwards it
    points into a copy, outside every parent region."""
    return rebase([(addr + off, n >> 3) for off, n in spans], regions.regions())[1]

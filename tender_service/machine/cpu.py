"""The emulated x86-64 CPU (Unicorn), with a fast path for ``syscall``.

The Python binding's generic hooks cost several microseconds per event; the
syscall hook here is a raw ctypes callback and reads the seven syscall
registers in one ``uc_reg_read_batch`` into preallocated buffers, which keeps
a guest syscall round trip near one microsecond.  Faults (unmapped access,
invalid instruction, CPU exceptions) are recorded by rarely-called hooks and
reported by :meth:`Cpu.run` as a :class:`CpuExit`.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

from tender_service.machine.memory import GuestMemory
from tender_service.toolchain.images import build_host_library

#: uc_emu_start (it runs the guest, whose hooks take the GIL back) and uc_emu_stop
#: (called from other threads while the guest runs) release the GIL
_lib = ctypes.CDLL(uclib._name)
#: every other call keeps it: they are short and never call back into Python, and
#: releasing and taking the GIL again was a third of a register access (issue 17: a
#: syscall reads its registers and writes rax through these)
_fast = ctypes.PyDLL(uclib._name)
_emu_start = _lib.uc_emu_start
# ctypes looks a function up on its first attribute access (~15 us): do it at import,
# not in a VM's first fork or context switch
for _lib_, _fn in (
    (_fast, "uc_context_alloc"),
    (_fast, "uc_context_free"),
    (_fast, "uc_context_save"),
    (_fast, "uc_context_restore"),
    (_fast, "uc_context_reg_write_batch"),
    (_lib, "uc_emu_stop"),
    (_lib, "uc_hook_add"),
    (_fast, "uc_reg_read"),
    (_fast, "uc_reg_read_batch"),
    (_fast, "uc_reg_write"),
    (_fast, "uc_reg_write_batch"),
    (_fast, "uc_mem_read"),
    (_fast, "uc_mem_write"),
):
    getattr(_lib_, _fn)
_emu_start.argtypes = [
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_uint64,
    ctypes.c_uint64,
    ctypes.c_size_t,
]
_STOP_ADDR = ctypes.cast(_lib.uc_emu_stop, ctypes.c_void_p).value


class _Slice(ctypes.Structure):
    """``struct unifork_slice`` of guest/runtime/preempt_hook.c."""

    _fields_ = [
        ("left", ctypes.c_int64),
        ("stop", ctypes.c_void_p),
        ("fired", ctypes.c_int32),
    ]


@functools.cache
def _preempt_library() -> ctypes.CDLL:
    """The host library of the block hook, built once per host by the toolchain and
    loaded once per process (before a VM process jails itself: ``warm_up``)."""
    return ctypes.CDLL(str(build_host_library("preempt_hook")))


def _preempt_hook() -> int:
    return ctypes.cast(_preempt_library().unifork_block_hook, ctypes.c_void_p).value or 0


@functools.cache
def _syscall_hook() -> int:
    """The address of the syscall entry (guest/runtime/syscall_hook.c), built once per
    host and loaded once per process; it calls back into this interpreter."""
    lib = ctypes.PyDLL(str(build_host_library("syscall_hook")))
    return ctypes.cast(lib.unifork_syscall_hook, ctypes.c_void_p).value or 0


END_ADDRESS = 0xFFFF_FFFF_FFFF_FFFF  # never reached: run until stopped

#: rax (number), then the six argument registers of the Linux syscall ABI
SYSCALL_REGS = (
    x86.UC_X86_REG_RAX,
    x86.UC_X86_REG_RDI,
    x86.UC_X86_REG_RSI,
    x86.UC_X86_REG_RDX,
    x86.UC_X86_REG_R10,
    x86.UC_X86_REG_R8,
    x86.UC_X86_REG_R9,
)


class _SyscallEntry(ctypes.Structure):
    """``struct unifork_syscall_entry`` of guest/runtime/syscall_hook.c."""

    _fields_ = [
        ("dispatch", ctypes.py_object),
        ("read_batch", ctypes.c_void_p),
        ("write", ctypes.c_void_p),
        ("ids", ctypes.c_int * len(SYSCALL_REGS)),
        ("vals", ctypes.c_void_p * len(SYSCALL_REGS)),
        ("mem_read", ctypes.c_void_p),
        ("mem_write", ctypes.c_void_p),
        ("emu_stop", ctypes.c_void_p),
        ("sigmask", ctypes.c_void_p),
        ("pending", ctypes.c_void_p),
        ("fast", ctypes.c_int32),
        ("events", ctypes.c_int32),
        ("stopped", ctypes.c_int32),
        ("unused", ctypes.c_int32),
        ("answered", ctypes.c_uint64),
    ]


class SignalCell(ctypes.c_uint64):
    """A 64-bit signal set the syscall entry reads and writes in C: a thread's mask,
    a process's pending set (``Cpu.use_signal_cells``)."""

    __slots__ = ()


#: general-purpose registers a conservative scan of a forked thread rebases
GPRS = {
    "rax": x86.UC_X86_REG_RAX,
    "rbx": x86.UC_X86_REG_RBX,
    "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX,
    "rsi": x86.UC_X86_REG_RSI,
    "rdi": x86.UC_X86_REG_RDI,
    "rbp": x86.UC_X86_REG_RBP,
    "rsp": x86.UC_X86_REG_RSP,
    "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9,
    "r10": x86.UC_X86_REG_R10,
    "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12,
    "r13": x86.UC_X86_REG_R13,
    "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
}
#: the architectural state a VM snapshot carries (names are the snapshot's keys)
STATE_REGS: dict[str, int] = {
    **GPRS,
    "rip": x86.UC_X86_REG_RIP,
    "rflags": x86.UC_X86_REG_EFLAGS,
    "fs_base": x86.UC_X86_REG_FS_BASE,
    "gs_base": x86.UC_X86_REG_GS_BASE,
    "mxcsr": x86.UC_X86_REG_MXCSR,
    "fpcw": x86.UC_X86_REG_FPCW,
    "fpsw": x86.UC_X86_REG_FPSW,
    "fptag": x86.UC_X86_REG_FPTAG,
    **{f"xmm{i}": getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)},
    **{f"st{i}": getattr(x86, f"UC_X86_REG_ST{i}") for i in range(8)},
}
#: the x87 registers: 80 bits each (Unicorn's uc_x86_float80)
_X87_REGS = frozenset(getattr(x86, f"UC_X86_REG_ST{i}") for i in range(8))
#: the SSE registers: 128 bits each
_XMM_REGS = frozenset(getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16))
#: read_state's batch: every STATE_REGS id, and how many bytes of its slot hold it
_STATE_IDS = (ctypes.c_int * len(STATE_REGS))(*STATE_REGS.values())
_STATE_WIDTHS = tuple(
    (name, 10 if rid in _X87_REGS else 16 if rid in _XMM_REGS else 8)
    for name, rid in STATE_REGS.items()
)
RIP = x86.UC_X86_REG_RIP
RSP = x86.UC_X86_REG_RSP
RAX = x86.UC_X86_REG_RAX
EFLAGS = x86.UC_X86_REG_EFLAGS
FS_BASE = x86.UC_X86_REG_FS_BASE
#: the x87/SSE state of a signal frame, one 16-byte slot each in a batch buffer
_FPU_REGS = (
    x86.UC_X86_REG_FPSW,
    x86.UC_X86_REG_FPCW,
    x86.UC_X86_REG_FPTAG,
    x86.UC_X86_REG_MXCSR,
    *(getattr(x86, f"UC_X86_REG_ST{i}") for i in range(8)),
    *(getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)),
)
_FPU_IDS = (ctypes.c_int * len(_FPU_REGS))(*_FPU_REGS)
#: the legacy region of an FXSAVE image: fcw, fsw, abridged ftw, fop, fip, fdp, mxcsr, mask
FXSAVE = struct.Struct("<HHBxHQQII")
FXSAVE_SIZE = 512
MXCSR_MASK = 0xFFFF  # the MXCSR bits this CPU accepts (a restore of others is refused)
#: the x87 control word and MXCSR a Linux process starts with: extended
#: precision, all exceptions masked (Unicorn resets both to 0: single
#: precision and unmasked exceptions, which makes musl's printf imprecise)
LINUX_FPCW = 0x037F
LINUX_MXCSR = 0x1F80
SYSCALL_INSN_LEN = 2  # 0f 05

#: Linux's user selectors: __USER_DS (also SS) and __USER_CS (64-bit code, ring 3)
USER_DS, USER_CS = 0x2B, 0x33
#: where the ring-3 switch stub runs once per CPU (inside the null guard, unmapped after)
TRAMPOLINE = 0x1000
IOPL_MASK = 0x3000
PAGE = 0x1000
#: null, kernel code64, kernel data, unused, user code32, user data, user code64 (Linux's GDT)
_GDT = struct.pack(
    "<7Q",
    0,
    0x00AF9A000000FFFF,
    0x00CF92000000FFFF,
    0,
    0x00CFFA000000FFFF,
    0x00CFF2000000FFFF,
    0x00AFFA000000FFFF,
)
_GDT_OFF, _GDTR_OFF, _DONE_OFF = 0x100, 0x80, 0x40
#: lgdt [rip+disp32]; push USER_DS; push rbx; pushfq; push USER_CS; push rcx; iretq
_TRAMPOLINE_CODE = (
    b"\x0f\x01\x15"
    + struct.pack("<i", _GDTR_OFF - 7)
    + bytes([0x6A, USER_DS, 0x53, 0x9C, 0x6A, USER_CS, 0x51, 0x48, 0xCF])
)

# CPU exception vectors -> the signal Linux delivers for them
_VECTOR_SIGNAL = {0: 8, 1: 5, 3: 5, 4: 11, 5: 11, 6: 4, 7: 8, 13: 11, 14: 11, 16: 8, 17: 7, 19: 8}
SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV = 4, 5, 7, 8, 11


class ExitKind(enum.Enum):
    STOPPED = "stopped"  # emu_stop (syscall wants a switch, watchdog, quantum)
    FAULT = "fault"  # the guest did something that kills it with a signal


@dataclass(slots=True)
class CpuExit:
    kind: ExitKind
    signal: int = 0
    rip: int = 0
    address: int | None = None
    what: str = ""


class RegSet:
    """A fixed list of registers for batch access (shared, read-only)."""

    __slots__ = ("ids", "n", "vals_type", "ptrs_type")

    def __init__(self, *ids: int) -> None:
        self.n = len(ids)
        self.ids = (ctypes.c_int * self.n)(*ids)
        # ctypes builds an array type on its first use (~25 us each): build the
        # buffer types here, at import, not in a VM's first fork (issue 17)
        self.vals_type = ctypes.c_uint64 * self.n
        self.ptrs_type = ctypes.c_void_p * self.n
        _REGSETS.append(self)  # every Cpu builds its buffers for it up front


_REGSETS: list[RegSet] = []


class _RegBuffers:
    """Value buffers for one RegSet, owned by one Cpu.

    Never shared between VMs: ctypes releases the GIL during a call, and a
    buffer shared by the VMs of a tender process would let one VM's registers
    land in another's (a forked child would resume at the wrong address).
    """

    __slots__ = ("vals", "ptrs")

    def __init__(self, regs: RegSet) -> None:
        self.vals = regs.vals_type()
        base = ctypes.addressof(self.vals)
        self.ptrs = regs.ptrs_type(*[base + 8 * i for i in range(regs.n)])


class Context:
    """A saved CPU state (Unicorn ``uc_context``), freed with the object."""

    __slots__ = ("ptr",)

    def __init__(self) -> None:
        self.ptr = ctypes.c_void_p()

    def __del__(self) -> None:
        if self.ptr:
            _fast.uc_context_free(self.ptr)
            self.ptr = ctypes.c_void_p()


_STOPPED = CpuExit(ExitKind.STOPPED)


def _enter_user_mode(uc: Uc) -> None:
    """Drop the CPU to ring 3, as a Linux process runs.

    Unicorn starts a 64-bit CPU in ring 0, where ``cli``, ``in``/``out``,
    ``wrmsr``, ``mov %cr3``, ``lgdt`` and the like simply run: the guest
    could rewrite EFER or the descriptor tables of its emulated CPU.  In
    ring 3 each of them raises #GP, which ends the process with SIGSEGV as
    on Linux.  A stub run once at TRAMPOLINE loads a GDT (Linux's user
    selectors) and ``iretq``s to ring 3; then the page is unmapped again
    (it lies in the null guard).  Every saved context and every thread
    starts from this state, so the whole VM stays in ring 3.
    """
    base = TRAMPOLINE
    uc.mem_map(base, PAGE, UC_PROT_ALL)
    try:
        uc.mem_write(base + _GDT_OFF, _GDT)
        uc.mem_write(base + _GDTR_OFF, struct.pack("<HQ", len(_GDT) - 1, base + _GDT_OFF))
        uc.mem_write(base, _TRAMPOLINE_CODE)
        uc.reg_write(x86.UC_X86_REG_RSP, base + PAGE)
        uc.reg_write(x86.UC_X86_REG_RBX, base + PAGE - 0x100)  # the stack after iretq
        uc.reg_write(x86.UC_X86_REG_RCX, base + _DONE_OFF)  # where iretq lands
        uc.emu_start(base, base + _DONE_OFF)
        cs = uc.reg_read(x86.UC_X86_REG_CS)
        if cs != USER_CS:
            raise RuntimeError(f"the CPU did not enter ring 3 (cs={cs:#x})")
    finally:
        uc.mem_unmap(base, PAGE)
    for reg in (x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX):
        uc.reg_write(reg, 0)


# -- engines set up ahead of need -------------------------------------------------------------
def _set_up_engine() -> Uc:
    """A new Unicorn engine in the state every VM starts from: in ring 3, with
    Linux's x87 and SSE control words.  Unicorn builds its machine (uc_init: the
    TCG context, the code buffer, the x86 CPU) on an engine's first use, ~1 ms,
    and the ring-3 stub runs ~0.3 ms more; the binding's calls release the GIL,
    so a background thread's set-up barely slows the VMs of its process."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    _enter_user_mode(uc)
    uc.reg_write(x86.UC_X86_REG_FPCW, LINUX_FPCW)
    uc.reg_write(x86.UC_X86_REG_MXCSR, LINUX_MXCSR)
    return uc


class _SpareEngines:
    """An engine set up before a VM asks for one (``keep_spare_engine``), so that
    a VM-clone fork's restore and a tender instance's boot skip Unicorn's set-up
    (issue 17, item 5).  Kept where the time is free: a pool worker after its
    warm-up and after each VM it hosted ends, a spare VM process while it waits.
    Not refilled the moment one is taken: a background set-up then competes
    for the GIL with the VM being built and made it slower, not faster."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: Uc | None = None
        self.taken = 0  # engines handed out set up (statistics and tests)

    def keep(self) -> None:
        """Set an engine up now, in this thread, unless one is kept already."""
        if self.ready():
            return
        uc: Uc | None = _set_up_engine()
        with self._lock:
            if self._spare is None:
                self._spare, uc = uc, None
        if uc is not None:  # another thread kept one meanwhile
            _release_engine(uc)

    def take(self) -> Uc:
        """The kept engine if there is one, else a new one set up now."""
        with self._lock:
            uc, self._spare = self._spare, None
            self.taken += uc is not None
        return uc if uc is not None else _set_up_engine()

    def ready(self) -> bool:
        with self._lock:
            return self._spare is not None


def _release_engine(uc: Uc) -> None:
    """Free an engine now, not when the garbage collector gets to it: the binding's
    hook wrappers and the Uc refer to each other (a ctypes.cast keeps a cycle), so
    only the cyclic collector frees it, with its translation buffer (RSS) and 1 GiB
    of address space."""
    release = getattr(uc, "_Uc__finalizer", None)  # the binding's uc_close
    if callable(release):
        release()  # once: a weakref.finalize runs at most once


_spares = _SpareEngines()
keep_spare_engine = _spares.keep
spare_engine_ready = _spares.ready
#: contexts a CPU keeps for its next threads (a fork makes one, an exit leaves one)
KEPT_CONTEXTS = 4


class Cpu:
    """One VM's CPU: registers, contexts, hooks and the run call."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.uc = _spares.take()
        self._h = self.uc._uch
        for r in mem.regions:
            self.uc.mem_map_ptr(r.base, r.size, UC_PROT_ALL, mem.host_addr + r.offset)
        n = len(SYSCALL_REGS)
        self._ids = (ctypes.c_int * n)(*SYSCALL_REGS)
        #: rax and the six syscall argument registers, filled by the syscall entry
        self.sysregs = (ctypes.c_uint64 * n)()
        self._ptrs = (ctypes.c_void_p * n)(
            *[ctypes.addressof(self.sysregs) + 8 * i for i in range(n)]
        )
        self._val = ctypes.c_uint64(0)
        self._pval = ctypes.byref(self._val)
        self._reg_read_batch = _fast.uc_reg_read_batch
        self._reg_write = _fast.uc_reg_write
        self._reg_read = _fast.uc_reg_read
        self.set_rax = self._make_set_rax()
        self._fault: CpuExit | None = None
        self._stopped = False
        self._regbufs = {id(rs): _RegBuffers(rs) for rs in _REGSETS}
        fpu = (ctypes.c_uint8 * (16 * len(_FPU_REGS)))()
        self._fpu_buf = (
            fpu,
            (ctypes.c_void_p * len(_FPU_REGS))(
                *[ctypes.addressof(fpu) + 16 * i for i in range(len(_FPU_REGS))]
            ),
        )
        self._syscall_entry: _SyscallEntry | None = None  # kept alive while hooked
        #: the signal sets the entry points at (``use_signal_cells``), kept alive
        self._cells: tuple[SignalCell, SignalCell] | None = None
        #: ``write_state``'s batch: register ids, and a 16-byte slot for each value
        nstate = len(STATE_REGS)
        self._state_ids = (ctypes.c_int * nstate)()
        self._state_buf = (ctypes.c_uint8 * (16 * nstate))()
        self._state_ptrs = (ctypes.c_void_p * nstate)(
            *[ctypes.addressof(self._state_buf) + 16 * i for i in range(nstate)]
        )
        #: contexts of dead threads, for the next thread (``keep_context``)
        self.kept_contexts: list[Context] = []
        self.contexts_made = 0  # allocated by new_context (statistics and tests)
        #: stop() from other threads vs close(); reentrant: ^C's handler stops the CPU
        #: on the main thread, which may be inside stop() already (a Lock deadlocked)
        self._closing = threading.RLock()
        self._closed = False
        #: the time slice the block hook counts down (``enable_slices``)
        self._slice = _Slice(0, _STOP_ADDR, 0)
        self._slices_on = False
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)

    # -- syscalls --------------------------------------------------------------
    def hook_syscall(self, handler: Callable[[], int | None], answer_here: bool = True) -> None:
        """Call ``handler()`` on every ``syscall``, with rax and the six argument
        registers already in ``sysregs``; an int it returns goes to rax (wrapped to 64
        bits: -errno too), None leaves rax as the handler left it.  The entry is C
        (guest/runtime/syscall_hook.c): no ctypes callback, register read or rax write
        from Python per syscall.  Once ``use_signal_cells`` has pointed it at the
        running thread's signal sets, it stops the CPU after a syscall that leaves a
        signal to deliver and (``answer_here``) answers rt_sigprocmask itself."""
        entry = _SyscallEntry()
        entry.dispatch = handler
        entry.read_batch = ctypes.cast(self._reg_read_batch, ctypes.c_void_p).value
        entry.write = ctypes.cast(self._reg_write, ctypes.c_void_p).value
        entry.ids[:] = list(self._ids)
        entry.vals[:] = list(self._ptrs)
        entry.mem_read = ctypes.cast(_fast.uc_mem_read, ctypes.c_void_p).value
        entry.mem_write = ctypes.cast(_fast.uc_mem_write, ctypes.c_void_p).value
        entry.emu_stop = _STOP_ADDR
        entry.fast = int(answer_here)
        self._syscall_entry = entry
        hh = ctypes.c_size_t()
        err = _lib.uc_hook_add(
            self._h,
            ctypes.byref(hh),
            UC_HOOK_INSN,
            ctypes.c_void_p(_syscall_hook()),
            ctypes.byref(entry),
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
            x86.UC_X86_INS_SYSCALL,
        )
        if err:
            raise UcError(err)
        # Only now the other instruction hooks.  Unicorn walks every UC_HOOK_INSN hook
        # for a syscall and stops walking at the first one after which a stop is pending
        # (another thread's cpu.stop()): a hook listed before ours would make it skip
        # the syscall, which would then "return" its own number.
        # Unicorn runs in/out even in ring 3 (it skips the I/O permission check).
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)

    def _make_set_rax(self) -> Callable[[int], None]:
        """``set_rax(value)``: a closure over its buffers (it runs once per syscall)."""
        val, pval, h, write = self._val, self._pval, self._h, self._reg_write

        def set_rax(value: int) -> None:
            val.value = value  # c_uint64 wraps negative values (-errno) as the ABI wants
            write(h, RAX, pval)

        return set_rax

    def reg(self, reg_id: int) -> int:
        self._reg_read(self._h, reg_id, self._pval)
        return self._val.value

    def set_reg(self, reg_id: int, value: int) -> None:
        self._val.value = value & 0xFFFF_FFFF_FFFF_FFFF
        self._reg_write(self._h, reg_id, self._pval)

    # -- registers in bulk ----------------------------------------------------------
    def _buffers(self, regs: RegSet) -> _RegBuffers:
        b = self._regbufs.get(id(regs))
        if b is None:
            b = self._regbufs[id(regs)] = _RegBuffers(regs)
        return b

    def read_regs(self, regs: RegSet) -> list[int]:
        return list(self.read_into(regs))

    def read_into(self, regs: RegSet) -> ctypes.Array:
        """Read ``regs`` into this CPU's buffer for the set and return the buffer (a
        ctypes array of c_uint64): a fork edits it in place, its C scan rebases it
        where it lies, and :meth:`write_context` writes it back, with no list of
        values on the way (issue 17)."""
        b = self._buffers(regs)
        self._reg_read_batch(self._h, regs.ids, b.ptrs, regs.n)
        return b.vals

    def write_regs(self, regs: RegSet, values: list[int]) -> None:
        """Set registers of the running state in one call (signal frames)."""
        b = self._buffers(regs)
        vals = b.vals
        for i, v in enumerate(values):
            vals[i] = v & 0xFFFF_FFFF_FFFF_FFFF
        err = _fast.uc_reg_write_batch(self._h, regs.ids, b.ptrs, regs.n)
        if err:
            raise UcError(err)

    def read_fxsave(self) -> bytes:
        """The x87/SSE state as the 512-byte image ``fxsave`` writes (a signal frame's
        fpstate).  One raw batch read: the Python binding drops an x87 exponent."""
        buf, ptrs = self._fpu_buf
        ctypes.memset(buf, 0, len(buf))
        self._reg_read_batch(self._h, _FPU_IDS, ptrs, len(_FPU_REGS))
        raw = bytes(buf)
        fsw, fcw, tag, mxcsr = (
            int.from_bytes(raw[16 * i : 16 * i + 4], "little") for i in range(4)
        )
        out = bytearray(FXSAVE_SIZE)
        ftw = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)
        FXSAVE.pack_into(out, 0, fcw & 0xFFFF, fsw & 0xFFFF, ftw, 0, 0, 0, mxcsr, MXCSR_MASK)
        for i in range(8):
            out[32 + 16 * i : 42 + 16 * i] = raw[64 + 16 * i : 74 + 16 * i]
        out[160:416] = raw[192:448]
        return bytes(out)

    def write_fxsave(self, image: bytes) -> None:
        """Load an image of :meth:`read_fxsave` (the caller checked MXCSR)."""
        fcw, fsw, ftw, _, _, _, mxcsr, _ = FXSAVE.unpack_from(image, 0)
        tag = sum((0 if ftw >> i & 1 else 3) << (2 * i) for i in range(8))
        raw = bytearray(16 * len(_FPU_REGS))
        for i, v in enumerate((fsw, fcw, tag, mxcsr)):
            raw[16 * i : 16 * i + 8] = v.to_bytes(8, "little")
        for i in range(8):
            raw[64 + 16 * i : 74 + 16 * i] = image[32 + 16 * i : 42 + 16 * i]
        raw[192:448] = image[160:416]
        buf, ptrs = self._fpu_buf
        ctypes.memmove(buf, bytes(raw), len(raw))
        # the status word (its TOP) goes first: ST(i) counts from it
        err = _fast.uc_reg_write_batch(self._h, _FPU_IDS, ptrs, len(_FPU_REGS))
        if err:
            raise UcError(err)

    def reset_fpu(self) -> None:
        """The x87/SSE state a signal handler starts with (Linux's init state)."""
        self.set_reg(x86.UC_X86_REG_FPCW, LINUX_FPCW)
        self.set_reg(x86.UC_X86_REG_FPSW, 0)
        self.set_reg(x86.UC_X86_REG_FPTAG, 0xFFFF)
        self.set_reg(x86.UC_X86_REG_MXCSR, LINUX_MXCSR)

    def write_context(self, ctx: Context, regs: RegSet, values: list[int] | None = None) -> None:
        """Set registers in a saved state (used to shape a forked child): ``values``,
        or, without them, the set's buffer as :meth:`read_into` returned it and the
        caller edited it."""
        b = self._buffers(regs)
        if values is not None:
            vals = b.vals
            for i, v in enumerate(values):
                vals[i] = v & 0xFFFF_FFFF_FFFF_FFFF
        err = _fast.uc_context_reg_write_batch(ctx.ptr, regs.ids, b.ptrs, regs.n)
        if err:
            raise UcError(err)

    def read_state(self) -> dict[str, int]:
        """All of STATE_REGS (a VM-clone fork's snapshot), in one batch into 16-byte
        slots, each value as wide as its register: one binding call per register was
        ~350 us of a ~500 us capture.  An x87 register is its 80 bits (mantissa, then
        the sign and exponent above bit 64): the binding's reg_read gives st0-st7 as
        64-bit integers, which drops the exponent."""
        n = len(STATE_REGS)
        ctypes.memset(self._state_buf, 0, 16 * n)
        err = _fast.uc_reg_read_batch(self._h, _STATE_IDS, self._state_ptrs, n)
        if err:
            raise UcError(err)
        raw = bytes(self._state_buf)
        return {
            name: int.from_bytes(raw[16 * i : 16 * i + width], "little")
            for i, (name, width) in enumerate(_STATE_WIDTHS)
        }

    def write_state(self, state: dict[str, int]) -> None:
        """Set the registers ``state`` names (STATE_REGS), in one batch: a snapshot's
        restore sets 56 and an exec 19, which one binding call each made cost tens of
        microseconds.  Each value goes into a 16-byte slot, little-endian, as wide as
        its register: 10 bytes for x87, 16 for SSE, 8 for the rest (Unicorn reads as
        many bytes as the register has)."""
        if len(state) > len(STATE_REGS):
            raise ValueError(f"{len(state)} registers, more than there are")
        ids, base = self._state_ids, ctypes.addressof(self._state_buf)
        for i, (name, value) in enumerate(state.items()):
            rid = STATE_REGS.get(name)
            if rid is None:
                raise ValueError(f"unknown register {name!r}")
            if name == "rflags":
                value &= ~IOPL_MASK  # ring 3 never gets I/O privilege, whatever a snapshot says
            width = 10 if rid in _X87_REGS else 16 if rid in _XMM_REGS else 8
            ids[i] = rid
            ctypes.memmove(base + 16 * i, (value & (1 << 8 * width) - 1).to_bytes(16, "little"), 16)
        err = _fast.uc_reg_write_batch(self._h, ids, self._state_ptrs, len(state))
        if err:
            raise UcError(err)

    # -- contexts ----------------------------------------------------------------
    def new_context(self) -> Context:
        """A context holding the CPU's current state (all registers, FS base, SSE):
        one a dead thread left (:meth:`keep_context`) if there is one, else a new one
        (allocating one cost a fork about 1 of its ~25 us)."""
        if self.kept_contexts:
            ctx = self.kept_contexts.pop()
        else:
            ctx = Context()
            err = _fast.uc_context_alloc(self._h, ctypes.byref(ctx.ptr))
            if err:
                raise UcError(err)
            self.contexts_made += 1
        _fast.uc_context_save(self._h, ctx.ptr)
        return ctx

    def keep_context(self, ctx: Context) -> None:
        """``ctx`` belongs to no thread any more: keep it for the next
        :meth:`new_context` (up to ``KEPT_CONTEXTS``; the others are freed)."""
        if len(self.kept_contexts) < KEPT_CONTEXTS:
            self.kept_contexts.append(ctx)

    def save(self, ctx: Context) -> None:
        _fast.uc_context_save(self._h, ctx.ptr)

    def restore(self, ctx: Context) -> None:
        _fast.uc_context_restore(self._h, ctx.ptr)

    # -- running ---------------------------------------------------------------
    def enable_slices(self) -> None:
        """Install the block counter (guest/runtime/preempt_hook.c) that ends a time
        slice: before the guest runs, so that no block is translated without it."""
        if self._slices_on:
            return
        hh = ctypes.c_size_t()
        err = _lib.uc_hook_add(
            self._h,
            ctypes.byref(hh),
            UC_HOOK_BLOCK,
            ctypes.c_void_p(_preempt_hook()),
            ctypes.byref(self._slice),
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
        )
        if err:
            raise UcError(err)
        self._slices_on = True

    def arm(self, blocks: int) -> None:
        """Give the running (or next) ``run`` a slice of ``blocks`` translated blocks
        (0: none); may be called from the syscall hook, while the guest runs."""
        self._slice.left = blocks

    def use_signal_cells(self, mask: SignalCell, pending: SignalCell, events: bool) -> None:
        """Point the syscall entry at the thread about to run: its mask, its process's
        pending set (kept alive here while the entry points at them); ``events``: the
        kernel has work from other threads, so no syscall is answered in C."""
        entry = self._syscall_entry
        if entry is None:
            return
        self._cells = (mask, pending)
        entry.sigmask, entry.pending = ctypes.addressof(mask), ctypes.addressof(pending)
        entry.events = events

    def post_events(self) -> None:
        """Work from another thread waits for the kernel: the guest's next syscall
        goes to it, even one the entry could answer (see ``Kernel.post_event``)."""
        entry = self._syscall_entry
        if entry is not None:
            entry.events = 1

    @property
    def answered(self) -> int:
        """Syscalls the C entry answered without the kernel."""
        entry = self._syscall_entry
        return 0 if entry is None else entry.answered

    def run(self, blocks: int = 0) -> CpuExit:
        """Run from the current RIP until stopped, a fault, or (``blocks`` > 0, with
        ``enable_slices``) the end of a slice of that many blocks."""
        self._fault = None
        self._stopped = False
        entry = self._syscall_entry
        if entry is not None:
            entry.stopped = 0
        sl = self._slice
        sl.left, sl.fired = blocks, 0
        err = _emu_start(self._h, self.reg(RIP), END_ADDRESS, 0, 0)
        sl.left = 0
        if entry is not None and entry.stopped:
            self._stopped = True  # the entry stopped it: a signal to deliver
        if err:
            return self._classify(err)
        if self._fault is not None:
            return self._fault
        if not self._stopped and not sl.fired:  # it ended by itself: on a hlt?
            rip = self.reg(RIP)
            if self._byte_at(rip - 1) == 0xF4:
                # hlt: privileged in user mode, Linux delivers SIGSEGV (musl's a_crash)
                return CpuExit(
                    ExitKind.FAULT, SIGSEGV, rip - 1, None, "hlt (privileged instruction)"
                )
        return _STOPPED

    def forget_code(self, addr: int, size: int) -> None:
        """Drop translated code of [addr, addr + size): new code was written there.

        Guest RAM is written through the host buffer, which Unicorn does not
        watch: without this, an exec into pages an earlier program ran from
        would run that program's stale translations.
        """
        self.uc.ctl_remove_cache(addr, addr + size)

    @property
    def stopped(self) -> bool:
        """Whether the last ``run`` ended by :meth:`stop` (not by the end of its slice)."""
        return self._stopped

    def stop(self) -> None:
        """Stop ``run`` soon, from the syscall hook or from another thread.

        From another thread the guest must not go on afterwards (a kill, a time
        limit): Unicorn resumes such a stop at the start of the instruction whose
        memory access it interrupted, so a read-modify-write runs twice
        (unicorn#1355).
        """
        self._stopped = True
        with self._closing:  # never on an engine close() freed
            if not self._closed:
                _lib.uc_emu_stop(self._h)

    def close(self) -> None:
        """Free the engine now (``_release_engine``): a process that runs VM after VM
        (a pool worker) kept dozens of ended engines between collections."""
        with self._closing:
            self._closed = True
            self._syscall_entry = None
            _release_engine(self.uc)
            del self.uc

    # -- faults ----------------------------------------------------------------
    def _byte_at(self, addr: int) -> int:
        try:
            return self.mem.read(addr, 1)[0]
        except Exception:
            return -1

    def _on_unmapped(self, uc, access, address, size, value, data) -> bool:
        kind = {
            ucc.UC_MEM_READ_UNMAPPED: "read",
            ucc.UC_MEM_WRITE_UNMAPPED: "write",
            ucc.UC_MEM_FETCH_UNMAPPED: "fetch",
        }.get(access, "access")
        rip = self.reg(RIP)
        self._fault = CpuExit(
            ExitKind.FAULT, SIGSEGV, rip, address, f"{kind} of unmapped address {address:#x}"
        )
        return False

    def _on_interrupt(self, uc, intno, data) -> None:
        rip = self.reg(RIP)
        sig = _VECTOR_SIGNAL.get(intno, SIGSEGV)
        names = {0: "divide error", 6: "invalid opcode", 13: "general protection", 3: "breakpoint"}
        what = f"CPU exception {intno} ({names.get(intno, 'exception')})"
        if intno == 13 and self._byte_at(rip) == 0xF4:
            what = "hlt (privileged instruction)"
        elif intno == 13:
            what += ": privileged instruction or bad operand"
        self._fault = CpuExit(ExitKind.FAULT, sig, rip, None, what)
        self.uc.emu_stop()

    def _port_io(self, what: str, port: int) -> None:
        """in/out from ring 3 without I/O permission: #GP, SIGSEGV on Linux."""
        rip = self.reg(RIP)
        if self._fault is None:
            self._fault = CpuExit(
                ExitKind.FAULT,
                SIGSEGV,
                rip,
                None,
                f"{what} port {port:#x} (privileged instruction)",
            )
        self.uc.emu_stop()

    def _on_in(self, uc, port, size, data) -> int:
        self._port_io("in", port)
        return 0

    def _on_out(self, uc, port, size, value, data) -> None:
        self._port_io("out", port)

    def _on_invalid(self, uc, data) -> bool:
        rip = self.reg(RIP)
        self._fault = CpuExit(ExitKind.FAULT, SIGILL, rip, None, "invalid instruction")
        return False

    def _classify(self, err: int) -> CpuExit:
        if self._fault is not None:
            return self._fault
        rip = self.reg(RIP)
        if err == ucc.UC_ERR_INSN_INVALID:
            return CpuExit(ExitKind.FAULT, SIGILL, rip, None, "invalid instruction")
        if err == ucc.UC_ERR_EXCEPTION:
            return CpuExit(ExitKind.FAULT, SIGSEGV, rip, None, "CPU exception")
        return CpuExit(ExitKind.FAULT, SIGSEGV, rip, None, f"memory fault ({UcError(err)})")

    def instruction_bytes(self, rip: int, n: int = 8) -> bytes:
        for k in range(n, 0, -1):
            try:
                return self.mem.read(rip, k)
            except Exception:
                continue
        return b""

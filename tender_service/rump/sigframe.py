"""Running guest signal handlers with the Linux x86-64 ABI, and ``rt_sigreturn``.

A handler runs on an ``rt_sigframe`` built on the guest stack exactly as Linux's
``arch/x86/kernel/signal_64.c`` builds it, so musl (and anything else written for
Linux) finds what it expects: the return address (``sa_restorer``, musl's
``__restore_rt``), a ``ucontext`` with the interrupted registers, the mask to
restore and the alternate stack, the ``siginfo``, and an ``fxsave`` image of the
x87/SSE state.  ``rt_sigreturn`` reads it all back; a frame it cannot read or that
holds what no CPU would accept ends the process with SIGSEGV, as on Linux.

Delivery happens when a thread returns to user mode: after a syscall and when the
run loop resumes a thread (``Kernel._loop`` calls :func:`deliver`).  A blocked
syscall interrupted by a handler returns EINTR, or restarts when the handler has
SA_RESTART (never for the calls Linux never restarts: sleeps, waits for signals).
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import TYPE_CHECKING

from tender_service.machine.cpu import (
    EFLAGS,
    FXSAVE,
    FXSAVE_SIZE,
    GPRS,
    MXCSR_MASK,
    RIP,
    SYSCALL_INSN_LEN,
    RegSet,
)
from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.signals import SigInfo

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

log = logging.getLogger(__name__)

#: struct sigcontext's general registers, in its order (musl's REG_R8 ... REG_EFL)
_SC_NAMES = (
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp",
)  # fmt: skip
_SC_REGS = RegSet(*(GPRS[n] for n in _SC_NAMES), RIP, EFLAGS)
_IDX = {n: i for i, n in enumerate(_SC_NAMES)}
_RAX, _RSP, _RIP, _EFL = _IDX["rax"], _IDX["rsp"], 16, 17
_HANDLER_REGS = RegSet(GPRS["rdi"], GPRS["rsi"], GPRS["rdx"], GPRS["rax"], GPRS["rsp"], RIP)

#: ucontext: uc_flags, uc_link, uc_stack (ss_sp, ss_flags, pad, ss_size)
_UC_HEAD = struct.Struct("<QQQiiQ")
#: sigcontext: 18 registers, cs gs fs ss, err trapno oldmask cr2, fpstate, reserved[8]
_SIGCONTEXT = struct.Struct("<18QHHHHQQQQQ64x")
UC_SIZE = _UC_HEAD.size + _SIGCONTEXT.size + 8  # + uc_sigmask: 304, as Linux's
FRAME_SIZE = 8 + UC_SIZE + 128  # pretcode, ucontext, siginfo
UC_SIGCONTEXT_SS = 2
SS_ONSTACK, SS_DISABLE = 1, 2
RED_ZONE = 128
#: the flags a frame may change (Linux's FIX_EFLAGS): AC OF DF TF SF ZF AF PF CF RF
FIX_EFLAGS = 0x40000 | 0x800 | 0x400 | 0x100 | 0x80 | 0x40 | 0x10 | 0x4 | 0x1 | 0x10000
_HANDLER_CLEARS = 0x400 | 0x100 | 0x10000  # DF, TF, RF
USER_CS, USER_DS = 0x33, 0x2B
#: syscalls Linux never restarts after a handler (ERESTARTNOHAND, restart blocks)
NO_RESTART = {
    7,  # poll
    23,  # select
    34,  # pause
    35,  # nanosleep
    128,  # rt_sigtimedwait
    130,  # rt_sigsuspend
    230,  # clock_nanosleep
    232,  # epoll_wait
    270,  # pselect6
    271,  # ppoll
    281,  # epoll_pwait
}
WRITES = {1, 20}  # write, writev: an interrupted write returns what it moved


def on_altstack(lwp: Lwp, sp: int) -> bool:
    base, size = lwp.altstack
    return size > 0 and base < sp <= base + size


def deliver(k: Kernel, lwp: Lwp) -> bool:
    """Act on every signal ``lwp`` may receive now; its context is loaded in the CPU.

    False if the process is gone or stopped (the caller must not run it).
    """
    proc = lwp.proc
    first = True
    while proc.alive and not proc.stopped:
        info = dequeue(proc, ~lwp.sigmask)
        if info is None:
            break
        sig = info.signo
        handler = proc.disposition(sig)
        if handler == signals.SIG_IGN:
            continue
        if handler == signals.SIG_DFL:
            k.default_action(proc, sig)
            continue
        if not _setup_frame(k, lwp, info, first):
            break
        first = False
    lwp.restart_nr, lwp.interrupted = -1, False
    if lwp.saved_sigmask is not None:  # no handler ran: sigsuspend's mask ends here
        lwp.sigmask, lwp.saved_sigmask = lwp.saved_sigmask, None
    return proc.alive and not proc.stopped


def dequeue(proc, allowed: int) -> SigInfo | None:
    """Take the next pending signal in ``allowed``: the CPU's own first, then the
    lowest number (real-time instances in the order they were sent)."""
    ready = proc.pending & allowed
    if not ready:
        return None
    sync = ready & signals.SYNCHRONOUS
    pick = sync or ready
    sig = (pick & -pick).bit_length()
    for i, info in enumerate(proc.sigqueue):
        if info.signo == sig:
            del proc.sigqueue[i]
            break
    else:  # pragma: no cover - the set and the queue are kept together
        info = SigInfo(sig)
    if not any(q.signo == sig for q in proc.sigqueue):
        proc.pending &= ~signals.bit(sig)
    if info.timer is not None:  # a POSIX timer's: the overruns counted until now
        info.uid = info.timer.delivered()
    return info


def _setup_frame(k: Kernel, lwp: Lwp, info: SigInfo, first: bool) -> bool:
    """Build the frame and point the CPU at the handler; False if the process died."""
    proc, cpu, mem = lwp.proc, k.cpu, k.mem
    sig = info.signo
    handler, flags, restorer, mask = proc.sigactions[sig]
    regs = cpu.read_regs(_SC_REGS)
    if first and lwp.restart_nr >= 0:
        _interrupt_syscall(lwp, regs, flags)
    sp = regs[_RSP]
    base, size = lwp.altstack
    onstack = on_altstack(lwp, sp)
    if flags & signals.SA_ONSTACK and size and not onstack:
        sp = base + size
    else:
        sp -= RED_ZONE
    fp = (sp - FXSAVE_SIZE) & ~63
    frame = ((fp - FRAME_SIZE) & ~15) - 8
    old_mask = lwp.saved_sigmask if lwp.saved_sigmask is not None else lwp.sigmask
    uc = frame + 8
    try:
        if not flags & signals.SA_RESTORER:
            raise GuestError(errno.EFAULT, "no sa_restorer")
        mem.write(fp, cpu.read_fxsave())
        ss_flags = (SS_ONSTACK if on_altstack(lwp, frame) else 0) if size else SS_DISABLE
        head = _UC_HEAD.pack(UC_SIGCONTEXT_SS, 0, base, ss_flags, 0, size)
        fault = info.addr is not None
        sc = _SIGCONTEXT.pack(
            *regs,
            USER_CS,
            0,
            0,
            USER_DS,
            0,
            _TRAPNO.get(sig, 0) if fault else 0,
            old_mask,
            info.addr or 0,
            fp,
        )
        mem.write(frame, struct.pack("<Q", restorer) + head + sc + struct.pack("<Q", old_mask))
        mem.write(uc + UC_SIZE, info.pack())
    except GuestError:
        # no room for the frame (or no way back): Linux's force_sigsegv
        proc.report = proc.report or (
            f"pid {proc.pid}: killed by SIGSEGV: cannot deliver {signals.signame(sig)} "
            f"(signal frame at {frame:#x} not writable)"
        )
        k.exit_process(proc, signals.death_status(proc, signals.SIGSEGV))
        return False
    lwp.saved_sigmask = None
    if not flags & signals.SA_NODEFER:
        mask |= signals.bit(sig)
    lwp.sigmask = (lwp.sigmask | mask) & ~signals.UNBLOCKABLE
    if flags & signals.SA_RESETHAND:
        proc.sigactions.pop(sig, None)
    cpu.write_regs(_HANDLER_REGS, [sig, uc + UC_SIZE, uc, 0, frame, handler])
    cpu.set_reg(EFLAGS, regs[_EFL] & ~_HANDLER_CLEARS)
    cpu.reset_fpu()
    return True


#: the trap number a fault's frame reports (page fault, invalid opcode, divide error)
_TRAPNO = {signals.SIGSEGV: 14, signals.SIGBUS: 14, signals.SIGILL: 6, signals.SIGFPE: 0}


def _interrupt_syscall(lwp: Lwp, regs: list[int], flags: int) -> None:
    """The blocked syscall ``lwp`` was parked in (rip at its ``syscall`` again) meets a
    handler: it restarts after the handler (SA_RESTART) or returns EINTR."""
    nr = lwp.restart_nr
    if lwp.remote_req:
        # a request to another VM is on its way: its answer must not be lost, so the
        # call resumes after the handler and collects it (documented)
        return
    if flags & signals.SA_RESTART and nr not in NO_RESTART:
        return
    regs[_RIP] += SYSCALL_INSN_LEN
    if nr in WRITES and lwp.progress > 0:
        regs[_RAX] = lwp.progress  # the part already written
    else:
        regs[_RAX] = -errno.EINTR & 0xFFFF_FFFF_FFFF_FFFF
    lwp.progress, lwp.deadline, lwp.futex_woken, lwp.sigwait = 0, 0.0, False, 0


def sigreturn(k: Kernel, lwp: Lwp) -> None:
    """Restore what the frame at rsp says; a bad frame raises GuestError (SIGSEGV)."""
    cpu, mem = k.cpu, k.mem
    uc = cpu.read_regs(_SC_REGS)[_RSP]
    raw = mem.read(uc, UC_SIZE)
    sc = _SIGCONTEXT.unpack_from(raw, _UC_HEAD.size)
    (mask,) = struct.unpack_from("<Q", raw, UC_SIZE - 8)
    regs = list(sc[:18])
    fpstate = sc[26]
    if fpstate:
        image = mem.read(fpstate, FXSAVE_SIZE)
        mxcsr = FXSAVE.unpack_from(image, 0)[6]
        if mxcsr & ~MXCSR_MASK:
            raise GuestError(errno.EFAULT, f"reserved MXCSR bits {mxcsr:#x}")
        cpu.write_fxsave(image)
    else:
        cpu.reset_fpu()
    eflags = cpu.reg(EFLAGS)
    regs[_EFL] = (eflags & ~FIX_EFLAGS) | (regs[_EFL] & FIX_EFLAGS)
    # this runs inside Unicorn's syscall hook, after which Unicorn still adds the
    # length of the ``syscall`` instruction to rip
    regs[_RIP] -= SYSCALL_INSN_LEN
    cpu.write_regs(_SC_REGS, regs)
    lwp.sigmask = mask & ~signals.UNBLOCKABLE

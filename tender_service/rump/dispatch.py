"""The syscall boundary: every guest ``syscall`` lands in the dispatcher made here.

The hot path is one table lookup and one handler call.  A handler's outcome
(``rump/outcomes.py``) becomes what the guest sees; nothing a guest does lets a
Python exception escape: an unexpected one ends the calling process with SIGSYS
and a report (each such report is a kernel bug), and the VM goes on.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from tender_service.machine.cpu import RAX
from tender_service.rump import signals
from tender_service.rump.outcomes import SWITCH, Block, BlockAfter, GuestError, Restart
from tender_service.rump.syscalls.names import syscall_name
from tender_service.rump.syscalls.table import dispatch_table, hypercall_table

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

log = logging.getLogger("tender_service.rump.kernel")  # `--trace-syscalls` turns this one up

#: called on every syscall with its registers in ``cpu.sysregs``; returns the value for
#: rax, or None when rax is already what the guest must see (``Cpu.hook_syscall``)
Dispatcher = Callable[[], int | None]


def make_dispatcher(kernel: Kernel) -> Dispatcher:
    """The syscall entry of ``kernel``: a closure over locals, since it runs for every
    syscall."""
    cpu = kernel.cpu
    table, hypercalls = dispatch_table(), hypercall_table()
    ntable = len(table)
    set_rax, stop = cpu.set_rax, cpu.stop
    regs = cpu.sysregs
    events, runq = kernel.events, kernel.sched.runq

    def dispatch() -> int | None:
        if events:
            # another thread posted work while the guest ran (it was not stopped for
            # it: see Kernel.post_event): the loop takes it, then this syscall restarts
            kernel.restart_pending = True
            stop()
            return None
        nr = regs[0]
        lwp = kernel.current
        assert lwp is not None  # a syscall comes from the thread that runs
        if lwp.restart_nr >= 0:
            # the parked syscall runs again: no longer parked.  Not before (in the
            # loop): a time slice can end before the syscall instruction runs, and a
            # signal delivered then would resume the handler's return on the syscall
            # with no EINTR (a sigsuspend slept again, its signal taken: a VM-clone
            # ping-pong hung about once in 30-130 runs under load).  Counted when it
            # was first made: whether a call parks depends on timing (a child that ran
            # first), the count of calls the program made does not
            lwp.restart_nr, lwp.interrupted = -1, False
        else:
            kernel.syscalls += 1
        ret: object
        try:
            entry = table[nr] if nr < ntable else hypercalls.get(nr)
            if entry is None:
                ret = _unknown(kernel, nr)
            else:
                fn, argc = entry
                ret = fn(kernel, lwp, *regs[1 : argc + 1]) if argc else fn(kernel, lwp)
        except GuestError as e:
            ret = -e.errno
        except Block as b:
            _park(kernel, lwp, b)
            return None
        except BlockAfter as b:
            set_rax(b.value)
            kernel.sched.block(lwp.thread, None, b.why)
            stop()
            return None
        except Exception as e:  # a kernel bug must not take the tender down
            _internal_error(kernel, lwp, nr, e)
            return None
        if type(ret) is int:
            # a signal to deliver on the way back to user mode: the C entry checks
            # and stops the CPU after it has written rax (guest/runtime/syscall_hook.c)
            if runq and kernel.slice_used():
                stop()  # its slice's time is up: preempted here
            return ret  # the stop takes effect after the hook has written rax
        if ret is SWITCH:
            set_rax(0)
            kernel.slice_owner = None  # to the back of the run queue
        stop()  # NORETURN, JUMP: the loop resumes from the registers as they are
        return None

    return dispatch


def traced(kernel: Kernel, dispatch: Dispatcher) -> Dispatcher:
    """``dispatch`` that also logs each syscall with its arguments and result."""

    regs = kernel.cpu.sysregs

    def dispatch_traced() -> int | None:
        nr, args = regs[0], list(regs[1:7])
        lwp = kernel.current
        pid = lwp.proc.pid if lwp else 0
        # a parked call that runs again (strace's "resumed"): not a new call
        again = " (restarted)" if lwp is not None and lwp.restart_nr >= 0 else ""
        deferred = bool(kernel.events)  # dispatch's first check: the call has not begun
        ret = dispatch()
        if deferred:
            result, again = "(not begun: the kernel's other work first)", ""
        elif kernel.restart_pending:
            result = "(blocked, will restart)"
        else:
            rax = kernel.cpu.reg(RAX) if ret is None else ret & (1 << 64) - 1
            rax = rax - (1 << 64) if rax >> 63 else rax
            result = f"-{errno.errorcode.get(-rax, -rax)}" if -4096 < rax < 0 else f"{rax:#x}"
        log.info(
            "[pid %d] %s(%s) = %s%s",
            pid,
            syscall_name(nr) if nr < 0x1000 else f"hc_{nr:#x}",
            ", ".join(f"{a:#x}" for a in args),
            result,
            again,
        )
        return ret

    return dispatch_traced


def _park(kernel: Kernel, lwp: Lwp, b: Block) -> None:
    if lwp.proc.pending & ~lwp.sigmask:
        # a signal is ready: the call is interrupted instead of waiting (EINTR or a
        # restart after the handler, decided when the loop delivers it)
        lwp.interrupted = True
    elif not isinstance(b, Restart):
        # (a Restart's signal stopped the process: it waits for SIGCONT already)
        kernel.sched.block(lwp.thread, b.wq, b.why, b.until)
    kernel.restart_pending = True
    kernel.cpu.stop()


def _unknown(kernel: Kernel, nr: int) -> int:
    kernel.warn_once(
        f"syscall:{nr}", "unsupported syscall %d (%s): returning ENOSYS", nr, syscall_name(nr)
    )
    return -errno.ENOSYS


def _internal_error(kernel: Kernel, lwp: Lwp, nr: int, e: Exception) -> None:
    log.exception("internal error in syscall %s of pid %d", syscall_name(nr), lwp.proc.pid)
    report = (
        f"pid {lwp.proc.pid}: killed by SIGSYS: internal error in "
        f"{syscall_name(nr)}: {type(e).__name__}: {e}"
    )
    kernel.reports.append(report)
    lwp.proc.report = report
    try:
        kernel.exit_process(lwp.proc, signals.death_status(lwp.proc, signals.SIGSYS))
    except Exception:
        log.exception("cleanup after internal error failed")
        kernel.request_stop("error")
    kernel.cpu.stop()

"""Signals: sending (kill, tkill, tgkill, rt_sigqueueinfo, alarm, setitimer),
dispositions, masks, waiting for signals, the alternate stack and rt_sigreturn.

Handlers run on a Linux signal frame (``rump/sigframe.py``), at the return to
user mode (``Kernel._loop``).
"""

from __future__ import annotations

import errno
import struct
import time
from typing import TYPE_CHECKING

from tender_service.machine.cpu import RSP
from tender_service.machine.errors import GuestError
from tender_service.rump import sigframe, signals
from tender_service.rump.outcomes import JUMP, NORETURN, Block
from tender_service.rump.process import ProcState
from tender_service.rump.proctable import MAX_QUEUED
from tender_service.rump.syscalls.abi import i32, read_timespec
from tender_service.rump.timers import MAX_TIMERS, SIGEV_NONE, SIGEV_SIGNAL, PosixTimer

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

SIGACTION = struct.Struct("<QQQQ")  # handler, flags, restorer, mask (kernel k_sigaction)
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
UNBLOCKABLE = signals.UNBLOCKABLE
STACK_T = struct.Struct("<QiiQ")  # ss_sp, ss_flags, pad, ss_size
MINSIGSTKSZ = 2048
SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
ITIMERVAL = struct.Struct("<qqqq")  # it_interval (sec, usec), it_value (sec, usec)
ITIMER_REAL = 0


def _check_sig(sig: int) -> int:
    sig = i32(sig)
    if not 0 <= sig < signals.NSIG:
        raise GuestError(errno.EINVAL)
    return sig


def _send(
    k: Kernel, lwp: Lwp, targets: list[Process], sig: int, code: int = signals.SI_USER
) -> int | object:
    """Signal every target; NORETURN if the caller itself died of it."""
    if not targets:
        raise GuestError(errno.ESRCH)
    me = lwp.proc
    for p in targets:
        k.post_signal(p, sig, signals.SigInfo(sig, code, me.pid))
    return NORETURN if not me.alive else 0


def _result(value: int) -> int:
    if value < 0:
        raise GuestError(-value)
    return value


def _live(k: Kernel) -> list[Process]:
    return [p for p in k.procs.values() if p.state is not ProcState.REAPED and p is not k.init]


def sys_kill(k: Kernel, lwp: Lwp, pid: int, sig: int) -> int | object:
    pid, sig = i32(pid), _check_sig(sig)
    if pid > 0:
        p = k.procs.get(pid)
        if p is None or p.state is ProcState.REAPED:
            if k.remote is not None:  # a process of another VM (VM-clone)
                return _result(k.remote.signal(lwp.proc, pid, sig))
            raise GuestError(errno.ESRCH)
        if p is k.init:
            return 0  # init ignores signals it has no handler for
        targets = [p]
    elif pid == -1:
        targets = [p for p in _live(k) if p is not lwp.proc]
    else:
        pgid = lwp.proc.pgid if pid == 0 else -pid
        targets = [p for p in _live(k) if p.pgid == pgid]
    if pid <= 0 and k.remote is not None:  # the group may span VMs: the supervisor fans out
        remote = k.remote.signal(lwp.proc, pid, sig)
        if not targets:
            return _result(remote)
    # signal the caller last so that it still signals the others
    targets.sort(key=lambda p: p is lwp.proc)
    return _send(k, lwp, targets, sig)


def sys_tkill(k: Kernel, lwp: Lwp, tid: int, sig: int) -> int | object:
    tid, sig = i32(tid), _check_sig(sig)
    if tid <= 0:
        raise GuestError(errno.EINVAL)
    p = k.procs.get(tid)  # one LWP per process: tid == pid
    if (p is None or p.state is ProcState.REAPED) and k.remote is not None:
        # a process of another VM
        return _result(k.remote.signal(lwp.proc, tid, sig, signals.SI_TKILL))
    if p is None or p.state is ProcState.REAPED or p is k.init:
        raise GuestError(errno.ESRCH)
    return _send(k, lwp, [p], sig, signals.SI_TKILL)


def sys_tgkill(k: Kernel, lwp: Lwp, tgid: int, tid: int, sig: int) -> int | object:
    if i32(tgid) <= 0:
        raise GuestError(errno.EINVAL)
    if i32(tgid) != i32(tid):
        raise GuestError(errno.ESRCH)
    return sys_tkill(k, lwp, tid, sig)


def sys_rt_sigaction(k: Kernel, lwp: Lwp, sig: int, act: int, oact: int, sigsetsize: int) -> int:
    sig = i32(sig)
    if sigsetsize != 8 or not 1 <= sig < signals.NSIG:
        raise GuestError(errno.EINVAL)
    proc = lwp.proc
    new = k.mem.unpack(SIGACTION, act) if act else None
    if new is not None and sig in (signals.SIGKILL, signals.SIGSTOP):
        raise GuestError(errno.EINVAL)
    if oact:
        k.mem.pack(SIGACTION, oact, *proc.sigactions.get(sig, (0, 0, 0, 0)))
    if new is not None:
        handler, flags, restorer, mask = new
        proc.sigactions[sig] = (handler, flags, restorer, mask & ~UNBLOCKABLE)
        if k.remote is not None and handler not in (signals.SIG_DFL, signals.SIG_IGN):
            k.slices_needed()  # a signal from another VM must reach the handler
        if proc.ignores(sig):  # POSIX: setting SIG_IGN discards a pending instance
            _discard(proc, signals.bit(sig))
    return 0


def _discard(proc: Process, mask: int) -> None:
    proc.sigqueue = [q for q in proc.sigqueue if not signals.bit(q.signo) & mask]
    proc.pending &= ~mask


def _deliverable(k: Kernel, lwp: Lwp) -> bool:
    """A signal is ready for ``lwp`` now: stop the CPU so the loop delivers it when
    this syscall returns."""
    if lwp.proc.pending & ~lwp.sigmask:
        k.cpu.stop()
        return True
    return False


def sys_rt_sigprocmask(k: Kernel, lwp: Lwp, how: int, set_: int, oset: int, sigsetsize: int) -> int:
    """The new set is read and ``how`` checked before the old set is written, and the
    mask changes only if that write succeeds.  The C syscall entry answers most
    calls itself, the same way (guest/runtime/syscall_hook.c: musl's fork makes
    four); this runs for the rest (an odd size or ``how``, a bad pointer) and in
    a traced VM."""
    if sigsetsize != 8:
        raise GuestError(errno.EINVAL)
    old = mask = lwp.sigmask
    if set_:
        new = k.mem.read_u64(set_)
        how &= 0xFFFF_FFFF  # an int argument: 0, 1 and 2 are the only valid ones
        if how == SIG_BLOCK:
            mask = old | new
        elif how == SIG_UNBLOCK:
            mask = old & ~new
        elif how == SIG_SETMASK:
            mask = new
        else:
            raise GuestError(errno.EINVAL)
    if oset:
        k.mem.write_u64(oset, old)
    if set_:
        lwp.sigmask = mask = mask & ~UNBLOCKABLE
        if lwp.proc.pending & ~mask:
            k.cpu.stop()  # a signal it unblocked: delivered when this syscall returns
    return 0


def sys_rt_sigpending(k: Kernel, lwp: Lwp, set_: int, sigsetsize: int) -> int:
    if sigsetsize > 8:
        raise GuestError(errno.EINVAL)
    k.mem.write(set_, (lwp.proc.pending & lwp.sigmask).to_bytes(8, "little")[:sigsetsize])
    return 0


def _wait_queue(k: Kernel, lwp: Lwp):
    wq = lwp.proc.signal_wq
    wq.host = k.remote is not None  # another VM may send the signal
    return wq


def sys_rt_sigsuspend(k: Kernel, lwp: Lwp, mask: int, sigsetsize: int) -> int:
    """Wait for a signal with a temporary mask; the handler's return restores the old."""
    if sigsetsize != 8:
        raise GuestError(errno.EINVAL)
    if lwp.saved_sigmask is None:
        new = k.mem.read_u64(mask)
        lwp.saved_sigmask, lwp.sigmask = lwp.sigmask, new & ~UNBLOCKABLE
    if _deliverable(k, lwp):
        return -errno.EINTR
    raise Block(_wait_queue(k, lwp), "sigsuspend")


def sys_pause(k: Kernel, lwp: Lwp) -> int:
    if _deliverable(k, lwp):
        return -errno.EINTR
    raise Block(_wait_queue(k, lwp), "pause")


def sys_rt_sigtimedwait(
    k: Kernel, lwp: Lwp, set_: int, info: int, timeout: int, sigsetsize: int
) -> int:
    if sigsetsize != 8:
        raise GuestError(errno.EINVAL)
    want = k.mem.read_u64(set_) & ~UNBLOCKABLE
    got = sigframe.dequeue(lwp.proc, want)
    if got is not None:
        lwp.sigwait, lwp.deadline = 0, 0.0
        if info:
            k.mem.write(info, got.pack())
        return got.signo
    if timeout and not lwp.deadline:
        sec, nsec = read_timespec(k.mem, timeout)
        lwp.deadline = time.monotonic() + sec + nsec / 1e9
    if timeout and time.monotonic() >= lwp.deadline:
        lwp.sigwait, lwp.deadline = 0, 0.0
        raise GuestError(errno.EAGAIN)
    lwp.sigwait = want
    raise Block(_wait_queue(k, lwp), "sigtimedwait", until=lwp.deadline or None)


def sys_rt_sigqueueinfo(k: Kernel, lwp: Lwp, tgid: int, sig: int, uinfo: int) -> int | object:
    """sigqueue(3): a signal with a value; real-time ones queue in order."""
    tgid, sig = i32(tgid), _check_sig(sig)
    raw = k.mem.read(uinfo, 128)
    code = struct.unpack_from("<i", raw, 8)[0]
    me = lwp.proc
    if code >= 0 and tgid != me.pid:
        raise GuestError(errno.EPERM)  # only the kernel may claim kernel si_codes
    (value,) = struct.unpack_from("<Q", raw, 24)
    p = k.procs.get(tgid)
    if p is None or p.state is ProcState.REAPED:
        if k.remote is not None:  # another VM: code and value travel with the signal
            return _result(k.remote.signal(me, tgid, sig, code, value))
        raise GuestError(errno.ESRCH)
    if p is k.init:
        return 0
    if sig == 0:
        return 0
    if len(p.sigqueue) >= MAX_QUEUED and signals.is_realtime(sig):
        raise GuestError(errno.EAGAIN)
    k.post_signal(p, sig, signals.SigInfo(sig, code, me.pid, 0, value))
    return NORETURN if not me.alive else 0


def sys_rt_sigreturn(k: Kernel, lwp: Lwp) -> object:
    """Back from a handler: every register, the FPU/SSE state and the mask from the frame."""
    try:
        sigframe.sigreturn(k, lwp)
    except GuestError:
        proc = lwp.proc
        proc.report = proc.report or f"pid {proc.pid}: killed by SIGSEGV: bad rt_sigreturn frame"
        k.exit_process(proc, signals.death_status(proc, signals.SIGSEGV))
        return NORETURN
    _deliverable(k, lwp)
    return JUMP


def sys_sigaltstack(k: Kernel, lwp: Lwp, ss: int, old_ss: int) -> int:
    base, size = lwp.altstack
    rsp = k.cpu.reg(RSP)
    onstack = sigframe.on_altstack(lwp, rsp)
    new = k.mem.unpack(STACK_T, ss) if ss else None
    if old_ss:
        flags = SS_ONSTACK if onstack else (0 if size else SS_DISABLE)
        k.mem.pack(STACK_T, old_ss, base, flags, 0, size)
    if new is not None:
        sp, flags, _, nsize = new
        if onstack:
            raise GuestError(errno.EPERM)
        if flags & ~(SS_DISABLE | SS_AUTODISARM):
            raise GuestError(errno.EINVAL)
        if flags & SS_DISABLE:
            lwp.altstack = (0, 0)
        else:
            if nsize < MINSIGSTKSZ:
                raise GuestError(errno.ENOMEM)
            lwp.altstack = (sp, nsize)
    return 0


# -- timers that send signals ----------------------------------------------------------
def _itimer_left(lwp: Lwp) -> tuple[float, float]:
    deadline, interval = lwp.proc.itimer
    left = max(0.0, deadline - time.monotonic()) if lwp.proc.itimer_token else 0.0
    if lwp.proc.itimer_token and left == 0.0:
        left = 1e-6  # due but not fired yet: still armed
    return left, interval


def _timeval(seconds: float) -> tuple[int, int]:
    us = round(seconds * 1e6)
    return us // 1_000_000, us % 1_000_000


def sys_alarm(k: Kernel, lwp: Lwp, seconds: int) -> int:
    left, _ = _itimer_left(lwp)
    seconds &= 0xFFFF_FFFF
    k.arm_itimer(lwp.proc, time.monotonic() + seconds if seconds else 0.0, 0.0)
    return int(left) + (1 if left - int(left) >= 0.5 or 0 < left < 1 else 0)


def sys_getitimer(k: Kernel, lwp: Lwp, which: int, value: int) -> int:
    if i32(which) != ITIMER_REAL:
        raise GuestError(errno.EINVAL)
    left, interval = _itimer_left(lwp)
    k.mem.pack(ITIMERVAL, value, *_timeval(interval), *_timeval(left))
    return 0


def sys_setitimer(k: Kernel, lwp: Lwp, which: int, new: int, old: int) -> int:
    if i32(which) != ITIMER_REAL:
        raise GuestError(errno.EINVAL)  # ITIMER_VIRTUAL/PROF: no CPU-time accounting
    isec, iusec, vsec, vusec = k.mem.unpack(ITIMERVAL, new) if new else (0, 0, 0, 0)
    if min(isec, vsec) < 0 or not (0 <= iusec < 1_000_000 and 0 <= vusec < 1_000_000):
        raise GuestError(errno.EINVAL)
    if old:
        left, interval = _itimer_left(lwp)
        k.mem.pack(ITIMERVAL, old, *_timeval(interval), *_timeval(left))
    if new:
        value, interval = vsec + vusec / 1e6, isec + iusec / 1e6
        k.arm_itimer(lwp.proc, time.monotonic() + value if value else 0.0, interval)
    return 0


# -- POSIX timers (timer_create & co; rump/timers.py) -------------------------------------
SIGEVENT = struct.Struct("<qii")  # sigev_value, sigev_signo, sigev_notify (then the union)
ITIMERSPEC = struct.Struct("<qqqq")  # it_interval (sec, nsec), it_value (sec, nsec)
_TIMER_CLOCKS = (0, 1, 7)  # CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME
TIMER_ABSTIME = 1


def _timer(lwp: Lwp, timerid: int) -> PosixTimer:
    t = lwp.proc.timers.get(i32(timerid))
    if t is None:
        raise GuestError(errno.EINVAL)
    return t


def _timespec(seconds: float) -> tuple[int, int]:
    ns = round(seconds * 1e9)
    return ns // 1_000_000_000, ns % 1_000_000_000


def sys_timer_create(k: Kernel, lwp: Lwp, clock: int, sevp: int, timerid: int) -> int:
    """A timer on CLOCK_REALTIME, CLOCK_MONOTONIC or CLOCK_BOOTTIME that sends a signal
    (SIGEV_SIGNAL) or nothing (SIGEV_NONE).  SIGEV_THREAD_ID (musl's SIGEV_THREAD) is
    EINVAL: a signal aimed at one thread of a process has nowhere to go here."""
    proc = lwp.proc
    if i32(clock) not in _TIMER_CLOCKS:
        raise GuestError(errno.EINVAL)
    if sevp:
        value, signo, notify = k.mem.unpack(SIGEVENT, sevp)
        if notify not in (SIGEV_SIGNAL, SIGEV_NONE):
            raise GuestError(errno.EINVAL)
        if notify == SIGEV_SIGNAL and not 0 < signo < signals.NSIG:
            raise GuestError(errno.EINVAL)
    if len(proc.timers) >= MAX_TIMERS:
        raise GuestError(errno.EAGAIN)
    tid = next(i for i in range(MAX_TIMERS + 1) if i not in proc.timers)
    if not sevp:  # Linux's default: SIGALRM, with the timer's id as the value
        value, signo, notify = tid, signals.SIGALRM, SIGEV_SIGNAL
    k.mem.write_u32(timerid, tid)
    proc.timers[tid] = PosixTimer(tid, i32(clock), notify, signo, value & (2**64 - 1))
    return 0


def sys_timer_settime(k: Kernel, lwp: Lwp, timerid: int, flags: int, new: int, old: int) -> int:
    timer = _timer(lwp, timerid)
    isec, insec, vsec, vnsec = k.mem.unpack(ITIMERSPEC, new)
    if min(isec, vsec) < 0 or not (0 <= insec < 1_000_000_000 and 0 <= vnsec < 1_000_000_000):
        raise GuestError(errno.EINVAL)
    if old:
        left, interval = timer.left()
        k.mem.pack(ITIMERSPEC, old, *_timespec(interval), *_timespec(left))
    value, interval = vsec + vnsec / 1e9, isec + insec / 1e9
    now = time.monotonic()
    deadline = 0.0
    if value:
        if flags & TIMER_ABSTIME:  # an absolute time on the timer's clock
            clock_now = time.time() if timer.clock == 0 else now
            deadline = now + max(value - clock_now, 0.0)
        else:
            deadline = now + value
        deadline = max(deadline, 1e-9)
    timer.overrun = 0
    k.arm_ptimer(lwp.proc, timer, deadline, interval if value else 0.0)
    return 0


def sys_timer_gettime(k: Kernel, lwp: Lwp, timerid: int, cur: int) -> int:
    left, interval = _timer(lwp, timerid).left()
    k.mem.pack(ITIMERSPEC, cur, *_timespec(interval), *_timespec(left))
    return 0


def sys_timer_getoverrun(k: Kernel, lwp: Lwp, timerid: int) -> int:
    return _timer(lwp, timerid).overrun_last


def sys_timer_delete(k: Kernel, lwp: Lwp, timerid: int) -> int:
    timer = _timer(lwp, timerid)
    k.arm_ptimer(lwp.proc, timer, 0.0, 0.0)
    del lwp.proc.timers[timer.id]
    return 0

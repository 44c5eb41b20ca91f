"""Signals: kill/tkill/tgkill with default actions, dispositions and masks.

Guest handlers are recorded but not run yet (see rump/signals.py).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump import signals
from tender_service.rump.outcomes import NORETURN
from tender_service.rump.process import ProcState
from tender_service.rump.syscalls.abi import i32

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

SIGACTION = struct.Struct("<QQQQ")  # handler, flags, restorer, mask (kernel k_sigaction)
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
UNBLOCKABLE = (1 << (signals.SIGKILL - 1)) | (1 << (signals.SIGSTOP - 1))  # bit n-1: signal n


def _check_sig(sig: int) -> int:
    sig = i32(sig)
    if not 0 <= sig < signals.NSIG:
        raise GuestError(errno.EINVAL)
    return sig


def _send(k: Kernel, lwp: Lwp, targets: list[Process], sig: int) -> int | object:
    """Signal every target; NORETURN if the caller itself died of it."""
    if not targets:
        raise GuestError(errno.ESRCH)
    me = lwp.proc
    for p in targets:
        k.post_signal(p, sig)
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
    if p is None or p.state is ProcState.REAPED or p is k.init:
        raise GuestError(errno.ESRCH)
    return _send(k, lwp, [p], sig)


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
        proc.sigactions[sig] = new
        if new[0] == signals.SIG_IGN:
            proc.pending &= ~(1 << (sig - 1))
    return 0


def sys_rt_sigprocmask(k: Kernel, lwp: Lwp, how: int, set_: int, oset: int, sigsetsize: int) -> int:
    if sigsetsize != 8:
        raise GuestError(errno.EINVAL)
    new = k.mem.read_u64(set_) if set_ else None
    if oset:
        k.mem.write_u64(oset, lwp.sigmask)
    if new is not None:
        how = i32(how)
        if how == SIG_BLOCK:
            lwp.sigmask |= new
        elif how == SIG_UNBLOCK:
            lwp.sigmask &= ~new
        elif how == SIG_SETMASK:
            lwp.sigmask = new
        else:
            raise GuestError(errno.EINVAL)
        lwp.sigmask &= ~UNBLOCKABLE
    return 0


def sys_rt_sigpending(k: Kernel, lwp: Lwp, set_: int, sigsetsize: int) -> int:
    k.mem.write_u64(set_, lwp.proc.pending)
    return 0


def sys_sigaltstack(k: Kernel, lwp: Lwp, ss: int, old_ss: int) -> int:
    if old_ss:
        k.mem.write(old_ss, struct.pack("<QiiQ", 0, 2, 0, 0))  # SS_DISABLE
    return 0

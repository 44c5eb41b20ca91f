"""Process lifecycle: ids, exit, fork/vfork/clone, wait4/waitid, groups, limits.

``fork`` itself is the fork strategy's (thread fork or VM clone); this module
only checks the request and hands it over.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import TYPE_CHECKING

from tender_service.machine.cpu import GPRS, RIP, RSP, SYSCALL_INSN_LEN, RegSet
from tender_service.machine.errors import GuestError
from tender_service.rump import pgroups, signals
from tender_service.rump.outcomes import NORETURN, Block, BlockAfter
from tender_service.rump.process import ProcState
from tender_service.rump.syscalls.abi import i32
from tender_service.rump.vminfo import FORK_TIMES_KEPT

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

WNOHANG, WUNTRACED, WEXITED, WCONTINUED, WNOWAIT = 1, 2, 4, 8, 0x01000000
__WALL, __WCLONE, __WNOTHREAD = 0x40000000, 0x80000000, 0x20000000
P_ALL, P_PID, P_PGID = 0, 1, 2
CLD_EXITED, CLD_KILLED, CLD_STOPPED, CLD_CONTINUED = 1, 2, 5, 6
CSIGNAL = 0xFF
CLONE_VM, CLONE_VFORK = 0x100, 0x4000
_CLONE_REGS = RegSet(GPRS["rax"], GPRS["rsp"], RIP)
RUSAGE_SIZE = 144
RLIM_INFINITY = 0xFFFF_FFFF_FFFF_FFFF
RLIMIT_STACK, RLIMIT_CORE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_AS = 3, 4, 6, 7, 9
RLIMIT = struct.Struct("<QQ")


# -- ids ---------------------------------------------------------------------------
def sys_getpid(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.pid


def sys_getppid(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.ppid


def sys_gettid(k: Kernel, lwp: Lwp) -> int:
    return lwp.tid


def sys_set_tid_address(k: Kernel, lwp: Lwp, tidptr: int) -> int:
    lwp.clear_child_tid = tidptr
    return lwp.tid


# -- exit ----------------------------------------------------------------------------
def sys_exit_group(k: Kernel, lwp: Lwp, code: int) -> object:
    k.exit_process(lwp.proc, signals.exited_status(code))
    return NORETURN


def sys_exit(k: Kernel, lwp: Lwp, code: int) -> object:
    # one LWP per process: ending the thread ends the process
    return sys_exit_group(k, lwp, code)


# -- fork ----------------------------------------------------------------------------
def _fork(k: Kernel, lwp: Lwp) -> int:
    if k.forker is None:
        raise GuestError(errno.ENOSYS)
    if len(k.procs) >= k.config.max_procs:
        raise GuestError(errno.EAGAIN)
    t0 = time.perf_counter()
    pid = k.forker.fork(k, lwp, False)
    if pid > 0:
        took = _forked(k, lwp.proc, t0)
        if k.fork_observer is not None:
            k.fork_observer(took)
    return pid


def _forked(k: Kernel, parent: Process, t0: float) -> float:
    """Count a fork (or vfork) that began at ``t0`` and keep its time in the kernel
    (the first ``FORK_TIMES_KEPT``: ``RunResult.fork_seconds``); its seconds."""
    took = time.perf_counter() - t0
    k.forks += 1
    parent.forks += 1
    if len(k.fork_seconds) < FORK_TIMES_KEPT:
        k.fork_seconds.append(took)
    return took


def sys_fork(k: Kernel, lwp: Lwp) -> int:
    return _fork(k, lwp)


def sys_vfork(k: Kernel, lwp: Lwp) -> int:
    """clone(CLONE_VM | CLONE_VFORK) on the caller's own stack, as Linux's vfork:
    the child runs in the parent's memory until it execs or exits (musl's
    vfork keeps its return address in a register for that reason)."""
    return _clone_vm(k, lwp, k.cpu.reg(RSP))


def sys_clone(k: Kernel, lwp: Lwp, flags: int, stack: int, ptid: int, ctid: int, tls: int) -> int:
    """The fork form (exit signal only), and musl's posix_spawn form
    (CLONE_VM | CLONE_VFORK | exit signal, a new stack); else ENOSYS."""
    share = flags & ~CSIGNAL
    if not share and not stack:
        return _fork(k, lwp)
    if share == CLONE_VM | CLONE_VFORK:
        if not stack:
            raise GuestError(errno.EINVAL, "CLONE_VM without a stack")
        return _clone_vm(k, lwp, stack)
    raise GuestError(errno.ENOSYS)


def _clone_vm(k: Kernel, lwp: Lwp, stack: int) -> int:
    """clone(CLONE_VM | CLONE_VFORK, stack): a child on ``stack`` until it execs or exits.

    The child is a new process of this VM that runs in its parent's memory,
    on the parent's registers with rax = 0 and rsp = ``stack`` (musl's
    __clone then pops the function and its argument from there); the parent
    is suspended until the child execs or exits, as Linux does.  In VM-clone
    mode its pid is leased from the instance, and its exec starts the new
    program in a VM of its own (VmCloneFork.exec_elsewhere).
    """
    t0 = time.perf_counter()
    forker = k.forker
    if forker is None:
        raise GuestError(errno.ENOSYS)
    if len(k.procs) >= k.config.max_procs:
        raise GuestError(errno.EAGAIN)
    parent = lwp.proc
    # VM clone: the pid is the instance's, the child's exec starts a VM of its own
    pid = None if forker.one_address_space else forker.reserve_pid(parent)  # type: ignore[attr-defined]
    child = k.new_process(parent, parent.fds.copy(), parent.name, pid=pid)
    child.vm_parent = parent.pid
    cpu = k.cpu
    ctx = cpu.new_context()  # the parent's registers, as the syscall left them
    cpu.write_context(ctx, _CLONE_REGS, [0, stack, cpu.reg(RIP) + SYSCALL_INSN_LEN])
    pt = lwp.thread
    # no stack or TLS of its own: the parent's memory (lwp.stack = 0, nothing to free)
    k.new_lwp(child, 0, pt.stack_base, pt.stack_size, ctx)
    _forked(k, parent, t0)
    parent.vfork_child = child.pid
    raise BlockAfter(child.pid, f"vfork: waiting for child {child.pid} to exec or exit")


# -- wait ----------------------------------------------------------------------------
def _matches(waiter: Process, child: Process, pid: int) -> bool:
    if pid == -1:
        return True
    if pid > 0:
        return child.pid == pid
    if pid == 0:
        return child.pgid == waiter.pgid
    return child.pgid == -pid


def _refresh_group(k: Kernel, child: Process) -> None:
    """A child in another VM (VM-clone) may have changed its group there: ask the
    supervisor, which keeps every process's group."""
    if child.remote and k.remote is not None:
        pgid = k.remote.call("getpgid", child.pid)
        if pgid > 0:
            child.pgid = pgid


def _find(k: Kernel, lwp: Lwp, pid: int, options: int, why: str) -> tuple[Process, int] | None:
    """A child matching ``pid`` with something to report and its wait status: a zombie
    (WEXITED, always for wait4), a stop (WUNTRACED) or a continue (WCONTINUED) not yet
    reported; None with WNOHANG; ECHILD if no such child."""
    proc = lwp.proc
    found = False
    for child in list(proc.children.values()):
        if pid == 0 or pid < -1:
            _refresh_group(k, child)
        if not _matches(proc, child, pid):
            continue
        found = True
        if child.state is ProcState.ZOMBIE and options & WEXITED:
            return child, child.status
        report = child.state_report if child.alive else 0
        if report == signals.CONTINUED_STATUS and options & WCONTINUED:
            return child, report
        if report and report != signals.CONTINUED_STATUS and options & WUNTRACED:
            return child, report
    if not found:
        raise GuestError(errno.ECHILD)
    if options & WNOHANG:
        return None
    raise Block(proc.child_wq, why)


def sys_wait4(k: Kernel, lwp: Lwp, pid: int, wstatus: int, options: int, rusage: int) -> int:
    pid, options = i32(pid), options & 0xFFFF_FFFF
    if options & ~(WNOHANG | WUNTRACED | WCONTINUED | __WALL | __WCLONE | __WNOTHREAD):
        raise GuestError(errno.EINVAL)
    if pid == -(1 << 31):
        raise GuestError(errno.ESRCH)
    found = _find(k, lwp, pid, options | WEXITED, f"wait4({pid})")
    if found is None:
        return 0
    child, status = found
    if child.state is ProcState.ZOMBIE:
        # as Linux's kernel_wait4: the child is reaped first, then its status copied
        # out, so a bad pointer gets EFAULT with the child gone all the same
        k.reap(lwp.proc, child)
    else:
        child.state_report = 0  # a stop or continue is reported once
    if wstatus:
        k.mem.write_u32(wstatus, status)
    if rusage:
        k.mem.write(rusage, bytes(RUSAGE_SIZE))
    return child.pid


def sys_waitid(
    k: Kernel, lwp: Lwp, idtype: int, id_: int, infop: int, options: int, rusage: int
) -> int:
    idtype, id_, options = i32(idtype), i32(id_), options & 0xFFFF_FFFF
    if not options & (WEXITED | WUNTRACED | WCONTINUED) or options & ~(
        WEXITED | WNOHANG | WNOWAIT | WUNTRACED | WCONTINUED | __WALL | __WCLONE | __WNOTHREAD
    ):
        raise GuestError(errno.EINVAL)
    if idtype == P_ALL:
        pid = -1
    elif idtype == P_PID:
        pid = id_
    elif idtype == P_PGID:
        pid = -id_ if id_ > 0 else 0
    else:
        raise GuestError(errno.EINVAL)
    found = _find(k, lwp, pid, options, f"waitid({idtype}, {id_})")
    child, st = found if found is not None else (None, 0)
    if infop:
        info = bytearray(128)
        if child is not None:
            if child.state is not ProcState.ZOMBIE:
                code, status = (
                    (CLD_CONTINUED, signals.SIGCONT)
                    if st == signals.CONTINUED_STATUS
                    else (CLD_STOPPED, (st >> 8) & 0xFF)
                )
            elif st & 0x7F == 0:
                code, status = CLD_EXITED, (st >> 8) & 0xFF
            else:
                code, status = CLD_KILLED, st & 0x7F
            # siginfo_t: si_signo, si_errno, si_code, pad, si_pid, si_uid, si_status
            struct.pack_into("<iiiiIIi", info, 0, signals.SIGCHLD, 0, code, 0, child.pid, 0, status)
        k.mem.write(infop, info)
    if rusage:
        k.mem.write(rusage, bytes(RUSAGE_SIZE))
    if child is not None and not options & WNOWAIT:
        if child.state is ProcState.ZOMBIE:
            k.reap(lwp.proc, child)
        else:
            child.state_report = 0
    return 0


# -- groups and sessions --------------------------------------------------------------
def _proc(k: Kernel, lwp: Lwp, pid: int) -> Process:
    pid = i32(pid)
    if pid == 0:
        return lwp.proc
    p = k.procs.get(pid)
    if p is None or p.state is ProcState.REAPED or p is k.init:
        raise GuestError(errno.ESRCH)
    return p


def _remote(k: Kernel, op: str, *args: int) -> int:
    assert k.remote is not None, "only a VM of a VM-clone instance asks its supervisor"
    value = k.remote.call(op, *args)
    if value < 0:
        raise GuestError(-value)
    return value


def _is_remote(k: Kernel, pid: int) -> bool:
    pid = i32(pid)
    return k.remote is not None and pid != 0 and pid not in k.procs


def sys_getpgid(k: Kernel, lwp: Lwp, pid: int) -> int:
    if _is_remote(k, pid):
        return _remote(k, "getpgid", i32(pid))
    return _proc(k, lwp, pid).pgid


def sys_getpgrp(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.pgid


def sys_getsid(k: Kernel, lwp: Lwp, pid: int) -> int:
    if _is_remote(k, pid):
        return _remote(k, "getsid", i32(pid))
    return _proc(k, lwp, pid).sid


def _members(k: Kernel) -> list[Process]:
    return [p for p in k.procs.values() if p.state is not ProcState.REAPED]


def sys_setpgid(k: Kernel, lwp: Lwp, pid: int, pgid: int) -> int:
    pid, pgid = i32(pid), i32(pgid)
    if k.remote is not None:  # the supervisor keeps (and checks) every VM's groups
        new = _remote(k, "setpgid", pid, pgid)
        # this VM's process, or its proxy of a child in another VM (waitpid(0) reads it)
        local = lwp.proc if pid in (0, lwp.proc.pid) else lwp.proc.children.get(pid)
        if local is not None:
            local.pgid = new
        return 0
    target = lwp.proc if pid == 0 else k.procs.get(pid)
    if target is not None and (target.state is ProcState.REAPED or target is k.init):
        target = None
    new = pgroups.setpgid(lwp.proc, target, pgid, _members(k))
    if new < 0:
        raise GuestError(-new)
    assert target is not None  # setpgid refuses a missing target (ESRCH)
    target.pgid = new
    return 0


def sys_setsid(k: Kernel, lwp: Lwp) -> int:
    p = lwp.proc
    if k.remote is not None:
        _remote(k, "setsid")
    else:
        err = pgroups.setsid(p, _members(k))
        if err:
            raise GuestError(-err)
    p.sid = p.pgid = p.pid
    return p.pid


# -- limits and usage ---------------------------------------------------------------
def _limit(k: Kernel, lwp: Lwp, resource: int) -> tuple[int, int]:
    if resource == RLIMIT_STACK:
        return k.config.stack_size, k.config.stack_size
    if resource == RLIMIT_NOFILE:
        return lwp.proc.fds.limit, lwp.proc.fds.limit
    if resource == RLIMIT_NPROC:
        return k.config.max_procs, k.config.max_procs
    if resource == RLIMIT_AS:
        return k.config.ram, k.config.ram
    if not 0 <= resource < 16:
        raise GuestError(errno.EINVAL)
    return RLIM_INFINITY, RLIM_INFINITY


def sys_prlimit64(k: Kernel, lwp: Lwp, pid: int, resource: int, new: int, old: int) -> int:
    target = _proc(k, lwp, pid)
    cur = target.core_limit if i32(resource) == RLIMIT_CORE else _limit(k, lwp, i32(resource))
    if new:
        soft, hard = k.mem.unpack(RLIMIT, new)
        if soft > hard:
            raise GuestError(errno.EINVAL)
        if i32(resource) == RLIMIT_CORE:
            target.core_limit = (soft, hard)  # the guest is root: it may raise the hard limit
        if i32(resource) == RLIMIT_NOFILE and hard <= cur[1]:
            target.fds.limit = max(3, soft)
        # other limits are fixed by the VM configuration; lowering is accepted
    if old:
        k.mem.pack(RLIMIT, old, *cur)
    return 0


def sys_getrlimit(k: Kernel, lwp: Lwp, resource: int, rlim: int) -> int:
    return sys_prlimit64(k, lwp, 0, resource, 0, rlim)


def sys_setrlimit(k: Kernel, lwp: Lwp, resource: int, rlim: int) -> int:
    return sys_prlimit64(k, lwp, 0, resource, rlim, 0)


def sys_getrusage(k: Kernel, lwp: Lwp, who: int, usage: int) -> int:
    if i32(who) not in (0, -1, 1):
        raise GuestError(errno.EINVAL)
    k.mem.write(usage, bytes(RUSAGE_SIZE))
    return 0

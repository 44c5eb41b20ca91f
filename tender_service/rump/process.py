"""Processes and LWPs of the rump layer.

A process owns a descriptor table, signal dispositions, children and its
memory accounting; an LWP is its thread of execution (one per process here:
``clone`` of threads is not supported) and wraps a bmk thread, as Rumprun's
``rumprun_lwp`` is the ``bt_cookie`` of a ``bmk_thread``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tender_service.bmk.sched import BmkThread, WaitQueue
from tender_service.machine.cpu import SignalCell
from tender_service.rump import signals
from tender_service.rump.fdtable import FdTable
from tender_service.rump.fs import ROOT_INO
from tender_service.rump.timers import PosixTimer


class ProcState(enum.Enum):
    ALIVE = "alive"
    ZOMBIE = "zombie"
    REAPED = "reaped"


@dataclass(eq=False, slots=True)
class Lwp:
    proc: Process
    thread: BmkThread
    tid: int
    stack: int = 0  # user pointer of the stack allocation (bmk heap, WIREDBMK)
    tls: int = 0  # user pointer of a TLS block the kernel made for this LWP (fork)
    clear_child_tid: int = 0
    #: the signal mask (``sigmask``), in a cell the syscall entry reads and writes
    #: in C while this LWP runs (machine/cpu.py ``use_signal_cells``)
    sigcell: SignalCell = field(default_factory=SignalCell)
    #: bytes a restarted syscall has already moved (large pipe writes)
    progress: int = 0
    #: a futex wait of this LWP was woken (the restarted wait returns 0)
    futex_woken: bool = False
    #: time.monotonic() deadline of a restarted timed wait, 0 if none
    deadline: float = 0.0
    #: a request to another process (VM-clone pipe op) and its reply, once it came
    remote_req: int = 0
    remote_result: tuple[int, bytes, int] | None = None
    #: the syscall number of a blocked, restartable syscall (-1: none); a signal
    #: handler interrupts it with EINTR or restarts it (SA_RESTART)
    restart_nr: int = -1
    #: the restarted syscall would have blocked again with a signal ready: the
    #: handler interrupts it now
    interrupted: bool = False
    #: the mask to restore when the handler of a sigsuspend/pselect returns
    saved_sigmask: int | None = None
    #: the signals a rt_sigtimedwait waits for (they wake it even while blocked)
    sigwait: int = 0
    #: sigaltstack: (ss_sp, ss_size), ss_size 0 if none
    altstack: tuple[int, int] = (0, 0)
    #: work the kernel does just before this LWP first runs (copy fork relocates
    #: the child's memory there, so that the parent's fork returns sooner)
    first_run: Callable[[], object] | None = None

    @property
    def sigmask(self) -> int:
        return self.sigcell.value

    @sigmask.setter
    def sigmask(self, mask: int) -> None:
        self.sigcell.value = mask


@dataclass(eq=False)
class Program:
    """A program image in guest memory (what ``/proc/PID/exe`` would name).

    Thread-fork children run their parent's image, so it is shared and counted:
    the last user's exit or exec frees it.  The first program lies in the boot
    "image" region (``in_pages`` False: the region stays, free for a non-PIE
    exec at its link address); an exec'd static-PIE lies in page-allocator
    pages, which thread fork's heap relocation never takes for user heap.
    """

    path: bytes
    base: int
    size: int
    in_pages: bool
    users: int = 0
    #: (offset from base, length) of the writable segments (data, GOT, bss): the
    #: only part of an image that holds pointers (copy fork relocates them there)
    writable: tuple[tuple[int, int], ...] = ()
    #: a static-PIE runs at any base (copy fork can copy it)
    pie: bool = False
    #: called instead of freeing the pages when the last user leaves (copy fork
    #: keeps a child's image copy for the next fork: its code is translated)
    recycle: Callable[[Program], None] | None = None


@dataclass
class Creds:
    """A process's ids as Linux keeps them (real, effective, saved; fsuid follows euid).

    The guest starts as root, a unikernel's one user; a server that drops privileges
    (setgroups, setgid, setuid) gets Linux's answers and cannot take them back."""

    ruid: int = 0
    euid: int = 0
    suid: int = 0
    rgid: int = 0
    egid: int = 0
    sgid: int = 0
    groups: tuple[int, ...] = ()

    def copy(self) -> Creds:
        return Creds(self.ruid, self.euid, self.suid, self.rgid, self.egid, self.sgid, self.groups)

    def to_state(self) -> dict[str, object]:
        return {
            "ruid": self.ruid,
            "euid": self.euid,
            "suid": self.suid,
            "rgid": self.rgid,
            "egid": self.egid,
            "sgid": self.sgid,
            "groups": list(self.groups),
        }

    @classmethod
    def from_state(cls, state: dict) -> Creds:
        c = cls()
        for key in ("ruid", "euid", "suid", "rgid", "egid", "sgid"):
            setattr(c, key, int(state.get(key, 0)) & 0xFFFFFFFF)
        c.groups = tuple(int(g) & 0xFFFFFFFF for g in state.get("groups", ()))
        return c


@dataclass(eq=False, slots=True)
class Process:
    pid: int
    ppid: int
    pgid: int
    sid: int
    fds: FdTable
    parent: Process | None = None
    name: str = ""
    children: dict[int, Process] = field(default_factory=dict)
    lwps: list[Lwp] = field(default_factory=list)
    state: ProcState = ProcState.ALIVE
    status: int = 0  # wait status once a zombie
    sigactions: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    #: the pending set (``pending``; bit n-1: signal n), kept with ``sigqueue``, in a
    #: cell the syscall entry reads in C while a thread of this process runs
    pendcell: SignalCell = field(default_factory=SignalCell)
    #: pending instances, oldest first: one per standard signal, every real-time one
    sigqueue: list[signals.SigInfo] = field(default_factory=list)
    #: where sigsuspend, pause and rt_sigtimedwait wait for a signal
    signal_wq: WaitQueue = field(init=False)
    #: stopped by SIGSTOP & co until SIGCONT; its threads wait on ``stop_wq``
    stopped: bool = False
    stop_wq: WaitQueue = field(init=False)
    #: a stop or continue the parent has not collected with WUNTRACED/WCONTINUED
    state_report: int = 0
    #: ITIMER_REAL: (deadline, interval) in time.monotonic seconds, and its timer
    itimer: tuple[float, float] = (0.0, 0.0)
    itimer_token: int = 0
    #: POSIX timers (timer_create) by id; not inherited by fork, deleted by exec
    timers: dict[int, PosixTimer] = field(default_factory=dict)
    child_wq: WaitQueue = field(init=False)
    vfork_child: int = 0  # pid of the vfork child the parent waits for
    brk: int = 0
    mmaps: dict[int, int] = field(default_factory=dict)  # addr -> length
    forks: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    report: str = ""  # why it died, if not by exit
    #: a child that runs in another VM (VM-clone fork): a proxy with no LWPs
    remote: bool = False
    #: the program the process runs (None: init, remote proxies)
    program: Program | None = None
    #: clone(CLONE_VM) child: the pid whose memory it runs in until it execs or exits
    vm_parent: int = 0
    #: the working directory: an inode number of the instance's file system
    cwd: int = ROOT_INO
    umask: int = 0o022
    #: user and group ids (rump/syscalls/sys_creds.py): root until the program drops them
    creds: Creds = field(default_factory=Creds)
    #: the program's path (/proc/PID/exe); execve sets it
    exe: bytes = b""
    #: RLIMIT_CORE (soft, hard): Linux's boot default, no core; decides WCOREDUMP
    core_limit: tuple[int, int] = (0, 2**64 - 1)

    def __post_init__(self) -> None:
        self.fds.owner = self.pid
        # names for a debugger only (nothing prints them): no string made per fork
        self.child_wq = WaitQueue("wait")
        self.signal_wq = WaitQueue("signal")
        self.stop_wq = WaitQueue("stopped")

    @property
    def pending(self) -> int:
        return self.pendcell.value

    @pending.setter
    def pending(self, signals_: int) -> None:
        self.pendcell.value = signals_

    @property
    def alive(self) -> bool:
        return self.state is ProcState.ALIVE

    def disposition(self, sig: int) -> int:
        """SIG_DFL (0), SIG_IGN (1) or a guest handler address."""
        act = self.sigactions.get(sig)
        return signals.SIG_DFL if act is None else act[0]

    def flags(self, sig: int) -> int:
        act = self.sigactions.get(sig)
        return 0 if act is None else act[1]

    def ignores(self, sig: int) -> bool:
        """Whether ``sig`` would be thrown away on delivery (SIG_IGN or ignored by default)."""
        disp = self.disposition(sig)
        return disp == signals.SIG_IGN or (
            disp == signals.SIG_DFL and signals.default_action(sig) is signals.Action.IGNORE
        )

    def describe(self) -> str:
        st = self.state.value
        if self.state is not ProcState.ALIVE:
            st += f" ({signals.describe_status(self.status)})"
        return f"pid {self.pid} ppid {self.ppid} {self.name} {st}"

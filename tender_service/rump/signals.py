"""Linux signal numbers, default actions, siginfo, wait-status encoding.

Plain data and pure functions: what a signal is and does by default.  The
kernel's side of delivery (pending sets, the frame a handler runs on,
rt_sigreturn) is ``rump/sigframe.py`` and ``ProcessTable.post_signal``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE = 1, 2, 3, 4, 5, 6, 7, 8
SIGKILL, SIGUSR1, SIGSEGV, SIGUSR2, SIGPIPE, SIGALRM, SIGTERM = 9, 10, 11, 12, 13, 14, 15
SIGSTKFLT, SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU = 16, 17, 18, 19, 20, 21, 22
SIGURG, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGWINCH, SIGIO, SIGPWR, SIGSYS = (
    23,
    24,
    25,
    26,
    27,
    28,
    29,
    30,
    31,
)
NSIG = 65  # 1..64

SIG_DFL = 0
SIG_IGN = 1
SIGRTMIN = 32  # the kernel's; musl reserves 32..34 and reports SIGRTMIN() as 35

# sa_flags (Linux x86-64)
SA_NOCLDSTOP, SA_NOCLDWAIT, SA_SIGINFO = 1, 2, 4
SA_ONSTACK, SA_RESTART, SA_NODEFER, SA_RESETHAND = 0x08000000, 0x10000000, 0x40000000, 0x80000000
SA_RESTORER = 0x04000000

# si_code values
SI_USER, SI_KERNEL, SI_QUEUE, SI_TIMER, SI_TKILL = 0, 0x80, -1, -2, -6
CLD_EXITED, CLD_KILLED, CLD_DUMPED, CLD_STOPPED, CLD_CONTINUED = 1, 2, 3, 5, 6
SEGV_MAPERR, BUS_ADRERR, ILL_ILLOPN, FPE_INTDIV, TRAP_BRKPT = 1, 2, 2, 1, 1

NAMES = {
    SIGHUP: "SIGHUP",
    SIGINT: "SIGINT",
    SIGQUIT: "SIGQUIT",
    SIGILL: "SIGILL",
    SIGTRAP: "SIGTRAP",
    SIGABRT: "SIGABRT",
    SIGBUS: "SIGBUS",
    SIGFPE: "SIGFPE",
    SIGKILL: "SIGKILL",
    SIGUSR1: "SIGUSR1",
    SIGSEGV: "SIGSEGV",
    SIGUSR2: "SIGUSR2",
    SIGPIPE: "SIGPIPE",
    SIGALRM: "SIGALRM",
    SIGTERM: "SIGTERM",
    SIGSTKFLT: "SIGSTKFLT",
    SIGCHLD: "SIGCHLD",
    SIGCONT: "SIGCONT",
    SIGSTOP: "SIGSTOP",
    SIGTSTP: "SIGTSTP",
    SIGTTIN: "SIGTTIN",
    SIGTTOU: "SIGTTOU",
    SIGURG: "SIGURG",
    SIGXCPU: "SIGXCPU",
    SIGXFSZ: "SIGXFSZ",
    SIGVTALRM: "SIGVTALRM",
    SIGPROF: "SIGPROF",
    SIGWINCH: "SIGWINCH",
    SIGIO: "SIGIO",
    SIGPWR: "SIGPWR",
    SIGSYS: "SIGSYS",
}


class Action(enum.Enum):
    TERMINATE = "terminate"
    IGNORE = "ignore"
    STOP = "stop"
    CONTINUE = "continue"


_IGNORED_BY_DEFAULT = {SIGCHLD, SIGURG, SIGWINCH}
_STOP = {SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU}


def default_action(sig: int) -> Action:
    if sig in _IGNORED_BY_DEFAULT:
        return Action.IGNORE
    if sig in _STOP:
        return Action.STOP
    if sig == SIGCONT:
        return Action.CONTINUE
    return Action.TERMINATE


def catches_any(proc) -> bool:
    """Whether ``proc`` (a ``rump.process.Process``) has a guest handler installed."""
    return any(act[0] not in (SIG_DFL, SIG_IGN) for act in proc.sigactions.values())


def kills_at_once(proc, sig: int) -> bool:
    """Whether ``sig`` ends ``proc`` for sure, whatever it runs: SIGKILL, or a
    terminating default action while it catches nothing (so stopping its CPU from
    another thread, which may replay an instruction, cannot be observed)."""
    if sig == SIGKILL:
        return True
    return (
        default_action(sig) is Action.TERMINATE
        and proc.disposition(sig) == SIG_DFL
        and not catches_any(proc)
        and not any(lwp.sigmask & bit(sig) for lwp in proc.lwps)
    )


def bit(sig: int) -> int:
    """The bit of ``sig`` in a Linux sigset (signal n is bit n-1)."""
    return 1 << (sig - 1)


#: signals that cannot be caught, blocked or ignored
UNBLOCKABLE = bit(SIGKILL) | bit(SIGSTOP)
#: signals the CPU raises for the instruction that runs (delivered first, as Linux)
SYNCHRONOUS = bit(SIGSEGV) | bit(SIGBUS) | bit(SIGILL) | bit(SIGTRAP) | bit(SIGFPE) | bit(SIGSYS)
#: signals whose default action is "core" (Linux's SIG_KERNEL_COREDUMP_MASK)
COREDUMP = (
    bit(SIGQUIT)
    | bit(SIGILL)
    | bit(SIGTRAP)
    | bit(SIGABRT)
    | bit(SIGBUS)
    | bit(SIGFPE)
    | bit(SIGSEGV)
    | bit(SIGXCPU)
    | bit(SIGXFSZ)
    | bit(SIGSYS)
)
#: Linux's ELF core writer refuses a limit below a page (binfmt min_coredump)
CORE_MIN = 4096
STOP_SIGNALS = bit(SIGSTOP) | bit(SIGTSTP) | bit(SIGTTIN) | bit(SIGTTOU)
ALL = (1 << (NSIG - 1)) - 1


def is_realtime(sig: int) -> bool:
    """Real-time signals queue every instance; standard ones coalesce."""
    return sig >= SIGRTMIN


_SIGINFO = struct.Struct("<iiii")


@dataclass(slots=True)
class SigInfo:
    """One pending signal instance: what the handler's ``siginfo_t`` says."""

    signo: int
    code: int = SI_USER
    pid: int = 0
    uid: int = 0
    value: int = 0  # si_value (sigqueue), si_status (SIGCHLD)
    addr: int | None = None  # si_addr of a fault
    #: the POSIX timer (``rump.timers.PosixTimer``) that sent it: si_overrun at delivery
    timer: Any = None

    def pack(self) -> bytes:
        """The 128-byte ``siginfo_t`` of Linux x86-64."""
        out = bytearray(128)
        _SIGINFO.pack_into(out, 0, self.signo, 0, self.code, 0)
        if self.addr is not None:
            struct.pack_into("<Q", out, 16, self.addr)
        else:  # si_pid, si_uid, si_value; a timer's: si_timerid, si_overrun, si_value
            struct.pack_into("<iIQ", out, 16, self.pid, self.uid, self.value & (2**64 - 1))
        return bytes(out)


def reset_on_exec(proc) -> None:
    """What ``execve`` does to signals (POSIX, Linux's flush_signal_handlers): caught
    signals go back to SIG_DFL (the handlers' code is gone), SIG_IGN stays ignored,
    sa_flags and sa_mask are cleared; the mask, the pending set and a pending
    alarm are kept.  ``proc`` is a ``rump.process.Process``; its LWPs lose their
    alternate signal stack."""
    proc.sigactions = {
        sig: (SIG_IGN, 0, 0, 0) for sig, act in proc.sigactions.items() if act[0] == SIG_IGN
    }
    for lwp in proc.lwps:
        lwp.altstack = (0, 0)
        lwp.saved_sigmask = None


def signame(sig: int) -> str:
    if sig in NAMES:
        return NAMES[sig]
    if 34 <= sig <= 64:
        return f"SIGRT{sig - 34}"
    return f"signal {sig}"


# -- wait status words (as Linux's <bits/waitstatus.h>) --------------------------
def exited_status(code: int) -> int:
    return (code & 0xFF) << 8


def signaled_status(sig: int) -> int:
    return sig & 0x7F


def stopped_status(sig: int) -> int:
    """WIFSTOPPED, WSTOPSIG = sig."""
    return 0x7F | (sig & 0xFF) << 8


def death_status(proc, sig: int) -> int:
    """The wait status of ``proc`` (a ``rump.process.Process``) killed by ``sig``.

    The core bit (0x80, WCOREDUMP) is set as Linux sets it when a core is dumped:
    a "core" signal and a soft RLIMIT_CORE of at least a page.  No core file is
    written (as with a pipe core_pattern); with the default limit of 0, Linux's
    boot default, nothing is dumped and the bit is clear."""
    status = signaled_status(sig)
    if bit(sig) & COREDUMP and proc.core_limit[0] >= CORE_MIN:
        status |= 0x80
    return status


CONTINUED_STATUS = 0xFFFF  # WIFCONTINUED


def describe_status(status: int) -> str:
    if status & 0x7F == 0:
        return f"exited with status {(status >> 8) & 0xFF}"
    core = " (core dumped)" if status & 0x80 else ""
    return f"killed by {signame(status & 0x7F)}{core}"


def shell_code(status: int) -> int:
    """What a shell reports: the exit code, or 128+signal."""
    if status & 0x7F == 0:
        return (status >> 8) & 0xFF
    return 128 + (status & 0x7F)

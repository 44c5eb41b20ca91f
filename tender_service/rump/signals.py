"""Linux signal numbers, default actions and wait-status encoding.

Signal handlers that run guest code are not delivered yet (see
docs/semantics.md): ``rt_sigaction`` records SIG_DFL / SIG_IGN / a handler;
SIG_DFL and SIG_IGN are obeyed; a signal whose disposition is a guest handler
stays pending and is not delivered (logged once), except SIGKILL and
SIGSTOP, which cannot be caught.
"""

from __future__ import annotations

import enum

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
    STOP = "stop"  # job control: not supported, treated as ignore
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


def describe_status(status: int) -> str:
    if status & 0x7F == 0:
        return f"exited with status {(status >> 8) & 0xFF}"
    return f"killed by {signame(status & 0x7F)}"


def shell_code(status: int) -> int:
    """What a shell reports: the exit code, or 128+signal."""
    if status & 0x7F == 0:
        return (status >> 8) & 0xFF
    return 128 + (status & 0x7F)

"""Process groups, sessions and the controlling terminal: Linux's rules, once.

``setpgid``, ``setsid``, and the console's job control (tcgetpgrp, tcsetpgrp,
TIOCSCTTY, SIGTTIN/SIGTTOU for a background group).

Thread fork keeps every process of an instance in one VM's process table; VM-clone
keeps them in the instance supervisor's records, one VM per process.  Both decide
with these functions, so a call gets the same errno in every fork mode (the rules
of Linux's ``kernel/sys.c``).  A record is anything with ``pid``, ``ppid``,
``pgid`` and ``sid``; "members" are the processes not yet reaped (zombies keep
their group until they are reaped, as on Linux).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

SIGTTIN, SIGTTOU = 21, 22  # as rump/signals.py (this module stays free of the kernel)


class Member(Protocol):
    pid: int
    ppid: int
    pgid: int
    sid: int


def setpgid(caller: Member, target: Member | None, pgid: int, members: Iterable[Member]) -> int:
    """The group ``target`` joins, or -errno.

    ``pgid`` is as the guest passed it (0: the target's own pid); ``target`` is the
    process the guest named (itself for pid 0), None if there is no such process.
    """
    if pgid < 0:
        return -errno.EINVAL
    if target is None:
        return -errno.ESRCH
    if target.pid != caller.pid:
        if target.ppid != caller.pid:  # only itself or a child of its own
            return -errno.ESRCH
        if target.sid != caller.sid:
            return -errno.EPERM
    if target.sid == target.pid:  # a session leader stays in its group
        return -errno.EPERM
    pgid = pgid or target.pid
    if pgid != target.pid and not any(m.pgid == pgid and m.sid == caller.sid for m in members):
        return -errno.EPERM  # no such group in the caller's session
    return pgid


def setsid(caller: Member, members: Iterable[Member]) -> int:
    """0 if ``caller`` may start a session, or -EPERM: it leads a session already, or a
    process group with its pid exists (its own counts: a group leader cannot)."""
    if caller.sid == caller.pid or any(m.pgid == caller.pid for m in members):
        return -errno.EPERM
    return 0


# -- the console as a controlling terminal (job control) ---------------------------------
@dataclass
class Terminal:
    """The console when it is a terminal: the session it controls (0: none) and that
    session's foreground process group.  An instance starts with its init's session
    (the program's, as a shell's child's) and init's group in the foreground."""

    sid: int = 0
    pgrp: int = 0


def _alive(m: Member) -> bool:
    return bool(getattr(m, "alive", True))


def is_orphaned(pgid: int, members: Iterable[Member]) -> bool:
    """POSIX's orphaned process group: no live member has a parent in another group of
    the same session (init, pid 1, never counts), so no job-control shell can
    continue it; stop signals from the terminal are refused to it."""
    ms = list(members)
    by_pid = {m.pid: m for m in ms}
    for m in ms:
        if m.pgid != pgid or not _alive(m) or m.ppid <= 1:
            continue
        parent = by_pid.get(m.ppid)
        if parent is not None and parent.pgid != pgid and parent.sid == m.sid:
            return False
    return True


def check_access(
    caller: Member, term: Terminal, sig: int, ignored: bool, members: Iterable[Member]
) -> int:
    """Linux's tty_check_change: may ``caller`` read (``sig`` SIGTTIN) or change
    (SIGTTOU) its controlling terminal?  0: yes (not its terminal, in the foreground,
    or SIGTTOU ``ignored``: blocked or SIG_IGN); -EIO: refused (SIGTTIN ignored, or
    an orphaned group); ``sig``: the caller's group must get ``sig`` and the call
    restarts once it is continued (ERESTARTSYS)."""
    if not term.sid or caller.sid != term.sid or not term.pgrp or caller.pgid == term.pgrp:
        return 0
    if ignored:
        return -errno.EIO if sig == SIGTTIN else 0
    if is_orphaned(caller.pgid, members):
        return -errno.EIO
    return sig


def tcgetpgrp(caller: Member, term: Terminal) -> int:
    """TIOCGPGRP: the foreground group, or -ENOTTY if this is not the caller's terminal."""
    if not term.sid or caller.sid != term.sid:
        return -errno.ENOTTY
    return term.pgrp


def tcsetpgrp(
    caller: Member, term: Terminal, pgid: int, ignored: bool, members: Iterable[Member]
) -> int:
    """TIOCSPGRP: 0 with ``term.pgrp`` set, -errno, or SIGTTOU for a background caller
    (see :func:`check_access`; its -EIO is ENOTTY here, as Linux's tiocspgrp)."""
    ms = list(members)
    check = check_access(caller, term, SIGTTOU, ignored, ms)
    if check:
        return -errno.ENOTTY if check == -errno.EIO else check
    if pgid < 0:
        return -errno.EINVAL
    if not term.sid or caller.sid != term.sid:
        return -errno.ENOTTY
    group = [m for m in ms if m.pgid == pgid]
    if not group:
        return -errno.ESRCH
    if group[0].sid != caller.sid:
        return -errno.EPERM
    term.pgrp = pgid
    return 0


def tiocsctty(caller: Member, term: Terminal) -> int:
    """TIOCSCTTY (without stealing): a session leader without a terminal takes this one
    if no session has it; the leader of the session that has it gets 0."""
    leader = caller.sid == caller.pid
    if leader and term.sid == caller.sid:
        return 0
    if not leader or term.sid:
        return -errno.EPERM
    term.sid, term.pgrp = caller.sid, caller.pgid
    return 0

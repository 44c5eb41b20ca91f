"""Process groups and sessions: Linux's rules for ``setpgid`` and ``setsid``, once.

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
from typing import Protocol


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

"""The console as a controlling terminal, the VM's side of job control.

The rules are ``rump/pgroups.py``'s, applied to the instance's one terminal: the
kernel's own ``Kernel.terminal`` when the instance is this VM (thread fork), the
supervisor's through the VM link in VM-clone mode (the groups span VMs there).
A background group that touches the terminal gets SIGTTOU or SIGTTIN here, and
the call runs again once the group is continued (Linux's ERESTARTSYS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump import pgroups, signals
from tender_service.rump.outcomes import Restart

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process


def _members(k: Kernel) -> list[Process]:
    """This VM's processes not yet reaped (remote proxies are the supervisor's to count)."""
    return [p for p in k.procs.values() if p.state.value != "reaped" and not p.remote]


def _ignored(lwp: Lwp, sig: int) -> bool:
    """Linux's is_ignored: blocked by the caller, or SIG_IGN."""
    return bool(lwp.sigmask & signals.bit(sig)) or lwp.proc.disposition(sig) == signals.SIG_IGN


def _outcome(k: Kernel, lwp: Lwp, r: int) -> int:
    """0, -errno (raised), or a signal for the caller's group: sent to its members in
    this VM (the supervisor sends it to those in other VMs), and the call restarts."""
    if r < 0:
        raise GuestError(-r)
    if r > 0:
        pgid = lwp.proc.pgid
        for p in _members(k):
            if p.pgid == pgid and p is not k.init:
                k.post_signal(p, r, signals.SigInfo(r, signals.SI_KERNEL))
        raise Restart(f"job control: {signals.signame(r)}")
    return 0


def check(k: Kernel, lwp: Lwp, sig: int) -> int:
    """Before a read (SIGTTIN) or a change of the terminal's settings (SIGTTOU)."""
    ignored = _ignored(lwp, sig)
    if k.remote is not None:
        r = k.remote.call("tty_check", sig, int(ignored))
    else:
        r = pgroups.check_access(lwp.proc, k.terminal, sig, ignored, _members(k))
    return _outcome(k, lwp, r)


def tcgetpgrp(k: Kernel, lwp: Lwp) -> int:
    if k.remote is not None:
        r = k.remote.call("tty_getpgrp")
    else:
        r = pgroups.tcgetpgrp(lwp.proc, k.terminal)
    if r < 0:
        raise GuestError(-r)
    return r


def tcsetpgrp(k: Kernel, lwp: Lwp, pgid: int) -> int:
    ignored = _ignored(lwp, signals.SIGTTOU)
    if k.remote is not None:
        r = k.remote.call("tty_setpgrp", pgid, int(ignored))
    else:
        r = pgroups.tcsetpgrp(lwp.proc, k.terminal, pgid, ignored, _members(k))
    return _outcome(k, lwp, r)


def tiocsctty(k: Kernel, lwp: Lwp) -> int:
    if k.remote is not None:
        r = k.remote.call("tty_sctty")
    else:
        r = pgroups.tiocsctty(lwp.proc, k.terminal)
    if r < 0:
        raise GuestError(-r)
    return 0

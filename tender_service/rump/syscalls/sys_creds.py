"""Credentials: the user and group ids of a process, with Linux's rules.

A guest starts as root (uid and gid 0, no supplementary groups), the one
user of a unikernel.  Root may set any id; a process that dropped root may
only move among its real, effective and saved ids, as Linux's
kernel/sys.c (``__sys_setuid``, ``__sys_setreuid``, ``__sys_setresuid`` and
their gid twins) allows: root's power here is the effective uid 0 (Linux's
CAP_SETUID/CAP_SETGID, which a root process has and loses with its euid).
Ids are inherited at fork (every mode: the VM-clone snapshot carries them)
and kept across exec.  Nothing else checks them: files have no owners to
enforce (docs/semantics.md).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.syscalls.abi import i32

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Creds, Lwp

NGROUPS_MAX = 65536
KEEP = 0xFFFFFFFF  # (uid_t)-1: "leave this id as it is"


def _id(value: int) -> int:
    return value & 0xFFFFFFFF


def _privileged(c: Creds) -> bool:
    return c.euid == 0


def sys_getuid(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.creds.ruid


def sys_geteuid(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.creds.euid


def sys_getgid(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.creds.rgid


def sys_getegid(k: Kernel, lwp: Lwp) -> int:
    return lwp.proc.creds.egid


def sys_getgroups(k: Kernel, lwp: Lwp, size: int, list_: int) -> int:
    groups = lwp.proc.creds.groups
    n = i32(size)
    if n < 0:
        raise GuestError(errno.EINVAL)
    if n == 0:
        return len(groups)
    if n < len(groups):
        raise GuestError(errno.EINVAL)
    if groups:
        k.mem.write(list_, struct.pack(f"<{len(groups)}I", *groups))
    return len(groups)


def sys_setgroups(k: Kernel, lwp: Lwp, size: int, list_: int) -> int:
    c = lwp.proc.creds
    if not _privileged(c):
        raise GuestError(errno.EPERM)
    n = i32(size)
    if n < 0 or n > NGROUPS_MAX:
        raise GuestError(errno.EINVAL)
    raw = k.mem.read(list_, 4 * n) if n else b""
    c.groups = tuple(sorted(struct.unpack(f"<{n}I", raw)))  # sorted, as Linux keeps them
    return 0


def _setid(c: Creds, value: int, kind: str) -> None:
    """setuid/setgid: root sets all three, others only the effective id to real or saved."""
    v = _id(value)
    if v == KEEP:
        raise GuestError(errno.EINVAL)
    r, s = getattr(c, f"r{kind}"), getattr(c, f"s{kind}")
    if _privileged(c):
        setattr(c, f"r{kind}", v)
        setattr(c, f"e{kind}", v)
        setattr(c, f"s{kind}", v)
    elif v in (r, s):
        setattr(c, f"e{kind}", v)
    else:
        raise GuestError(errno.EPERM)


def sys_setuid(k: Kernel, lwp: Lwp, uid: int) -> int:
    _setid(lwp.proc.creds, uid, "uid")
    return 0


def sys_setgid(k: Kernel, lwp: Lwp, gid: int) -> int:
    _setid(lwp.proc.creds, gid, "gid")
    return 0


def _setre(c: Creds, real: int, eff: int, kind: str) -> None:
    r0, e0, s0 = (getattr(c, f"{p}{kind}") for p in "res")
    r, e = _id(real), _id(eff)
    priv = _privileged(c)
    if r != KEEP and not priv and r not in (r0, e0):
        raise GuestError(errno.EPERM)
    if e != KEEP and not priv and e not in (r0, e0, s0):
        raise GuestError(errno.EPERM)
    new_r = r0 if r == KEEP else r
    new_e = e0 if e == KEEP else e
    new_s = s0
    if r != KEEP or (e != KEEP and e != r0):
        new_s = new_e
    setattr(c, f"r{kind}", new_r)
    setattr(c, f"e{kind}", new_e)
    setattr(c, f"s{kind}", new_s)


def sys_setreuid(k: Kernel, lwp: Lwp, ruid: int, euid: int) -> int:
    _setre(lwp.proc.creds, ruid, euid, "uid")
    return 0


def sys_setregid(k: Kernel, lwp: Lwp, rgid: int, egid: int) -> int:
    _setre(lwp.proc.creds, rgid, egid, "gid")
    return 0


def _setres(c: Creds, ids: tuple[int, int, int], kind: str) -> None:
    old = [getattr(c, f"{p}{kind}") for p in "res"]
    new = [_id(v) for v in ids]
    if not _privileged(c):
        for v in new:
            if v != KEEP and v not in old:
                raise GuestError(errno.EPERM)
    for p, v, o in zip("res", new, old, strict=True):
        setattr(c, f"{p}{kind}", o if v == KEEP else v)


def sys_setresuid(k: Kernel, lwp: Lwp, ruid: int, euid: int, suid: int) -> int:
    _setres(lwp.proc.creds, (ruid, euid, suid), "uid")
    return 0


def sys_setresgid(k: Kernel, lwp: Lwp, rgid: int, egid: int, sgid: int) -> int:
    _setres(lwp.proc.creds, (rgid, egid, sgid), "gid")
    return 0


def _getres(k: Kernel, c: Creds, ptrs: tuple[int, int, int], kind: str) -> int:
    for addr in ptrs:
        k.mem.offset(addr, 4)  # EFAULT before anything is written
    for p, addr in zip("res", ptrs, strict=True):
        k.mem.write_u32(addr, getattr(c, f"{p}{kind}"))
    return 0


def sys_getresuid(k: Kernel, lwp: Lwp, rp: int, ep: int, sp: int) -> int:
    return _getres(k, lwp.proc.creds, (rp, ep, sp), "uid")


def sys_getresgid(k: Kernel, lwp: Lwp, rp: int, ep: int, sp: int) -> int:
    return _getres(k, lwp.proc.creds, (rp, ep, sp), "gid")


def sys_setfsuid(k: Kernel, lwp: Lwp, uid: int) -> int:
    """The file-system uid follows the effective uid here: the old value, unchanged."""
    return lwp.proc.creds.euid


def sys_setfsgid(k: Kernel, lwp: Lwp, gid: int) -> int:
    return lwp.proc.creds.egid

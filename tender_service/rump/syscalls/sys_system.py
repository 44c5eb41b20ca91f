"""System information and the CPU's thread pointer (arch_prctl)."""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from tender_service.machine.cpu import FS_BASE
from tender_service.machine.errors import GuestError

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
GRND_NONBLOCK, GRND_RANDOM, GRND_INSECURE = 1, 2, 4
#: what uname reports: the ABI is Linux's, the machine is ours
UTSNAME = (b"Linux", b"unifork", b"6.1.0-unifork", b"#1 unifork VM", b"x86_64", b"(none)")


def sys_uname(k: Kernel, lwp: Lwp, buf: int) -> int:
    k.mem.write(buf, b"".join(f.ljust(65, b"\0") for f in UTSNAME))
    return 0


def sys_arch_prctl(k: Kernel, lwp: Lwp, code: int, addr: int) -> int:
    if code == ARCH_SET_FS:
        k.cpu.set_reg(FS_BASE, addr)
        return 0
    if code == ARCH_GET_FS:
        k.mem.write_u64(addr, k.cpu.reg(FS_BASE))
        return 0
    if code in (ARCH_SET_GS, ARCH_GET_GS):
        raise GuestError(errno.EPERM)
    raise GuestError(errno.EINVAL)


def sys_getrandom(k: Kernel, lwp: Lwp, buf: int, count: int, flags: int) -> int:
    if flags & ~(GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE):
        raise GuestError(errno.EINVAL)
    n = min(count, 1 << 25)
    k.mem.write(buf, os.urandom(n))
    return n


def sys_sysinfo(k: Kernel, lwp: Lwp, info: int) -> int:
    free = k.pages.free_bytes
    procs = sum(1 for p in k.procs.values() if p.alive)
    # uptime, loads[3], totalram, freeram, sharedram, bufferram, totalswap, freeswap,
    # procs, pad, totalhigh, freehigh, mem_unit
    data = struct.pack("<q3Q6QHHQQI", 0, 0, 0, 0, k.config.ram, free, 0, 0, 0, 0, procs, 0, 0, 0, 1)
    k.mem.write(info, data.ljust(112, b"\0"))
    return 0

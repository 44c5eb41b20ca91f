"""Scheduling: yield and affinity (the VM has one CPU)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.outcomes import SWITCH

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp


def sys_sched_yield(k: Kernel, lwp: Lwp) -> int | object:
    # switching costs a CPU stop/start: only do it if someone else can run
    return SWITCH if k.sched.runq else 0


def sys_sched_getaffinity(k: Kernel, lwp: Lwp, pid: int, size: int, mask: int) -> int:
    if size < 8 or size & 7:
        raise GuestError(errno.EINVAL)
    k.mem.write(mask, b"\x01" + bytes(7))
    return 8


def sys_sched_setaffinity(k: Kernel, lwp: Lwp, pid: int, size: int, mask: int) -> int:
    if size < 1 or not k.mem.read(mask, 1)[0] & 1:
        raise GuestError(errno.EINVAL)
    return 0


def sys_getcpu(k: Kernel, lwp: Lwp, cpu: int, node: int) -> int:
    if cpu:
        k.mem.write_u32(cpu, 0)
    if node:
        k.mem.write_u32(node, 0)
    return 0

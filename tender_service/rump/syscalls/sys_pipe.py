"""pipe and pipe2."""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.fdtable import drop
from tender_service.rump.files import O_CLOEXEC, O_NONBLOCK
from tender_service.rump.pipe import make_pipe
from tender_service.rump.syscalls.abi import i32

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

O_DIRECT = 0o40000


def sys_pipe2(k: Kernel, lwp: Lwp, fds_addr: int, flags: int) -> int:
    flags = i32(flags)
    if flags & ~(O_CLOEXEC | O_NONBLOCK | O_DIRECT):
        raise GuestError(errno.EINVAL)
    k.mem.offset(fds_addr, 8)
    r, w = make_pipe(flags & O_NONBLOCK)
    fds = lwp.proc.fds
    cloexec = bool(flags & O_CLOEXEC)
    rfd = fds.install(r, cloexec)
    try:
        wfd = fds.install(w, cloexec)
    except GuestError:
        fds.entries.pop(rfd)
        drop(k, r)
        w.refs = 1
        drop(k, w)
        raise
    k.mem.write(fds_addr, struct.pack("<ii", rfd, wfd))
    return 0


def sys_pipe(k: Kernel, lwp: Lwp, fds_addr: int) -> int:
    return sys_pipe2(k, lwp, fds_addr, 0)

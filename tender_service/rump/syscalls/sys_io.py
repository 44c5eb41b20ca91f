"""File descriptor I/O: read/write and friends, dup, fcntl, ioctl, open, stat.

There is no file system yet: ``open`` knows /dev/null, /dev/zero and
/dev/urandom, everything else is ENOENT.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.files import (
    FIONBIO,
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_DIRECTORY,
    O_EXCL,
    O_NONBLOCK,
    S_IFCHR,
    S_IFIFO,
    ConsoleFile,
    NullFile,
    ZeroFile,
)
from tender_service.rump.syscalls.abi import i32, read_iovecs

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

AT_FDCWD = -100
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
FD_CLOEXEC = 1
STAT = struct.Struct("<QQQIIIIQqqqqqqqqq24x")  # struct stat, x86-64 (144 bytes)
F_OK = 0

DEVICES = {
    b"/dev/null": "null",
    b"/dev/zero": "zero",
    b"/dev/urandom": "urandom",
    b"/dev/random": "urandom",
}


def sys_read(k: Kernel, lwp: Lwp, fd: int, buf: int, count: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not f.readable:
        raise GuestError(errno.EBADF)
    return f.read(k, lwp, buf, min(count, 0x7FFFF000))


def sys_write(k: Kernel, lwp: Lwp, fd: int, buf: int, count: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not f.writable:
        raise GuestError(errno.EBADF)
    return f.write(k, lwp, buf, min(count, 0x7FFFF000))


def sys_readv(k: Kernel, lwp: Lwp, fd: int, iov: int, iovcnt: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not f.readable:
        raise GuestError(errno.EBADF)
    return f.readv(k, lwp, read_iovecs(k.mem, iov, iovcnt))


def sys_writev(k: Kernel, lwp: Lwp, fd: int, iov: int, iovcnt: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not f.writable:
        raise GuestError(errno.EBADF)
    vecs = read_iovecs(k.mem, iov, iovcnt)
    if len(vecs) == 1:
        return f.write(k, lwp, *vecs[0])
    data = b"".join(k.mem.read(base, length) for base, length in vecs if length)
    return f.write_bytes(k, lwp, data)


def sys_pread64(k: Kernel, lwp: Lwp, fd: int, buf: int, count: int, off: int) -> int:
    lwp.proc.fds.get(i32(fd))
    raise GuestError(errno.ESPIPE)


def sys_pwrite64(k: Kernel, lwp: Lwp, fd: int, buf: int, count: int, off: int) -> int:
    lwp.proc.fds.get(i32(fd))
    raise GuestError(errno.ESPIPE)


def sys_close(k: Kernel, lwp: Lwp, fd: int) -> int:
    lwp.proc.fds.close(k, i32(fd))
    return 0


def sys_lseek(k: Kernel, lwp: Lwp, fd: int, offset: int, whence: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if i32(whence) not in (SEEK_SET, SEEK_CUR, SEEK_END):
        raise GuestError(errno.EINVAL)
    if isinstance(f, NullFile):
        return 0
    raise GuestError(errno.ESPIPE)


def sys_ioctl(k: Kernel, lwp: Lwp, fd: int, req: int, arg: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    req &= 0xFFFF_FFFF
    if req == FIONBIO:
        on = k.mem.read_u32(arg)
        f.flags = f.flags | O_NONBLOCK if on else f.flags & ~O_NONBLOCK
        return 0
    return f.ioctl(k, lwp, req, arg)


def sys_fcntl(k: Kernel, lwp: Lwp, fd: int, cmd: int, arg: int) -> int:
    fds = lwp.proc.fds
    fd, cmd = i32(fd), i32(cmd)
    e = fds.entry(fd)
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        start = i32(arg)
        if not 0 <= start < fds.limit:
            raise GuestError(errno.EINVAL)
        return fds.install(e.file, cloexec=cmd == F_DUPFD_CLOEXEC, fd=fds.lowest_free(start))
    if cmd == F_GETFD:
        return FD_CLOEXEC if e.cloexec else 0
    if cmd == F_SETFD:
        e.cloexec = bool(arg & FD_CLOEXEC)
        return 0
    if cmd == F_GETFL:
        return e.file.flags
    if cmd == F_SETFL:
        keep = e.file.flags & ~(O_APPEND | O_NONBLOCK)
        e.file.flags = keep | (arg & (O_APPEND | O_NONBLOCK))
        return 0
    raise GuestError(errno.EINVAL)


def sys_dup(k: Kernel, lwp: Lwp, fd: int) -> int:
    fds = lwp.proc.fds
    return fds.install(fds.get(i32(fd)))


def sys_dup2(k: Kernel, lwp: Lwp, oldfd: int, newfd: int) -> int:
    fds = lwp.proc.fds
    oldfd, newfd = i32(oldfd), i32(newfd)
    fds.get(oldfd)
    if oldfd == newfd:
        return newfd
    return fds.dup_to(k, oldfd, newfd)


def sys_dup3(k: Kernel, lwp: Lwp, oldfd: int, newfd: int, flags: int) -> int:
    oldfd, newfd, flags = i32(oldfd), i32(newfd), i32(flags)
    if oldfd == newfd or flags & ~O_CLOEXEC:
        raise GuestError(errno.EINVAL)
    return lwp.proc.fds.dup_to(k, oldfd, newfd, cloexec=bool(flags & O_CLOEXEC))


def _lookup(k: Kernel, lwp: Lwp, dirfd: int, name: bytes) -> str:
    """The device a path names, resolved as Linux walks it; ENOENT for anything else.

    The only tree is ``/`` > ``dev`` > the devices, and the cwd is always
    ``/``: so ``dev/null``, ``//dev/./null`` and ``/dev/../dev/null`` name
    /dev/null as on Linux, a component after a device (``/dev/null/..``,
    ``/dev/null/``) is ENOTDIR, and a relative path against a ``dirfd`` that
    is not AT_FDCWD is EBADF or ENOTDIR (no fd is a directory).  Nothing here
    ever reaches a host file: the answer is a name from DEVICES or an errno.
    """
    if not name:
        raise GuestError(errno.ENOENT)
    if not name.startswith(b"/") and i32(dirfd) != AT_FDCWD:
        lwp.proc.fds.get(i32(dirfd))  # EBADF
        raise GuestError(errno.ENOTDIR)
    where: list[bytes] = []  # the directories walked: [] is /, [b"dev"] is /dev
    device: bytes | None = None
    for part in name.split(b"/"):
        if device is not None:  # anything after a device, even "" (a trailing slash)
            raise GuestError(errno.ENOTDIR)
        if part in (b"", b"."):
            continue
        if part == b"..":
            where = where[:-1]
        elif not where and part == b"dev":
            where = [part]
        elif where == [b"dev"] and b"/dev/" + part in DEVICES:
            device = b"/dev/" + part
        else:
            raise GuestError(errno.ENOENT)
    if device is None:  # / or /dev: directories we do not expose
        raise GuestError(errno.ENOENT)
    return DEVICES[device]


def _open(k: Kernel, lwp: Lwp, dirfd: int, path: int, flags: int) -> int:
    dev = _lookup(k, lwp, dirfd, k.mem.cstring(path))
    flags = i32(flags)
    if flags & O_CREAT and flags & O_EXCL:
        raise GuestError(errno.EEXIST)
    if flags & O_DIRECTORY:
        raise GuestError(errno.ENOTDIR)
    acc = flags & O_ACCMODE
    f = NullFile(acc) if dev == "null" else ZeroFile(acc, random=dev == "urandom")
    f.flags |= flags & (O_NONBLOCK | O_APPEND)
    return lwp.proc.fds.install(f, cloexec=bool(flags & O_CLOEXEC))


def sys_open(k: Kernel, lwp: Lwp, path: int, flags: int, mode: int) -> int:
    return _open(k, lwp, AT_FDCWD, path, flags)


def sys_openat(k: Kernel, lwp: Lwp, dirfd: int, path: int, flags: int, mode: int) -> int:
    return _open(k, lwp, dirfd, path, flags)


def _stat_of(k: Kernel, f) -> bytes:
    if isinstance(f, ConsoleFile):
        mode = (S_IFCHR if k.console.tty else S_IFIFO) | 0o620
        rdev = 0x8800 if k.console.tty else 0
    elif f.kind == "pipe":
        mode, rdev = S_IFIFO | 0o600, 0
    else:
        mode, rdev = S_IFCHR | 0o666, 0x103
    return STAT.pack(1, id(f) & 0xFFFF_FFFF, 1, mode, 0, 0, 0, rdev, 0, 4096, 0, 0, 0, 0, 0, 0, 0)


def sys_fstat(k: Kernel, lwp: Lwp, fd: int, buf: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    k.mem.write(buf, _stat_of(k, f))
    return 0


def sys_newfstatat(k: Kernel, lwp: Lwp, dirfd: int, path: int, buf: int, flags: int) -> int:
    name = k.mem.cstring(path)
    if name == b"" and flags & 0x1000:  # AT_EMPTY_PATH: fstat of dirfd
        return sys_fstat(k, lwp, dirfd, buf)
    _lookup(k, lwp, dirfd, name)
    k.mem.write(buf, _stat_of(k, NullFile()))
    return 0


def sys_stat(k: Kernel, lwp: Lwp, path: int, buf: int) -> int:
    return sys_newfstatat(k, lwp, AT_FDCWD & 0xFFFF_FFFF, path, buf, 0)


def sys_access(k: Kernel, lwp: Lwp, path: int, mode: int) -> int:
    return sys_faccessat(k, lwp, AT_FDCWD & 0xFFFF_FFFF, path, mode)


def sys_faccessat(k: Kernel, lwp: Lwp, dirfd: int, path: int, mode: int) -> int:
    _lookup(k, lwp, dirfd, k.mem.cstring(path))
    return 0


def sys_getcwd(k: Kernel, lwp: Lwp, buf: int, size: int) -> int:
    if size < 2:
        raise GuestError(errno.ERANGE)
    k.mem.write(buf, b"/\0")
    return 2

"""File descriptor I/O: read/write and friends, seek, dup, fcntl, ioctl, getdents, sync.

Path syscalls (open, stat, ...) are ``sys_fs``; these act on an open file,
whatever it is: a file of the instance's file system, a pipe, the console, a
device or a /proc file.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.files import FIONBIO, O_APPEND, O_CLOEXEC, O_NONBLOCK, FsFile
from tender_service.rump.fs import F_UNLCK, LOCK_NB
from tender_service.rump.outcomes import Block
from tender_service.rump.syscalls.abi import i32, i64, read_iovecs

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
FD_CLOEXEC = 1
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
LOCK_CMDS = {F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW}
FLOCK = struct.Struct("<hh4xqqi4x")  # struct flock, x86-64: type, whence, start, len, pid
#: a lock wait (F_SETLKW, flock without LOCK_NB) looks again this often: the lock may
#: be held in another VM, which wakes no queue here
LOCK_RECHECK = 0.005


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
    f = lwp.proc.fds.get(i32(fd))
    if not f.readable:
        raise GuestError(errno.EBADF)
    if i64(off) < 0:
        raise GuestError(errno.EINVAL)
    return f.pread(k, buf, min(count, 0x7FFFF000), i64(off))


def sys_pwrite64(k: Kernel, lwp: Lwp, fd: int, buf: int, count: int, off: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not f.writable:
        raise GuestError(errno.EBADF)
    if i64(off) < 0:
        raise GuestError(errno.EINVAL)
    return f.pwrite(k, buf, min(count, 0x7FFFF000), i64(off))


#: bytes one sendfile call moves at most (Linux returns partial counts too)
SENDFILE_MAX = 1 << 22


def sys_sendfile(k: Kernel, lwp: Lwp, out_fd: int, in_fd: int, offp: int, count: int) -> int:
    """Copy from a file to any writable fd (a socket, a pipe, a file) without the guest
    touching the bytes.  The input is read at the offset and the offset moved only after
    the write returned: a send that blocks restarts the call, which reads the same bytes
    again and the socket resumes from what it already sent (``lwp.progress``)."""
    src = lwp.proc.fds.get(i32(in_fd))
    dst = lwp.proc.fds.get(i32(out_fd))
    if not src.readable or not dst.writable:
        raise GuestError(errno.EBADF)
    if not isinstance(src, FsFile):
        raise GuestError(errno.EINVAL)  # Linux: the input must support mmap-like reads
    if dst.flags & O_APPEND:
        raise GuestError(errno.EINVAL)
    if offp:
        off = i64(k.mem.read_u64(offp))
        if off < 0:
            raise GuestError(errno.EINVAL)
    else:
        off = src.seek(0, SEEK_CUR)
    n = min(count, 0x7FFFF000, SENDFILE_MAX)
    data = src.tree.read(src.ofd, n, off) if n else b""
    if not data:
        return 0
    done = dst.write_bytes(k, lwp, bytes(data))
    if offp:
        k.mem.write_u64(offp, off + done)
    else:
        src.seek(off + done, SEEK_SET)
    return done


def sys_close(k: Kernel, lwp: Lwp, fd: int) -> int:
    lwp.proc.fds.close(k, i32(fd))
    return 0


def sys_lseek(k: Kernel, lwp: Lwp, fd: int, offset: int, whence: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if i32(whence) not in (SEEK_SET, SEEK_CUR, SEEK_END):
        raise GuestError(errno.EINVAL)
    return f.seek(i64(offset), i32(whence))


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
        e.file.set_flags(keep | (arg & (O_APPEND | O_NONBLOCK)))
        return 0
    if cmd in LOCK_CMDS:
        return _record_lock(k, lwp, e.file, cmd, arg)
    raise GuestError(errno.EINVAL)


def _record_lock(k: Kernel, lwp: Lwp, f: object, cmd: int, arg: int) -> int:
    """fcntl's advisory record locks: a process's (F_SETLK) or an open file
    description's (F_OFD_SETLK), kept by the instance's file system."""
    ltype, whence, start, length, pid = FLOCK.unpack(k.mem.read(arg, FLOCK.size))
    ofd_lock = cmd in (F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
    if ofd_lock and pid:
        raise GuestError(errno.EINVAL)
    get = cmd in (F_GETLK, F_OFD_GETLK)
    if not isinstance(f, FsFile) or f.is_dir:
        if get:  # a pipe or device: nothing else locks it here
            k.mem.write(arg, FLOCK.pack(F_UNLCK, whence, start, length, pid))
        return 0
    owner = -f.ofd if ofd_lock else lwp.proc.pid
    try:
        got = k.fs.tree.lock(f.ofd, owner, get, ltype, whence, start, length)
    except GuestError as err:
        if err.errno == errno.EAGAIN and cmd in (F_SETLKW, F_OFD_SETLKW):
            raise Block(None, "record lock", until=time.monotonic() + LOCK_RECHECK) from None
        raise
    if get:
        gtype, gstart, glen, gowner = got
        if gtype == F_UNLCK:
            k.mem.write(arg, FLOCK.pack(F_UNLCK, whence, start, length, pid))
        else:
            k.mem.write(arg, FLOCK.pack(gtype, 0, gstart, glen, -1 if gowner < 0 else gowner))
    elif not ofd_lock and ltype != F_UNLCK:
        k.fs.record_locks.add((owner, f.ino))
    return 0


def sys_flock(k: Kernel, lwp: Lwp, fd: int, op: int) -> int:
    """flock(2): per open file description, across the instance's VMs too."""
    f = lwp.proc.fds.get(i32(fd))
    op = i32(op)
    if not isinstance(f, FsFile):
        return 0  # a pipe or device: no one else can name it to lock it here
    try:
        k.fs.tree.flock(f.ofd, op)
    except GuestError as err:
        if err.errno == errno.EAGAIN and not op & LOCK_NB:
            raise Block(None, "flock", until=time.monotonic() + LOCK_RECHECK) from None
        raise
    return 0


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


def sys_getdents64(k: Kernel, lwp: Lwp, fd: int, dirp: int, count: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    size = min(count & 0xFFFF_FFFF, 1 << 20)
    k.mem.offset(dirp, size)  # EFAULT before the directory offset moves
    data = f.getdents(size)
    k.mem.write(dirp, data)
    return len(data)


def sys_fsync(k: Kernel, lwp: Lwp, fd: int) -> int:
    """fsync/fdatasync: memory is the storage; EINVAL for what cannot be synced, as Linux."""
    f = lwp.proc.fds.get(i32(fd))
    if f.kind in ("pipe", "console", "procfile", "procdir"):
        raise GuestError(errno.EINVAL)
    return 0

"""Open file descriptions: what an fd points at.

A ``File`` is shared by every fd that refers to it (dup, fork); ``refs``
counts those fds, and when it drops to zero the file is released (a pipe end
then stops counting as a reader or writer).  Reads and writes move bytes
straight between guest memory and the file; an operation that cannot make
progress raises ``Block`` and the syscall is restarted when woken.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump import jobctl, signals
from tender_service.rump.outcomes import Block

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp
    from tender_service.rump.vfs import FsTree

O_RDONLY, O_WRONLY, O_RDWR, O_ACCMODE = 0, 1, 2, 3
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC, O_APPEND, O_NONBLOCK = (
    0o100,
    0o200,
    0o400,
    0o1000,
    0o2000,
    0o4000,
)
O_DIRECTORY, O_CLOEXEC = 0o200000, 0o2000000
O_LARGEFILE = 0o100000

S_IFIFO, S_IFCHR, S_IFSOCK = 0o010000, 0o020000, 0o140000

# poll(2) event bits, as Linux numbers them (epoll's EPOLL* are the same)
POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
POLLRDNORM, POLLRDBAND, POLLWRNORM, POLLWRBAND, POLLRDHUP = 0x40, 0x80, 0x100, 0x200, 0x2000
READABLE = POLLIN | POLLRDNORM
WRITABLE = POLLOUT | POLLWRNORM

TCGETS, TCSETS, TCSETSW, TCSETSF = 0x5401, 0x5402, 0x5403, 0x5404
TIOCGWINSZ, TIOCSWINSZ, TIOCGPGRP, FIONREAD, FIONBIO = 0x5413, 0x5414, 0x540F, 0x541B, 0x5421
TIOCSCTTY, TIOCSPGRP = 0x540E, 0x5410


class File:
    kind = "file"
    mode = S_IFCHR

    def __init__(self, flags: int = O_RDWR) -> None:
        self.flags = flags
        self.refs = 0

    @property
    def readable(self) -> bool:
        return (self.flags & O_ACCMODE) in (O_RDONLY, O_RDWR)

    @property
    def writable(self) -> bool:
        return (self.flags & O_ACCMODE) in (O_WRONLY, O_RDWR)

    @property
    def nonblocking(self) -> bool:
        return bool(self.flags & O_NONBLOCK)

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        raise GuestError(errno.EINVAL)

    def readv(self, k: Kernel, lwp: Lwp, vecs: list[tuple[int, int]]) -> int:
        """Fill the iovecs in order; never block once something was read.

        A file whose read has side effects before it blocks (a request sent
        elsewhere) must override this: the later iovecs' ``Block`` is dropped.
        """
        total = 0
        for base, length in vecs:
            if length == 0:
                continue
            try:
                got = self.read(k, lwp, base, length)
            except (Block, GuestError):
                if total:
                    return total  # what was read so far
                raise
            total += got
            if got < length:
                break
        return total

    def write(self, k: Kernel, lwp: Lwp, addr: int, n: int) -> int:
        raise GuestError(errno.EINVAL)

    def write_bytes(self, k: Kernel, lwp: Lwp, data: bytes) -> int:
        """Write from a host buffer (writev gathers into one)."""
        raise GuestError(errno.EINVAL)

    def ioctl(self, k: Kernel, lwp: Lwp, req: int, arg: int) -> int:
        raise GuestError(errno.ENOTTY)

    def set_flags(self, flags: int) -> None:
        """fcntl(F_SETFL): the status flags of this open file description."""
        self.flags = flags

    def seek(self, offset: int, whence: int) -> int:
        raise GuestError(errno.ESPIPE)

    def pread(self, k: Kernel, addr: int, n: int, offset: int) -> int:
        raise GuestError(errno.ESPIPE)

    def pwrite(self, k: Kernel, addr: int, n: int, offset: int) -> int:
        raise GuestError(errno.ESPIPE)

    def getdents(self, size: int) -> bytes:
        raise GuestError(errno.ENOTDIR)

    def release(self, k: Kernel) -> None:
        """The last fd referring to this file was closed."""

    def closed_by(self, k: Kernel, pid: int) -> None:
        """Process ``pid`` closed one fd of this file (POSIX record locks end)."""

    def describe(self) -> str:
        return self.kind

    def poll(self, k: Kernel) -> int:
        """The poll(2) events ready now.  A file without a wait of its own (a regular
        file, a device) is always ready, as Linux's DEFAULT_POLLMASK says."""
        return READABLE | WRITABLE

    def poll_gen(self) -> int:
        """A counter that moves whenever new readiness arrives (data, room, hang-up):
        an edge-triggered epoll reports a ready file again only once it moved."""
        return 0

    @property
    def pollable(self) -> bool:
        """Can this file wait (epoll_ctl refuses the rest with EPERM, as Linux)."""
        return False

    @property
    def poll_rechecks(self) -> bool:
        """Nothing wakes the poll queue when this file becomes ready (a host fd, a
        pipe in another VM): a poll that waits on it re-checks on a short timer."""
        return False


class NullFile(File):
    """/dev/null: reads see EOF, writes vanish."""

    kind = "null"

    def read(self, k, lwp, addr, n):
        return 0

    def write(self, k, lwp, addr, n):
        k.mem.offset(addr, n)  # EFAULT as Linux would... Linux /dev/null does not touch it
        return n

    def write_bytes(self, k, lwp, data):
        return len(data)

    def seek(self, offset, whence):
        return 0


class ZeroFile(NullFile):
    """/dev/zero and /dev/urandom: endless bytes."""

    def __init__(self, flags: int, random: bool) -> None:
        super().__init__(flags)
        self.random = random
        self.kind = "urandom" if random else "zero"

    def read(self, k, lwp, addr, n):
        n = min(n, 1 << 20)
        k.mem.write(addr, os.urandom(n) if self.random else bytes(n))
        return n


class ConsoleFile(File):
    """fd 0/1/2 of the launched program: the tender's console for this VM."""

    kind = "console"

    def __init__(self, flags: int, fdno: int) -> None:
        super().__init__(flags)
        self.fdno = fdno

    def read(self, k, lwp, addr, n):
        if k.console.is_tty(0):  # a terminal: a background group may not read it
            jobctl.check(k, lwp, signals.SIGTTIN)
        return k.console.read(k, lwp, self, addr, n)

    def write(self, k, lwp, addr, n):
        return self.write_bytes(k, lwp, k.mem.read(addr, n))

    def write_bytes(self, k, lwp, data):
        try:
            k.console.output(lwp.proc.pid, 2 if self.fdno == 2 else 1, data)
        except BrokenPipeError:  # `unifork run prog | head`: as a pipe without readers
            k.post_signal(lwp.proc, signals.SIGPIPE)
            raise GuestError(errno.EPIPE) from None
        return len(data)

    def ioctl(self, k, lwp, req, arg):
        if not k.console.is_tty(self.fdno):
            raise GuestError(errno.ENOTTY)
        if req == TIOCGWINSZ:
            k.mem.write(arg, struct.pack("<4H", 24, 80, 0, 0))
            return 0
        if req == TCGETS:
            # a cooked terminal: ICRNL | IXON, OPOST | ONLCR, B38400 | CS8 | CREAD, ISIG | ICANON | ECHO...
            termios = struct.pack("<4IB19B", 0x500, 0x5, 0xBF, 0x8A3B, 0, *([0] * 19))
            k.mem.write(arg, termios + bytes(60 - len(termios)))
            return 0
        if req in (TCSETS, TCSETSW, TCSETSF, TIOCSWINSZ):
            k.mem.offset(arg, 8)
            return jobctl.check(k, lwp, signals.SIGTTOU) if req != TIOCSWINSZ else 0
        if req == TIOCGPGRP:
            k.mem.write_u32(arg, jobctl.tcgetpgrp(k, lwp))
            return 0
        if req == TIOCSPGRP:
            pgid = k.mem.read_u32(arg)
            return jobctl.tcsetpgrp(k, lwp, pgid - (1 << 32) if pgid >> 31 else pgid)
        if req == TIOCSCTTY:
            return jobctl.tiocsctty(k, lwp)
        raise GuestError(errno.EINVAL)

    @property
    def mode_bits(self) -> int:
        return S_IFCHR

    @property
    def pollable(self) -> bool:
        return True

    def poll(self, k: Kernel) -> int:
        mask = WRITABLE if self.writable else 0
        if self.readable and self.fdno == 0:
            mask |= READABLE if k.console.input_ready() else 0
        elif self.readable:
            mask |= READABLE
        return mask


class FsFile(File):
    """A regular file or directory of the instance's file system.

    The open file description (offset, O_APPEND) lives in the file system
    (``rump/fs.py``), which may be the supervisor's in VM-clone mode; this
    object is the VM's handle on it, shared by this VM's fds like any file.
    """

    def __init__(
        self, tree: FsTree, ofd: int, ino: int, is_dir: bool, flags: int, path: bytes = b""
    ) -> None:
        super().__init__(flags)
        self.tree, self.ofd, self.ino, self.is_dir = tree, ofd, ino, is_dir
        self.path = path
        self.kind = "dir" if is_dir else "file"

    def seek(self, offset, whence):
        return self.tree.seek(self.ofd, offset, whence)

    def pread(self, k, addr, n, offset):
        k.mem.offset(addr, n)
        data = self.tree.read(self.ofd, n, offset)
        k.mem.write(addr, data)
        return len(data)

    def pwrite(self, k, addr, n, offset):
        return self.tree.write(self.ofd, k.mem.read(addr, n), offset)

    def getdents(self, size):
        return self.tree.getdents(self.ofd, size)

    def read(self, k, lwp, addr, n):
        k.mem.offset(addr, n)  # EFAULT before the shared offset moves
        data = self.tree.read(self.ofd, n)
        k.mem.write(addr, data)
        return len(data)

    def readv(self, k, lwp, vecs):
        total = 0
        for base, length in vecs:
            got = self.read(k, lwp, base, length) if length else 0
            total += got
            if got < length:
                break
        return total

    def write(self, k, lwp, addr, n):
        return self.tree.write(self.ofd, k.mem.read(addr, n))

    def write_bytes(self, k, lwp, data):
        return self.tree.write(self.ofd, data)

    def set_flags(self, flags: int) -> None:
        self.flags = flags
        self.tree.set_flags(self.ofd, flags)

    def release(self, k: Kernel) -> None:
        self.tree.release(self.ofd)

    def closed_by(self, k: Kernel, pid: int) -> None:
        key = (pid, self.ino)
        if key in k.fs.record_locks:
            k.fs.record_locks.discard(key)
            self.tree.unlock_owner(pid, self.ino)

    def describe(self) -> str:
        return f"{self.kind} (inode {self.ino})"

    def snapshot_state(self) -> dict:
        """A VM-clone fork hands the open file description on (the tree is the
        supervisor's there, so the child's handle names the same one)."""
        return {
            "kind": "fsfile",
            "ofd": self.ofd,
            "ino": self.ino,
            "dir": self.is_dir,
            "flags": self.flags,
            "path": self.path.decode("latin-1"),
        }

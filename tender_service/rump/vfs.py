"""The kernel's view of the instance's file system (``k.fs``).

Syscalls name files by (dirfd, path) relative to a process; the file system
(``rump/fs.py``) knows only inode numbers and paths.  This module translates:
AT_FDCWD is the process's cwd, any other dirfd must be an open directory.
The tree behind it is either this VM's :class:`~tender_service.rump.fs.FileSystem`
(thread mode: one kernel, one tree) or, in VM-clone mode, a proxy with the
same methods whose calls go to the instance's supervisor.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Protocol

from tender_service.machine.errors import GuestError
from tender_service.rump.files import FsFile
from tender_service.rump.fs import Opened, Stat
from tender_service.rump.syscalls.abi import i32

if TYPE_CHECKING:
    from tender_service.rump.process import Process

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_EMPTY_PATH = 0x100, 0x200, 0x400, 0x1000


class FsTree(Protocol):
    """The operations of :class:`~tender_service.rump.fs.FileSystem` the kernel uses."""

    def open(self, base: int, path: bytes, flags: int, mode: int) -> Opened: ...
    def release(self, ofd: int) -> None: ...
    def set_flags(self, ofd: int, flags: int) -> None: ...
    def read(self, ofd: int, n: int, offset: int = -1) -> bytes: ...
    def write(self, ofd: int, data: bytes, offset: int = -1) -> int: ...
    def seek(self, ofd: int, offset: int, whence: int) -> int: ...
    def getdents(self, ofd: int, size: int) -> bytes: ...
    def fstat(self, ofd: int) -> Stat: ...
    def ftruncate(self, ofd: int, length: int) -> None: ...
    def fchmod(self, ofd: int, mode: int) -> None: ...
    def futimens(self, ofd: int, atime: int, mtime: int) -> None: ...
    def contents(self, ofd: int, offset: int = 0, n: int = -1) -> bytes: ...
    def stat(self, base: int, path: bytes, follow: bool = True) -> Stat: ...
    def mkdir(self, base: int, path: bytes, mode: int) -> None: ...
    def rmdir(self, base: int, path: bytes) -> None: ...
    def unlink(self, base: int, path: bytes) -> None: ...
    def link(self, old_base: int, old: bytes, new_base: int, new: bytes, follow: bool) -> None: ...
    def symlink(self, target: bytes, base: int, path: bytes) -> None: ...
    def readlink(self, base: int, path: bytes) -> bytes: ...
    def rename(self, old_base: int, old: bytes, new_base: int, new: bytes) -> None: ...
    def chmod(self, base: int, path: bytes, mode: int, follow: bool = True) -> None: ...
    def truncate(self, base: int, path: bytes, length: int) -> None: ...
    def utimens(self, base: int, path: bytes, atime: int, mtime: int, follow: bool) -> None: ...
    def chdir(self, base: int, path: bytes) -> int: ...
    def getcwd(self, ino: int) -> bytes: ...
    def open_exec(
        self, base: int, path: bytes, follow: bool = True, offset: int = 0, n: int = -1
    ) -> tuple[bytes, bytes]: ...
    def exec_ofd(self, ofd: int, offset: int = 0, n: int = -1) -> bytes: ...


class Vfs:
    """``k.fs``: the tree, and the process-relative half of path lookup."""

    def __init__(self, tree: FsTree) -> None:
        self.tree = tree

    def base(self, proc: Process, dirfd: int, path: bytes) -> int:
        """The directory a relative ``path`` starts from (irrelevant if absolute)."""
        dirfd = i32(dirfd)
        if path.startswith(b"/") or dirfd == AT_FDCWD:
            return proc.cwd
        f = proc.fds.get(dirfd)  # EBADF
        if not isinstance(f, FsFile) or not f.is_dir:
            raise GuestError(errno.ENOTDIR)
        return f.ino

    def open_exec(
        self, proc: Process, dirfd: int, path: bytes, at_flags: int
    ) -> tuple[bytes, bytes]:
        """(contents, resolved absolute path) of the file execveat would run (Contract 2)."""
        if at_flags & ~(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW):
            raise GuestError(errno.EINVAL)
        if not path:
            if not at_flags & AT_EMPTY_PATH:
                raise GuestError(errno.ENOENT)
            f = proc.fds.get(i32(dirfd))
            if not isinstance(f, FsFile):
                raise GuestError(errno.EACCES)
            return self.tree.exec_ofd(f.ofd), b"/dev/fd/%d" % i32(dirfd)
        follow = not at_flags & AT_SYMLINK_NOFOLLOW
        return self.tree.open_exec(self.base(proc, dirfd, path), path, follow)

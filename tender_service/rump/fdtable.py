"""Per-process descriptor tables (fork copies them; files are shared)."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.files import File

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel

DEFAULT_NOFILE = 1024


@dataclass(slots=True)
class FdEntry:
    file: File
    cloexec: bool = False


class FdTable:
    def __init__(self, limit: int = DEFAULT_NOFILE) -> None:
        self.entries: dict[int, FdEntry] = {}
        self.limit = limit
        #: the pid whose table this is (its fcntl record locks go with any close)
        self.owner = 0

    def get(self, fd: int) -> File:
        e = self.entries.get(fd)
        if e is None:
            raise GuestError(errno.EBADF)
        return e.file

    def entry(self, fd: int) -> FdEntry:
        e = self.entries.get(fd)
        if e is None:
            raise GuestError(errno.EBADF)
        return e

    def lowest_free(self, start: int = 0) -> int:
        fd = start
        while fd in self.entries:
            fd += 1
        if fd >= self.limit:
            raise GuestError(errno.EMFILE)
        return fd

    def install(self, file: File, cloexec: bool = False, fd: int | None = None) -> int:
        if fd is None:
            fd = self.lowest_free()
        file.refs += 1
        self.entries[fd] = FdEntry(file, cloexec)
        return fd

    def close(self, k: Kernel, fd: int) -> None:
        e = self.entries.pop(fd, None)
        if e is None:
            raise GuestError(errno.EBADF)
        e.file.closed_by(k, self.owner)
        drop(k, e.file)

    def dup_to(self, k: Kernel, oldfd: int, newfd: int, cloexec: bool = False) -> int:
        f = self.get(oldfd)
        if not 0 <= newfd < self.limit:
            raise GuestError(errno.EBADF)
        f.refs += 1  # before closing newfd: dup2(fd, fd) style aliasing stays safe
        old = self.entries.pop(newfd, None)
        self.entries[newfd] = FdEntry(f, cloexec)
        if old is not None:
            old.file.closed_by(k, self.owner)
            drop(k, old.file)
        return newfd

    def copy(self) -> FdTable:
        t = FdTable(self.limit)
        for fd, e in self.entries.items():
            e.file.refs += 1
            t.entries[fd] = FdEntry(e.file, e.cloexec)
        return t

    def close_cloexec(self, k: Kernel) -> None:
        """execve: close every fd marked close-on-exec."""
        for fd in [fd for fd, e in self.entries.items() if e.cloexec]:
            self.close(k, fd)

    def close_all(self, k: Kernel) -> None:
        entries, self.entries = self.entries, {}
        for e in entries.values():
            e.file.closed_by(k, self.owner)
            drop(k, e.file)


def drop(k: Kernel, f: File) -> None:
    f.refs -= 1
    if f.refs == 0:
        f.release(k)

"""A minimal /proc: ``/proc/self``, ``/proc/PID/{exe,fd,stat,comm,cmdline}``, made on demand.

Built from the kernel's process table when a path is opened or stat'ed: a
file's contents are a snapshot taken at open, as Linux's seq files are at
first read.  In VM-clone mode the instance's other processes live in other
VMs: /proc lists them and ``/proc/PID/{stat,comm,cmdline}`` describe them from
the supervisor's process table (``RemoteHost.proc_stat``), and ``exe`` names
their program; their ``fd`` is not served (ENOENT).  Nothing here touches the file system tree.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.files import O_ACCMODE, O_RDONLY, File, FsFile
from tender_service.rump.fs import DT, pack_dirents
from tender_service.rump.process import ProcState

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

S_IFDIR, S_IFREG, S_IFLNK = 0o040000, 0o100000, 0o120000
PROC_INO_BASE = 1 << 32  # far from the tree's inode numbers


@dataclass(slots=True)
class ProcNode:
    kind: str  # "dir", "file" or "symlink"
    ino: int
    data: bytes = b""  # a file's contents, a symlink's target
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)  # a directory
    fd: int = -1  # /proc/PID/fd/N: the fd it names
    owner: Process | None = None

    @property
    def mode(self) -> int:
        return {"dir": S_IFDIR | 0o555, "file": S_IFREG | 0o444, "symlink": S_IFLNK | 0o777}[
            self.kind
        ]


def proc_parts(path: bytes) -> list[bytes] | None:
    """The components after /proc of an absolute path into /proc, else None."""
    if not path.startswith(b"/"):
        return None
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if not parts or parts[0] != b"proc":
        return None
    return parts[1:]


def _ino(pid: int, n: int) -> int:
    return PROC_INO_BASE + pid * 64 + n


def lookup(k: Kernel, lwp: Lwp, parts: list[bytes], follow: bool = True) -> ProcNode:
    """The node ``/proc/<parts>`` names for the calling process, or ENOENT."""
    if not parts:
        pids = {p.pid for p in k.procs.values() if p.state is not ProcState.REAPED and not p.remote}
        if k.remote is not None:
            pids |= set(k.remote.proc_list())
        entries = [(b"self", _ino(0, 1), DT["symlink"])]
        entries += [(str(pid).encode(), _ino(pid, 0), DT["dir"]) for pid in sorted(pids)]
        return ProcNode("dir", PROC_INO_BASE, entries=entries)
    head, rest = parts[0], parts[1:]
    if head == b"self":
        if not rest and not follow:
            return ProcNode("symlink", _ino(0, 1), data=str(lwp.proc.pid).encode())
        proc = lwp.proc
    elif head.isdigit():
        found = k.procs.get(int(head))
        if (found is None or found.remote) and k.remote is not None:
            return _in_other_vm(k, int(head), rest)
        if found is None or found.state is ProcState.REAPED:
            raise GuestError(errno.ENOENT)
        proc = found
    else:
        raise GuestError(errno.ENOENT)
    return _in_process(k, proc, rest)


def _in_process(k: Kernel, proc: Process, rest: list[bytes]) -> ProcNode:
    pid = proc.pid
    if not rest:
        names = [(b"exe", 1, "symlink"), (b"fd", 2, "dir"), (b"stat", 3, "file")]
        names += [(b"comm", 4, "file"), (b"cmdline", 5, "file")]
        return ProcNode(
            "dir", _ino(pid, 0), entries=[(n, _ino(pid, i), DT[t]) for n, i, t in names]
        )
    name, more = rest[0], rest[1:]
    if name == b"fd":
        if not more:
            return ProcNode("dir", _ino(pid, 2), entries=fd_entries(proc), owner=proc)
        if len(more) > 1 or not more[0].isdigit() or int(more[0]) not in proc.fds.entries:
            raise GuestError(errno.ENOENT if len(more) == 1 else errno.ENOTDIR)
        fd = int(more[0])
        target = link_target(k, proc.fds.get(fd))
        return ProcNode("symlink", _ino(pid, 8) + fd, data=target, fd=fd, owner=proc)
    if more:
        raise GuestError(errno.ENOTDIR if name in (b"exe", b"stat", b"comm") else errno.ENOENT)
    if name == b"exe":
        return ProcNode("symlink", _ino(pid, 1), data=proc.exe or b"/")
    if name == b"stat":
        return ProcNode("file", _ino(pid, 3), data=stat_line(k, proc))
    if name == b"comm":
        return ProcNode("file", _ino(pid, 4), data=proc.name.encode()[:15] + b"\n")
    if name == b"cmdline":
        return ProcNode("file", _ino(pid, 5), data=proc.name.encode() + b"\0")
    raise GuestError(errno.ENOENT)


def _in_other_vm(k: Kernel, pid: int, rest: list[bytes]) -> ProcNode:
    """/proc/PID of a process in another VM of the instance: exe, stat, comm, cmdline."""
    assert k.remote is not None
    info = k.remote.proc_stat(pid)
    if info is None:
        raise GuestError(errno.ENOENT)
    _, ppid, pgid, sid, state, comm, exe = info
    if not rest:
        names = [(b"exe", 1, "symlink"), (b"stat", 3, "file"), (b"comm", 4, "file")]
        names += [(b"cmdline", 5, "file")]
        return ProcNode(
            "dir", _ino(pid, 0), entries=[(n, _ino(pid, i), DT[t]) for n, i, t in names]
        )
    if len(rest) > 1:
        raise GuestError(errno.ENOTDIR if rest[0] in (b"exe", b"stat", b"comm") else errno.ENOENT)
    if rest[0] == b"exe":
        return ProcNode("symlink", _ino(pid, 1), data=exe or b"/")
    if rest[0] == b"stat":
        return ProcNode("file", _ino(pid, 3), data=_stat_text(pid, comm, state, ppid, pgid, sid, 0))
    if rest[0] == b"comm":
        return ProcNode("file", _ino(pid, 4), data=comm.encode()[:15] + b"\n")
    if rest[0] == b"cmdline":
        return ProcNode("file", _ino(pid, 5), data=comm.encode() + b"\0")
    raise GuestError(errno.ENOENT)


def fd_entries(proc: Process) -> list[tuple[bytes, int, int]]:
    base = _ino(proc.pid, 8)
    return [(str(fd).encode(), base + fd, DT["symlink"]) for fd in sorted(proc.fds.entries)]


def link_target(k: Kernel, f: File) -> bytes:
    """What readlink(/proc/PID/fd/N) says of an open file, as Linux words it."""
    if isinstance(f, FsFile):
        return f.path
    if f.kind == "console" and k.console.tty:
        return b"/dev/pts/0"
    if f.kind in ("null", "zero", "urandom"):
        return b"/dev/" + f.kind.encode()
    return b"%s:[%d]" % (
        b"pipe" if f.kind in ("pipe", "console") else f.kind.encode(),
        id(f) & 0xFFFFFF,
    )


def stat_line(k: Kernel, proc: Process) -> bytes:
    """/proc/PID/stat: the 52 fields of Linux's format, those we do not keep zero."""
    if proc.state is not ProcState.ALIVE:
        state = "Z"
    elif k.current is not None and k.current.proc is proc:
        state = "R"
    else:
        state = "S"
    vsize = sum(proc.mmaps.values())
    return _stat_text(proc.pid, proc.name, state, proc.ppid, proc.pgid, proc.sid, vsize)


def _stat_text(
    pid: int, name: str, state: str, ppid: int, pgid: int, sid: int, vsize: int
) -> bytes:
    fields = [ppid, pgid, sid, 0, -1, 0x400000]  # ppid .. flags
    fields += [0] * 13  # minflt .. itrealvalue, with priority 20 and num_threads below
    fields[13], fields[15] = 20, 1  # priority, num_threads (fields 18, 20)
    fields += [0, vsize, 0]  # starttime, vsize, rss
    fields += [0] * (52 - 3 - len(fields))
    return f"{pid} ({name[:15]}) {state} ".encode() + " ".join(map(str, fields)).encode() + b"\n"


class ProcFile(File):
    """An open /proc file (a snapshot of its contents) or directory (a listing)."""

    def __init__(self, node: ProcNode, flags: int) -> None:
        if flags & O_ACCMODE != O_RDONLY:
            raise GuestError(errno.EACCES if node.kind == "file" else errno.EISDIR)
        super().__init__(flags)
        self.node = node
        self.offset = 0
        self.kind = "procdir" if node.kind == "dir" else "procfile"

    def read(self, k, lwp, addr, n):
        if self.node.kind == "dir":
            raise GuestError(errno.EISDIR)
        data = self.node.data[self.offset : self.offset + n]
        k.mem.write(addr, data)
        self.offset += len(data)
        return len(data)

    def write_bytes(self, k, lwp, data):
        raise GuestError(errno.EBADF)

    def getdents(self, size: int) -> bytes:
        if self.node.kind != "dir":
            raise GuestError(errno.ENOTDIR)
        if self.node.owner is not None and self.offset == 0:  # /proc/PID/fd: as it is now
            self.node.entries = fd_entries(self.node.owner)
        listing = [(b".", self.node.ino, DT["dir"]), (b"..", PROC_INO_BASE, DT["dir"])]
        out, self.offset = pack_dirents(listing + self.node.entries, self.offset, size)
        return out

    def seek(self, offset: int, whence: int) -> int:
        end = len(self.node.data) if self.node.kind == "file" else len(self.node.entries) + 2
        pos = [offset, self.offset + offset, end + offset][whence] if 0 <= whence <= 2 else -1
        if pos < 0:
            raise GuestError(errno.EINVAL)
        self.offset = pos
        return pos

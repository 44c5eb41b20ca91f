"""One instance's file system: a tree of inodes, path resolution, open file descriptions.

The image's tree (:class:`~tender_service.machine.rootfs.RootFs`) is the
read-only lower layer: its files keep the image's bytes until first written,
when they are copied up into the writable in-memory layer (tmpfs semantics),
whose bytes count against the instance's size limit (ENOSPC past it).
Open file descriptions (offset, status flags) live here too, so that every
process holding one - in this VM or, in VM-clone mode, in another VM served by
the supervisor - shares one offset, as POSIX says for fds inherited at fork.

Pure Python on purpose: no kernel, process or guest memory here.  Paths and
data are bytes; a relative path starts at a directory inode number (the
process's cwd or a dirfd's directory), so the same calls can cross a transport
unchanged.  Every operation takes the lock: in VM-clone mode several VMs call
in at once.  Everyone is root, so permission bits only decide whether a file
may be executed (EACCES without an x bit).
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from tender_service.machine.errors import GuestError
from tender_service.machine.rootfs import DIR, FILE, SYMLINK, RootFs

CHR = "chr"
SOCK = "sock"  # an AF_UNIX socket's name (bind); the kernel keeps the socket itself
PATH_MAX, NAME_MAX, MAXSYMLINKS = 4096, 255, 40
ROOT_INO = 1
DEFAULT_TMPFS_SIZE = 64 << 20

O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
O_CREAT, O_EXCL, O_TRUNC, O_APPEND = 0o100, 0o200, 0o1000, 0o2000
O_DIRECTORY, O_NOFOLLOW = 0o200000, 0o400000
S_IFMT = 0o170000
S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR = 0o100000, 0o040000, 0o120000, 0o020000
S_IFSOCK = 0o140000
TYPE_BITS = {FILE: S_IFREG, DIR: S_IFDIR, SYMLINK: S_IFLNK, CHR: S_IFCHR, SOCK: S_IFSOCK}
DT = {
    FILE: 8,
    DIR: 4,
    SYMLINK: 10,
    CHR: 2,
    SOCK: 12,
    "file": 8,
    "dir": 4,
    "symlink": 10,
}  # linux_dirent64 d_type
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
#: (major << 8 | minor) of the character devices, as Linux numbers them
DEVICES = {"null": 0x103, "zero": 0x105, "urandom": 0x109, "random": 0x108, "tty": 0x500}
DEV_ID = 0x2A  # st_dev of every inode (one file system)
DIRENT = struct.Struct("<QqHB")  # linux_dirent64 header: ino, off, reclen, type
S_ISUID, S_ISGID, S_IXGRP = 0o4000, 0o2000, 0o010
NO_ID = 0xFFFF_FFFF  # chown's "leave it" (-1 as a uid_t)
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN, LOCK_MAND = 1, 2, 4, 8, 32
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
OFFSET_END = 1 << 63  # a record lock "to the end of the file" (l_len 0)


class Lock(NamedTuple):
    """A record lock (fcntl): ``owner`` a pid (F_SETLK), or -ofd (F_OFD_SETLK)."""

    owner: int
    start: int
    end: int  # exclusive; OFFSET_END: to the end of the file, however it grows
    type: int  # F_RDLCK or F_WRLCK


class Stat(NamedTuple):
    """What stat reports; the kernel packs it into struct stat or struct statx."""

    ino: int
    mode: int  # type and permission bits
    nlink: int
    rdev: int
    size: int
    atime: int  # nanoseconds since the epoch
    mtime: int
    ctime: int
    dev: int = DEV_ID
    uid: int = 0
    gid: int = 0

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(eq=False, slots=True)
class Inode:
    ino: int
    kind: str  # FILE, DIR, SYMLINK or CHR
    mode: int  # permission bits only
    data: bytes | bytearray = b""  # bytes: still the image's (lower layer, not charged)
    target: bytes = b""
    children: dict[bytes, Inode] = field(default_factory=dict)
    parent: int = ROOT_INO  # a directory's parent (its ".."), and its name there
    name: bytes = b""
    nlink: int = 1
    device: str = ""  # CHR: a key of DEVICES
    mount: str = ""  # a directory another file system answers for ("proc")
    opens: int = 0  # open file descriptions on it
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    uid: int = 0  # chown: recorded (everyone is root, so nothing checks them)
    gid: int = 0

    def stat(self) -> Stat:
        size = len(self.target) if self.kind == SYMLINK else len(self.data)
        if self.kind == DIR:
            size = 4096
        return Stat(
            self.ino,
            TYPE_BITS[self.kind] | self.mode,
            self.nlink,
            DEVICES.get(self.device, 0),
            size,
            self.atime,
            self.mtime,
            self.ctime,
            DEV_ID,
            self.uid,
            self.gid,
        )


@dataclass(eq=False, slots=True)
class OpenFile:
    """An open file description: shared by dup and fork, in every VM of the instance."""

    id: int
    node: Inode
    flags: int
    offset: int = 0
    holders: int = 1  # VMs (or kernels) that hold it; freed at 0
    listing: list[tuple[bytes, int, int]] | None = None  # getdents: a snapshot


@dataclass(frozen=True, slots=True)
class Opened:
    """What ``open`` made: an open file description, or a device the kernel provides."""

    ofd: int  # 0 for a device
    ino: int
    kind: str
    device: str = ""
    path: bytes = b""  # the absolute path it was opened by (/proc/PID/fd)


class FileSystem:
    """The tree of one instance (see the module docstring)."""

    def __init__(self, rootfs: RootFs | None = None, size_limit: int = DEFAULT_TMPFS_SIZE) -> None:
        self.size_limit = size_limit
        self.used = 0  # bytes of the writable layer
        self.inodes: dict[int, Inode] = {}
        self.ofds: dict[int, OpenFile] = {}
        self._next_ino = ROOT_INO
        self._next_ofd = 1
        self._lock = threading.RLock()
        #: advisory locks by inode: flock's per open file description, fcntl's ranges
        self.flocks: dict[int, dict[int, int]] = {}
        self.locks: dict[int, list[Lock]] = {}
        self.root = self._new(DIR, 0o755)
        self.root.nlink = 2
        if rootfs is not None:
            for e in rootfs.entries:
                self._add_entry(e.path, e.kind, e.mode, e.data, e.target)
        for name, mode in ((b"tmp", 0o1777), (b"dev", 0o755), (b"proc", 0o555)):
            if name not in self.root.children:
                self._mkdir_in(self.root, name, mode)
        dev = self.root.children[b"dev"]
        if b"shm" not in dev.children:  # Linux's tmpfs for shm_open and scratch files
            self._mkdir_in(dev, b"shm", 0o1777)
        for device in ("null", "zero", "urandom", "random", "tty"):
            if device.encode() not in dev.children:
                node = self._new(CHR, 0o666)
                node.device = device
                dev.children[device.encode()] = node
        self.root.children[b"proc"].mount = "proc"

    # -- building -----------------------------------------------------------------
    def _new(self, kind: str, mode: int) -> Inode:
        now = time.time_ns()
        node = Inode(self._next_ino, kind, mode & 0o7777, atime=now, mtime=now, ctime=now)
        self._next_ino += 1
        self.inodes[node.ino] = node
        return node

    def _mkdir_in(self, parent: Inode, name: bytes, mode: int) -> Inode:
        node = self._new(DIR, mode)
        node.nlink, node.parent, node.name = 2, parent.ino, name
        parent.children[name] = node
        parent.nlink += 1
        parent.mtime = parent.ctime = node.ctime
        return node

    def _add_entry(self, path: str, kind: str, mode: int, data: bytes, target: str) -> None:
        parts = [p.encode() for p in path.split("/") if p]
        if not parts:
            self.root.mode = mode & 0o7777
            return
        parent = self.root
        for p in parts[:-1]:
            nxt = parent.children.get(p)
            parent = (
                nxt if nxt is not None and nxt.kind == DIR else self._mkdir_in(parent, p, 0o755)
            )
        name = parts[-1]
        if kind == DIR:
            node = parent.children.get(name)
            if node is None or node.kind != DIR:
                node = self._mkdir_in(parent, name, mode)
            node.mode = mode & 0o7777
            return
        node = self._new(kind, mode)
        if kind == FILE:
            node.data = bytes(data)  # the image's bytes: lower layer, not charged
        else:
            node.target = target.encode()
        parent.children[name] = node

    # -- resolution -------------------------------------------------------------------
    def _dir(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None or node.nlink == 0:
            raise GuestError(errno.ENOENT)  # a removed cwd or directory
        if node.kind != DIR:
            raise GuestError(errno.ENOTDIR)
        return node

    def _resolve(
        self, base: int, path: bytes, follow: bool
    ) -> tuple[Inode, bytes, Inode | None, bool]:
        """(parent directory, last name, the node or None, trailing slash), as Linux walks.

        Every symlink but a last one that ``follow`` leaves alone is followed;
        more than 40 in one walk is ELOOP.  A component that is not a
        directory is ENOTDIR, a missing one ENOENT.
        """
        cur = self._start(base, path)
        trailing = path.endswith(b"/")
        todo = deque(p for p in path.split(b"/") if p)
        links = 0
        while todo:
            name = todo.popleft()
            if len(name) > NAME_MAX:
                raise GuestError(errno.ENAMETOOLONG)
            if cur.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            node = self._child(cur, name)
            last = not todo
            if node is not None and node.kind == SYMLINK and (not last or follow or trailing):
                links += 1
                if links > MAXSYMLINKS:
                    raise GuestError(errno.ELOOP)
                if not node.target:
                    raise GuestError(errno.ENOENT)
                if node.target.startswith(b"/"):
                    cur = self.root
                todo.extendleft(reversed([p for p in node.target.split(b"/") if p]))
                if not todo:  # a link to "/"
                    return cur, b".", cur, trailing
                continue
            if last:
                return cur, name, node, trailing
            if node is None:
                raise GuestError(errno.ENOENT)
            if node.mount:  # /proc: the kernel answers for absolute paths in it
                raise GuestError(errno.ENOENT)
            cur = node
        return cur, b".", cur, trailing  # "/" or "//"

    def _start(self, base: int, path: bytes) -> Inode:
        if not path:
            raise GuestError(errno.ENOENT)
        if len(path) >= PATH_MAX:
            raise GuestError(errno.ENAMETOOLONG)
        return self.root if path.startswith(b"/") else self._dir(base)

    def _child(self, cur: Inode, name: bytes) -> Inode | None:
        if name == b".":
            return cur
        if name == b"..":
            return self.inodes.get(cur.parent, self.root)
        return cur.children.get(name)

    def _lookup(self, base: int, path: bytes, follow: bool = True) -> Inode:
        _, _, node, trailing = self._resolve(base, path, follow)
        if node is None:
            raise GuestError(errno.ENOENT)
        if trailing and node.kind != DIR:
            raise GuestError(errno.ENOTDIR)
        return node

    def _path_of_dir(self, node: Inode) -> bytes:
        parts: list[bytes] = []
        while node is not self.root:
            if node.nlink == 0:
                raise GuestError(errno.ENOENT)
            parts.append(node.name)
            node = self.inodes[node.parent]
        return b"/" + b"/".join(reversed(parts))

    # -- the writable layer -------------------------------------------------------
    def _charge(self, delta: int) -> None:
        if delta > 0 and self.used + delta > self.size_limit:
            raise GuestError(errno.ENOSPC)
        self.used += delta

    def _writable(self, node: Inode) -> bytearray:
        """The node's bytes in the writable layer (copied up at first write)."""
        if not isinstance(node.data, bytearray):
            self._charge(len(node.data))
            node.data = bytearray(node.data)
        return node.data

    def _resize(self, node: Inode, size: int) -> None:
        data = self._writable(node)
        self._charge(size - len(data))
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))
        node.mtime = node.ctime = time.time_ns()

    def _forget(self, node: Inode) -> None:
        """Drop an inode nothing names or holds open any more."""
        if node.nlink == 0 and node.opens == 0:
            self.inodes.pop(node.ino, None)
            if isinstance(node.data, bytearray):
                self.used -= len(node.data)
            node.data = b""

    # -- the public operations (each under the lock) --------------------------------
    def open(self, base: int, path: bytes, flags: int, mode: int) -> Opened:
        """open(2): O_CREAT/O_EXCL/O_TRUNC/O_DIRECTORY/O_NOFOLLOW as Linux; ``mode`` after umask."""
        with self._lock:
            follow = not (flags & O_NOFOLLOW) and not (flags & O_CREAT and flags & O_EXCL)
            parent, name, node, trailing = self._resolve(base, path, follow)
            if node is None:
                node = self._create(parent, name, flags, mode, trailing)
            elif flags & O_CREAT and flags & O_EXCL:
                raise GuestError(errno.EEXIST)
            if node.kind == SYMLINK:
                raise GuestError(errno.ELOOP)  # O_NOFOLLOW on a symlink
            if trailing and node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            if flags & O_DIRECTORY and node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            acc = flags & O_ACCMODE
            if node.kind == DIR and (acc != O_RDONLY or flags & O_CREAT):
                raise GuestError(errno.EISDIR)
            if node.kind == CHR:
                return Opened(0, node.ino, CHR, node.device)
            if node.kind == SOCK:
                raise GuestError(errno.ENXIO)  # a socket is connected to, not opened
            if flags & O_TRUNC and acc != O_RDONLY and node.kind == FILE:
                self._resize(node, 0)
            where = self._path_of_dir(node if node.kind == DIR else parent)
            if node.kind != DIR and name not in (b".", b".."):
                where = where.rstrip(b"/") + b"/" + name
            return Opened(self._new_ofd(node, flags), node.ino, node.kind, path=where)

    def _create(self, parent: Inode, name: bytes, flags: int, mode: int, trailing: bool) -> Inode:
        if not flags & O_CREAT or parent.nlink == 0:
            raise GuestError(errno.ENOENT)
        if trailing:
            raise GuestError(errno.EISDIR)
        node = self._new(FILE, mode)
        node.data = bytearray()
        parent.children[name] = node
        parent.mtime = parent.ctime = node.ctime
        return node

    def _new_ofd(self, node: Inode, flags: int) -> int:
        ofd = OpenFile(self._next_ofd, node, flags & ~(O_CREAT | O_EXCL | O_TRUNC))
        self._next_ofd += 1
        self.ofds[ofd.id] = ofd
        node.opens += 1
        return ofd.id

    def _ofd(self, ofd: int) -> OpenFile:
        f = self.ofds.get(ofd)
        if f is None:
            raise GuestError(errno.EBADF)
        return f

    def hold(self, ofd: int) -> None:
        """One more VM holds ``ofd`` (a VM-clone fork handed it to a child)."""
        with self._lock:
            self._ofd(ofd).holders += 1

    def release(self, ofd: int) -> None:
        with self._lock:
            f = self.ofds.get(ofd)
            if f is None:
                return
            f.holders -= 1
            if f.holders == 0:
                del self.ofds[ofd]
                self._drop_flock(f.node.ino, ofd)
                self._carve(f.node.ino, -ofd, 0, OFFSET_END)  # its F_OFD_SETLK locks
                f.node.opens -= 1
                self._forget(f.node)

    def set_flags(self, ofd: int, flags: int) -> None:
        with self._lock:
            self._ofd(ofd).flags = flags

    def read(self, ofd: int, n: int, offset: int = -1) -> bytes:
        """read(2) at the shared offset, or pread64 at ``offset`` (>= 0)."""
        with self._lock:
            f = self._ofd(ofd)
            if f.node.kind == DIR:
                raise GuestError(errno.EISDIR)
            pos = f.offset if offset < 0 else offset
            data = bytes(f.node.data[pos : pos + n])
            if offset < 0:
                f.offset = pos + len(data)
            f.node.atime = time.time_ns()
            return data

    def write(self, ofd: int, data: bytes, offset: int = -1) -> int:
        """write(2) at the shared offset (the end with O_APPEND), or pwrite64 at ``offset``.

        Past the size limit only what fits is written; nothing fits: ENOSPC.
        """
        with self._lock:
            f = self._ofd(ofd)
            node = f.node
            pos = f.offset if offset < 0 else offset
            if f.flags & O_APPEND:
                pos = len(node.data)  # even for pwrite64, as Linux does
            buf = self._writable(node)
            room = self.size_limit - self.used
            if pos + len(data) - len(buf) > room:
                data = data[: max(0, len(buf) + room - pos)]
                if not data:
                    raise GuestError(errno.ENOSPC)
            self._charge(max(0, pos + len(data) - len(buf)))
            if pos > len(buf):
                buf.extend(bytes(pos - len(buf)))
            buf[pos : pos + len(data)] = data
            if offset < 0:
                f.offset = pos + len(data)
            node.mtime = node.ctime = time.time_ns()
            return len(data)

    def seek(self, ofd: int, offset: int, whence: int) -> int:
        with self._lock:
            f = self._ofd(ofd)
            if whence == SEEK_SET:
                pos = offset
            elif whence == SEEK_CUR:
                pos = f.offset + offset
            elif whence == SEEK_END:
                pos = (4096 if f.node.kind == DIR else len(f.node.data)) + offset
            else:
                raise GuestError(errno.EINVAL)
            if pos < 0:
                raise GuestError(errno.EINVAL)
            f.offset = pos
            if f.node.kind == DIR and pos == 0:
                f.listing = None  # rewinddir: a fresh listing
            return pos

    def getdents(self, ofd: int, size: int) -> bytes:
        """getdents64: linux_dirent64 records that fit in ``size`` bytes (EINVAL if none does)."""
        with self._lock:
            f = self._ofd(ofd)
            node = f.node
            if node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            if f.listing is None or f.offset == 0:
                parent = self.inodes.get(node.parent, self.root)
                f.listing = [(b".", node.ino, DT[DIR]), (b"..", parent.ino, DT[DIR])]
                f.listing += [(n, c.ino, DT[c.kind]) for n, c in node.children.items()]
            out, f.offset = pack_dirents(f.listing, f.offset, size)
            return out

    def fstat(self, ofd: int) -> Stat:
        with self._lock:
            return self._ofd(ofd).node.stat()

    def ftruncate(self, ofd: int, length: int) -> None:
        with self._lock:
            f = self._ofd(ofd)
            if f.node.kind != FILE or f.flags & O_ACCMODE == O_RDONLY:
                raise GuestError(errno.EINVAL)
            self._resize(f.node, length)

    def fchmod(self, ofd: int, mode: int) -> None:
        with self._lock:
            node = self._ofd(ofd).node
            node.mode, node.ctime = mode & 0o7777, time.time_ns()

    def contents(self, ofd: int, offset: int = 0, n: int = -1) -> bytes:
        """The file an ofd refers to, from ``offset`` (all of it, or ``n`` bytes): mmap."""
        with self._lock:
            f = self._ofd(ofd)
            if f.node.kind != FILE:
                raise GuestError(errno.EACCES)
            return _part(f.node.data, offset, n)

    def stat(self, base: int, path: bytes, follow: bool = True) -> Stat:
        with self._lock:
            return self._lookup(base, path, follow).stat()

    def exists(self, base: int, path: bytes, follow: bool = True) -> Stat:
        """access(2)/faccessat: root may do anything but execute without an x bit."""
        return self.stat(base, path, follow)

    def mkdir(self, base: int, path: bytes, mode: int) -> None:
        with self._lock:
            parent, name, node, _ = self._resolve(base, path, False)
            if node is not None:
                raise GuestError(errno.EEXIST)
            if parent.nlink == 0:
                raise GuestError(errno.ENOENT)
            self._mkdir_in(parent, name, mode)

    def mksock(self, base: int, path: bytes, mode: int) -> int:
        """bind(2) of an AF_UNIX socket to a path: a socket inode; EADDRINUSE if the
        name exists (even a dead socket's, as Linux).  Returns the inode number."""
        with self._lock:
            parent, name, node, trailing = self._resolve(base, path, False)
            if node is not None:
                raise GuestError(errno.EADDRINUSE)
            if parent.nlink == 0 or trailing:
                raise GuestError(errno.ENOENT)
            node = self._new(SOCK, mode)
            parent.children[name] = node
            parent.mtime = parent.ctime = node.ctime
            return node.ino

    def rmdir(self, base: int, path: bytes) -> None:
        with self._lock:
            parent, name, node, _ = self._resolve(base, path, False)
            if node is None:
                raise GuestError(errno.ENOENT)
            if node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            if name == b".":
                raise GuestError(errno.EINVAL)
            if node is self.root or name == b"..":
                raise GuestError(errno.EBUSY if node is self.root else errno.ENOTEMPTY)
            if node.mount:
                raise GuestError(errno.EBUSY)
            if node.children:
                raise GuestError(errno.ENOTEMPTY)
            del parent.children[name]
            parent.nlink -= 1
            parent.mtime = parent.ctime = time.time_ns()
            node.nlink = 0
            self._forget(node)

    def unlink(self, base: int, path: bytes) -> None:
        with self._lock:
            parent, name, node, trailing = self._resolve(base, path, False)
            if node is None:
                raise GuestError(errno.ENOENT)
            if node.kind == DIR:
                raise GuestError(errno.EISDIR)
            if trailing:
                raise GuestError(errno.ENOTDIR)
            del parent.children[name]
            node.nlink -= 1
            parent.mtime = parent.ctime = node.ctime = time.time_ns()
            self._forget(node)

    def link(self, old_base: int, old: bytes, new_base: int, new: bytes, follow: bool) -> None:
        with self._lock:
            node = self._lookup(old_base, old, follow)
            if node.kind == DIR:
                raise GuestError(errno.EPERM)
            parent, name, existing, trailing = self._resolve(new_base, new, False)
            if existing is not None:
                raise GuestError(errno.EEXIST)
            if trailing:
                raise GuestError(errno.ENOENT)
            parent.children[name] = node
            node.nlink += 1
            node.ctime = time.time_ns()

    def symlink(self, target: bytes, base: int, path: bytes) -> None:
        with self._lock:
            if not target:
                raise GuestError(errno.ENOENT)
            parent, name, node, trailing = self._resolve(base, path, False)
            if node is not None:
                raise GuestError(errno.EEXIST)
            if trailing:
                raise GuestError(errno.ENOENT)
            self._charge(len(target))
            link = self._new(SYMLINK, 0o777)
            link.target = target
            parent.children[name] = link

    def readlink(self, base: int, path: bytes) -> bytes:
        with self._lock:
            node = self._lookup(base, path, follow=False)
            if node.kind != SYMLINK:
                raise GuestError(errno.EINVAL)
            return node.target

    def rename(self, old_base: int, old: bytes, new_base: int, new: bytes) -> None:
        with self._lock:
            oparent, oname, node, otrail = self._resolve(old_base, old, False)
            if node is None:
                raise GuestError(errno.ENOENT)
            nparent, nname, target, ntrail = self._resolve(new_base, new, False)
            if oname in (b".", b"..") or nname in (b".", b".."):
                raise GuestError(errno.EBUSY if node is self.root else errno.EINVAL)
            if node.kind != DIR and (otrail or ntrail):
                raise GuestError(errno.ENOTDIR)
            if target is node:
                return
            self._check_rename(node, nparent, target)
            del oparent.children[oname]
            if target is not None:
                if target.kind == DIR:
                    nparent.nlink -= 1
                    target.nlink = 0
                else:
                    target.nlink -= 1
                self._forget(target)
            nparent.children[nname] = node
            if node.kind == DIR:
                oparent.nlink -= 1
                nparent.nlink += 1
                node.parent, node.name = nparent.ino, nname
            now = time.time_ns()
            oparent.mtime = oparent.ctime = nparent.mtime = nparent.ctime = node.ctime = now

    def _check_rename(self, node: Inode, nparent: Inode, target: Inode | None) -> None:
        if node.kind == DIR:
            p = nparent  # a directory cannot move under itself
            while p is not self.root:
                if p is node:
                    raise GuestError(errno.EINVAL)
                p = self.inodes[p.parent]
        if target is None:
            return
        if node.kind == DIR and target.kind != DIR:
            raise GuestError(errno.ENOTDIR)
        if node.kind != DIR and target.kind == DIR:
            raise GuestError(errno.EISDIR)
        if target.kind == DIR and target.children:
            raise GuestError(errno.ENOTEMPTY)
        if target.mount:
            raise GuestError(errno.EBUSY)

    def chmod(self, base: int, path: bytes, mode: int, follow: bool = True) -> None:
        with self._lock:
            node = self._lookup(base, path, follow)
            if node.kind == SYMLINK:
                raise GuestError(errno.EOPNOTSUPP)
            node.mode, node.ctime = mode & 0o7777, time.time_ns()

    def truncate(self, base: int, path: bytes, length: int) -> None:
        with self._lock:
            node = self._lookup(base, path)
            if node.kind == DIR:
                raise GuestError(errno.EISDIR)
            if node.kind != FILE:
                raise GuestError(errno.EINVAL)
            self._resize(node, length)

    def utimens(self, base: int, path: bytes, atime: int, mtime: int, follow: bool) -> None:
        """utimensat: nanosecond times, -1 to keep one (UTIME_OMIT)."""
        with self._lock:
            self._set_times(self._lookup(base, path, follow), atime, mtime)

    def futimens(self, ofd: int, atime: int, mtime: int) -> None:
        with self._lock:
            self._set_times(self._ofd(ofd).node, atime, mtime)

    @staticmethod
    def _set_times(node: Inode, atime: int, mtime: int) -> None:
        if atime >= 0:
            node.atime = atime
        if mtime >= 0:
            node.mtime = mtime
        node.ctime = time.time_ns()

    def chdir(self, base: int, path: bytes) -> int:
        """The inode number of the directory ``path`` names (chdir, fchdir's check)."""
        with self._lock:
            node = self._lookup(base, path)
            if node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            return node.ino

    def dir_of(self, ofd: int) -> int:
        with self._lock:
            node = self._ofd(ofd).node
            if node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            return node.ino

    def getcwd(self, ino: int) -> bytes:
        with self._lock:
            node = self.inodes.get(ino)
            if node is None:
                raise GuestError(errno.ENOENT)
            return self._path_of_dir(node)

    # -- owners, space, advisory locks ------------------------------------------------
    def chown(self, base: int, path: bytes, uid: int, gid: int, follow: bool = True) -> None:
        """chown/lchown/fchownat as root: recorded; NO_ID keeps one."""
        with self._lock:
            self._set_owner(self._lookup(base, path, follow), uid, gid)

    def fchown(self, ofd: int, uid: int, gid: int) -> None:
        with self._lock:
            self._set_owner(self._ofd(ofd).node, uid, gid)

    @staticmethod
    def _set_owner(node: Inode, uid: int, gid: int) -> None:
        if uid != NO_ID:
            node.uid = uid
        if gid != NO_ID:
            node.gid = gid
        if node.kind not in (DIR, SYMLINK):  # Linux drops set-id bits, even for root
            node.mode &= ~S_ISUID
            if node.mode & S_IXGRP:
                node.mode &= ~S_ISGID
        node.ctime = time.time_ns()

    def statfs(self) -> tuple[int, int, int, int]:
        """(blocks, free blocks, inodes, free inodes) of the writable layer, 4 KiB blocks."""
        with self._lock:
            blocks = self.size_limit // 4096
            free = max(0, self.size_limit - self.used) // 4096
            files = max(len(self.inodes), blocks)
            return blocks, free, files, files - len(self.inodes)

    def flock(self, ofd: int, op: int) -> None:
        """flock(2) on an open file description: EAGAIN (EWOULDBLOCK) on conflict; the
        caller waits and retries unless LOCK_NB.  A conversion drops the old lock first,
        as Linux does."""
        with self._lock:
            f = self._ofd(ofd)
            if op & LOCK_MAND:
                return  # Linux 5.15 on: accepted and ignored (with a warning)
            kind = op & ~LOCK_NB
            if kind not in (LOCK_SH, LOCK_EX, LOCK_UN):
                raise GuestError(errno.EINVAL)
            held = self.flocks.setdefault(f.node.ino, {})
            if kind == LOCK_UN or held.get(ofd) != kind:
                self._drop_flock(f.node.ino, ofd)
            if kind == LOCK_UN:
                return
            others = [t for o, t in held.items() if o != ofd]
            if LOCK_EX in others or (kind == LOCK_EX and others):
                raise GuestError(errno.EAGAIN)
            self.flocks.setdefault(f.node.ino, {})[ofd] = kind

    def _drop_flock(self, ino: int, ofd: int) -> None:
        held = self.flocks.get(ino)
        if held is not None:
            held.pop(ofd, None)
            if not held:
                del self.flocks[ino]

    def lock(
        self, ofd: int, owner: int, get: bool, ltype: int, whence: int, start: int, length: int
    ) -> tuple[int, int, int, int]:
        """fcntl's record locks (F_GETLK/F_SETLK, F_OFD_*): ``owner`` a pid, or -ofd.

        Returns (type, start, len, owner) of the first conflicting lock (F_UNLCK if
        none); a set that conflicts is EAGAIN (the caller waits for F_SETLKW).
        """
        with self._lock:
            f = self._ofd(ofd)
            if ltype not in (F_RDLCK, F_WRLCK, F_UNLCK) or (get and ltype == F_UNLCK):
                raise GuestError(errno.EINVAL)
            acc = f.flags & O_ACCMODE
            if not get and (
                (ltype == F_RDLCK and acc == O_WRONLY) or (ltype == F_WRLCK and acc == O_RDONLY)
            ):
                raise GuestError(errno.EBADF)
            s, e = self._range(f, whence, start, length)
            ino = f.node.ino
            for held in self.locks.get(ino, []):
                if (
                    held.owner != owner
                    and held.start < e
                    and s < held.end
                    and F_WRLCK in (held.type, ltype)
                    and ltype != F_UNLCK
                ):
                    if not get:
                        raise GuestError(errno.EAGAIN)
                    n = 0 if held.end == OFFSET_END else held.end - held.start
                    return held.type, held.start, n, held.owner
            if not get:
                self._carve(ino, owner, s, e)
                if ltype != F_UNLCK:
                    self._add_lock(ino, Lock(owner, s, e, ltype))
            return F_UNLCK, s, 0 if e == OFFSET_END else e - s, 0

    @staticmethod
    def _range(f: OpenFile, whence: int, start: int, length: int) -> tuple[int, int]:
        if whence == SEEK_SET:
            base = 0
        elif whence == SEEK_CUR:
            base = f.offset
        elif whence == SEEK_END:
            base = len(f.node.data)
        else:
            raise GuestError(errno.EINVAL)
        s = base + start
        if length < 0:
            s, e = s + length, s
        else:
            e = OFFSET_END if length == 0 else s + length
        if s < 0 or e > OFFSET_END:
            raise GuestError(errno.EINVAL)
        return s, e

    def _carve(self, ino: int, owner: int, s: int, e: int) -> None:
        """Take [s, e) out of ``owner``'s locks on ``ino`` (split what straddles it)."""
        held = self.locks.get(ino)
        if not held:
            return
        out: list[Lock] = []
        for lk in held:
            if lk.owner != owner or lk.end <= s or lk.start >= e:
                out.append(lk)
                continue
            if lk.start < s:
                out.append(lk._replace(end=s))
            if lk.end > e:
                out.append(lk._replace(start=e))
        if out:
            self.locks[ino] = out
        else:
            del self.locks[ino]

    def _add_lock(self, ino: int, new: Lock) -> None:
        keep: list[Lock] = []
        for lk in self.locks.get(ino, []):  # merge with the owner's touching locks of a type
            if (
                lk.owner == new.owner
                and lk.type == new.type
                and lk.end >= new.start
                and lk.start <= new.end
            ):
                new = new._replace(start=min(lk.start, new.start), end=max(lk.end, new.end))
            else:
                keep.append(lk)
        keep.append(new)
        self.locks[ino] = keep

    def unlock_owner(self, owner: int, ino: int = 0) -> None:
        """Drop ``owner``'s record locks on ``ino`` (every inode if 0): a process closed
        an fd of the file, or ended (POSIX locks are the process's, as Linux)."""
        with self._lock:
            for i in [ino] if ino else list(self.locks):
                self._carve(i, owner, 0, OFFSET_END)

    def open_exec(
        self, base: int, path: bytes, follow: bool = True, offset: int = 0, n: int = -1
    ) -> tuple[bytes, bytes]:
        """(contents, resolved absolute path) of a file execve may run.

        Not a regular file, or no x bit for anyone: EACCES, as Linux.
        ``offset``/``n`` take a part of the contents (a remote caller's chunks).
        """
        with self._lock:
            parent, name, node, trailing = self._resolve(base, path, follow)
            if node is None:
                raise GuestError(errno.ENOENT)
            if node.kind == SYMLINK:
                raise GuestError(errno.ELOOP)
            if trailing and node.kind != DIR:
                raise GuestError(errno.ENOTDIR)
            if node.kind != FILE or not node.mode & 0o111:
                raise GuestError(errno.EACCES)
            where = self._path_of_dir(parent)
            full = where.rstrip(b"/") + b"/" + name
            return _part(node.data, offset, n), full

    def exec_part(self, base: int, path: bytes, follow: bool, offset: int, n: int) -> bytes:
        """A part of what ``open_exec`` returns (a remote caller's chunks)."""
        return self.open_exec(base, path, follow, offset, n)[0]

    def exec_ofd(self, ofd: int, offset: int = 0, n: int = -1) -> bytes:
        """The contents of an open file execveat(fd, "", AT_EMPTY_PATH) may run."""
        with self._lock:
            node = self._ofd(ofd).node
            if node.kind != FILE or not node.mode & 0o111:
                raise GuestError(errno.EACCES)
            return _part(node.data, offset, n)


def pack_dirents(listing: list[tuple[bytes, int, int]], start: int, size: int) -> tuple[bytes, int]:
    """linux_dirent64 records of ``listing[start:]`` that fit in ``size`` bytes, and the
    next start (EINVAL if not even one fits, as Linux)."""
    out = bytearray()
    pos = start
    while pos < len(listing):
        name, ino, dtype = listing[pos]
        reclen = (DIRENT.size + len(name) + 1 + 7) & ~7
        if len(out) + reclen > size:
            if not out:
                raise GuestError(errno.EINVAL)
            break
        rec = DIRENT.pack(ino, pos + 1, reclen, dtype) + name
        out += rec + bytes(reclen - len(rec))
        pos += 1
    return bytes(out), pos


def _part(data: bytes | bytearray, offset: int, n: int) -> bytes:
    return bytes(data[offset:] if n < 0 else data[offset : offset + n])

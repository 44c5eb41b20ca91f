"""Path syscalls: open, the stat family, directories, links, cwd, modes, times.

Each resolves its path through ``k.fs`` (``rump/vfs.py``): relative to the
process's cwd or a dirfd, in the instance's one file system.  Absolute paths
into /proc are answered by ``rump/procfs.py``; /dev nodes are inodes of the
tree whose open makes the kernel's device files.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump import procfs
from tender_service.rump.files import (
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_EXCL,
    O_LARGEFILE,
    O_NOCTTY,
    O_NONBLOCK,
    O_TRUNC,
    S_IFCHR,
    S_IFIFO,
    ConsoleFile,
    File,
    FsFile,
    NullFile,
    ZeroFile,
)
from tender_service.rump.fs import DIR, Stat
from tender_service.rump.syscalls.abi import i32, i64
from tender_service.rump.vfs import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_FOLLOW,
    AT_SYMLINK_NOFOLLOW,
)

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

STAT = struct.Struct("<QQQIIIIQqqqqqqqqq24x")  # struct stat, x86-64 (144 bytes)
STATX = struct.Struct("<IIQIIIHHQQQQ" + "qIi" * 4 + "IIII")  # struct statx up to stx_dev_minor
STATX_SIZE = 256
STATX_BASIC_STATS = 0x7FF
STATFS = struct.Struct("<7Q2i7Q")  # struct statfs, x86-64 (120 bytes)
TMPFS_MAGIC, PROC_SUPER_MAGIC = 0x01021994, 0x9FA0
ST_VALID, ST_NOSUID, ST_NODEV = 0x20, 0x2, 0x4
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
X_OK = 1
CWD = AT_FDCWD & 0xFFFF_FFFF


def _path(k: Kernel, addr: int) -> bytes:
    return bytes(k.mem.cstring(addr))


def _proc(k: Kernel, lwp: Lwp, dirfd: int, path: bytes) -> list[bytes] | None:
    """The /proc components of ``path`` if it names something in /proc."""
    return procfs.proc_parts(path)  # absolute paths only (a cwd in /proc sees it empty)


# -- open ------------------------------------------------------------------------------
def _device(k: Kernel, name: str, acc: int) -> File:
    if name == "null":
        return NullFile(acc)
    if name in ("zero", "urandom", "random"):
        return ZeroFile(acc, random=name != "zero")
    if name == "tty" and k.console.tty:
        return ConsoleFile(acc, 1)
    raise GuestError(errno.ENXIO)


def do_open(k: Kernel, lwp: Lwp, dirfd: int, path: bytes, flags: int, mode: int) -> int:
    proc = lwp.proc
    acc = flags & O_ACCMODE
    parts = _proc(k, lwp, dirfd, path)
    f: File
    if parts is not None:
        node = procfs.lookup(k, lwp, parts)
        if node.fd >= 0 and node.owner is not None:  # /proc/PID/fd/N: the file itself
            return proc.fds.install(node.owner.fds.get(node.fd), cloexec=bool(flags & O_CLOEXEC))
        if node.kind == "symlink":  # /proc/PID/exe: the program's file, if the tree has it
            return do_open(k, lwp, AT_FDCWD, node.data, flags, mode)
        f = procfs.ProcFile(node, flags & (O_ACCMODE | O_NONBLOCK) | O_LARGEFILE)
    else:
        fs = k.fs
        opened = fs.tree.open(fs.base(proc, dirfd, path), path, flags, mode & ~proc.umask & 0o7777)
        if opened.ofd == 0:
            f = _device(k, opened.device, acc)
            f.flags |= flags & (O_NONBLOCK | O_APPEND)
        else:
            keep = flags & ~(O_CREAT | O_CLOEXEC | O_EXCL | O_TRUNC | O_NOCTTY) | O_LARGEFILE
            f = FsFile(fs.tree, opened.ofd, opened.ino, opened.kind == DIR, keep, opened.path)
    try:
        return proc.fds.install(f, cloexec=bool(flags & O_CLOEXEC))
    except GuestError:
        f.release(k)  # EMFILE: the open file description dies unused
        raise


def sys_open(k: Kernel, lwp: Lwp, path: int, flags: int, mode: int) -> int:
    return do_open(k, lwp, AT_FDCWD, _path(k, path), i32(flags), mode)


def sys_creat(k: Kernel, lwp: Lwp, path: int, mode: int) -> int:
    return do_open(k, lwp, AT_FDCWD, _path(k, path), O_CREAT | O_TRUNC | 1, mode)


def sys_openat(k: Kernel, lwp: Lwp, dirfd: int, path: int, flags: int, mode: int) -> int:
    return do_open(k, lwp, dirfd, _path(k, path), i32(flags), mode)


# -- the stat family -------------------------------------------------------------------
def file_stat(k: Kernel, f: File) -> Stat:
    """A Stat for any open file (tree files ask the tree)."""
    if isinstance(f, FsFile):
        return k.fs.tree.fstat(f.ofd)
    if isinstance(f, procfs.ProcFile):
        return Stat(f.node.ino, f.node.mode, 1, 0, len(f.node.data), 0, 0, 0)
    if isinstance(f, ConsoleFile):
        mode = (S_IFCHR if k.console.tty else S_IFIFO) | 0o620
        rdev = 0x8800 if k.console.tty else 0
    elif f.kind == "pipe":
        mode, rdev = S_IFIFO | 0o600, 0
    else:
        mode, rdev = S_IFCHR | 0o666, {"null": 0x103, "zero": 0x105}.get(f.kind, 0x109)
    return Stat(id(f) & 0xFFFF_FFFF, mode, 1, rdev, 0, 0, 0, 0, dev=1)


def path_stat(k: Kernel, lwp: Lwp, dirfd: int, path: bytes, flags: int) -> Stat:
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x800 | 0x6000):
        raise GuestError(errno.EINVAL)
    if not path and flags & AT_EMPTY_PATH:
        if i32(dirfd) == AT_FDCWD:
            return k.fs.tree.stat(lwp.proc.cwd, b".")
        return file_stat(k, lwp.proc.fds.get(i32(dirfd)))
    follow = not flags & AT_SYMLINK_NOFOLLOW
    parts = _proc(k, lwp, dirfd, path)
    if parts is not None:
        node = procfs.lookup(k, lwp, parts, follow)
        if node.kind == "symlink" and follow:
            return (
                file_stat(k, node.owner.fds.get(node.fd)) if node.owner else _exe_stat(k, lwp, node)
            )
        return Stat(node.ino, node.mode, 1, 0, len(node.data), 0, 0, 0)
    return k.fs.tree.stat(k.fs.base(lwp.proc, dirfd, path), path, follow)


def _exe_stat(k: Kernel, lwp: Lwp, node: procfs.ProcNode) -> Stat:
    return k.fs.tree.stat(lwp.proc.cwd, node.data if node.data.startswith(b"/") else b"/")


def _ts(ns: int) -> tuple[int, int]:
    return ns // 1_000_000_000, ns % 1_000_000_000


def pack_stat(st: Stat) -> bytes:
    return STAT.pack(
        st.dev, st.ino, st.nlink, st.mode, st.uid, st.gid, 0, st.rdev, st.size, 4096, st.blocks,
        *_ts(st.atime), *_ts(st.mtime), *_ts(st.ctime),
    )  # fmt: skip


def sys_fstat(k: Kernel, lwp: Lwp, fd: int, buf: int) -> int:
    k.mem.write(buf, pack_stat(file_stat(k, lwp.proc.fds.get(i32(fd)))))
    return 0


def sys_stat(k: Kernel, lwp: Lwp, path: int, buf: int) -> int:
    k.mem.write(buf, pack_stat(path_stat(k, lwp, AT_FDCWD, _path(k, path), 0)))
    return 0


def sys_lstat(k: Kernel, lwp: Lwp, path: int, buf: int) -> int:
    st = path_stat(k, lwp, AT_FDCWD, _path(k, path), AT_SYMLINK_NOFOLLOW)
    k.mem.write(buf, pack_stat(st))
    return 0


def sys_newfstatat(k: Kernel, lwp: Lwp, dirfd: int, path: int, buf: int, flags: int) -> int:
    k.mem.write(buf, pack_stat(path_stat(k, lwp, dirfd, _path(k, path), i32(flags))))
    return 0


def sys_statx(k: Kernel, lwp: Lwp, dirfd: int, path: int, flags: int, mask: int, buf: int) -> int:
    st = path_stat(k, lwp, dirfd, _path(k, path), i32(flags))
    out = STATX.pack(
        STATX_BASIC_STATS, 4096, 0, st.nlink, st.uid, st.gid, st.mode & 0xFFFF, 0, st.ino, st.size,
        st.blocks, 0,
        *_ts(st.atime), 0, 0, 0, 0, *_ts(st.ctime), 0, *_ts(st.mtime), 0,
        st.rdev >> 8, st.rdev & 0xFF, 0, st.dev,
    )  # fmt: skip
    k.mem.write(buf, out + bytes(STATX_SIZE - len(out)))
    return 0


# -- access ----------------------------------------------------------------------------
def do_access(k: Kernel, lwp: Lwp, dirfd: int, path: bytes, mode: int, flags: int) -> int:
    if mode & ~7 or flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x200):
        raise GuestError(errno.EINVAL)
    st = path_stat(k, lwp, dirfd, path, flags & (AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH))
    if mode & X_OK and st.mode & 0o170000 != 0o040000 and not st.mode & 0o111:
        raise GuestError(errno.EACCES)  # root may do anything but this
    return 0


def sys_access(k: Kernel, lwp: Lwp, path: int, mode: int) -> int:
    return do_access(k, lwp, AT_FDCWD, _path(k, path), i32(mode), 0)


def sys_faccessat(k: Kernel, lwp: Lwp, dirfd: int, path: int, mode: int) -> int:
    return do_access(k, lwp, dirfd, _path(k, path), i32(mode), 0)


def sys_faccessat2(k: Kernel, lwp: Lwp, dirfd: int, path: int, mode: int, flags: int) -> int:
    return do_access(k, lwp, dirfd, _path(k, path), i32(mode), i32(flags))


# -- directories, links, renames ---------------------------------------------------------
def _at(k: Kernel, lwp: Lwp, dirfd: int, path: bytes) -> tuple[int, bytes]:
    if _proc(k, lwp, dirfd, path) is not None:
        raise GuestError(errno.EACCES if path.rstrip(b"/") == b"/proc" else errno.ENOENT)
    return k.fs.base(lwp.proc, dirfd, path), path


def sys_mkdir(k: Kernel, lwp: Lwp, path: int, mode: int) -> int:
    return sys_mkdirat(k, lwp, CWD, path, mode)


def sys_mkdirat(k: Kernel, lwp: Lwp, dirfd: int, path: int, mode: int) -> int:
    base, name = _at(k, lwp, dirfd, _path(k, path))
    k.fs.tree.mkdir(base, name, mode & ~lwp.proc.umask & 0o7777)
    return 0


def sys_rmdir(k: Kernel, lwp: Lwp, path: int) -> int:
    k.fs.tree.rmdir(*_at(k, lwp, AT_FDCWD, _path(k, path)))
    return 0


def sys_unlink(k: Kernel, lwp: Lwp, path: int) -> int:
    k.fs.tree.unlink(*_at(k, lwp, AT_FDCWD, _path(k, path)))
    return 0


def sys_unlinkat(k: Kernel, lwp: Lwp, dirfd: int, path: int, flags: int) -> int:
    flags = i32(flags)
    if flags & ~AT_REMOVEDIR:
        raise GuestError(errno.EINVAL)
    base, name = _at(k, lwp, dirfd, _path(k, path))
    if flags & AT_REMOVEDIR:
        k.fs.tree.rmdir(base, name)
    else:
        k.fs.tree.unlink(base, name)
    return 0


def sys_rename(k: Kernel, lwp: Lwp, old: int, new: int) -> int:
    return sys_renameat2(k, lwp, CWD, old, CWD, new, 0)


def sys_renameat(k: Kernel, lwp: Lwp, olddir: int, old: int, newdir: int, new: int) -> int:
    return sys_renameat2(k, lwp, olddir, old, newdir, new, 0)


def sys_renameat2(
    k: Kernel, lwp: Lwp, olddir: int, old: int, newdir: int, new: int, flags: int
) -> int:
    if i32(flags):
        raise GuestError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE/WHITEOUT not supported
    ob, op = _at(k, lwp, olddir, _path(k, old))
    nb, np = _at(k, lwp, newdir, _path(k, new))
    k.fs.tree.rename(ob, op, nb, np)
    return 0


def sys_link(k: Kernel, lwp: Lwp, old: int, new: int) -> int:
    return sys_linkat(k, lwp, CWD, old, CWD, new, 0)


def sys_linkat(
    k: Kernel, lwp: Lwp, olddir: int, old: int, newdir: int, new: int, flags: int
) -> int:
    flags = i32(flags)
    if flags & ~(AT_SYMLINK_FOLLOW | AT_EMPTY_PATH):
        raise GuestError(errno.EINVAL)
    ob, op = _at(k, lwp, olddir, _path(k, old))
    nb, np = _at(k, lwp, newdir, _path(k, new))
    k.fs.tree.link(ob, op, nb, np, bool(flags & AT_SYMLINK_FOLLOW))
    return 0


def sys_symlink(k: Kernel, lwp: Lwp, target: int, path: int) -> int:
    return sys_symlinkat(k, lwp, target, CWD, path)


def sys_symlinkat(k: Kernel, lwp: Lwp, target: int, dirfd: int, path: int) -> int:
    tgt = _path(k, target)
    k.fs.tree.symlink(tgt, *_at(k, lwp, dirfd, _path(k, path)))
    return 0


def sys_readlink(k: Kernel, lwp: Lwp, path: int, buf: int, size: int) -> int:
    return sys_readlinkat(k, lwp, CWD, path, buf, size)


def sys_readlinkat(k: Kernel, lwp: Lwp, dirfd: int, path: int, buf: int, size: int) -> int:
    size = i32(size)
    if size <= 0:
        raise GuestError(errno.EINVAL)
    name = _path(k, path)
    parts = _proc(k, lwp, dirfd, name)
    if parts is not None:
        node = procfs.lookup(k, lwp, parts, follow=False)
        if node.kind != "symlink":
            raise GuestError(errno.EINVAL)
        target = node.data
    else:
        target = k.fs.tree.readlink(k.fs.base(lwp.proc, dirfd, name), name)
    target = target[:size]
    k.mem.write(buf, target)
    return len(target)


# -- cwd, umask, modes, sizes, times -------------------------------------------------------
def sys_chdir(k: Kernel, lwp: Lwp, path: int) -> int:
    name = _path(k, path)
    lwp.proc.cwd = k.fs.tree.chdir(*_at(k, lwp, AT_FDCWD, name))
    return 0


def sys_fchdir(k: Kernel, lwp: Lwp, fd: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not isinstance(f, FsFile) or not f.is_dir:
        raise GuestError(errno.ENOTDIR)
    lwp.proc.cwd = f.ino
    return 0


def sys_getcwd(k: Kernel, lwp: Lwp, buf: int, size: int) -> int:
    path = k.fs.tree.getcwd(lwp.proc.cwd) + b"\0"
    if size < len(path):
        raise GuestError(errno.ERANGE)
    k.mem.write(buf, path)
    return len(path)


def sys_umask(k: Kernel, lwp: Lwp, mask: int) -> int:
    old, lwp.proc.umask = lwp.proc.umask, mask & 0o777
    return old


def sys_chmod(k: Kernel, lwp: Lwp, path: int, mode: int) -> int:
    return sys_fchmodat(k, lwp, CWD, path, mode)


def sys_fchmodat(k: Kernel, lwp: Lwp, dirfd: int, path: int, mode: int) -> int:
    k.fs.tree.chmod(*_at(k, lwp, dirfd, _path(k, path)), mode & 0o7777)
    return 0


def sys_fchmod(k: Kernel, lwp: Lwp, fd: int, mode: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not isinstance(f, FsFile):
        return 0  # a pipe or device: Linux changes its inode's mode; ours have none to keep
    k.fs.tree.fchmod(f.ofd, mode & 0o7777)
    return 0


def sys_truncate(k: Kernel, lwp: Lwp, path: int, length: int) -> int:
    if i64(length) < 0:
        raise GuestError(errno.EINVAL)
    k.fs.tree.truncate(*_at(k, lwp, AT_FDCWD, _path(k, path)), i64(length))
    return 0


def sys_ftruncate(k: Kernel, lwp: Lwp, fd: int, length: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if not isinstance(f, FsFile) or f.is_dir or i64(length) < 0:
        raise GuestError(errno.EINVAL)
    k.fs.tree.ftruncate(f.ofd, i64(length))
    return 0


def _times(k: Kernel, times: int) -> tuple[int, int]:
    now = time.time_ns()
    if not times:
        return now, now
    out = []
    for i in range(2):
        sec, nsec = struct.unpack("<qq", k.mem.read(times + 16 * i, 16))
        if nsec == UTIME_NOW:
            out.append(now)
        elif nsec == UTIME_OMIT:
            out.append(-1)
        elif not 0 <= nsec < 1_000_000_000:
            raise GuestError(errno.EINVAL)
        else:
            out.append(sec * 1_000_000_000 + nsec)
    return out[0], out[1]


def sys_utimensat(k: Kernel, lwp: Lwp, dirfd: int, path: int, times: int, flags: int) -> int:
    flags = i32(flags)
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise GuestError(errno.EINVAL)
    atime, mtime = _times(k, times)
    name = _path(k, path) if path else b""
    if not name and (not path or flags & AT_EMPTY_PATH):  # futimens(fd)
        f = lwp.proc.fds.get(i32(dirfd))
        if isinstance(f, FsFile):
            k.fs.tree.futimens(f.ofd, atime, mtime)
        return 0
    base, name = _at(k, lwp, dirfd, name)
    k.fs.tree.utimens(base, name, atime, mtime, not flags & AT_SYMLINK_NOFOLLOW)
    return 0


# -- owners, file system figures -----------------------------------------------------------
def _chown(k: Kernel, lwp: Lwp, dirfd: int, path: int, uid: int, gid: int, flags: int) -> int:
    """chown as root (what the guest is): recorded, as Linux lets root do."""
    flags = i32(flags)
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise GuestError(errno.EINVAL)
    uid, gid = uid & 0xFFFF_FFFF, gid & 0xFFFF_FFFF
    name = _path(k, path)
    if not name and flags & AT_EMPTY_PATH:
        return sys_fchown(k, lwp, dirfd, uid, gid)
    if _proc(k, lwp, dirfd, name) is not None:
        raise GuestError(errno.EPERM)  # /proc's files belong to their processes
    base = k.fs.base(lwp.proc, dirfd, name)
    k.fs.tree.chown(base, name, uid, gid, not flags & AT_SYMLINK_NOFOLLOW)
    return 0


def sys_chown(k: Kernel, lwp: Lwp, path: int, uid: int, gid: int) -> int:
    return _chown(k, lwp, CWD, path, uid, gid, 0)


def sys_lchown(k: Kernel, lwp: Lwp, path: int, uid: int, gid: int) -> int:
    return _chown(k, lwp, CWD, path, uid, gid, AT_SYMLINK_NOFOLLOW)


def sys_fchownat(k: Kernel, lwp: Lwp, dirfd: int, path: int, uid: int, gid: int, flags: int) -> int:
    return _chown(k, lwp, dirfd, path, uid, gid, flags)


def sys_fchown(k: Kernel, lwp: Lwp, fd: int, uid: int, gid: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    if isinstance(f, FsFile):
        k.fs.tree.fchown(f.ofd, uid & 0xFFFF_FFFF, gid & 0xFFFF_FFFF)
    return 0  # a pipe or device: Linux changes its inode; ours keep none


def _pack_statfs(k: Kernel, proc: bool) -> bytes:
    if proc:
        return STATFS.pack(
            PROC_SUPER_MAGIC,
            4096,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            255,
            4096,
            ST_VALID | ST_NOSUID | ST_NODEV,
            0,
            0,
            0,
            0,
        )
    blocks, free, files, ffree = k.fs.tree.statfs()
    return STATFS.pack(
        TMPFS_MAGIC, 4096, blocks, free, free, files, ffree, 0, 0, 255, 4096,
        ST_VALID, 0, 0, 0, 0,
    )  # fmt: skip


def sys_statfs(k: Kernel, lwp: Lwp, path: int, buf: int) -> int:
    """One tmpfs (the instance's tree), and /proc."""
    name = _path(k, path)
    parts = _proc(k, lwp, CWD, name)
    path_stat(k, lwp, AT_FDCWD, name, 0)  # ENOENT, ENOTDIR, ELOOP as for stat
    k.mem.write(buf, _pack_statfs(k, parts is not None))
    return 0


def sys_fstatfs(k: Kernel, lwp: Lwp, fd: int, buf: int) -> int:
    f = lwp.proc.fds.get(i32(fd))
    k.mem.write(buf, _pack_statfs(k, isinstance(f, procfs.ProcFile)))
    return 0

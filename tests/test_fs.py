"""The instance's file system (rump/fs.py) and the kernel's view of it (rump/vfs.py).

Path resolution as Linux walks it, the image's tree as a read-only lower layer
with a size-limited writable layer on top, and ``open_exec`` (Contract 2).
"""

from __future__ import annotations

import errno

import pytest

from tender_service.machine.errors import GuestError
from tender_service.machine.rootfs import FsEntry, RootFs
from tender_service.rump.fdtable import FdTable
from tender_service.rump.files import FsFile, NullFile
from tender_service.rump.fs import (
    O_APPEND,
    O_CREAT,
    O_DIRECTORY,
    O_EXCL,
    O_NOFOLLOW,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
    ROOT_INO,
    FileSystem,
)
from tender_service.rump.process import Process
from tender_service.rump.vfs import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, Vfs

ELF = b"\x7fELF" + bytes(60)


def image() -> RootFs:
    return RootFs(
        entries=(
            FsEntry("/bin", "dir", 0o755),
            FsEntry("/bin/sh", "file", 0o755, data=ELF),
            FsEntry("/bin/cat", "symlink", 0o777, target="sh"),
            FsEntry("/etc", "dir", 0o755),
            FsEntry("/etc/motd", "file", 0o644, data=b"hello\n"),
            FsEntry("/loop", "symlink", 0o777, target="/loop"),
            FsEntry("/a", "symlink", 0o777, target="b"),
            FsEntry("/b", "symlink", 0o777, target="a"),
        ),
        programs=("/bin/sh",),
    )


def proc(fs: Vfs) -> Process:
    return Process(pid=2, ppid=1, pgid=2, sid=2, fds=FdTable())


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(GuestError) as e:
        fn(*args, **kw)
    return e.value.errno


def test_an_empty_tree_has_tmp_dev_and_proc() -> None:
    fs = FileSystem()
    for d in (b"/", b"/tmp", b"/dev", b"/proc"):
        assert fs.stat(ROOT_INO, d).mode & 0o170000 == 0o040000
    assert fs.stat(ROOT_INO, b"/tmp").mode & 0o7777 == 0o1777
    assert fs.open(ROOT_INO, b"/dev/null", O_RDWR, 0).device == "null"


def test_resolution_errors_as_linux() -> None:
    fs = FileSystem(image())
    assert errno_of(fs.stat, ROOT_INO, b"/nope") == errno.ENOENT
    assert errno_of(fs.stat, ROOT_INO, b"") == errno.ENOENT
    assert errno_of(fs.stat, ROOT_INO, b"/etc/motd/x") == errno.ENOTDIR
    assert errno_of(fs.stat, ROOT_INO, b"/etc/motd/") == errno.ENOTDIR
    assert errno_of(fs.stat, ROOT_INO, b"/loop") == errno.ELOOP
    assert errno_of(fs.stat, ROOT_INO, b"/a/x") == errno.ELOOP
    assert errno_of(fs.stat, ROOT_INO, b"/" + b"x" * 256) == errno.ENAMETOOLONG
    assert errno_of(fs.stat, ROOT_INO, b"a/" * 10_000) == errno.ENAMETOOLONG
    # lstat does not follow the last link; "." and ".." walk as Linux
    assert fs.stat(ROOT_INO, b"/loop", follow=False).mode & 0o170000 == 0o120000
    assert fs.stat(ROOT_INO, b"//etc/./../etc/motd").size == 6
    assert fs.stat(ROOT_INO, b"/..").ino == ROOT_INO


def test_forty_links_resolve_and_forty_one_are_eloop() -> None:
    fs = FileSystem()
    fs.mkdir(ROOT_INO, b"/tmp/d", 0o755)
    fs.open(ROOT_INO, b"/tmp/d/l0", O_CREAT | O_WRONLY, 0o644)
    for i in range(1, 42):
        fs.symlink(b"l%d" % (i - 1), ROOT_INO, b"/tmp/d/l%d" % i)
    assert fs.stat(ROOT_INO, b"/tmp/d/l40").size == 0  # 40 links followed
    assert errno_of(fs.stat, ROOT_INO, b"/tmp/d/l41") == errno.ELOOP


def test_open_flags() -> None:
    fs = FileSystem(image())
    assert errno_of(fs.open, ROOT_INO, b"/tmp/f", O_RDONLY, 0) == errno.ENOENT
    o = fs.open(ROOT_INO, b"/tmp/f", O_CREAT | O_EXCL | O_RDWR, 0o600)
    assert fs.write(o.ofd, b"abc") == 3
    assert errno_of(fs.open, ROOT_INO, b"/tmp/f", O_CREAT | O_EXCL | O_RDWR, 0) == errno.EEXIST
    assert errno_of(fs.open, ROOT_INO, b"/tmp/f", O_DIRECTORY, 0) == errno.ENOTDIR
    assert errno_of(fs.open, ROOT_INO, b"/tmp", O_WRONLY, 0) == errno.EISDIR
    assert errno_of(fs.open, ROOT_INO, b"/tmp/new/", O_CREAT | O_WRONLY, 0) == errno.EISDIR
    assert errno_of(fs.open, ROOT_INO, b"/bin/cat", O_NOFOLLOW, 0) == errno.ELOOP
    a = fs.open(ROOT_INO, b"/tmp/f", O_WRONLY | O_APPEND, 0)
    fs.write(a.ofd, b"de")
    assert fs.read(o.ofd, 10, 0) == b"abcde"
    fs.open(ROOT_INO, b"/tmp/f", O_WRONLY | O_TRUNC, 0)
    assert fs.fstat(o.ofd).size == 0


def test_lower_layer_copied_up_and_charged_on_write_only() -> None:
    fs = FileSystem(image(), size_limit=100)
    assert fs.used == 0  # the image's bytes are not the writable layer's
    o = fs.open(ROOT_INO, b"/etc/motd", O_RDWR, 0)
    fs.write(o.ofd, b"J")
    assert fs.used == 6
    assert fs.read(o.ofd, 10, 0) == b"Jello\n"


def test_a_full_tmpfs_is_enospc_and_unlink_frees_it() -> None:
    fs = FileSystem(size_limit=4096)
    o = fs.open(ROOT_INO, b"/tmp/big", O_CREAT | O_WRONLY, 0o644)
    assert fs.write(o.ofd, b"x" * 5000) == 4096  # what fits
    assert errno_of(fs.write, o.ofd, b"y") == errno.ENOSPC
    fs.unlink(ROOT_INO, b"/tmp/big")
    assert fs.used == 4096  # still open: Linux keeps an unlinked open file
    fs.release(o.ofd)
    assert fs.used == 0


def test_open_exec_contract() -> None:
    vfs = Vfs(FileSystem(image()))
    p = proc(vfs)
    assert vfs.open_exec(p, AT_FDCWD, b"/bin/sh", 0) == (ELF, b"/bin/sh")
    assert vfs.open_exec(p, AT_FDCWD, b"/bin/cat", 0) == (ELF, b"/bin/sh")  # symlink followed
    p.cwd = vfs.tree.chdir(ROOT_INO, b"/etc")
    assert vfs.open_exec(p, AT_FDCWD, b"../bin/sh", 0)[1] == b"/bin/sh"
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/nope", 0) == errno.ENOENT
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/etc/motd", 0) == errno.EACCES  # no x bit
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/bin", 0) == errno.EACCES  # a directory
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/dev/null", 0) == errno.EACCES
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/etc/motd/x", 0) == errno.ENOTDIR
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/loop", 0) == errno.ELOOP
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/x/" * 5000, 0) == errno.ENAMETOOLONG
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"/bin/cat", AT_SYMLINK_NOFOLLOW) == errno.ELOOP
    assert errno_of(vfs.open_exec, p, AT_FDCWD, b"", 0) == errno.ENOENT
    # relative to a dirfd, and the fd itself with AT_EMPTY_PATH
    d = vfs.tree.open(ROOT_INO, b"/bin", O_RDONLY | O_DIRECTORY, 0)
    dfd = p.fds.install(FsFile(vfs.tree, d.ofd, d.ino, True, O_RDONLY))
    assert vfs.open_exec(p, dfd, b"sh", 0) == (ELF, b"/bin/sh")
    f = vfs.tree.open(ROOT_INO, b"/bin/sh", O_RDONLY, 0)
    ffd = p.fds.install(FsFile(vfs.tree, f.ofd, f.ino, False, O_RDONLY))
    assert vfs.open_exec(p, ffd, b"", AT_EMPTY_PATH) == (ELF, b"/dev/fd/%d" % ffd)
    assert errno_of(vfs.open_exec, p, ffd, b"sh", 0) == errno.ENOTDIR  # a file as dirfd
    assert errno_of(vfs.open_exec, p, 99, b"sh", 0) == errno.EBADF


def test_close_cloexec_closes_only_marked_fds() -> None:
    t = FdTable()
    keep, gone = NullFile(), NullFile()
    t.install(keep, fd=0)
    t.install(gone, cloexec=True, fd=3)
    t.close_cloexec(None)  # type: ignore[arg-type] - NullFile.release ignores the kernel
    assert list(t.entries) == [0] and gone.refs == 0


def test_cwd_is_copied_at_fork() -> None:
    from tender_service.rump.proctable import ProcessTable

    table = ProcessTable()
    parent = table.new_process(None, FdTable(), "p")
    parent.cwd, parent.umask = 7, 0o077
    child = table.new_child(parent)
    assert (child.cwd, child.umask) == (7, 0o077)


def test_rename_unlink_rmdir_link() -> None:
    fs = FileSystem()
    fs.mkdir(ROOT_INO, b"/tmp/d", 0o755)
    assert errno_of(fs.mkdir, ROOT_INO, b"/tmp/d", 0o755) == errno.EEXIST
    fs.open(ROOT_INO, b"/tmp/d/f", O_CREAT | O_WRONLY, 0o644)
    assert errno_of(fs.rmdir, ROOT_INO, b"/tmp/d") == errno.ENOTEMPTY
    assert errno_of(fs.rename, ROOT_INO, b"/tmp", ROOT_INO, b"/tmp/d/x") == errno.EINVAL
    fs.link(ROOT_INO, b"/tmp/d/f", ROOT_INO, b"/tmp/g", True)
    assert fs.stat(ROOT_INO, b"/tmp/g").nlink == 2
    fs.rename(ROOT_INO, b"/tmp/d/f", ROOT_INO, b"/tmp/h")
    assert errno_of(fs.unlink, ROOT_INO, b"/tmp/d") == errno.EISDIR
    fs.rmdir(ROOT_INO, b"/tmp/d")
    assert fs.getcwd(fs.chdir(ROOT_INO, b"/tmp")) == b"/tmp"


def test_the_supervisor_side_refuses_what_a_vm_may_not_do() -> None:
    """FsHost (VM-clone): a VM uses only its own open file descriptions, known methods,
    integer/bytes arguments; a VM that ends gives back what it held."""
    import json

    from tender_service.transports.fs_host import FsHost
    from tender_service.transports.remote_fs import decode, request

    host = FsHost(FileSystem(size_limit=1 << 20))
    value, payload = host.call(2, request("open", (ROOT_INO, b"/tmp/f", O_CREAT | O_RDWR, 0o644)))
    assert value == 0
    opened = decode(json.loads(payload))
    assert host.call(2, request("write", (opened.ofd, b"abc", -1)))[0] == 0
    assert host.call(3, request("read", (opened.ofd, 10, 0)))[0] == -errno.EBADF  # not pid 3's
    assert host.call(2, request("hold", (opened.ofd,)))[0] == -errno.ENOSYS
    assert host.call(2, request("__init__", ()))[0] == -errno.ENOSYS
    assert host.call(2, b"{not json")[0] == -errno.EINVAL
    assert host.call(2, b'{"m": "stat", "a": [1, {"x": 1}]}')[0] == -errno.EINVAL
    assert host.call(2, b'{"m": "stat", "a": [1, 2.5]}')[0] == -errno.EINVAL
    assert host.call(2, request("stat", (ROOT_INO,)))[0] == -errno.EINVAL  # too few
    # the raw data path: only bytes-valued methods, only the caller's open file descriptions
    assert host.call_raw(2, request("read", (opened.ofd, 10, 0))) == (3, b"abc")
    assert host.call_raw(3, request("read", (opened.ofd, 10, 0)))[0] == -errno.EBADF
    assert host.call_raw(2, request("open", (ROOT_INO, b"/tmp/g", O_CREAT, 0)))[0] == -errno.ENOSYS
    assert host.write(2, opened.ofd, 3, b"de") == 2
    assert host.write(3, opened.ofd, 0, b"x") == -errno.EBADF
    host.call(2, request("ftruncate", (opened.ofd, 3)))
    assert host.hold(3, opened.ofd, 4) == -errno.EBADF  # pid 3 holds nothing to hand on
    assert host.hold(2, opened.ofd, 3) == 0
    host.call(2, request("unlink", (ROOT_INO, b"/tmp/f")))
    host.drop_holder(2)
    assert host.fs.used == 3  # pid 3 still has it open
    host.drop_holder(3)
    assert host.fs.used == 0 and not host.fs.ofds


def test_record_locks_split_merge_and_end_with_their_owner() -> None:
    """fcntl locks as Linux keeps them: per owner ranges, split by an unlock in the
    middle, merged when they touch, an owner's own locks never conflict; an open file
    description's flock and F_OFD locks end with it."""
    from tender_service.rump.fs import F_RDLCK, F_UNLCK, F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH

    fs = FileSystem()
    a = fs.open(ROOT_INO, b"/tmp/l", O_CREAT | O_RDWR, 0o644).ofd
    b = fs.open(ROOT_INO, b"/tmp/l", O_RDWR, 0).ofd
    fs.write(a, b"x" * 100)
    fs.lock(a, 2, False, F_WRLCK, 0, 0, 50)
    fs.lock(a, 2, False, F_UNLCK, 0, 10, 10)  # [0,10) and [20,50) remain
    assert fs.lock(b, 3, True, F_WRLCK, 0, 10, 10) == (F_UNLCK, 10, 10, 0)
    assert fs.lock(b, 3, True, F_RDLCK, 0, 0, 0) == (F_WRLCK, 0, 10, 2)
    assert fs.lock(a, 2, True, F_WRLCK, 0, 0, 0)[0] == F_UNLCK  # its own
    fs.lock(a, 2, False, F_WRLCK, 0, 10, 10)  # fills the hole: one lock [0,50)
    assert fs.lock(b, 3, True, F_WRLCK, 0, 49, 0) == (F_WRLCK, 0, 50, 2)
    assert errno_of(fs.lock, b, 3, False, F_RDLCK, 0, 5, 1) == errno.EAGAIN
    fs.lock(b, 3, False, F_RDLCK, 0, 50, 0)  # to the end of the file
    assert fs.lock(a, 2, True, F_WRLCK, 2, 0, 0) == (F_RDLCK, 50, 0, 3)  # SEEK_END: 100
    assert errno_of(fs.lock, b, 3, False, F_WRLCK, 0, -1, 0) == errno.EINVAL
    fs.unlock_owner(2)
    assert fs.lock(b, 3, True, F_WRLCK, 0, 0, 0)[0] == F_UNLCK
    fs.flock(a, LOCK_SH)
    fs.flock(b, LOCK_SH)
    assert errno_of(fs.flock, b, LOCK_EX | LOCK_NB) == errno.EAGAIN
    assert fs.flocks[fs.ofds[b].node.ino] == {a: LOCK_SH}  # a failed conversion drops it
    fs.lock(a, -a, False, F_WRLCK, 0, 0, 1)  # an F_OFD lock of a
    fs.release(a)
    assert fs.lock(b, 3, True, F_WRLCK, 0, 0, 0)[0] == F_UNLCK
    fs.flock(b, LOCK_EX | LOCK_NB)


def test_chown_records_and_drops_set_id_bits() -> None:
    from tender_service.rump.fs import NO_ID

    fs = FileSystem()
    fs.open(ROOT_INO, b"/tmp/o", O_CREAT | O_RDWR, 0o6755)
    fs.chown(ROOT_INO, b"/tmp/o", 1000, NO_ID)
    st = fs.stat(ROOT_INO, b"/tmp/o")
    assert (st.uid, st.gid, st.mode & 0o7777) == (1000, 0, 0o755)
    fs.symlink(b"o", ROOT_INO, b"/tmp/lo")
    fs.chown(ROOT_INO, b"/tmp/lo", 5, 6, follow=False)
    assert fs.stat(ROOT_INO, b"/tmp/lo", follow=False)[-2:] == (5, 6)
    assert fs.stat(ROOT_INO, b"/tmp/lo")[-2:] == (1000, 0)
    assert fs.statfs()[0] == fs.size_limit // 4096

"""The instance's one file system, seen from a VM-clone VM: calls to the supervisor.

In VM-clone mode every VM of an instance must see one tree (issue 14): the
supervisor holds the :class:`~tender_service.rump.fs.FileSystem` and each VM's
``k.fs.tree`` is a :class:`RemoteFs`, whose methods are those of the tree,
each one synchronous ``fs`` call over the instance's channel (tcp or shm).
Open file descriptions live in the supervisor too, so offsets and O_APPEND
are shared across VMs as POSIX says for fds inherited at fork.

Arguments and results travel as JSON; bytes as base64.  File data has a
faster path (``fs_raw``, ``fs_write``): a read's bytes come back as the raw
reply payload, a write's go once base64'd as the call's data (not twice, as
inside a JSON request would), in chunks of up to :data:`DATA_CHUNK` under the
channel's frame size.  That path carries exec's program loads too.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, cast

from tender_service.machine.errors import GuestError
from tender_service.rump.fs import Opened, Stat

if TYPE_CHECKING:
    from tender_service.transports.vmlink import VmLink

#: bytes of file data in one JSON call (base64 twice stays well under frames.MAX_PAYLOAD)
CHUNK = 256 << 10
#: bytes of file data in one raw call (base64 once stays under frames.MAX_PAYLOAD)
DATA_CHUNK = 512 << 10
#: the tree's methods whose result is bytes, answered as the raw reply payload
RAW_METHODS = frozenset({"read", "contents", "exec_ofd", "exec_part"})
#: the tree's methods a VM may call (``hold``/``release`` are the supervisor's own ops)
#: those whose first argument is an open file description the calling VM must hold
OFD_METHODS = frozenset(
    {"set_flags", "read", "write", "seek", "getdents", "fstat", "ftruncate", "fchmod"}
    | {"futimens", "contents", "exec_ofd", "fchown", "flock", "lock"}
)
METHODS = (
    OFD_METHODS
    | {"open", "stat", "mkdir", "mksock", "rmdir", "unlink", "link", "symlink"}
    | {"readlink", "rename", "chmod", "truncate", "utimens", "chdir", "getcwd", "open_exec"}
    | {"chown", "statfs", "unlock_owner"}
)


def encode(v: object) -> object:
    if isinstance(v, bytes | bytearray):
        return {"b": base64.b64encode(v).decode()}
    if isinstance(v, Opened):
        return {"opened": [v.ofd, v.ino, v.kind, v.device, encode(v.path)]}
    if isinstance(v, Stat):
        return {"stat": list(v)}
    if isinstance(v, tuple | list):
        return [encode(x) for x in v]
    return v


def decode(v: object) -> object:
    if isinstance(v, dict):
        if "b" in v:
            return base64.b64decode(str(v["b"]), validate=True)
        if "opened" in v:
            o = v["opened"]
            return Opened(
                int(o[0]), int(o[1]), str(o[2]), str(o[3]), bytes(cast("bytes", decode(o[4])))
            )
        if "stat" in v:
            return Stat(*[int(x) for x in v["stat"]])
        raise ValueError("unknown value")
    if isinstance(v, list):
        return tuple(decode(x) for x in v)
    return v


def request(method: str, args: tuple) -> bytes:
    return json.dumps({"m": method, "a": encode(args)}).encode()


def parse_request(data: bytes) -> tuple[str, list[int | bool | bytes]]:
    """(method, arguments) of a VM's call; ValueError for anything else (the VM is untrusted)."""
    body = json.loads(data)
    method, args = body["m"], body["a"]
    if not isinstance(args, list):
        raise ValueError("arguments must be a list")
    out = [decode(a) for a in args]
    if any(type(a) not in (int, bool, bytes) for a in out):
        raise ValueError("arguments must be integers or bytes")
    return str(method), out  # type: ignore[return-value]


class RemoteFs:
    """The supervisor's tree behind the API of ``FileSystem`` (``rump/vfs.FsTree``)."""

    def __init__(self, link: VmLink) -> None:
        self._vm = link

    def _call(self, method: str, *args: object) -> object:
        value, payload = self._vm.call_full("fs", data=request(method, args))
        if value < 0:
            raise GuestError(-value)
        return decode(json.loads(payload)) if payload else None

    def _raw(self, method: str, *args: object) -> bytes:
        """A call of one of :data:`RAW_METHODS`: its bytes come back as they are."""
        value, payload = self._vm.call_full("fs_raw", data=request(method, args))
        if value < 0:
            raise GuestError(-value)
        return payload

    # -- open file descriptions ----------------------------------------------------
    def open(self, base: int, path: bytes, flags: int, mode: int) -> Opened:
        return self._call("open", base, path, flags, mode)  # type: ignore[return-value]

    def hold(self, ofd: int, holder: int) -> None:
        """``holder`` (a VM-clone child about to start) holds ``ofd`` too."""
        value = self._vm.call("fs_hold", ofd, holder)
        if value < 0:
            raise GuestError(-value)

    def release(self, ofd: int) -> None:
        # one-way: it may come after this VM's exit, when the supervisor no longer
        # answers it (and releases what the VM still held by itself)
        self._vm.notify_call("fs_release", ofd)

    def set_flags(self, ofd: int, flags: int) -> None:
        self._call("set_flags", ofd, flags)

    def read(self, ofd: int, n: int, offset: int = -1) -> bytes:
        return self._raw("read", ofd, min(n, DATA_CHUNK), offset)

    def write(self, ofd: int, data: bytes, offset: int = -1) -> int:
        done = 0
        while True:
            part = data[done : done + DATA_CHUNK]
            at = offset if offset < 0 else offset + done
            wrote, _ = self._vm.call_full("fs_write", ofd, at, data=bytes(part))
            if wrote < 0:
                if done:
                    return done  # a short write, as Linux reports it
                raise GuestError(-wrote)
            done += wrote
            if done >= len(data) or wrote < len(part):
                return done

    def seek(self, ofd: int, offset: int, whence: int) -> int:
        return self._call("seek", ofd, offset, whence)  # type: ignore[return-value]

    def getdents(self, ofd: int, size: int) -> bytes:
        return self._call("getdents", ofd, min(size, CHUNK))  # type: ignore[return-value]

    def fstat(self, ofd: int) -> Stat:
        return self._call("fstat", ofd)  # type: ignore[return-value]

    def ftruncate(self, ofd: int, length: int) -> None:
        self._call("ftruncate", ofd, length)

    def fchmod(self, ofd: int, mode: int) -> None:
        self._call("fchmod", ofd, mode)

    def futimens(self, ofd: int, atime: int, mtime: int) -> None:
        self._call("futimens", ofd, atime, mtime)

    def contents(self, ofd: int, offset: int = 0, n: int = -1) -> bytes:
        return self._chunks(lambda off, k: self._raw("contents", ofd, off, k), offset, n)

    def _chunks(self, get, offset: int, n: int) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            want = DATA_CHUNK if n < 0 else min(DATA_CHUNK, n - len(out))
            part = get(offset + len(out), want)
            out += part
            if len(part) < want:
                break
        return bytes(out)

    # -- paths --------------------------------------------------------------------------
    def stat(self, base: int, path: bytes, follow: bool = True) -> Stat:
        return self._call("stat", base, path, follow)  # type: ignore[return-value]

    def mkdir(self, base: int, path: bytes, mode: int) -> None:
        self._call("mkdir", base, path, mode)

    def mksock(self, base: int, path: bytes, mode: int) -> int:
        return self._call("mksock", base, path, mode)  # type: ignore[return-value]

    def rmdir(self, base: int, path: bytes) -> None:
        self._call("rmdir", base, path)

    def unlink(self, base: int, path: bytes) -> None:
        self._call("unlink", base, path)

    def link(self, old_base: int, old: bytes, new_base: int, new: bytes, follow: bool) -> None:
        self._call("link", old_base, old, new_base, new, follow)

    def symlink(self, target: bytes, base: int, path: bytes) -> None:
        self._call("symlink", target, base, path)

    def readlink(self, base: int, path: bytes) -> bytes:
        return self._call("readlink", base, path)  # type: ignore[return-value]

    def rename(self, old_base: int, old: bytes, new_base: int, new: bytes) -> None:
        self._call("rename", old_base, old, new_base, new)

    def chmod(self, base: int, path: bytes, mode: int, follow: bool = True) -> None:
        self._call("chmod", base, path, mode, follow)

    def truncate(self, base: int, path: bytes, length: int) -> None:
        self._call("truncate", base, path, length)

    def utimens(self, base: int, path: bytes, atime: int, mtime: int, follow: bool) -> None:
        self._call("utimens", base, path, atime, mtime, follow)

    def chdir(self, base: int, path: bytes) -> int:
        return self._call("chdir", base, path)  # type: ignore[return-value]

    def getcwd(self, ino: int) -> bytes:
        return self._call("getcwd", ino)  # type: ignore[return-value]

    def chown(self, base: int, path: bytes, uid: int, gid: int, follow: bool = True) -> None:
        self._call("chown", base, path, uid, gid, follow)

    def fchown(self, ofd: int, uid: int, gid: int) -> None:
        self._call("fchown", ofd, uid, gid)

    def statfs(self) -> tuple[int, int, int, int]:
        return self._call("statfs")  # type: ignore[return-value]

    def flock(self, ofd: int, op: int) -> None:
        self._call("flock", ofd, op)

    def lock(
        self, ofd: int, owner: int, get: bool, ltype: int, whence: int, start: int, length: int
    ) -> tuple[int, int, int, int]:
        return self._call("lock", ofd, owner, get, ltype, whence, start, length)  # type: ignore[return-value]

    def unlock_owner(self, owner: int, ino: int = 0) -> None:
        self._call("unlock_owner", owner, ino)

    def open_exec(
        self, base: int, path: bytes, follow: bool = True, offset: int = 0, n: int = -1
    ) -> tuple[bytes, bytes]:
        # the checks and the resolved path first, then the bytes on the raw path
        _, where = cast("tuple[bytes, bytes]", self._call("open_exec", base, path, follow, 0, 0))
        data = self._chunks(
            lambda off, k: self._raw("exec_part", base, path, follow, off, k), offset, n
        )
        return data, where

    def exec_ofd(self, ofd: int, offset: int = 0, n: int = -1) -> bytes:
        return self._chunks(lambda off, k: self._raw("exec_ofd", ofd, off, k), offset, n)

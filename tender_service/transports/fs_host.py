"""The supervisor's side of the instance's one file system (VM-clone mode).

:class:`FsHost` serves the ``fs`` calls of every VM of the instance (see
``remote_fs.py``) from one :class:`~tender_service.rump.fs.FileSystem`, and
counts which VM holds which open file description, as the pipe broker counts
pipe ends: a VM that ends (or dies) gives back what it still held, so an
unlinked file's space returns once no process of the instance has it open.
"""

from __future__ import annotations

import errno
import json
import logging
from collections import Counter
from typing import cast

from tender_service.machine.errors import GuestError
from tender_service.rump.fs import FileSystem, Opened
from tender_service.transports.remote_fs import (
    METHODS,
    OFD_METHODS,
    RAW_METHODS,
    encode,
    parse_request,
)

log = logging.getLogger(__name__)


class FsHost:
    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        #: pid -> open file descriptions it holds (and how many times: once per VM)
        self.holds: dict[int, Counter[int]] = {}

    def call(self, pid: int, data: bytes) -> tuple[int, bytes]:
        """One ``fs`` call of the VM of ``pid``: (0, JSON result) or (-errno, b"")."""
        value, result = self._run(pid, data, METHODS)
        if value < 0:
            return value, b""
        if isinstance(result, Opened) and result.ofd:
            self.holds.setdefault(pid, Counter())[result.ofd] += 1
        return 0, json.dumps(encode(result)).encode()

    def call_raw(self, pid: int, data: bytes) -> tuple[int, bytes]:
        """One ``fs_raw`` call (a method whose result is bytes): (its length, the bytes)."""
        value, result = self._run(pid, data, RAW_METHODS)
        if value < 0:
            return value, b""
        out = bytes(cast(bytes, result))
        return len(out), out

    def write(self, pid: int, ofd: int, offset: int, data: bytes) -> int:
        """One ``fs_write`` call: bytes written, or -errno."""
        if not self.holds.get(pid, Counter())[ofd]:
            return -errno.EBADF
        try:
            return self.fs.write(ofd, data, offset)
        except GuestError as e:
            return -e.errno

    def _run(self, pid: int, data: bytes, allowed: frozenset[str]) -> tuple[int, object]:
        try:
            method, args = parse_request(data)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("pid %d: bad fs request: %s", pid, e)
            return -errno.EINVAL, None
        if method not in allowed:
            return -errno.ENOSYS, None
        if method in OFD_METHODS and not (
            args and self.holds.get(pid, Counter())[cast(int, args[0])]
        ):
            return -errno.EBADF, None  # not one of this VM's open file descriptions
        try:
            return 0, getattr(self.fs, method)(*args)
        except GuestError as e:
            return -e.errno, None
        except (TypeError, ValueError, IndexError) as e:  # wrong arguments from a VM
            log.warning("pid %d: bad fs %s request: %s", pid, method, e)
            return -errno.EINVAL, None

    def hold(self, pid: int, ofd: int, holder: int) -> int:
        """``pid`` forks ``holder``, which inherits ``ofd``."""
        if not self.holds.get(pid, Counter())[ofd]:
            return -errno.EBADF  # only what the parent holds can be handed on
        self.fs.hold(ofd)
        self.holds.setdefault(holder, Counter())[ofd] += 1
        return 0

    def release(self, pid: int, ofd: int) -> int:
        held = self.holds.get(pid)
        if not held or not held[ofd]:
            return -errno.EBADF
        held[ofd] -= 1
        if not held[ofd]:
            del held[ofd]
        self.fs.release(ofd)
        return 0

    def drop_holder(self, pid: int) -> None:
        """``pid``'s VM is gone: what it still held is released."""
        for ofd, n in self.holds.pop(pid, Counter()).items():
            for _ in range(n):
                self.fs.release(ofd)
        self.fs.unlock_owner(pid)  # its record locks, had it not closed its fds

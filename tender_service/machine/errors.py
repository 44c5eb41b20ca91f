"""Errors that cross layer boundaries.

Handlers deep in the kernel raise ``GuestError(errno)``; the syscall
dispatcher turns it into ``-errno`` in ``rax``.  ``ImageError`` is raised
before anything runs, for an image we refuse to load.
"""

from __future__ import annotations

import errno as _errno
import os


class GuestError(Exception):
    """A syscall-level failure the guest sees as ``-errno``."""

    def __init__(self, err: int, detail: str = "") -> None:
        super().__init__(f"{_errno.errorcode.get(err, err)}{': ' + detail if detail else ''}")
        self.errno = err


class ImageError(ValueError):
    """An image (ELF file) that cannot be run; the message says why."""


def errno_name(err: int) -> str:
    """'ENOENT' for 2: for reports and traces."""
    return _errno.errorcode.get(err, str(err))


def strerror(err: int) -> str:
    return os.strerror(err)

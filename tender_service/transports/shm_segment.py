"""The memory of an shm channel: a sealed memfd the supervisor makes and hands over.

The supervisor (the side that answers a hello) makes each channel's segment,
so the process it writes into is one a VM cannot pull from under it:

* it is a ``memfd`` (no name in /dev/shm: nothing is left behind by a killed
  process, and a full /dev/shm does not stop it), every page reserved with
  ``posix_fallocate`` (an exhausted memory cgroup says ENOMEM there, once, instead
  of a SIGBUS at the first touch of a page it cannot back);
* it is sealed against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL``) before a VM process sees it: a VM that takes over its emulator
  cannot ``ftruncate`` it and make the supervisor's next write a SIGBUS, the
  death of the tender;
* its descriptor travels to the VM with the supervisor's hello (``SCM_RIGHTS``
  over the Unix socket that then carries the doorbells).

Reserving 4 MiB costs 2-3 ms, which every VM-clone child's start waited for when
the VM made its own segment; ``SpareSegments`` keeps one made ahead, on a thread
of its own, so a VM's hello is answered at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading

log = logging.getLogger(__name__)

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_MEMFD_NAME = "unifork-channel"
#: what the kernel says when it cannot back the pages: tmpfs or the memory cgroup
#: is full (ENOSPC, ENOMEM), or the file size limit forbids the size (EFBIG)
_EXHAUSTED = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


class ShmExhausted(OSError):
    """No memory can be reserved for a channel segment (ENOSPC, ENOMEM, EFBIG)."""


def make_segment(size: int) -> int:
    """A new sealed memfd of ``size`` bytes, every page backed (zero-filled); its fd."""
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as e:
        os.close(fd)
        if e.errno in _EXHAUSTED:
            raise ShmExhausted(
                e.errno,
                f"cannot reserve a {size}-byte channel segment ({os.strerror(e.errno)})",
            ) from None
        raise
    return fd


class SpareSegments:
    """One reserved segment kept ready for the next VM, remade in the background
    after each ``take`` (a supervisor's VMs connect one at a time, mostly)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._spare: int | None = None
        self._making = False
        self._closed = False
        self._refill()

    def take(self) -> int:
        """A segment's fd, now: the spare if it is ready, else one made here
        (ShmExhausted if there is no memory for it).  The caller owns the fd."""
        with self._lock:
            fd, self._spare = self._spare, None
        if fd is None:
            fd = make_segment(self.size)
        self._refill()
        return fd

    def _refill(self) -> None:
        with self._lock:
            if self._making or self._closed or self._spare is not None:
                return
            self._making = True
        threading.Thread(target=self._make, name="shm-spare", daemon=True).start()

    def _make(self) -> None:
        fd: int | None = None
        try:
            fd = make_segment(self.size)
        except OSError as e:  # the next take makes its own, and says why
            log.debug("no spare channel segment: %s", e)
        with self._lock:
            self._making = False
            if not self._closed and fd is not None:
                self._spare, fd = fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Free the spare; one still being made is freed when it is done."""
        with self._lock:
            self._closed = True
            fd, self._spare = self._spare, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

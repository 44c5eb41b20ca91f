"""The memory of an shm channel: a sealed memfd the supervisor makes and hands over.

The supervisor (the side that answers a hello) makes each channel's segment,
so the memory it writes into is memory a VM cannot pull from under it:

* it is a ``memfd``: no name in /dev/shm (nothing is left behind by a killed
  process, and a full /dev/shm does not stop it), and no size limit of a mount
  behind it, so touching a page never raises SIGBUS for want of room (tmpfs says
  ENOSPC, a SIGBUS at the touch, only when its mount is full; memory that runs out
  is the OOM killer's, as for any other memory of the tender).  Its pages are
  therefore not reserved ahead: a channel costs the pages it uses, and making one
  takes ~60 us (reserving 4 MiB took 2-3 ms of every VM-clone child's start, and
  freeing them ~1 ms more of CPU);
* it is sealed against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL``) before a VM process sees it: a VM that takes over its emulator
  cannot ``ftruncate`` it and make the supervisor's next touch a SIGBUS, the
  death of the tender;
* its descriptor travels to the VM with the supervisor's hello (``SCM_RIGHTS``
  over the Unix socket that then carries the doorbells).
"""

from __future__ import annotations

import errno
import fcntl
import os

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_MEMFD_NAME = "unifork-channel"
#: what the kernel says when it will not make one: no memory (ENOMEM, ENOSPC), or
#: the size is above the file size limit (EFBIG, RLIMIT_FSIZE)
_EXHAUSTED = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


class ShmExhausted(OSError):
    """No segment can be made (ENOMEM, ENOSPC, EFBIG)."""


def make_segment(size: int, name: str = _MEMFD_NAME) -> int:
    """A new sealed memfd of ``size`` bytes (zeros; pages come as they are used); its fd.
    ``name`` is what /proc/PID/maps shows for it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as e:
        os.close(fd)
        if e.errno in _EXHAUSTED:
            raise ShmExhausted(
                e.errno,
                f"cannot make a {size}-byte {name} segment ({os.strerror(e.errno)})",
            ) from None
        raise
    return fd

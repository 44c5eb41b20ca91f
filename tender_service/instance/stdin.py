"""The standard input of a VM-clone instance, served by its supervisor.

Every process of the instance runs in a VM of its own, possibly on another
host, but all of them share the stdin the instance was launched with (the
CLI's: a file, /dev/null, a pipe or a tty), as the processes of a native
program share fd 0.  A VM's console read of fd 0 becomes a STDIN_READ
request; this object answers them in arrival order, each with one read(2)
of the host fd of at most the size asked, done when the guest asks (never
ahead), so the guests see the reads a native program would.  A thread
waits for the host fd while a request is parked, so the supervisor's
message threads never block on the user.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tender_service.machine.errors import GuestError
from tender_service.rump.console import host_ready, read_host

log = logging.getLogger(__name__)

#: called with the bytes read (b"" is EOF) or -errno
StdinReply = Callable[[bytes | int], None]


@dataclass
class _Parked:
    holder: int
    n: int
    reply: StdinReply


class StdinServer:
    """fd 0 of every VM of an instance: a host fd, fixed bytes, or nothing (EOF)."""

    def __init__(self, stdin: int | bytes | None, lock: threading.RLock) -> None:
        """``lock``: the supervisor's, so replies go out in order with its other messages."""
        self.fd = stdin if isinstance(stdin, int) else None
        self.data = bytearray(stdin) if isinstance(stdin, bytes | bytearray) else bytearray()
        #: fd 0 answers terminal ioctls: a host tty, or no host fd (as a one-VM console)
        self.tty = os.isatty(self.fd) if self.fd is not None else True
        self._parked: deque[_Parked] = deque()
        self._cond = threading.Condition(lock)
        self._closed = False
        self._wake_r = self._wake_w = -1  # wakes the thread at close
        self._thread: threading.Thread | None = None

    def read(self, holder: int, n: int, nonblock: bool, reply: StdinReply) -> None:
        """Answer now if the input is ready, else park the request (EAGAIN if nonblocking)."""
        with self._cond:
            if n <= 0 or self.fd is None:
                data = bytes(self.data[: max(n, 0)])
                del self.data[: len(data)]
                reply(data)
                return
            if not self._parked and host_ready(self.fd):
                reply(self._read(n))
                return
            if nonblock:
                reply(-errno.EAGAIN)
                return
            self._parked.append(_Parked(holder, n, reply))
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe()
                self._thread = threading.Thread(target=self._serve, name="stdin", daemon=True)
                self._thread.start()
            self._cond.notify()

    def waiting(self) -> bool:
        """A reader waits for the host (then the instance is not deadlocked: input may come)."""
        with self._cond:
            return bool(self._parked)

    def drop_holder(self, holder: int) -> None:
        """``holder``'s VM is gone: forget its parked read (nothing was taken for it)."""
        with self._cond:
            self._parked = deque(p for p in self._parked if p.holder != holder)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._parked.clear()
            self._cond.notify()
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._thread = None

    def _read(self, n: int) -> bytes | int:
        assert self.fd is not None
        try:
            return read_host(self.fd, n)
        except GuestError as e:
            return -e.errno

    def _serve(self) -> None:
        """Wait for the host fd while someone waits for it; answer the first in line."""
        assert self.fd is not None
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        poll.register(self._wake_r, select.POLLIN)
        while True:
            with self._cond:
                while not self._parked and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            fds = {fd for fd, _ in poll.poll()}
            if self._wake_r in fds:
                return
            with self._cond:
                if self._parked:  # read under the lock: the fd is ready, it returns at once
                    p = self._parked.popleft()
                    p.reply(self._read(p.n))

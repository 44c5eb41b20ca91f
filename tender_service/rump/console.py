"""The VM's console: fds 0/1/2 of the launched program.

Output goes to a sink with the writer's pid (the tender streams it, the CLI
writes it to its own stdout/stderr).  Input comes from a byte string, a host
file descriptor, or nothing (EOF).  By default the console answers terminal
ioctls, so musl line-buffers stdout as on Rumprun's console; ``tty=False``
makes it a plain stream (full buffering), like a pipe.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError
from tender_service.rump.outcomes import Block

if TYPE_CHECKING:
    from tender_service.rump.files import ConsoleFile
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

#: sink(pid, fd, data) with fd 1 for stdout and 2 for stderr
Sink = Callable[[int, int, bytes], None]


class Console:
    def __init__(self, sink: Sink, stdin: bytes | int | None = None, tty: bool = True) -> None:
        self.sink = sink
        self.tty = tty
        self.input = bytearray(stdin) if isinstance(stdin, bytes | bytearray) else bytearray()
        self.host_fd = stdin if isinstance(stdin, int) else None
        self.input_eof = self.host_fd is None
        self.input_wq = WaitQueue("console:stdin", host=True)
        self.bytes_out = 0

    def output(self, pid: int, fd: int, data: bytes) -> None:
        self.bytes_out += len(data)
        self.sink(pid, fd, data)

    def read(self, k: Kernel, lwp: Lwp, f: ConsoleFile, addr: int, n: int) -> int:
        if n == 0:
            return 0
        if not self.input:
            if self.input_eof:
                return 0
            if f.nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(self.input_wq, "read console stdin")
        take = min(n, len(self.input))
        k.mem.write(addr, self.input[:take])
        del self.input[:take]
        return take

    def pump_host_input(self) -> bool:
        """Read what the host fd has (called when it is readable); True if progress."""
        if self.host_fd is None or self.input_eof:
            return False
        try:
            data = os.read(self.host_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.input_eof = True
        else:
            self.input += data
        return True

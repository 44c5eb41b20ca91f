"""The VM's console: fds 0/1/2 of the launched program.

Output goes to a sink with the writer's pid (the tender streams it, the CLI
writes it to its own stdout/stderr).  Input comes from a ``StdinSource``: a
byte string, a host file descriptor (a file, /dev/null, a pipe or a tty: what
the user gave ``unifork run``), nothing (EOF), or in VM-clone mode the
instance's supervisor (``transports/vmlink.py``), which reads the host's.
A host fd is read on demand, as much as the guest's read asks and only when
it asks, so the guest sees the same reads as a native process would.

By default the console answers terminal ioctls, so musl line-buffers stdout
as on Rumprun's console; ``tty=False`` makes it a plain stream (full
buffering), like a pipe.  fd 0 is a terminal only if its input is one too:
``prog < file`` sees ``isatty(0) == 0``, as natively.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError
from tender_service.rump.outcomes import Block

if TYPE_CHECKING:
    from tender_service.rump.files import ConsoleFile
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

#: sink(pid, fd, data) with fd 1 for stdout and 2 for stderr
Sink = Callable[[int, int, bytes], None]
#: the most one console read takes from the host at once
MAX_READ = 1 << 20


class StdinSource(Protocol):
    """Where fd 0's bytes come from."""

    #: a host fd the kernel may wait on when every thread is blocked (else None)
    host_fd: int | None

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int, nonblocking: bool) -> int: ...

    def isatty(self) -> bool: ...


def host_ready(fd: int) -> bool:
    """Would a read of ``fd`` return now?  poll(2), not epoll: epoll refuses regular
    files and /dev/null, which poll reports readable (a read of them never waits)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def read_host(fd: int, n: int) -> bytes:
    """One read(2) of at most ``n`` bytes of a host fd (b"" is EOF); -errno as GuestError."""
    try:
        return os.read(fd, min(n, MAX_READ))
    except BlockingIOError:
        raise GuestError(errno.EAGAIN) from None
    except OSError as e:
        raise GuestError(e.errno or errno.EIO) from None


def _write_guest(k: Kernel, addr: int, n: int) -> int:
    """How much of the guest buffer can take a read (EFAULT if none of it)."""
    room = k.mem.room([(addr, n)], min(n, MAX_READ))
    if not room:
        raise GuestError(errno.EFAULT)
    return room


class BytesInput:
    """A fixed input, then EOF (``None``: EOF at once)."""

    host_fd: int | None = None

    def __init__(self, data: bytes | None) -> None:
        self.data = bytearray(data or b"")

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int, nonblocking: bool) -> int:
        take = min(_write_guest(k, addr, n), len(self.data))
        k.mem.write(addr, bytes(self.data[:take]))
        del self.data[:take]
        return take

    def isatty(self) -> bool:
        return True  # no stdin given: the console stays a terminal, as before


class HostInput:
    """A host fd, read when the guest reads (the reader blocks in the kernel until
    the fd is readable: ``Kernel._wait_host`` polls it)."""

    def __init__(self, fd: int, wq: WaitQueue) -> None:
        self.host_fd: int | None = fd
        self.wq = wq
        self._tty = os.isatty(fd)

    def read(self, k: Kernel, lwp: Lwp, addr: int, n: int, nonblocking: bool) -> int:
        assert self.host_fd is not None
        room = _write_guest(k, addr, n)
        if not host_ready(self.host_fd):
            if nonblocking:
                raise GuestError(errno.EAGAIN)
            raise Block(self.wq, "read console stdin")
        data = read_host(self.host_fd, room)
        k.mem.write(addr, data)
        return len(data)

    def isatty(self) -> bool:
        return self._tty


class Console:
    def __init__(
        self, sink: Sink, stdin: bytes | int | StdinSource | None = None, tty: bool = True
    ) -> None:
        self.sink = sink
        self.tty = tty
        self.input_wq = WaitQueue("console:stdin", host=True)
        self.input: StdinSource
        if isinstance(stdin, int):
            self.input = HostInput(stdin, self.input_wq)
        elif stdin is None or isinstance(stdin, bytes | bytearray):
            self.input = BytesInput(stdin)
        else:
            self.input = stdin
        self.bytes_out = 0

    @property
    def host_fd(self) -> int | None:
        """The host fd to wait on while a reader is blocked on it (else None)."""
        return self.input.host_fd if self.input_wq.waiters else None

    def input_ready(self) -> bool:
        """Would a read of fd 0 return now (poll)?  A fixed or remote input always
        answers (data or EOF); a host fd is asked."""
        fd = self.input.host_fd
        return fd is None or host_ready(fd)

    def is_tty(self, fdno: int) -> bool:
        """Terminal ioctls: fds 1/2 follow ``tty``; fd 0 also needs a terminal as input."""
        return self.tty and (fdno != 0 or self.input.isatty())

    def output(self, pid: int, fd: int, data: bytes) -> None:
        self.bytes_out += len(data)
        self.sink(pid, fd, data)

    def read(self, k: Kernel, lwp: Lwp, f: ConsoleFile, addr: int, n: int) -> int:
        if n == 0:
            return 0
        return self.input.read(k, lwp, addr, n, f.nonblocking)

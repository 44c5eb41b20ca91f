"""What a syscall handler can do besides returning a value: the syscall outcomes.

A handler (``rump/syscalls/*.py``) ends in exactly one of these ways, and the
dispatcher (``rump/dispatch.py``) turns each into what the guest sees:

* return an ``int``: the value for ``rax`` (a negative errno on failure);
* raise ``GuestError(errno)``: ``rax = -errno``;
* raise ``Block``: the thread waits on a queue; the syscall restarts when woken;
* raise ``BlockAfter``: the syscall completed with a value, then the thread waits (vfork);
* return ``SWITCH``: the thread gave up the CPU (``sched_yield``), ``rax = 0``;
* return ``NORETURN``: the thread is gone (exit, a fatal signal);
* return ``JUMP``: the handler set every register itself (``rt_sigreturn``);
* raise ``Restart``: a signal was sent to the caller (a job-control stop, say): the
  syscall runs again once it is delivered, or returns EINTR to a handler without
  SA_RESTART (Linux's ERESTARTSYS).

This module imports nothing of the kernel, so handlers import their outcomes from
here and the kernel imports the handlers without an import cycle.
"""

from __future__ import annotations

from tender_service.bmk.sched import WaitQueue
from tender_service.machine.errors import GuestError

__all__ = ["JUMP", "NORETURN", "SWITCH", "Block", "BlockAfter", "GuestError", "Restart"]


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: handler result: the calling thread gave up the CPU (sched_yield); rax = 0
SWITCH = _Sentinel("SWITCH")
#: handler result: the calling thread is gone (exit, fatal signal)
NORETURN = _Sentinel("NORETURN")
#: handler result: the registers (rax and rip included) are set; resume from them
JUMP = _Sentinel("JUMP")


class Block(Exception):  # noqa: N818 - control flow, not an error
    """The operation must wait on ``wq``; the syscall restarts when woken."""

    def __init__(self, wq: WaitQueue | None, why: str, until: float | None = None) -> None:
        self.wq, self.why, self.until = wq, why, until


class BlockAfter(Exception):  # noqa: N818 - control flow
    """The syscall completed with ``value`` but the thread must now wait (vfork)."""

    def __init__(self, value: int, why: str) -> None:
        self.value, self.why = value, why


class Restart(Block):
    """A signal was just sent to the caller: deliver it, then run the syscall again
    (or EINTR after a handler without SA_RESTART): Linux's ERESTARTSYS.  Nothing
    is waited for (a stop signal has made the process wait for SIGCONT already)."""

    def __init__(self, why: str) -> None:
        super().__init__(None, why)

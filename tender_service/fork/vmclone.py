"""VM-clone fork: the baseline that clones the whole VM (Mainas, NTUA 2019).

``fork`` snapshots the VM as the child will see it and the child runs as a new
VM in another tender process; globals and the whole heap are private, as
POSIX says.  Pipes the two VMs share become cross-VM pipes (their data and
counts move into the instance supervisor's broker) before the snapshot is
taken.  The parent gets the child's pid; the child resumes after the
``syscall`` with 0.

Where the child runs and how the pipes travel is the ``CloneHost``'s
business (the layers above: transports and the service).
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Protocol

from tender_service.fork.snapshot import SnapshotError, capture
from tender_service.machine.errors import GuestError
from tender_service.rump.kernel import Kernel
from tender_service.rump.process import Lwp, Process

log = logging.getLogger(__name__)


class CloneHost(Protocol):
    """What VM-clone fork needs from the world around the VM."""

    def reserve_pid(self, parent: Process) -> int:
        """An instance-wide pid for the child (GuestError EAGAIN at the limit)."""
        ...

    def share_files(self, k: Kernel, parent: Process, child_pid: int) -> None:
        """Make the parent's pipe ends cross-VM and count the child's references."""
        ...

    def start_child(self, child_pid: int, snapshot: bytes) -> None:
        """Run the snapshot as a new VM elsewhere (GuestError if it cannot)."""
        ...

    def release_pid(self, child_pid: int) -> None:
        """The fork failed after ``reserve_pid``."""
        ...


class VmCloneFork:
    mode = "vmclone"
    #: a child gets a copy of the VM: clone(CLONE_VM) runs on a copy too
    one_address_space = False

    def __init__(self, host: CloneHost) -> None:
        self.host = host
        #: (snapshot bytes, seconds from the fork syscall to the child VM started)
        self.last: tuple[int, float] = (0, 0.0)

    def fork(self, k: Kernel, lwp: Lwp, vfork: bool) -> int:
        t0 = time.perf_counter()
        parent = lwp.proc
        pid = self.host.reserve_pid(parent)
        try:
            self.host.share_files(k, parent, pid)
            try:
                snap = capture(k, lwp, pid)
            except SnapshotError as e:
                raise GuestError(errno.ENOMEM, str(e)) from e
            self.host.start_child(pid, snap)
        except GuestError:
            self.host.release_pid(pid)
            raise
        k.add_remote_child(parent, pid)
        self.last = (len(snap), time.perf_counter() - t0)
        return pid

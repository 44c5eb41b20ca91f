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

from tender_service.fork.snapshot import SnapshotError, capture, capture_program
from tender_service.machine.elf import ElfImage
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

    def child_ended_here(self, child_pid: int, status: int) -> None:
        """A clone(CLONE_VM) child ended in its parent's VM without exec."""
        ...

    def share_exec_files(self, k: Kernel, proc: Process) -> None:
        """Before a clone(CLONE_VM) child's exec: its fds without FD_CLOEXEC go to its
        new VM; pipes become cross-VM (in every local table) and count its refs."""
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

    # -- clone(CLONE_VM) children: in the parent's VM until they exec ------------------
    def reserve_pid(self, parent: Process) -> int:
        """The instance-wide pid of a clone(CLONE_VM) child (it runs here until exec)."""
        return self.host.reserve_pid(parent)

    def child_ended_here(self, pid: int, status: int) -> None:
        """A clone(CLONE_VM) child ended without exec: its leased place is not needed."""
        self.host.child_ended_here(pid, status)

    def exec_elsewhere(
        self,
        k: Kernel,
        lwp: Lwp,
        image: ElfImage,
        execfn: bytes,
        argv: list[bytes],
        env: list[bytes],
    ) -> None:
        """The exec of a clone(CLONE_VM) child: the program starts in a fresh VM of the
        instance with the child's pid, ppid, groups and fds (pipes become cross-VM as at
        a fork); here the child becomes a proxy of a remote child, and its parent, if
        suspended in CLONE_VFORK, runs again.  A failure leaves the child as it was."""
        proc = lwp.proc
        parent = proc.parent
        assert parent is not None  # a clone child has its parent in this VM
        self.host.share_exec_files(k, proc)
        try:
            snap = capture_program(k, lwp, image, execfn, argv, env)
        except SnapshotError as e:
            raise GuestError(errno.ENOMEM, str(e)) from e
        self.host.start_child(proc.pid, snap)
        if k.remote is not None:
            name = execfn.rsplit(b"/", 1)[-1].decode(errors="replace")
            k.remote.renamed(proc.pid, name, proc.exe)
        k.leave_vm(proc)
        k.add_remote_child(parent, proc.pid)

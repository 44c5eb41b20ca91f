"""What a VM is asked to be (``VmConfig``) and what it reports (``RunResult``, ``ProcInfo``).

Plain data, apart from the kernel: the service, the CLI and the harness describe
and read VMs without importing the emulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tender_service.machine.layout import DEFAULT_RAM, DEFAULT_STACK, MAX_RAM, MIN_RAM
from tender_service.rump import signals

#: the default time slice (microseconds of wall time): preemption is on by default
DEFAULT_QUANTUM = 10_000


@dataclass(slots=True)
class VmConfig:
    ram: int = DEFAULT_RAM
    stack_size: int = DEFAULT_STACK
    timeout: float | None = None  # seconds of wall time for the whole VM
    #: microseconds a process runs before it is preempted; 0 = cooperative (Rumprun)
    quantum: int = DEFAULT_QUANTUM
    max_procs: int = 1024
    tty: bool = True
    trace_syscalls: bool = False
    #: bytes the instance's writable file system layer (tmpfs) may hold; ENOSPC past it
    tmpfs_size: int = 64 << 20

    def validate(self) -> None:
        if not MIN_RAM <= self.ram <= MAX_RAM:
            raise ValueError(f"ram must be between {MIN_RAM} and {MAX_RAM} bytes")
        if not 16 << 10 <= self.stack_size <= 64 << 20:
            raise ValueError("stack size must be between 16 KiB and 64 MiB")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.quantum < 0 or self.max_procs < 2:
            raise ValueError("quantum must be >= 0 and max_procs >= 2")
        if self.tmpfs_size < 0:
            raise ValueError("tmpfs_size must be >= 0")


@dataclass(slots=True)
class ProcInfo:
    pid: int
    ppid: int
    name: str
    state: str
    status: int | None
    report: str


#: the steps of a VM-clone fork: parent side, the pid lease from the supervisor, handing
#: pipes and files to it, the snapshot, then StartVm (transfer, the snapshot checked, the
#: reply); ``restore``: the child's restore, reported by its VM (on this host after the
#: reply, off the parent's path; from a peer tender within ``start``)
FORK_PHASES = ("lease", "share", "capture", "start", "restore")
#: forks whose time in the kernel a VM keeps (``RunResult.fork_seconds``): 8 bytes each
FORK_TIMES_KEPT = 100_000


@dataclass(slots=True)
class RunResult:
    """How an instance ended, in every fork mode (``None``: a figure the mode does not keep)."""

    status: int  # wait status of the launched program
    outcome: str  # exited | signaled | timeout | deadlock | killed
    reports: list[str]
    elapsed: float
    forks: int
    syscalls: int | None  # None: spread over several VMs (VM-clone), not counted
    peak_memory: int  # guest memory at most (VM-clone: the sum of every VM's peak)
    processes: list[ProcInfo] = field(default_factory=list)
    #: each fork's time in the parent's kernel (the fork handler: thread and copy fork's
    #: child built, VM-clone's lease, share, capture and start), in the order of the
    #: forks, the first ``FORK_TIMES_KEPT``.  The parent's fork as its program sees it
    #: is this plus the guest's own code (libc's fork path: in a fresh VM, Unicorn
    #: translates it as it first runs)
    fork_seconds: list[float] | None = None
    #: VM-clone: each fork's steps in seconds, by FORK_PHASES name (the forks whose
    #: ``fork_seconds`` are kept: the first ``FORK_TIMES_KEPT``)
    fork_phases: list[dict[str, float]] | None = None

    @property
    def exit_code(self) -> int:
        return signals.shell_code(self.status)

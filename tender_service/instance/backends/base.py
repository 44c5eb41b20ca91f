"""What every fork mode gives its callers: one interface, one result type.

The service, the CLI and the comparison harness start instances through an
``InstanceBackend`` (one per fork mode, looked up by name in
``instance/backends/__init__.py``) and follow them through the
``RunningInstance`` it returns; every mode ends in a ``RunResult``
(``rump/vminfo.py``), with ``None`` in the fields a mode does not measure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tender_service.instance.budget import MemoryBudget
from tender_service.instance.publish import PortMapping
from tender_service.rump.console import Sink
from tender_service.rump.published import OutboundRule
from tender_service.rump.vminfo import ProcInfo, RunResult, VmConfig
from tender_service.transports.channel import PEER_TIMEOUT


@dataclass(slots=True)
class InstanceSpec:
    """One instance to start: the program and how it should run."""

    image: str | Path
    args: Sequence[str] = ()
    env: Sequence[str] | None = None  # None: DEFAULT_ENV
    config: VmConfig | None = None
    argv0: str | None = None  # None: the image's program name
    stdin: bytes | int | None = None  # the guest's stdin (None: EOF)
    transport: str = "shm"  # how pipes between VMs travel, where a mode has several VMs
    placement: str = "local"  # where its VMs may run, where a mode places VMs
    instance_id: str | None = None
    #: bytes of the tender's guest-memory budget already taken for the first VM; the
    #: backend owns them from ``start`` on (it gives them back when the VM ends)
    reserved: int = 0
    #: host ports published to guest ports (``--publish``): one-VM modes run in this
    #: process only (instance/publish.py)
    publish: Sequence[PortMapping] = ()
    #: host destinations the guest may connect to (``--allow-outbound``), the same modes
    outbound: Sequence[OutboundRule] = ()


@dataclass(slots=True)
class VmStatus:
    """A running instance's process table and committed guest memory (0: not measured)."""

    processes: list[ProcInfo]
    committed_memory: int


@dataclass(slots=True)
class BackendContext:
    """What a backend may need from whoever hosts it; each mode reads its own fields.

    The defaults are a one-shot run in this process (``unifork run``, the harness);
    the tender fills in its pool, placement, peers and budget.
    """

    hosted: bool = False  # a tender: no guest code in this process (thread fork: VM processes)
    jailed: bool | None = None  # VM processes jail themselves (None: instance/jail.py decides)
    pool: object | None = None  # a warm pool to place VMs on (None: start one per backend)
    pool_size: int = 2
    placement_for: Callable[[str], object] | None = None  # placement -> pool-like object
    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    self_handle: object | None = None
    peer_timeout: float = PEER_TIMEOUT
    budget: MemoryBudget | None = None
    ticket_for: Callable[[str, int, str], str] | None = None
    #: host addresses an instance never connects out to (a tender's own ports)
    deny_outbound: frozenset[tuple[str, int]] = frozenset()
    #: what backends made from this context share, by name: the one-VM modes (thread,
    #: copy) start their VMs through one fork server ("vm_host"), not a server each
    shared: dict[str, object] = field(default_factory=dict)


class RunningInstance(Protocol):
    """An instance that ``InstanceBackend.start`` started."""

    @property
    def host_pid(self) -> int:
        """The OS pid of the process that runs its only VM (0: several VMs, or unknown)."""
        ...

    @property
    def transport_note(self) -> str:
        """Why pipes travel otherwise than asked ("" if they do not)."""
        ...

    def wait(self) -> RunResult:
        """Run or follow it to its end (its time limit included)."""
        ...

    def kill(self, reason: str = "killed") -> None:
        """End every process of the instance (from any thread)."""
        ...

    def query(self, timeout: float = 2.0) -> VmStatus:
        """The live process table (the last known if no answer comes in ``timeout`` s)."""
        ...

    def close(self) -> None:
        """Release what it holds (after ``wait``)."""
        ...


class InstanceBackend(Protocol):
    """One fork mode: how its instances start, and how its processes are found."""

    mode: str
    #: every process of an instance in one VM: no pipe transport, no placement
    one_vm: bool

    def start(
        self, spec: InstanceSpec, sink: Sink, observer: object | None = None
    ) -> RunningInstance:
        """Start ``spec``; ``observer`` gets the figures (see ``instance/observer.py``)."""
        ...

    def where(self, proc: ProcInfo, host_pid: int) -> tuple[str | None, str]:
        """(tender, OS pid) of the VM that runs ``proc``; tender None for this one."""
        ...

    def close(self) -> None:
        """Stop what the backend started (pools, servers)."""
        ...


def run_instance(
    backend: InstanceBackend, spec: InstanceSpec, sink: Sink, observer: object | None = None
) -> RunResult:
    """Start an instance, wait for its end, release it: a one-shot run."""
    if spec.config is None:
        spec.config = VmConfig()
    spec.config.validate()
    running = backend.start(spec, sink, observer)
    try:
        return running.wait()
    finally:
        running.close()

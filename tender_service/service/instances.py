"""Instances of a tender: launch, follow, wait, kill, describe.

Every fork mode reaches the service through its ``InstanceBackend``
(instance/backends/): a thread-fork instance is one VM in a child process of
its own (an emulator crash ends that instance, not the tender); a VM-clone
instance is a ``Supervisor`` here plus one VM per process on the tender
processes the placement picks (this host's warm pool, or peers).  Guest code
never runs in the tender's own process.
Console output is kept per instance (bounded) so a client can stream it from
the start or live.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tender_service.instance.backends import InstanceBackend, InstanceSpec, RunningInstance
from tender_service.instance.budget import MemoryBudget
from tender_service.instance.publish import PortMapping
from tender_service.rump import signals
from tender_service.rump.published import OutboundRule
from tender_service.rump.vminfo import ProcInfo, VmConfig
from tender_service.service import metrics
from tender_service.service.imagestore import ImageStore, StoredImage
from tender_service.vm import DEFAULT_ENV

log = logging.getLogger(__name__)

CONSOLE_KEEP = 8 << 20  # bytes of console output kept per instance
KEEP_FINISHED = 4096  # finished instances remembered (Wait, Describe, logs) by default


def _waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> Callable[[], None]:
    """A callback any thread may call to set ``event`` on ``loop``."""

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(event.set)

    return wake


class ConsoleLog:
    """An append-only, bounded log of console chunks that followers can tail.

    Followers are coroutines of the gRPC server: they wait holding no thread (a
    thousand idle ``unifork logs -f`` must not take the server's threads)."""

    def __init__(self, keep: int = CONSOLE_KEEP) -> None:
        self.keep = keep
        self.chunks: deque[tuple[int, int, int, bytes]] = deque()  # seq, pid, fd, data
        self.size = 0
        self.seq = 0
        self.closed = False
        self.lock = threading.Lock()
        self.wakers: list[Callable[[], None]] = []  # followers waiting for more

    def _wake(self) -> None:
        wakers, self.wakers = self.wakers, []
        for wake in wakers:
            wake()

    def append(self, pid: int, fd: int, data: bytes) -> None:
        with self.lock:
            self.seq += 1
            self.chunks.append((self.seq, pid, fd, bytes(data)))
            self.size += len(data)
            while self.size > self.keep and len(self.chunks) > 1:
                self.size -= len(self.chunks.popleft()[3])
            self._wake()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._wake()

    async def follow(self, from_start: bool) -> AsyncIterator[tuple[int, int, int, bytes]]:
        loop = asyncio.get_running_loop()
        with self.lock:
            last = 0 if from_start else self.seq
        while True:
            event = asyncio.Event()
            wake = _waker(loop, event)
            with self.lock:
                batch = [c for c in self.chunks if c[0] > last]
                closed = self.closed
                if not batch and not closed:
                    self.wakers.append(wake)
            for c in batch:
                last = c[0]
                yield c
            if batch:
                continue
            if closed:
                return
            try:
                await event.wait()
            finally:
                with self.lock:
                    if wake in self.wakers:
                        self.wakers.remove(wake)


@dataclass(eq=False)
class Instance:
    id: str
    image: StoredImage
    mode: str
    transport: str
    placement: str
    config: VmConfig
    args: list[str]
    env: list[str]
    console: ConsoleLog = field(default_factory=ConsoleLog)
    created: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    running: RunningInstance | None = None  # what its backend follows, until it ends
    last_host_pid: int = 0  # the OS pid of the process that ran its one VM (thread fork)
    result: dict | None = None
    processes: list[ProcInfo] = field(default_factory=list)
    transport_note: str = ""
    killed: bool = False
    #: bytes of the tender's guest-memory budget the instance holds itself (its first
    #: VM's RAM until its backend takes them over, at start)
    reserved: int = 0
    pinned: bool = False  # it holds its image's file in the store
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_done: list[Callable[[], None]] = field(default_factory=list)
    #: host ports asked for (Launch's publish), and as bound once it started
    publish: list[PortMapping] = field(default_factory=list)
    published: list[tuple[str, int, int]] = field(default_factory=list)
    outbound: list[OutboundRule] = field(default_factory=list)  # Launch's allow_outbound

    def finish(self) -> None:
        """Mark the instance done and wake whoever waits for it."""
        with self.lock:
            self.done.set()
            callbacks, self.on_done = self.on_done, []
        for callback in callbacks:
            callback()

    async def wait_done(self, timeout: float | None) -> None:
        """Until the instance ends or ``timeout`` s pass, holding no thread."""
        event = asyncio.Event()
        wake = _waker(asyncio.get_running_loop(), event)
        with self.lock:
            if self.done.is_set():
                return
            self.on_done.append(wake)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self.lock:
                if wake in self.on_done:
                    self.on_done.remove(wake)

    @property
    def state(self) -> str:
        return "done" if self.done.is_set() else "running"

    def process_table(self) -> list[ProcInfo]:
        if self.done.is_set():
            return self.processes
        running = self.running
        return running.query().processes if running is not None else []

    @property
    def host_pid(self) -> int:
        """The OS pid of the process that runs (or ran) its one VM (0: several VMs)."""
        running = self.running
        return running.host_pid if running is not None else self.last_host_pid

    @property
    def note(self) -> str:
        """Why pipes travel otherwise than asked ("" if they do not)."""
        running = self.running
        return self.transport_note or (running.transport_note if running is not None else "")


class MetricsObserver:
    """What a running instance tells the metrics (see instance/backends/base.py).

    ``transport`` and ``placement`` label its figures: "local" for a mode whose
    processes share one VM."""

    def __init__(self, mode: str, transport: str, placement: str) -> None:
        self.mode, self.transport, self.placement = mode, transport, placement
        #: (host IP, host port, guest port) of each published port, as bound
        self.bound: list[tuple[str, int, int]] = []

    def published(self, bound: list[tuple[str, int, int]]) -> None:
        self.bound = list(bound)

    def conn_published(self, outcome: str) -> None:
        metrics.PUBLISHED_CONNECTIONS.labels(self.mode, outcome).inc()

    def conn_bytes(self, direction: str, nbytes: int) -> None:
        metrics.PUBLISHED_BYTES.labels(direction).inc(nbytes)

    def conn_accepted(self, seconds: float) -> None:
        metrics.ACCEPT_LATENCY.labels(self.transport, self.placement).observe(seconds)

    def fork_done(self, seconds: float, snapshot: int, remote: bool) -> None:
        transport = "tcp" if remote else self.transport
        metrics.FORK_LATENCY.labels(self.mode, transport, self.placement).observe(seconds)
        if snapshot:
            metrics.SNAPSHOT_BYTES.observe(snapshot)

    def shm_exhausted(self) -> None:
        metrics.SHM_EXHAUSTED.inc()

    def pipe_write(self, nbytes: int, seconds: float) -> None:
        metrics.PIPE_BYTES.labels(self.transport).inc(nbytes)
        metrics.PIPE_WRITE_LATENCY.labels(self.transport).observe(seconds)

    def pipe_bytes(self, nbytes: int) -> None:
        """Bytes written to pipes over the whole run (a mode that does not time writes)."""
        metrics.PIPE_BYTES.labels(self.transport).inc(nbytes)

    def emulator_crashed(self) -> None:
        metrics.EMULATOR_CRASHES.labels(self.mode).inc()

    def vm_started(self) -> None:
        metrics.VMS.labels(self.mode).inc()

    def vm_ended(self) -> None:
        metrics.VMS.labels(self.mode).dec()


class InstanceManager:
    def __init__(
        self,
        store: ImageStore,
        backends: dict[str, InstanceBackend],
        max_instances: int = 64,
        default_timeout: float = 600.0,
        keep_finished: int = KEEP_FINISHED,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.store = store
        self.budget = budget  # guest RAM of every VM on this tender (--max-guest-memory)
        self.backends = backends  # fork mode -> its backend (instance/backends/)
        self.max_instances = max_instances
        self.default_timeout = default_timeout
        self.keep_finished = keep_finished
        self.instances: dict[str, Instance] = {}
        self.lock = threading.Lock()
        self.accepting = True

    # -- launching ---------------------------------------------------------------------
    def running(self) -> list[Instance]:
        with self.lock:
            return [i for i in self.instances.values() if not i.done.is_set()]

    def launch(
        self,
        image: StoredImage,
        args: list[str],
        env: list[str],
        mode: str,
        transport: str,
        placement: str,
        config: VmConfig,
        publish: list[PortMapping] | None = None,
        outbound: list[OutboundRule] | None = None,
    ) -> Instance:
        """Start an instance (raises OverflowError, naming the limit, when the tender is
        full: too many instances, or not enough guest memory left for its first VM)."""
        inst = Instance(
            uuid.uuid4().hex[:16],
            image,
            mode,
            transport,
            placement,
            config,
            list(args),
            list(env or DEFAULT_ENV),
            publish=list(publish or ()),
            outbound=list(outbound or ()),
        )
        with self.lock:
            if not self.accepting:
                raise RuntimeError("the tender is shutting down")
            if sum(1 for i in self.instances.values() if not i.done.is_set()) >= self.max_instances:
                raise OverflowError(
                    f"instances: {self.max_instances} running of a "
                    f"{self.max_instances} limit (--max-instances)"
                )
            if self.budget is not None:
                self.budget.reserve(config.ram)
                inst.reserved = config.ram
            if not self.store.pin(image):  # deleted since the caller looked it up
                self._release(inst)
                raise LookupError(f"image: {image.name!r} was deleted")
            inst.pinned = True
            self.instances[inst.id] = inst
            self._trim()
        metrics.INSTANCES.labels(mode).inc()
        threading.Thread(
            target=self._run, args=(inst,), name=f"instance-{inst.id}", daemon=True
        ).start()
        return inst

    def _trim(self) -> None:
        """Forget the oldest finished instances beyond ``keep_finished`` (memory stays
        bounded however long the tender serves)."""
        done = [i for i in self.instances.values() if i.done.is_set()]
        for i in sorted(done, key=lambda i: i.created)[: max(0, len(done) - self.keep_finished)]:
            del self.instances[i.id]

    def _run(self, inst: Instance) -> None:
        """Start the instance through its mode's backend, follow it to its end."""
        backend = self.backends[inst.mode]
        many = not backend.one_vm  # figures of one VM's processes are labelled "local"
        spec = InstanceSpec(
            inst.image.path,
            inst.args,
            inst.env,
            inst.config,
            argv0=inst.image.name,
            transport=inst.transport,
            placement=inst.placement,
            instance_id=inst.id,
            publish=inst.publish,
            outbound=inst.outbound,
        )
        observer = MetricsObserver(
            inst.mode, inst.transport if many else "local", inst.placement if many else "local"
        )
        try:
            spec.reserved, inst.reserved = inst.reserved, 0  # the backend's from now on
            running = backend.start(spec, inst.console.append, observer)
            inst.published = observer.bound
            inst.running = running
            if inst.killed:
                running.kill("killed")
            try:
                r = running.wait()
            finally:
                inst.last_host_pid = running.host_pid
                inst.transport_note = running.transport_note
                # finished instances are kept (--keep-finished): with their figures, not
                # their processes, channels, buffers and threads
                running.close()
                inst.running = None
            inst.processes = r.processes
            self._finish(inst, r.status, r.outcome, r.reports, r.elapsed, r.forks, r.peak_memory)
        except Exception as e:  # an instance that cannot even start: report, keep serving
            log.exception("instance %s failed", inst.id)
            self._finish(
                inst,
                signals.signaled_status(signals.SIGKILL),
                "error",
                [f"could not run: {e}"],
                0.0,
                0,
                0,
            )

    def _finish(
        self,
        inst: Instance,
        status: int,
        outcome: str,
        reports: list[str],
        elapsed: float,
        forks: int,
        peak: int,
    ) -> None:
        if inst.killed and outcome not in ("exited", "timeout"):
            outcome = "killed"
        inst.result = dict(
            wait_status=status,
            exit_code=signals.shell_code(status),
            signal=status & 0x7F,
            outcome=outcome,
            duration_seconds=elapsed,
            fork_count=forks,
            peak_guest_memory_bytes=peak,
            reports=reports,
        )
        self._release(inst)  # before done: a waiter may launch again at once
        if inst.pinned:
            inst.pinned = False
            self.store.unpin(inst.image)
        metrics.FINISHED.labels(outcome).inc()
        metrics.INSTANCES.labels(inst.mode).dec()
        inst.console.close()
        inst.finish()

    def _release(self, inst: Instance) -> None:
        if inst.reserved and self.budget is not None:
            self.budget.release(inst.reserved)
        inst.reserved = 0

    # -- queries -------------------------------------------------------------------------
    def get(self, instance_id: str) -> Instance | None:
        with self.lock:
            return self.instances.get(instance_id)

    def list(self) -> list[Instance]:
        with self.lock:
            return sorted(self.instances.values(), key=lambda i: i.created)

    def kill(self, inst: Instance) -> bool:
        if inst.done.is_set():
            return False
        inst.killed = True
        running = inst.running  # it may go away as the instance ends
        if running is not None:
            running.kill("killed")
        return True

    def shutdown(self, grace: float) -> builtins.list[Instance]:  # list: the method above
        """Stop accepting, let running instances finish for ``grace`` s, kill the rest."""
        with self.lock:
            self.accepting = False
        deadline = time.monotonic() + grace
        for inst in self.running():
            inst.done.wait(max(0.0, deadline - time.monotonic()))
        killed = self.running()
        for inst in killed:
            self.kill(inst)
        for inst in killed:
            inst.done.wait(10)
        return killed

    def sample_gauges(self) -> None:
        """Refresh the process and memory gauges (the tender calls it every second)."""
        procs = dict.fromkeys(self.backends, 0)
        memory = 0
        for inst in self.running():
            running = inst.running
            if running is not None:  # one question to the instance's processes for both
                status = running.query(timeout=0.5)
                rows = status.processes
                memory += status.committed_memory
            else:
                rows = inst.process_table()
            procs[inst.mode] += sum(1 for p in rows if p.state == "alive" and p.pid != 1)
        for mode, n in procs.items():
            metrics.PROCESSES.labels(mode).set(n)
        metrics.GUEST_MEMORY.set(memory)

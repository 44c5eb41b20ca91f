"""VM-clone fork as an instance backend: every process of the instance in a VM of its own.

The strategy's code: ``fork/vmclone.py`` (the fork inside a VM) and
``fork/snapshot.py`` (the clone's format); ``transports/`` (channels between a
VM and its supervisor, the cross-VM pipe broker, the VM-side link);
``instance/pool.py``, ``instance/worker.py`` (tender processes that host VMs)
and ``instance/supervisor.py`` (the instance's init, process tree and pipes);
and this module.  A one-shot run starts a warm pool of its own unless the
context gives one; a tender gives its placement (its pool, its peers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tender_service.instance.backends.base import (
    BackendContext,
    InstanceSpec,
    RunningInstance,
    VmStatus,
    run_instance,
)
from tender_service.instance.modes import ONE_VM_MODES
from tender_service.instance.observer import notify
from tender_service.instance.pool import WarmPool
from tender_service.instance.publish import Publisher
from tender_service.instance.supervisor import Supervisor
from tender_service.machine.rootfs import load_image_file, select_program
from tender_service.rump.console import Sink
from tender_service.rump.vminfo import ProcInfo, RunResult, VmConfig
from tender_service.vm import DEFAULT_ENV, _program_name


@dataclass(eq=False)
class SupervisedInstance:
    """A VM-clone instance: its supervisor here, its VMs on tender processes."""

    supervisor: Supervisor
    host_pid: int = 0  # several VMs: each process's row names its own

    @property
    def transport_note(self) -> str:
        return self.supervisor.transport_note

    def wait(self) -> RunResult:
        return self.supervisor.wait()

    def kill(self, reason: str = "killed") -> None:
        self.supervisor.kill(reason)

    def query(self, timeout: float = 2.0) -> VmStatus:
        return VmStatus(self.supervisor.process_table(), 0)

    def close(self) -> None:
        self.supervisor.close()


class VmcloneBackend:
    mode = "vmclone"
    one_vm = mode in ONE_VM_MODES

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self._own_pool: WarmPool | None = None

    def _pool(self, placement: str) -> object:
        if self.ctx.placement_for is not None:
            return self.ctx.placement_for(placement)
        if self.ctx.pool is not None:
            return self.ctx.pool
        if self._own_pool is None:
            self._own_pool = WarmPool(self.ctx.pool_size)
            # a child placed on a process still starting would wait for it (and share
            # the CPU with its start-up): the first fork would pay that
            self._own_pool.wait_ready()
        return self._own_pool

    def start(
        self, spec: InstanceSpec, sink: Sink, observer: object | None = None
    ) -> RunningInstance:
        ctx = self.ctx
        publisher = None
        try:
            if spec.publish or spec.outbound:  # bound now: a port in use fails at once
                publisher = Publisher(spec.publish, spec.outbound)
                if spec.publish:
                    notify(observer, "published", publisher.bound())  # port 0: the one bound
            # refused here, before any VM: a bad image, a program the image lacks
            boot = load_image_file(spec.image)
            select_program(boot, spec.args)
            sup = Supervisor(
                self._pool(spec.placement),
                spec.transport,
                sink,
                spec.config or VmConfig(),
                spec.instance_id,
                listen_host=ctx.listen_host,
                advertise_host=ctx.advertise_host,
                placement=spec.placement,
                observer=observer,  # any subset of InstanceObserver's methods
                self_handle=ctx.self_handle,
                peer_timeout=ctx.peer_timeout,
                budget=ctx.budget,
                ticket_for=ctx.ticket_for,
                stdin=spec.stdin,
                publisher=publisher,
                deny_outbound=ctx.deny_outbound,
            )
        except BaseException:
            if publisher is not None:
                publisher.close()
            if spec.reserved and ctx.budget is not None:
                ctx.budget.release(spec.reserved)
            raise
        try:  # the supervisor owns the reservation from here on
            path = Path(spec.image)
            sup.start(
                str(path.resolve()),
                list(spec.args),
                list(DEFAULT_ENV if spec.env is None else spec.env),
                spec.argv0 or _program_name(path.name),
                spec.reserved,
                rootfs=boot.rootfs,  # every VM of the instance sees this one tree
            )
        except BaseException:
            sup.close()
            raise
        return SupervisedInstance(sup)

    def where(self, proc: ProcInfo, host_pid: int) -> tuple[str | None, str]:
        host, _, vm = proc.name.partition("@")[2].rpartition("/")  # vm@HOST/OS-PID
        return host, vm

    def close(self) -> None:
        if self._own_pool is not None:
            self._own_pool.close()
            self._own_pool = None


def run_vmclone(
    image: str | Path,
    args: Sequence[str] = (),
    env: Sequence[str] | None = None,
    config: VmConfig | None = None,
    sink: Sink | None = None,
    transport: str = "shm",
    pool: WarmPool | None = None,
    pool_size: int = 2,
    argv0: str | None = None,
    observer: object | None = None,
) -> RunResult:
    """One VM-clone instance to its end on ``pool`` (or a pool of its own, stopped after).

    A shorthand for tests and tools over ``run_instance``; ``observer`` gets
    ``fork_done(seconds, snapshot_bytes, remote)`` and ``pipe_write(nbytes, seconds)``.
    """
    backend = VmcloneBackend(BackendContext(pool=pool, pool_size=pool_size))
    try:
        return run_instance(
            backend,
            InstanceSpec(image, args, env, config, argv0=argv0, transport=transport),
            sink or (lambda pid, fd, data: None),
            observer,
        )
    finally:
        backend.close()

"""Thread fork as an instance backend: every process of the instance in one VM.

The strategy's code: ``fork/thread.py`` (the fork itself), ``vm.py`` (one VM:
``create_vm``), ``instance/vmserver.py`` and ``instance/threadvm.py`` (a VM in
a process of its own, for a tender) and this module.  A one-shot run
(``unifork run``, the harness) runs the VM in the calling thread; a tender
(``BackendContext.hosted``) runs each VM in a process of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tender_service.instance.backends.base import (
    BackendContext,
    InstanceSpec,
    RunningInstance,
    VmStatus,
)
from tender_service.instance.budget import MemoryBudget
from tender_service.instance.modes import ONE_VM_MODES
from tender_service.instance.observer import notify
from tender_service.instance.publish import Publisher, PublishError
from tender_service.instance.threadvm import ThreadVm, ThreadVmHost
from tender_service.rump.console import Sink
from tender_service.rump.kernel import Kernel
from tender_service.rump.vminfo import ProcInfo, RunResult, VmConfig
from tender_service.vm import DEFAULT_ENV, _program_name, create_vm


@dataclass(eq=False)
class _Held:
    """Guest-memory budget an instance holds until it ends."""

    budget: MemoryBudget | None
    reserved: int

    def release(self) -> None:
        if self.reserved and self.budget is not None:
            self.budget.release(self.reserved)
        self.reserved = 0


@dataclass(eq=False)
class InProcessVm:
    """A VM that runs in the thread that calls ``wait``."""

    kernel: Kernel
    held: _Held
    transport_note: str = ""
    publisher: Publisher | None = None  # the host ports it serves (--publish)

    @property
    def host_pid(self) -> int:
        return os.getpid()

    def wait(self) -> RunResult:
        return self.kernel.run()

    def kill(self, reason: str = "killed") -> None:
        self.kernel.request_stop(reason)

    def query(self, timeout: float = 2.0) -> VmStatus:
        return VmStatus(self.kernel.process_table(), self.kernel.committed_memory())

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.kernel.close()
        self.held.release()


@dataclass(eq=False)
class HostedVm:
    """A VM in a process of its own (instance/threadvm.py), followed from a tender."""

    vm: ThreadVm
    held: _Held
    observer: object | None
    transport_note: str = ""
    _ended: bool = False

    @property
    def host_pid(self) -> int:
        return self.vm.os_pid

    def wait(self) -> RunResult:
        r = self.vm.wait()
        notify(self.observer, "pipe_bytes", self.vm.pipe_bytes)
        if self.vm.crashed:
            notify(self.observer, "emulator_crashed")
        return r

    def kill(self, reason: str = "killed") -> None:
        self.vm.kill(reason)

    def query(self, timeout: float = 2.0) -> VmStatus:
        return self.vm.query(timeout)

    def close(self) -> None:
        self.held.release()
        if not self._ended:
            self._ended = True
            notify(self.observer, "vm_ended")


class ThreadBackend:
    #: the in-VM fork strategy (vm.py ``make_forker``); CopyBackend changes only this
    mode = "thread"
    one_vm = mode in ONE_VM_MODES

    def __init__(self, ctx: BackendContext) -> None:
        self.budget = ctx.budget
        self.host: ThreadVmHost | None = None
        if ctx.hosted:
            host = ctx.shared.get("vm_host")
            if not isinstance(host, ThreadVmHost):
                host = ctx.shared["vm_host"] = ThreadVmHost(jailed=ctx.jailed)
            self.host = host

    def start(
        self, spec: InstanceSpec, sink: Sink, observer: object | None = None
    ) -> RunningInstance:
        held = _Held(self.budget, spec.reserved)
        config = spec.config or VmConfig()
        if spec.outbound and self.host is not None:
            raise PublishError(
                "a tender's thread- or copy-fork instance does not connect out: its jailed "
                "VM process may not (VM-clone instances do; unifork run --allow-outbound too)"
            )
        try:
            if self.host is None:
                publisher = (
                    Publisher(spec.publish, spec.outbound)
                    if spec.publish or spec.outbound
                    else None
                )
                if publisher is not None and publisher.mappings:
                    notify(observer, "published", publisher.bound())  # port 0: the one bound
                try:
                    k = create_vm(
                        spec.image,
                        spec.args,
                        spec.env,
                        config,
                        sink,
                        spec.stdin,
                        fork=self.mode,
                        argv0=spec.argv0,
                    )
                except BaseException:
                    if publisher is not None:
                        publisher.close()
                    raise
                if observer is not None:
                    k.fork_observer = lambda s: notify(observer, "fork_done", s, 0, False)
                if publisher is not None:
                    publisher.attach(k)
                return InProcessVm(k, held, publisher=publisher)
            # published ports: bound here (a port in use fails the launch), served by the
            # VM's process, which gets the listening sockets (ours are closed after)
            ports = Publisher(spec.publish) if spec.publish else None
            notify(observer, "vm_started")
            try:
                if ports is not None:
                    notify(observer, "published", ports.bound())
                vm = self.host.launch(
                    spec.instance_id or "",
                    str(spec.image),
                    list(spec.args),
                    list(DEFAULT_ENV if spec.env is None else spec.env),
                    config,
                    spec.argv0 or _program_name(Path(spec.image).name),
                    sink,
                    lambda s: notify(observer, "fork_done", s, 0, False),
                    fork=self.mode,
                    publish=ports.bound() if ports is not None else (),
                    listeners=ports.listener_fds() if ports is not None else (),
                )
            except BaseException:
                notify(observer, "vm_ended")
                raise
            finally:
                if ports is not None:
                    ports.close()
            return HostedVm(vm, held, observer)
        except BaseException:
            held.release()
            raise

    def where(self, proc: ProcInfo, host_pid: int) -> tuple[str | None, str]:
        return None, str(host_pid or "")  # the instance's one VM, on this tender

    def close(self) -> None:
        if self.host is not None:
            self.host.close()

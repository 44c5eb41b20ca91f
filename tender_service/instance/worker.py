"""A worker process that hosts VMs for VM-clone instances (the peer API server).

``python -m tender_service.instance.worker --listen unix:/path`` serves the
gRPC ``Peer`` service.  ``StartVm`` boots an image or resumes a snapshot as a
new VM in this process (one thread per VM; Unicorn releases the GIL while
guest code runs), connects it to its instance's supervisor over the
instance's transport, and answers once the VM is running.  A worker hosts
any number of VMs; it exits when its parent process goes away.

A worker's socket is private to its tender (a directory only the tender's
user can enter); even so a worker never opens a file named by a caller: a VM
boots from the image's bytes, sent along and checked against their SHA-256,
or resumes from a snapshot.  A worker holds no credential: a clone placed on
a peer tender goes through this worker's own tender (the relay, whose Unix
socket it is told in UNIFORK_PEER_RELAY), carrying the single-use ticket the
supervisor handed out with the fork lease.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from tender_service import protos
from tender_service.fork.snapshot import Snapshot, SnapshotError, capture, decode, restore
from tender_service.fork.vmclone import VmCloneFork
from tender_service.instance import jail, localstart
from tender_service.instance.childproc import setup_child
from tender_service.instance.vmserver import tiny_elf, warm_up
from tender_service.machine.cpu import keep_spare_engine
from tender_service.machine.elf import parse_elf
from tender_service.machine.errors import GuestError, ImageError
from tender_service.machine.rootfs import BootImage, parse_image
from tender_service.rump.console import Console
from tender_service.rump.files import File
from tender_service.rump.kernel import Kernel
from tender_service.rump.process import Process
from tender_service.rump.vminfo import VmConfig
from tender_service.transports.channel import (
    PEER_TIMEOUT,
    Channel,
    ChannelClosed,
    connect_channel,
    keep_alive,
)
from tender_service.transports.frames import ProtocolError
from tender_service.transports.vmlink import VmLink
from tender_service.vm import boot_kernel, create_vm

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_SNAPSHOT = 1 << 32
#: the largest image a VM boots from (the tender's --max-upload is at most this)
MAX_IMAGE = 64 << 20


def default_receive_budget() -> int:
    """Bytes all StartVm calls of one tender process may hold at once: a quarter of
    the host's RAM, at most one largest snapshot."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return MAX_SNAPSHOT
    return max(CHUNK, min(MAX_SNAPSHOT, ram // 4))


#: how VMs hosted here name their host in describe (a tender's advertised address)
HOST_NAME_ENV = "UNIFORK_HOST_NAME"
#: unix:PATH of this worker's tender's relay: clones bound for peer tenders go there
RELAY_ENV = "UNIFORK_PEER_RELAY"
#: metadata of a relayed StartVm: the peer tender (its peer address) to start the VM on
TARGET_KEY = "unifork-target"
#: metadata of a StartVm a VM's clone makes: its supervisor's ticket for it
TICKET_KEY = "unifork-ticket"


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A stream socket to ``tcp:HOST:PORT`` or ``unix:PATH``."""
    if address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(address[5:])
        s.settimeout(None)
        return s
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in address {address[:80]!r}")
        return socket.create_connection((host, int(port)), timeout=timeout)
    raise ValueError(f"bad address {address[:80]!r}")


def vm_chunks(start: dict, snapshot: bytes | None, image: bytes | None = None):
    """The VmChunk stream of one StartVm: the header, then the snapshot or the image."""
    pb2, _ = protos.peer()
    yield pb2.VmChunk(start=pb2.VmStart(**start))
    if snapshot:
        for off in range(0, len(snapshot), CHUNK):
            yield pb2.VmChunk(snapshot=snapshot[off : off + CHUNK])
    if image:
        for off in range(0, len(image), CHUNK):
            yield pb2.VmChunk(image=image[off : off + CHUNK])


def send_vm(
    address: str,
    chunks,
    timeout: float = 30.0,
    channel: grpc.Channel | None = None,
    metadata: list[tuple[str, str]] | None = None,
    keep: bool = False,
):
    """Call ``Peer.StartVm`` with ``chunks`` at ``address`` (or on ``channel``).

    ``keep``: use (and keep for the next call) this process's channel to
    ``address``, as a VM that forks does: a new channel each fork would pay the
    connection and its HTTP/2 handshake (2-4 ms of a fork).  A channel whose
    call fails is dropped, so a worker that died is dialled anew.
    """
    _, pb2_grpc = protos.peer()
    if channel is not None:
        return pb2_grpc.PeerStub(channel).StartVm(chunks, timeout=timeout, metadata=metadata)
    if not keep:
        with _new_channel(address) as ch:
            return pb2_grpc.PeerStub(ch).StartVm(chunks, timeout=timeout, metadata=metadata)
    ch = _KEPT.get(address)
    try:
        return pb2_grpc.PeerStub(ch).StartVm(chunks, timeout=timeout, metadata=metadata)
    except grpc.RpcError:
        _KEPT.drop(address, ch)
        raise


def _new_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])


class _KeptChannels:
    """The channels a process's forks keep: the ``limit`` most recently used."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_address: collections.OrderedDict[str, grpc.Channel] = collections.OrderedDict()

    def get(self, address: str) -> grpc.Channel:
        old = None
        with self._lock:
            ch = self._by_address.pop(address, None) or _new_channel(address)
            self._by_address[address] = ch
            if len(self._by_address) > self.limit:
                _, old = self._by_address.popitem(last=False)
        if old is not None:
            old.close()
        return ch

    def drop(self, address: str, ch: grpc.Channel) -> None:
        with self._lock:
            if self._by_address.get(address) is ch:
                del self._by_address[address]
        ch.close()


_KEPT = _KeptChannels()
#: the connections this process's forks keep to the local pool processes
_LOCAL = localstart.Connections()


def start_vm(
    address: str,
    start: dict,
    snapshot: bytes | None,
    timeout: float = 30.0,
    image: bytes | None = None,
    channel: grpc.Channel | None = None,
    metadata: list[tuple[str, str]] | None = None,
    keep: bool = False,
):
    """Call ``Peer.StartVm`` at ``address`` (or on ``channel``); its VmStarted reply."""
    return send_vm(address, vm_chunks(start, snapshot, image), timeout, channel, metadata, keep)


def start_vm_from_here(address: str, start: dict, snapshot: bytes) -> object:
    """Start a clone from a VM of this worker: on a worker of this host directly; on a
    tender through this worker's own (the relay, which dials with the tender's TLS
    identity), with the supervisor's ticket standing in for the peer token.  Returns
    the VmStarted reply."""
    start = dict(start)
    ticket = start.pop("ticket", "")
    if address.startswith("unix:"):  # a pool process of this host: no gRPC
        return _LOCAL.start(address, start, snapshot)
    relay = os.environ.get(RELAY_ENV)
    if not relay:
        raise GuestError(errno.EAGAIN, "no relay to reach peer tenders from this worker")
    metadata = [(TARGET_KEY, address)] + ([(TICKET_KEY, ticket)] if ticket else [])
    return start_vm(relay, start, snapshot, metadata=metadata, keep=True)


@dataclass
class ForkTimes:
    """When each step of one VM-clone fork ended (perf_counter seconds), for the
    breakdown the supervisor keeps (``RunResult.fork_phases``)."""

    begun: float
    leased: float = 0.0
    shared: float = 0.0  # pipe ends and open files handed to the broker
    captured: float = 0.0  # the snapshot is made (start_child is called)

    def phases(self, started: float, restore: float) -> list[int]:
        """Microseconds of lease, share, capture, start (transfer, the snapshot checked,
        the reply) and what StartVm spent restoring before it answered (a fork on this
        host restores after: its child's VM reports that restore, ``vm_restored``)."""
        return [
            int((b - a) * 1e6)
            for a, b in (
                (self.begun, self.leased),
                (self.leased, self.shared),
                (self.shared, self.captured),
                (self.captured, started),
                (0.0, restore),
            )
        ]


class WorkerCloneHost:
    """VM-clone fork as seen from a VM in this tender process."""

    def __init__(self, link: VmLink, start: dict) -> None:
        self.link = link
        self.start = start
        self._leases: dict[int, tuple[str, dict]] = {}  # pid -> (worker address, start)
        self._times: dict[int, ForkTimes] = {}

    def reserve_pid(self, parent: Process) -> int:
        t0 = time.perf_counter()
        value, payload = self.link.call_full("fork_lease")
        if value < 0:
            raise GuestError(-value, "the supervisor refused the fork")
        lease = json.loads(payload)
        self._leases[value] = (lease["worker"], lease["start"])
        self._times[value] = ForkTimes(t0, time.perf_counter())
        return value

    def share_files(self, k: Kernel, parent: Process, child_pid: int) -> None:
        self.link.share_files(k, parent, child_pid)
        self._times[child_pid].shared = time.perf_counter()

    def child_ended_here(self, child_pid: int, status: int) -> None:
        self._leases.pop(child_pid, None)
        times = self._times.pop(child_pid, None)
        # all a clone(CLONE_VM) child's creation cost here is the lease
        micros = int((times.leased - times.begun) * 1e6) if times else 0
        self.link.call("vm_child_exited", child_pid, status, micros)

    def share_exec_files(self, k: Kernel, proc: Process) -> None:
        # every local table that holds one of the pipes must use the broker from now on
        self.link.make_remote([p for p in k.procs.values() if p.alive and not p.remote])
        files = [e.file for e in proc.fds.entries.values() if not e.cloexec]
        self.link.add_holder(files, proc.pid)

    def start_child(self, child_pid: int, snapshot: bytes) -> None:
        times = self._times.get(child_pid)
        if times is not None:
            times.captured = times.captured or time.perf_counter()
        address, start = self._leases.pop(child_pid)
        # not a retry of the same call (no backoff wanted): each attempt goes to another
        # place the supervisor picks, while the forking guest waits in fork()
        for attempt in range(3):
            try:
                started = start_vm_from_here(address, start, snapshot)
                break
            except (grpc.RpcError, localstart.StartFailed) as e:
                # that tender process is gone or refuses: ask for another place
                value, payload = self.link.call_full("fork_relocate", child_pid)
                if value < 0 or attempt == 2:
                    raise GuestError(
                        errno.EAGAIN, f"no tender process took the child: {e.details()}"
                    ) from e
                lease = json.loads(payload)
                address, start = lease["worker"], lease["start"]
        now = time.perf_counter()
        times = self._times.pop(child_pid, None) or ForkTimes(now, now, now, now)
        phases = times.phases(now, float(getattr(started, "restore_seconds", 0.0)))
        # the whole fork in the parent's kernel, its lease included (RunResult.fork_seconds)
        micros = int((now - times.begun) * 1e6)
        # one way: the parent's fork returns without waiting for the supervisor
        self.link.notify_call("fork_started", child_pid, micros, len(snapshot), *phases)

    def release_pid(self, child_pid: int) -> None:
        self._leases.pop(child_pid, None)
        self._times.pop(child_pid, None)
        self.link.call("fork_failed", child_pid)


class PeerServicer:
    """The ``Peer`` service of a worker process."""

    def __init__(self, stop: threading.Event, receive_budget: int | None = None) -> None:
        self.stop = stop
        #: running VMs by (instance, pid): pids repeat across instances
        self.vms: dict[tuple[str, int], Kernel] = {}
        self.lock = threading.Lock()
        self.starting = 0  # StartVm calls in progress: a snapshot arriving, a VM restoring
        #: bytes of snapshots and images the StartVm calls in progress hold, and the cap
        self.receiving = 0
        self.receive_budget = receive_budget or default_receive_budget()

    def StartVm(self, request_iterator, context):  # noqa: N802 - gRPC's name
        held = [0]  # bytes this call holds against the receive budget
        with self.lock:
            self.starting += 1
        try:
            return self._start_vm(request_iterator, held)
        except localstart.Refused as e:
            context.abort(getattr(grpc.StatusCode, e.code), e.details)
        finally:
            self._release(held)

    def start_local(
        self, start: dict, snapshot_len: int, receive: Callable[[memoryview], None]
    ) -> localstart.Started:
        """StartVm from a VM of this host (instance/localstart.py): the same checks and
        the same answer as the gRPC call's, the snapshot read straight into one buffer."""
        pb2, _ = protos.peer()
        held = [0]
        with self.lock:
            self.starting += 1
        try:
            try:
                start_msg = pb2.VmStart(**start)
            except (ValueError, TypeError) as e:
                raise localstart.Refused("INVALID_ARGUMENT", f"start: {e}") from None
            self._hold(held, "snapshot", snapshot_len)
            snapshot = bytearray(snapshot_len)
            receive(memoryview(snapshot))
            started, vm = self._launch(start_msg, snapshot, b"", held=held)
            return localstart.Started(
                started.pid, started.host_pid, started.host, started.restore_seconds, vm.start
            )
        finally:
            self._release(held)

    def _release(self, held: list[int]) -> None:
        """A StartVm call, or the restore it left to its VM's thread, is over: what it
        held of the receive budget is free."""
        with self.lock:
            self.starting -= 1
            self.receiving -= held[0]
            held[0] = 0

    def _hold(self, held: list[int], kind: str, n: int) -> None:
        """Count ``n`` more bytes of a call against the receive budget (Refused if over)."""
        if held[0] + n > (MAX_SNAPSHOT if kind == "snapshot" else MAX_IMAGE):
            raise localstart.Refused("RESOURCE_EXHAUSTED", f"{kind}: too large")
        with self.lock:  # all calls together: a bound on what peers can make us hold
            full = self.receiving + n > self.receive_budget
            if not full:
                self.receiving += n
                held[0] += n
        if full:
            raise localstart.Refused(
                "RESOURCE_EXHAUSTED",
                f"{kind}: this tender process is receiving {self.receiving} bytes "
                f"of VMs already (budget {self.receive_budget}): place it elsewhere",
            )

    def _start_vm(self, request_iterator, held: list[int]):
        start_msg = None
        parts: list[bytes] = []
        image: list[bytes] = []
        for chunk in request_iterator:
            kind = chunk.WhichOneof("part")
            if kind == "start":
                start_msg = chunk.start
                continue
            data = chunk.snapshot if kind == "snapshot" else chunk.image
            self._hold(held, kind, len(data))
            (parts if kind == "snapshot" else image).append(data)
        if start_msg is None:
            raise localstart.Refused("INVALID_ARGUMENT", "start: missing")
        started, vm = self._launch(start_msg, b"".join(parts), b"".join(image), True)
        vm.start()
        return started

    def _launch(
        self,
        start_msg,
        snapshot: bytes | bytearray,
        image: bytes,
        connect_first: bool = False,
        held: list[int] | None = None,
    ):
        """Build the VM of a StartVm and its thread (which connects it to its supervisor,
        then runs it; the caller starts it, a local fork's once its reply is sent); the
        VmStarted reply and the thread.

        ``connect_first`` (gRPC: VMs from peer tenders, the relay, an instance's first
        VM): the channel is connected before the reply, and a supervisor that cannot
        be reached is UNAVAILABLE to the caller.  A fork on this host (the local
        socket) does not wait for it (see ``_connect``), nor for the restore: its
        snapshot is checked (``decode``) before the reply and restored on the VM's
        thread after it, as Linux's fork returns before the child first runs (the
        restore was 1.5-2.8 ms of a ~5.5 ms fork).  ``held``: the call's part of the
        receive budget, which a restore left to the VM's thread keeps until it ends."""
        pb2, _ = protos.peer()
        t0 = time.perf_counter()
        start = {f.name: getattr(start_msg, f.name) for f in start_msg.DESCRIPTOR.fields}
        start["args"], start["env"] = list(start["args"]), list(start["env"])
        later: tuple[Snapshot, list[int]] | None = None
        try:
            if snapshot and not connect_first and held is not None:
                later = (decode(snapshot), [0])
                k, link = None, VmLink(None, int(start["pid"]))
            else:
                k, link = self._build(start, snapshot, image, connect_first)
        except (ImageError, SnapshotError, ValueError) as e:
            raise localstart.Refused("INVALID_ARGUMENT", f"cannot start the VM: {e}") from None
        except (ProtocolError, ChannelClosed, OSError) as e:
            # what the other end sent is not echoed: it may be anything (finding 4)
            log.warning(
                "instance %.64r pid %d: the supervisor could not be reached (%s)",
                start["instance_id"],
                start["pid"],
                type(e).__name__,
            )
            raise localstart.Refused(
                "UNAVAILABLE",
                "cannot reach the supervisor: it refused, did not answer, or did "
                "not answer as the instance's supervisor",
            ) from None
        if later is not None and held is not None:
            with self.lock:  # the budget and the count of starts go to the VM's thread
                self.starting += 1
            later[1][0], held[0] = held[0], 0
        vm = threading.Thread(
            target=self._run,
            args=(k, link, start, later),
            daemon=True,
            name=f"vm-{start['instance_id']}-{start['pid']}",
        )
        started = pb2.VmStarted(
            pid=start["pid"],
            host_pid=os.getpid(),
            host=os.environ.get(HOST_NAME_ENV) or socket.gethostname(),
            restore_seconds=time.perf_counter() - t0,
        )
        return started, vm

    def GetLoad(self, request, context):  # noqa: N802 - gRPC's name
        pb2, _ = protos.peer()
        with self.lock:
            vms = list(self.vms.values())
        return pb2.Load(
            vms=len(vms),
            guest_memory_bytes=sum(k.committed_memory() for k in vms),
            cpu_seconds=time.process_time(),
        )

    def _build(
        self,
        start: dict,
        snapshot: bytes | bytearray,
        image_data: bytes = b"",
        connect_first: bool = False,
    ) -> tuple[Kernel, VmLink]:
        """The VM of a StartVm, ready to run; connected to its supervisor (once what
        was sent is checked, before the VM is built) only if ``connect_first``."""
        state, image = self._check(start, snapshot, image_data)
        link = VmLink(self._open_channel(start) if connect_first else None, int(start["pid"]))
        try:
            return self._kernel(start, link, state, image), link
        except Exception:
            link.close()
            raise

    @staticmethod
    def _check(
        start: dict, snapshot: bytes | bytearray, image_data: bytes
    ) -> tuple[Snapshot | None, BootImage | None]:
        """What a StartVm sent, parsed and checked: a snapshot, or an image whose bytes
        match their SHA-256 (ValueError, SnapshotError, ImageError if not)."""
        if snapshot:
            return decode(snapshot), None
        if not image_data:
            raise ValueError("image: missing (a VM boots from the image's bytes)")
        if not hmac.compare_digest(
            hashlib.sha256(image_data).hexdigest(), str(start["image_sha256"]).lower()
        ):
            raise ValueError("image_sha256: does not match the image sent")
        return None, parse_image(image_data, start["argv0"] or "image")

    def _kernel(
        self,
        start: dict,
        link: VmLink,
        state: Snapshot | None,
        image: BootImage | None,
    ) -> Kernel:
        """The VM of a checked StartVm: ``state`` restored, or ``image`` booted."""
        console = Console(link.console_sink, stdin=link.stdin(), tty=bool(start["tty"]))
        forker = VmCloneFork(WorkerCloneHost(link, start))
        timeout = float(start["timeout_seconds"]) or None
        if state is not None:
            return restore(state, console, forker, link.make_file, timeout)
        assert image is not None
        config = VmConfig(
            ram=int(start["ram_bytes"]),
            stack_size=int(start["stack_bytes"]),
            quantum=int(start["quantum"]),
            max_procs=int(start["max_procs"]),
            tty=bool(start["tty"]),
            timeout=timeout,
        )
        return boot_kernel(
            image,
            start["args"],
            start["env"],
            config,
            console,
            forker,
            argv0=start["argv0"] or image.elf.name,
        )

    def _connect(self, start: dict, link: VmLink) -> None:
        """Open the VM's channel to its supervisor, unless StartVm did already.

        Done on the VM's thread after StartVm has answered: the forking parent
        does not wait for it (the supervisor queues what it sends the VM until
        this hello, and reports the VM lost if the hello never comes)."""
        if not link.connected:
            link.connect(self._open_channel(start))

    def _open_channel(self, start: dict) -> Channel:
        """The VM's channel to its supervisor (its hello says who it is)."""
        pid = int(start["pid"])
        hello = {
            "token": start["instance_token"],
            "pid": pid,
            "host_pid": os.getpid(),
            "host": os.environ.get(HOST_NAME_ENV) or socket.gethostname(),
        }
        channel = connect_channel(start["transport"], self._dial(start), True, hello)
        if channel.fallback:  # no memory for an shm segment: frames go over the socket
            log.warning(
                "instance %s pid %d: %s: using tcp", start["instance_id"], pid, channel.fallback
            )
        return channel

    @staticmethod
    def _dial(start: dict) -> socket.socket:
        sock = connect(start["supervisor"])
        try:
            keep_alive(sock, float(start.get("peer_timeout_seconds") or PEER_TIMEOUT))
        except (OSError, ValueError):
            sock.close()
            raise
        return sock

    def _run(
        self,
        k: Kernel | None,
        link: VmLink,
        start: dict,
        later: tuple[Snapshot, list[int]] | None = None,
    ) -> None:
        """Connect the VM to its supervisor, restore it if StartVm left that to this
        thread (``later``: the checked snapshot and the budget it holds), run it."""
        key = (start["instance_id"], start["pid"])
        try:
            self._connect(start, link)
        except (ProtocolError, ChannelClosed, OSError, ValueError) as e:
            # what the other end sent is not echoed: it may be anything (finding 4); the
            # supervisor, which never got our hello, reports the VM lost
            log.warning(
                "instance %.64r pid %d: the supervisor could not be reached (%s): "
                "the VM does not run",
                start["instance_id"],
                start["pid"],
                type(e).__name__,
            )
            link.close()
            if k is not None:
                k.close()
            if later is not None:
                self._release(later[1])
            return
        if later is not None:
            k = self._restore_later(start, link, *later)
            if k is None:
                return
        assert k is not None
        link.attach(k)
        with self.lock:
            self.vms[key] = k
        try:
            k.run()
        except Exception:
            log.exception("VM of instance %s pid %d failed", *key)
        finally:
            with self.lock:
                self.vms.pop(key, None)
            link.close()
            k.close()
            keep_spare_engine()  # for the next VM this process hosts (a fork's restore)

    def _restore_later(
        self, start: dict, link: VmLink, state: Snapshot, held: list[int]
    ) -> Kernel | None:
        """The restore a fork's StartVm answered before (``_launch``), on the VM's
        thread, its VM connected already: its time goes to the supervisor (the fork's
        'restore' step, off the parent's path); if it fails, the supervisor is told and
        reports the process killed by SIGKILL at once (None)."""
        t0 = time.perf_counter()
        try:
            k = self._kernel(start, link, state, None)
        except Exception as e:  # a bad snapshot or no memory: the child dies, not us
            log.warning(
                "instance %.64r pid %d: the snapshot could not be restored (%s: %.200s): "
                "the process is killed",
                start["instance_id"],
                start["pid"],
                type(e).__name__,
                e,
            )
            with contextlib.suppress(ChannelClosed, OSError):
                link.notify_call("vm_unrestorable")
            link.close()
            return None
        finally:
            self._release(held)
        link.notify_call("vm_restored", int((time.perf_counter() - t0) * 1e6))
        return k


#: snapshots the warm-up takes and restores (CPython specializes code after ~8 runs)
WARM_CLONES = 10


def _no_remote_files(state: dict) -> File:
    raise SnapshotError("the warm-up VM holds no file of another VM")


def warm_up_clone_paths(rounds: int = WARM_CLONES) -> None:
    """Take ``rounds`` snapshots of a booted warm-up VM and restore each (never run):
    the capture, check and restore code of a fork then runs warm the first time a VM
    of this process forks or is forked here (cold, they were ~1-2 ms of a
    fresh pool's first fork: issue 17, item 5).  Ends with an engine kept for the
    next VM."""
    k = create_vm(parse_elf(tiny_elf(), "warm-up"), sink=lambda pid, fd, data: None)
    try:
        main = k.main
        assert main is not None  # a booted VM has its first program's process
        for i in range(rounds):
            state = decode(capture(k, main.lwps[0], main.pid + 1 + i))
            restore(state, Console(lambda pid, fd, data: None), None, _no_remote_files).close()
    finally:
        k.close()
    keep_spare_engine()


class _Context(logging.Filter):
    """Put the tender process, instance and guest pid in front of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = threading.current_thread().name  # VM threads are vm-<instance>-<pid>
        where = ""
        if name.startswith(("vm-", "vmlink-")):
            parts = name.split("-")
            where = (
                f" instance {parts[1]} pid {parts[-1]}" if len(parts) == 3 else f" pid {parts[-1]}"
            )
        record.msg = f"[worker {os.getpid()}{where}] {record.getMessage()}"
        record.args = None
        return True


def _parent_watch() -> int | None:
    """A pidfd of the parent (the tender): readable the moment it dies.  Opened before
    the jail, which denies pidfd_open; None where the kernel has no pidfds."""
    try:
        return os.pidfd_open(os.getppid())
    except (AttributeError, OSError):
        return None


def serve(listen: str, ready=None, parent_fd: int | None = None) -> None:
    protos.ensure()
    # a VM's first boot or restore in this process would import and set up lazily
    # what the kernel needs (the syscall table, Unicorn): pay it before taking work
    warm_up()
    warm_up_clone_paths()
    _, pb2_grpc = protos.peer()
    stop = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    servicer = PeerServicer(stop)
    pb2_grpc.add_PeerServicer_to_server(servicer, server)
    server.add_insecure_port(listen)
    server.start()
    path = localstart.local_path(listen)
    local = localstart.Server(path, servicer.start_local) if path else None
    with grpc.insecure_channel(listen) as ch:  # warm the client side too: start_vm's
        pb2_grpc.PeerStub(ch).GetLoad(protos.peer()[0].LoadRequest(), timeout=30)  # first call
    parent = os.getppid()
    if ready is not None:
        ready.set()
    else:
        sys.stdout.write("READY\n")  # the handshake for a worker started by hand
        sys.stdout.flush()
    # the pool's process (the tender) gone: so are we, at once, with the VMs we host (a
    # VM must not outlive its tender: its supervisor on another host sees it die)
    while not stop.is_set() and os.getppid() == parent:
        if parent_fd is None:
            stop.wait(0.5)
        elif select.select([parent_fd], [], [], 0.5)[0]:
            break
    if local is not None:
        local.close()
    server.stop(1)


def run_worker(
    listen: str, log_queue, env: dict[str, str], level: int, ready, jailed: bool = True
) -> None:
    """Entry point of a pool worker (a spawned multiprocessing.Process).

    Its log records travel through ``log_queue`` to the pool's
    multiprocessing-logging handler, so they reach the tender's own handlers.
    ``jailed``: first of all, while it has one thread, it jails itself (instance/jail.py).
    """
    os.environ.update(env)
    parent_fd = _parent_watch()
    # no credential: clones to peers go through the tender's relay with a one-use ticket
    report = jail.jail_worker(keep_env=(HOST_NAME_ENV, RELAY_ENV)) if jailed else None
    handler = logging.handlers.QueueHandler(log_queue)
    handler.addFilter(_Context())
    setup_child(handler, level)
    if report is None:
        log.warning("this tender process runs VMs unjailed (--no-jail)")
    else:
        log.info("%s", report.line())
    serve(listen, ready, parent_fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * a.verbose,
        stream=sys.stderr,
        format="unifork: %(levelname)s: %(message)s",
    )
    logging.getLogger().handlers[0].addFilter(_Context())
    serve(a.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())

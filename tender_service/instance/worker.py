"""A tender process that hosts VMs for VM-clone instances (the peer API server).

``python -m tender_service.instance.worker --listen unix:/path`` serves the
gRPC ``Peer`` service.  ``StartVm`` boots an image or resumes a snapshot as a
new VM in this process (one thread per VM; Unicorn releases the GIL while
guest code runs), connects it to its instance's supervisor over the
instance's transport, and answers once the VM is running.  A worker hosts
any number of VMs; it exits when its parent process goes away.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import os
import socket
import sys
import threading
import time
from concurrent import futures

import grpc

from tender_service import protos
from tender_service.fork.snapshot import SnapshotError, decode, restore
from tender_service.fork.vmclone import VmCloneFork
from tender_service.instance import jail
from tender_service.instance.childproc import setup_child
from tender_service.instance.vmserver import warm_up
from tender_service.machine.elf import load_elf_file, parse_elf
from tender_service.machine.errors import GuestError, ImageError
from tender_service.rump.console import Console
from tender_service.rump.kernel import Kernel
from tender_service.rump.process import Process
from tender_service.rump.vminfo import VmConfig
from tender_service.transports.channel import (
    PEER_TIMEOUT,
    SHM_FALLBACK_KEY,
    ChannelClosed,
    ShmExhausted,
    connect_channel,
    keep_alive,
)
from tender_service.transports.frames import ProtocolError
from tender_service.transports.vmlink import VmLink

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_SNAPSHOT = 1 << 32


def default_receive_budget() -> int:
    """Bytes all StartVm calls of one tender process may hold at once: a quarter of
    the host's RAM, at most one largest snapshot."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return MAX_SNAPSHOT
    return max(CHUNK, min(MAX_SNAPSHOT, ram // 4))
PEER_TOKEN_ENV = "UNIFORK_PEER_TOKEN"
#: how VMs hosted here name their host in describe (a tender's advertised address)
HOST_NAME_ENV = "UNIFORK_HOST_NAME"


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


def start_vm(address: str, start: dict, snapshot: bytes | None, timeout: float = 30.0,
             image: bytes | None = None):
    """Call ``Peer.StartVm`` on the tender process at ``address``; its VmStarted reply.

    Peers on other hosts want the cluster's bearer token (UNIFORK_PEER_TOKEN).
    """
    pb2, pb2_grpc = protos.peer()
    token = os.environ.get(PEER_TOKEN_ENV)
    metadata = [("authorization", f"Bearer {token}")] if token else None

    def chunks():
        yield pb2.VmChunk(start=pb2.VmStart(**start))
        if snapshot:
            for off in range(0, len(snapshot), CHUNK):
                yield pb2.VmChunk(snapshot=snapshot[off : off + CHUNK])
        if image:
            for off in range(0, len(image), CHUNK):
                yield pb2.VmChunk(image=image[off : off + CHUNK])

    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        return pb2_grpc.PeerStub(ch).StartVm(chunks(), timeout=timeout, metadata=metadata)


class WorkerCloneHost:
    """VM-clone fork as seen from a VM in this tender process."""

    def __init__(self, link: VmLink, start: dict) -> None:
        self.link = link
        self.start = start
        self._leases: dict[int, str] = {}
        self._t0: dict[int, float] = {}

    def reserve_pid(self, parent: Process) -> int:
        value, payload = self.link.call_full("fork_lease")
        if value < 0:
            raise GuestError(-value, "the supervisor refused the fork")
        lease = json.loads(payload)
        self._leases[value] = (lease["worker"], lease["start"])
        self._t0[value] = time.perf_counter()
        return value

    def share_files(self, k: Kernel, parent: Process, child_pid: int) -> None:
        self.link.share_files(k, parent, child_pid)

    def start_child(self, child_pid: int, snapshot: bytes) -> None:
        address, start = self._leases.pop(child_pid)
        for attempt in range(3):
            try:
                start_vm(address, start, snapshot)
                break
            except grpc.RpcError as e:
                # that tender process is gone or refuses: ask for another place
                value, payload = self.link.call_full("fork_relocate", child_pid)
                if value < 0 or attempt == 2:
                    raise GuestError(errno.EAGAIN,
                                     f"no tender process took the child: {e.details()}") from e
                lease = json.loads(payload)
                address, start = lease["worker"], lease["start"]
        micros = int((time.perf_counter() - self._t0.pop(child_pid)) * 1e6)
        self.link.call("fork_started", child_pid, micros, len(snapshot))

    def release_pid(self, child_pid: int) -> None:
        self._leases.pop(child_pid, None)
        self._t0.pop(child_pid, None)
        self.link.call("fork_failed", child_pid)


class PeerServicer:
    """The ``Peer`` service of a worker tender process."""

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
            return self._start_vm(request_iterator, context, held)
        finally:
            with self.lock:
                self.starting -= 1
                self.receiving -= held[0]

    def _start_vm(self, request_iterator, context, held: list[int]):
        pb2, _ = protos.peer()
        start_msg, parts, image = None, [], []
        for chunk in request_iterator:
            kind = chunk.WhichOneof("part")
            if kind == "start":
                start_msg = chunk.start
                continue
            data = chunk.snapshot if kind == "snapshot" else chunk.image
            if held[0] + len(data) > MAX_SNAPSHOT:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{kind}: too large")
            with self.lock:  # all calls together: a bound on what peers can make us hold
                full = self.receiving + len(data) > self.receive_budget
                if not full:
                    self.receiving += len(data)
                    held[0] += len(data)
            if full:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{kind}: this tender process is receiving {self.receiving} bytes "
                              f"of VMs already (budget {self.receive_budget}): place it elsewhere")
            (parts if kind == "snapshot" else image).append(data)
        if start_msg is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start: missing")
        t0 = time.perf_counter()
        start = {f.name: getattr(start_msg, f.name) for f in start_msg.DESCRIPTOR.fields}
        start["args"], start["env"] = list(start["args"]), list(start["env"])
        try:
            k = self._build(start, b"".join(parts), b"".join(image))
        except (ImageError, SnapshotError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot start the VM: {e}")
        except (ProtocolError, ChannelClosed, OSError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach the supervisor: {e}")
        threading.Thread(target=self._run, args=(k, (start["instance_id"], start["pid"])),
                         daemon=True,
                         name=f"vm-{start['instance_id']}-{start['pid']}").start()
        return pb2.VmStarted(pid=start["pid"], host_pid=os.getpid(),
                             host=os.environ.get(HOST_NAME_ENV) or socket.gethostname(),
                             restore_seconds=time.perf_counter() - t0)

    def GetLoad(self, request, context):  # noqa: N802 - gRPC's name
        pb2, _ = protos.peer()
        with self.lock:
            vms = list(self.vms.values())
        return pb2.Load(vms=len(vms), guest_memory_bytes=sum(k.committed_memory() for k in vms),
                        cpu_seconds=time.process_time())

    def _build(self, start: dict, snapshot: bytes, image_data: bytes = b"") -> Kernel:
        pid = int(start["pid"])
        hello = {"token": start["instance_token"], "pid": pid, "host_pid": os.getpid(),
                 "host": os.environ.get(HOST_NAME_ENV) or socket.gethostname()}
        try:
            channel = connect_channel(start["transport"], self._dial(start), True, hello)
        except ShmExhausted as e:
            # /dev/shm is full: the same supervisor socket carries frames instead (tcp),
            # and the hello tells the supervisor why (transport_note, the metric)
            log.warning("instance %s pid %d: %s: using tcp", start["instance_id"], pid, e)
            hello[SHM_FALLBACK_KEY] = str(e)
            channel = connect_channel("tcp", self._dial(start), True, hello)
        link = VmLink(channel, pid)
        try:
            console = Console(link.console_sink, stdin=None, tty=bool(start["tty"]))
            forker = VmCloneFork(WorkerCloneHost(link, start))
            timeout = float(start["timeout_seconds"]) or None
            if snapshot:
                k = restore(decode(snapshot), console, forker, link.make_file, timeout)
            else:
                config = VmConfig(ram=int(start["ram_bytes"]), stack_size=int(start["stack_bytes"]),
                                  quantum=int(start["quantum"]), max_procs=int(start["max_procs"]),
                                  tty=bool(start["tty"]), timeout=timeout)
                image = (parse_elf(image_data, start["argv0"] or "image") if image_data
                         else load_elf_file(start["image_path"]))
                argv = [start["argv0"] or image.name, *start["args"]]
                k = Kernel.boot(image, argv, start["env"], config, console, forker)
        except Exception:
            link.close()
            raise
        link.attach(k)
        return k

    @staticmethod
    def _dial(start: dict) -> socket.socket:
        sock = connect(start["supervisor"])
        try:
            keep_alive(sock, float(start.get("peer_timeout_seconds") or PEER_TIMEOUT))
        except (OSError, ValueError):
            sock.close()
            raise
        return sock

    def _run(self, k: Kernel, key: tuple[str, int]) -> None:
        with self.lock:
            self.vms[key] = k
        try:
            k.run()
        except Exception:
            log.exception("VM of instance %s pid %d failed", *key)
        finally:
            with self.lock:
                self.vms.pop(key, None)
            link = k.remote
            if isinstance(link, VmLink):
                link.close()
            k.close()


class _Context(logging.Filter):
    """Put the tender process, instance and guest pid in front of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = threading.current_thread().name  # VM threads are vm-<instance>-<pid>
        where = ""
        if name.startswith(("vm-", "vmlink-")):
            parts = name.split("-")
            where = f" instance {parts[1]} pid {parts[-1]}" if len(parts) == 3 else \
                f" pid {parts[-1]}"
        record.msg = f"[worker {os.getpid()}{where}] {record.getMessage()}"
        record.args = None
        return True


def serve(listen: str, ready=None) -> None:
    protos.ensure()
    # a VM's first boot or restore in this process would import and set up lazily
    # what the kernel needs (the syscall table, Unicorn): pay it before taking work
    warm_up()
    _, pb2_grpc = protos.peer()
    stop = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    servicer = PeerServicer(stop)
    pb2_grpc.add_PeerServicer_to_server(servicer, server)
    server.add_insecure_port(listen)
    server.start()
    with grpc.insecure_channel(listen) as ch:  # warm the client side too: start_vm's
        pb2_grpc.PeerStub(ch).GetLoad(protos.peer()[0].LoadRequest(), timeout=30)  # first call
    parent = os.getppid()
    if ready is not None:
        ready.set()
    else:
        sys.stdout.write("READY\n")  # the handshake for a worker started by hand
        sys.stdout.flush()
    while not stop.wait(0.5):
        if os.getppid() != parent:  # the pool's process is gone: so are we
            break
    server.stop(1)


def run_worker(listen: str, log_queue, env: dict[str, str], level: int, ready,
               jailed: bool = True) -> None:
    """Entry point of a pool worker (a spawned multiprocessing.Process).

    Its log records travel through ``log_queue`` to the pool's
    multiprocessing-logging handler, so they reach the tender's own handlers.
    ``jailed``: first of all, while it has one thread, it jails itself (instance/jail.py).
    """
    os.environ.update(env)
    # PEER_TOKEN_ENV: removed by the peer-ticket change (workers dial peers without it)
    report = jail.jail_worker(keep_env=(HOST_NAME_ENV, PEER_TOKEN_ENV)) if jailed else None
    handler = logging.handlers.QueueHandler(log_queue)
    handler.addFilter(_Context())
    setup_child(handler, level)
    if report is None:
        log.warning("this tender process runs VMs unjailed (--no-jail)")
    else:
        log.info("%s", report.line())
    serve(listen, ready)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * a.verbose, stream=sys.stderr,
                        format="unifork: %(levelname)s: %(message)s")
    logging.getLogger().handlers[0].addFilter(_Context())
    serve(a.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())

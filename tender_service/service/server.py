"""The tender daemon: ``unifork serve``.

One gRPC server carries the client API (``Tender``), standard health
checking and server reflection; the peer API (``Peer``: clones placed here by
other tenders, run by this tender's pool workers) has a listener and a
credential of its own (``--peer-listen``, ``--peer-token-file``, mutual TLS;
service/peering.py); ``/metrics`` is served on its own port.  The client server
is grpc.aio, on an event loop of its own thread: calls that last (``Wait``,
``StreamConsole``, ``UploadImage``, ``Health.Watch``, reflection) are coroutines
holding no thread, so however many are open, short calls still find one of the
threads their sync handlers run in.  Every request field is checked before anything runs; errors carry the
standard status codes and name the offending field.  SIGTERM stops new
launches, lets running instances finish for a grace period, then kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tender_service import protos
from tender_service.instance import jail
from tender_service.instance.backends import FORK_MODES, BackendContext, make_backends
from tender_service.instance.budget import MemoryBudget, default_limit
from tender_service.instance.hostmalloc import limit_malloc_arenas
from tender_service.instance.pool import WarmPool
from tender_service.instance.publish import PortMapping, PublishError, parse_outbound
from tender_service.instance.worker import HOST_NAME_ENV, RELAY_ENV
from tender_service.machine.layout import MAX_RAM, MIN_RAM
from tender_service.machine.rootfs import select_program
from tender_service.rump.published import OutboundRule
from tender_service.rump.vminfo import VmConfig
from tender_service.service import metrics, reflection
from tender_service.service.auth import (
    MAX_STREAMS,
    MAX_STREAMS_PER_PEER,
    ServerInterceptor,
    StreamLimiter,
    read_token,
)
from tender_service.service.imagestore import DEFAULT_MAX_STORE, BuiltinImageError, ImageStore
from tender_service.service.instances import KEEP_FINISHED, InstanceManager
from tender_service.service.peering import (
    MAX_PEER_MESSAGE,
    PeerCredentials,
    PeerGateway,
    Relay,
    Tickets,
    TlsFiles,
)
from tender_service.service.placement import PeerHandle, PeerSet, Placer
from tender_service.transports.channel import PEER_TIMEOUT, check_peer_timeout

log = logging.getLogger(__name__)

MAX_ARGS = 256
MAX_ID = 64  # instance ids are 16 hex digits; anything much longer is not one
MAX_ARG_BYTES = 64 << 10
MAX_TIME_LIMIT = 24 * 3600.0
SERVER_THREADS = 16  # for the short (sync) handlers; long calls hold none


@dataclass
class ServeOptions:
    listen: str = "127.0.0.1:7700"
    metrics_port: int = 0
    peers: tuple[str, ...] = ()
    advertise: str | None = None
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    peer_listen: str | None = None  # default: the client port + 1 on the client host
    peer_token_file: str | None = None
    insecure_listen_any: bool = False
    pool_size: int = 2
    max_instances: int = 64
    max_upload: int = 64 << 20
    max_image_store: int = DEFAULT_MAX_STORE
    max_guest_memory: int | None = None  # None: half of the host's (or container's) RAM
    default_timeout: float = 600.0
    grace: float = 10.0
    peer_timeout: float = PEER_TIMEOUT
    keep_finished: int = KEEP_FINISHED
    jail: bool = True  # VM processes jail themselves (instance/jail.py); False: --no-jail
    max_streams: int = MAX_STREAMS
    max_streams_per_peer: int = MAX_STREAMS_PER_PEER
    #: host ports a Launch may publish (--publish-ports "LOW-HIGH", or "0": only ports
    #: the host picks); "" refuses every publish
    publish_ports: str = ""
    publish_address: str = "127.0.0.1"  # the one host address they are bound on
    max_publish: int = 16  # mappings per instance
    #: destinations a Launch's allow_outbound may name ("IP:PORT" or "IP:*"); none: none
    allow_outbound_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishPolicy:
    """Which host ports a caller may publish: none unless the operator says so
    (a Launch binds ports on the tender's host)."""

    ports: tuple[int, int] | None = None  # (low, high) inclusive; (0, 0): host-picked only
    address: str = "127.0.0.1"
    max_mappings: int = 16
    #: where instances may connect out (--allow-outbound-to)
    outbound: tuple[OutboundRule, ...] = ()

    @classmethod
    def parse(
        cls, spec: str, address: str, max_mappings: int, outbound: tuple[str, ...] = ()
    ) -> PublishPolicy:
        """``--publish-ports``: "" (none), "0", or "LOW-HIGH" (and 0);
        ``--allow-outbound-to``: IP:PORT or IP:* each (PublishError: not one)."""
        rules = tuple(parse_outbound(text) for text in outbound)
        if not spec:
            return cls(None, address, max_mappings, rules)
        low, _, high = spec.partition("-")
        try:
            lo, hi = int(low), int(high or low)
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(
                f"--publish-ports {spec!r} / --publish-address {address!r}: expected "
                "LOW-HIGH (or 0) and an IP address"
            ) from None
        if not 0 <= lo <= hi < 65536:
            raise ValueError(f"--publish-ports {spec!r}: ports must be 0..65535, LOW <= HIGH")
        return cls((lo, hi), address, max_mappings, rules)

    def check_outbound(self, texts) -> str | None:
        """Why a Launch's ``allow_outbound`` is refused, or None."""
        if not texts:
            return None
        if not self.outbound:
            return "allow_outbound: this tender lets no instance connect out (--allow-outbound-to)"
        if len(texts) > self.max_mappings:
            return f"allow_outbound: at most {self.max_mappings} destinations"
        for text in texts:
            try:
                r = parse_outbound(text)
            except PublishError as e:
                return f"allow_outbound: {e}"
            if not any(p.ip == r.ip and p.port in (0, r.port) for p in self.outbound):
                return f"allow_outbound: {text} is not a destination this tender allows"
        return None

    def check(self, mappings) -> str | None:
        """Why a Launch's ``publish`` is refused, or None."""
        if not mappings:
            return None
        if self.ports is None:
            return "publish: this tender publishes no ports (unifork serve --publish-ports)"
        if len(mappings) > self.max_mappings:
            return f"publish: at most {self.max_mappings} mappings"
        lo, hi = self.ports
        for m in mappings:
            if not 0 < m.guest_port < 65536:
                return "publish: guest_port must be 1..65535"
            if m.host_port and not lo <= m.host_port <= hi:
                return f"publish: host_port {m.host_port} is not one this tender publishes " + (
                    "(host_port 0 only)" if hi == 0 else f"({lo}-{hi}, or 0)"
                )
            if m.host_ip not in ("", self.address):
                return f"publish: host_ip must be {self.address} (or empty)"
        return None

    def mappings(self, mappings) -> list[PortMapping]:
        return [PortMapping(m.host_port, m.guest_port, self.address) for m in mappings]


def fork_mode_name(pb2, value: int) -> str:
    """The backend name of a ``ForkMode`` value: FORK_MODE_<NAME> is mode <name>,
    FORK_MODE_UNSPECIFIED the first registered mode (thread); "" if none is registered."""
    if value == pb2.FORK_MODE_UNSPECIFIED:
        return FORK_MODES[0]
    name = pb2.ForkMode.Name(value).removeprefix("FORK_MODE_").lower()
    return name if name in FORK_MODES else ""


def fork_mode_value(pb2, mode: str) -> int:
    """The ``ForkMode`` value of backend ``mode``."""
    return pb2.ForkMode.Value(f"FORK_MODE_{mode.upper()}")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TenderServicer:
    """The client API; every handler validates, then calls the instance manager."""

    def __init__(
        self,
        manager: InstanceManager,
        store: ImageStore,
        host: str,
        publish: PublishPolicy | None = None,
    ) -> None:
        self.m, self.store = manager, store
        self.host = host  # this tender's advertised address: where its own VMs run
        self.publish = publish or PublishPolicy()
        self.pb2, _ = protos.tender()

    # -- images --------------------------------------------------------------------------
    async def UploadImage(self, request_iterator, context):  # noqa: N802
        """A coroutine: a slow uploader holds no thread while its bytes trickle in."""
        name, parts, size = None, [], 0
        async for msg in request_iterator:
            if msg.HasField("name"):
                name = msg.name
            elif msg.HasField("data"):
                size += len(msg.data)
                if size > self.store.max_upload:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"data: image larger than {self.store.max_upload} bytes",
                    )
                parts.append(msg.data)
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: missing (send it first)")
        try:  # hashing and writing the file: in a thread, not on the event loop
            img = await asyncio.to_thread(self.store.add, name, b"".join(parts))
        except OverflowError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"data: {e}")
        except ValueError as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"data: {e}" if "name:" not in str(e) else str(e)
            )
        return self._image(img)

    def _image(self, img):
        return self.pb2.ImageInfo(
            name=img.name, size_bytes=img.size, sha256=img.sha256, builtin=img.builtin
        )

    def DeleteImage(self, req, context):  # noqa: N802
        if not ImageStore.valid_name(req.name):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: not a valid image name")
        try:
            img = self.store.delete(req.name)
        except BuiltinImageError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"name: no uploaded image {req.name!r}")
        return self._image(img)

    def ListImages(self, request, context):  # noqa: N802
        return self.pb2.ListImagesResponse(images=[self._image(i) for i in self.store.list()])

    # -- instances ------------------------------------------------------------------------
    def Launch(self, req, context):  # noqa: N802
        pb2 = self.pb2
        bad = self._check_launch(req)
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
        if not ImageStore.valid_name(req.image):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image: not a valid image name")
        img = self.store.get(req.image)
        if img is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"image: no image named {req.image!r}")
        try:  # a baked image runs the program its first argument names: one it has
            select_program(self.store.boot_image(img), list(req.args))
        except ValueError as e:  # ImageError
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {e}")
        mode = fork_mode_name(pb2, req.fork_mode)
        transport = "tcp" if req.pipe_transport == pb2.PIPE_TRANSPORT_TCP else "shm"
        placement = {pb2.PLACEMENT_REMOTE: "remote", pb2.PLACEMENT_SPREAD: "spread"}.get(
            req.placement, "local"
        )
        defaults = VmConfig()
        config = VmConfig(
            ram=req.memory_bytes or defaults.ram,
            stack_size=req.stack_bytes or defaults.stack_size,
            timeout=req.time_limit_seconds or self.m.default_timeout,
            max_procs=req.max_procs or defaults.max_procs,
            tty=not req.console_pipe,
        )
        try:
            inst = self.m.launch(
                img,
                list(req.args),
                list(req.env) or None,
                mode,
                transport,
                placement,
                config,
                self.publish.mappings(req.publish),
                [parse_outbound(text) for text in req.allow_outbound],
            )
        except OverflowError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except LookupError as e:  # deleted while this launch looked at it
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except RuntimeError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb2.LaunchResponse(instance_id=inst.id)

    def _check_launch(self, req) -> str | None:  # noqa: C901 - flat field checks
        pb2 = self.pb2
        if not req.image:
            return "image: missing"
        if len(req.args) > MAX_ARGS or sum(len(a) for a in req.args) > MAX_ARG_BYTES:
            return f"args: at most {MAX_ARGS} arguments and {MAX_ARG_BYTES} bytes"
        if any("\0" in a for a in req.args):
            return "args: NUL byte in an argument"
        if len(req.env) > MAX_ARGS or sum(len(e) for e in req.env) > MAX_ARG_BYTES:
            return f"env: at most {MAX_ARGS} entries and {MAX_ARG_BYTES} bytes"
        if any("=" not in e or "\0" in e for e in req.env):
            return "env: entries must be NAME=VALUE"
        if req.fork_mode not in pb2.ForkMode.values():
            return "fork_mode: unknown value"
        if not fork_mode_name(pb2, req.fork_mode):
            return "fork_mode: not served by this tender"
        if req.pipe_transport not in pb2.PipeTransport.values():
            return "pipe_transport: unknown value"
        if req.placement not in pb2.Placement.values():
            return "placement: unknown value"
        if req.memory_bytes and not MIN_RAM <= req.memory_bytes <= MAX_RAM:
            return f"memory_bytes: must be between {MIN_RAM} and {MAX_RAM}"
        if req.stack_bytes and not 16 << 10 <= req.stack_bytes <= 64 << 20:
            return "stack_bytes: must be between 16 KiB and 64 MiB"
        ram = req.memory_bytes or VmConfig().ram
        if (req.stack_bytes or VmConfig().stack_size) > ram // 2:
            return "stack_bytes: must be at most half of memory_bytes"
        if (
            not 0 <= req.time_limit_seconds <= MAX_TIME_LIMIT
            or req.time_limit_seconds != req.time_limit_seconds
        ):
            return f"time_limit_seconds: must be between 0 and {MAX_TIME_LIMIT:g}"
        if req.max_procs and not 2 <= req.max_procs <= 65536:
            return "max_procs: must be between 2 and 65536"
        if self.m.backends[fork_mode_name(pb2, req.fork_mode)].one_vm and req.placement not in (
            pb2.PLACEMENT_UNSPECIFIED,
            pb2.PLACEMENT_LOCAL,
        ):
            return "placement: only VM-clone instances place VMs on other hosts"
        if req.allow_outbound and self.m.backends[fork_mode_name(pb2, req.fork_mode)].one_vm:
            # its VM's process is jailed: it may not connect (docs/semantics.md)
            return "allow_outbound: served for VM-clone instances only by a tender"
        return self.publish.check(req.publish) or self.publish.check_outbound(req.allow_outbound)

    def _lookup(self, instance_id: str):
        """(instance or None, status code and message if none)."""
        if not instance_id:
            return None, (grpc.StatusCode.INVALID_ARGUMENT, "instance_id: missing")
        if len(instance_id) > MAX_ID:
            return None, (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"instance_id: longer than {MAX_ID} characters",
            )
        inst = self.m.get(instance_id)
        if inst is None:
            return None, (grpc.StatusCode.NOT_FOUND, f"instance_id: no instance {instance_id!r}")
        return inst, None

    def _instance(self, instance_id: str, context):
        inst, error = self._lookup(instance_id)
        if error:
            context.abort(*error)
        return inst

    async def _instance_async(self, instance_id: str, context):
        inst, error = self._lookup(instance_id)
        if error:
            await context.abort(*error)
        return inst

    async def StreamConsole(self, req, context):  # noqa: N802
        """An async generator: a follower waits for output holding no thread."""
        inst = await self._instance_async(req.instance_id, context)
        async for seq, pid, fd, data in inst.console.follow(req.from_start):
            yield self.pb2.ConsoleChunk(pid=pid, fd=fd, data=data, seq=seq)

    def _result(self, inst):
        r = inst.result
        if r is None:
            return self.pb2.InstanceResult(instance_id=inst.id, done=False)
        return self.pb2.InstanceResult(instance_id=inst.id, done=True, **r)

    async def Wait(self, req, context):  # noqa: N802
        """A coroutine: a waiter holds no thread (a client cancelling it cancels it)."""
        if not 0 <= req.timeout_seconds <= MAX_TIME_LIMIT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds: out of range")
        inst = await self._instance_async(req.instance_id, context)
        await inst.wait_done(req.timeout_seconds or None)
        return self._result(inst)

    def Kill(self, req, context):  # noqa: N802
        inst = self._instance(req.instance_id, context)
        return self.pb2.KillResponse(was_running=self.m.kill(inst))

    def _summary(self, inst):
        pb2 = self.pb2
        return pb2.InstanceSummary(
            instance_id=inst.id,
            image=inst.image.name,
            fork_mode=fork_mode_value(pb2, inst.mode),
            state=inst.state,
            age_seconds=time.monotonic() - inst.created,
        )

    def ListInstances(self, request, context):  # noqa: N802
        return self.pb2.ListInstancesResponse(instances=[self._summary(i) for i in self.m.list()])

    def Describe(self, req, context):  # noqa: N802
        pb2 = self.pb2
        inst = self._instance(req.instance_id, context)
        procs = []
        backend = self.m.backends[inst.mode]
        for p in inst.process_table():
            host, vm = backend.where(p, inst.host_pid)
            procs.append(
                pb2.ProcessInfo(
                    pid=p.pid,
                    ppid=p.ppid,
                    state=p.state,
                    wait_status=p.status or 0,
                    exited=p.status is not None,
                    vm=vm,
                    host=self.host if host is None else host,
                )
            )
        note = inst.note
        return pb2.InstanceDescription(
            summary=self._summary(inst),
            pipe_transport=pb2.PIPE_TRANSPORT_TCP
            if inst.transport == "tcp"
            else pb2.PIPE_TRANSPORT_SHM,
            transport_note=note,
            placement={"remote": pb2.PLACEMENT_REMOTE, "spread": pb2.PLACEMENT_SPREAD}.get(
                inst.placement, pb2.PLACEMENT_LOCAL
            ),
            processes=procs,
            result=self._result(inst),
            published=[
                pb2.PortMapping(host_ip=ip, host_port=port, guest_port=guest)
                for ip, port, guest in inst.published
            ],
        )


class Tender:
    """A running tender: gRPC server, metrics, warm pool, peers, instances."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        check_peer_timeout(opts.peer_timeout)
        self.publish_policy = PublishPolicy.parse(
            opts.publish_ports, opts.publish_address, opts.max_publish, opts.allow_outbound_to
        )
        if opts.keep_finished < 0:
            raise ValueError("--keep-finished must not be negative")
        if opts.max_streams < 1 or opts.max_streams_per_peer < 1:
            raise ValueError("--max-streams and --max-streams-per-peer must be at least 1")
        host, _, port = opts.listen.rpartition(":")
        self.token = read_token(opts.token_file) if opts.token_file else None
        if not _is_loopback(host) and self.token is None and not opts.insecure_listen_any:
            raise ValueError(
                f"refusing to listen on {host!r} without --token-file "
                "(give --insecure-listen-any to do it anyway)"
            )
        peer_token = read_token(opts.peer_token_file) if opts.peer_token_file else None
        if peer_token is not None and peer_token == self.token:
            raise ValueError(
                "--peer-token-file holds the client token: peers need a token of their own"
            )
        tls = TlsFiles.load(opts.tls_cert, opts.tls_key, opts.tls_ca)
        self.peer_listen = opts.peer_listen or f"{host}:{int(port or 7700) + 1}"
        peer_host, _, peer_port = self.peer_listen.rpartition(":")
        if not peer_port.isdigit():
            raise ValueError(f"--peer-listen {self.peer_listen!r}: not HOST:PORT")
        if (
            not _is_loopback(peer_host)
            and peer_token is None
            and tls is None
            and not opts.insecure_listen_any
        ):
            raise ValueError(
                f"refusing to serve the peer API on {peer_host!r} without "
                "--peer-token-file or TLS (give --insecure-listen-any to do it "
                "anyway)"
            )
        self.advertise = opts.advertise or opts.listen
        adv_host = self.advertise.rpartition(":")[0] or "127.0.0.1"
        #: where peers reach this tender's peer API (and what tickets for it name)
        self.peer_advertise = f"{adv_host}:{peer_port}"
        creds = PeerCredentials(peer_token, tls)
        tickets = Tickets(peer_token)
        # the relay: workers' clones bound for tenders leave through it (they hold no
        # credential); a directory only this user can enter keeps it private
        self.relay_dir = tempfile.mkdtemp(prefix="unifork-relay-")
        relay_address = f"unix:{os.path.join(self.relay_dir, 'relay.sock')}"
        env = {HOST_NAME_ENV: self.advertise, RELAY_ENV: relay_address}
        limit_malloc_arenas()
        os.environ[HOST_NAME_ENV] = self.advertise
        protos.ensure()
        self.budget = MemoryBudget(
            default_limit() if opts.max_guest_memory is None else opts.max_guest_memory
        )
        self.store = ImageStore(max_upload=opts.max_upload, max_store=opts.max_image_store)
        jailed = opts.jail and jail.enabled()
        self.pool = WarmPool(
            opts.pool_size,
            env=env,
            host=self.advertise,
            jailed=jailed,
            on_crash=lambda pid, sig: metrics.EMULATOR_CRASHES.labels("vmclone").inc(),
        )
        self.stop_event = threading.Event()
        self.peers = PeerSet(list(opts.peers), int(peer_port), creds, self.peer_advertise)

        def known() -> list[str]:  # the tenders this one may send VMs to or connect to
            return [*self.peers.addresses(), self.peer_advertise]

        self.gateway = PeerGateway(self.pool, creds, tickets, self.peer_advertise, known)
        metrics.VM_STARTS.set_function(lambda: self.gateway.starting)
        listen_host = host if host not in ("", "0.0.0.0", "[::]") else "0.0.0.0"
        self_handle = PeerHandle(self.peer_advertise, creds)
        self_handle.remote = False  # a VM started here runs next to its supervisor
        self.backends = make_backends(
            BackendContext(
                hosted=True,
                jailed=jailed,
                placement_for=lambda p: Placer(p, self.pool, self.peers),
                listen_host=listen_host,
                advertise_host=adv_host,
                self_handle=self_handle,
                peer_timeout=opts.peer_timeout,
                budget=self.budget,
                ticket_for=tickets.issue,
                deny_outbound=self._own_addresses(opts, host, adv_host, int(peer_port)),
            )
        )
        self.manager = InstanceManager(
            self.store,
            self.backends,
            opts.max_instances,
            opts.default_timeout,
            keep_finished=opts.keep_finished,
            budget=self.budget,
        )
        # the server's event loop runs in a thread of its own, from here to shutdown
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="grpc-aio"
        )
        self.loop_thread.start()
        try:
            self._on_loop(self._build(opts, tls))
            if not self.port:
                raise OSError(f"cannot listen on {opts.listen}")
            self._on_loop(self._build_peer(opts, creds))
            self.relay = self._relay(creds, known, relay_address)
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    def _own_addresses(
        opts: ServeOptions, host: str, adv_host: str, peer_port: int
    ) -> frozenset[tuple[str, int]]:
        """This tender's ports (client, peer, metrics) on every address it has:
        never a destination of an instance's connect out."""
        ports = {int(opts.listen.rpartition(":")[2] or 7700), peer_port, opts.metrics_port}
        hosts = {"127.0.0.1", host.strip("[]"), adv_host.strip("[]")} - {"", "0.0.0.0", "::"}
        return frozenset((h, p) for h in hosts for p in ports if p)

    def _on_loop(self, coro):
        """Run ``coro`` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join()
        self.loop.close()

    async def _build(self, opts: ServeOptions, tls: TlsFiles | None) -> None:
        """Make the client server (grpc.aio binds it to the loop it is made on)."""
        limiter = StreamLimiter(opts.max_streams, opts.max_streams_per_peer)
        self.server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(
                max_workers=SERVER_THREADS, thread_name_prefix="grpc-handler"
            ),
            interceptors=[ServerInterceptor(self.token, limiter)],
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        tpb2, tgrpc = protos.tender()
        tgrpc.add_TenderServicer_to_server(
            TenderServicer(self.manager, self.store, self.advertise, self.publish_policy),
            self.server,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            tpb2.DESCRIPTOR.services_by_name["Tender"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        )
        reflection.enable_server_reflection(names, self.server)  # v1 and v1alpha
        if tls is not None:
            self.port = self.server.add_secure_port(
                opts.listen, grpc.ssl_server_credentials([(tls.key, tls.cert)])
            )
        else:
            self.port = self.server.add_insecure_port(opts.listen)

    async def _build_peer(self, opts: ServeOptions, creds: PeerCredentials) -> None:
        """The peer listener: its own credential (the gateway checks it), its own stream
        budget, the same request metrics; on the client server's event loop."""
        _, pgrpc = protos.peer()
        limiter = StreamLimiter(opts.max_streams, opts.max_streams_per_peer)
        self.peer_server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(
                max_workers=2 * SERVER_THREADS, thread_name_prefix="grpc-peer"
            ),
            interceptors=[ServerInterceptor(None, limiter)],
            options=[("grpc.max_receive_message_length", MAX_PEER_MESSAGE)],
        )
        pgrpc.add_PeerServicer_to_server(self.gateway, self.peer_server)
        server_creds = creds.server_credentials()
        self.peer_port = (
            self.peer_server.add_secure_port(self.peer_listen, server_creds)
            if server_creds is not None
            else self.peer_server.add_insecure_port(self.peer_listen)
        )
        if not self.peer_port:
            raise OSError(f"cannot listen on {self.peer_listen} (--peer-listen)")

    @staticmethod
    def _relay(creds: PeerCredentials, known, address: str) -> grpc.Server:
        """The workers' private relay to peer tenders (a Unix socket only they reach)."""
        _, pgrpc = protos.peer()
        relay = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        pgrpc.add_PeerServicer_to_server(Relay(creds, known), relay)
        if not relay.add_insecure_port(address):
            raise OSError(f"cannot listen on {address}")
        return relay

    async def _set_health(self, status) -> None:
        for name in ("", "unifork.v1.Tender", "unifork.v1.Peer"):
            await self.health.set(name, status)

    def start(self) -> None:
        # every per-mode series exists before the first call: /metrics has a fixed shape,
        # and the first sample of the gauge thread adds no lines
        for mode in FORK_MODES:
            for gauge in (metrics.VMS, metrics.PROCESSES, metrics.INSTANCES):
                gauge.labels(mode)
        self._on_loop(self.server.start())
        self._on_loop(self.peer_server.start())
        self.relay.start()
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        if self.opts.metrics_port:
            metrics.serve_metrics(
                self.opts.metrics_port, self.opts.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
            )
        threading.Thread(target=self._sample_loop, daemon=True, name="gauges").start()
        log.info(
            "tender serving on %s (advertised %s), peer API on %s (advertised %s), "
            "metrics on %s, peers %s",
            self.opts.listen,
            self.advertise,
            self.peer_listen,
            self.peer_advertise,
            self.opts.metrics_port or "-",
            ", ".join(self.opts.peers) or "none",
        )
        log.info(
            "limits: %s; %s; uploaded images are kept in %s",
            self.budget.state(),
            self.store.state(),
            self.store.root,
        )

    def _sample_loop(self) -> None:
        while not self.stop_event.wait(1.0):
            self.manager.sample_gauges()
            self.pool.reap_dead()  # counts and replaces the processes that crashed
            # VMs of VM-clone instances (this tender's own and peers' clones): in the pool
            metrics.VMS.labels("vmclone").set(self.pool.load())

    def shutdown(self) -> None:
        """Graceful: refuse launches, let instances finish, kill what is left."""
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        killed = self.manager.shutdown(self.opts.grace)
        for inst in killed:
            log.warning(
                "shutdown: instance %s killed after the %g s grace period", inst.id, self.opts.grace
            )
        self.stop_event.set()
        self.relay.stop(2).wait()
        with contextlib.suppress(RuntimeError):  # the loop is already gone
            self._on_loop(self.peer_server.stop(2))
            self._on_loop(self.server.stop(2))
            self._stop_loop()
        self.pool.close()
        for backend in self.backends.values():
            backend.close()
        self.store.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.relay_dir)


def serve(opts: ServeOptions) -> int:
    tender = Tender(opts)
    tender.start()
    done = threading.Event()

    def on_term(signum, frame):
        log.info("signal %d: shutting down (grace %g s)", signum, opts.grace)
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # wait in short steps: Python runs signal handlers only between bytecodes of the
    # main thread, never while it is blocked in an untimed wait
    while not done.wait(0.5):
        pass
    tender.shutdown()
    return 0

"""The peer API as a tender serves it: its own listener, its own credential.

Clients and peers are different principals.  A tender serves ``Peer`` on a
listener of its own (``serve --peer-listen``, by default the client port + 1),
never on the client port, and a peer proves itself with the cluster's peer
token (``--peer-token-file``, never a client token) and, when TLS is
configured, with a client certificate signed by ``--tls-ca`` (mutual TLS).

What arrives there is checked, then handed on: ``StartVm`` goes to one of the
tender's own pool workers (guest code never runs in a tender process), with
the image as bytes checked against their SHA-256 (nothing names a file of
this host) and a supervisor this tender may connect to: on the host that
called, or on a host it already knows (its peers, itself), over tcp only.

VM processes hold no credential.  A VM that forks a child onto a peer gets,
with its fork lease, a ticket of its supervisor: an HMAC under a key derived
from the peer token over (instance, pid, target tender, expiry, nonce), good
for one ``StartVm`` within ``TICKET_TTL`` seconds, sent as the metadata
``unifork-ticket`` (so a caller with neither token nor ticket is refused
before any message of its stream is read).  The VM's worker sends the
clone through its own tender's relay (a Unix socket only the tender's user
can reach), which forwards it to the target (a peer of this tender, or this
tender) with the tender's TLS identity but without the peer token: the
ticket stands in for it.  With mutual TLS alone (no peer token) there is no
shared key for tickets: the certificate is the whole credential, so a relayed
clone is accepted on the relaying tender's certificate; give
``--peer-token-file`` as well to scope each clone to its ticket.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tender_service import protos
from tender_service.instance.worker import TARGET_KEY, TICKET_KEY

log = logging.getLogger(__name__)

TICKET_TTL = 60.0
#: a StartVm's first message (its header) may be read before the caller is known
MAX_PEER_MESSAGE = 4 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


class ConfigError(ValueError):
    """A TLS or peer option that cannot work (start-up refuses it with one line)."""


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        """The TLS identity, or None without TLS; half configurations are refused."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [name for name, v in given.items() if not v]
        if missing:
            raise ConfigError(
                f"TLS needs --tls-cert, --tls-key and --tls-ca together "
                f"(missing {', '.join(missing)}): refusing to serve half of it"
            )
        assert cert and key and ca  # all three given: checked just above
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise ConfigError(
                f"--tls-key {key} does not match --tls-cert {cert} "
                f"(or is not a PEM key): {e.reason or e}"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot read the TLS certificate or key: {e}") from None
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"--tls-ca {ca}: not a readable PEM certificate: {e}") from None
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes())


@dataclass(frozen=True)
class PeerCredentials:
    """How this tender proves itself to peers, and how it dials them."""

    token: str | None = None
    tls: TlsFiles | None = None

    def channel(self, address: str) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca, private_key=self.tls.key, certificate_chain=self.tls.cert
        )
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def without_token(self) -> PeerCredentials:
        return PeerCredentials(None, self.tls)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Mutual TLS for the peer listener: a caller needs a cert signed by the CA."""
        if self.tls is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca, require_client_auth=True
        )

    def bearer_ok(self, context) -> bool:
        """The call carries the peer token (true when there is none to carry)."""
        if self.token is None:
            return True
        got = dict(context.invocation_metadata()).get("authorization", "")
        return hmac.compare_digest(got.encode(errors="replace"), f"Bearer {self.token}".encode())


@dataclass
class Tickets:
    """Single-use, short-lived tickets for one StartVm each (see the module's doc)."""

    token: str | None
    ttl: float = TICKET_TTL
    _used: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> bytes | None:
        if self.token is None:
            return None
        return hmac.new(self.token.encode(), b"unifork peer ticket v1", hashlib.sha256).digest()

    def _mac(self, instance_id: str, pid: int, target: str, expiry: int, nonce: str) -> str:
        msg = "\0".join((instance_id, str(pid), target, str(expiry), nonce)).encode()
        assert self.key is not None  # issue() and redeem() make no MAC without a token
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def issue(self, instance_id: str, pid: int, target: str) -> str:
        """A ticket for VM ``pid`` of ``instance_id`` on the tender at ``target``:
        ``INSTANCE.PID.EXPIRY.NONCE.MAC`` (what it is for can be read before the
        StartVm stream is: a stranger is refused before any message is taken)."""
        if self.key is None:
            return ""
        expiry = int(time.time() + self.ttl)
        nonce = secrets.token_hex(12)
        mac = self._mac(instance_id, pid, target, expiry, nonce)
        return f"{instance_id}.{pid}.{expiry}.{nonce}.{mac}"

    def redeem(self, ticket: str, target: str) -> tuple[str, int] | None:
        """(instance, pid) once for a valid, unexpired ticket for ``target``, else None."""
        parts = ticket.rsplit(".", 4)
        if self.key is None or len(parts) != 5 or len(ticket) > 512:
            return None
        instance_id, pid_text, expiry_text, nonce, mac = parts
        if (
            not (pid_text.isdigit() and expiry_text.isdigit())
            or len(pid_text) > 9
            or len(expiry_text) > 12
        ):
            return None
        pid, expiry, now = int(pid_text), int(expiry_text), time.time()
        want = self._mac(instance_id, pid, target, expiry, nonce)
        if not hmac.compare_digest(mac.encode(errors="replace"), want.encode()) or expiry < now:
            return None
        with self._lock:
            for used, until in list(self._used.items()):
                if until < now:
                    del self._used[used]
            if nonce in self._used:
                return None
            self._used[nonce] = expiry
        return instance_id, pid


def caller_host(context) -> str | None:
    """The IP address a call came from, as gRPC saw the connection."""
    peer = context.peer() or ""
    if peer.startswith("ipv4:"):
        return peer[5:].rpartition(":")[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rpartition(":")[0].strip("[]")
    return None


def resolve_host(host: str) -> set[str]:
    """Every address ``host`` stands for (a literal is itself), empty if none."""
    with contextlib.suppress(ValueError):
        return {str(ipaddress.ip_address(host.strip("[]")))}
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return set()


def _address_host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


class PeerGateway:
    """``Peer`` on the peer listener: check, then hand the VM to a pool worker."""

    def __init__(
        self,
        pool,
        creds: PeerCredentials,
        tickets: Tickets,
        self_address: str,
        known_addresses: Callable[[], Iterable[str]],
    ) -> None:
        self.pool = pool
        self.creds, self.tickets = creds, tickets
        self.self_address = self_address  # this tender's peer address (tickets name it)
        self.known_addresses = known_addresses  # peers' host:port, and this tender's
        self.starting = 0  # StartVm calls in progress (a gauge)
        self.lock = threading.Lock()

    def GetLoad(self, request, context):  # noqa: N802 - gRPC's name
        pb2, _ = protos.peer()
        if not self.creds.bearer_ok(context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong peer token")
        return pb2.Load(vms=self.pool.load(), cpu_seconds=time.process_time())

    def StartVm(self, request_iterator, context):  # noqa: N802 - gRPC's name
        with self.lock:
            self.starting += 1
        try:
            return self._start_vm(iter(request_iterator), context)
        finally:
            with self.lock:
                self.starting -= 1

    def _start_vm(self, chunks, context):
        claim = None  # with a ticket instead of the token: the (instance, pid) it is for
        if not self.creds.bearer_ok(context):
            ticket = dict(context.invocation_metadata()).get(TICKET_KEY, "")
            claim = self.tickets.redeem(ticket, self.self_address)
            if claim is None:
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or wrong peer token or ticket"
                )
        first = next(chunks, None)
        if first is None or first.WhichOneof("part") != "start":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start: missing (send it first)")
        start = first.start
        if claim is not None and claim != (start.instance_id, start.pid):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong peer token or ticket (not for this VM)",
            )
        bad, supervisor = self._check_supervisor(start, context)
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
        header = type(start)()
        header.CopyFrom(start)
        header.supervisor = supervisor

        def forward():
            yield type(first)(start=header)
            yield from chunks

        try:
            worker = self.pool.acquire()
        except (RuntimeError, TimeoutError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"no worker process: {e}")
        try:
            return worker.send_vm(forward(), timeout=context.time_remaining() or 60.0)
        except grpc.RpcError as e:  # the worker's own answer, passed on
            context.abort(e.code(), e.details() or "the worker process failed")

    def _check_supervisor(self, start, context) -> tuple[str | None, str]:
        """(what is wrong, the supervisor as an address this tender has vetted)."""
        if start.transport != "tcp":
            return "transport: VMs placed by a peer talk to their supervisor over tcp", ""
        sup = start.supervisor
        if not sup.startswith("tcp:"):
            return "supervisor: a peer names a tcp:HOST:PORT supervisor, nothing else", ""
        host, _, port = sup[4:].rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536 or not host:
            return "supervisor: not tcp:HOST:PORT", ""
        allowed = set()
        if (caller := caller_host(context)) is not None:
            allowed |= resolve_host(caller)
        for address in self.known_addresses():
            allowed |= resolve_host(_address_host(address))
        ok = sorted(resolve_host(host) & allowed)
        if not ok:
            log.warning(
                "StartVm from %s refused: supervisor host %.80r is neither the "
                "caller nor a known peer",
                context.peer(),
                host,
            )
            return (
                "supervisor: this tender connects only to the host that called it or to its peers"
            ), ""
        ip = ok[0]  # connect to the address that was checked, not a fresh lookup
        return None, f"tcp:{'[' + ip + ']' if ':' in ip else ip}:{port}"


class Relay:
    """``Peer.StartVm`` on the tender's private Unix socket, for its own workers: a
    clone bound for a peer tender (or this one) goes out with this tender's TLS
    identity and the clone's ticket (never the peer token)."""

    def __init__(
        self, creds: PeerCredentials, known_addresses: Callable[[], Iterable[str]]
    ) -> None:
        self.creds = creds.without_token()
        self.known_addresses = known_addresses

    def StartVm(self, request_iterator, context):  # noqa: N802 - gRPC's name
        from tender_service.instance.worker import send_vm

        md = dict(context.invocation_metadata())
        target = md.get(TARGET_KEY, "")
        if target not in set(self.known_addresses()):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{TARGET_KEY}: not a peer of this tender"
            )
        ticket = [(TICKET_KEY, md[TICKET_KEY])] if TICKET_KEY in md else None
        try:
            with self.creds.channel(target) as ch:
                return send_vm(
                    target,
                    request_iterator,
                    context.time_remaining() or 60.0,
                    channel=ch,
                    metadata=ticket,
                )
        except grpc.RpcError as e:
            context.abort(e.code(), e.details() or "the peer failed")

    def GetLoad(self, request, context):  # noqa: N802 - gRPC's name
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the relay only starts VMs")

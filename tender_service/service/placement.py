"""Where VM-clone children run: this host's warm pool, or peer tenders.

``local`` uses the warm pool; ``remote`` only peers; ``spread`` whichever
candidate (the local pool or a peer) reports the least load.  Loads come
from ``Peer.GetLoad`` and are cached for a second; a peer that does not
answer is skipped for a while (it is down) and placement goes on with the
others.  Peers are given as ``host:port`` of their peer listener or found
by DNS (every A record of a name, as a Kubernetes headless service
publishes them, with the peer port).  Peers are dialled with the tender's
peer credentials (peering.py): the peer token, and TLS when configured.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tender_service import protos
from tender_service.instance.pool import WarmPool
from tender_service.service.peering import PeerCredentials

log = logging.getLogger(__name__)

LOAD_TTL = 1.0
DOWN_FOR = 5.0
RPC_TIMEOUT = 2.0
#: the load a peer counts as when its GetLoad timed out: placed after every peer that answered
SLOW_PEER_LOAD = 1 << 30


@dataclass(eq=False)
class PeerHandle:
    """A peer tender as a place to start VMs."""

    address: str  # host:port of its peer listener
    creds: PeerCredentials
    on_failure: Callable[..., None] | None = (
        None  # PeerSet.mark_down: called with the address when the peer did not answer
    )
    remote = True
    pid = 0

    @property
    def host(self) -> str:
        return self.address

    def start_vm(self, start: dict, snapshot: bytes | None, image: bytes | None = None):
        from tender_service.instance.worker import start_vm

        try:
            with self.creds.channel(self.address) as ch:
                return start_vm(
                    self.address,
                    start,
                    snapshot,
                    image=image,
                    channel=ch,
                    metadata=self.creds.metadata(),
                )
        except grpc.RpcError as e:
            if self.on_failure is not None and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.on_failure(self.address)
            elif self.on_failure is not None and e.code() == grpc.StatusCode.UNAVAILABLE:
                self.on_failure(self.address, confirm=True)  # the peer, or a process of its?
            raise

    def load(self) -> int:
        pb2, pb2_grpc = protos.peer()
        with self.creds.channel(self.address) as ch:
            reply = pb2_grpc.PeerStub(ch).GetLoad(
                pb2.LoadRequest(), timeout=RPC_TIMEOUT, metadata=self.creds.metadata()
            )
        return int(reply.vms)


def resolve_peers(specs: list[str], port: int) -> list[str]:
    """``host:port`` as given; ``dns:NAME`` expands to every A record of NAME."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith("dns:"):
            name = spec[4:]
            try:
                infos = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as e:
                log.warning("peer discovery: %s does not resolve: %s", name, e)
                continue
            out += sorted({f"{info[4][0]}:{port}" for info in infos})
        else:
            out.append(spec)
    return list(dict.fromkeys(out))


class Placer:
    """The pool-like object a supervisor asks for a place for each VM."""

    def __init__(self, policy: str, pool: WarmPool, peers: PeerSet) -> None:
        self.policy, self.pool, self.peers = policy, pool, peers
        #: spread's ties between the pool and the best peer alternate: a count of their own
        #: (the peers' count also orders peers among themselves, once per acquire, so its
        #: parity here would be the same at every call: every tie to one side)
        self._ties = itertools.count()

    def acquire(self, avoid: int = 0):
        if self.policy == "local":
            return self.pool.acquire(avoid)
        if self.policy == "remote":
            peer = self.peers.least_loaded()
            if peer is None:
                raise RuntimeError("no peer tender is up")
            return peer
        # spread: the least-loaded of this host's pool and the peers (ties rotate)
        peer = self.peers.least_loaded()
        if peer is None:
            return self.pool.acquire(avoid)
        local = self.pool.load()
        remote = self.peers.load_of(peer)
        if remote < local or (remote == local and next(self._ties) % 2):
            return peer
        return self.pool.acquire(avoid)


class PeerSet:
    def __init__(
        self, specs: list[str], port: int, creds: PeerCredentials, self_address: str | None = None
    ) -> None:
        self.specs, self.port, self.creds = specs, port, creds
        self.self_address = self_address
        self._loads: dict[str, tuple[float, int]] = {}
        self._down: dict[str, float] = {}
        self.turn = itertools.count()
        self._lock = threading.Lock()

    def addresses(self) -> list[str]:
        return [a for a in resolve_peers(self.specs, self.port) if a != self.self_address]

    def load_of(self, peer: PeerHandle) -> int:
        now = time.monotonic()
        with self._lock:
            cached = self._loads.get(peer.address)
        if cached and now - cached[0] < LOAD_TTL:
            return cached[1]
        load = peer.load()
        with self._lock:
            self._loads[peer.address] = (now, load)
        return load

    def mark_down(self, address: str, confirm: bool = False) -> None:
        """Skip ``address`` for ``DOWN_FOR``; with ``confirm``, only if it does not answer
        a GetLoad either.  A StartVm breaks off (UNAVAILABLE) when the guest crashes
        the peer's pool process that was starting it: the peer itself is up, and
        skipping it left a remote-only tender with no place at all for 5 s."""
        if confirm:
            try:
                load = PeerHandle(address, self.creds).load()
            except grpc.RpcError:
                pass
            else:
                log.info("peer %s still answers after a broken call: not skipped", address)
                with self._lock:
                    self._loads[address] = (time.monotonic(), load)
                return
        log.warning("peer %s did not answer: skipped for %g s", address, DOWN_FOR)
        with self._lock:
            self._down[address] = time.monotonic() + DOWN_FOR
            self._loads.pop(address, None)

    def least_loaded(self) -> PeerHandle | None:
        best: tuple[int, int, PeerHandle] | None = None
        now = time.monotonic()
        addresses = self.addresses()
        offset = next(self.turn)  # ties rotate between calls
        for i, addr in enumerate(addresses):
            with self._lock:
                if self._down.get(addr, 0) > now:
                    continue
            peer = PeerHandle(addr, self.creds, self.mark_down)
            try:
                load = self.load_of(peer)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.mark_down(addr)
                    continue
                # slow to answer is not down (a busy host): a candidate, after any that
                # answered; a StartVm that times out too marks it down
                log.info("peer %s did not report its load in time", addr)
                load = SLOW_PEER_LOAD
            key = (load, (i + offset) % len(addresses), peer)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else best[2]

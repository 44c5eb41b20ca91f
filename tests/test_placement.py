"""Peer discovery (``dns:NAME`` expands to every A record, as a headless service
publishes them) and which peers placement skips."""

from __future__ import annotations

import socket
import threading
from concurrent import futures

import grpc

from tender_service import protos
from tender_service.instance.worker import PeerServicer
from tender_service.service.peering import PeerCredentials
from tender_service.service.placement import PeerSet, resolve_peers


def test_dns_peers_expand_to_every_address() -> None:
    peers = resolve_peers(["dns:localhost"], 7700)
    assert "127.0.0.1:7700" in peers
    assert all(p.endswith(":7700") for p in peers)


def test_explicit_peers_kept_in_order_without_duplicates() -> None:
    assert resolve_peers(["10.0.0.2:1", "10.0.0.1:1", "10.0.0.2:1"], 7700) == [
        "10.0.0.2:1",
        "10.0.0.1:1",
    ]


def test_unresolvable_name_is_skipped() -> None:
    assert resolve_peers(["dns:no-such-host.invalid", "10.0.0.9:7700"], 7700) == ["10.0.0.9:7700"]


def test_a_peer_that_still_answers_after_a_broken_call_stays_a_place() -> None:
    """A StartVm that breaks off (UNAVAILABLE: the guest crashed the peer's pool process
    that was starting it) is confirmed with a GetLoad before the peer is skipped: a
    peer that answers stays a place, one where nothing listens is skipped; a refusal
    the caller reports as such (no confirm) skips the peer at once, as before."""
    _, pb2_grpc = protos.peer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb2_grpc.add_PeerServicer_to_server(PeerServicer(threading.Event()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with socket.socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        up = f"127.0.0.1:{port}"
        peers = PeerSet([up, dead], 0, PeerCredentials())
        peers.mark_down(up, confirm=True)
        peers.mark_down(dead, confirm=True)
        best = peers.least_loaded()
        assert best is not None and best.address == up
        peers.mark_down(up)
        assert peers.least_loaded() is None
    finally:
        server.stop(0)

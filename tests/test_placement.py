"""Peer discovery: ``dns:NAME`` expands to every A record (a headless service)."""

from __future__ import annotations

from tender_service.service.placement import resolve_peers


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

"""The local StartVm socket of a pool process (instance/localstart.py): what a fork to a
process of the same host uses instead of gRPC.  Behaviour only: a reply, a kept
connection, and every refusal (the gRPC call's codes) with the server still serving."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from tender_service.instance import localstart
from tender_service.instance.worker import PeerServicer


class Fake:
    """A server whose launch records each request, or refuses with ``refuse``."""

    def __init__(self, path: Path) -> None:
        self.address = f"unix:{path}"
        self.calls: list[tuple[dict, bytes]] = []
        self.refuse: localstart.Refused | None = None
        self.server = localstart.Server(str(path) + localstart.SUFFIX, self.launch)

    def launch(self, start: dict, size: int, receive) -> localstart.Started:
        if self.refuse is not None:
            raise self.refuse
        buf = bytearray(size)
        receive(memoryview(buf))
        self.calls.append((start, bytes(buf)))
        return localstart.Started(int(start["pid"]), 77, "here", 0.25)


@pytest.fixture
def fake(tmp_path: Path):
    f = Fake(tmp_path / "w.sock")
    try:
        yield f
    finally:
        f.server.close()


def test_a_start_is_answered_and_its_connection_kept(fake: Fake) -> None:
    conns = localstart.Connections()
    snap = bytes(range(256)) * 4096  # 1 MiB: more than one socket buffer
    for pid in (3, 4):
        got = conns.start(fake.address, {"pid": pid, "instance_id": "i"}, snap)
        assert got == localstart.Started(pid, 77, "here", 0.25)
    assert [(s["pid"], d == snap) for s, d in fake.calls] == [(3, True), (4, True)]
    assert len(conns._idle[str(fake.server.path)]) == 1  # one connection served both


def test_a_refusal_carries_its_code_and_the_connection_is_not_reused(fake: Fake) -> None:
    conns = localstart.Connections()
    fake.refuse = localstart.Refused("RESOURCE_EXHAUSTED", "snapshot: too large")
    with pytest.raises(localstart.StartFailed) as e:
        conns.start(fake.address, {"pid": 3}, b"x" * 100)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert e.value.details() == "snapshot: too large"
    assert not conns._idle.get(str(fake.server.path))
    fake.refuse = None  # the server goes on serving
    assert conns.start(fake.address, {"pid": 5}, b"y").pid == 5


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 16,
        struct.pack("<4sIQ", localstart.MAGIC, localstart.MAX_HEADER + 1, 0),
        struct.pack("<4sIQ", localstart.MAGIC, 3, 0) + b"{[}",
        struct.pack("<4sIQ", localstart.MAGIC, 2, 0) + b"[]",
    ],
)
def test_garbage_is_refused_and_hung_up_on(fake: Fake, request_bytes: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(fake.server.path)
        s.sendall(request_bytes)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    (n,) = localstart.REPLY.unpack_from(data)
    assert b'"ok": false' in data[4 : 4 + n] and b"INVALID_ARGUMENT" in data
    assert fake.calls == []
    assert localstart.Connections().start(fake.address, {"pid": 9}, b"").pid == 9


def test_a_process_not_there_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(localstart.StartFailed) as e:
        localstart.Connections().start(f"unix:{tmp_path}/none.sock", {"pid": 3}, b"x")
    assert e.value.code == "UNAVAILABLE"


def test_the_worker_refuses_as_its_grpc_call_does(tmp_path: Path) -> None:
    """A pool process's own launch: a bad header, a snapshot that is not one, or more
    than its receive budget are refused with the gRPC call's codes; nothing stays held."""
    servicer = PeerServicer(threading.Event(), receive_budget=1 << 20)
    server = localstart.Server(str(tmp_path / "w.sock") + localstart.SUFFIX, servicer.start_local)
    address = f"unix:{tmp_path / 'w.sock'}"
    conns = localstart.Connections()
    try:
        cases = [
            ({"pid": 3, "no_such_field": 1}, b"x", "INVALID_ARGUMENT", "start:"),
            ({"pid": 3}, b"not a snapshot", "INVALID_ARGUMENT", "cannot start the VM"),
            ({"pid": 3}, b"\0" * (2 << 20), "RESOURCE_EXHAUSTED", "budget"),
        ]
        for start, snap, code, words in cases:
            with pytest.raises(localstart.StartFailed) as e:
                conns.start(address, start, snap)
            assert e.value.code == code and words in e.value.details(), e.value
        assert (servicer.receiving, servicer.starting, servicer.vms) == (0, 0, {})
    finally:
        server.close()


def test_connections_held_open_never_stop_new_ones(fake: Fake) -> None:
    """Each connection is served by the thread that accepted it, which leaves a new
    thread accepting: with more VMs holding their connections than there are
    threads waiting in accept, one more VM is still answered, and so is a VM whose
    connection follows a refused one (that thread's replacement comes at its end)."""
    held = [localstart.Connections() for _ in range(localstart.ACCEPTORS + 2)]
    for pid, conns in enumerate(held, 3):
        assert conns.start(fake.address, {"pid": pid}, b"s").pid == pid
    fake.refuse = localstart.Refused("INVALID_ARGUMENT", "no")
    with pytest.raises(localstart.StartFailed):
        localstart.Connections().start(fake.address, {"pid": 90}, b"s")
    fake.refuse = None
    late = localstart.Connections()
    assert late.start(fake.address, {"pid": 91}, b"s").pid == 91
    assert [s["pid"] for s, _ in fake.calls] == [*range(3, 3 + len(held)), 91]
    for conns in held:  # each kept its connection, still served
        assert len(conns._idle[str(fake.server.path)]) == 1

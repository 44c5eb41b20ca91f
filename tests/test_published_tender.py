"""Published ports through a tender (issue 16): Launch's ``publish``.

A VM-clone instance's supervisor runs in the tender's own process (not in a
jailed VM process), so the tender binds the host port and hands each
connection to whichever VM of the instance waits in ``accept``: on this host,
or on a peer tender (placement remote). Real ``unifork serve`` processes
(test_service.Tender), guest/programs/prefork_http.c, Python's http.client.
A tender publishes nothing unless its operator allows it (``--publish-ports``);
a thread-fork instance is refused (its VM process is jailed), and so is a host
port outside the allowed range.
"""

from __future__ import annotations

import http.client
import socket

import grpc
from support import wait_until
from test_peering import PEER_TOKEN, TOKEN, hosts, warm
from test_service import MODES, Tender, launch, rpc_error, wait, wait_for_output

from tender_service import protos

pb2, _ = protos.tender()
GUEST_PORT = 8080


def publish(host_port: int = 0, guest_port: int = GUEST_PORT) -> list:
    return [pb2.PortMapping(host_port=host_port, guest_port=guest_port)]


def get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def published_port(c, iid: str) -> int:
    """The host port the tender bound for the instance (Describe), once it started."""
    d = wait_until(lambda: c.describe(iid).published, 60, "the instance's published port")
    (m,) = d
    assert (m.host_ip, m.guest_port) == ("127.0.0.1", GUEST_PORT), m
    return int(m.host_port)


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def serve_and_check(c, iid: str) -> int:
    """prefork_http is up behind the published port: it answers as it does natively
    (test_published.py compares it byte for byte); the port."""
    port = published_port(c, iid)
    wait_for_output(c, iid, b"prefork_http: listening")
    for i in range(12):
        status, body = get(port, f"/bytes/{1000 + i}")
        assert (status, len(body)) == (200, 1000 + i)
    assert get(port, "/hello") == (200, b"hello\n")
    assert get(port, "/nope")[0] == 404
    return port


def test_a_tender_publishes_a_vmclone_instance_and_closes_the_port_after(tmp_path):
    t = Tender.start(tmp_path, "--pool", "2", "--publish-ports", "0", token=TOKEN)
    try:
        c = t.client()
        iid = launch(
            c, "prefork_http", ["-p", str(GUEST_PORT), "-w", "3"], console_pipe=True,
            publish=publish(), **MODES["vmclone-shm"],
        )  # fmt: skip
        port = serve_and_check(c, iid)
        assert len(hosts(c, iid)) == 1  # master and workers: VMs of this tender
        assert c.kill(iid)
        r = wait(c, iid)
        assert r.outcome == "killed", r
        wait_until(lambda: refuses(port), 30, "the published port closed with the instance")
    finally:
        t.stop()


def test_workers_on_a_peer_serve_the_published_port(tmp_path):
    """Placement remote: the master and its workers run on B; A's tender owns the
    port and every connection goes A -> B and back through the instance's channels."""
    b = Tender.start(tmp_path, "--pool", "1", token=TOKEN, peer_token=PEER_TOKEN)
    try:
        a = Tender.start(
            tmp_path, "--pool", "1", "--peer", b.peer_target, "--publish-ports", "0",
            token=TOKEN, peer_token=PEER_TOKEN,
        )  # fmt: skip
        try:
            warm(a)
            warm(b)
            c = a.client()
            iid = launch(
                c, "prefork_http", ["-p", str(GUEST_PORT), "-w", "2"], console_pipe=True,
                publish=publish(), placement=pb2.PLACEMENT_REMOTE, **MODES["vmclone-tcp"],
            )  # fmt: skip
            serve_and_check(c, iid)
            assert hosts(c, iid) == {b.target}, c.describe(iid)
            c.kill(iid)
            wait(c, iid)
        finally:
            a.stop()
    finally:
        b.stop()


def test_a_tender_publishes_only_what_its_operator_allows(tmp_path):
    closed = Tender.start(tmp_path, "--pool", "1")
    try:
        c = closed.client()
        e = rpc_error(lambda: launch(c, "prefork_http", publish=publish(), **MODES["vmclone-shm"]))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "publishes no ports" in e.details() and "--publish-ports" in e.details()
    finally:
        closed.stop()
    t = Tender.start(tmp_path, "--pool", "1", "--publish-ports", "20000-20010")
    try:
        c = t.client()
        for fields, words in (
            (dict(publish=publish(), **MODES["thread"]), "VM-clone instances only"),
            (dict(publish=publish(30000), **MODES["vmclone-shm"]), "20000-20010, or 0"),
            (dict(publish=publish(20001, 0), **MODES["vmclone-shm"]), "guest_port"),
            (
                dict(publish=[pb2.PortMapping(host_ip="0.0.0.0", host_port=20001, guest_port=80)],
                     **MODES["vmclone-shm"]),
                "host_ip must be 127.0.0.1",
            ),
            (dict(publish=publish() * 17, **MODES["vmclone-shm"]), "at most 16"),
        ):  # fmt: skip
            e = rpc_error(lambda f=fields: launch(c, "prefork_http", **f))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert words in e.details(), (words, e.details())
    finally:
        t.stop()

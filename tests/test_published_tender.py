"""Published ports and outbound connections through a tender (issue 16): Launch's
``publish`` and ``allow_outbound``.

A VM-clone instance's supervisor runs in the tender's own process (not in a
jailed VM process), so the tender binds the host port and hands each
connection to whichever VM of the instance waits in ``accept``: on this host,
or on a peer tender (placement remote). Real ``unifork serve`` processes
(test_service.Tender), guest/programs/prefork_http.c, Python's http.client.
A tender publishes nothing unless its operator allows it (``--publish-ports``),
nor a host port outside the allowed range; a thread- or copy-fork instance's
ports are bound by the tender and served by its jailed VM process.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from support import native, refused_port, wait_until
from test_peering import PEER_TOKEN, TOKEN, hosts, warm
from test_service import (
    MODES,
    Tender,
    console,
    launch,
    rpc_error,
    stdout_of,
    wait,
    wait_for_output,
)

from tender_service import protos

pb2, _ = protos.tender()
GUEST_PORT = 8080
GATEWAY = "10.0.2.2"  # the host's 127.0.0.1 as a guest sees it
#: connections opened and dropped in the storm test (UNIFORK_CONN_STORM to change)
STORM = int(os.environ.get("UNIFORK_CONN_STORM", "10000"))


@contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on the host's loopback: its port."""
    srv = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()
        t.join(10)


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


def launch_prefork(c, workers: int, **fields) -> str:
    """prefork_http with ``workers`` workers, its port published (a port the host picks)."""
    args = ["-p", str(GUEST_PORT), "-w", str(workers)]
    return launch(c, "prefork_http", args, console_pipe=True, publish=publish(), **fields)


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


@pytest.mark.parametrize("mode", ["thread", "copy", "vmclone-shm"])
def test_a_tender_publishes_an_instance_and_closes_the_port_after(tmp_path, mode: str):
    """VM-clone: the tender's supervisor serves the port; thread and copy fork: the
    tender binds it and hands the listening socket to the instance's jailed VM
    process, which may accept on it (and open nothing: instance/jail.py)."""
    t = Tender.start(tmp_path, "--pool", "2", "--publish-ports", "0", token=TOKEN)
    try:
        c = t.client()
        iid = launch_prefork(c, 3, **MODES[mode])
        port = serve_and_check(c, iid)
        assert len(hosts(c, iid)) == 1  # master and workers: VMs of this tender
        if mode != "vmclone-shm":  # its VM process is jailed, with what serving needs
            wait_until(lambda: "to serve published ports" in t.log(), 30, "the jail line")
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
            iid = launch_prefork(c, 2, placement=pb2.PLACEMENT_REMOTE, **MODES["vmclone-tcp"])
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
            (dict(allow_outbound=["127.0.0.1:80"], **MODES["thread"]), "VM-clone instances only"),
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


def test_a_tender_lets_a_vmclone_instance_connect_out_where_allowed(tmp_path):
    """Launch's allow_outbound within the tender's --allow-outbound-to: sock_outbound
    prints what it prints natively; the tender's own ports are never a destination,
    even under an allowed address; a destination outside the tender's list is refused."""
    with refused_port() as closed, echo_server() as echo:
        want = native("sock_outbound", "127.0.0.1", str(echo), str(closed)).stdout
        t = Tender.start(tmp_path, "--pool", "2", "--allow-outbound-to", "127.0.0.1:*")
        try:
            c = t.client()
            fields = dict(console_pipe=True, **MODES["vmclone-shm"])
            rules = [f"127.0.0.1:{echo}", f"127.0.0.1:{closed}"]
            iid = launch(
                c, "sock_outbound", [GATEWAY, str(echo), str(closed)], allow_outbound=rules,
                **fields,
            )  # fmt: skip
            r = wait(c, iid)
            assert (r.outcome, r.exit_code) == ("exited", 0), r
            assert stdout_of(console(c, iid)) == want
            for port in (t.port, t.peer_port, t.metrics_port):  # the tender's own
                iid = launch(
                    c, "sock_outbound", ["-1", GATEWAY, str(port)],
                    allow_outbound=["127.0.0.1:*"], **fields,
                )  # fmt: skip
                wait(c, iid)
                assert stdout_of(console(c, iid)) == b"connect = ENETUNREACH\n", port
            e = rpc_error(
                lambda: launch(c, "sock_outbound", allow_outbound=["127.0.0.2:80"], **fields)
            )
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a destination this tender allows" in e.details()
        finally:
            t.stop()
    closed_tender = Tender.start(tmp_path, "--pool", "1")
    try:
        c = closed_tender.client()
        e = rpc_error(
            lambda: launch(
                c, "sock_outbound", allow_outbound=["127.0.0.1:80"], **MODES["vmclone-shm"]
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "lets no instance connect out" in e.details()
    finally:
        closed_tender.stop()


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_a_connection_storm_leaves_the_tender_serving_and_its_fds_back(tmp_path, mode: str):
    """Bad input: STORM connections opened and dropped against a published port (half
    with a partial request): the tender still serves the instance and its other
    calls, and its open fds come back to their count before the storm."""
    t = Tender.start(tmp_path, "--pool", "2", "--publish-ports", "0")
    try:
        c = t.client()
        iid = launch_prefork(c, 2, **MODES[mode])
        port = serve_and_check(c, iid)

        def fds() -> int:
            return len(os.listdir(f"/proc/{t.proc.pid}/fd"))

        before = fds()
        for i in range(STORM):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                if i % 2:
                    s.sendall(b"GET /hel")
        assert get(port, "/hello") == (200, b"hello\n")
        assert c.describe(iid).summary.state == "running"
        wait_until(
            lambda: fds() <= before, 120, "the tender's fds back to their count",
            detail=lambda: f"before {before}, now {fds()}",
        )  # fmt: skip
        c.kill(iid)
        wait(c, iid)
    finally:
        t.stop()

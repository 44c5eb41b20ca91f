"""Outbound connections (issue 16): `unifork run --allow-outbound IP:PORT`.

In thread and copy fork the VM's process makes the host connection; in
VM-clone fork the instance's supervisor does (the VM's socket becomes the
guest's end of it, two broker pipes), so the same tests run there too.

Nothing leaves an instance unless its allow-list names the destination; the
guest reaches the host's 127.0.0.1 as 10.0.2.2 (its own 127.0.0.1 is the
instance's private loopback).  guest/programs/sock_outbound.c connects to an
echo server this test runs on the host's loopback (blocking, non-blocking
with poll and SO_ERROR, from a forked child, and to a refused port): its
output natively (to 127.0.0.1) is the reference for each fork mode.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import free_port, image_path, native, refused_port, wait_until

from tender_service.instance.publish import PublishError, parse_outbound
from tender_service.rump.published import MAX_OUTBOUND, OutboundRule

UNIFORK = str(Path(sys.executable).parent / "unifork")
GATEWAY = "10.0.2.2"


@dataclass
class EchoServer:
    port: int
    accepted: int = 0
    closed: int = 0  # connections that ended (the client closed, or reset)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    """A TCP echo server on the host's loopback (each connection echoed to its EOF)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=512)
    state = EchoServer(srv.getsockname()[1])
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass
        with state.lock:
            state.closed += 1

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with state.lock:
                state.accepted += 1
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield state
    finally:
        stop.set()
        srv.close()
        t.join(10)


@pytest.fixture
def echo_port(echo: EchoServer) -> int:
    return echo.port


def run(mode: str, flags: list[str], *args: str) -> subprocess.CompletedProcess:
    fork, _, pipe = mode.partition("-")  # vmclone-tcp: the tcp transport
    cmd = [UNIFORK, "run", "--fork", fork, "--timeout", "120", "--console", "pipe", *flags]
    cmd += ["--pipe", pipe] if pipe else []
    return subprocess.run(
        [*cmd, str(image_path("sock_outbound")), "--", *args],
        capture_output=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def allow(*ports: int) -> list[str]:
    return [a for p in ports for a in ("--allow-outbound", f"127.0.0.1:{p}")]


@pytest.mark.parametrize("mode", ["thread", "copy", "vmclone", "vmclone-tcp"])
def test_outbound_connections_as_native(mode: str, echo_port: int) -> None:
    with refused_port() as closed:
        want = native("sock_outbound", "127.0.0.1", str(echo_port), str(closed))
        got = run(mode, allow(echo_port, closed), GATEWAY, str(echo_port), str(closed))
    assert want.returncode == 0, want.stderr
    assert b"child: echoed hello from the child" in want.stdout
    assert (got.returncode, got.stdout.decode()) == (0, want.stdout.decode()), got.stderr


@pytest.mark.parametrize("mode", ["thread", "vmclone"])
@pytest.mark.parametrize(
    ("flags", "why"),
    [
        ([], "no allow-list: nothing leaves the instance"),
        (["--allow-outbound", "127.0.0.1:1"], "another port"),
        (["--allow-outbound", "127.0.0.2:*"], "another address"),
    ],
)
def test_a_destination_not_allowed_is_unreachable(
    mode: str, flags: list[str], why: str, echo_port: int
) -> None:
    p = run(mode, flags, "-1", GATEWAY, str(echo_port))
    assert (p.returncode, p.stdout) == (0, b"connect = ENETUNREACH\n"), (why, p.stderr)


def test_any_port_of_an_allowed_address(echo_port: int) -> None:
    p = run("copy", ["--allow-outbound", "127.0.0.1:*"], "-1", GATEWAY, str(echo_port))
    assert (p.returncode, p.stdout) == (0, b"connect = 0\n"), p.stderr


def test_the_guests_own_loopback_is_not_the_host(echo_port: int) -> None:
    """127.0.0.1 in the guest is the instance's: the host's echo server is not there."""
    p = run("thread", allow(echo_port), "-1", "127.0.0.1", str(echo_port))
    assert (p.returncode, p.stdout) == (0, b"connect = ECONNREFUSED\n"), p.stderr


@pytest.mark.parametrize("mode", ["thread", "vmclone"])
def test_the_instances_own_published_port_is_never_a_destination(mode: str) -> None:
    """A connect out to the host port the instance publishes would loop into itself."""
    port = free_port()
    p = run(mode, ["-p", f"{port}:80", *allow(port)], "-1", GATEWAY, str(port))
    assert (p.returncode, p.stdout) == (0, b"connect = ENETUNREACH\n"), p.stderr


@pytest.mark.parametrize("mode", ["thread", "vmclone"])
def test_connections_closed_at_once_leave_nothing_open_on_the_host(
    mode: str, echo: EchoServer
) -> None:
    """Bad input: connects closed right away, half of them while still connecting:
    every host connection made is closed again (none is left to the host's fds)."""
    n = 2000
    with echo.lock:
        accepted = echo.accepted
    p = run(mode, allow(echo.port), "-n", str(n), GATEWAY, str(echo.port))
    assert (p.returncode, p.stdout) == (0, f"connections made and closed: {n} of {n}\n".encode())

    def all_closed() -> bool:
        # the blocking half at least made; every connection the server ever accepted
        # closed (counting closes since the start instead missed by one for ever when
        # an earlier test's last connection was still open at that start)
        with echo.lock:
            return echo.accepted - accepted >= n // 2 and echo.closed == echo.accepted

    wait_until(all_closed, 60, "every host connection to be closed")


@pytest.mark.parametrize("mode", ["thread", "vmclone"])
def test_an_instance_holds_at_most_max_outbound_connections(mode: str, echo: EchoServer) -> None:
    """Bad input: a guest that opens connections and never closes them gets
    EADDRNOTAVAIL past MAX_OUTBOUND (each holds a host fd), as Linux out of ports."""
    p = run(mode, allow(echo.port), "-h", str(MAX_OUTBOUND + 10), GATEWAY, str(echo.port))
    want = f"connections held: {MAX_OUTBOUND}, then EADDRNOTAVAIL\n".encode()
    assert (p.returncode, p.stdout) == (0, want), p.stderr


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("127.0.0.1:8080", OutboundRule("127.0.0.1", 8080)),
        ("127.0.0.1:*", OutboundRule("127.0.0.1", 0)),
        ("[::1]:443", OutboundRule("::1", 443)),
    ],
)
def test_allow_outbound_parses(text: str, rule: OutboundRule) -> None:
    assert parse_outbound(text) == rule


@pytest.mark.parametrize("text", ["127.0.0.1", "localhost:80", "127.0.0.1:0", "1.2.3.4:70000"])
def test_allow_outbound_rejects_bad_specs(text: str) -> None:
    with pytest.raises(PublishError):
        parse_outbound(text)

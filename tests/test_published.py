"""Published ports (issue 16): `unifork run --publish HOST:GUEST` in every fork mode.

guest/programs/prefork_http.c, a pre-forking HTTP/1.0 server (workers accept
on one shared listening socket, the master re-forks a dead worker on
SIGCHLD), serves Python's http.client on the host through the published
port; the same binary run natively on the host port is the reference: every
answer must be the same, byte for byte (but the Date-free headers are all
there is).  In VM-clone mode the workers are VMs of their own: the
supervisor owns the host port and each connection reaches whichever worker
VM waits in accept (instance/clone_ports.py).  Bad input: thousands of
connections opened and dropped leave the server serving and the host fds of
the process that holds the connections back where they were; a guest port
that is not published is not reachable from the host.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port, image_path, refused_port, wait_until

from tender_service.instance.publish import PortMapping, PublishError

UNIFORK = str(Path(sys.executable).parent / "unifork")
MODES = ["native", "thread", "copy", "vmclone"]
VM_MODES = MODES[1:]
GUEST_PORT = 8080
#: connections opened and dropped in the storm test (UNIFORK_CONN_STORM to change)
STORM = int(os.environ.get("UNIFORK_CONN_STORM", "10000"))


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    mode: str

    def vm_pid(self) -> int:
        """The process that holds the host connections: the one that runs the VM
        (``unifork run`` forks it), the native server, or (VM-clone) ``unifork run``
        itself, where the supervisor serves the published ports."""
        if self.mode in ("native", "vmclone"):
            return self.proc.pid
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        kids = wait_until(lambda: path.read_text().split(), 30, "the VM process")
        assert isinstance(kids, list)
        return int(kids[0])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.vm_pid()}/fd"))


@contextmanager
def serve(
    mode: str, *args: str, guest_port: int = GUEST_PORT, published: int = GUEST_PORT
) -> Iterator[Server]:
    """prefork_http listening on ``guest_port``, the host port mapped to ``published``
    (a port the host picks: ``-p 0:GUEST``, read from what ``unifork run`` prints)."""
    exe = str(image_path("prefork_http"))
    if mode == "native":
        port = free_port()
        cmd = [exe, "-p", str(port), *args]
    else:
        fork, _, pipe = mode.partition("-")  # vmclone-tcp: the tcp transport
        cmd = [UNIFORK, "run", "--fork", fork, "--timeout", "600", "--console", "pipe"]
        cmd += ["--pipe", pipe] if pipe else []
        cmd += ["--publish", f"0:{published}", exe, "--", "-p", str(guest_port), *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        if mode != "native":
            said = proc.stderr.readline().decode()
            prefix = "unifork: published 127.0.0.1:"
            assert said.startswith(prefix) and said.endswith(f" -> guest port {published}\n"), said
            port = int(said[len(prefix) :].split()[0])
        line = proc.stdout.readline().decode()
        assert line.startswith("prefork_http: listening"), (line, proc.poll())
        yield Server(proc, port, mode)
    finally:
        running = proc.poll() is None
        if running:
            os.killpg(proc.pid, signal.SIGTERM if mode == "native" else signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    # ^C ends `unifork run` at once, whatever the guest was doing (130, or killed by
    # SIGINT: a shell says 130 for both)
    want = {0} if mode == "native" else {130, -signal.SIGINT}
    assert not running or code in want, (mode, code)


def get(port: int, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        c.close()


REQUESTS = ["/hello", "/bytes/1", "/bytes/300000", "/nope", "/bytes/0"]


@pytest.fixture(scope="module")
def native_answers() -> dict[str, tuple[int, list[tuple[str, str]], bytes]]:
    with serve("native", "-w", "2") as s:
        return {p: get(s.port, p) for p in REQUESTS}


@pytest.mark.parametrize("mode", [*VM_MODES, "vmclone-tcp"])
def test_answers_match_native(mode: str, native_answers: dict) -> None:
    with serve(mode, "-w", "2") as s:
        for p in REQUESTS:
            assert get(s.port, p) == native_answers[p], p
    assert native_answers["/hello"][0] == 200 and native_answers["/hello"][2] == b"hello\n"
    assert native_answers["/nope"][0] == 404
    assert len(native_answers["/bytes/300000"][2]) == 300000


@pytest.mark.parametrize("mode", MODES)
def test_worker_killed_mid_load_is_reforked(mode: str) -> None:
    """40 requests from 4 client threads, one of them kills the worker that takes it: only
    that one is lost, the master re-forks the worker, and requests go on succeeding."""
    with serve(mode, "-w", "3") as s:
        paths = [f"/bytes/{1000 + i}" for i in range(40)]
        paths[17] = "/die"

        def one(p: str) -> object:
            try:
                return get(s.port, p)
            except (http.client.RemoteDisconnected, ConnectionResetError) as e:
                return type(e).__name__

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, paths))
        for p, a in zip(paths, answers, strict=True):
            if p == "/die":
                assert a in ("RemoteDisconnected", "ConnectionResetError"), a
            else:
                assert isinstance(a, tuple) and a[0] == 200, (p, a)
                assert len(a[2]) == int(p.rsplit("/", 1)[1])
        for _ in range(6):  # more than the workers: the re-forked one serves too
            assert get(s.port, "/hello")[2] == b"hello\n"
    assert s.proc.stderr is not None
    err = s.proc.stderr.read()  # the server is stopped: everything it wrote
    assert b"worker killed by signal 9, re-forked" in err, err


@pytest.mark.parametrize("mode", VM_MODES)
def test_sendfile_through_published_port(mode: str) -> None:
    """/file: the master writes a 200 KB file, workers send it with sendfile(2) (the
    guest's own file system: a path under /tmp in the VM, a fresh one natively)."""
    with tempfile.TemporaryDirectory(prefix="unifork-pub-") as top:
        path = f"{top}/served"
        with serve("native", "-w", "1", "-f", path, "-m", "200000") as s:
            want = get(s.port, "/file")
    assert want[0] == 200 and len(want[2]) == 200000
    with serve(mode, "-w", "1", "-f", "/tmp/served", "-m", "200000") as s:
        assert get(s.port, "/file") == want


@pytest.mark.parametrize("mode", VM_MODES)
def test_connection_storm_leaves_server_responsive(mode: str) -> None:
    """STORM connections opened and dropped (half with a partial request): the server
    still answers and the VM process's host fds come back to their count before."""
    with serve(mode, "-w", "2") as s:
        assert get(s.port, "/hello")[2] == b"hello\n"
        before = s.fds()
        for i in range(STORM):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
                if i % 2:
                    c.sendall(b"GET /hel")
        assert get(s.port, "/hello")[2] == b"hello\n"
        wait_until(
            lambda: s.fds() <= before,
            120,
            "the VM process's fds back to their count before the storm",
            detail=lambda: f"before {before}, now {s.fds()}",
        )
        assert s.proc.poll() is None


@pytest.mark.parametrize("mode", VM_MODES)
def test_unpublished_guest_port_is_unreachable(mode: str) -> None:
    """The guest listens on a port that is not published: the host's port (where nothing
    of ours listens) refuses, and the published port reaches no listener (closed)."""
    with refused_port() as other, serve(mode, "-w", "1", guest_port=other) as s:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", other), timeout=10).close()
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            get(s.port, "/hello")
        assert s.proc.poll() is None


def test_publish_needs_a_valid_mapping_and_a_free_port() -> None:
    assert PortMapping.parse("8080:80") == PortMapping(8080, 80, "127.0.0.1")
    assert PortMapping.parse("0.0.0.0:8080:80") == PortMapping(8080, 80, "0.0.0.0")
    assert PortMapping.parse("[::1]:8080:80") == PortMapping(8080, 80, "::1")
    for bad in ("80", "a:80", "8080:0", "70000:80"):
        with pytest.raises(PublishError):
            PortMapping.parse(bad)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for fork in ("thread", "vmclone"):
            r = subprocess.run(
                [UNIFORK, "run", "--fork", fork, "-p", f"{port}:80", "hello"],
                capture_output=True,
                timeout=120,
            )
            assert r.returncode == 2 and b"cannot publish" in r.stderr, (fork, r.stderr)

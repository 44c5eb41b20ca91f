"""Tenders on "hosts" (network namespaces) and a gRPC client among them, for tests.

``Cluster(hosts, workdir)`` starts ``unifork serve`` in host k on its
address, port 7700 for clients and 7701 for peers (the default, the client
port + 1), with one client token and one peer token, every other host's peer
port as a peer and metrics on 9100; each tender gets its own /tmp, /dev/shm and upload directory
(directories of the test bind-mounted in the mount namespace ``ip netns
exec`` gives it), so that, as on real hosts, a Unix socket, a shm segment, a
temp file or an uploaded image of one host cannot be used by another, and
what a host's tender leaves behind can be counted.  ``Agent`` is the client:
``tests/mh_agent.py`` running in a host (Python 3.11 has no ``os.setns``).
Used by ``test_multihost.py`` and ``test_soak.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from netns import Hosts, hosts_or_skip
from support import wait_until

from tender_service.service.placement import DOWN_FOR
from tender_service.toolchain.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
UNIFORK = Path(sys.executable).with_name("unifork")
AGENT = Path(__file__).with_name("mh_agent.py")
PORT = 7700
PEER_PORT = 7701  # serve's default --peer-listen: the client port + 1
METRICS_PORT = 9100
A, B, C = 0, 1, 2
START_TIMEOUT = 90.0
#: ``serve --peer-timeout``: short, so that a link down past it is a quick test; long
#: enough for TCP to ride out a shorter outage (its retransmissions back off
#: 0.2, 0.4, 0.8, 1.6, 3.2 s: one lands 6.2 s after the first loss)
PEER_TIMEOUT = 10.0
RUN_TIMEOUT = 90.0


# -- checks of a run's answer --------------------------------------------------------------
def explain(c: Cluster, r: dict) -> str:
    res = r["result"]
    return (
        f"outcome {res['outcome']} exit {res['exit_code']} reports {res['reports']}\n"
        f"stdout: {r['stdout'][-2000:]!r}\nstderr: {r['stderr'][-2000:]!r}\n"
        f"processes: {[(p['pid'], p['host'], p['state']) for p in r['describe']['processes']]}"
        f"\n{c.logs_tail()}"
    )


def assert_exited_0(c: Cluster, r: dict) -> None:
    res = r["result"]
    assert res["done"] and res["outcome"] == "exited" and res["exit_code"] == 0, explain(c, r)


def hosts_of(desc: dict) -> set[str]:
    """The hosts of the instance's processes (init, pid 1, is the supervisor: skipped)."""
    return {p["host"] for p in desc["processes"] if p["pid"] != 1}


# -- the client in host A ---------------------------------------------------------------------
class AgentError(AssertionError):
    def __init__(self, reply: dict) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('error')}")
        self.code = reply.get("code")


class Agent:
    """``tests/mh_agent.py`` running in one host; ``call(op, ...)`` is one request."""

    def __init__(self, hosts: Hosts, k: int, token_file: Path, peer_token_file: Path) -> None:
        self.proc = hosts.popen(
            k,
            [sys.executable, str(AGENT), str(token_file), str(peer_token_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.lock = threading.Lock()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def call(self, op: str, wait: float = 120.0, **kw):
        with self.lock:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
            try:
                line = self.replies.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"agent: no answer to {op} in {wait:g} s") from None
        if line is None:
            raise RuntimeError(f"agent died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AgentError(reply)
        return reply["value"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the cluster --------------------------------------------------------------------------------
def _private_dirs(hostdir: Path) -> dict[str, str]:
    """What a host does not share with the others: /tmp, /dev/shm, the upload store."""
    dirs = {
        "/dev/shm": str(hostdir / "shm"),
        str(cache_dir() / "uploads"): str(hostdir / "uploads"),
    }
    shared = [ROOT, Path(sys.executable), cache_dir(), hostdir]
    if not any(str(p).startswith("/tmp/") for p in shared):
        dirs["/tmp"] = str(hostdir / "tmp")
    return dirs


class Cluster:
    def __init__(self, hosts: Hosts, workdir: Path, serve_args: tuple[str, ...] = ()) -> None:
        self.hosts = hosts
        self.serve_args = list(serve_args)  # more `unifork serve` flags for every tender
        self.workdir = workdir
        self.token_file = workdir / "token"
        self.token_file.write_text(os.urandom(24).hex() + "\n")
        self.token_file.chmod(0o600)
        self.peer_token_file = workdir / "peer-token"
        self.peer_token_file.write_text(os.urandom(24).hex() + "\n")
        self.peer_token_file.chmod(0o600)
        self.tenders: list[subprocess.Popen | None] = [None] * hosts.n
        self.logs: list[Path] = [workdir / f"tender{k}.log" for k in range(hosts.n)]
        self.agent: Agent | None = None
        self.lost: int | None = None  # the peer test_peer_lost_mid_run killed
        self.killed: set[int] = set()  # hosts whose tender was SIGKILLed at some point

    def addr(self, k: int) -> str:
        return self.hosts.addr(k)

    def close(self) -> None:
        """Stop the agent and every tender still running (SIGTERM, then SIGKILL)."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        for k, p in enumerate(self.tenders):
            if p is not None and p.poll() is None:
                try:
                    self.stop(k, timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def target(self, k: int) -> str:
        return f"{self.addr(k)}:{PORT}"

    def peer_target(self, k: int) -> str:
        return f"{self.addr(k)}:{PEER_PORT}"

    def start(self, k: int) -> None:
        peers = [a for j in range(self.hosts.n) if j != k for a in ("--peer", self.peer_target(j))]
        argv = [
            str(UNIFORK),
            "-v",
            "serve",
            "--listen",
            self.target(k),
            "--advertise",
            self.target(k),
            *peers,
            "--token-file",
            str(self.token_file),
            "--peer-token-file",
            str(self.peer_token_file),
            "--metrics-port",
            str(METRICS_PORT),
            "--pool",
            "2",
            "--grace",
            "5",
            "--peer-timeout",
            str(PEER_TIMEOUT),
            *self.serve_args,
        ]
        with open(self.logs[k], "ab") as log:
            self.tenders[k] = self.hosts.popen(
                k, argv, mounts=self.mounts(k), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def mounts(self, k: int) -> dict[str, str]:
        return _private_dirs(self.workdir / f"host{k}")

    def leftovers(self, k: int) -> dict[str, list[str]]:
        """What is left in host k's own /tmp and /dev/shm."""
        return {
            target: sorted(os.listdir(source))
            for target, source in self.mounts(k).items()
            if target in ("/tmp", "/dev/shm") and os.listdir(source)
        }

    def wait_healthy(self, k: int) -> None:
        try:
            self.agent.call(
                "health", wait=START_TIMEOUT + 10, target=self.target(k), timeout=START_TIMEOUT
            )
        except (AgentError, TimeoutError) as e:
            raise AssertionError(f"tender {k} not healthy ({e}):\n{self.log_tail(k)}") from e

    def stop(self, k: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal tender k and wait for its exit status."""
        p = self.tenders[k]
        p.send_signal(sig)
        status = p.wait(timeout)
        self.tenders[k] = None
        return status

    def log_tail(self, k: int, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logs[k].read_text(errors="replace").splitlines()[-n:])
        return ""

    def logs_tail(self) -> str:
        return "\n".join(f"--- tender {k} log:\n{self.log_tail(k)}" for k in range(self.hosts.n))

    # -- client shortcuts -----------------------------------------------------------------
    def run(self, image: str, args: list[str], on: int = A, **launch) -> dict:
        r = self.agent.call(
            "run",
            wait=RUN_TIMEOUT + 30,
            target=self.target(on),
            timeout=RUN_TIMEOUT,
            image=image,
            args=args,
            **launch,
        )
        r["stdout"] = "".join(t for _pid, fd, t in r["logs"]["chunks"] if fd == 1)
        r["stderr"] = "".join(t for _pid, fd, t in r["logs"]["chunks"] if fd == 2)
        return r

    def vms(self, k: int) -> int:
        return int(self.agent.call("load", target=self.peer_target(k))["vms"])

    def load_queries(self, k: int) -> float:
        """How many Peer.GetLoad calls tender k has answered (its /metrics)."""
        text = self.agent.call("metrics", url=f"http://{self.addr(k)}:{METRICS_PORT}/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("grpc_server_handled_total{")
            and 'grpc_service="unifork.v1.Peer"' in line
            and 'grpc_method="GetLoad"' in line
            and 'grpc_code="OK"' in line
        )

    def wait_placeable(self, k: int) -> None:
        """Poll until A's placement asks peer k for its load again (A no longer holds
        it for down), launching small remote instances on A to make it look."""

        def asked() -> bool:
            before = self.load_queries(k)
            r = self.run("hello", [], fork_mode="vmclone", pipe_transport="tcp", placement="remote")
            assert_exited_0(self, r)
            return self.load_queries(k) > before

        wait_until(asked, DOWN_FOR + 30, f"A to place on peer {k} again", interval=0.2)


@contextlib.contextmanager
def running_cluster(
    name: str,
    serve_args: tuple[str, ...] = (),
    uploads: dict[str, Path] | None = None,
    n: int = 3,
) -> Iterator[Cluster]:
    """``n`` hosts (three by default), a healthy tender on each (``uploads``: name -> image
    uploaded to every one), the agent in host A; everything stopped and removed on exit."""
    hosts = hosts_or_skip(n)
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None  # not /tmp: tenders hide it
    workdir = Path(tempfile.mkdtemp(prefix=f"unifork-{name}-", dir=base))
    c = Cluster(hosts, workdir, serve_args)
    try:
        for k in range(hosts.n):
            c.start(k)
        c.agent = Agent(hosts, A, c.token_file, c.peer_token_file)
        for k in range(hosts.n):
            c.wait_healthy(k)
        for k in range(hosts.n):  # an uploaded image lives only where it was uploaded
            for image, elf in (uploads or {}).items():
                c.agent.call("upload", target=c.target(k), name=image, path=str(elf))
        yield c
    finally:
        try:
            c.close()
            hosts.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

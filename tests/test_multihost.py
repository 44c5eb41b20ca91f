"""Three tenders on three "hosts" (network namespaces): VM-clone children on peers.

Host k (0: A, 1: B, 2: C) is a network namespace with address 10.200.0.(11+k)
(``tests/netns.py``); each runs ``unifork serve`` on its address, port 7700,
with the same token, the other two as peers and metrics on 9100.  Every
tender also gets a private, empty /tmp and upload directory (tmpfs in the
mount namespace ``ip netns exec`` gives it), so that, as on real hosts, a
Unix socket, a temp file or an uploaded image of one host cannot be used by
another; /dev/shm stays shared so that leaked segments can be counted.

The gRPC clients run in host A: ``tests/mh_agent.py`` (one process, JSON
lines; Python 3.11 has no ``os.setns``).  Nothing is mocked: real tenders,
real VMs, real sockets between namespaces.  The tests share one cluster and
run in file order; the last one shuts everything down and checks that no
process, namespace or shm segment is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import image_path, native
from netns import Hosts, NetnsUnavailable, namespaces, wait_until

from tender_service.service.placement import LOAD_TTL
from tender_service.toolchain.images import build_image
from tender_service.toolchain.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
UNIFORK = Path(sys.executable).with_name("unifork")
AGENT = Path(__file__).with_name("mh_agent.py")
BLOCK_SRC = Path(__file__).with_name("guest") / "mh_block.c"
PORT = 7700
METRICS_PORT = 9100
A, B, C = 0, 1, 2
START_TIMEOUT = 90.0
RUN_TIMEOUT = 90.0

pytestmark = pytest.mark.timeout(600)


# -- the client in host A ---------------------------------------------------------------------
class AgentError(AssertionError):
    def __init__(self, reply: dict) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('error')}")
        self.code = reply.get("code")


class Agent:
    """``tests/mh_agent.py`` running in one host; ``call(op, ...)`` is one request."""

    def __init__(self, hosts: Hosts, k: int, token_file: Path) -> None:
        self.proc = hosts.popen(k, [sys.executable, str(AGENT), str(token_file)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
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
def _private_dirs() -> tuple[str, ...]:
    """What each tender must not share with the others: /tmp and the upload store."""
    dirs = [str(cache_dir() / "uploads")]
    shared = [ROOT, Path(sys.executable), cache_dir()]
    if not any(str(p).startswith("/tmp/") for p in shared):
        dirs.insert(0, "/tmp")
    return tuple(dirs)


class Cluster:
    def __init__(self, hosts: Hosts, workdir: Path) -> None:
        self.hosts = hosts
        self.workdir = workdir
        self.token_file = workdir / "token"
        self.token_file.write_text(os.urandom(24).hex() + "\n")
        self.token_file.chmod(0o600)
        self.tenders: list[subprocess.Popen | None] = [None] * hosts.n
        self.logs: list[Path] = [workdir / f"tender{k}.log" for k in range(hosts.n)]
        self.agent: Agent | None = None

    def addr(self, k: int) -> str:
        return self.hosts.addr(k)

    def target(self, k: int) -> str:
        return f"{self.addr(k)}:{PORT}"

    def start(self, k: int) -> None:
        peers = [a for j in range(self.hosts.n) if j != k for a in ("--peer", self.target(j))]
        argv = [str(UNIFORK), "-v", "serve", "--listen", self.target(k), "--advertise",
                self.target(k), *peers, "--token-file", str(self.token_file),
                "--metrics-port", str(METRICS_PORT), "--pool", "2", "--grace", "5"]
        with open(self.logs[k], "ab") as log:
            self.tenders[k] = self.hosts.popen(k, argv, private_dirs=_private_dirs(),
                                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_healthy(self, k: int) -> None:
        try:
            self.agent.call("health", wait=START_TIMEOUT + 10, target=self.target(k),
                            timeout=START_TIMEOUT)
        except (AgentError, TimeoutError) as e:
            raise AssertionError(f"tender {k} not healthy ({e}; exit {self.tenders[k].poll()}):"
                                 f"\n{self.log_tail(k)}") from e

    def stop(self, k: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        p = self.tenders[k]
        p.send_signal(sig)
        try:
            return p.wait(timeout)
        finally:
            self.tenders[k] = None

    def log_tail(self, k: int, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logs[k].read_text(errors="replace").splitlines()[-n:])
        return ""

    def logs_tail(self) -> str:
        return "\n".join(f"--- tender {k} log:\n{self.log_tail(k)}" for k in range(self.hosts.n))

    # -- client shortcuts -----------------------------------------------------------------
    def run(self, image: str, args: list[str], on: int = A, **launch) -> dict:
        r = self.agent.call("run", wait=RUN_TIMEOUT + 30, target=self.target(on),
                            timeout=RUN_TIMEOUT, image=image, args=args, **launch)
        r["stdout"] = "".join(t for _pid, fd, t in r["logs"]["chunks"] if fd == 1)
        r["stderr"] = "".join(t for _pid, fd, t in r["logs"]["chunks"] if fd == 2)
        return r

    def vms(self, k: int) -> int:
        return int(self.agent.call("load", target=self.target(k))["vms"])


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def cluster(shm_before):
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None  # not /tmp: tenders hide it
    workdir = Path(tempfile.mkdtemp(prefix="unifork-multihost-", dir=base))
    hosts = Hosts(3)
    try:
        try:
            hosts.__enter__()
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        c = Cluster(hosts, workdir)
        # every image the tests launch, built before the tenders need them
        for name in ("nested_fork", "token_ring", "fork_exit_wait", "fork_time", "hello"):
            build_image(name)
        c.block_elf = build_image(BLOCK_SRC)
        for k in range(hosts.n):
            c.start(k)
        c.agent = Agent(hosts, A, c.token_file)
        for k in range(hosts.n):
            c.wait_healthy(k)
        for k in range(hosts.n):  # an uploaded image lives only where it was uploaded
            c.agent.call("upload", target=c.target(k), name="mh_block", path=str(c.block_elf))
        yield c
    finally:
        with contextlib.suppress(Exception):
            if c.agent is not None:
                c.agent.close()
        for k, p in enumerate(getattr(c, "tenders", [])):
            if p is not None and p.poll() is None:
                with contextlib.suppress(Exception):
                    c.stop(k, timeout=15)
        hosts.close()
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()

"""Three tenders on three "hosts" (network namespaces): VM-clone children on peers.

Host k (0: A, 1: B, 2: C) is a network namespace with address 10.200.0.(11+k)
(``tests/netns.py``); each runs ``unifork serve`` on its address, port 7700,
with the same token, the other two as peers and metrics on 9100.  Every
tender also gets its own /tmp, /dev/shm and upload directory (directories of
the test bind-mounted in the mount namespace ``ip netns exec`` gives it), so
that, as on real hosts, a Unix socket, a shm segment, a temp file or an
uploaded image of one host cannot be used by another, and so that what a
host's tender leaves behind can be counted (other test runs on the machine
do not disturb that count).

The gRPC clients run in host A: ``tests/mh_agent.py`` (one process, JSON
lines; Python 3.11 has no ``os.setns``).  Nothing is mocked: real tenders,
real VMs, real sockets between namespaces.  The tests share one cluster and
run in file order; the last one shuts everything down and checks that no
process, namespace or shm segment is left.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import image_path, native, wait_until
from netns import Hosts, hosts_or_skip, namespaces

from tender_service.service.placement import DOWN_FOR, LOAD_TTL
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
def _private_dirs(hostdir: Path) -> dict[str, str]:
    """What a host does not share with the others: /tmp, /dev/shm, the upload store."""
    dirs = {"/dev/shm": str(hostdir / "shm"),
            str(cache_dir() / "uploads"): str(hostdir / "uploads")}
    shared = [ROOT, Path(sys.executable), cache_dir(), hostdir]
    if not any(str(p).startswith("/tmp/") for p in shared):
        dirs["/tmp"] = str(hostdir / "tmp")
    return dirs


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
        self.lost: int | None = None  # the peer test_peer_lost_mid_run killed

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

    def start(self, k: int) -> None:
        peers = [a for j in range(self.hosts.n) if j != k for a in ("--peer", self.target(j))]
        argv = [str(UNIFORK), "-v", "serve", "--listen", self.target(k), "--advertise",
                self.target(k), *peers, "--token-file", str(self.token_file),
                "--metrics-port", str(METRICS_PORT), "--pool", "2", "--grace", "5"]
        with open(self.logs[k], "ab") as log:
            self.tenders[k] = self.hosts.popen(k, argv, mounts=self.mounts(k), stdout=log,
                                               stderr=subprocess.STDOUT, cwd=ROOT)

    def mounts(self, k: int) -> dict[str, str]:
        return _private_dirs(self.workdir / f"host{k}")

    def leftovers(self, k: int) -> dict[str, list[str]]:
        """What is left in host k's own /tmp and /dev/shm."""
        return {target: sorted(os.listdir(source)) for target, source in self.mounts(k).items()
                if target in ("/tmp", "/dev/shm") and os.listdir(source)}

    def wait_healthy(self, k: int) -> None:
        try:
            self.agent.call("health", wait=START_TIMEOUT + 10, target=self.target(k),
                            timeout=START_TIMEOUT)
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
        r = self.agent.call("run", wait=RUN_TIMEOUT + 30, target=self.target(on),
                            timeout=RUN_TIMEOUT, image=image, args=args, **launch)
        r["stdout"] = "".join(t for _pid, fd, t in r["logs"]["chunks"] if fd == 1)
        r["stderr"] = "".join(t for _pid, fd, t in r["logs"]["chunks"] if fd == 2)
        return r

    def vms(self, k: int) -> int:
        return int(self.agent.call("load", target=self.target(k))["vms"])

    def load_queries(self, k: int) -> float:
        """How many Peer.GetLoad calls tender k has answered (its /metrics)."""
        text = self.agent.call("metrics", url=f"http://{self.addr(k)}:{METRICS_PORT}/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("unifork_grpc_requests_total{")
                   and 'method="/unifork.v1.Peer/GetLoad"' in line and 'code="OK"' in line)

    def wait_placeable(self, k: int) -> None:
        """Poll until A's placement asks peer k for its load again (A no longer holds
        it for down), launching small remote instances on A to make it look."""
        def asked() -> bool:
            before = self.load_queries(k)
            r = self.run("hello", [], fork_mode="vmclone", pipe_transport="tcp",
                         placement="remote")
            assert_exited_0(self, r)
            return self.load_queries(k) > before

        wait_until(asked, DOWN_FOR + 30, f"A to place on peer {k} again", interval=0.2)


@pytest.fixture(scope="module")
def cluster():
    hosts = hosts_or_skip(3)
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None  # not /tmp: tenders hide it
    workdir = Path(tempfile.mkdtemp(prefix="unifork-multihost-", dir=base))
    c = Cluster(hosts, workdir)
    try:
        # every image the tests launch, built before the tenders need them
        for name in ("nested_fork", "token_ring", "fork_exit_wait", "fork_time", "hello"):
            build_image(name)
        block_elf = build_image(BLOCK_SRC)
        for k in range(hosts.n):
            c.start(k)
        c.agent = Agent(hosts, A, c.token_file)
        for k in range(hosts.n):
            c.wait_healthy(k)
        for k in range(hosts.n):  # an uploaded image lives only where it was uploaded
            c.agent.call("upload", target=c.target(k), name="mh_block", path=str(block_elf))
        yield c
    finally:
        try:
            c.close()
            hosts.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# -- helpers ------------------------------------------------------------------------------------
@functools.cache
def native_out(name: str, *args: str) -> str:
    """What the same static binary prints natively (the expected output)."""
    p = native(image_path(name), *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def explain(c: Cluster, r: dict) -> str:
    res = r["result"]
    return (f"outcome {res['outcome']} exit {res['exit_code']} reports {res['reports']}\n"
            f"stdout: {r['stdout'][-2000:]!r}\nstderr: {r['stderr'][-2000:]!r}\n"
            f"processes: {[(p['pid'], p['host'], p['state']) for p in r['describe']['processes']]}"
            f"\n{c.logs_tail()}")


def assert_exited_0(c: Cluster, r: dict) -> None:
    res = r["result"]
    assert res["done"] and res["outcome"] == "exited" and res["exit_code"] == 0, explain(c, r)


def hosts_of(desc: dict) -> set[str]:
    """The hosts of the instance's processes (init, pid 1, is the supervisor: skipped)."""
    return {p["host"] for p in desc["processes"] if p["pid"] != 1}


# -- VM-clone children on peers ----------------------------------------------------------------
def test_remote_nested_fork_runs_on_peers(cluster):
    """40 VMs, placed on B and C only, one tree; the output is the native one."""
    c = cluster
    r = c.run("nested_fork", [], fork_mode="vmclone", pipe_transport="tcp", placement="remote")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("nested_fork"), explain(c, r)
    assert r["result"]["fork_count"] == 39
    hosts = hosts_of(r["describe"])
    assert hosts and hosts <= {c.target(B), c.target(C)}, explain(c, r)
    procs = [p for p in r["describe"]["processes"] if p["pid"] != 1]
    assert len(procs) == 40 and all(p["state"] == "reaped" for p in procs), explain(c, r)


def test_remote_token_ring_pipes_cross_hosts(cluster):
    c = cluster
    r = c.run("token_ring", ["-n", "6"], fork_mode="vmclone", pipe_transport="tcp",
              placement="remote")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("token_ring", "-n", "6") == "token=60\n"
    assert hosts_of(r["describe"]) <= {c.target(B), c.target(C)}, explain(c, r)


def test_remote_children_reaped_with_their_statuses(cluster):
    """fork_exit_wait -n 20: child i exits i % 7; the parent checks each; describe agrees."""
    c = cluster
    r = c.run("fork_exit_wait", ["-n", "20"], fork_mode="vmclone", pipe_transport="tcp",
              placement="remote")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("fork_exit_wait", "-n", "20") == "ok 20 children\n"
    children = sorted((p for p in r["describe"]["processes"] if p["ppid"] == 2),
                      key=lambda p: p["pid"])
    assert [p["pid"] for p in children] == list(range(3, 23)), explain(c, r)
    for i, p in enumerate(children):  # pids are handed out in fork order
        assert p["state"] == "reaped" and p["exited"], p
        assert p["wait_status"] == (i % 7) << 8, p
        assert p["host"] in (c.target(B), c.target(C)), p


def test_remote_console_merged_with_pids(cluster):
    """fork_time: parent and child print in their own VMs; one stream, tagged by pid."""
    c = cluster
    r = c.run("fork_time", [], fork_mode="vmclone", pipe_transport="tcp", placement="remote",
              console_pipe=True)
    assert_exited_0(c, r)
    by_pid: dict[int, str] = {}
    for pid, fd, text in r["logs"]["chunks"]:
        if fd == 1:
            by_pid[pid] = by_pid.get(pid, "") + text
    assert set(by_pid) == {2, 3}, by_pid
    assert re.fullmatch(r"fork took: [0-9.]+s\nparent\n", by_pid[2]), by_pid
    assert re.fullmatch(r"fork took: [0-9.]+s\nchild\n", by_pid[3]), by_pid
    host = {p["pid"]: p["host"] for p in r["describe"]["processes"]}
    assert host[3] in (c.target(B), c.target(C)), explain(c, r)


def test_remote_shm_falls_back_to_tcp(cluster):
    """shm was asked, the VMs are on other hosts: tcp is used, and describe says so."""
    c = cluster
    r = c.run("nested_fork", [], fork_mode="vmclone", pipe_transport="shm", placement="remote")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("nested_fork"), explain(c, r)
    d = r["describe"]
    assert d["pipe_transport"] == "PIPE_TRANSPORT_SHM"
    assert "tcp" in d["transport_note"], d["transport_note"]
    assert hosts_of(d) <= {c.target(B), c.target(C)}, explain(c, r)


def test_spread_places_children_on_peers(cluster):
    """spread: the least-loaded of A, B and C for each clone; an idle cluster uses all."""
    c = cluster
    r = c.run("nested_fork", [], fork_mode="vmclone", pipe_transport="shm", placement="spread")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("nested_fork"), explain(c, r)
    hosts = hosts_of(r["describe"])
    assert hosts & {c.target(B), c.target(C)}, f"every VM on {hosts}\n{explain(c, r)}"
    if hosts - {c.target(A)}:
        assert "tcp" in r["describe"]["transport_note"], r["describe"]["transport_note"]


def test_uploaded_image_launched_on_a_peer(cluster):
    """An image uploaded to A only, its first VM placed on a peer (which never saw it)."""
    c = cluster
    c.agent.call("upload", target=c.target(A), name="hello-a-only",
                 path=str(image_path("hello")))
    r = c.run("hello-a-only", [], fork_mode="vmclone", pipe_transport="tcp",
              placement="remote")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("hello"), explain(c, r)


def test_fork_latency_remote_vs_local(cluster, record_property):
    """fork_time -n 20, placement local (A's warm pool) and remote (peers): medians."""
    c = cluster
    medians = {}
    for placement, transport in (("local", "shm"), ("local", "tcp"), ("remote", "tcp")):
        r = c.run("fork_time", ["-n", "20"], fork_mode="vmclone", pipe_transport=transport,
                  placement=placement)
        assert_exited_0(c, r)
        us = [float(x) for x in re.findall(r"^fork_us=([0-9.]+)$", r["stdout"], re.M)]
        assert len(us) == 20 and "ok=1" in r["stdout"], explain(c, r)
        medians[f"{placement}/{transport}"] = statistics.median(us)
        hosts = hosts_of(r["describe"])
        want = {c.target(A)} if placement == "local" else {c.target(B), c.target(C)}
        assert hosts <= want, explain(c, r)
    record_property("fork_us_median", medians)
    print(f"\nvmclone fork_us median (fork_time -n 20): {medians}")


# -- kill, peers down, peers lost ---------------------------------------------------------------
def start_blocked(c: Cluster, *flags: str) -> tuple[str, dict]:
    """mh_block with 4 children on peers: the parent on one, its children on the other.

    The parent (on the peer placement picks first) naps past the placement's load
    cache before it forks, so that fresh loads (its own host busy, the other idle)
    send the children to the other peer.  Returns the instance id and its describe
    once every child is up."""
    delay_ms = int(LOAD_TTL * 1000 * 1.5)
    iid = c.agent.call("launch", target=c.target(A), image="mh_block",
                       args=["-n", "4", "-d", str(delay_ms), *flags], fork_mode="vmclone",
                       pipe_transport="tcp", placement="remote")
    seen = c.agent.call("logs", wait=RUN_TIMEOUT + 10, target=c.target(A), id=iid,
                        timeout=RUN_TIMEOUT, until="ready n=4")
    desc = c.agent.call("describe", target=c.target(A), id=iid)
    assert seen["complete"], (seen, desc, c.logs_tail())
    assert hosts_of(desc) <= {c.target(B), c.target(C)}, desc
    assert sum(p["ppid"] == 2 and p["state"] == "alive" for p in desc["processes"]) == 4, desc
    return iid, desc


def test_kill_reaches_all_hosts(cluster):
    """A client's kill ends the VMs of the instance on every host."""
    c = cluster
    assert c.vms(B) == 0 and c.vms(C) == 0
    iid, desc = start_blocked(c)
    on_b, on_c = c.vms(B), c.vms(C)
    assert on_b + on_c == 5, desc
    assert on_b and on_c, f"all five VMs on one peer: {desc}"
    assert c.agent.call("kill", target=c.target(A), id=iid) is True
    res = c.agent.call("wait", target=c.target(A), id=iid, timeout=60)
    assert res["done"] and res["outcome"] == "killed", res
    wait_until(lambda: c.vms(B) == 0 and c.vms(C) == 0, 30, "no VM left on B and C")
    desc = c.agent.call("describe", target=c.target(A), id=iid)
    assert all(p["state"] != "alive" for p in desc["processes"] if p["pid"] != 1), desc
    assert c.agent.call("kill", target=c.target(A), id=iid) is False


def test_down_peer_is_skipped(cluster):
    """Tender C stopped (SIGTERM): remote and spread clones go to B (or A for spread);
    the instances succeed."""
    c = cluster
    assert c.stop(C) == 0, c.log_tail(C)
    wait_until(lambda: not c.hosts.pids(C), 15, "no process left in host C")
    try:
        for placement in ("remote", "spread"):
            r = c.run("fork_exit_wait", ["-n", "6"], fork_mode="vmclone", pipe_transport="tcp",
                      placement=placement)
            assert_exited_0(c, r)
            assert r["stdout"] == "ok 6 children\n"
            hosts = hosts_of(r["describe"])
            want = {c.target(B)} if placement == "remote" else {c.target(A), c.target(B)}
            assert hosts <= want, explain(c, r)
    finally:
        c.start(C)
        c.wait_healthy(C)
    c.wait_placeable(C)


def test_peer_lost_mid_run(cluster):
    """The tender holding the children is killed with SIGKILL (its VMs live in it): the
    parent, on the other peer, sees them killed by SIGKILL, and the instance ends."""
    c = cluster
    iid, desc = start_blocked(c, "-w")
    parent_host = next(p["host"] for p in desc["processes"] if p["pid"] == 2)
    children = {p["pid"]: p["host"] for p in desc["processes"] if p["ppid"] == 2}
    victims = {h for h in children.values() if h != parent_host}
    assert victims, f"every child on the parent's host {parent_host}: {desc}"
    victim = B if c.target(B) in victims else C
    c.stop(victim, signal.SIGKILL)
    c.lost = victim
    res = c.agent.call("wait", target=c.target(A), id=iid, timeout=60)
    logs = c.agent.call("logs", target=c.target(A), id=iid, timeout=30)
    out = "".join(t for _p, fd, t in logs["chunks"] if fd == 1)
    assert res["done"], res
    assert res["outcome"] == "exited" and res["exit_code"] == 0, (res, out, c.logs_tail())
    for pid, h in children.items():
        want = "killed by SIGKILL" if h == c.target(victim) else "exited 0"
        assert f"child {pid}: {want}\n" in out, (pid, h, out)
    assert out.endswith("reaped=4\n"), out
    desc = c.agent.call("describe", target=c.target(A), id=iid)
    for p in desc["processes"]:
        if p["ppid"] == 2 and p["host"] == c.target(victim):
            assert p["wait_status"] == signal.SIGKILL and p["state"] == "reaped", p


def test_lost_peer_is_skipped(cluster):
    """Right after a peer was lost, A's next remote instance runs on the peer left."""
    c = cluster
    if c.lost is None:
        pytest.skip("needs the peer test_peer_lost_mid_run lost")
    r = c.run("fork_exit_wait", ["-n", "4"], fork_mode="vmclone", pipe_transport="tcp",
              placement="remote")
    assert_exited_0(c, r)
    assert hosts_of(r["describe"]) == {c.target(B + C - c.lost)}, explain(c, r)


def test_a_serves_after_losing_a_peer(cluster):
    """The lost tender's pool and resource tracker followed it; A launches as before."""
    c = cluster
    if c.lost is None:
        pytest.skip("needs the peer test_peer_lost_mid_run lost")
    wait_until(lambda: not c.hosts.pids(c.lost), 15, "the lost tender's processes to exit")
    r = c.run("fork_exit_wait", ["-n", "4"], fork_mode="vmclone", pipe_transport="shm",
              placement="local")
    assert_exited_0(c, r)
    assert hosts_of(r["describe"]) == {c.target(A)}, explain(c, r)
    r = c.run("nested_fork", [], fork_mode="thread")
    assert_exited_0(c, r)
    assert r["stdout"] == native_out("nested_fork")


def test_zz_shutdown_leaves_nothing(cluster):
    """SIGTERM every tender left: each exits 0, no process is left in any host, no host
    has anything left in its /tmp or /dev/shm, and the namespaces are gone."""
    c = cluster
    c.agent.close()
    c.agent = None
    for k, p in enumerate(c.tenders):
        if p is not None:
            assert c.stop(k) == 0, c.log_tail(k)
    for k in range(c.hosts.n):
        wait_until(lambda k=k: not c.hosts.pids(k), 15, f"no process left in host {k}")
    left = {k: c.leftovers(k) for k in range(c.hosts.n)}
    if c.lost is not None:  # a SIGKILLed tender cannot remove its temp files
        left[c.lost].pop("/tmp", None)
    names = [*c.hosts.names, c.hosts.bridge_ns]
    c.hosts.close()
    assert not set(names) & set(namespaces())
    assert not any(left.values()), left

"""The tender service end to end: real ``unifork serve`` processes, real gRPC over sockets.

Every tender here is a subprocess on free loopback ports, waited for with the
standard gRPC health check and stopped with SIGTERM (it must exit 0).  The
module-scoped tenders:

* ``tender``  — no token, a warm pool of 2, ``--max-upload 4M``, metrics: the
  launch/stream/wait/describe round trips, validation, uploads, faults,
  concurrency, health, reflection, ``/metrics``;
* ``secure``  — ``--token-file``: every RPC of ``Tender`` and ``Peer`` with no
  token, a wrong token and the right one;
* ``small``   — ``--max-instances 2``.

Graceful shutdown and the listen-address policy start their own tenders.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_until

from tender_service import protos
from tender_service.service.client import Client
from tender_service.toolchain.cc import compile_guest
from tender_service.toolchain.images import build_image

GUEST = Path(__file__).with_name("guest")

ROOT = Path(__file__).resolve().parents[1]
RPC_TIMEOUT = 120.0  # a deadline on every call, so that a hung tender fails the test
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
HELLO = b"Hello, unikernel!\n"
SIGKILL, SIGSEGV, SIGILL = 9, 11, 4

pb2, _tender_grpc = protos.tender()
ppb2, _peer_grpc = protos.peer()

MODES = {
    "thread": dict(fork_mode=pb2.FORK_MODE_THREAD),
    "copy": dict(fork_mode=pb2.FORK_MODE_COPY),
    "vmclone-shm": dict(fork_mode=pb2.FORK_MODE_VMCLONE, pipe_transport=pb2.PIPE_TRANSPORT_SHM),
    "vmclone-tcp": dict(fork_mode=pb2.FORK_MODE_VMCLONE, pipe_transport=pb2.PIPE_TRANSPORT_TCP),
}

# prints "tick N" every 20 ms: output that keeps coming while a client watches
TICKER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 10;
	struct timespec ts = {0, 20 * 1000 * 1000};

	for (int i = 0; i < n; i++) {
		printf("tick %d\n", i);
		fflush(stdout);
		nanosleep(&ts, NULL);
	}
	return 0;
}
"""


# -- helpers: processes, ports, polling --------------------------------------------------------
poll = wait_until


def unifork_cmd() -> list[str]:
    script = Path(sys.executable).parent / "unifork"
    return [str(script)] if script.exists() else [sys.executable, "-m", "unifork"]


def proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of a live process, None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every process below ``root``: pid -> (start time, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
            table[int(entry)] = st
    out, frontier = {}, {root}
    while frontier:
        children = {pid for pid, st in table.items() if st[0] in frontier and pid not in out}
        for pid in children:
            out[pid] = (table[pid][1], cmdline(pid))
        frontier = children
    return out


def is_worker(cmd: str) -> bool:
    """A pool worker: ``-m tender_service.instance.worker`` or a spawned multiprocessing child."""
    return "tender_service.instance.worker" in cmd or "spawn_main" in cmd


def still_running(pid: int, start: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"


# -- a tender subprocess --------------------------------------------------------------------------
#: what a tender's log says when the port free_port() gave was taken before it bound it
PORT_TAKEN = "Address already in use"


def start_retrying(start: Callable[[], Tender], attempts: int = 3) -> Tender:
    """``start()``, again while its tender exits because a port was taken meanwhile."""
    for attempt in range(attempts):
        try:
            return start()
        except AssertionError as e:
            if PORT_TAKEN not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@dataclass
class Tender:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    token: str | None = None
    peer_port: int = 0
    peer_token: str | None = None
    tls_ca: Path | None = None  # the client port speaks TLS: verify it with this CA

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def peer_target(self) -> str:
        """The peer listener (--peer-listen)."""
        return f"127.0.0.1:{self.peer_port}"

    @property
    def md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    @property
    def peer_md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.peer_token}")] if self.peer_token else []

    @classmethod
    def start(cls, *args, **kwargs) -> Tender:
        """Start a tender on free ports (see ``_start_once``), again on other ports if one
        was taken between ``free_port()`` and the bind (up to three times)."""
        return start_retrying(lambda: cls._start_once(*args, **kwargs))

    @classmethod
    def _start_once(
        cls,
        workdir: Path,
        *args: str,
        token: str | None = None,
        listen_host: str = "127.0.0.1",
        peer_token: str | None = None,
        peer_port: int = 0,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> Tender:
        """``tls``: (cert, key, CA) for --tls-cert, --tls-key, --tls-ca."""
        port, mport, peer_port = free_port(), free_port(), peer_port or free_port()
        extra = list(args)
        if tls is not None:
            extra += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1]), "--tls-ca", str(tls[2])]
        if token is not None:
            tf = workdir / f"token-{port}"
            tf.write_text(token + "\n")
            extra += ["--token-file", str(tf)]
        if peer_token is not None:
            tf = workdir / f"peer-token-{port}"
            tf.write_text(peer_token + "\n")
            extra += ["--peer-token-file", str(tf)]
        log_path = workdir / f"tender-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    *unifork_cmd(),
                    "serve",
                    "--listen",
                    f"{listen_host}:{port}",
                    "--peer-listen",
                    f"{listen_host}:{peer_port}",
                    "--metrics-port",
                    str(mport),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        t = cls(proc, port, mport, log_path, token, peer_port, peer_token, tls[2] if tls else None)
        try:
            t.wait_serving()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return t

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(
            self.target, grpc.ssl_channel_credentials(self.tls_ca.read_bytes())
        )

    def health(self, service: str = "", timeout: float = 2.0) -> int:
        with self.channel() as ch:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=timeout,
                    metadata=self.md,
                )
                .status
            )

    def wait_serving(self) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"tender exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.health() == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        poll(up, START_TIMEOUT, f"tender on {self.target} to serve", interval=0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"tender did not exit within {STOP_TIMEOUT} s of SIGTERM:\n{self.log()}"
            ) from None

    def client(self) -> Client:
        return Client(self.target, self.token, str(self.tls_ca) if self.tls_ca else None)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as r:
            text = r.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }


def metric(m: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= lab)


def stopped_cleanly(t: Tender) -> None:
    code = t.stop()
    assert code == 0, f"tender exited {code} on SIGTERM:\n{t.log()}"


# -- client helpers ------------------------------------------------------------------------------
def launch(c: Client, image: str, args: list[str] | None = None, **fields) -> str:
    req = pb2.LaunchRequest(image=image, args=args or [], **fields)
    return c.stub.Launch(req, metadata=c.md, timeout=RPC_TIMEOUT).instance_id


def wait(c: Client, iid: str, timeout: float = 0.0):
    return c.stub.Wait(
        pb2.WaitRequest(instance_id=iid, timeout_seconds=timeout),
        metadata=c.md,
        timeout=RPC_TIMEOUT,
    )


def console(c: Client, iid: str, from_start: bool = True) -> list:
    return list(
        c.stub.StreamConsole(
            pb2.ConsoleRequest(instance_id=iid, from_start=from_start),
            metadata=c.md,
            timeout=RPC_TIMEOUT,
        )
    )


def stdout_of(chunks) -> bytes:
    return b"".join(ch.data for ch in chunks if ch.fd == 1)


def wait_for_output(c: Client, iid: str, needle: bytes) -> None:
    """Follow the console from the start until ``needle`` shows up (the guest is running)."""
    stream = c.stub.StreamConsole(
        pb2.ConsoleRequest(instance_id=iid, from_start=True), metadata=c.md, timeout=RPC_TIMEOUT
    )
    seen = b""
    try:
        for ch in stream:
            seen += ch.data
            if needle in seen:
                return
    finally:
        stream.cancel()
    raise AssertionError(f"the console ended without {needle!r}: {seen!r}")


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tender(tmp_path_factory):
    t = Tender.start(tmp_path_factory.mktemp("tender"), "--pool", "2", "--max-upload", "4M")
    c = t.client()

    def pool_warm():  # SERVING comes before the warm pool is: wait until both workers take VMs
        iid = launch(c, "fork_time", console_pipe=True, **MODES["vmclone-shm"])
        assert wait(c, iid).exit_code == 0
        return len({p.vm for p in c.describe(iid).processes if p.pid in (2, 3)}) == 2

    poll(
        pool_warm,
        START_TIMEOUT,
        "both workers of the warm pool to host VMs",
        interval=0.2,
        detail=t.log,
    )
    c.close()
    yield t
    stopped_cleanly(t)


@pytest.fixture(scope="module")
def client(tender):
    c = tender.client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def ticker_elf(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("ticker")
    (d / "ticker.c").write_text(TICKER_C)
    compile_guest([d / "ticker.c"], d / "ticker.elf", ["-Wall", "-Werror"])
    return (d / "ticker.elf").read_bytes()


@pytest.fixture(scope="module")
def ticker(client, ticker_elf) -> str:
    info = client.upload("ticker", ticker_elf)
    assert info.name == "ticker"
    return info.name


# -- round trips ---------------------------------------------------------------------------------
@dataclass
class Workload:
    args: list[str]
    stdout: dict[str, bytes]  # by fork mode: thread / vmclone
    forks: int
    children: dict[int, int]  # pid -> wait status of each child of pid 2


WORKLOADS = {
    "hello": Workload([], {"thread": HELLO, "vmclone": HELLO, "copy": HELLO}, 0, {}),
    "token_ring": Workload(
        ["-n", "4", "-r", "3"],
        {"thread": b"token=12\n", "vmclone": b"token=12\n", "copy": b"token=12\n"},
        3,
        {3: 0, 4: 0, 5: 0},
    ),
    "fork_exit_wait": Workload(
        ["-n", "5"],
        {"thread": b"ok 5 children\n", "vmclone": b"ok 5 children\n", "copy": b"ok 5 children\n"},
        5,
        {3 + i: (i % 7) << 8 for i in range(5)},
    ),
    # globals (and heap reachable only from them) stay shared under thread fork
    "semantics": Workload(
        [],
        {
            "thread": b"global=shared\nstack=private\nheap_from_stack=private\n"
            b"heap_from_global=shared\nerrno=private\nfd_table=private\n",
            "vmclone": b"global=private\nstack=private\nheap_from_stack=private\n"
            b"heap_from_global=private\nerrno=private\nfd_table=private\n",
            # copy fork: private memory in one VM, as POSIX
            "copy": b"global=private\nstack=private\nheap_from_stack=private\n"
            b"heap_from_global=private\nerrno=private\nfd_table=private\n",
        },
        1,
        {3: 0},
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("image", list(WORKLOADS))
def test_round_trip(tender, client, image, mode):
    w = WORKLOADS[image]
    kind = mode.split("-")[0]
    iid = launch(client, image, w.args, console_pipe=True, **MODES[mode])
    assert re.fullmatch(r"[0-9a-f]{16}", iid)

    r = wait(client, iid)
    assert (r.instance_id, r.done, r.outcome) == (iid, True, "exited"), r
    assert (r.wait_status, r.exit_code, r.signal) == (0, 0, 0)
    assert r.fork_count == w.forks
    assert r.duration_seconds > 0

    chunks = console(client, iid)
    assert stdout_of(chunks) == w.stdout[kind]
    assert [ch.seq for ch in chunks] == list(range(1, len(chunks) + 1))
    assert {ch.pid for ch in chunks} == {2}  # only the launched program writes
    assert {ch.fd for ch in chunks} == {1}

    d = client.describe(iid)
    assert d.summary.instance_id == iid and d.summary.image == image
    assert d.summary.state == "done"
    assert d.summary.fork_mode == MODES[mode]["fork_mode"]
    assert d.pipe_transport == MODES[mode].get("pipe_transport", pb2.PIPE_TRANSPORT_SHM)
    assert d.placement == pb2.PLACEMENT_LOCAL
    assert d.result == r
    procs = {p.pid: p for p in d.processes}
    assert set(procs) == {1, 2, *w.children}, d.processes
    main = procs[2]
    assert (main.ppid, main.state, main.exited, main.wait_status) == (1, "reaped", True, 0)
    for pid, status in w.children.items():
        p = procs[pid]
        assert (p.ppid, p.state, p.exited, p.wait_status) == (2, "reaped", True, status), p
    for p in d.processes:
        if p.pid == 1:
            continue
        if kind in ("thread", "copy"):  # one VM, the instance's, in a process of its own
            assert p.host == tender.target and p.vm.isdigit(), p
            assert p.vm == procs[2].vm, d.processes
        else:  # one VM per process, each in a worker process of this tender
            assert p.host == tender.target, p
            assert p.vm.isdigit(), p
            st = proc_stat(int(p.vm))
            assert st is not None and st[0] == tender.proc.pid, (
                f"VM host {p.vm} of pid {p.pid} is not a worker of the tender"
            )
    if kind == "vmclone" and w.children:
        # with a pool of 2, a clone goes to another tender process than its parent's
        assert all(procs[pid].vm != main.vm for pid in w.children), d.processes

    listed = {s.instance_id: s for s in client.instances()}
    assert listed[iid].state == "done" and listed[iid].image == image


@pytest.mark.parametrize("mode", list(MODES))
def test_console_tagged_with_every_pid(client, mode):
    """fork_time: parent and child both print; chunks carry the writer's pid."""
    iid = launch(client, "fork_time", console_pipe=True, **MODES[mode])
    r = wait(client, iid)
    assert (r.outcome, r.exit_code, r.fork_count) == ("exited", 0, 1)
    chunks = console(client, iid)
    by_pid: dict[int, bytes] = {}
    for ch in chunks:
        by_pid[ch.pid] = by_pid.get(ch.pid, b"") + ch.data
    assert set(by_pid) == {2, 3}, by_pid
    assert re.fullmatch(rb"fork took: \d+\.\d{6}s\nparent\n", by_pid[2]), by_pid
    assert re.fullmatch(rb"fork took: \d+\.\d{6}s\nchild\n", by_pid[3]), by_pid


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_console_replay_and_live(client, ticker, mode):
    """from_start replays from the first chunk; a live follower only sees what comes after."""
    iid = launch(client, ticker, ["1500"], console_pipe=True, time_limit_seconds=120, **MODES[mode])
    replay = client.stub.StreamConsole(
        pb2.ConsoleRequest(instance_id=iid, from_start=True),
        metadata=client.md,
        timeout=RPC_TIMEOUT,
    )
    early, seen = [], b""
    for ch in replay:
        early.append(ch)
        seen += ch.data
        if b"tick 5\n" in seen:
            break
    replay.cancel()
    assert early[0].seq == 1 and early[0].data.startswith(b"tick 0\n")
    last_seen = early[-1].seq

    live = client.stub.StreamConsole(
        pb2.ConsoleRequest(instance_id=iid, from_start=False),
        metadata=client.md,
        timeout=RPC_TIMEOUT,
    )
    first_live = next(live)
    got_live = [first_live]
    assert client.kill(iid) is True  # the stream of a killed instance ends
    got_live += list(live)
    r = wait(client, iid)
    assert r.outcome == "killed" and r.signal == SIGKILL, r

    everything = console(client, iid)  # the whole log, now that it is closed
    assert [c.seq for c in everything] == list(range(1, len(everything) + 1))
    ticks = [int(n) for n in re.findall(rb"tick (\d+)\n", stdout_of(everything))]
    assert ticks == list(range(len(ticks))) and len(ticks) >= 6
    # live: no replay, in order, without gaps, a suffix of the full log
    assert first_live.seq > last_seen
    assert b"tick 0\n" not in stdout_of(got_live)
    seqs = [c.seq for c in got_live]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert [(c.seq, c.data) for c in got_live] == [
        (c.seq, c.data) for c in everything if c.seq >= seqs[0]
    ]


# -- time limits, wait timeouts, kill ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_wait_timeout_then_time_limit(client, mode):
    iid = launch(client, "spin", time_limit_seconds=4.0, **MODES[mode])
    wait_for_output(client, iid, b"spin: spinning\n")
    r = wait(client, iid, timeout=0.2)
    assert (r.instance_id, r.done, r.outcome, r.wait_status) == (iid, False, "", 0)
    assert {s.instance_id: s.state for s in client.instances()}[iid] == "running"
    assert client.describe(iid).summary.state == "running"

    r = wait(client, iid)
    assert (r.done, r.outcome, r.signal, r.exit_code) == (True, "timeout", SIGKILL, 128 + 9), r
    assert any("time limit" in line for line in r.reports), r.reports
    assert client.describe(iid).summary.state == "done"


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_kill_reaches_a_running_instance(tender, client, mode):
    iid = launch(client, "spin", time_limit_seconds=120.0, **MODES[mode])
    wait_for_output(client, iid, b"spin: spinning\n")
    d = client.describe(iid)
    assert d.summary.state == "running" and not d.result.done
    main = next(p for p in d.processes if p.pid == 2)
    assert (main.ppid, main.state, main.exited) == (1, "alive", False), main
    if mode == "thread":  # a child of the tender's VM fork server
        st = proc_stat(int(main.vm))
        assert st is not None and main.host == tender.target, main
        assert proc_stat(st[0])[0] == tender.proc.pid, (
            f"VM process {main.vm} is not a grandchild of the tender"
        )
    else:
        st = proc_stat(int(main.vm))
        assert st is not None and st[0] == tender.proc.pid, main
        assert main.host == tender.target
    assert client.kill(iid) is True
    r = wait(client, iid)
    assert (r.done, r.outcome, r.signal, r.wait_status) == (True, "killed", SIGKILL, SIGKILL), r
    assert client.kill(iid) is False  # nothing left to kill


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_right_after_launch(client, mode):
    """A Kill that comes while the instance is still starting must end it all the same."""
    iid = launch(client, "spin", time_limit_seconds=60.0, **MODES[mode])
    try:
        assert client.kill(iid) is True
        r = wait(client, iid, timeout=10.0)  # far more than a kill takes
        assert (r.done, r.outcome, r.signal) == (True, "killed", SIGKILL), (
            f"the killed instance still runs (its time limit is 60 s): {r}"
        )
    finally:  # do not leave a spinning guest behind for the other tests
        client.kill(iid)
        assert wait(client, iid).done


# -- concurrency and faults ----------------------------------------------------------------------
def test_thirty_concurrent_launches(tender):
    start = threading.Barrier(6)

    def one_client(_):
        c = tender.client()
        try:
            start.wait(30)
            ids = [launch(c, "hello", console_pipe=True) for _ in range(5)]
            return [(iid, wait(c, iid), stdout_of(console(c, iid))) for iid in ids]
        finally:
            c.close()

    with ThreadPoolExecutor(6) as ex:
        results = [row for rows in ex.map(one_client, range(6)) for row in rows]
    assert len({iid for iid, _, _ in results}) == 30
    for iid, r, out in results:
        assert (r.done, r.outcome, r.exit_code) == (True, "exited", 0), (iid, r)
        assert out == HELLO, (iid, out)


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_fault_guest_beside_a_healthy_one(client, mode):
    segv = launch(client, "fault_segv", console_pipe=True, **MODES[mode])
    ring = launch(client, "token_ring", ["-n", "3", "-r", "5"], console_pipe=True, **MODES[mode])
    r = wait(client, segv)
    assert (r.outcome, r.signal, r.wait_status, r.exit_code) == (
        "signaled",
        SIGSEGV,
        SIGSEGV,
        128 + SIGSEGV,
    ), r
    assert stdout_of(console(client, segv)) == b"fault_segv: writing through a NULL pointer\n"
    r = wait(client, ring)
    assert (r.outcome, r.exit_code) == ("exited", 0), r
    assert stdout_of(console(client, ring)) == b"token=15\n"


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_an_emulator_crash_ends_only_its_instance(tender, client, ticker, mode):
    """A guest block Unicorn 2.1.4 cannot translate (tests/guest/x87_block.c) kills
    the process emulating it with SIGSEGV.  Guest code never runs in the tender, so
    that ends one instance (killed by SIGKILL, the report names the crash) while an
    instance running beside it, the tender and later launches carry on."""
    x87 = client.upload("x87-block", build_image(GUEST / "x87_block.c").read_bytes()).name
    beside = launch(
        client, ticker, ["100000"], console_pipe=True, time_limit_seconds=120, **MODES[mode]
    )
    wait_for_output(client, beside, b"tick 3\n")
    crashed = launch(client, x87, console_pipe=True, **MODES[mode])
    r = wait(client, crashed)
    assert (r.done, r.outcome, r.signal, r.exit_code) == (True, "signaled", SIGKILL, 137), r
    lost = "died of SIGSEGV" if mode == "thread" else "its VM was lost"
    assert any(lost in line for line in r.reports), r.reports
    assert stdout_of(console(client, crashed)) == b""
    live = client.stub.StreamConsole(
        pb2.ConsoleRequest(instance_id=beside, from_start=False),
        metadata=client.md,
        timeout=RPC_TIMEOUT,
    )
    try:  # output written after the crash: the instance beside it still runs
        assert re.fullmatch(rb"(tick \d+\n)+", next(live).data)
    finally:
        live.cancel()
    assert client.describe(beside).summary.state == "running"
    later = launch(client, "hello", console_pipe=True, **MODES[mode])
    assert wait(client, later).outcome == "exited"
    assert stdout_of(console(client, later)) == HELLO
    assert client.kill(beside) is True
    assert wait(client, beside).outcome == "killed"
    assert tender.proc.poll() is None


# -- validation ----------------------------------------------------------------------------------
BAD_LAUNCHES = {
    "image-empty": (dict(image=""), "image"),
    "image-path": (dict(image="../../etc/passwd"), "image"),
    "memory-too-small": (dict(image="hello", memory_bytes=1 << 20), "memory_bytes"),
    "memory-too-large": (dict(image="hello", memory_bytes=1 << 40), "memory_bytes"),
    "stack-too-small": (dict(image="hello", stack_bytes=1024), "stack_bytes"),
    "stack-too-large": (dict(image="hello", stack_bytes=1 << 30), "stack_bytes"),
    "time-limit-negative": (dict(image="hello", time_limit_seconds=-1.0), "time_limit_seconds"),
    "time-limit-nan": (dict(image="hello", time_limit_seconds=math.nan), "time_limit_seconds"),
    "time-limit-huge": (dict(image="hello", time_limit_seconds=1e9), "time_limit_seconds"),
    "env-without-equals": (dict(image="hello", env=["PATH=/bin", "NOVALUE"]), "env"),
    "args-nul": (dict(image="hello", args=["a\0b"]), "args"),
    "max-procs-1": (dict(image="hello", max_procs=1), "max_procs"),
    "fork-mode-unknown": (dict(image="hello", fork_mode=7), "fork_mode"),
    "transport-unknown": (dict(image="hello", pipe_transport=9), "pipe_transport"),
    "placement-unknown": (dict(image="hello", placement=9), "placement"),
    "remote-with-thread-fork": (
        dict(image="hello", fork_mode=pb2.FORK_MODE_THREAD, placement=pb2.PLACEMENT_REMOTE),
        "placement",
    ),
    "spread-with-thread-fork": (
        dict(image="hello", fork_mode=pb2.FORK_MODE_THREAD, placement=pb2.PLACEMENT_SPREAD),
        "placement",
    ),
    # fork_mode unset means thread fork (tender.proto), so the same rule applies
    "remote-with-default-fork": (dict(image="hello", placement=pb2.PLACEMENT_REMOTE), "placement"),
}


@pytest.mark.parametrize("case", list(BAD_LAUNCHES))
def test_launch_rejects_bad_field(client, case):
    fields, field = BAD_LAUNCHES[case]
    before = {s.instance_id for s in client.instances()}
    e = rpc_error(
        lambda: client.stub.Launch(
            pb2.LaunchRequest(**fields), metadata=client.md, timeout=RPC_TIMEOUT
        )
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert e.details().startswith(f"{field}:"), e.details()
    assert {s.instance_id for s in client.instances()} == before  # nothing was started


def test_launch_unknown_image(client):
    e = rpc_error(lambda: launch(client, "no_such_image"))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details().startswith("image:") and "no_such_image" in e.details()


@pytest.mark.parametrize("rpc", ["Wait", "Kill", "Describe", "StreamConsole"])
def test_unknown_instance(client, rpc):
    def call(iid):
        if rpc == "Wait":
            return wait(client, iid)
        if rpc == "Kill":
            return client.kill(iid)
        if rpc == "Describe":
            return client.describe(iid)
        return console(client, iid)

    e = rpc_error(lambda: call("0123456789abcdef"))
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
    assert e.details().startswith("instance_id:") and "0123456789abcdef" in e.details()
    e = rpc_error(lambda: call(""))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("instance_id:")


def test_wait_rejects_negative_timeout(client):
    iid = launch(client, "hello")
    e = rpc_error(lambda: wait(client, iid, timeout=-1.0))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("timeout_seconds:")
    assert wait(client, iid).exit_code == 0


# -- uploads -------------------------------------------------------------------------------------
def _phdrs(elf: bytes):
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    return [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]


def dynamic_elf() -> bytes:
    """A real dynamically linked x86-64 executable of this host (it has PT_INTERP)."""
    for cand in ("/bin/true", "/usr/bin/true", "/bin/sh", os.path.realpath(sys.executable)):
        try:
            data = Path(cand).read_bytes()
        except OSError:
            continue
        if (
            data[:4] == b"\x7fELF"
            and data[4] == 2
            and struct.unpack_from("<H", data, 18)[0] == 62
            and 3 in _phdrs(data)
            and len(data) < 4 << 20
        ):
            return data
    # no such file: make one, a static image with its PT_GNU_STACK turned into PT_INTERP
    data = bytearray(build_image("hello").read_bytes())
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 0x6474E551:
            struct.pack_into("<I", data, phoff + i * phentsize, 3)
            return bytes(data)
    raise AssertionError("no dynamic ELF to test with")


def aarch64_elf() -> bytes:
    data = bytearray(build_image("hello").read_bytes())
    struct.pack_into("<H", data, 18, 183)  # e_machine = EM_AARCH64
    return bytes(data)


BAD_UPLOADS = {
    "not-elf": (lambda: b"#!/bin/sh\necho this is not an ELF\n" * 50, "not an ELF file"),
    "dynamic": (dynamic_elf, "dynamically linked"),
    "aarch64": (aarch64_elf, "not an x86-64 ELF (e_machine=183)"),
    "empty": (lambda: b"", "not an ELF file"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_upload_rejects_bad_image(client, case):
    make, reason = BAD_UPLOADS[case]
    name = f"bad-{case}"
    e = rpc_error(lambda: client.upload(name, make()))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert e.details().startswith("data:") and reason in e.details(), e.details()
    assert name not in {i.name for i in client.images()}
    # a Launch of what was refused finds nothing
    e = rpc_error(lambda: launch(client, name))
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_upload_larger_than_limit(client):
    e = rpc_error(lambda: client.upload("too-big", b"\x7fELF" + bytes(5 << 20)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert e.details().startswith("data:") and str(4 << 20) in e.details()
    assert "too-big" not in {i.name for i in client.images()}
    assert "hello" in {i.name for i in client.images()}  # still serving


@pytest.mark.parametrize("name", ["", "../escape", "a" * 65, "-leading-dash"])
def test_upload_rejects_bad_name(client, name):
    e = rpc_error(lambda: client.upload(name, build_image("hello").read_bytes()))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("name:"), e.details()


def test_uploaded_image_listed_and_launched(client, ticker, ticker_elf):
    images = {i.name: i for i in client.images()}
    info = images[ticker]
    assert (info.size_bytes, info.sha256, info.builtin) == (
        len(ticker_elf),
        hashlib.sha256(ticker_elf).hexdigest(),
        False,
    )
    assert images["hello"].builtin is True
    assert images["hello"].sha256 == hashlib.sha256(build_image("hello").read_bytes()).hexdigest()
    for mode in ("thread", "vmclone-tcp"):
        iid = launch(client, ticker, ["3"], console_pipe=True, **MODES[mode])
        r = wait(client, iid)
        assert (r.outcome, r.exit_code) == ("exited", 0), (mode, r)
        assert stdout_of(console(client, iid)) == b"tick 0\ntick 1\ntick 2\n"


def test_malformed_but_accepted_image_is_contained(client):
    """An ELF whose headers pass but whose code is garbage: a guest fault, not a tender crash."""
    data = bytearray(build_image("hello").read_bytes())
    (entry,) = struct.unpack_from("<Q", data, 24)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        ptype, flags, off, vaddr, _, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if ptype == 1 and vaddr <= entry < vaddr + filesz:
            start = off + entry - vaddr
            data[start : start + 64] = b"\x0f\x0b" * 32  # ud2: an invalid opcode
            break
    else:
        raise AssertionError("no segment holds the entry point")
    info = client.upload("garbage-code", bytes(data))
    assert info.name == "garbage-code"
    for mode in ("thread", "vmclone-shm"):
        iid = launch(client, "garbage-code", **MODES[mode])
        r = wait(client, iid)
        assert (r.done, r.outcome, r.signal) == (True, "signaled", SIGILL), (mode, r)
    iid = launch(client, "hello", console_pipe=True)
    assert wait(client, iid).exit_code == 0
    assert stdout_of(console(client, iid)) == HELLO


def hello_image() -> tuple[bytes, str]:
    data = build_image("hello").read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def boot_chunks(sup: str, image: bytes | None = None, **start) -> list:
    """A StartVm that boots ``hello`` (or ``image``) with supervisor ``sup``."""
    data, digest = hello_image()
    data = data if image is None else image
    fields = dict(
        instance_id="x",
        pid=2,
        supervisor=sup,
        transport="tcp",
        instance_token="t",
        image_sha256=digest,
    )
    header = ppb2.VmStart(**{**fields, **start})
    return [ppb2.VmChunk(start=header), ppb2.VmChunk(image=data)]


class Listener:
    """A TCP listener of the test's own that counts the connections it gets (and, if
    told, greets each with ``banner``): where a tender must not, or may, connect."""

    def __init__(self, host: str = "127.0.0.1", banner: bytes = b"") -> None:
        self.sock = socket.create_server((host, 0))
        self.address = f"tcp:{host}:{self.sock.getsockname()[1]}"
        self.banner, self.accepted = banner, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                if self.banner:
                    conn.sendall(self.banner)
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(1 << 16)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def test_peer_start_vm_with_bad_headers(tender):
    """Peer.StartVm with a supervisor that cannot be reached, or that never answers."""
    silent = Listener()  # accepts, then says nothing
    cases = {
        "bad address": "bogus",
        "refused": f"tcp:127.0.0.1:{free_port()}",
        "no such socket": "unix:/nonexistent/sock",
        "silent supervisor": silent.address,
    }
    try:
        with grpc.insecure_channel(tender.peer_target) as ch:
            stub = _peer_grpc.PeerStub(ch)
            codes = {}
            for case, sup in cases.items():
                e = rpc_error(
                    lambda sup=sup: stub.StartVm(iter(boot_chunks(sup)), timeout=RPC_TIMEOUT)
                )
                codes[case] = (e.code(), e.details())
    finally:
        silent.close()
    # a malformed address is the caller's mistake (and a peer never names a Unix
    # socket); a supervisor that cannot be reached (or says nothing) is a service
    # that is not there
    want = {
        "bad address": grpc.StatusCode.INVALID_ARGUMENT,
        "refused": grpc.StatusCode.UNAVAILABLE,
        "no such socket": grpc.StatusCode.INVALID_ARGUMENT,
        "silent supervisor": grpc.StatusCode.UNAVAILABLE,
    }
    bad = {case: c for case, c in codes.items() if c[0] != want[case]}
    assert not bad, f"StartVm with bad headers: unexpected codes: {bad}"
    assert tender.health() == health_pb2.HealthCheckResponse.SERVING


def test_peer_start_vm_calls_share_one_receive_budget():
    """What peers can make a tender process hold: every StartVm in progress counts
    against one budget.  A call that would pass it is refused (RESOURCE_EXHAUSTED, so
    the parent places the clone elsewhere) while another holds its bytes, and what a
    call held is given back when it ends."""
    from tender_service.instance.worker import PeerServicer

    servicer = PeerServicer(threading.Event(), receive_budget=1 << 20)
    server = grpc.server(ThreadPoolExecutor(4))
    _peer_grpc.add_PeerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    start = ppb2.VmStart(
        instance_id="x", pid=2, supervisor="bogus", transport="tcp", instance_token="t"
    )
    go_on = threading.Event()

    def slow():  # 600 KiB, then wait until the other call has been refused
        yield ppb2.VmChunk(start=start)
        yield ppb2.VmChunk(snapshot=bytes(600 << 10))
        go_on.wait(RPC_TIMEOUT)
        yield ppb2.VmChunk(snapshot=b"junk")

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = _peer_grpc.PeerStub(ch)
            first = stub.StartVm.future(slow(), timeout=RPC_TIMEOUT)
            wait_until(
                lambda: servicer.receiving >= 600 << 10,
                RPC_TIMEOUT,
                "the first call's bytes to arrive",
            )
            e = rpc_error(
                lambda: stub.StartVm(
                    iter([ppb2.VmChunk(start=start), ppb2.VmChunk(snapshot=bytes(600 << 10))]),
                    timeout=RPC_TIMEOUT,
                )
            )
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget" in e.details(), e
            go_on.set()
            e = rpc_error(first.result)  # past the budget: on to the next check
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            wait_until(lambda: servicer.receiving == 0, RPC_TIMEOUT, "the bytes given back")
            e = rpc_error(
                lambda: stub.StartVm(
                    iter([ppb2.VmChunk(start=start), ppb2.VmChunk(snapshot=bytes(900 << 10))]),
                    timeout=RPC_TIMEOUT,
                )
            )
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    finally:
        go_on.set()
        server.stop(None)


# -- capacity ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    t = Tender.start(tmp_path_factory.mktemp("small"), "--pool", "1", "--max-instances", "2")
    yield t
    stopped_cleanly(t)


def test_too_many_instances(small):
    c = small.client()
    try:
        spins = [launch(c, "spin", time_limit_seconds=120.0) for _ in range(2)]
        for iid in spins:
            wait_for_output(c, iid, b"spin: spinning\n")
        e = rpc_error(lambda: launch(c, "hello"))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        assert e.details() == "instances: 2 running of a 2 limit (--max-instances)"
        assert len(c.instances()) == 2  # the refused launch left no trace
        for iid in spins:
            assert c.kill(iid) is True
            assert wait(c, iid).outcome == "killed"
        iid = launch(c, "hello", console_pipe=True)  # room again: the tender keeps working
        assert wait(c, iid).exit_code == 0
        assert stdout_of(console(c, iid)) == HELLO
    finally:
        c.close()


def test_upload_under_a_builtin_name(small):
    """Refused, or listed once and launched as listed: never two entries of one name."""
    c = small.client()
    data = build_image("hello").read_bytes()
    try:
        try:
            c.upload("fork_time", data)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), (
                e.code(),
                e.details(),
            )
        listed = [(i.name, i.builtin, i.sha256) for i in c.images()]
        names = [name for name, _, _ in listed]
        assert len(names) == len(set(names)), (
            f"ListImages lists {[n for n in names if names.count(n) > 1]} more than once"
        )
        entry = next(row for row in listed if row[0] == "fork_time")
        iid = launch(c, "fork_time", console_pipe=True)
        wait(c, iid)
        ran_upload = stdout_of(console(c, iid)) == HELLO
        assert entry[1] is (not ran_upload), (entry, ran_upload)
    finally:
        c.close()


# -- auth ----------------------------------------------------------------------------------------
TOKEN = "s3cret-token-0123456789abcdef"
PEER_TOKEN = "peer-s3cret-0123456789abcdef"
CREDENTIALS = {
    "none": [],
    "wrong": [("authorization", "Bearer " + TOKEN[:-1] + "X")],
    "no-scheme": [("authorization", TOKEN)],
    "other-principal": None,  # the peer token on the client API, the client token on Peer
}


def _refused_md(t: Tender, rpc: str, cred: str) -> list[tuple[str, str]]:
    if cred == "other-principal":
        return t.md if rpc.startswith("Peer.") else t.peer_md
    return CREDENTIALS[cred]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    t = Tender.start(
        tmp_path_factory.mktemp("secure"), "--pool", "1", token=TOKEN, peer_token=PEER_TOKEN
    )
    with grpc.insecure_channel(t.target) as ch, grpc.insecure_channel(t.peer_target) as pch:
        tstub, pstub = _tender_grpc.TenderStub(ch), _peer_grpc.PeerStub(pch)
        iid = tstub.Launch(
            pb2.LaunchRequest(image="hello", console_pipe=True), metadata=t.md, timeout=RPC_TIMEOUT
        ).instance_id
        tstub.Wait(pb2.WaitRequest(instance_id=iid), metadata=t.md, timeout=RPC_TIMEOUT)
        yield t, tstub, pstub, iid
    stopped_cleanly(t)


def _call(rpc: str, tstub, pstub, iid: str, md, upload_name: str = "auth-upload"):
    kw = dict(metadata=md, timeout=RPC_TIMEOUT)
    hello = build_image("hello").read_bytes()
    if rpc == "UploadImage":
        return tstub.UploadImage(
            iter([pb2.UploadImageRequest(name=upload_name), pb2.UploadImageRequest(data=hello)]),
            **kw,
        )
    if rpc == "ListImages":
        return tstub.ListImages(pb2.ListImagesRequest(), **kw)
    if rpc == "DeleteImage":
        return tstub.DeleteImage(pb2.DeleteImageRequest(name=upload_name), **kw)
    if rpc == "Launch":
        return tstub.Launch(pb2.LaunchRequest(image="hello", console_pipe=True), **kw)
    if rpc == "StreamConsole":
        return list(tstub.StreamConsole(pb2.ConsoleRequest(instance_id=iid, from_start=True), **kw))
    if rpc == "Wait":
        return tstub.Wait(pb2.WaitRequest(instance_id=iid), **kw)
    if rpc == "Kill":
        return tstub.Kill(pb2.KillRequest(instance_id=iid), **kw)
    if rpc == "ListInstances":
        return tstub.ListInstances(pb2.ListInstancesRequest(), **kw)
    if rpc == "Describe":
        return tstub.Describe(pb2.DescribeRequest(instance_id=iid), **kw)
    if rpc == "Peer.StartVm":  # a header that passes every check but the missing image
        return pstub.StartVm(
            iter(
                [
                    ppb2.VmChunk(
                        start=ppb2.VmStart(
                            instance_id="x", pid=2, supervisor="tcp:127.0.0.1:1", transport="tcp"
                        )
                    )
                ]
            ),
            **kw,
        )
    if rpc == "Peer.GetLoad":
        return pstub.GetLoad(ppb2.LoadRequest(), **kw)
    raise ValueError(rpc)


RPCS = [
    "UploadImage",
    "ListImages",
    "DeleteImage",
    "Launch",
    "StreamConsole",
    "Wait",
    "Kill",
    "ListInstances",
    "Describe",
    "Peer.StartVm",
    "Peer.GetLoad",
]


def test_every_rpc_is_covered():
    tender_methods = {m.name for m in pb2.DESCRIPTOR.services_by_name["Tender"].methods}
    peer_methods = {f"Peer.{m.name}" for m in ppb2.DESCRIPTOR.services_by_name["Peer"].methods}
    assert set(RPCS) == tender_methods | peer_methods


@pytest.mark.parametrize("cred", list(CREDENTIALS))
@pytest.mark.parametrize("rpc", RPCS)
def test_rpc_refused_without_the_token(secure, rpc, cred):
    """Each API wants its own principal's token: no token, a wrong one, or the other
    principal's (a client token on Peer, a peer token on Tender) is refused."""
    t, tstub, pstub, iid = secure
    instances = len(_call("ListInstances", tstub, pstub, iid, t.md).instances)
    e = rpc_error(lambda: _call(rpc, tstub, pstub, iid, _refused_md(t, rpc, cred), "auth-refused"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    if rpc.startswith("Peer."):
        assert e.details().startswith("missing or wrong peer token"), e.details()
    else:
        assert e.details() == "missing or wrong bearer token"
    # the refused call did nothing
    assert len(_call("ListInstances", tstub, pstub, iid, t.md).instances) == instances
    assert "auth-refused" not in {
        i.name for i in _call("ListImages", tstub, pstub, iid, t.md).images
    }


@pytest.mark.parametrize("rpc", RPCS)
def test_rpc_works_with_the_token(secure, rpc):
    t, tstub, pstub, iid = secure
    md = t.peer_md if rpc.startswith("Peer.") else t.md
    if rpc == "Peer.StartVm":  # auth passed: the missing image is what is wrong
        e = rpc_error(lambda: _call(rpc, tstub, pstub, iid, md))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details().startswith("cannot start the VM: image: missing"), e.details()
        return
    if rpc == "DeleteImage":  # an image of its own to delete
        _call("UploadImage", tstub, pstub, iid, md, "auth-delete")
        out = _call(rpc, tstub, pstub, iid, md, "auth-delete")
        assert (out.name, out.builtin) == ("auth-delete", False)
        assert "auth-delete" not in {
            i.name for i in _call("ListImages", tstub, pstub, iid, t.md).images
        }
        return
    out = _call(rpc, tstub, pstub, iid, md)
    hello = build_image("hello").read_bytes()
    if rpc == "UploadImage":
        assert (out.name, out.size_bytes, out.sha256, out.builtin) == (
            "auth-upload",
            len(hello),
            hashlib.sha256(hello).hexdigest(),
            False,
        )
    elif rpc == "ListImages":
        assert "hello" in {i.name for i in out.images}
    elif rpc == "Launch":
        assert re.fullmatch(r"[0-9a-f]{16}", out.instance_id)
        r = tstub.Wait(
            pb2.WaitRequest(instance_id=out.instance_id), metadata=t.md, timeout=RPC_TIMEOUT
        )
        assert (r.outcome, r.exit_code) == ("exited", 0)
    elif rpc == "StreamConsole":
        assert stdout_of(out) == HELLO
    elif rpc == "Wait":
        assert (out.instance_id, out.done, out.outcome) == (iid, True, "exited")
    elif rpc == "Kill":
        assert out.was_running is False
    elif rpc == "ListInstances":
        assert iid in {s.instance_id for s in out.instances}
    elif rpc == "Describe":
        assert out.summary.instance_id == iid and out.result.outcome == "exited"
    elif rpc == "Peer.GetLoad":
        assert out.cpu_seconds > 0 and out.vms == 0


def _reflect_services(target: str, md) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(
            iter(
                stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    metadata=md,
                    timeout=RPC_TIMEOUT,
                )
            )
        )
    return {s.name for s in reply.list_services_response.service}


def test_health_open_reflection_guarded(secure):
    """Health checks stay open for probes (they say only SERVING); reflection needs the token."""
    t = secure[0]
    with grpc.insecure_channel(t.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for cred in CREDENTIALS:
        e = rpc_error(lambda cred=cred: _reflect_services(t.target, _refused_md(t, "", cred)))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    assert "unifork.v1.Tender" in _reflect_services(t.target, t.md)


def test_refusals_are_counted(secure):
    t, tstub, pstub, iid = secure
    key = dict(grpc_service="unifork.v1.Tender", grpc_method="Launch", grpc_code="UNAUTHENTICATED")
    before = metric(t.metrics(), "grpc_server_handled_total", **key)
    for cred in CREDENTIALS:
        rpc_error(
            lambda cred=cred: _call("Launch", tstub, pstub, iid, _refused_md(t, "Launch", cred))
        )
    rpc_error(lambda: _call("Peer.GetLoad", tstub, pstub, iid, []))
    after = t.metrics()
    assert metric(after, "grpc_server_handled_total", **key) == before + len(CREDENTIALS)
    assert (
        metric(
            after,
            "grpc_server_handled_total",
            grpc_service="unifork.v1.Peer",
            grpc_method="GetLoad",
            grpc_code="UNAUTHENTICATED",
        )
        >= 1
    )


def test_the_client_port_does_not_serve_peers(secure):
    """Peer is not on the client port at all, whatever the token."""
    t = secure[0]
    with grpc.insecure_channel(t.target) as ch:
        stub = _peer_grpc.PeerStub(ch)
        for md in (t.md, t.peer_md):
            e = rpc_error(
                lambda md=md: stub.GetLoad(ppb2.LoadRequest(), metadata=md, timeout=RPC_TIMEOUT)
            )
            assert e.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED), (
                e.code(),
                e.details(),
            )
            e = rpc_error(lambda md=md: _call("Peer.StartVm", None, stub, "", md))
            assert e.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED), (
                e.code(),
                e.details(),
            )


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _raw_start_vm(target: str, md, header: bytes, *chunks: bytes) -> grpc.RpcError:
    """StartVm with hand-encoded messages (fields the current proto no longer has)."""

    def field(num: int, data: bytes) -> bytes:
        return bytes([num << 3 | 2]) + _varint(len(data)) + data

    msgs = [field(1, header), *(field(3, c) for c in chunks)]
    with grpc.insecure_channel(target) as ch:
        call = ch.stream_unary(
            "/unifork.v1.Peer/StartVm",
            request_serializer=lambda b: b,
            response_deserializer=ppb2.VmStarted.FromString,
        )
        return rpc_error(lambda: call(iter(msgs), metadata=md, timeout=RPC_TIMEOUT))


def _worker_pids(t: Tender) -> set[int]:
    return {pid for pid, (_, cmd) in descendants(t.proc.pid).items() if is_worker(cmd)}


def test_start_vm_never_opens_a_host_path(secure):
    """Finding 3: StartVm once took VmStart.image_path, a file of the tender's host, as
    the image: ``/etc/shadow: not an ELF file`` told what it held, any static ELF ran,
    /dev/zero grew the tender.  Now the field does not exist (it is reserved): even
    with the peer token, a boot without the image's bytes is refused before anything
    is opened or connected to, and bytes that do not match their digest are refused."""
    t = secure[0]
    sup = Listener()  # a supervisor that would see the VM connect if one started
    workers = _worker_pids(t)
    try:
        base = ppb2.VmStart(
            instance_id="x", pid=2, supervisor=sup.address, transport="tcp", instance_token="t"
        ).SerializeToString()
        for path in ("/etc/shadow", "/dev/zero", str(build_image("hello"))):
            header = base + bytes([7 << 3 | 2]) + _varint(len(path)) + path.encode()
            e = _raw_start_vm(t.peer_target, t.peer_md, header)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e.code(), e.details())
            assert (
                e.details() == "cannot start the VM: image: missing (a VM boots from the "
                "image's bytes)"
            ), e.details()
        data, digest = hello_image()
        with grpc.insecure_channel(t.peer_target) as ch:
            stub = _peer_grpc.PeerStub(ch)
            e = rpc_error(
                lambda: stub.StartVm(
                    iter(boot_chunks(sup.address, data + b"x")),
                    metadata=t.peer_md,
                    timeout=RPC_TIMEOUT,
                )
            )
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert "image_sha256: does not match" in e.details()
            # too large an image: refused while it arrives, nothing kept
            big = iter(
                [
                    boot_chunks(sup.address)[0],
                    *(ppb2.VmChunk(image=bytes(1 << 20)) for _ in range(65)),
                ]
            )
            e = rpc_error(lambda: stub.StartVm(big, metadata=t.peer_md, timeout=RPC_TIMEOUT))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    finally:
        sup.close()
    assert sup.accepted == 0, "a refused StartVm connected to its supervisor"
    assert _worker_pids(t) == workers  # no worker died or was added
    assert t.health() == health_pb2.HealthCheckResponse.SERVING


def test_start_vm_connects_only_to_the_caller_or_its_peers(secure):
    """Finding 4: StartVm's supervisor made the tender connect anywhere (any TCP address,
    any Unix socket) and echoed the first bytes of the answer.  Now a peer's StartVm
    may name only a tcp supervisor on the host that called (127.0.0.1 here) or a
    known peer; 127.0.0.2 is neither, a Unix path is never taken from a peer, and
    what a supervisor that is not one answers is not echoed."""
    t = secure[0]
    elsewhere = Listener("127.0.0.2")
    banner = Listener(banner=b"SSH-2.0-OpenSSH_9.6 SECRET-BANNER\r\n" * 8)
    try:
        with grpc.insecure_channel(t.peer_target) as ch:
            stub = _peer_grpc.PeerStub(ch)

            def start(sup: str, **kw) -> grpc.RpcError:
                return rpc_error(
                    lambda: stub.StartVm(
                        iter(boot_chunks(sup, **kw)), metadata=t.peer_md, timeout=RPC_TIMEOUT
                    )
                )

            e = start(elsewhere.address)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert "connects only to the host that called it or to its peers" in e.details()
            e = start("unix:" + str(Path(t.log_path).parent / "x.sock"))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            e = rpc_error(
                lambda: stub.StartVm(
                    iter(boot_chunks(banner.address, transport="shm")),
                    metadata=t.peer_md,
                    timeout=RPC_TIMEOUT,
                )
            )
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert e.details().startswith("transport:"), e.details()
            e = start(banner.address)  # the caller's host: tried, and what came back hidden
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
            assert "SECRET" not in e.details() and "SSH" not in e.details(), e.details()
    finally:
        elsewhere.close()
        banner.close()
    assert elsewhere.accepted == 0, "the tender connected to a host it does not know"
    assert banner.accepted == 1
    assert "SECRET" not in t.log()


def test_a_ticket_stands_for_one_start_vm(secure):
    """What a VM's clone carries instead of the peer token: a ticket of its supervisor
    for one (instance, pid, target) within a minute, good once."""
    from tender_service.service.peering import Tickets

    t = secure[0]
    tickets = Tickets(PEER_TOKEN)
    sup = f"tcp:127.0.0.1:{free_port()}"  # nothing there: a start that passes gets UNAVAILABLE

    def start(ticket: str, pid: int = 2) -> grpc.StatusCode:
        chunks = boot_chunks(sup)
        chunks[0].start.pid = pid
        with grpc.insecure_channel(t.peer_target) as ch:
            return rpc_error(
                lambda: _peer_grpc.PeerStub(ch).StartVm(
                    iter(chunks), metadata=[("unifork-ticket", ticket)], timeout=RPC_TIMEOUT
                )
            ).code()

    good = tickets.issue("x", 2, t.peer_target)
    assert start(tickets.issue("x", 3, t.peer_target)) == grpc.StatusCode.UNAUTHENTICATED
    assert start(tickets.issue("x", 2, "127.0.0.1:1")) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        start(Tickets("another-token-0123456789").issue("x", 2, t.peer_target))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert start(good.replace("x.2.", "y.2.", 1)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        start(tickets.issue("x", 2, t.peer_target), pid=3) == grpc.StatusCode.UNAUTHENTICATED
    )  # a header for another VM than the ticket's
    assert start(good) == grpc.StatusCode.UNAVAILABLE  # accepted: on to the supervisor
    assert start(good) == grpc.StatusCode.UNAUTHENTICATED  # used up
    expired = Tickets(PEER_TOKEN, ttl=-1.0).issue("x", 2, t.peer_target)
    assert start(expired) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(t.peer_target) as ch:  # a ticket is for StartVm only
        e = rpc_error(
            lambda: _peer_grpc.PeerStub(ch).GetLoad(
                ppb2.LoadRequest(),
                metadata=[("authorization", f"Bearer {good}")],
                timeout=RPC_TIMEOUT,
            )
        )
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_stranger_is_refused_before_its_stream_is_read(secure):
    """Without the peer token or a ticket (both in metadata), StartVm is refused at
    once: a caller that opens streams and never sends cannot hold the peer
    listener's threads while they wait for its first message."""
    t = secure[0]
    never = threading.Event()

    def silent():
        never.wait(RPC_TIMEOUT)
        yield from ()

    try:
        with grpc.insecure_channel(t.peer_target) as ch:
            stub = _peer_grpc.PeerStub(ch)
            for md in ([], t.md, [("unifork-ticket", "x.2.1.n.m")]):
                e = rpc_error(
                    lambda md=md: stub.StartVm(silent(), metadata=md, timeout=RPC_TIMEOUT)
                )
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    finally:
        never.set()


def relay_socket(pid: int) -> str:
    """The path of the relay socket process ``pid`` listens on (its fds and
    /proc/net/unix: workers learn it at start-up, not from their exec environment)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and "unifork-relay-" in fields[7]:
            return fields[7]
    raise AssertionError(f"process {pid} listens on no relay socket")


def test_the_relay_dials_only_known_tenders(secure):
    """The relay (what a worker's clone bound for a peer goes through) is a Unix socket
    only the tender's user can reach, named in the workers' environment; even from
    there it dials only this tender's peers and itself: a VM process cannot make
    its tender connect elsewhere."""
    t = secure[0]
    relay = "unix:" + relay_socket(t.proc.pid)
    assert os.stat(Path(relay[5:]).parent).st_mode & 0o077 == 0  # private to the tender
    elsewhere = Listener("127.0.0.2")
    try:
        with grpc.insecure_channel(relay) as ch:
            target = elsewhere.address.removeprefix("tcp:")
            e = rpc_error(
                lambda: _peer_grpc.PeerStub(ch).StartVm(
                    iter(boot_chunks(elsewhere.address)),
                    metadata=[("unifork-target", target)],
                    timeout=RPC_TIMEOUT,
                )
            )
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (e.code(), e.details())
            # itself it may reach, but only as a stranger: the relay adds no peer token
            e = rpc_error(
                lambda: _peer_grpc.PeerStub(ch).StartVm(
                    iter(boot_chunks(elsewhere.address)),
                    metadata=[("unifork-target", t.peer_target)],
                    timeout=RPC_TIMEOUT,
                )
            )
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    finally:
        elsewhere.close()
    assert elsewhere.accepted == 0


def test_no_vm_process_holds_a_token(secure):
    """VM processes (pool workers, thread-fork VM processes) run guest code: neither
    the client token nor the peer token is in their environment (it was, as
    UNIFORK_PEER_TOKEN, for workers to call peers; now tickets do that)."""
    t = secure[0]
    c = t.client()
    try:
        running = [
            launch(c, "spin", time_limit_seconds=120.0, **MODES[m])
            for m in ("thread", "vmclone-shm")
        ]
        for iid in running:
            wait_for_output(c, iid, b"spin: spinning\n")
        procs = descendants(t.proc.pid)
        assert sum(is_worker(cmd) for _, cmd in procs.values()) >= 2, procs
        for pid in procs:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            assert TOKEN.encode() not in env and PEER_TOKEN.encode() not in env, (
                pid,
                procs[pid][1],
            )
            assert b"UNIFORK_PEER_TOKEN" not in env
        for iid in running:
            assert c.kill(iid) is True
            assert wait(c, iid).outcome == "killed"
    finally:
        c.close()


def test_short_token_file_refused(tmp_path):
    (tmp_path / "token").write_text("short\n")
    r = subprocess.run(
        [
            *unifork_cmd(),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--token-file",
            str(tmp_path / "token"),
        ],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
    )
    assert r.returncode == 2, r
    assert "at least 16 characters" in r.stderr


def test_listen_any_needs_a_token(tmp_path):
    port = free_port()
    r = subprocess.run(
        [*unifork_cmd(), "serve", "--listen", f"0.0.0.0:{port}", "--pool", "1"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
    )
    assert r.returncode == 2, r
    assert "refusing to listen on '0.0.0.0' without --token-file" in r.stderr, r.stderr
    assert "--insecure-listen-any" in r.stderr

    t = Tender.start(tmp_path, "--pool", "1", "--insecure-listen-any", listen_host="0.0.0.0")
    try:
        c = t.client()  # reached over loopback
        iid = launch(c, "hello", console_pipe=True)
        assert wait(c, iid).exit_code == 0
        c.close()
    finally:
        stopped_cleanly(t)


# -- health, reflection, metrics -----------------------------------------------------------------
@pytest.mark.parametrize("service", ["", "unifork.v1.Tender", "unifork.v1.Peer"])
def test_health_serving(tender, service):
    assert tender.health(service) == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service(tender):
    e = rpc_error(lambda: tender.health("unifork.v1.Nothing"))
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_reflection(tender):
    with grpc.insecure_channel(tender.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="unifork.v1.Tender"),
        ]
        listed, files = stub.ServerReflectionInfo(iter(reqs), timeout=RPC_TIMEOUT)
    names = {s.name for s in listed.list_services_response.service}
    assert {"unifork.v1.Tender", "grpc.health.v1.Health"} <= names, names
    assert "unifork.v1.Peer" not in names  # the peer API has a listener of its own
    fds = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in files.file_descriptor_response.file_descriptor_proto
    ]
    tender_file = next(f for f in fds if any(s.name == "Tender" for s in f.service))
    assert tender_file.package == "unifork.v1"
    assert tender_file.name.endswith("unifork/v1/tender.proto")
    methods = {m.name for s in tender_file.service if s.name == "Tender" for m in s.method}
    assert methods == {
        "UploadImage",
        "ListImages",
        "DeleteImage",
        "Launch",
        "StreamConsole",
        "Wait",
        "Kill",
        "ListInstances",
        "Describe",
    }


def test_metrics_after_a_workload(tender, client):
    before = tender.metrics()
    work = [
        ("token_ring", ["-n", "3", "-r", "4"], "thread"),
        ("token_ring", ["-n", "3", "-r", "4"], "vmclone-shm"),
        ("fork_time", ["-n", "3"], "thread"),
        ("fork_time", ["-n", "3"], "vmclone-tcp"),
        ("hello", [], "thread"),
    ]
    for image, args, mode in work:
        r = wait(client, launch(client, image, args, console_pipe=True, **MODES[mode]))
        assert r.outcome == "exited", (image, mode, r)
    after = tender.metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("unifork_instances_finished_total", outcome="exited") >= len(work)
    # token_ring forks 2, fork_time 3: 5 forks per mode
    assert delta("unifork_fork_latency_seconds_count", mode="thread") >= 5
    assert delta("unifork_fork_latency_seconds_count", mode="vmclone") >= 5
    assert delta("unifork_fork_latency_seconds_sum", mode="vmclone") > 0
    assert delta(
        "grpc_server_handled_total",
        grpc_service="unifork.v1.Tender",
        grpc_method="Launch",
        grpc_code="OK",
    ) == len(work)
    assert delta("unifork_pipe_bytes_total", transport="local") > 0  # thread-fork pipes
    assert delta("unifork_pipe_bytes_total", transport="shm") > 0  # cross-VM pipes
    assert metric(after, "unifork_pipe_bytes_total") > 0
    assert metric(after, "process_resident_memory_bytes") > 1 << 20
    assert ("unifork_instances", frozenset({("mode", "thread")})) in after


# -- generated code, graceful shutdown -----------------------------------------------------------
def test_generated_code_is_current(tmp_path):
    protos.ensure()
    fresh = protos.generate(tmp_path)
    fresh_dir = tmp_path / "tender_service" / "gen" / "unifork" / "v1"
    have_dir = protos.GEN_DIR / "unifork" / "v1"
    names = sorted(p.name for p in fresh if p.parent == fresh_dir)
    assert names == ["peer_pb2.py", "peer_pb2_grpc.py", "tender_pb2.py", "tender_pb2_grpc.py"]
    assert sorted(p.name for p in have_dir.glob("*.py")) == names
    for name in names:
        assert (fresh_dir / name).read_bytes() == (have_dir / name).read_bytes(), (
            f"tender_service/gen/unifork/v1/{name} is stale"
        )


def test_graceful_shutdown_kills_what_is_left(tmp_path):
    t = Tender.start(tmp_path, "--pool", "2", "--grace", "1")
    c = t.client()
    ex = ThreadPoolExecutor(2)
    try:
        ids = {
            mode: launch(c, "spin", time_limit_seconds=60.0, **MODES[mode])
            for mode in ("thread", "vmclone-shm")
        }
        for iid in ids.values():
            wait_for_output(c, iid, b"spin: spinning\n")
        below = descendants(t.proc.pid)
        # its children: 2 pool workers and the VM fork server, whose child runs the
        # thread-fork instance
        children = {
            pid
            for pid, (_, cmd) in below.items()
            if is_worker(cmd) and proc_stat(pid)[0] == t.proc.pid
        }
        assert len(children) == 3, below
        vm_host = int(next(p.vm for p in c.describe(ids["vmclone-shm"]).processes if p.pid == 2))
        thread_vm = int(next(p.vm for p in c.describe(ids["thread"]).processes if p.pid == 2))
        assert vm_host in children and proc_stat(thread_vm)[0] in children - {vm_host}, below

        waits = {mode: ex.submit(wait, c, iid) for mode, iid in ids.items()}
        t.proc.send_signal(signal.SIGTERM)

        def not_serving():
            try:
                return t.health() != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return True

        poll(
            not_serving,
            30,
            "the tender to act on SIGTERM (health leaving SERVING)",
            detail=lambda: f"tender still running: {t.proc.poll() is None}, log:\n{t.log()}",
        )
        e = rpc_error(lambda: launch(c, "hello"))  # shutting down, or already gone
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
        results = {mode: f.result(STOP_TIMEOUT) for mode, f in waits.items()}
        code = t.proc.wait(STOP_TIMEOUT)
    finally:
        if t.proc.poll() is None:  # failed: do not wait a minute for the spinning guests
            t.proc.kill()
            t.proc.wait()
        ex.shutdown(wait=True)
        c.close()
    assert code == 0, t.log()
    for mode, r in results.items():
        assert (r.instance_id, r.done, r.outcome, r.signal) == (
            ids[mode],
            True,
            "killed",
            SIGKILL,
        ), (mode, r)
    assert "killed after the 1 s grace period" in t.log()
    poll(
        lambda: not any(still_running(pid, start) for pid, (start, _) in below.items()),
        30,
        "the tender's worker processes to go",
        detail=lambda: str(
            {pid: cmdline(pid) for pid, (start, _) in below.items() if still_running(pid, start)}
        ),
    )


# -- the command-line clients --------------------------------------------------------------------
def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*unifork_cmd(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=RPC_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_cli_clients(tender, client, ticker_elf, tmp_path):
    tgt = ["--target", tender.target]
    r = cli("launch", "hello", "--wait", *tgt)
    assert (r.returncode, r.stdout) == (0, HELLO.decode()), r
    assert re.match(r"[0-9a-f]{16}: exited, ", r.stderr), r.stderr

    r = cli(
        "launch",
        "token_ring",
        "--fork",
        "vmclone",
        "--pipe",
        "tcp",
        "--console",
        "pipe",
        "--wait",
        "--tag-pids",
        *tgt,
        "--",
        "-n",
        "3",
        "-r",
        "2",
    )
    assert (r.returncode, r.stdout) == (0, "[2] token=6\n"), r

    r = cli("launch", "fault_segv", "--wait", *tgt)
    assert r.returncode == 128 + SIGSEGV, r

    r = cli("launch", "spin", "--timeout", "120", *tgt)
    assert r.returncode == 0, r
    iid = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", iid), r.stdout
    wait_for_output(client, iid, b"spin: spinning\n")
    r = cli("ps", *tgt)
    row = next(line for line in r.stdout.splitlines() if line.startswith(iid))
    assert row.split()[1:3] == ["running", "thread"] and row.endswith(" spin"), row
    r = cli("wait", iid, "--timeout", "0.2", *tgt)
    assert r.returncode == 124 and "still running" in r.stderr, r
    r = cli("kill", iid, *tgt)
    assert (r.returncode, r.stdout) == (0, "killed\n"), r
    r = cli("wait", iid, *tgt)
    assert r.returncode == 128 + SIGKILL and f"{iid}: killed" in r.stderr, r
    r = cli("kill", iid, *tgt)
    assert r.stdout == "not running\n", r
    r = cli("logs", iid, *tgt)
    assert (r.returncode, r.stdout) == (0, "spin: spinning\n"), r
    r = cli("describe", iid, *tgt)
    assert r.returncode == 0 and re.search(r"^outcome: +killed$", r.stdout, re.M), r

    (tmp_path / "t.elf").write_bytes(ticker_elf)
    r = cli("upload", str(tmp_path / "t.elf"), "--name", "cli-ticker", *tgt)
    assert r.stdout.split() == [
        "cli-ticker",
        str(len(ticker_elf)),
        hashlib.sha256(ticker_elf).hexdigest(),
    ], r
    r = cli("images", *tgt)
    row = next(line for line in r.stdout.splitlines() if line.startswith("cli-ticker "))
    assert row.split()[-1] == "uploaded", row
    r = cli("launch", "cli-ticker", "--wait", *tgt, "--", "2")
    assert (r.returncode, r.stdout) == (0, "tick 0\ntick 1\n"), r

    r = cli("launch", "no_such_image", *tgt)
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr, r


def test_cli_clients_with_a_token(secure, tmp_path):
    t, _, _, iid = secure
    tgt = ["--target", t.target]
    r = cli("ps", *tgt)
    assert r.returncode == 2 and "UNAUTHENTICATED" in r.stderr, r
    (tmp_path / "tok").write_text(TOKEN + "\n")
    r = cli("ps", *tgt, "--token-file", str(tmp_path / "tok"))
    assert r.returncode == 0 and iid in r.stdout, r
    r = cli("wait", iid, *tgt, env={"UNIFORK_TOKEN": TOKEN})
    assert r.returncode == 0 and f"{iid}: exited" in r.stderr, r

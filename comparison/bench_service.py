"""The tender as a service: launch-to-exit latency and throughput, thread vs VM-clone fork.

Not a test.  Starts a local tender (``unifork serve`` on free loopback ports,
a warm pool of 2), then, for small instances (``hello``) in thread and
vmclone mode:

* latency: Launch + Wait of one instance at a time, from the client's side
  (``time.perf_counter`` around both RPCs); thread and vmclone runs are
  interleaved so that a noisy spell hits both;
* throughput: 4 client threads (``--clients``) each launching and waiting
  for instances back to back for a bounded time (``--seconds``, and at most
  ``--max-instances`` per mode); instances that completed with exit 0 per
  second of wall time, and every failure counted by gRPC status code (or
  ``outcome=...`` for an instance that did not exit 0);
* the fork itself, warm: ``fork_time -n 100`` inside an instance of each
  mode, the median of the ``fork_us`` lines it prints except the first of
  each run (100, not 20: a fresh VM's forks 2-5 still warm up, and 20 forks
  let them pull the median), so the VM-clone fork to the local pool is compared with the
  thread fork in the same guest program; the first fork of each run is not
  dropped but shown as its own figure ("first of loop");
* the fork itself, cold: ``fork_time`` with no arguments (the thesis's
  listing 4.1: one fork, ``gettimeofday`` around it), one instance per run
  (5 quick / 10 runs), the parent's ``fork took``: the first fork in a fresh
  VM, as every user of the listing sees it; median next to the warm one.

Prints a table and the ratio vmclone/thread; ``--json FILE`` also writes the
raw samples.  ``--quick`` finishes in well under 60 s.

``--compare-jail`` measures what the jail of VM processes costs
(tender_service/instance/jail.py): a second tender with ``--no-jail`` runs
beside the first, every measurement is made on both in the same run (the
latency runs interleaved across all four), and the table gains the ratios
jailed/unjailed.

Run: ``python -m comparison.bench_service [--quick] [--compare-jail] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from comparison.progress import ProgressBar
from comparison.report import grid
from comparison.stats import median, percentile
from comparison.workloads import OutputError, parent_fork_us
from tender_service import protos
from tender_service.service.client import Client

ROOT = Path(__file__).resolve().parents[1]
RPC_TIMEOUT = 120.0
START_TIMEOUT = 90.0
HELLO = b"Hello, unikernel!\n"


class BenchError(RuntimeError):
    """The tender could not be started or a run went wrong: no meaningful figure."""


# -- a local tender ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTender:
    """``unifork serve`` as a subprocess; ``stop()`` sends SIGTERM and returns its exit status."""

    def __init__(self, pool: int, max_instances: int, extra: Sequence[str] = ()) -> None:
        self.port, self.peer_port = free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="unifork-bench-service-"))
        self.log_path = self.dir / "tender.log"
        script = Path(sys.executable).parent / "unifork"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "unifork"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *cmd,
                    "serve",
                    "--listen",
                    self.target,
                    "--pool",
                    str(pool),
                    "--max-instances",
                    str(max_instances),
                    "--metrics-port",
                    str(free_port()),
                    *extra,
                    "--peer-listen",
                    f"127.0.0.1:{self.peer_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        try:
            self._wait_serving()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"the tender exited with {self.proc.returncode}:\n{self.log()}"
                    )
                try:
                    # the stubs declare no methods on HealthStub: its Check is generated
                    if (
                        stub.Check(  # type: ignore[attr-defined]
                            health_pb2.HealthCheckRequest(), timeout=2
                        ).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"the tender did not serve within {START_TIMEOUT:g} s")
                time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- one instance --------------------------------------------------------------------------------
def mode_fields(pb2, mode: str) -> dict:
    if mode == "thread":
        return dict(fork_mode=pb2.FORK_MODE_THREAD)
    return dict(fork_mode=pb2.FORK_MODE_VMCLONE, pipe_transport=pb2.PIPE_TRANSPORT_SHM)


def run_instance(
    c: Client, mode: str, image: str = "hello", args: Sequence[str] = (), console: bool = False
) -> tuple[float, str, bytes]:
    """Launch + Wait; (seconds, "ok" or what went wrong, stdout if asked for)."""
    pb2 = c.pb2
    t0 = time.perf_counter()
    try:
        iid = c.stub.Launch(
            pb2.LaunchRequest(
                image=image,
                args=list(args),
                console_pipe=True,
                time_limit_seconds=60.0,
                **mode_fields(pb2, mode),
            ),
            metadata=c.md,
            timeout=RPC_TIMEOUT,
        ).instance_id
        r = c.stub.Wait(pb2.WaitRequest(instance_id=iid), metadata=c.md, timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        return time.perf_counter() - t0, e.code().name, b""
    seconds = time.perf_counter() - t0
    if not r.done or r.outcome != "exited" or r.exit_code != 0:
        return seconds, f"outcome={r.outcome or 'running'}/{r.exit_code}", b""
    out = b""
    if console:
        out = b"".join(ch.data for ch in c.logs(iid) if ch.fd == 1)
    return seconds, "ok", out


# -- statistics ----------------------------------------------------------------------------------
def p99(xs: Sequence[float]) -> float | None:
    return percentile(xs, 99)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class ModeResult:
    mode: str
    target: str = ""  # the tender that runs it
    label: str = ""  # its row in the table (the mode, and "no jail" for the unjailed tender)
    latencies: list[float] = field(default_factory=list)  # seconds
    latency_errors: Counter = field(default_factory=Counter)
    completed: int = 0
    elapsed: float = 0.0
    tp_errors: Counter = field(default_factory=Counter)
    fork_us: list[float] = field(default_factory=list)  # warm: all but each run's first
    first_fork_us: list[float] = field(default_factory=list)  # the first fork of each loop run
    cold_fork_us: list[float] = field(default_factory=list)  # listing 4.1, one per instance

    @property
    def throughput(self) -> float | None:
        return self.completed / self.elapsed if self.elapsed else None

    @property
    def errors(self) -> Counter:
        return self.latency_errors + self.tp_errors


# -- the measurements ----------------------------------------------------------------------------
def measure_latency(
    clients: dict[str, Client], results: dict[str, ModeResult], runs: int, warmup: int
) -> None:
    rows = list(results.values())
    for i in range(warmup + runs):
        for res in rows if i % 2 == 0 else reversed(rows):  # interleaved, alternating order
            seconds, status, out = run_instance(clients[res.target], res.mode, console=i < warmup)
            if i < warmup:
                if status != "ok" or out != HELLO:
                    raise BenchError(f"warm-up {res.label} hello: {status}, stdout {out!r}")
                continue
            if status == "ok":
                res.latencies.append(seconds)
            else:
                res.latency_errors[status] += 1


def measure_throughput(
    target: str, res: ModeResult, clients: int, seconds: float, cap: int
) -> None:
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    started = [0]
    done: Counter[str] = Counter()
    start = threading.Barrier(clients + 1)

    def worker() -> None:
        c = Client(target)
        try:
            start.wait()
            while time.perf_counter() < stop_at:
                with lock:
                    if started[0] >= cap:
                        return
                    started[0] += 1
                _, status, _ = run_instance(c, res.mode)
                with lock:
                    done[status] += 1
        finally:
            c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    for t in threads:
        t.join(seconds + 2 * RPC_TIMEOUT)
    res.elapsed = time.perf_counter() - t0
    res.completed = done.pop("ok", 0)
    res.tp_errors.update(done)


#: forks per warm-fork run (``fork_time -n``)
FORK_LOOP = 100


def measure_fork(c: Client, res: ModeResult, runs: int, forks: int = FORK_LOOP) -> None:
    for _ in range(runs):
        _, status, out = run_instance(c, res.mode, "fork_time", ["-n", str(forks)], console=True)
        if status != "ok":
            raise BenchError(f"fork_time -n {forks} ({res.mode}): {status}")
        us = [float(x) for x in re.findall(rb"^fork_us=([0-9.]+)$", out, re.M)]
        if len(us) != forks or not re.search(rb"^fork_summary .* ok=1$", out, re.M):
            raise BenchError(f"fork_time -n {forks} ({res.mode}) printed {out[-300:]!r}")
        res.fork_us += us[1:]  # warm: the first fork of a run is a cold one,
        res.first_fork_us.append(us[0])  # kept and shown as its own figure


def measure_cold_fork(c: Client, res: ModeResult, runs: int) -> None:
    """The thesis's listing 4.1 through the tender: one fork per fresh instance."""
    for _ in range(runs):
        _, status, out = run_instance(c, res.mode, "fork_time", [], console=True)
        if status != "ok":
            raise BenchError(f"fork_time ({res.mode}): {status}")
        try:
            res.cold_fork_us.append(parent_fork_us(out.decode(errors="replace")))
        except OutputError as e:
            raise BenchError(f"fork_time ({res.mode}): {e}") from None


def jail_cost_rows(results: dict[str, ModeResult]) -> list[list[str]]:
    """jailed/unjailed per mode, when the run had an unjailed tender too."""
    rows = []
    for mode in ("thread", "vmclone"):
        j, n = results.get(mode), results.get(f"{mode}, no jail")
        if j is None or n is None:
            continue
        rows.append(
            [
                f"{mode}: jail/no jail",
                fmt_ratio(ratio(median(j.latencies), median(n.latencies)), 2),
                fmt_ratio(ratio(p99(j.latencies), p99(n.latencies)), 2),
                "",
                fmt_ratio(ratio(j.throughput, n.throughput), 2),
                fmt_ratio(ratio(median(j.fork_us), median(n.fork_us)), 2),
                fmt_ratio(ratio(median(j.first_fork_us), median(n.first_fork_us)), 2),
                fmt_ratio(ratio(median(j.cold_fork_us), median(n.cold_fork_us)), 2),
                "",
                "",
            ]
        )
    return rows


# -- output --------------------------------------------------------------------------------------
def fmt(v: float | None, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}{unit}"


def fmt_ratio(r: float | None, digits: int = 1) -> str:
    return "-" if r is None else f"{r:.{digits}f}x"


def fmt_errors(errors: Counter) -> str:
    return ", ".join(f"{k}: {n}" for k, n in sorted(errors.items())) or "none"


def table(results: dict[str, ModeResult], clients: int) -> str:
    t, v = results["thread"], results["vmclone"]
    head = [
        "",
        "launch→exit median",
        "p99",
        "n",
        f"throughput ({clients} clients)",
        "fork warm median",
        "first of loop",
        "cold fork (listing 4.1)",
        "cold/warm",
        "errors",
    ]
    rows = []
    for r in results.values():
        rows.append(
            [
                r.label,
                fmt(median(r.latencies), 1e3, " ms"),
                fmt(p99(r.latencies), 1e3, " ms"),
                str(len(r.latencies)),
                fmt(r.throughput, unit=" inst/s", digits=1)
                + f" ({r.completed} in {r.elapsed:.1f} s)",
                fmt(median(r.fork_us), 1, " µs", 1) + f" (n={len(r.fork_us)})",
                fmt(median(r.first_fork_us), 1, " µs", 1) + f" (n={len(r.first_fork_us)})",
                fmt(median(r.cold_fork_us), 1, " µs", 1) + f" (n={len(r.cold_fork_us)})",
                fmt_ratio(ratio(median(r.cold_fork_us), median(r.fork_us))),
                fmt_errors(r.errors),
            ]
        )
    rows.append(
        [
            "vmclone/thread",
            fmt_ratio(ratio(median(v.latencies), median(t.latencies))),
            fmt_ratio(ratio(p99(v.latencies), p99(t.latencies))),
            "",
            fmt_ratio(ratio(v.throughput, t.throughput)),
            fmt_ratio(ratio(median(v.fork_us), median(t.fork_us))),
            fmt_ratio(ratio(median(v.first_fork_us), median(t.first_fork_us))),
            fmt_ratio(ratio(median(v.cold_fork_us), median(t.cold_fork_us))),
            "",
            "",
        ]
    )
    rows += jail_cost_rows(results)
    return "\n".join(grid(head, rows, set()))


def measure_each_row(
    bar: ProgressBar,
    clients: dict[str, Client],
    results: dict[str, ModeResult],
    nclients: int,
    seconds: float,
    max_instances: int,
    fork_runs: int,
    cold_runs: int,
) -> None:
    """Throughput, then fork latency, then cold fork, each over every row in turn."""
    for res in results.values():
        bar.step(f"throughput: {res.label}, {nclients} clients, {seconds:g} s")
        measure_throughput(res.target, res, nclients, seconds, max_instances)
        bar.advance()
    for res in results.values():
        bar.step(f"fork latency: fork_time -n {FORK_LOOP} in a {res.label} instance")
        measure_fork(clients[res.target], res, fork_runs)
        bar.advance()
    for res in results.values():
        bar.step(f"cold fork: fork_time (one fork) in {cold_runs} fresh {res.label} instances")
        measure_cold_fork(clients[res.target], res, cold_runs)
        bar.advance()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m comparison.bench_service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer runs, shorter throughput windows")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--seconds", type=float, help="throughput window per mode (default 5, quick 3)")
    p.add_argument(
        "--max-instances",
        type=int,
        default=2000,
        help="bound on the instances launched per throughput window",
    )
    p.add_argument("--json", help="also write the raw samples to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--compare-jail",
        action="store_true",
        help="also measure a tender with --no-jail, in the same run",
    )
    a = p.parse_args(argv)
    runs, warmup = (20, 3) if a.quick else (100, 5)
    seconds = a.seconds or (3.0 if a.quick else 5.0)
    fork_runs = 1 if a.quick else 3
    cold_runs = 5 if a.quick else 10

    modes = ("thread", "vmclone")
    rows = len(modes) * (2 if a.compare_jail else 1)
    # steps: the tenders, the latency runs, then throughput, fork and cold fork per row
    bar = ProgressBar(2 + 3 * rows, enabled=not a.quiet)
    protos.ensure()
    kinds = {"": ()} | ({", no jail": ("--no-jail",)} if a.compare_jail else {})
    bar.step(f"starting {len(kinds)} tender(s) (pool of 2)")
    tenders: dict[str, LocalTender] = {}
    results: dict[str, ModeResult] = {}
    clients: dict[str, Client] = {}
    code = 0
    try:
        for suffix, extra in kinds.items():
            t = tenders[suffix] = LocalTender(
                pool=2, max_instances=max(64, 2 * a.clients), extra=extra
            )
            clients[t.target] = Client(t.target)
            for m in modes:
                results[m + suffix] = ModeResult(m, t.target, m + suffix)
        bar.advance()
        bar.step(f"latency: {runs} Launch+Wait of hello per row, interleaved")
        measure_latency(clients, results, runs, warmup)
        bar.advance()
        measure_each_row(
            bar, clients, results, a.clients, seconds, a.max_instances, fork_runs, cold_runs
        )
    except BenchError as e:
        bar.close()
        print(f"bench_service: {e}", file=sys.stderr)
        code = 1
    finally:
        for c in clients.values():
            c.close()
        stopped = [(tender, tender.stop()) for tender in tenders.values()]
        if code == 0:
            bar.finish()
        for tender, status in stopped:
            if status != 0:
                print(
                    f"bench_service: the tender exited {status} on SIGTERM:\n{tender.log()}",
                    file=sys.stderr,
                )
                code = code or 1
    if code == 0:
        print(
            f"unifork tender service, hello instances; {platform.machine()}, "
            f"{os.cpu_count()} CPUs, pool of 2 warm tender processes"
        )
        print(table(results, a.clients))
        print(
            f"fork warm: fork_time -n {FORK_LOOP}, all forks but the first of each run; "
            "first of loop: "
            "those first forks (excluded from warm); cold: fork_time with no arguments, the "
            f"parent's 'fork took' (gettimeofday), {cold_runs} separate instances; nothing "
            "else discarded but the hello warm-up instances of the latency runs"
        )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "clients": a.clients,
                    "seconds": seconds,
                    "quick": a.quick,
                    "modes": {
                        m: dict(
                            latencies_s=r.latencies,
                            completed=r.completed,
                            elapsed_s=r.elapsed,
                            errors=dict(r.errors),
                            fork_us=r.fork_us,
                            first_fork_us=r.first_fork_us,
                            cold_fork_us=r.cold_fork_us,
                            fork_median_us=median(r.fork_us),
                            cold_fork_median_us=median(r.cold_fork_us),
                            cold_over_warm=ratio(median(r.cold_fork_us), median(r.fork_us)),
                        )
                        for m, r in results.items()
                    },
                },
                indent=1,
            )
        )
    return code


if __name__ == "__main__":
    sys.exit(main())

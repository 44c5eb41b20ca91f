"""``unifork load``: launch instances on a tender at a fixed concurrency (grpc.aio).

``--concurrency C`` coroutines each launch an instance (``Launch``), wait for
its end (``Wait``) and launch the next, until ``--duration S`` seconds have
passed or ``--max-instances N`` have been launched.  ``--target`` may be
given several times: launches go round the tenders in turn; ``--fork mixed``
launches thread, copy and VM-clone instances in turn.  In-flight instances
then get at most ``--wait-timeout`` more seconds; any still running are
killed and counted as failed (``DEADLINE_EXCEEDED``).  So a run is bounded in
count and in time whatever the tender does.

Figures: launched = succeeded + failed; succeeded means the instance exited
with status 0; throughput is succeeded instances per second over the whole
run; latency is launch to exit (from just before ``Launch`` to ``Wait``'s
answer) of the succeeded instances.  Errors are counted by gRPC status code
(``RESOURCE_EXHAUSTED`` when the tender is full, ...) or, for instances that
ran but did not exit 0, by ``instance:<outcome>`` (``instance:exit_1``,
``instance:timeout``, ...).

Every accepted launch is accounted for: ``accepted`` counts the instance ids
the tenders gave (per target in ``accepted_by_target``), ``answered`` the
final answers received, ``duplicate_ids`` ids given twice and
``duplicate_answers`` ids answered twice (both must be 0: each instance's
result arrives exactly once), ``unanswered`` accepted ids whose end was
never seen (killed past the deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT = 30.0  # seconds for Launch and Kill
# A refused launch is not retried (no tenacity, no gRPC retry policy): it is a measured
# failure, counted by status code, and launched == succeeded + failed holds only if every
# attempt counts once.  The coroutine then pauses a fixed BACKOFF so an overloaded tender
# is not hammered, and launches the next instance; a growing (exponential) pause would make
# the offered load depend on past refusals, and the figures would measure the client.
BACKOFF = 0.05  # seconds a coroutine waits after a refused launch
MAX_FAILURES = 20  # failed instances whose console is kept


FORKS = ("thread", "vmclone", "copy", "mixed")
#: the modes ``--fork mixed`` launches in turn
MIXED = ("thread", "copy", "vmclone")
PLACEMENTS = ("local", "remote", "spread")


@dataclass
class LoadConfig:
    targets: list[str]
    image: str = "hello"
    fork: str = "thread"  # or vmclone, copy, or mixed (thread, copy and vmclone in turn)
    pipe: str = "shm"
    placement: str = "local"  # of VM-clone children
    args: list[str] = field(default_factory=list)
    concurrency: int = 4
    duration: float = 10.0
    max_instances: int = 10_000
    wait_timeout: float = 60.0
    token: str | None = None
    tls_ca: str | None = None


@dataclass
class LoadResult:
    target: str  # the targets, comma-separated
    image: str
    fork: str
    concurrency: int
    duration_s: float  # the launch window asked for
    elapsed_s: float  # first launch to last answer
    launched: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    accepted_by_target: dict[str, int] = field(default_factory=dict)
    answered: int = 0
    duplicate_ids: int = 0
    duplicate_answers: int = 0
    unanswered: int = 0
    succeeded_by_fork: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # the first few, with their console
    latencies_ms: list[float] = field(default_factory=list)  # succeeded instances
    throughput_per_s: float | None = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    stopped_by: str = "duration"  # what ended the launching: duration | max_instances

    def summarize(self) -> None:
        from comparison.report import sig
        from comparison.stats import median, percentile

        xs = sorted(self.latencies_ms)
        self.throughput_per_s = sig(self.succeeded / self.elapsed_s) if self.elapsed_s > 0 else 0.0
        if xs:
            self.p50_ms = sig(median(xs))
            self.p95_ms = sig(percentile(xs, 95))
            self.p99_ms = sig(percentile(xs, 99))
            self.min_ms, self.max_ms = sig(xs[0]), sig(xs[-1])


class _Load:
    def __init__(self, cfg: LoadConfig) -> None:
        from tender_service import protos
        from tender_service.service.auth import call_metadata

        self.cfg = cfg
        self.pb2, self.grpc_mod = protos.tender()
        self.md = call_metadata(cfg.token)
        self.launched = 0
        self.succeeded = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.live: set[str] = set()
        self.last_answer = 0.0
        self.ids: Counter[str] = Counter()  # instance id -> times a tender gave it
        self.answers: Counter[str] = Counter()  # instance id -> final answers seen
        self.by_target: Counter[str] = Counter()
        self.ok_by_fork: Counter[str] = Counter()
        self.failures: list[dict] = []

    def _fail(self, key: str) -> None:
        self.failed += 1
        self.errors[key] += 1

    def _request(self, fork: str):
        pb2 = self.pb2
        return pb2.LaunchRequest(
            image=self.cfg.image,
            args=list(self.cfg.args),
            fork_mode=pb2.ForkMode.Value(f"FORK_MODE_{fork.upper()}"),
            pipe_transport=pb2.PIPE_TRANSPORT_TCP
            if self.cfg.pipe == "tcp"
            else pb2.PIPE_TRANSPORT_SHM,
            placement=pb2.Placement.Value(  # only VM-clone instances place VMs elsewhere
                f"PLACEMENT_{self.cfg.placement.upper() if fork == 'vmclone' else 'LOCAL'}"
            ),
            time_limit_seconds=self.cfg.wait_timeout,
            console_pipe=True,
        )

    def _next(self) -> tuple[str, str]:
        """(target, fork mode) of the next launch: round the targets, alternating modes."""
        n = self.launched
        fork = self.cfg.fork if self.cfg.fork != "mixed" else MIXED[n % len(MIXED)]
        return self.cfg.targets[n % len(self.cfg.targets)], fork

    async def worker(self, stubs: dict, launch_until: float, hard_deadline: float) -> None:
        while time.monotonic() < launch_until and self.launched < self.cfg.max_instances:
            target, fork = self._next()
            stub = stubs[target]
            self.launched += 1
            t0 = time.perf_counter()
            try:
                iid = (
                    await stub.Launch(self._request(fork), metadata=self.md, timeout=RPC_TIMEOUT)
                ).instance_id
            except grpc.aio.AioRpcError as e:
                self._fail(e.code().name)
                self.last_answer = time.perf_counter()
                log.debug("launch refused: %s %s", e.code().name, e.details())
                await asyncio.sleep(BACKOFF)
                continue
            self.ids[iid] += 1
            self.by_target[target] += 1
            self.live.add(iid)
            left = max(0.1, min(self.cfg.wait_timeout, hard_deadline - time.monotonic()))
            try:
                r = await stub.Wait(
                    self.pb2.WaitRequest(instance_id=iid), metadata=self.md, timeout=left
                )
            except grpc.aio.AioRpcError as e:
                self._fail(e.code().name)
                self.last_answer = time.perf_counter()
                await self._kill(stub, iid)
                continue
            self.last_answer = time.perf_counter()
            self.live.discard(iid)
            if not r.done:
                self._fail("DEADLINE_EXCEEDED")
                await self._kill(stub, iid)
                continue
            self.answers[iid] += 1
            if r.outcome == "exited" and r.exit_code == 0:
                self.succeeded += 1
                self.ok_by_fork[fork] += 1
                self.latencies.append((self.last_answer - t0) * 1e3)
            else:
                self._fail(
                    f"instance:{r.outcome if r.outcome != 'exited' else f'exit_{r.exit_code}'}"
                )
                await self._record_failure(stub, target, fork, iid, r)

    async def _record_failure(self, stub, target: str, fork: str, iid: str, r) -> None:
        """Keep what a failed instance printed (the first MAX_FAILURES of them)."""
        if len(self.failures) >= MAX_FAILURES:
            return
        entry = {
            "id": iid,
            "target": target,
            "fork": fork,
            "outcome": r.outcome,
            "exit_code": r.exit_code,
            "reports": list(r.reports),
            "console": "",
        }
        self.failures.append(entry)
        log.warning(
            "instance %s on %s (%s fork) ended %s %d: %s",
            iid,
            target,
            fork,
            r.outcome,
            r.exit_code,
            "; ".join(r.reports),
        )
        text = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for c in stub.StreamConsole(
                self.pb2.ConsoleRequest(instance_id=iid, from_start=True),
                metadata=self.md,
                timeout=RPC_TIMEOUT,
            ):
                text.append(f"[{c.pid}:{c.fd}] {c.data.decode(errors='replace')}")
        entry["console"] = "".join(text)[-4000:]

    async def _kill(self, stub, iid: str) -> None:
        self.live.discard(iid)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Kill(
                self.pb2.KillRequest(instance_id=iid), metadata=self.md, timeout=RPC_TIMEOUT
            )

    def _channel(self, target: str):
        if self.cfg.tls_ca:
            creds = grpc.ssl_channel_credentials(Path(self.cfg.tls_ca).read_bytes())
            return grpc.aio.secure_channel(target, creds)
        return grpc.aio.insecure_channel(target)

    async def run(self) -> LoadResult:
        cfg = self.cfg
        channels = {t: self._channel(t) for t in dict.fromkeys(cfg.targets)}
        try:
            stubs = {t: self.grpc_mod.TenderStub(ch) for t, ch in channels.items()}
            t0 = time.perf_counter()
            launch_until = time.monotonic() + cfg.duration
            hard_deadline = launch_until + cfg.wait_timeout
            tasks = [
                asyncio.create_task(self.worker(stubs, launch_until, hard_deadline))
                for _ in range(cfg.concurrency)
            ]
            done, pending = await asyncio.wait(tasks, timeout=cfg.duration + cfg.wait_timeout + 5)
            for t in pending:  # a coroutine stuck past every deadline (should not happen)
                t.cancel()
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
            for iid in list(self.live):  # cancelled in flight: end them, count them
                self._fail("DEADLINE_EXCEEDED")
                for stub in stubs.values():  # the id is known to one tender only
                    await self._kill(stub, iid)
            end = self.last_answer or time.perf_counter()
        finally:
            for ch in channels.values():
                await ch.close()
        res = LoadResult(
            ",".join(cfg.targets),
            cfg.image,
            cfg.fork,
            cfg.concurrency,
            cfg.duration,
            round(max(1e-9, end - t0), 6),
            self.launched,
            self.succeeded,
            self.failed,
            dict(sorted(self.errors.items())),
            accepted=sum(self.ids.values()),
            accepted_by_target=dict(sorted(self.by_target.items())),
            answered=sum(self.answers.values()),
            duplicate_ids=sum(1 for n in self.ids.values() if n > 1),
            duplicate_answers=sum(1 for n in self.answers.values() if n > 1),
            unanswered=sum(1 for i in self.ids if not self.answers[i]),
            succeeded_by_fork=dict(sorted(self.ok_by_fork.items())),
            failures=self.failures,
            latencies_ms=[round(x, 3) for x in self.latencies],
            stopped_by="max_instances" if self.launched >= cfg.max_instances else "duration",
        )
        res.summarize()
        return res


def run_load(cfg: LoadConfig) -> LoadResult:
    """Run the load and return its figures (``launched == succeeded + failed``)."""
    log.info(
        "load on %s: %s (%s fork), concurrency %d for %g s",
        ", ".join(cfg.targets),
        cfg.image,
        cfg.fork,
        cfg.concurrency,
        cfg.duration,
    )
    return asyncio.run(_Load(cfg).run())


def render(r: LoadResult) -> str:
    from comparison.report import num

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{num(x)} ms"

    errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"
    return "\n".join(
        [
            f"load on {r.target}: image {r.image}, {r.fork} fork, concurrency {r.concurrency}, "
            f"launching for {r.duration_s:g} s",
            f"launched {r.launched}  succeeded {r.succeeded}  failed {r.failed}  "
            f"in {r.elapsed_s:.2f} s (launching stopped by {r.stopped_by.replace('_', '-')})",
            f"throughput {num(r.throughput_per_s)} instances/s",
            f"launch-to-exit latency: p50 {ms(r.p50_ms)}  p95 {ms(r.p95_ms)}  p99 {ms(r.p99_ms)}  "
            f"(min {ms(r.min_ms)}, max {ms(r.max_ms)})",
            f"errors by status code: {errors}",
            f"accepted {r.accepted}  answered {r.answered}  duplicate ids {r.duplicate_ids}  "
            f"answered twice {r.duplicate_answers}  unanswered {r.unanswered}",
        ]
    )


@dataclass
class Result:
    result: LoadResult
    text: str
    exit_code: int


def load_from_args(a) -> Result:
    """``unifork load`` as parsed by ``options.add_load_arguments``."""
    from tender_service.service.auth import read_token

    token = read_token(a.token_file) if a.token_file else os.environ.get("UNIFORK_TOKEN")
    default = os.environ.get("UNIFORK_TARGET", "127.0.0.1:7700")
    cfg = LoadConfig(
        list(a.target or [default]),
        a.image,
        a.fork,
        a.pipe,
        a.placement,
        list(a.args),
        a.concurrency,
        a.duration,
        a.max_instances,
        a.wait_timeout,
        token,
        a.tls_ca,
    )
    r = run_load(cfg)
    if a.json:
        Path(a.json).write_text(json.dumps(asdict(r), indent=1) + "\n")
        log.info("wrote %s", a.json)
    sound = r.duplicate_ids == r.duplicate_answers == 0
    return Result(r, render(r), 0 if r.failed == 0 and r.launched > 0 and sound else 1)

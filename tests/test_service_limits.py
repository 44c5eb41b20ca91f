"""The tender's gRPC server under hostile callers (issue 12): long-lived calls cannot
starve short ones, made-up method names do not grow ``/metrics``, undecodable bytes
are INVALID_ARGUMENT; and an emulator crash has a counter of its own.

Real ``unifork serve`` subprocesses on loopback, as in test_service.py.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import wait_until
from test_service import (
    GUEST,
    MODES,
    RPC_TIMEOUT,
    TICKER_C,
    Tender,
    launch,
    metric,
    pb2,
    rpc_error,
    stopped_cleanly,
    wait,
    wait_for_output,
)

from tender_service import protos
from tender_service.toolchain.cc import compile_guest
from tender_service.toolchain.images import build_image

_tender_grpc = protos.tender()[1]
TOKEN = "limits-token-0123456789abcdef"
STREAMS = 1000  # idle long-lived calls held open at once: half Health.Watch, half Wait
PER_PEER = STREAMS // 2  # the limit per peer of each budget (Health.Watch, the API)
SHORT_DEADLINE = 5.0  # what a short call gets while they are open
GARBAGE = b"\x0a\xff\xff\xff"  # field 1, length-delimited, with a truncated length


def thread_names(pid: int) -> list[str]:
    """The threads of ``pid`` by name (/proc comm; Python's threads carry the process's)."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
    return sorted(names)


def threads(pid: int) -> int:
    """The tender's threads but gRPC core's EventEngine pool ("event_engine"), which gRPC
    sizes itself, growing it under a burst of calls and retiring threads on its own
    schedule.  (The clean-clone CI once saw the whole count one over, a minute after
    1,000 calls ended; which thread it was went unrecorded: the wait now names them.)"""
    return sum(1 for name in thread_names(pid) if name != "event_engine")


def streams_open(t: Tender) -> float:
    return metric(t.metrics(), "unifork_grpc_streams_open")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A tender with a token whose per-peer limits are ``PER_PEER``."""
    t = Tender.start(
        tmp_path_factory.mktemp("limits"),
        "--pool",
        "1",
        "--max-streams-per-peer",
        str(PER_PEER),
        token=TOKEN,
    )
    yield t
    stopped_cleanly(t)


@pytest.fixture(scope="module")
def gclient(guarded):
    c = guarded.client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def gticker(gclient, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ticker")
    (d / "ticker.c").write_text(TICKER_C)
    compile_guest([d / "ticker.c"], d / "ticker.elf", ["-Wall", "-Werror"])
    return gclient.upload("ticker", (d / "ticker.elf").read_bytes()).name


def test_idle_streams_do_not_starve_short_calls(guarded, gclient, gticker):
    """1,000 open Health.Watch (no token needed) and Wait calls: the sync server's 64
    threads were all taken by 64 of them, and Health.Check timed out.  Now Check and an
    authenticated short call still answer; the watchers, at their limit, did not take
    the slots of the waiters; the next long-lived call of either kind from the same peer
    is refused with RESOURCE_EXHAUSTED naming the limit; and once the calls are
    cancelled the tender is back to the threads it had."""
    t, pid = guarded, guarded.proc.pid
    running = launch(gclient, gticker, ["1000000"], console_pipe=True, time_limit_seconds=600)
    wait_for_output(gclient, running, b"tick 1\n")
    gclient.images()
    baseline = threads(pid)
    watch_ch, wait_ch = grpc.insecure_channel(t.target), grpc.insecure_channel(t.target)
    calls = []
    try:
        health = health_pb2_grpc.HealthStub(watch_ch)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
            for _ in range(STREAMS // 2)
        ]
        calls += watches
        tender = _tender_grpc.TenderStub(wait_ch)
        for w in watches:  # every watcher is attached and has its first answer
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
        calls += [
            tender.Wait.future(
                pb2.WaitRequest(instance_id=running), metadata=t.md, timeout=RPC_TIMEOUT
            )
            for _ in range(STREAMS // 2)
        ]
        wait_until(
            lambda: streams_open(t) == STREAMS, 60, f"{STREAMS} calls to be open", interval=0.2
        )

        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=SHORT_DEADLINE)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        images = tender.ListImages(pb2.ListImagesRequest(), metadata=t.md, timeout=SHORT_DEADLINE)
        assert gticker in {i.name for i in images.images}
        # the idle calls hold no thread of the tender
        assert threads(pid) < baseline + 16, (baseline, threads(pid))

        for more in (
            lambda: next(health.Watch(health_pb2.HealthCheckRequest(), timeout=SHORT_DEADLINE)),
            lambda: tender.Wait(
                pb2.WaitRequest(instance_id=running), metadata=t.md, timeout=SHORT_DEADLINE
            ),
        ):
            e = rpc_error(more)
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
            assert f"has {PER_PEER} long-lived" in e.details(), e.details()
            assert "limit per peer" in e.details(), e.details()
    finally:
        for c in calls:
            c.cancel()
        watch_ch.close()
        wait_ch.close()
    wait_until(lambda: streams_open(t) == 0, 60, "the cancelled calls to end", interval=0.2)
    wait_until(
        lambda: threads(pid) <= baseline,
        60,
        f"thread count back to {baseline}",
        interval=0.2,
        detail=lambda: f"{threads(pid)} threads: {thread_names(pid)}",
    )
    assert gclient.kill(running) is True
    assert wait(gclient, running).outcome == "killed"
    assert t.proc.poll() is None


def _series(t: Tender) -> set[tuple[str, frozenset]]:
    return set(t.metrics())


def test_made_up_methods_add_one_unknown_series(guarded):
    """500 calls to made-up method names (half with the token, half without) used to add
    1,000 lines to /metrics.  Now their names are no label: the only series they add are
    the ``unknown`` ones, whose number does not grow with the calls."""
    t = guarded
    names = [
        f"/unifork.v1.Tender/Made{i}Up" if i % 3 else f"/x{i}.Evil/Method{i}" for i in range(500)
    ]

    def call(i: int, name: str) -> grpc.RpcError:
        md = t.md if i % 2 else []
        with grpc.insecure_channel(t.target) as ch:
            return rpc_error(lambda: ch.unary_unary(name)(b"", metadata=md, timeout=RPC_TIMEOUT))

    # one call of each kind first: the unknown series exist before the 500
    for i in (0, 1):
        call(i, "/warm.Up/Call")
    before_m = t.metrics()
    before = set(before_m)
    with grpc.insecure_channel(t.target) as ch:
        for i, name in enumerate(names):
            md = t.md if i % 2 else []
            e = rpc_error(
                lambda ch=ch, name=name, md=md: ch.unary_unary(name)(
                    b"", metadata=md, timeout=RPC_TIMEOUT
                )
            )
            want = grpc.StatusCode.UNIMPLEMENTED if md else grpc.StatusCode.UNAUTHENTICATED
            assert e.code() == want, (name, e.code(), e.details())
    after_m = t.metrics()
    new = set(after_m) - before
    assert new == set(), sorted(new)[:10]
    unknown = dict(grpc_type="unknown", grpc_service="unknown", grpc_method="unknown")
    for code in ("UNIMPLEMENTED", "UNAUTHENTICATED"):
        delta = metric(after_m, "grpc_server_handled_total", grpc_code=code, **unknown) - metric(
            before_m, "grpc_server_handled_total", grpc_code=code, **unknown
        )
        assert delta == 250, (code, delta)
    with_unknown = {(n, lab) for n, lab in set(after_m) if ("grpc_method", "unknown") in lab}
    # one series per metric and code: started, handled x 2 codes, the histogram's parts
    assert {n for n, _ in with_unknown} <= {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handling_seconds_count",
        "grpc_server_handling_seconds_sum",
        "grpc_server_started_created",
        "grpc_server_handled_created",
        "grpc_server_handling_seconds_created",
    }
    text = str(sorted(after_m))
    assert "Made" not in text and "Evil" not in text


def test_a_refusal_is_counted_before_its_caller_sees_it(guarded):
    """An async ``abort`` sends the status before it raises: counted in the handler's
    ``finally``, a caller that had its refusal could scrape ``/metrics`` without it (the
    clean-clone CI at 09baab2 did, once in the test above).  Each refusal here is
    scraped as soon as the caller has it."""
    t = guarded
    unknown = dict(grpc_type="unknown", grpc_service="unknown", grpc_method="unknown")

    def counted(code: str) -> float:
        return metric(t.metrics(), "grpc_server_handled_total", grpc_code=code, **unknown)

    with grpc.insecure_channel(t.target) as ch:
        for md, code in (
            (t.md, grpc.StatusCode.UNIMPLEMENTED),
            ([], grpc.StatusCode.UNAUTHENTICATED),
        ):
            seen = []
            for _ in range(50):
                before = counted(code.name)
                e = rpc_error(
                    lambda md=md: ch.unary_unary("/made.Up/Now")(
                        b"", metadata=md, timeout=RPC_TIMEOUT
                    )
                )
                assert e.code() == code, (e.code(), e.details())
                seen.append(counted(code.name) - before)
            assert seen == [1.0] * 50, (code, seen)


@pytest.mark.parametrize(
    "method, kind",
    [
        ("/unifork.v1.Tender/ListImages", "unary"),  # a sync handler
        ("/unifork.v1.Tender/Launch", "unary"),
        ("/unifork.v1.Tender/Wait", "unary"),  # a coroutine
        ("/unifork.v1.Tender/StreamConsole", "server_stream"),
        ("/unifork.v1.Tender/UploadImage", "client_stream"),
        ("/unifork.v1.Peer/StartVm", "client_stream"),  # a sync handler of a stream
        ("/grpc.health.v1.Health/Check", "unary"),
    ],
)
def test_undecodable_request_is_invalid_argument(guarded, method, kind):
    """Bytes that are no protobuf message were INTERNAL ("Exception deserializing
    request!"): the fault is the caller's, so INVALID_ARGUMENT, and nothing runs."""
    t = guarded
    peer = method.startswith("/unifork.v1.Peer/")  # the peer API has a listener of its own
    md = t.peer_md if peer else t.md
    with grpc.insecure_channel(t.peer_target if peer else t.target) as ch:

        def call():
            if kind == "unary":
                return ch.unary_unary(method)(GARBAGE, metadata=md, timeout=RPC_TIMEOUT)
            if kind == "server_stream":
                return list(ch.unary_stream(method)(GARBAGE, metadata=md, timeout=RPC_TIMEOUT))
            return ch.stream_unary(method)(iter([GARBAGE]), metadata=md, timeout=RPC_TIMEOUT)

        e = rpc_error(call)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert "not a valid message" in e.details()
    c = t.client()
    try:  # the tender carries on
        assert c.images()
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_emulator_crashes_are_counted(guarded, gclient, mode):
    """A guest fault is a guest matter; a VM process dying under the emulator
    (tests/guest/x87_block.c crashes Unicorn 2.1.4) counts in
    ``unifork_emulator_crashes_total{fork_mode}``, which an operator can alert on."""
    t = guarded
    label = "thread" if mode == "thread" else "vmclone"
    before = metric(t.metrics(), "unifork_emulator_crashes_total", fork_mode=label)
    segv = launch(gclient, "fault_segv", console_pipe=True, **MODES[mode])
    assert wait(gclient, segv).outcome == "signaled"
    x87 = gclient.upload("x87-block", build_image(GUEST / "x87_block.c").read_bytes()).name
    r = wait(gclient, launch(gclient, x87, console_pipe=True, **MODES[mode]))
    assert (r.outcome, r.signal) == ("signaled", 9), r
    wait_until(
        lambda: (
            metric(t.metrics(), "unifork_emulator_crashes_total", fork_mode=label) >= before + 1
        ),
        30,
        "the crash to be counted",
    )
    # exactly one: the guest's own SIGSEGV before it is no emulator crash
    assert metric(t.metrics(), "unifork_emulator_crashes_total", fork_mode=label) == before + 1
    later = launch(gclient, "hello", console_pipe=True, **MODES[mode])
    assert wait(gclient, later).outcome == "exited"


def test_latency_buckets_reach_a_microsecond(guarded, gclient):
    """Brokered pipe writes can take under 10 us, the lowest bucket was 10 us.  (Over
    shm the pipes are rings whose writes pass no supervisor: only tcp's are timed.)"""
    r = wait(
        gclient,
        launch(
            gclient, "token_ring", ["-n", "3", "-r", "5"], console_pipe=True, **MODES["vmclone-tcp"]
        ),
    )
    assert r.outcome == "exited", r
    m = guarded.metrics()
    for name in (
        "unifork_fork_latency_seconds_bucket",
        "unifork_pipe_write_latency_seconds_bucket",
    ):
        les = {dict(lab)["le"] for n, lab in m if n == name}
        assert {"1e-06", "2.5e-06", "5e-06", "1e-05"} <= les, (name, sorted(les))
    assert metric(m, "unifork_pipe_write_latency_seconds_count", transport="tcp") > 0

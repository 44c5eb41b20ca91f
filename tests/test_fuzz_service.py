"""Fuzzing the gRPC API of one real tender, and 1,000 launches at once.

* Hypothesis draws every request message of ``Tender`` and ``Peer`` (strings with
  NULs, huge ints, NaN/inf, enum values out of range, long repeated fields, random
  bytes, random chunk sequences) and sends it, with the token, to one tender
  subprocess.  Every call must end OK or with a clear status; UNKNOWN or INTERNAL
  means an exception escaped a handler.  Afterwards the tender is healthy and
  still runs ``hello`` to exit 0.
* A tender with ``--max-instances 64`` gets 1,000 launches of ``hello`` from 16
  threads: each one is OK or RESOURCE_EXHAUSTED, and every OK one exits 0.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import free_port, wait_until
from test_service import Tender, stopped_cleanly

from tender_service import protos
from tender_service.toolchain.images import build_image

pb2, tender_grpc = protos.tender()
ppb2, peer_grpc = protos.peer()

TOKEN = "fuzz-token-0123456789abcdef"
PEER_TOKEN = "fuzz-peer-token-0123456789abcdef"
CALL_TIMEOUT = 10.0  # every fuzzed call has a deadline: a hang is DEADLINE_EXCEEDED
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

U32, U64, I32 = (1 << 32) - 1, (1 << 64) - 1, 1 << 31
STATS: dict[str, Counter] = {}  # method -> status name -> count (printed at the end)
DETAILS: dict[tuple[str, str], set[str]] = {}  # other statuses: what they said


# -- strategies ----------------------------------------------------------------------------------
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("\0\n=/:.aZ9 \u00e9\U0001f600"), max_size=40),
    st.sampled_from(["", "\0", "hello\0", "hello\n", "..", "../etc/passwd", "a" * 65, "x" * 70000]),
)


def repeated(elem, most: int = 4000):
    """Short random lists, or one element repeated up to a few thousand times."""
    return st.one_of(
        st.lists(elem, max_size=8), st.builds(lambda e, n: [e] * n, elem, st.integers(0, most))
    )


def uint(maximum: int):
    return st.one_of(st.integers(0, maximum), st.sampled_from([0, 1, maximum, maximum // 2 + 1]))


def enum(values):
    return st.one_of(st.sampled_from(list(values)), st.integers(-I32, I32 - 1))


any_double = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            -1.0,
            -0.0,
            0.0,
            1e308,
            5e-324,
            86400.0,
            86400.0001,
        ]
    ),
)
short_limit = st.floats(min_value=0.001, max_value=2.0)


SANE_LAUNCH = dict(
    image="hello",
    args=[],
    env=[],
    fork_mode=pb2.FORK_MODE_THREAD,
    pipe_transport=pb2.PIPE_TRANSPORT_SHM,
    memory_bytes=16 << 20,
    time_limit_seconds=2.0,
    placement=pb2.PLACEMENT_LOCAL,
    max_procs=0,
    stack_bytes=0,
    console_pipe=True,
)
LAUNCH_FIELDS = {
    "image": st.one_of(st.sampled_from(["hello", "fork_time", "nope"]), nasty_text),
    "args": repeated(nasty_text),
    "env": repeated(st.one_of(nasty_text, st.sampled_from(["A=B", "=", "PATH=/x\0y"]))),
    "fork_mode": enum(pb2.ForkMode.values()),
    "pipe_transport": enum(pb2.PipeTransport.values()),
    "memory_bytes": st.one_of(uint(U64), st.sampled_from([1 << 20, 4 << 20, 64 << 20])),
    "time_limit_seconds": any_double,
    "placement": enum(pb2.Placement.values()),
    "max_procs": uint(U32),
    "stack_bytes": st.one_of(uint(U64), st.sampled_from([16 << 10, 256 << 10, 64 << 20])),
    "console_pipe": st.booleans(),
}


@st.composite
def launch_requests(draw):
    """Mostly sane requests with one to three fields fuzzed (all of them one time in ten)."""
    fields = dict(SANE_LAUNCH)
    if draw(st.integers(0, 9)) == 0:
        chosen = list(LAUNCH_FIELDS)
    else:
        chosen = draw(
            st.lists(st.sampled_from(sorted(LAUNCH_FIELDS)), min_size=1, max_size=3, unique=True)
        )
    for name in chosen:
        fields[name] = draw(LAUNCH_FIELDS[name])
    if "time_limit_seconds" not in chosen:  # never a long-running instance
        fields["time_limit_seconds"] = draw(short_limit)
    return pb2.LaunchRequest(**fields)


# -- the tender ----------------------------------------------------------------------------------
class Closer:
    """A TCP listener that accepts and closes at once: a supervisor that hangs up."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.sock.close()


class Api:
    def __init__(self, t: Tender) -> None:
        self.t = t
        self.ch = grpc.insecure_channel(
            t.target,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.tender = tender_grpc.TenderStub(self.ch)
        self.pch = grpc.insecure_channel(
            t.peer_target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.peer = peer_grpc.PeerStub(self.pch)  # the peer listener, with the peer token
        self.md, self.peer_md = t.md, t.peer_md
        self.ids: list[str] = []  # instances the fuzzers created (all finished)
        self.outcomes: Counter = Counter()
        self.reports: list[tuple[str, list[str]]] = []

    def call(self, method: str, fn):
        """Run one RPC; return its response (None on a clear error), record its status."""
        stats = STATS.setdefault(method, Counter())
        try:
            resp = fn()
        except grpc.RpcError as e:
            stats[e.code().name] += 1
            if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                DETAILS.setdefault((method, e.code().name), set()).add((e.details() or "")[:100])
            assert e.code() in CLEAR, f"{method}: {e.code().name}: {e.details()}"
            return None
        stats["OK"] += 1
        return resp

    def finish(self, iid: str) -> None:
        """Kill an instance a fuzzed launch made, and wait (bounded) until it has ended."""
        self.tender.Kill(pb2.KillRequest(instance_id=iid), metadata=self.md, timeout=CALL_TIMEOUT)
        r = wait_until(
            lambda: (
                (
                    r := self.tender.Wait(
                        pb2.WaitRequest(instance_id=iid, timeout_seconds=1.0),
                        metadata=self.md,
                        timeout=CALL_TIMEOUT,
                    )
                ).done
                and r
            ),
            60,
            f"instance {iid} to end after Kill",
            interval=0.0,
        )
        self.outcomes[r.outcome] += 1
        if r.outcome == "error":
            self.reports.append((iid, list(r.reports)))
        self.ids.append(iid)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    t = Tender.start(
        tmp_path_factory.mktemp("fuzz"),
        "--pool",
        "1",
        "--max-upload",
        "1M",
        token=TOKEN,
        peer_token=PEER_TOKEN,
    )
    a = Api(t)
    # one finished instance, so that id-taking RPCs also meet a real id
    iid = a.tender.Launch(pb2.LaunchRequest(image="hello"), metadata=a.md, timeout=60).instance_id
    a.finish(iid)
    yield a
    a.ch.close()
    a.pch.close()
    print("\nfuzz statuses:", {m: dict(c) for m, c in sorted(STATS.items())})
    for key, said in sorted(DETAILS.items()):
        print(key, sorted(said)[:6])
    print("fuzzed launch outcomes:", dict(a.outcomes), "error reports:", a.reports[:5])
    healthy_and_runs_hello(t)
    stopped_cleanly(t)


@pytest.fixture(scope="module")
def closer():
    c = Closer()
    yield c
    c.close()


def healthy_and_runs_hello(t: Tender) -> None:
    assert t.health() == health_pb2.HealthCheckResponse.SERVING, t.log()
    c = t.client()
    try:
        iid = c.launch("hello", [])
        r = c.wait(iid)
        assert (r.done, r.outcome, r.exit_code) == (True, "exited", 0), (r, t.log())
    finally:
        c.close()


def instance_ids(api: Api):
    return st.one_of(
        nasty_text, st.sampled_from(api.ids[:1] or ["x"]), st.builds(lambda: api.ids[-1])
    )


# -- Tender ---------------------------------------------------------------------------------------
@FUZZ
@given(req=launch_requests())
def test_fuzz_launch(api, req):
    resp = api.call("Launch", lambda: api.tender.Launch(req, metadata=api.md, timeout=CALL_TIMEOUT))
    if resp is not None:
        assert resp.instance_id
        api.finish(resp.instance_id)


@FUZZ
@given(data=st.data(), timeout=any_double)
def test_fuzz_wait(api, data, timeout):
    iid = data.draw(instance_ids(api))
    r = api.call(
        "Wait",
        lambda: api.tender.Wait(
            pb2.WaitRequest(instance_id=iid, timeout_seconds=timeout),
            metadata=api.md,
            timeout=CALL_TIMEOUT,
        ),
    )
    if r is not None:
        assert r.instance_id == iid and r.done


@FUZZ
@given(data=st.data())
def test_fuzz_kill(api, data):
    iid = data.draw(instance_ids(api))
    r = api.call(
        "Kill",
        lambda: api.tender.Kill(
            pb2.KillRequest(instance_id=iid), metadata=api.md, timeout=CALL_TIMEOUT
        ),
    )
    if r is not None:
        assert r.was_running is False  # every instance the fuzzers know has ended


@FUZZ
@given(data=st.data())
def test_fuzz_describe(api, data):
    iid = data.draw(instance_ids(api))
    r = api.call(
        "Describe",
        lambda: api.tender.Describe(
            pb2.DescribeRequest(instance_id=iid), metadata=api.md, timeout=CALL_TIMEOUT
        ),
    )
    if r is not None:
        assert r.summary.instance_id == iid


@FUZZ
@given(data=st.data(), from_start=st.booleans())
def test_fuzz_stream_console(api, data, from_start):
    iid = data.draw(instance_ids(api))
    api.call(
        "StreamConsole",
        lambda: list(
            api.tender.StreamConsole(
                pb2.ConsoleRequest(instance_id=iid, from_start=from_start),
                metadata=api.md,
                timeout=CALL_TIMEOUT,
            )
        ),
    )


@FUZZ
@given(junk=st.binary(max_size=64))
def test_fuzz_list_images_and_instances(api, junk):
    # the requests are empty messages: fuzz them with unknown fields (a valid encoding)
    extra = _unknown_field(junk)
    for method, stub, req in (
        ("ListImages", api.tender.ListImages, pb2.ListImagesRequest.FromString(extra)),
        ("ListInstances", api.tender.ListInstances, pb2.ListInstancesRequest.FromString(extra)),
        ("Peer.GetLoad", api.peer.GetLoad, ppb2.LoadRequest.FromString(extra)),
    ):
        md = api.peer_md if method.startswith("Peer.") else api.md
        r = api.call(
            method, lambda stub=stub, req=req, md=md: stub(req, metadata=md, timeout=CALL_TIMEOUT)
        )
        assert r is not None, method


def _unknown_field(payload: bytes) -> bytes:
    """``payload`` as a length-delimited field number 15 (unknown to every message)."""
    n, varint = len(payload), b""
    while True:
        b, n = n & 0x7F, n >> 7
        varint += bytes([b | (0x80 if n else 0)])
        if not n:
            break
    return bytes([15 << 3 | 2]) + varint + payload


HELLO_ELF = build_image("hello").read_bytes()


@st.composite
def upload_parts(draw):
    name = st.one_of(
        st.builds(lambda s: "fz-" + s, st.from_regex(r"[A-Za-z0-9._-]{0,20}", fullmatch=True)),
        nasty_text,
        st.sampled_from(["hello", "fz-up\n", "fz-up"]),
    )
    if draw(st.booleans()):  # a real ELF in random chunks, a name somewhere
        data = HELLO_ELF[: draw(st.sampled_from([len(HELLO_ELF), len(HELLO_ELF) // 2, 64]))]
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        parts = [pb2.UploadImageRequest(data=c) for c in chunks]
        parts.insert(draw(st.integers(0, len(parts))), pb2.UploadImageRequest(name=draw(name)))
        return parts
    part = st.one_of(
        st.builds(lambda n: pb2.UploadImageRequest(name=n), name),
        st.builds(lambda d: pb2.UploadImageRequest(data=d), st.binary(max_size=512)),
        st.builds(
            lambda n: pb2.UploadImageRequest(data=b"\0" * n),
            st.sampled_from([0, 1 << 20, (1 << 20) + 1]),
        ),
        st.just(pb2.UploadImageRequest()),
    )
    return draw(st.lists(part, max_size=30))


@FUZZ
@given(parts=upload_parts())
def test_fuzz_upload_image(api, parts):
    api.call(
        "UploadImage",
        lambda: api.tender.UploadImage(iter(parts), metadata=api.md, timeout=CALL_TIMEOUT),
    )


@FUZZ
@given(
    name=st.one_of(
        nasty_text,
        st.sampled_from(["hello", "fz-up", "fork_time"]),
        st.builds(lambda s: "fz-" + s, st.from_regex(r"[A-Za-z0-9._-]{0,20}", fullmatch=True)),
    )
)
def test_fuzz_delete_image(api, name):
    r = api.call(
        "DeleteImage",
        lambda: api.tender.DeleteImage(
            pb2.DeleteImageRequest(name=name), metadata=api.md, timeout=CALL_TIMEOUT
        ),
    )
    if r is not None:
        assert r.name == name and not r.builtin


# -- Peer ----------------------------------------------------------------------------------------
def supervisors(closer: Closer):
    port = st.one_of(
        st.integers(-(1 << 70), 1 << 70).map(str),
        st.integers(0, 70000).map(str),
        st.sampled_from(["", "-1", "65536", "0x10", str(1 << 64), "9" * 30]),
        nasty_text,
    )
    return st.one_of(
        nasty_text,
        st.just(f"tcp:127.0.0.1:{closer.port}"),  # accepts, hangs up
        st.just(f"tcp:127.0.0.1:{free_port()}"),  # refused
        st.builds(lambda p: f"tcp:127.0.0.1:{p}", port),
        st.builds(lambda p: f"tcp:127.0.0.1:{p}", st.sampled_from(["65536", "-1", str(1 << 63)])),
        st.builds(
            lambda h: f"tcp:{h}:{closer.port}",
            st.sampled_from(["", "[::1]", "::1", "0", "a\0b", "é.invalid"]),
        ),
        st.builds(lambda p: "unix:" + p, st.one_of(nasty_text, st.just("/" + "x" * 200))),
    )


@st.composite
def vm_chunks(draw, closer: Closer):
    start = ppb2.VmStart(
        instance_id=draw(nasty_text),
        pid=draw(st.integers(-I32, I32 - 1)),
        supervisor=draw(supervisors(closer)),
        transport=draw(st.one_of(st.sampled_from(["tcp", "shm", "TCP", ""]), nasty_text)),
        instance_token=draw(nasty_text),
        timeout_seconds=draw(st.one_of(any_double, short_limit)),
        image_sha256=draw(st.one_of(st.sampled_from(["", "0" * 64]), nasty_text)),
        args=draw(repeated(nasty_text, 3000)),
        env=draw(repeated(nasty_text, 3000)),
        ram_bytes=draw(uint(U64)),
        stack_bytes=draw(uint(U64)),
        quantum=draw(uint(U64)),
        max_procs=draw(uint(U32)),
        tty=draw(st.booleans()),
        argv0=draw(nasty_text),
    )
    part = st.one_of(
        st.builds(lambda b: ppb2.VmChunk(snapshot=b), st.binary(max_size=256)),
        st.builds(lambda b: ppb2.VmChunk(image=b), st.binary(max_size=256)),
        st.just(ppb2.VmChunk()),
    )
    chunks = draw(st.lists(part, max_size=10))
    if draw(st.integers(0, 9)):  # mostly one start header, somewhere
        chunks.insert(draw(st.integers(0, len(chunks))), ppb2.VmChunk(start=start))
    return chunks


@FUZZ
@given(data=st.data())
def test_fuzz_peer_start_vm(api, closer, data):
    chunks = data.draw(vm_chunks(closer))
    api.call(
        "Peer.StartVm",
        lambda: api.peer.StartVm(iter(chunks), metadata=api.peer_md, timeout=CALL_TIMEOUT),
    )


# -- regressions: bugs the fuzzers found (fixed) ----------------------------------------------------
def test_start_vm_with_a_port_out_of_range_is_invalid(api):
    start = ppb2.VmStart(
        instance_id="x", pid=2, supervisor="tcp:127.0.0.1:" + "9" * 20, transport="tcp"
    )
    with pytest.raises(grpc.RpcError) as ei:
        api.peer.StartVm(
            iter([ppb2.VmChunk(start=start)]), metadata=api.peer_md, timeout=CALL_TIMEOUT
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()


def test_a_long_instance_id_is_refused_by_name(api):
    """It used to come back as RESOURCE_EXHAUSTED: the whole id went into the trailers."""
    with pytest.raises(grpc.RpcError) as ei:
        api.tender.Describe(
            pb2.DescribeRequest(instance_id="x" * 20000), metadata=api.md, timeout=CALL_TIMEOUT
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert "instance_id" in ei.value.details()


def test_a_stack_larger_than_the_ram_is_refused(api):
    with pytest.raises(grpc.RpcError) as ei:
        iid = api.tender.Launch(
            pb2.LaunchRequest(
                image="hello", memory_bytes=16 << 20, stack_bytes=32 << 20, time_limit_seconds=2.0
            ),
            metadata=api.md,
            timeout=CALL_TIMEOUT,
        ).instance_id
        api.finish(iid)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()


# -- 1,000 launches at once -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode", [pb2.FORK_MODE_THREAD, pb2.FORK_MODE_VMCLONE], ids=["thread", "vmclone"]
)
def test_thousand_launches_at_once(tmp_path, mode):
    """Thread-fork hellos end so fast that few are refused; VM-clone ones fill the 64 slots."""
    t = Tender.start(tmp_path, "--pool", "1", "--max-instances", "64", token=TOKEN)
    try:
        with grpc.insecure_channel(t.target) as ch:
            stub = tender_grpc.TenderStub(ch)
            codes: Counter = Counter()
            ids: list[str] = []
            lock = threading.Lock()

            def one(_):
                try:
                    iid = stub.Launch(
                        pb2.LaunchRequest(image="hello", console_pipe=True, fork_mode=mode),
                        metadata=t.md,
                        timeout=60,
                    ).instance_id
                except grpc.RpcError as e:
                    with lock:
                        codes[e.code().name] += 1
                    return
                with lock:
                    codes["OK"] += 1
                    ids.append(iid)

            with ThreadPoolExecutor(16) as ex:
                list(ex.map(one, range(1000)))
            ok, refused = codes["OK"], codes["RESOURCE_EXHAUSTED"]
            print(
                f"\n1,000 launches ({pb2.ForkMode.Name(mode)}): ok={ok} refused={refused} all={dict(codes)}"
            )
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, dict(codes)
            assert ok + refused == 1000 and len(set(ids)) == ok, dict(codes)
            assert ok >= 64

            def result(iid):
                return stub.Wait(
                    pb2.WaitRequest(instance_id=iid, timeout_seconds=30), metadata=t.md, timeout=60
                )

            with ThreadPoolExecutor(16) as ex:
                results = list(ex.map(result, ids))
            bad = [
                (r.instance_id, r.done, r.outcome, r.exit_code, list(r.reports))
                for r in results
                if not (r.done and r.exit_code == 0)
            ]
            assert not bad, f"{len(bad)} of {ok} launched instances did not exit 0: {bad[:5]}"
        healthy_and_runs_hello(t)
    finally:
        stopped_cleanly(t)

"""The worker <-> supervisor channel, both transports, with real peers.

Real sockets, real shared memory, real processes: the cross-process tests
run this very file as the worker (``python tests/test_transports.py worker
...``) so that each worker has its own interpreter, and its stderr must stay
empty (no tracebacks).  Every test also checks that it leaves no channel
segment mapped or open in this process, nothing in /dev/shm, and no child
process behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import pytest
from support import channel_segments, wait_until

from tender_service.transports import (
    DEFAULT_RING_SIZE,
    HEADER_SIZE,
    HELLO_MAGIC,
    MAX_PAYLOAD,
    MIN_RING_SIZE,
    PROTOCOL_VERSION,
    Channel,
    ChannelClosed,
    Frame,
    ProtocolError,
    ShmChannel,
    TransportKind,
    accept_channel,
    connect_channel,
    decode_header,
    encode,
    encode_header,
    pipe_ring,
    read_hello,
    write_hello,
)
from tender_service.transports import channel as transport_channel
from tender_service.transports.channel import MAX_RING_SIZE, segment_size
from tender_service.transports.frames import HEADER, HELLO_HEADER, MAX_HELLO_JSON
from tender_service.transports.protocol import Msg
from tender_service.transports.shm_names import owner
from tender_service.transports.shm_segment import SEALS

log = logging.getLogger(__name__)

KINDS = ["tcp", "shm"]
WAIT = 30.0
REPO = Path(__file__).resolve().parent.parent
SHM_DIR = Path("/dev/shm")
TOKEN = "t0ken"

# Test-local message types (the real ones belong to the supervisor protocol).
DATA, REPORT, END, READY = 1, 2, 3, 4

_BLOCK = random.Random(20260127).randbytes(2 * MAX_PAYLOAD)


# -- shared between the test process and the workers ----------------------------


def frame_specs(seed: int, count: int) -> Iterator[Frame]:
    """A deterministic stream of frames of random sizes 0..MAX_PAYLOAD, with checksums."""
    rng = random.Random(seed)
    edges = [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, MAX_PAYLOAD - 1, MAX_PAYLOAD]
    for i in range(count):
        r = rng.random()
        if r < 0.1:
            size = rng.choice(edges)
        elif r < 0.55:
            size = rng.randrange(0, 4096)
        elif r < 0.85:
            size = rng.randrange(0, 128 << 10)
        else:
            size = rng.randrange(0, MAX_PAYLOAD + 1)
        off = rng.randrange(0, len(_BLOCK) - size + 1)
        payload = _BLOCK[off : off + size]
        crc = zlib.crc32(payload)
        yield Frame(DATA, i & 0xFF, i, seed, crc if i % 2 else -crc - 1, payload)


def check_stream(seed: int, count: int, recv: Callable[[], Frame | None]) -> list[str]:
    """Receive ``count`` frames and compare them with ``frame_specs(seed)``; the errors."""
    errors: list[str] = []
    for want in frame_specs(seed, count):
        got = recv()
        if got is None:
            errors.append(f"frame {want.req}: timed out")
            break
        crc = zlib.crc32(got.payload)
        arg_crc = got.arg if got.req % 2 else -got.arg - 1
        if got != want or crc != arg_crc:
            errors.append(
                f"frame {want.req}: got req={got.req} len={len(got.payload)} "
                f"crc={crc:#x} arg={got.arg}, want len={len(want.payload)}"
            )
            if len(errors) > 5:
                break
    return errors


def stream_chunks(total: int, size: int) -> Iterator[bytes]:
    rng = random.Random(total ^ size)
    for _ in range(total // size):
        off = rng.randrange(0, len(_BLOCK) - size + 1)
        yield _BLOCK[off : off + size]


# -- the worker process ------------------------------------------------------------


def _worker_connect(kind: str, address: str, mode: str) -> Channel:
    """The harness's TCP listener for tcp, its Unix one for shm (as a supervisor's)."""
    if kind == "shm":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(address)
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
    return connect_channel(kind, sock, True, {"token": TOKEN, "pid": os.getpid(), "mode": mode})


def _worker_exchange(ch: Channel, seed: int, count: int) -> None:
    def sender() -> None:
        for f in frame_specs(seed + 1, count):
            ch.send(f)

    t = threading.Thread(target=sender)
    t.start()
    errors = check_stream(seed, count, lambda: ch.recv(timeout=60))
    t.join()
    ch.send(Frame(REPORT, payload=json.dumps({"errors": errors}).encode()))


def _worker_sink(ch: Channel) -> None:
    digest = hashlib.sha256()
    frames = nbytes = 0
    while True:
        f = ch.recv(timeout=60)
        if f is None or f.type == END:
            break
        digest.update(f.payload)
        frames += 1
        nbytes += len(f.payload)
    report = {"frames": frames, "bytes": nbytes, "sha256": digest.hexdigest()}
    ch.send(Frame(REPORT, payload=json.dumps(report).encode()))


def worker_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mode, kind, address = argv[0], argv[1], argv[2]
    ch = _worker_connect(kind, address, mode)
    try:
        if mode == "exchange":
            _worker_exchange(ch, int(argv[3]), int(argv[4]))
        elif mode == "sink":
            _worker_sink(ch)
        elif mode == "idle":
            ch.send(Frame(READY))
        elif mode == "mute":
            ch.send(Frame(READY))
            threading.Event().wait()  # never read: the parent's sends back up
        else:
            raise SystemExit(f"unknown worker mode {mode}")
        while True:  # until the test closes its end
            ch.recv()
    except ChannelClosed:
        pass
    finally:
        ch.close()


# -- fixtures -------------------------------------------------------------------------


def _children() -> set[int]:
    me = os.getpid()
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            kids.add(int(entry.name))
    return kids


@dataclass
class Harness:
    """Workers, channels and listeners of one test, all cleaned up and checked after it."""

    #: where workers connect, as a supervisor listens: TCP for tcp, Unix for shm
    listeners: dict[str, socket.socket]
    procs: list[subprocess.Popen] = field(default_factory=list)
    channels: list[Channel] = field(default_factory=list)

    def address(self, kind: str) -> str:
        name = self.listeners[kind].getsockname()
        return name if kind == "shm" else f"{name[0]}:{name[1]}"

    def spawn(self, mode: str, kind: str, *args: object) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "worker", mode, kind, self.address(kind)]
        proc = subprocess.Popen(
            [*cmd, *map(str, args)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def accept(self, reply: dict | None = None) -> tuple[Channel, dict]:
        """The next worker's channel, on whichever listener it came."""
        ready, _, _ = select.select(list(self.listeners.values()), [], [], 30)
        assert ready, "no worker connected within 30 s"
        conn, _ = ready[0].accept()
        ch, hello = accept_channel(conn, reply)
        self.channels.append(ch)
        return ch, hello

    def worker(self, mode: str, kind: str, *args: object) -> tuple[subprocess.Popen, Channel]:
        proc = self.spawn(mode, kind, *args)
        ch, hello = self.accept()
        assert ch.kind == kind
        assert hello == {"token": TOKEN, "pid": proc.pid, "mode": mode}
        return proc, ch

    def pair(self, kind: str, ring_size: int = DEFAULT_RING_SIZE) -> tuple[Channel, Channel]:
        """Two ends in this process: the initiator in a thread, the responder here."""
        a, b = socket.socketpair()
        made: dict[str, Channel] = {}

        def initiate() -> None:
            made["a"] = connect_channel(kind, a, True, {"side": "a"})

        t = threading.Thread(target=initiate)
        t.start()
        cb, hello = accept_channel(b, {"side": "b"}, ring_size=ring_size)
        t.join(10)
        self.channels += [made["a"], cb]
        assert hello == {"side": "a"} and made["a"].peer_hello == {"side": "b"}
        return made["a"], cb

    @staticmethod
    def finish(proc: subprocess.Popen, expect_rc: int = 0) -> None:
        """Wait for a worker; it must exit as expected with nothing on stderr."""
        out, err = proc.communicate(timeout=60)
        assert err.decode() == "", err.decode()
        assert proc.returncode == expect_rc


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    resource_tracker.ensure_running()  # so it is among the children "before"
    kids_before = _children()
    shm_before = set(os.listdir(SHM_DIR))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "supervisor.sock"))
    unix.listen()
    h = Harness({"tcp": socket.create_server(("127.0.0.1", 0)), "shm": unix})
    try:
        yield h
    finally:
        for ch in h.channels:
            ch.close()
        for listener in h.listeners.values():
            listener.close()
        for proc in h.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        pids = {os.getpid(), *(p.pid for p in h.procs)}
        made = {n for n in set(os.listdir(SHM_DIR)) - shm_before if owner(n) in pids}
        assert made == set(), "names left in /dev/shm"
        wait_until(lambda: not channel_segments(), 10, "every channel segment unmapped")
        assert _children() == kids_before, "child processes left behind"


# -- frames and hellos ------------------------------------------------------------------


def test_frame_round_trip_through_encode_and_decode_header() -> None:
    f = Frame(200, 7, 0xFFFF_FFFF, 12, -(1 << 63), b"hello")
    wire = encode(f)
    assert len(encode_header(f)) == HEADER_SIZE == 24
    typ, flags, req, pipe, arg, length = decode_header(wire)
    assert Frame(typ, flags, req, pipe, arg, wire[HEADER_SIZE : HEADER_SIZE + length]) == f
    assert decode_header(b"xx" + wire, 2)[5] == 5


def test_encode_refuses_what_the_header_cannot_carry() -> None:
    with pytest.raises(ValueError, match="MAX_PAYLOAD"):
        encode(Frame(1, payload=bytes(MAX_PAYLOAD + 1)))
    for bad in (Frame(256), Frame(1, flags=-1), Frame(1, req=1 << 32), Frame(1, arg=1 << 63)):
        with pytest.raises(ValueError, match="out of range"):
            encode_header(bad)


def test_decode_header_refuses_oversized_length_and_reserved_bits() -> None:
    with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
        decode_header(HEADER.pack(1, 0, 0, 0, 0, 0, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
        decode_header(HEADER.pack(1, 0, 0, 0, 0, 0, 0xFFFF_FFFF))
    with pytest.raises(ProtocolError, match="reserved"):
        decode_header(HEADER.pack(1, 0, 1, 0, 0, 0, 0))
    with pytest.raises(ProtocolError, match="short"):
        decode_header(b"\x01" * 23)
    assert decode_header(HEADER.pack(1, 0, 0, 0, 0, 0, MAX_PAYLOAD))[5] == MAX_PAYLOAD


def _hung_up(sock: socket.socket) -> bool:
    """The other end closed (a reset if it still had our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


V = PROTOCOL_VERSION


def _raw_hello(magic: bytes, version: int, kind: int, body: bytes, length: int = -1) -> bytes:
    n = len(body) if length < 0 else length
    return HELLO_HEADER.pack(magic, version, kind, n) + body


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw_hello(b"HTTP", V, 1, b"{}"), "bad hello magic"),
        (_raw_hello(HELLO_MAGIC, 1, 1, b"{}"), "unsupported protocol version 1"),
        (_raw_hello(HELLO_MAGIC, 0, 1, b"{}"), "unsupported protocol version 0"),
        (_raw_hello(HELLO_MAGIC, V, 9, b"{}"), "unknown transport kind 9"),
        (_raw_hello(HELLO_MAGIC, V, 1, b"", MAX_HELLO_JSON + 1), "exceeds"),
        (_raw_hello(HELLO_MAGIC, V, 1, b"[1, 2]"), "not an object"),
        (_raw_hello(HELLO_MAGIC, V, 1, b"{nope"), "does not parse"),
    ],
    ids=["magic", "version1", "version0", "kind", "json-too-long", "json-array", "json-garbage"],
)
def test_bad_hello_is_refused(harness: Harness, raw: bytes, message: str) -> None:
    a, b = socket.socketpair()
    with a:
        a.sendall(raw)
        with pytest.raises(ProtocolError, match=message):
            accept_channel(b)
        assert b.fileno() == -1, "the refused socket is closed"
        assert _hung_up(a)


def test_hello_round_trip_and_silent_peer(harness: Harness) -> None:
    a, b = socket.socketpair()
    with a, b:
        write_hello(a, "shm", {"token": TOKEN, "pid": 42, "nested": {"x": [1, 2]}})
        hello = read_hello(b)
        assert (hello.kind, hello.info) == (
            "shm",
            {"token": TOKEN, "pid": 42, "nested": {"x": [1, 2]}},
        )
        assert PROTOCOL_VERSION == 2 and TransportKind.parse("TCP") is TransportKind.TCP
        with pytest.raises(ProtocolError, match="no complete hello"):
            read_hello(b, timeout=0.2)
        a.close()
        with pytest.raises(ChannelClosed):
            read_hello(b)
    with pytest.raises(ValueError, match="unknown transport"):
        write_hello(a, "udp", {})


# -- both transports, cross-process ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_random_frames_both_directions_concurrently(harness: Harness, kind: str) -> None:
    seed, count = 1000 + len(kind), 300
    proc, ch = harness.worker("exchange", kind, seed, count)

    def sender() -> None:
        for f in frame_specs(seed, count):
            ch.send(f)

    t = threading.Thread(target=sender)
    t.start()
    errors = check_stream(seed + 1, count, lambda: ch.recv(timeout=60))
    t.join(60)
    assert errors == []
    report = ch.recv(timeout=60)
    assert report is not None and report.type == REPORT
    assert json.loads(report.payload) == {"errors": []}
    sent = sum(HEADER_SIZE + len(f.payload) for f in frame_specs(seed, count))
    assert ch.bytes_sent == sent
    assert ch.bytes_received == HEADER_SIZE + len(report.payload) + sum(
        HEADER_SIZE + len(f.payload) for f in frame_specs(seed + 1, count)
    )
    ch.close()
    harness.finish(proc)


@pytest.mark.parametrize("kind", KINDS)
def test_64_mib_in_64_kib_frames(harness: Harness, kind: str) -> None:
    total, size = 64 << 20, 64 << 10
    proc, ch = harness.worker("sink", kind)
    digest = hashlib.sha256()
    for i, chunk in enumerate(stream_chunks(total, size)):
        digest.update(chunk)
        ch.send(Frame(DATA, req=i, payload=chunk))
    ch.send(Frame(END))
    report = ch.recv(timeout=60)
    assert report is not None and report.type == REPORT
    assert json.loads(report.payload) == {
        "frames": total // size,
        "bytes": total,
        "sha256": digest.hexdigest(),
    }
    assert ch.bytes_sent == total + (total // size + 1) * HEADER_SIZE
    ch.close()
    harness.finish(proc)


@pytest.mark.parametrize("kind", KINDS)
def test_killed_peer_wakes_a_blocked_recv(harness: Harness, kind: str) -> None:
    proc, ch = harness.worker("idle", kind)
    ready = ch.recv(timeout=30)
    assert ready is not None and ready.type == READY
    outcome: list[BaseException | Frame | None] = []

    def blocked() -> None:
        try:
            outcome.append(ch.recv())
        except BaseException as e:  # noqa: BLE001 - the outcome is what we check
            outcome.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    proc.send_signal(signal.SIGKILL)
    t.join(5)
    assert not t.is_alive(), "recv still blocked 5 s after the peer was killed"
    assert len(outcome) == 1 and isinstance(outcome[0], ChannelClosed), outcome
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=1)
    harness.finish(proc, -signal.SIGKILL)


@pytest.mark.parametrize("kind", KINDS)
def test_killed_peer_wakes_a_sender_blocked_on_a_full_channel(harness: Harness, kind: str) -> None:
    proc, ch = harness.worker("mute", kind)
    ready = ch.recv(timeout=30)
    assert ready is not None and ready.type == READY
    started = threading.Event()
    outcome: list[BaseException] = []

    def flood() -> None:
        try:
            for i in range(1 << 20):  # 64 GiB: far more than any buffer holds
                ch.send(Frame(DATA, req=i, payload=_BLOCK[: 64 << 10]))
                if i == 8:
                    started.set()
        except BaseException as e:  # noqa: BLE001 - the outcome is what we check
            outcome.append(e)

    t = threading.Thread(target=flood)
    t.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGKILL)
    t.join(5)
    assert not t.is_alive(), "send still blocked 5 s after the peer was killed"
    assert len(outcome) == 1 and isinstance(outcome[0], ChannelClosed), outcome
    harness.finish(proc, -signal.SIGKILL)


def test_accept_answers_both_kinds(harness: Harness) -> None:
    procs = {kind: harness.spawn("idle", kind) for kind in KINDS}
    seen = {}
    for _ in KINDS:
        ch, hello = harness.accept({"supervisor": True})
        assert hello["token"] == TOKEN and set(hello) == {"token", "pid", "mode"}
        ready = ch.recv(timeout=30)
        assert ready is not None and ready.type == READY
        seen[ch.kind] = hello["pid"]
        ch.close()
    assert seen == {kind: p.pid for kind, p in procs.items()}
    for p in procs.values():
        harness.finish(p)


# -- both transports, in process ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_senders_never_interleave(harness: Harness, kind: str) -> None:
    a, b = harness.pair(kind, ring_size=MIN_RING_SIZE)  # small ring: flow control and wrap
    threads, per_thread = 8, 150

    def sender(tid: int) -> None:
        rng = random.Random(tid)
        for seq in range(per_thread):
            size = MAX_PAYLOAD if seq % 50 == 7 else rng.randrange(0, 32 << 10)
            a.send(Frame(DATA, req=seq, pipe=tid, arg=size, payload=bytes([tid]) * size))

    workers = [threading.Thread(target=sender, args=(tid,)) for tid in range(threads)]
    for w in workers:
        w.start()
    next_seq = [0] * threads
    for _ in range(threads * per_thread):
        f = b.recv(timeout=60)
        assert f is not None
        assert f.req == next_seq[f.pipe], "frames of one sender reordered"
        assert len(f.payload) == f.arg and f.payload.count(f.pipe) == f.arg, "interleaved"
        next_seq[f.pipe] += 1
    for w in workers:
        w.join(10)
    assert next_seq == [per_thread] * threads
    assert b.recv(timeout=0) is None
    assert a.bytes_sent == b.bytes_received


@pytest.mark.parametrize("kind", KINDS)
def test_ping_pong_never_loses_a_wakeup(harness: Harness, kind: str) -> None:
    """Each side sleeps before every frame, so every frame needs its doorbell."""
    a, b = harness.pair(kind)
    rounds = 3000

    def echo() -> None:
        for _ in range(rounds):
            f = b.recv(timeout=10)
            if f is None:
                return
            b.send(f)

    t = threading.Thread(target=echo)
    t.start()
    for i in range(rounds):
        a.send(Frame(DATA, req=i, payload=i.to_bytes(4, "little")))
        f = a.recv(timeout=10)
        assert f is not None, f"round {i}: a wake-up was lost"
        assert f.req == i
    t.join(10)


@pytest.mark.parametrize("kind", KINDS)
def test_recv_timeout_returns_none(harness: Harness, kind: str) -> None:
    a, b = harness.pair(kind)
    assert b.recv(timeout=0) is None
    t0 = time.monotonic()
    assert b.recv(timeout=0.3) is None
    assert time.monotonic() - t0 >= 0.3  # it waited its timeout (however slow the host)
    a.send(Frame(DATA, payload=b"late"))
    f = b.recv(timeout=5)
    assert f is not None and f.payload == b"late"


@pytest.mark.parametrize("kind", KINDS)
def test_close_wakes_a_blocked_recv_and_is_idempotent(harness: Harness, kind: str) -> None:
    a, b = harness.pair(kind)
    outcome: list[BaseException | Frame | None] = []

    def blocked() -> None:
        try:
            outcome.append(b.recv())
        except BaseException as e:  # noqa: BLE001 - the outcome is what we check
            outcome.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    b.close()
    t.join(5)
    assert not t.is_alive() and isinstance(outcome[0], ChannelClosed), outcome
    b.close()
    with pytest.raises(ChannelClosed):
        b.send(Frame(DATA))
    with pytest.raises(ChannelClosed):
        a.recv(timeout=5)  # the peer sees our close


@pytest.mark.parametrize("kind", KINDS)
def test_frames_sent_before_a_close_are_delivered_first(harness: Harness, kind: str) -> None:
    a, b = harness.pair(kind)
    for i in range(3):
        a.send(Frame(DATA, req=i, payload=bytes(i * 20_000)))  # fits a socket buffer
    a.close()
    for i in range(3):
        f = b.recv(timeout=5)
        assert f is not None and f.req == i and len(f.payload) == i * 20_000
    with pytest.raises(ChannelClosed):
        b.recv(timeout=5)


def test_tcp_frames_the_peer_sent_survive_a_failed_send(harness: Harness) -> None:
    """Regression: a VM sent its exit and hung up with our frames unread (a reset); our
    next send failed and closed the whole channel, so its exit was never read and the
    supervisor reported the VM lost (seen across two hosts in test_shell_multihost)."""
    raw, theirs = socket.socketpair()
    write_hello(raw, "tcp", {"raw": True})
    ch, _ = accept_channel(theirs)
    harness.channels.append(ch)
    read_hello(raw)
    ch.send(Frame(DATA, req=1, payload=b"unread by the peer"))
    raw.sendall(encode(Frame(DATA, req=7, payload=b"my last words")))
    raw.close()  # with our frame unread
    with pytest.raises(ChannelClosed, match="send failed"):
        for _ in range(100):  # the first send may still find room in the buffer
            ch.send(Frame(DATA, req=2, payload=bytes(65536)))
    f = ch.recv(timeout=5)
    assert f is not None and (f.req, f.payload) == (7, b"my last words")
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=5)
    with pytest.raises(ChannelClosed, match="send failed"):
        ch.send(Frame(DATA, req=3))


def test_tcp_oversized_length_is_a_protocol_error(harness: Harness) -> None:
    raw, theirs = socket.socketpair()
    with raw:
        write_hello(raw, "tcp", {"raw": True})
        ch, hello = accept_channel(theirs)
        harness.channels.append(ch)
        assert hello == {"raw": True} and read_hello(raw).kind == "tcp"
        raw.sendall(HEADER.pack(DATA, 0, 0, 0, 0, 0, MAX_PAYLOAD + 1))
        with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
            ch.recv(timeout=5)
        with pytest.raises(ChannelClosed):
            ch.recv(timeout=5)
        assert _hung_up(raw), "the channel hangs up on a peer that sent garbage"


def test_shm_oversized_length_is_a_protocol_error(harness: Harness) -> None:
    a, b = harness.pair("shm")
    assert isinstance(a, ShmChannel)
    # A corrupt peer: write a bad header straight into the ring and publish it.
    ring, tail = a._tx, a._tx_tail
    ring.put(tail, HEADER.pack(DATA, 0, 0, 0, 0, 0, MAX_PAYLOAD + 1))
    ring.tail.value = tail + HEADER_SIZE
    with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
        b.recv(timeout=5)
    with pytest.raises(ChannelClosed):
        b.recv(timeout=5)
    with pytest.raises(ChannelClosed):
        a.recv(timeout=5)


def test_shm_segment_is_a_memfd_with_no_name(harness: Harness) -> None:
    before = set(os.listdir(SHM_DIR))
    a, b = harness.pair("shm")
    assert isinstance(a, ShmChannel) and isinstance(b, ShmChannel)
    assert a.segment == b.segment and a.segment.startswith("memfd:")
    assert {n for n in os.listdir(SHM_DIR) if owner(n) == os.getpid()} - before == set()
    assert len([m for m in channel_segments() if " rw-s " in m]) == 2  # mapped twice
    a.send(Frame(DATA, payload=b"mapped by both"))
    f = b.recv(timeout=5)
    assert f is not None and f.payload == b"mapped by both"


def test_shm_rings_wrap_around_many_times(harness: Harness) -> None:
    a, b = harness.pair("shm", ring_size=MIN_RING_SIZE)
    # 25 frames of ~1 MiB wrap the 2 MiB ring about 12 times at odd offsets.
    for i in range(25):
        size = MAX_PAYLOAD - 4099 * i
        a.send(Frame(DATA, req=i, payload=_BLOCK[i : i + size]))
        f = b.recv(timeout=5)
        assert f is not None and f.req == i and f.payload == _BLOCK[i : i + size]


def test_connect_refuses_a_peer_of_the_other_kind(harness: Harness) -> None:
    a, b = socket.socketpair()
    made: list[BaseException | Channel] = []

    def initiate() -> None:
        try:
            made.append(connect_channel("tcp", a, True, {}))
        except BaseException as e:  # noqa: BLE001 - the outcome is what we check
            made.append(e)

    t = threading.Thread(target=initiate)
    t.start()
    with pytest.raises(ProtocolError, match="offered transport tcp, expected shm"):
        connect_channel("shm", b, False, {})
    t.join(10)
    assert isinstance(made[0], ChannelClosed), made


def _raw_offer(
    hello: dict | None = None, **accept: Any
) -> tuple[socket.socket, Channel, Any, list[int]]:
    """A bare initiator offering shm: its socket, the responder's channel, the
    answer and the fds that came with it (the caller closes them)."""
    a, b = socket.socketpair()
    answered: list[Channel] = []
    t = threading.Thread(target=lambda: answered.append(accept_channel(b, **accept)[0]))
    t.start()
    write_hello(a, "shm", hello or {})
    fds: list[int] = []
    answer = read_hello(a, 10, fds)
    t.join(10)
    return a, answered[0], answer, fds


def test_the_segment_a_vm_gets_is_sealed_against_resizing() -> None:
    """A VM that takes over its emulator holds the segment's fd for a moment: it must
    not be able to shrink it (the supervisor's next write would be a SIGBUS, the
    tender's death), nor grow it, nor undo the seals."""
    a, responder, answer, fds = _raw_offer()
    try:
        assert answer.kind == "shm" and len(fds) == 1
        fd = fds[0]
        size = segment_size(answer.info["_shm"]["ring_size"])
        assert os.fstat(fd).st_size == size
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
        for attack in (0, 4096, size // 2, size + 4096):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, attack)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        # the responder fills its ring (two maximal frames): no SIGBUS, the bytes are there
        for i in range(2):
            responder.send(Frame(DATA, req=i, payload=_BLOCK[:MAX_PAYLOAD]))
        with mmap.mmap(fd, size) as m:
            assert bytes(m[:8]) == b"UFSHM001"
            assert _BLOCK[:4096] in bytes(m[4096:])
    finally:
        responder.close()
        a.close()
        for fd in fds:
            os.close(fd)


def _answer_shm(sock: socket.socket, fd: int) -> None:
    """A broken responder: reads the offer, answers shm with ``fd`` (-1: none)."""
    read_hello(sock, 10)
    write_hello(sock, "shm", {"_shm": {"ring_size": DEFAULT_RING_SIZE}}, [fd] if fd >= 0 else [])


def test_shm_answer_without_a_usable_segment_is_a_protocol_error() -> None:
    """A responder that sends no segment, or one of the wrong size, is refused."""
    wrong = os.memfd_create("not-a-channel")
    os.ftruncate(wrong, 4096)
    try:
        for fd, match in ((-1, "without a segment"), (wrong, "not of")):
            a, b = socket.socketpair()
            with a, b:
                t = threading.Thread(target=_answer_shm, args=(b, fd))
                t.start()
                with pytest.raises(ProtocolError, match=match):
                    connect_channel("shm", a, True, {})
                t.join(10)
    finally:
        os.close(wrong)
    assert not channel_segments()


def test_shm_over_a_tcp_socket_is_refused() -> None:
    """The segment's fd can only travel over a Unix socket: a peer that offers shm
    over TCP (another host, or a misconfiguration) gets no answer, a clear error here."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        initiator = socket.create_connection(listener.getsockname(), timeout=10)
        conn, _ = listener.accept()
        with initiator:
            write_hello(initiator, "shm", {})
            with pytest.raises(ProtocolError, match="needs a Unix socket"):
                accept_channel(conn)
            assert initiator.recv(1) == b""  # hung up without an answer
    assert not channel_segments()


def test_shm_ring_size_outside_its_bounds_is_refused() -> None:
    for bad in (MIN_RING_SIZE - 1, MAX_RING_SIZE + 1):
        with pytest.raises(ValueError, match="outside"):
            segment_size(bad)
        a, b = socket.socketpair()
        with a:
            write_hello(a, "shm", {})
            with pytest.raises(ValueError, match="outside"):
                accept_channel(b, ring_size=bad)
            assert a.recv(1) == b""  # the responder hung up
    assert not channel_segments()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker_main(sys.argv[2:])


def _pair(kind: str, fds: list[int] | None = None) -> tuple[Channel, Channel]:
    """(a VM's end, its supervisor's end) of a channel of ``kind`` over a Unix socketpair,
    ``fds`` sent with the supervisor's hello."""
    vm_sock, sup_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    answered: dict[str, Channel] = {}
    t = threading.Thread(
        target=lambda: answered.setdefault("sup", accept_channel(sup_sock, fds=fds or [])[0])
    )
    t.start()
    vm = connect_channel(kind, vm_sock, True, {"pid": 2})
    t.join(WAIT)
    return vm, answered["sup"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", KINDS)
def test_an_fd_reaches_the_vm_with_its_frame_and_only_the_vm_takes_fds(kind: str) -> None:
    """How a supervisor hands a VM a pipe ring: ``send(frame, fd)``; once the VM has
    the frame, ``take_fd`` has the fd (the same file, in order, under any number of
    frames between) if it takes fds (a VM of an instance with pipe rings: VmLink sets
    it).  Fds sent to a side that takes none (a supervisor, sent them by a VM) are not
    kept: the kernel closes them, and that channel has none to take."""
    vm, sup = _pair(kind)
    try:
        assert (vm.takes_fds, sup.takes_fds) == (False, False)
        vm.takes_fds = True
        files = [os.memfd_create(f"f{i}") for i in range(3)]
        for i, fd in enumerate(files):
            sup.send(Frame(1, 0, i, 0, 0, b"x" * 10))
            sup.send(Frame(1, 0, i, 0, 0, str(os.fstat(fd).st_ino).encode()), fd)
        for i, fd in enumerate(files):
            assert vm.recv(WAIT).payload == b"x" * 10
            f = vm.recv(WAIT)
            got = vm.take_fd(WAIT)
            assert (
                str(os.fstat(got).st_ino).encode() == f.payload == str(os.fstat(fd).st_ino).encode()
            ), i
            assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.close(got)
        before = _open_fds()
        vm.send(Frame(2, 0, 9, 0, 0, b"mine"), files[0])  # the other way
        assert sup.recv(WAIT).payload == b"mine"
        with pytest.raises(ChannelClosed):
            sup.take_fd(0.2)
        assert _open_fds() == before
        for fd in files:
            os.close(fd)
    finally:
        vm.close()
        sup.close()


@pytest.mark.parametrize("kind", KINDS)
def test_fds_sent_with_the_hello_are_the_vms_first(kind: str) -> None:
    """A VM's wake-up pipe comes with its supervisor's hello (after an shm channel's
    segment, which the channel maps): ``take_fd`` has it at once, before any other."""
    pipe = pipe_ring.wake_pipe()
    vm, sup = _pair(kind, [pipe])
    try:
        got = vm.take_fd(0)
        assert os.fstat(got).st_ino == os.fstat(pipe).st_ino
        os.close(got)
        with pytest.raises(ChannelClosed):
            vm.take_fd(0)  # nothing else came
    finally:
        os.close(pipe)
        vm.close()
        sup.close()


def test_an_fd_goes_over_unix_sockets_only() -> None:
    """A tcp channel over TCP cannot carry an fd: the sender is told, nothing is sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        vm_sock = socket.create_connection(listener.getsockname())
        sup_sock, _ = listener.accept()
    finally:
        listener.close()
    answered: dict[str, Channel] = {}
    t = threading.Thread(
        target=lambda: answered.setdefault("sup", connect_channel("tcp", sup_sock, False, {}))
    )
    t.start()
    vm = connect_channel("tcp", vm_sock, True, {})
    t.join(WAIT)
    sup = answered["sup"]
    fd = os.memfd_create("f")
    try:
        assert not vm.takes_fds
        with pytest.raises(ValueError, match="Unix socket"):
            sup.send(Frame(1, 0, 1, 0, 0, b"x"), fd)
        sup.send(Frame(1, 0, 2, 0, 0, b"y"))
        assert vm.recv(WAIT).req == 2
    finally:
        os.close(fd)
        vm.close()
        sup.close()


def test_a_vm_that_reads_nothing_loses_its_channel_not_the_supervisors_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An fd needs room in the socket: a VM that never drains its doorbells (one that
    took over its emulator) would hold the supervisor's thread in ``sendmsg`` for
    ever.  It waits ``FD_SEND_TIMEOUT``, then closes that channel."""
    monkeypatch.setattr(transport_channel, "FD_SEND_TIMEOUT", 0.5)
    vm, sup = _pair("shm")
    fd = os.memfd_create("f")
    try:
        sup._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with contextlib.suppress(BlockingIOError):
            while True:  # fill the socket with doorbells nobody reads
                sup._sock.send(b"\x01" * 4096, socket.MSG_DONTWAIT)
        with pytest.raises(ChannelClosed, match="does not read"):
            sup.send(Frame(1, 0, 1, 0, 0, b"x"), fd)
        assert sup.closed
    finally:
        os.close(fd)
        vm.close()
        sup.close()


class _Answerer:
    """The supervisor's end of a VM's channel, answering CALL frames in order: the
    first answer goes out only once ``batch`` calls have come (or none came for
    ``quiet`` seconds), then each at once.  ``answer(i, op)`` gives call i's
    (value, payload, fd or None)."""

    def __init__(self, sup: Channel, batch: int, answer, quiet: float = 2.0) -> None:
        self.sup, self.batch, self.answer, self.quiet = sup, batch, answer, quiet
        self.before_first_answer = 0
        self.ops: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _reply(self, f: Frame) -> None:
        op = json.loads(f.payload.split(b"\n", 1)[0])["op"]
        value, payload, fd = self.answer(len(self.ops), op)
        self.ops.append(op)
        self.sup.send(Frame(Msg.RESULT, 0, f.req, 0, value, payload), fd)

    def _run(self) -> None:
        frames: list[Frame] = []
        while len(frames) < self.batch:
            f = self.sup.recv(self.quiet)
            if f is None:
                break
            frames.append(f)
        self.before_first_answer = len(frames)
        for f in frames:
            self._reply(f)
        while not self.stop.is_set():
            f = self.sup.recv(0.1)
            if f is not None:
                self._reply(f)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)


@pytest.fixture
def linked_vm():
    """A VM's VmLink over a channel pair (its kernel attached: its reader runs), and
    the supervisor's end; a test plays the supervisor with ``_Answerer``."""
    from tender_service.toolchain.images import build_image
    from tender_service.transports.vmlink import VmLink
    from tender_service.vm import CaptureSink, create_vm

    made: list[tuple[VmLink, Channel, Any]] = []

    def make(kind: str) -> tuple[VmLink, Channel, Any]:
        vm, sup = _pair(kind)
        vm.takes_fds = True
        link = VmLink(vm, 2)
        k = create_vm(build_image("hello"), sink=CaptureSink())
        link.attach(k)
        made.append((link, sup, k))
        return link, sup, k

    yield make
    for link, sup, k in made:
        link.close()
        sup.close()
        k.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_vms_calls_go_out_together_and_each_answer_has_its_fd(linked_vm, kind: str) -> None:
    """A VM's calls made together (``_call_fds``: a fork sharing its pipes) are all
    sent before the first answer is awaited: the supervisor here answers only once
    it has all three (calls sent one after another's answer would leave it with one).
    The answers come back in order, each with the fd its payload names."""
    link, sup, _ = linked_vm(kind)
    files = [os.memfd_create("ring0"), os.memfd_create("ring2")]
    inos = [str(os.fstat(fd).st_ino).encode() for fd in files]
    answers = {0: (10, b"memfd:" + inos[0], files[0]), 1: (11, b"", None)}
    answers[2] = (12, b"memfd:" + inos[1], files[1])
    sup_side = _Answerer(sup, 3, lambda i, op: answers[i])
    try:
        got = link._call_fds(
            [("pipe_create", (1, 1, 1), b"x"), ("proc_list", (), b""), ("ring_fd", (7,), b"")]
        )
        assert sup_side.before_first_answer == 3
        assert sup_side.ops == ["pipe_create", "proc_list", "ring_fd"]
        assert [(v, p) for v, p, _ in got] == [
            (10, b"memfd:" + inos[0]),
            (11, b""),
            (12, b"memfd:" + inos[1]),
        ]
        assert got[1][2] is None
        for (_, _, fd), ino in zip((got[0], got[2]), inos, strict=True):
            assert fd is not None and str(os.fstat(fd).st_ino).encode() == ino
            os.close(fd)
    finally:
        sup_side.close()
        for fd in files:
            os.close(fd)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fork_shares_all_its_pipes_in_one_round_and_keeps_what_was_shared(
    linked_vm, kind: str
) -> None:
    """``make_remote`` puts a process's pipes into the broker together (one pipe_create
    each, all sent before the first answer, a pipe with two ends in the table once).
    A pipe the supervisor refuses stays local in the table, with the bytes it holds;
    the others are shared all the same (their ends in the table are the broker's)
    and the error is raised.  Sharing again asks only for the one still local."""
    from tender_service.machine.errors import GuestError
    from tender_service.rump.pipe import PipeEnd, make_pipe
    from tender_service.transports.remote_pipe import RemotePipeEnd

    link, sup, k = linked_vm(kind)
    proc = k.main
    fds = []
    for _ in range(3):
        r, w = make_pipe(0)
        fds.append((proc.fds.install(r), proc.fds.install(w)))
    held = proc.fds.entries[fds[1][0]].file.pipe
    held.buf += b"kept"
    ids = iter(range(40, 50))
    refuse = {1}
    sup_side = _Answerer(
        sup, 3, lambda i, op: (-errno.ENOMEM, b"", None) if i in refuse else (next(ids), b"", None)
    )

    def ends(i: int) -> list[object]:
        return [proc.fds.entries[fd].file for fd in fds[i]]

    try:
        with pytest.raises(GuestError) as e:
            link.make_remote([proc])
        assert e.value.errno == errno.ENOMEM
        assert sup_side.before_first_answer == 3
        assert [type(f) for f in ends(1)] == [PipeEnd, PipeEnd] and held.buf == b"kept"
        assert [[f.pipe for f in ends(i)] for i in (0, 2)] == [[40, 40], [41, 41]]
        assert all(isinstance(f, RemotePipeEnd) for i in (0, 2) for f in ends(i))
        refuse.clear()
        link.make_remote([proc])
        assert [f.pipe for f in ends(1)] == [42, 42] and held.buf == b""
        assert sup_side.ops == ["pipe_create"] * 4
    finally:
        sup_side.close()

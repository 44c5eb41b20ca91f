"""The pipe broker: Linux pipe semantics for pipes shared by several VMs, nothing mocked."""

from __future__ import annotations

import errno
import hashlib
import logging
import random
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tender_service.transports.broker import (
    PIPE_BUF,
    PIPE_CAPACITY,
    POLL_IN,
    POLL_OUT,
    PipeBroker,
)

EAGAIN, EBADF, EPIPE = -errno.EAGAIN, -errno.EBADF, -errno.EPIPE
A, B, C = 101, 102, 103  # holders (pids)


@dataclass
class Req:
    """One request's replies; there must be exactly one."""

    replies: list = field(default_factory=list)

    def on_read(self, value: bytes | int) -> None:
        self.replies.append(value)

    def on_write(self, count: int, sigpipe: bool) -> None:
        self.replies.append((count, sigpipe))

    @property
    def answered(self) -> bool:
        return bool(self.replies)

    @property
    def value(self):
        assert len(self.replies) == 1, self.replies
        return self.replies[0]


def rd(b: PipeBroker, pipe: int, holder: int, n: int, nonblock: bool = False) -> Req:
    r = Req()
    b.read(pipe, holder, n, nonblock, r.on_read)
    return r


def wr(b: PipeBroker, pipe: int, holder: int, data: bytes, nonblock: bool = False) -> Req:
    r = Req()
    b.write(pipe, holder, data, nonblock, r.on_write)
    return r


def fill(b: PipeBroker, pipe: int, holder: int, n: int) -> bytes:
    """Put n bytes in the pipe with writes that complete at once."""
    data = random.Random(n).randbytes(n)
    for i in range(0, n, PIPE_BUF):
        assert wr(b, pipe, holder, data[i : i + PIPE_BUF]).value == (
            len(data[i : i + PIPE_BUF]),
            False,
        )
    return data


def drain(b: PipeBroker, pipe: int, holder: int) -> bytes:
    out = bytearray()
    while (r := rd(b, pipe, holder, 1 << 20, nonblock=True)).value != EAGAIN and r.value:
        out += r.value
    return bytes(out)


# -- pollers --------------------------------------------------------------------


def test_a_poller_is_told_of_the_next_change_once() -> None:
    """A VM in poll registers a watch with ``poll``: the pipe's next change (data,
    room, an end closed) calls it once, whatever the events were; a VM that is gone
    is not called."""
    b = PipeBroker()
    p = b.create(A, readers=1, writers=1)
    b.add_refs(p, B, 1, 1)
    woken: list[int] = []
    assert b.poll(p, True, (B, lambda: woken.append(B))) & POLL_OUT
    b.drop_holder(B)  # its VM ended: nobody to tell
    assert woken == []
    assert b.poll(p, False, (A, lambda: woken.append(A))) & POLL_IN == 0
    assert woken == []
    assert wr(b, p, A, b"x").value == (1, False)
    assert woken == [A]
    assert rd(b, p, A, 1).value == b"x"
    assert woken == [A]  # once: it polls again to hear of the next change
    b.poll(p, False, (A, lambda: woken.append(A)))
    b.close(p, A, "w")  # no writer left: HUP is a change too
    assert woken == [A, A]


# -- reads --------------------------------------------------------------------


def test_read_returns_what_is_available_at_once() -> None:
    b = PipeBroker()
    p = b.create(A, b"hello")
    assert rd(b, p, A, 3).value == b"hel"
    assert rd(b, p, A, 100).value == b"lo"
    assert not rd(b, p, A, 100).answered  # empty, a writer remains: parked


def test_a_read_whose_buffer_cannot_take_the_bytes_faults_and_takes_nothing() -> None:
    """Linux's pipe_read: EFAULT when what it would copy runs past the reader's buffer,
    the bytes left in the pipe; what fits is read as usual.  Parked reads too."""
    b = PipeBroker()
    p = b.create(A, b"abcdefgh")
    r = Req()
    b.read(p, A, 64, False, r.on_read, room=4)
    assert r.value == -errno.EFAULT
    r = Req()
    b.read(p, A, 3, False, r.on_read, room=4)  # 3 bytes fit in 4
    assert r.value == b"abc"
    assert rd(b, p, A, 64).value == b"defgh"
    parked = Req()
    b.read(p, A, 64, False, parked.on_read, room=2)
    assert not parked.answered
    assert wr(b, p, A, b"xyz").value == (3, False)
    assert parked.value == -errno.EFAULT
    assert rd(b, p, A, 64).value == b"xyz"
    assert b.stats()["parked_reads"] == 0


def test_zero_byte_read_returns_nothing_at_once() -> None:
    b = PipeBroker()
    p = b.create(A)
    assert rd(b, p, A, 0).value == b""
    assert rd(b, p, A, 0, nonblock=True).value == b""
    assert b.stats()["parked_reads"] == 0
    assert wr(b, p, A, b"x").value == (1, False)
    assert rd(b, p, A, 0).value == b""  # does not consume
    assert rd(b, p, A, 5).value == b"x"
    assert rd(b, p, A, -1).value == -errno.EINVAL


def test_eof_when_empty_and_no_writer() -> None:
    b = PipeBroker()
    p = b.create(A, b"tail")
    b.close(p, A, "w")
    assert rd(b, p, A, 2).value == b"ta"  # buffered data first
    assert rd(b, p, A, 9).value == b"il"
    assert rd(b, p, A, 9).value == b""
    assert rd(b, p, A, 9, nonblock=True).value == b""


def test_nonblocking_read_of_empty_pipe_is_eagain() -> None:
    b = PipeBroker()
    p = b.create(A)
    assert rd(b, p, A, 10, nonblock=True).value == EAGAIN == -11


def test_parked_readers_are_served_in_fifo_order() -> None:
    b = PipeBroker()
    p = b.create(A, readers=1, writers=0)
    b.add_refs(p, B, readers=1, writers=0)
    b.add_refs(p, C, readers=0, writers=1)
    r1, r2, r3 = rd(b, p, A, 4), rd(b, p, B, 4), rd(b, p, A, 4)
    assert b.blocked() == {A: "read pipe 1", B: "read pipe 1"}
    assert wr(b, p, C, b"0123456789").value == (10, False)
    assert (r1.value, r2.value, r3.value) == (b"0123", b"4567", b"89")
    r4, r5 = rd(b, p, B, 100), rd(b, p, A, 100)
    assert wr(b, p, C, b"abc").value == (3, False)
    assert r4.value == b"abc" and not r5.answered
    assert rd(b, p, B, 1, nonblock=True).value == EAGAIN  # a parked reader is ahead
    b.close(p, C, "w")
    assert r5.value == b""


def test_eof_only_after_the_last_writer_of_any_holder_closes() -> None:
    b = PipeBroker()
    p = b.create(A, readers=1, writers=2)
    b.add_refs(p, B, readers=0, writers=1)
    b.add_refs(p, C, readers=0, writers=1)
    parked = [rd(b, p, A, 10) for _ in range(3)]
    b.close(p, A, "w")
    b.close(p, B, "w")
    b.close(p, A, "w")
    assert not any(r.answered for r in parked)
    b.drop_holder(C)  # the last writer's VM dies
    assert [r.value for r in parked] == [b"", b"", b""]
    assert rd(b, p, A, 10).value == b""


# -- writes -------------------------------------------------------------------


def test_small_write_is_atomic_and_waits_for_room() -> None:
    b = PipeBroker()
    p = b.create(A)
    first = fill(b, p, A, PIPE_CAPACITY - 100)
    w = wr(b, p, A, b"S" * 200)
    assert not w.answered and b.stats()["bytes_buffered"] == PIPE_CAPACITY - 100
    assert rd(b, p, A, 50).value == first[:50]
    assert not w.answered  # 150 free, not enough: nothing moved
    assert rd(b, p, A, 50).value == first[50:100]
    assert w.value == (200, False)
    assert drain(b, p, A) == first[100:] + b"S" * 200


def test_nonblocking_writes() -> None:
    b = PipeBroker()
    p = b.create(A)
    fill(b, p, A, PIPE_CAPACITY - 100)
    assert wr(b, p, A, b"s" * 101, nonblock=True).value == (EAGAIN, False)  # small: all or nothing
    assert wr(b, p, A, b"B" * 10000, nonblock=True).value == (100, False)  # big: what fits
    assert wr(b, p, A, b"B" * 10000, nonblock=True).value == (EAGAIN, False)  # nothing fits
    assert b.stats()["parked_writes"] == 0


def test_big_write_is_answered_only_when_all_is_written() -> None:
    b = PipeBroker()
    p = b.create(A)
    data = random.Random(1).randbytes(3 * PIPE_CAPACITY + 123)
    w = wr(b, p, A, data)
    got = bytearray()
    while not w.answered:
        assert b.blocked() == {A: "write pipe 1"}
        got += rd(b, p, A, 10000).value
    assert w.value == (len(data), False)
    got += drain(b, p, A)
    assert got == data


def test_zero_byte_write_returns_zero() -> None:
    b = PipeBroker()
    p = b.create(A)
    fill(b, p, A, PIPE_CAPACITY)
    assert wr(b, p, A, b"").value == (0, False)
    b.close(p, A, "r")
    assert wr(b, p, A, b"").value == (0, False)  # Linux: a null write succeeds before EPIPE


def test_write_without_readers_is_epipe_with_sigpipe() -> None:
    b = PipeBroker()
    p = b.create(A)
    b.add_refs(p, B, readers=1, writers=0)
    b.close(p, A, "r")
    assert wr(b, p, A, b"x").value == (1, False)  # B still reads
    b.close(p, B, "r")
    assert wr(b, p, A, b"x").value == (EPIPE, True)
    assert wr(b, p, A, b"x" * 100000, nonblock=True).value == (EPIPE, True)
    assert b.stats()["bytes_discarded"] == 1


def test_parked_writes_get_epipe_or_their_count_when_readers_vanish() -> None:
    b = PipeBroker()
    p = b.create(A, readers=0, writers=1)
    b.add_refs(p, B, readers=1, writers=0)
    fill(b, p, A, PIPE_CAPACITY - 1000)
    big = wr(b, p, A, b"B" * 50000)  # 1000 bytes go in, the rest waits
    small = wr(b, p, A, b"s" * 10)
    assert not big.answered and not small.answered
    assert rd(b, p, B, 4000).answered  # 4000 more of the big write go in
    b.close(p, B, "r")
    assert big.value == (5000, True)
    assert small.value == (EPIPE, True)
    assert b.stats()["bytes_buffered"] == 0


def test_a_later_small_write_does_not_overtake_a_parked_big_write() -> None:
    b = PipeBroker()
    p = b.create(A, readers=1, writers=1)
    b.add_refs(p, B, readers=0, writers=1)
    big = b"B" * (PIPE_CAPACITY + 5000)
    wbig = wr(b, p, A, big)
    wsmall = wr(b, p, B, b"s" * 2000)
    assert wr(b, p, B, b"nb", nonblock=True).value == (EAGAIN, False)  # would overtake
    assert rd(b, p, A, 6000).value == b"B" * 6000  # room for the small one, but big is first
    assert wbig.value == (len(big), False)
    assert not wsmall.answered  # 1000 free after the big write's remainder
    assert rd(b, p, A, 1000).value == b"B" * 1000
    assert wsmall.value == (2000, False)
    assert drain(b, p, A) == b"B" * (len(big) - 7000) + b"s" * 2000


def test_parked_writes_complete_in_fifo_order() -> None:
    b = PipeBroker()
    p = b.create(A)
    b.add_refs(p, B, readers=0, writers=1)
    first = fill(b, p, A, PIPE_CAPACITY)
    order: list[tuple[int, int]] = []
    for i, h in enumerate([A, B, A, B]):
        b.write(
            p, h, bytes([i]) * 3000, False, lambda count, _sigpipe, i=i: order.append((i, count))
        )
    assert b.blocked() == {A: "write pipe 1", B: "write pipe 1"}
    assert rd(b, p, A, 5000).value == first[:5000]  # room for one
    assert order == [(0, 3000)]
    assert drain(b, p, A) == first[5000:] + b"".join(bytes([i]) * 3000 for i in range(4))
    assert order == [(i, 3000) for i in range(4)]


# -- refs, errors, lifetime ---------------------------------------------------


def test_unknown_pipe_or_missing_end_is_ebadf() -> None:
    b = PipeBroker()
    assert rd(b, 42, A, 1).value == EBADF
    assert wr(b, 42, A, b"x").value == (EBADF, False)
    p = b.create(A, readers=1, writers=0)
    b.add_refs(p, B, readers=0, writers=1)
    assert wr(b, p, A, b"x").value == (EBADF, False)  # A holds only the read end
    assert rd(b, p, B, 1).value == EBADF
    assert rd(b, p, C, 1).value == EBADF
    b.close(42, A, "r")  # ignored
    with pytest.raises(ValueError):
        b.add_refs(42, A, 1, 0)
    with pytest.raises(ValueError):
        b.close(p, A, "x")
    with pytest.raises(ValueError):
        b.create(A, readers=0, writers=0)
    with pytest.raises(ValueError):
        b.create(A, b"x" * (PIPE_CAPACITY + 1))


def test_extra_closes_are_ignored_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    b = PipeBroker()
    p = b.create(A, readers=1, writers=1)
    b.add_refs(p, B, readers=1, writers=0)
    b.close(p, A, "w")
    with caplog.at_level(logging.WARNING, logger="tender_service.transports.broker"):
        for _ in range(5):
            b.close(p, A, "w")
            b.close(p, C, "r")
    assert len(caplog.records) == 1
    assert rd(b, p, B, 1).value == b""  # still EOF, refs did not go negative
    b.add_refs(p, A, readers=0, writers=1)
    assert not rd(b, p, B, 1).answered  # one writer again, not zero


def test_a_pipe_without_refs_is_deleted() -> None:
    b = PipeBroker()
    p = b.create(A, b"unread")
    q = b.create(B)
    assert (p, q) == (1, 2) and b.stats()["pipes"] == 2
    b.close(p, A, "r")
    assert b.stats()["bytes_discarded"] == 6
    b.close(p, A, "w")
    assert b.stats()["pipes"] == 1
    assert rd(b, p, A, 1).value == EBADF
    b.drop_holder(B)
    assert b.stats()["pipes"] == 0 and b.stats()["pipes_created"] == 2


def test_drop_holder_cancels_its_requests_and_releases_its_refs() -> None:
    b = PipeBroker()
    p = b.create(A, readers=1, writers=1)  # A: reader and writer
    b.add_refs(p, B, readers=0, writers=2)
    q = b.create(B, readers=1, writers=0)
    b.add_refs(q, A, readers=0, writers=1)
    fill(b, p, B, PIPE_CAPACITY - 10)
    wb = wr(b, p, B, b"b" * 5000)  # 10 bytes in, the rest parked
    wa = wr(b, p, A, b"a" * 20)
    rq = rd(b, q, B, 10)
    assert b.blocked() == {B: "write pipe 1, read pipe 2", A: "write pipe 1"}
    b.drop_holder(B)
    assert not wb.answered and not rq.answered  # never answered
    assert b.blocked() == {A: "write pipe 1"}
    assert b.stats()["pipes"] == 2  # A still holds a write end of q
    assert wr(b, q, A, b"x").value == (EPIPE, True)  # B was q's only reader
    got = drain(b, p, A)
    assert wa.value == (20, False)  # after B's cancelled write, A's goes next
    assert got.endswith(b"b" * 10 + b"a" * 20)  # what B already wrote stays
    assert rd(b, p, A, 1, nonblock=True).value == EAGAIN  # A still writes
    b.close(p, A, "w")
    assert rd(b, p, A, 1).value == b""
    b.drop_holder(A)
    stats = b.stats()
    assert (stats["pipes"], stats["parked_reads"], stats["parked_writes"]) == (0, 0, 0)
    assert stats["bytes_written"] == stats["bytes_read"] == PIPE_CAPACITY - 10 + 10 + 20


def test_a_parked_request_keeps_its_end_open() -> None:
    """Like an in-flight syscall holding its file: closing the fd meanwhile changes nothing."""
    b = PipeBroker()
    p = b.create(A, readers=1, writers=0)
    b.add_refs(p, B, readers=0, writers=1)
    r = rd(b, p, A, 10)
    b.close(p, A, "r")
    assert wr(b, p, B, b"late").value == (4, False)
    assert r.value == b"late"
    assert wr(b, p, B, b"x").value == (EPIPE, True)  # now nobody reads


def test_stats_count_bytes_and_parked_requests() -> None:
    b = PipeBroker()
    p = b.create(A, b"abc")
    rd(b, p, A, 2)
    w = wr(b, p, A, b"z" * (PIPE_CAPACITY + 1))
    q = b.create(B)
    rd(b, q, B, 1)
    assert b.stats() == {
        "pipes": 2,
        "pipes_created": 2,
        "bytes_written": 3 + PIPE_CAPACITY - 1,  # the buffered bytes count as written
        "bytes_read": 2,
        "bytes_discarded": 0,
        "bytes_buffered": PIPE_CAPACITY,
        "parked_reads": 1,
        "parked_writes": 1,
    }
    assert not w.answered


def test_a_reply_may_call_the_broker_again() -> None:
    """A VM's next request often follows its reply at once; chains must not recurse or reorder."""
    b = PipeBroker()
    p = b.create(A)
    b.add_refs(p, B, readers=1, writers=0)
    got: list[bytes] = []

    def reader(value: bytes | int) -> None:
        assert isinstance(value, bytes)
        got.append(value)
        if value:
            b.read(p, B, 1000, False, reader)

    b.read(p, B, 1000, False, reader)
    data = random.Random(2).randbytes(5 * PIPE_CAPACITY)
    w = wr(b, p, A, data)
    assert w.value == (len(data), False)
    b.close(p, A, "w")
    assert b"".join(got) == data and got[-1] == b""


def test_a_failing_reply_is_logged_and_the_others_still_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = PipeBroker()
    p = b.create(A)

    def broken(value: bytes | int) -> None:
        raise ConnectionError("VM channel gone")

    b.read(p, A, 3, False, broken)
    later = rd(b, p, A, 3)
    with caplog.at_level(logging.ERROR, logger="tender_service.transports.broker"):
        assert wr(b, p, A, b"abcdef").value == (6, False)
    assert later.value == b"def"
    assert "reply callback failed" in caplog.text


# -- many holders -------------------------------------------------------------

HEADER = struct.Struct("<HII")  # writer, seq, payload length


def record(writer: int, seq: int, size: int) -> bytes:
    payload = random.Random(writer * 1_000_003 + seq).randbytes(size - HEADER.size)
    return HEADER.pack(writer, seq, len(payload)) + payload


def parse(stream: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Records back out of a pipe's stream; a torn record fails here."""
    at = 0
    while at < len(stream):
        writer, seq, n = HEADER.unpack_from(stream, at)
        payload = stream[at + HEADER.size : at + HEADER.size + n]
        assert payload == record(writer, seq, n + HEADER.size)[HEADER.size :], (
            f"torn record {writer}/{seq}"
        )
        yield writer, seq, payload
        at += HEADER.size + n


@dataclass
class Sim:
    """Holders taking turns at random: each has at most one request outstanding, like a VM."""

    broker: PipeBroker
    pipe: int
    rng: random.Random
    stream: bytearray = field(default_factory=bytearray)
    busy: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)

    def reader(self, holder: int, max_read: int, nonblock_odds: float) -> Iterator[None]:
        eof = False

        def done(value: bytes | int) -> None:
            nonlocal eof
            self.busy.discard(holder)
            if value == EAGAIN:
                return
            assert isinstance(value, bytes)
            eof = not value
            self.stream += value

        while not eof:
            self.busy.add(holder)
            nb = self.rng.random() < nonblock_odds
            self.broker.read(self.pipe, holder, self.rng.randint(1, max_read), nb, done)
            yield
        self.broker.close(self.pipe, holder, "r")

    def writer(self, holder: int, records: list[bytes], nonblock_odds: float) -> Iterator[None]:
        for rec in records:
            sent = False

            def done(count: int, sigpipe: bool, rec: bytes = rec) -> None:
                nonlocal sent
                self.busy.discard(holder)
                assert not sigpipe
                assert count in (len(rec), EAGAIN), count
                sent = count == len(rec)

            while not sent:
                self.busy.add(holder)
                nb = len(rec) <= PIPE_BUF and self.rng.random() < nonblock_odds
                self.broker.write(self.pipe, holder, rec, nb, done)
                yield
        self.broker.close(self.pipe, holder, "w")

    def run(self, scripts: dict[int, Iterator[None]]) -> None:
        while len(self.finished) < len(scripts):
            ready = [h for h in scripts if h not in self.busy and h not in self.finished]
            assert ready, f"deadlock: {self.broker.blocked()}"
            h = self.rng.choice(ready)
            if next(scripts[h], StopIteration) is StopIteration:
                self.finished.add(h)


def shared_pipe(broker: PipeBroker, readers: list[int], writers: list[int]) -> int:
    """A pipe created by its first holder, with the others' refs added as at fork."""
    holders = readers + writers
    p = broker.create(holders[0], readers=holders[0] in readers, writers=holders[0] in writers)
    for h in holders[1:]:
        broker.add_refs(p, h, readers=int(h in readers), writers=int(h in writers))
    return p


@pytest.mark.parametrize("seed", range(4))
def test_many_writers_never_interleave(seed: int) -> None:
    rng = random.Random(seed)
    b = PipeBroker()
    readers, writers = [1, 2], [3, 4, 5, 6, 7, 8]
    sim = Sim(b, shared_pipe(b, readers, writers), rng)
    plans: dict[int, list[bytes]] = {}
    for w in writers:
        sizes = [
            rng.choice([HEADER.size, 100, PIPE_BUF - 1, PIPE_BUF, PIPE_BUF + 1, 30000, 100000])
            for _ in range(30)
        ]
        plans[w] = [record(w, seq, size) for seq, size in enumerate(sizes)]
    scripts = {r: sim.reader(r, rng.choice([1000, 5000, 70000]), 0.3) for r in readers}
    scripts |= {w: sim.writer(w, plans[w], 0.3) for w in writers}
    sim.run(scripts)
    seen = {w: [] for w in writers}
    for writer, seq, _ in parse(bytes(sim.stream)):  # every record, even > PIPE_BUF, is whole
        seen[writer].append(seq)
    assert seen == {w: list(range(30)) for w in writers}
    assert b.stats()["pipes"] == 0 and b.blocked() == {}


def test_16_mib_between_several_holders_with_checksums() -> None:
    rng = random.Random(16)
    b = PipeBroker()
    readers, writers = [1, 2, 3], [4, 5, 6, 7]
    sim = Sim(b, shared_pipe(b, readers, writers), rng)
    per_writer = 4 << 20
    plans: dict[int, list[bytes]] = {}
    for w in writers:
        plans[w], left, seq = [], per_writer, 0
        while left:
            size = rng.choice([64, PIPE_BUF, 20000, PIPE_CAPACITY, 3 * PIPE_CAPACITY])
            if left - size < HEADER.size:  # no room left for another record
                size = left
            plans[w].append(record(w, seq, size))
            left -= size
            seq += 1
    expected = {
        w: hashlib.sha256(b"".join(r[HEADER.size :] for r in plans[w])).hexdigest() for w in writers
    }
    scripts = {r: sim.reader(r, rng.choice([4096, 65536, 1 << 20]), 0.0) for r in readers}
    scripts |= {w: sim.writer(w, plans[w], 0.0) for w in writers}
    sim.run(scripts)
    total = sum(len(r) for plan in plans.values() for r in plan)
    assert len(sim.stream) == total >= 16 << 20
    digests = {w: hashlib.sha256() for w in writers}
    for writer, _, payload in parse(bytes(sim.stream)):
        digests[writer].update(payload)
    assert {w: d.hexdigest() for w, d in digests.items()} == expected
    assert b.stats()["bytes_written"] == b.stats()["bytes_read"] == total


# -- the broker against a reference model --------------------------------------


@dataclass
class MReq:
    rid: int
    holder: int
    kind: str  # "r" or "w"
    n: int = 0
    data: bytes = b""
    done: int = 0


@dataclass
class MPipe:
    buf: deque[int]
    readers: dict[int, int]
    writers: dict[int, int]
    pending: list[MReq] = field(default_factory=list)  # reads and writes, in arrival order


class Model:
    """Linux pipe rules written the plain way: a deque of bytes, counts, one list of waiters."""

    def __init__(self) -> None:
        self.pipes: dict[int, MPipe] = {}
        self.next_id = 1
        self.written = self.read_bytes = self.discarded = self.created = 0

    def waiting(self, p: MPipe, kind: str) -> list[MReq]:
        return [q for q in p.pending if q.kind == kind]

    def can_read_more(self, p: MPipe) -> bool:
        return sum(p.readers.values()) > 0 or bool(self.waiting(p, "r"))

    def can_write_more(self, p: MPipe) -> bool:
        return sum(p.writers.values()) > 0 or bool(self.waiting(p, "w"))

    def take(self, p: MPipe, n: int) -> bytes:
        out = bytes(p.buf.popleft() for _ in range(min(n, len(p.buf))))
        self.read_bytes += len(out)
        return out

    def push(self, p: MPipe, q: MReq) -> int:
        room = PIPE_CAPACITY - len(p.buf)
        left = len(q.data) - q.done
        k = min(left, room)
        if len(q.data) <= PIPE_BUF and k != left:
            k = 0
        p.buf.extend(q.data[q.done : q.done + k])
        q.done += k
        self.written += k
        return k

    def settle(self, pid: int, out: dict) -> dict:
        p = self.pipes[pid]
        while True:
            for q in self.waiting(p, "r"):
                if not p.buf and self.can_write_more(p):
                    break
                p.pending.remove(q)
                out[q.rid] = self.take(p, q.n)
            if not self.can_read_more(p):
                self.discarded += len(p.buf)
                p.buf.clear()
                for q in self.waiting(p, "w"):
                    p.pending.remove(q)
                    out[q.rid] = (q.done or EPIPE, True)
                break
            writes = self.waiting(p, "w")
            if not writes or not self.push(p, writes[0]):
                break
            if writes[0].done == len(writes[0].data):
                p.pending.remove(writes[0])
                out[writes[0].rid] = (writes[0].done, False)
        if not any(p.readers.values()) and not any(p.writers.values()):
            assert not p.pending
            del self.pipes[pid]
        return out

    def create(self, holder: int, buffered: bytes, r: int, w: int) -> int:
        pid = self.next_id
        self.next_id += 1
        self.created += 1
        self.written += len(buffered) if r else 0
        self.pipes[pid] = MPipe(deque(buffered if r else b""), {holder: r}, {holder: w})
        return pid

    def add_refs(self, pid: int, holder: int, r: int, w: int) -> None:
        p = self.pipes[pid]
        p.readers[holder] = p.readers.get(holder, 0) + r
        p.writers[holder] = p.writers.get(holder, 0) + w

    def close(self, pid: int, holder: int, end: str) -> dict:
        p = self.pipes.get(pid)
        counts = {} if p is None else p.readers if end == "r" else p.writers
        if counts.get(holder, 0) == 0:
            return {}
        counts[holder] -= 1
        return self.settle(pid, {})

    def drop(self, holder: int) -> dict:
        out: dict = {}
        for pid in list(self.pipes):
            p = self.pipes[pid]
            p.pending = [q for q in p.pending if q.holder != holder]
            p.readers.pop(holder, None)
            p.writers.pop(holder, None)
            self.settle(pid, out)
        return out

    def read(self, pid: int, holder: int, n: int, nonblock: bool, rid: int) -> dict:
        out: dict = {}
        p = self.pipes.get(pid)
        if p is None or p.readers.get(holder, 0) == 0:
            return {rid: EBADF}
        if n == 0:
            out[rid] = b""
        elif self.waiting(p, "r"):
            if nonblock:
                out[rid] = EAGAIN
            else:
                p.pending.append(MReq(rid, holder, "r", n=n))
        elif p.buf or not self.can_write_more(p):
            out[rid] = self.take(p, n)
        elif nonblock:
            out[rid] = EAGAIN
        else:
            p.pending.append(MReq(rid, holder, "r", n=n))
        return self.settle(pid, out)

    def write(self, pid: int, holder: int, data: bytes, nonblock: bool, rid: int) -> dict:
        out: dict = {}
        p = self.pipes.get(pid)
        if p is None or p.writers.get(holder, 0) == 0:
            return {rid: (EBADF, False)}
        q = MReq(rid, holder, "w", data=data)
        if not data:
            out[rid] = (0, False)
        elif not self.can_read_more(p):
            out[rid] = (EPIPE, True)
        elif self.waiting(p, "w"):
            if nonblock:
                out[rid] = (EAGAIN, False)
            else:
                p.pending.append(q)
        else:
            self.push(p, q)
            if q.done == len(data):
                out[rid] = (q.done, False)
            elif nonblock:
                out[rid] = (q.done or EAGAIN, False)
            else:
                p.pending.append(q)
        return self.settle(pid, out)

    def blocked(self) -> dict[int, str]:
        waits: dict[int, list[str]] = {}
        for pid, p in self.pipes.items():
            for q in p.pending:
                what = f"{'read' if q.kind == 'r' else 'write'} pipe {pid}"
                if what not in waits.setdefault(q.holder, []):
                    waits[q.holder].append(what)
        return {h: ", ".join(w) for h, w in waits.items()}


HOLDERS = st.sampled_from([A, B, C])
COUNTS = st.integers(0, 2)
PICK = st.integers(0, 15)  # mostly a live pipe / a holder with the right end, sometimes anything


class BrokerVsModel(RuleBasedStateMachine):
    """Random request sequences: the broker's replies must equal the model's, each exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.broker = PipeBroker()
        self.model = Model()
        self.rid = 0
        self.got: dict[int, object] = {}
        self.answered: set[int] = set()

    def collect(self, expected: dict) -> None:
        got, self.got = self.got, {}
        assert got == expected
        assert not self.answered & got.keys()
        self.answered |= got.keys()

    def callback(self, rid: int, kind: str) -> Callable[..., None]:
        def on_read(value: bytes | int) -> None:
            assert rid not in self.got, "answered twice"
            self.got[rid] = value

        def on_write(count: int, sigpipe: bool) -> None:
            assert rid not in self.got, "answered twice"
            self.got[rid] = (count, sigpipe)

        return on_read if kind == "r" else on_write

    def pipe_id(self, pick: int) -> int:
        live = sorted(self.model.pipes)
        if pick < 13 and live:
            return live[pick % len(live)]
        return pick % (self.model.next_id + 1) or 99  # deleted or never created

    def holder(self, pid: int, end: str, pick: int) -> int:
        p = self.model.pipes.get(pid)
        refs = {} if p is None else p.readers if end == "r" else p.writers
        holding = [h for h, n in sorted(refs.items()) if n]
        if pick < 13 and holding:
            return holding[pick % len(holding)]
        return [A, B, C][pick % 3]

    @initialize(
        r=st.lists(COUNTS, min_size=3, max_size=3), w=st.lists(COUNTS, min_size=3, max_size=3)
    )
    def first_pipe(self, r: list[int], w: list[int]) -> None:
        """A pipe shared at fork: A holds both ends, B and C what they inherited."""
        self.create(A, 1, 1, b"")
        for h, nr, nw in zip([B, C], r, w, strict=False):
            self.broker.add_refs(1, h, nr, nw)
            self.model.add_refs(1, h, nr, nw)

    @precondition(lambda self: len(self.model.pipes) < 3)
    @rule(holder=HOLDERS, r=COUNTS, w=COUNTS, buffered=st.binary(max_size=20))
    def create(self, holder: int, r: int, w: int, buffered: bytes) -> None:
        if r + w == 0:
            r = 1
        assert self.broker.create(holder, buffered, r, w) == self.model.create(
            holder, buffered, r, w
        )

    @rule(i=PICK, holder=HOLDERS, r=COUNTS, w=COUNTS)
    def add_refs(self, i: int, holder: int, r: int, w: int) -> None:
        pid = self.pipe_id(i)
        if pid not in self.model.pipes:
            with pytest.raises(ValueError):
                self.broker.add_refs(pid, holder, r, w)
            return
        self.broker.add_refs(pid, holder, r, w)
        self.model.add_refs(pid, holder, r, w)

    @rule(i=PICK, who=PICK, end=st.sampled_from("rw"))
    def close(self, i: int, who: int, end: str) -> None:
        pid = self.pipe_id(i)
        holder = self.holder(pid, end, who)
        self.broker.close(pid, holder, end)
        self.collect(self.model.close(pid, holder, end))

    @rule(holder=HOLDERS)
    def drop_holder(self, holder: int) -> None:
        self.broker.drop_holder(holder)
        self.collect(self.model.drop(holder))

    @rule(
        i=PICK,
        who=PICK,
        n=st.sampled_from([0, 1, 7, 4096, 70000]),
        nonblock=st.booleans(),
    )
    def read(self, i: int, who: int, n: int, nonblock: bool) -> None:
        pid, rid = self.pipe_id(i), self.next_rid()
        holder = self.holder(pid, "r", who)
        self.broker.read(pid, holder, n, nonblock, self.callback(rid, "r"))
        self.collect(self.model.read(pid, holder, n, nonblock, rid))

    @rule(
        i=PICK,
        who=PICK,
        size=st.sampled_from([0, 1, 100, PIPE_BUF, PIPE_BUF + 1, 30000, PIPE_CAPACITY, 70000]),
        nonblock=st.booleans(),
    )
    def write(self, i: int, who: int, size: int, nonblock: bool) -> None:
        pid, rid = self.pipe_id(i), self.next_rid()
        holder = self.holder(pid, "w", who)
        data = random.Random(rid).randbytes(size)
        self.broker.write(pid, holder, data, nonblock, self.callback(rid, "w"))
        self.collect(self.model.write(pid, holder, data, nonblock, rid))

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    @invariant()
    def same_state(self) -> None:
        assert self.broker.blocked() == self.model.blocked()
        m = self.model
        pending = [q for p in m.pipes.values() for q in p.pending]
        assert self.broker.stats() == {
            "pipes": len(m.pipes),
            "pipes_created": m.created,
            "bytes_written": m.written,
            "bytes_read": m.read_bytes,
            "bytes_discarded": m.discarded,
            "bytes_buffered": sum(len(p.buf) for p in m.pipes.values()),
            "parked_reads": sum(q.kind == "r" for q in pending),
            "parked_writes": sum(q.kind == "w" for q in pending),
        }
        s = self.broker.stats()
        assert s["bytes_written"] == s["bytes_read"] + s["bytes_discarded"] + s["bytes_buffered"]


BrokerVsModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_broker_matches_the_model = BrokerVsModel.TestCase


# -- attachments (SCM_RIGHTS across VMs) ------------------------------------------------
def wrf(b: PipeBroker, pipe: int, holder: int, data: bytes, files, nonblock: bool = False) -> Req:
    r = Req()
    b.write(pipe, holder, data, nonblock, r.on_write, files)
    return r


class FilesReq(Req):
    def on_read(self, value: bytes | int, files=None) -> None:  # type: ignore[override]
        self.replies.append((value, files))


def rdf(b: PipeBroker, pipe: int, holder: int, n: int, nonblock: bool = False) -> FilesReq:
    r = FilesReq()
    b.read(pipe, holder, n, nonblock, r.on_read)
    return r


def test_mark_is_a_barrier_as_unix7_says() -> None:
    """unix(7): 4 bytes, then 1 byte with files, then 4 bytes; reads of 20 get 5 bytes
    with the files, then 4 bytes."""
    b = PipeBroker()
    p = b.create(A)
    assert wr(b, p, A, b"abcd").value == (4, False)
    assert wrf(b, p, A, b"e", ["f1"]).value == (1, False)
    assert wr(b, p, A, b"fghi").value == (4, False)
    assert rdf(b, p, A, 20).value == (b"abcde", ["f1"])
    assert rdf(b, p, A, 20).value == (b"fghi", None)


def test_two_marks_never_in_one_read() -> None:
    b = PipeBroker()
    p = b.create(A)
    wrf(b, p, A, b"xy", ["f1"])
    wrf(b, p, A, b"z", ["f2"])
    assert rdf(b, p, A, 1).value == (b"x", ["f1"])  # files with the first byte
    # the rest of that write is plain now: a read glues it to the next mark's bytes
    assert rdf(b, p, A, 10).value == (b"yz", ["f2"])
    wrf(b, p, A, b"u", ["f3"])
    wrf(b, p, A, b"v", ["f4"])
    assert rdf(b, p, A, 10).value == (b"u", ["f3"])  # stops at the end of a mark


def test_mark_on_the_first_piece_of_a_large_write() -> None:
    b = PipeBroker()
    p = b.create(A)
    big = bytes(PIPE_CAPACITY + 10)
    w = wrf(b, p, A, big, ["f"])
    assert not w.answered
    first = rdf(b, p, A, PIPE_CAPACITY * 2).value
    assert first == (bytes(PIPE_CAPACITY), ["f"])
    assert w.value == (len(big), False)
    assert rdf(b, p, A, 100).value == (bytes(10), None)


def test_marked_bytes_discarded_release_their_files() -> None:
    gone: list = []
    b = PipeBroker(discard=gone.append)
    p = b.create(A)
    wrf(b, p, A, b"data", ["f1"])
    b.close(p, A, "r")
    assert gone == [["f1"]]


def test_failed_write_keeps_files_with_the_writer() -> None:
    gone: list = []
    b = PipeBroker(discard=gone.append)
    p = b.create(A, readers=0, writers=1)
    assert wrf(b, p, A, b"x", ["f"]).value == (EPIPE, True)
    q = b.create(A)
    fill(b, q, A, PIPE_CAPACITY)
    assert wrf(b, q, A, b"x", ["g"], nonblock=True).value == (EAGAIN, False)
    assert gone == []  # a non-positive count: the caller releases them


def test_parked_write_with_files_of_a_dead_holder_is_discarded() -> None:
    gone: list = []
    b = PipeBroker(discard=gone.append)
    p = b.create(A)
    b.add_refs(p, B, 1, 1)
    fill(b, p, A, PIPE_CAPACITY)
    w = wrf(b, p, B, b"x", ["f"])
    b.drop_holder(B)
    assert not w.answered and gone == [["f"]]
    assert b.holds(p, A, "r") and not b.holds(p, B, "w")


@pytest.mark.parametrize("seed", range(40))
def test_files_are_delivered_once_in_order_or_discarded(seed: int) -> None:
    """Random writes (some with files), reads and a close on one pipe: every write's
    files end exactly once: with a read (in write order, one mark per read, the read
    holding the first byte of their write), back to the writer (a reply <= 0), or
    discarded.  Each write's bytes are its step number, so the stream shows whose
    bytes a read took."""
    rnd = random.Random(seed)
    gone: list = []
    b = PipeBroker(discard=gone.append)
    p = b.create(A, readers=1, writers=1)
    b.add_refs(p, B, 1, 1)
    sent: list[int] = []  # steps of writes with files
    refused: list = []
    delivered: list[tuple[list, int, int]] = []  # files, the read's [start, end) in stream
    stream = bytearray()

    def on_write(files) -> Callable[[int, bool], None]:
        def reply(n: int, sig: bool) -> None:
            if files is not None and n <= 0:
                refused.append(files)

        return reply

    def on_read(data: bytes | int, files=None) -> None:
        if isinstance(data, int):
            return
        if files is not None:
            delivered.append((files, len(stream), len(stream) + len(data)))
        stream.extend(data)

    for step in range(60):
        op = rnd.random()
        if op < 0.45:
            size = rnd.choice([1, 3, 100, PIPE_BUF + 1, 30000, PIPE_CAPACITY + 5])
            files = [step] if rnd.random() < 0.5 else None
            if files is not None:
                sent.append(step)
            data = bytes([step]) * size
            b.write(p, A, data, rnd.random() < 0.5, on_write(files), files)
        elif op < 0.95:
            b.read(p, B, rnd.choice([1, 2, 50, 4096, 70000]), True, on_read)
        else:
            b.close(p, B, "r")  # the last reader goes: the rest is discarded
            break
    b.drop_holder(A)
    b.drop_holder(B)
    ends = [f for f, _, _ in delivered] + refused + gone
    assert sorted(f[0] for f in ends) == sorted(sent)  # each exactly once
    assert [f[0] for f, _, _ in delivered] == sorted(f[0] for f, _, _ in delivered)  # in order
    for files, start, end in delivered:  # the read holds their write's first byte...
        assert start <= stream.index(files[0]) < end
        assert stream[end - 1] == files[0]  # ...and ends in that write's bytes


def test_add_refs_many_adds_all_or_none() -> None:
    """A fork's child gets its ends of every pipe in one call: one bad entry (a pipe
    that does not exist, a negative count) and none is added."""
    b = PipeBroker()
    p, q = b.create(A), b.create(A, readers=1, writers=0)
    for bad in ((p + q + 1, 1, 0), (q, -1, 0)):
        with pytest.raises(ValueError):
            b.add_refs_many(B, [(p, 1, 0), (q, 0, 1), bad])
        assert not any(b.holds(x, B, e) for x in (p, q) for e in "rw")
    b.add_refs_many(B, [(p, 1, 0), (p, 0, 1), (q, 1, 0)])
    assert b.holds(p, B, "r") and b.holds(p, B, "w") and b.holds(q, B, "r")
    assert not b.holds(q, B, "w")

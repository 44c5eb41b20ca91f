"""Pipe rings (transports/pipe_ring.py): Linux's pipe semantics in a shared segment,
the waiter table and its wake-ups, across processes; that a VM-clone instance over
shm moves its pipes' bytes through rings, not through the supervisor; and that a VM
waiting in poll on a pipe across VMs (a ring, or over tcp the broker's) is woken by
the pipe's change."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support import image_path

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.rump.files import POLLERR, POLLHUP, READABLE, WRITABLE
from tender_service.rump.pipe import PIPE_BUF, PIPE_CAPACITY
from tender_service.rump.vminfo import VmConfig
from tender_service.transports import pipe_ring, remote_pipe, shm_segment
from tender_service.transports.pipe_ring import READ, SLOTS, WAIT, WRITE, PipeRing, Waiter, Wakers
from tender_service.transports.remote_pipe import SpinPolicy
from tender_service.transports.shm_names import SHM_DIR


@pytest.fixture
def ring() -> Iterator[PipeRing]:
    r = PipeRing.create(b"", readers=1, writers=1, wakers=WAKERS)
    try:
        yield r
    finally:
        r.close()


#: who the rings of these tests wake: the wake-up pipes they made (as a supervisor's)
WAKERS = Wakers()


class WakePipe:
    """A kernel's wake-up pipe, as the supervisor makes it and hands it to the VM."""

    def __init__(self) -> None:
        self.token = pipe_ring.new_token()
        self.fd = pipe_ring.wake_pipe()
        WAKERS.add(self.token, os.dup(self.fd))

    def woken(self) -> bool:
        """A byte came (and is taken)."""
        if not select.select([self.fd], [], [], 0)[0]:
            return False
        os.read(self.fd, 4096)
        return True

    def close(self) -> None:
        WAKERS.remove(self.token)
        os.close(self.fd)


@pytest.fixture
def wake() -> Iterator[WakePipe]:
    f = WakePipe()
    try:
        yield f
    finally:
        f.close()


def test_bytes_go_through_in_order_across_the_wrap(ring: PipeRing) -> None:
    data = bytes(range(256)) * 200  # 51,200 bytes: the second write wraps
    assert ring.write(data, False, None) == len(data)
    assert ring.read(len(data), len(data), None) == data
    assert ring.write(data, False, None) == len(data)
    assert ring.read(1000, 1000, None) == data[:1000]
    assert ring.read(PIPE_CAPACITY, PIPE_CAPACITY, None) == data[1000:]


def test_eof_and_epipe_follow_the_counts(ring: PipeRing) -> None:
    assert ring.write(b"last", True, None) == 4
    ring.set_counts(1, 0)  # the broker: no writer left
    assert ring.read(10, 10, None) == b"last"  # what was written is read first
    assert ring.read(10, 10, None) == b""  # then EOF
    assert ring.poll(False) == POLLHUP
    ring.set_counts(0, 1)
    assert ring.write(b"x", True, None) == -errno.EPIPE
    assert ring.poll(True) & POLLERR


def test_capacity_atomicity_and_eagain(ring: PipeRing) -> None:
    assert ring.write(bytes(PIPE_CAPACITY - 100), False, None) == PIPE_CAPACITY - 100
    assert ring.poll(True) & WRITABLE and ring.poll(False) & READABLE
    # at most PIPE_BUF bytes: all or nothing; more: what fits
    assert ring.write(bytes(PIPE_BUF), True, None) == -errno.EAGAIN
    assert ring.write(bytes(PIPE_BUF + 1), False, None) == 100
    assert ring.write(b"x", False, None) == -errno.EAGAIN
    assert not ring.poll(True) & WRITABLE
    # a read that would not fit the reader's buffer takes nothing
    assert ring.read(50, 10, None) == -errno.EFAULT
    assert ring.read(10, 10, None) == bytes(10)


def test_a_waiter_is_woken_once_by_the_change_it_waits_for(ring: PipeRing, wake: WakePipe) -> None:
    reader = Waiter(wake.token, 3)
    assert ring.read(10, 10, reader) is WAIT
    assert ring.read(10, 10, reader) is WAIT  # registered once
    assert ring.waiting() == [(3, READ, 0)] and not wake.woken()
    assert ring.write(b"data", True, None) == 4
    assert wake.woken() and ring.waiting() == []  # the change took the entry
    assert ring.read(10, 10, reader) == b"data"
    assert ring.write(bytes(PIPE_CAPACITY), False, None) == PIPE_CAPACITY
    assert ring.write(b"more", True, Waiter(wake.token, 4, 7)) is WAIT
    assert ring.write(b"more", True, Waiter(wake.token, 4, 8)) is WAIT  # its entry, renewed
    assert ring.waiting() == [(4, WRITE, 8)]
    assert ring.read(1, 1, None) == b"\0" and wake.woken()
    ring.set_counts(1, 1)  # a count changed: every waiter re-checks
    assert not wake.woken()
    assert ring.read(10, 10, None) == bytes(10)
    assert ring.read(10, 10, Waiter(wake.token, 3)) == bytes(10)


def test_a_full_waiter_table_wakes_its_oldest(ring: PipeRing, wake: WakePipe) -> None:
    other = WakePipe()
    try:
        assert ring.read(1, 1, Waiter(other.token, 2)) is WAIT
        for pid in range(3, 3 + SLOTS - 1):
            assert ring.read(1, 1, Waiter(wake.token, pid)) is WAIT
        assert not other.woken()
        assert ring.read(1, 1, Waiter(wake.token, 99)) is WAIT  # no room: the oldest goes
        assert other.woken()
        pids = [pid for pid, _, _ in ring.waiting()]
        assert 2 not in pids and 99 in pids and len(pids) == SLOTS
    finally:
        other.close()


def test_a_waker_whose_waiter_is_gone_goes_on(ring: PipeRing) -> None:
    gone = WakePipe()
    gone.close()  # the kernel ended: nobody to wake
    assert ring.read(1, 1, Waiter(gone.token, 5)) is WAIT
    assert ring.write(b"x", True, None) == 1  # its wake-up finds nobody: no error
    assert ring.read(1, 1, None) == b"x"


def test_a_vm_cannot_resize_a_ring_and_the_supervisors_view_is_no_mapping(wake: WakePipe) -> None:
    """A ring is a memfd sealed against resizing before any VM gets its fd: a VM
    process that takes over its emulator cannot ``ftruncate`` it (a mapping's next
    touch, the supervisor's or another VM's, would be a SIGBUS) and it has no name in
    /dev/shm to open.  The supervisor's view reads the header with ``pread``."""
    sup = PipeRing.create(b"unread", readers=1, writers=1, mapped=False)
    vm = PipeRing.from_fd(sup.reopen())
    try:
        assert vm.read(2, 2, None) == b"un"
        assert (sup.buffered(), sup.written()) == (4, 6)  # the VM's read, seen by pread
        assert vm.read(10, 10, Waiter(wake.token, 7)) == b"read"
        assert vm.read(10, 10, Waiter(wake.token, 7)) is WAIT
        assert sup.waiting() == [(7, READ, 0)]
        for size in (0, pipe_ring.HEADER_SIZE, pipe_ring.SIZE * 2):  # the attack
            with pytest.raises(PermissionError):
                os.ftruncate(vm.fileno(), size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(vm.fileno(), fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: no unsealing
        assert os.fstat(vm.fileno()).st_size == pipe_ring.SIZE
        assert sup.waiting() == [(7, READ, 0)] and sup.poll(write_end=True) == WRITABLE
        assert not any(sup.name.removeprefix("memfd:") in n for n in os.listdir(SHM_DIR))
    finally:
        vm.close()
        sup.close()


def test_from_fd_refuses_what_is_not_a_ring() -> None:
    """What a VM is sent must be a sealed segment of a ring's size with a ring's
    header: anything else is refused (and its fd closed)."""
    unsealed = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, pipe_ring.SIZE)
    wrong_size = shm_segment.make_segment(pipe_ring.SIZE + 4096)
    no_magic = shm_segment.make_segment(pipe_ring.SIZE)
    for fd, why in ((unsealed, "not sealed"), (wrong_size, "wrong size"), (no_magic, "is not a")):
        with pytest.raises(ValueError, match=why):
            PipeRing.from_fd(fd)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


WRITER = """
import select, sys
from tender_service.transports.pipe_ring import PipeRing, Waiter, Wakers, WAIT
import os
ring_fd, token, wake, blocks, reader, reader_wake = map(int, sys.argv[1:])
wakers = Wakers()
wakers.add(reader, reader_wake)
ring = PipeRing.from_fd(ring_fd, wakers)
me = Waiter(token, 7)
block = bytes(range(256)) * 256
for i in range(blocks):
    data, off = (i.to_bytes(8, "little") + block)[: len(block)], 0
    while off < len(data):
        out = ring.write(data[off:], False, me)
        if out is WAIT:
            select.select([wake], [], [], 10)
            os.read(wake, 4096)
            continue
        off += out
ring.close()
"""


def test_two_processes_move_blocks_with_wake_ups(ring: PipeRing, wake: WakePipe) -> None:
    """A writer process and this reader, each waiting on its own wake-up pipe (each
    handed the other's, as VMs get them from their supervisor): every byte in order,
    then EOF once the broker's count says no writer is left."""
    mine = WakePipe()
    blocks = 200
    theirs = ring.reopen()  # an open file description of its own, as a VM gets it
    args = [theirs, wake.token, wake.fd, blocks, mine.token, mine.fd]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, *map(str, args)], pass_fds=[theirs, wake.fd, mine.fd]
    )
    os.close(theirs)
    got = bytearray()
    try:
        me = Waiter(mine.token, 3)
        want = blocks * PIPE_CAPACITY
        while len(got) < want:
            out = ring.read(PIPE_CAPACITY, PIPE_CAPACITY, me)
            if out is WAIT:
                assert select.select([mine.fd], [], [], 10)[0], "no wake-up came"
                mine.woken()
                continue
            assert isinstance(out, bytes)
            got += out
        assert writer.wait(30) == 0
        ring.set_counts(1, 0)
        assert ring.read(10, 10, me) == b""
    finally:
        writer.kill()
        mine.close()
    block = bytes(range(256)) * 256
    for i in range(blocks):
        assert (
            got[i * PIPE_CAPACITY : (i + 1) * PIPE_CAPACITY]
            == (i.to_bytes(8, "little") + block)[: len(block)]
        ), i


class Counting:
    """An observer: how many bytes brokered writes and rings reported."""

    def __init__(self) -> None:
        self.brokered = 0
        self.ringed = 0

    def pipe_write(self, nbytes: int, seconds: float) -> None:
        self.brokered += nbytes

    def pipe_bytes(self, nbytes: int) -> None:
        self.ringed += nbytes


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_an_instance_over_shm_moves_its_pipes_through_rings(pool: WarmPool, transport: str) -> None:
    """pipe_bw's 8 MiB between two VMs: over shm no write reaches the supervisor (the
    bytes are counted once, when the ring goes), over tcp every write does."""
    seen = Counting()
    before = _shm_names()
    r = run_vmclone(
        image_path("pipe_bw"), ["-m", "8"], transport=transport, pool=pool, observer=seen
    )
    assert (r.outcome, r.exit_code) == ("exited", 0), r.reports
    if transport == "shm":
        assert (seen.brokered, seen.ringed) == (0, 8 << 20)
    else:
        assert (seen.brokered, seen.ringed) == (8 << 20, 0)
    assert _shm_names() - before == set()  # no name of ours in /dev/shm at all


def _shm_names() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("uf")}


def test_a_poller_is_a_waiter_whatever_the_events(ring: PipeRing, wake: WakePipe) -> None:
    """A VM in poll, select or epoll_wait registers with every ring it polls, ready or
    not (an edge-triggered epoll waits for the next change even with data there): the
    next change wakes it once."""
    assert ring.poll(False, Waiter(wake.token, 3, 1)) == 0  # empty, writers: nothing yet
    assert ring.waiting() == [(3, READ, 1)] and not wake.woken()
    assert ring.write(b"x", True, None) == 1
    assert wake.woken() and ring.waiting() == []
    assert ring.poll(False, Waiter(wake.token, 3, 2)) == READABLE  # ready: registered too
    assert ring.poll(True, Waiter(wake.token, 4, 3)) == WRITABLE
    assert ring.waiting() == [(3, READ, 2), (4, WRITE, 3)]
    assert ring.read(1, 1, None) == b"x" and wake.woken() and ring.waiting() == []
    assert ring.poll(False) == 0 and ring.waiting() == []  # no waiter given: none registered


def _lines(out: list[bytes]) -> list[str]:
    """What the program printed, without its timings."""
    return [ln for ln in b"".join(out).decode().splitlines() if not ln.startswith("rtt_us=")]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("how", [[], ["-s"]], ids=["poll", "select"])
def test_vms_waiting_in_poll_are_woken_by_the_pipe(
    pool: WarmPool, how: list[str], transport: str
) -> None:
    """poll_pingpong across two VMs: each byte reaches a VM waiting in poll() or
    select() on a ring end (shm) or a brokered pipe (tcp), the same output as
    natively."""
    args = ["-n", "30", *how]
    native = subprocess.run(
        [str(image_path("poll_pingpong")), *args], capture_output=True, timeout=60, check=True
    )
    out: list[bytes] = []
    r = run_vmclone(
        image_path("poll_pingpong"),
        args,
        pool=pool,
        sink=lambda pid, fd, data: out.append(data),
        transport=transport,
    )
    assert (r.outcome, r.exit_code) == ("exited", 0), r.reports
    assert _lines(out) == _lines([native.stdout]) == ["pingpong rounds=30 ok=1"]
    assert len(b"".join(out).decode().splitlines()) == 31  # one rtt_us line per round


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_vms_polling_pipes_nobody_will_write_are_a_deadlock(pool: WarmPool, transport: str) -> None:
    """Two VMs each wait in poll() for a byte the other sends only after its own came.
    The pipes they poll wake them when they change (a ring names them as its waiters,
    the broker sends POLL_WAKE), nothing re-checks on a timer, so every VM goes idle
    with nothing on its way and the instance is ended as deadlocked (when a poll
    re-checked every 20 ms, the VMs never went idle and ran to the time limit)."""
    r = run_vmclone(
        image_path("poll_pingpong"),
        ["-d", "-n", "1"],
        pool=pool,
        config=VmConfig(timeout=30),
        transport=transport,
    )
    assert r.outcome == "deadlock", (r.outcome, r.reports)
    assert any("poll" in line for line in r.reports), r.reports


def test_a_ring_end_spins_as_long_as_its_waits_were_short(monkeypatch) -> None:
    """The spin before parking adapts to how long the end's waits last: long waits
    (a token ring's turn) halve it down to none, a short one makes it grow again, up to
    RING_SPIN (pipe_bw's waits, which a spin catches)."""
    monkeypatch.setattr(remote_pipe, "RING_SPIN", 50e-6)
    monkeypatch.setattr(remote_pipe, "SHORT_WAIT", 200e-6)
    p = SpinPolicy(budget=50e-6)
    budgets = []
    for _ in range(6):  # parked, then resumed 1 ms later: the spin was for nothing
        p.parked_at = 1.0
        p.resumed(1.001)
        budgets.append(p.budget)
    assert budgets[:4] == pytest.approx([25e-6, 12.5e-6, 6.25e-6, 3.125e-6])
    assert budgets[-1] == 0.0  # no spin at all
    p.resumed(2.0)  # no park before this call: nothing learnt
    assert p.budget == 0.0
    grown = []
    for _ in range(5):  # parked, resumed 100 us later: a spin would have caught it
        p.parked_at = 3.0
        p.resumed(3.0001)
        grown.append(p.budget)
    assert grown[:3] == pytest.approx([5e-6, 15e-6, 35e-6]) and grown[3:] == [50e-6, 50e-6]


def test_a_spin_parks_only_when_its_budget_is_spent() -> None:
    results = iter([WAIT, WAIT, 7])
    p = SpinPolicy(budget=10.0)  # long enough for the three tries
    assert p.spin(lambda: next(results)) == 7 and p.parked_at == 0.0
    p = SpinPolicy(budget=0.0)
    tries = []
    assert p.spin(lambda: tries.append(1) or WAIT) is WAIT
    assert tries == [1] and p.parked_at > 0  # one try, then the thread parks

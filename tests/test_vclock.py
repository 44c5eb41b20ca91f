"""The vDSO (machine/vclock.py, guest/runtime/vdso.c): clock_gettime, gettimeofday
and time() without a syscall, one clock with the clock syscalls, in every mode.

``clock_loop`` reads the clock alternately through libc (the vDSO) and the raw
syscall: natively and in each fork mode it finds a vDSO and no reading that goes
back.  ``tests/guest/clock_fork.c`` checks the clock across fork (a VM-clone child
goes on from its snapshot's page) and that a guest overwriting its clock page
changes nothing the kernel tells it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import image_path, native, vm

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.machine import vclock
from tender_service.machine.layout import DEFAULT_RAM, PAGE_SIZE, VDSO_BASE
from tender_service.machine.memory import GuestMemory
from tender_service.rump.vminfo import VmConfig
from tender_service.toolchain.cc import compile_guest
from tender_service.vm import CaptureSink

TESTS_GUEST = Path(__file__).resolve().parent / "guest"
MODES = ["native", "thread", "copy", "vmclone-shm", "vmclone-tcp"]

pytestmark = pytest.mark.skipif(
    not vclock.tsc_is_constant(), reason="this host's TSC has no constant rate: VMs get no vDSO"
)


@pytest.fixture(scope="module")
def clock_fork(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("clock") / "clock_fork"
    compile_guest([TESTS_GUEST / "clock_fork.c"], exe, ["-Wall", "-Werror"])
    return exe


def run_in(mode: str, pool: WarmPool | None, exe: Path, *args: str) -> str:
    """stdout of ``exe`` in ``mode`` (it must exit 0)."""
    if mode == "native":
        p = native(exe, *args)
        assert p.returncode == 0, p.stderr
        return p.stdout.decode()
    if mode in ("thread", "copy"):
        r = vm(exe, *args, fork=mode)
        assert (r.result.outcome, r.result.status) == ("exited", 0), (r.out, r.stderr)
        return r.out
    sink = CaptureSink()
    result = run_vmclone(
        exe, list(args), config=VmConfig(timeout=60), sink=sink,
        transport=mode.split("-")[1], pool=pool,
    )  # fmt: skip
    assert (result.outcome, result.status) == ("exited", 0), (sink.stderr, result.reports)
    return bytes(sink.stdout).decode()


@pytest.fixture
def mode_pool(request: pytest.FixtureRequest) -> WarmPool | None:
    mode = request.node.callspec.params["mode"]
    return request.getfixturevalue("pool") if mode.startswith("vmclone") else None


def field(out: str, key: str) -> str:
    return next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith(key + "="))


@pytest.mark.parametrize("mode", MODES)
def test_one_clock_through_the_vdso_and_the_syscall(mode: str, mode_pool: WarmPool | None) -> None:
    out = run_in(mode, mode_pool, image_path("clock_loop"), "2000")
    assert field(out, "vdso") == "yes", out
    assert field(out, "backwards") == "0", out
    assert float(field(out, "ns_per_libc_call")) > 0, out


@pytest.mark.parametrize("mode", MODES)
def test_the_clock_across_fork(mode: str, mode_pool: WarmPool | None, clock_fork: Path) -> None:
    out = run_in(mode, mode_pool, clock_fork, "fork")
    assert sorted(out.splitlines()) == [
        "child: its clock no earlier than the parent's before fork: yes",
        "parent: after wait, later still: yes",
    ], out


@pytest.mark.parametrize("mode", MODES[1:])
def test_a_guest_that_overwrites_its_clock_page_cannot_skew_the_kernel(
    mode: str, mode_pool: WarmPool | None, clock_fork: Path
) -> None:
    """Linux's vvar page is read-only; here it is guest memory.  The kernel keeps its
    own copy of the clock, so only the guest's own vDSO readings suffer; a VM-clone
    child does not adopt the page it inherited."""
    out = run_in(mode, mode_pool, clock_fork, "corrupt")
    assert out.splitlines() == [
        "syscall clocks after the page was overwritten: sane",
        "child: syscall clock sane",
    ], out


def test_the_clock_holds_when_ahead_and_steps_when_far_off() -> None:
    """CLOCK_MONOTONIC never goes back at a rebase; a page far from this host's time
    (another host's snapshot, or garbage) is not adopted."""
    mem = GuestMemory(DEFAULT_RAM)
    try:
        mem.add_region(vclock.REGION, VDSO_BASE, 2 * PAGE_SIZE)
        clock = vclock.GuestClock.for_memory(mem)
        assert clock.page == VDSO_BASE and clock.seq == 1
        clock.mono_base += 1_000_000  # 1 ms ahead of the host: it holds
        ahead = clock.now_ns(real=False)
        clock.rebase()
        assert clock.now_ns(real=False) >= ahead
        assert clock.seq == 2
        far = clock.mono_base + 10 * vclock.STEP_NS
        clock.mono_base = far  # far ahead: stepped back to the host's clock
        clock.rebase()
        assert clock.now_ns(real=False) < far
        mem.write(VDSO_BASE, b"\xff" * PAGE_SIZE)  # garbage: a fresh clock, not that one
        fresh = vclock.GuestClock.for_memory(mem)
        assert fresh.seq == 1 and fresh.mult == vclock.VVAR.unpack(mem.read(VDSO_BASE, 40))[3]
    finally:
        mem.close()


def test_without_the_region_the_host_clocks_are_read() -> None:
    mem = GuestMemory(DEFAULT_RAM)
    try:
        clock = vclock.GuestClock.for_memory(mem)
        assert clock.page == 0 and vclock.sysinfo_ehdr(mem) == 0
        assert clock.now_ns(real=False) > 0
    finally:
        mem.close()

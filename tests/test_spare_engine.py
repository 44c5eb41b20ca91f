"""Unicorn engines set up ahead of need (machine/cpu.py, ``keep_spare_engine``): a
VM-clone fork's restore and a tender instance's boot skip Unicorn's ~1 ms set-up.

A VM built on a kept engine starts from the same state as one built on a new
engine (ring 3, Linux's x87 and SSE control words) and runs a forking program
the same; the engine is used once; the warm-up of a tender process keeps one.
"""

from __future__ import annotations

from support import image_path
from unicorn import x86_const as x86

from tender_service.instance import vmserver
from tender_service.machine import cpu as cpu_mod
from tender_service.machine.cpu import (
    LINUX_FPCW,
    LINUX_MXCSR,
    USER_CS,
    Cpu,
    keep_spare_engine,
    spare_engine_ready,
)
from tender_service.machine.memory import GuestMemory
from tender_service.vm import CaptureSink, run_vm


def _start_state(cpu: Cpu) -> tuple[int, int, int]:
    return (
        cpu.uc.reg_read(x86.UC_X86_REG_CS),
        cpu.uc.reg_read(x86.UC_X86_REG_FPCW),
        cpu.uc.reg_read(x86.UC_X86_REG_MXCSR),
    )


def _take_kept() -> None:
    """Leave no kept engine behind (another test's warm-up may have kept one)."""
    if spare_engine_ready():
        mem = GuestMemory(1 << 20)
        Cpu(mem).close()
        mem.close()


def test_a_kept_engine_is_taken_once_in_the_start_state() -> None:
    _take_kept()
    mem = GuestMemory(1 << 20)
    fresh = Cpu(mem)  # nothing kept: a new engine, set up now
    keep_spare_engine()
    assert spare_engine_ready()
    taken = cpu_mod._spares.taken
    kept = Cpu(mem)
    try:
        assert cpu_mod._spares.taken == taken + 1
        assert not spare_engine_ready()  # used once, not shared by two VMs
        assert kept.uc is not fresh.uc
        assert _start_state(kept) == _start_state(fresh) == (USER_CS, LINUX_FPCW, LINUX_MXCSR)
    finally:
        for c in (fresh, kept):
            c.close()
        mem.close()


def test_keeping_twice_keeps_one() -> None:
    _take_kept()
    keep_spare_engine()
    keep_spare_engine()
    taken = cpu_mod._spares.taken
    mem = GuestMemory(1 << 20)
    cpus = [Cpu(mem), Cpu(mem)]
    try:
        assert cpu_mod._spares.taken == taken + 1
    finally:
        for c in cpus:
            c.close()
        mem.close()


def test_a_forking_program_runs_the_same_on_a_kept_engine() -> None:
    image = image_path("fork_exit_wait")
    outputs = []
    for keep in (False, True):
        _take_kept()
        if keep:
            keep_spare_engine()
        taken = cpu_mod._spares.taken
        sink = CaptureSink()
        r = run_vm(image, ["-n", "20"], sink=sink)
        assert cpu_mod._spares.taken == taken + keep
        assert r.status == 0, bytes(sink.stderr)
        outputs.append(bytes(sink.stdout))
    assert outputs[0] == outputs[1]
    assert outputs[0]


def test_the_warm_up_of_a_tender_process_keeps_an_engine() -> None:
    _take_kept()
    assert vmserver.warm_up() == 0
    assert spare_engine_ready()

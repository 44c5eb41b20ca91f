"""The CPU state a VM-clone snapshot carries (``Cpu.read_state``/``write_state``)
round-trips into another CPU, the x87 registers with all 80 bits: Unicorn's Python
binding reads and writes st0-st7 as 64-bit integers, which drops the sign and
exponent (pi came back with exponent 0)."""

from __future__ import annotations

from tender_service.machine.cpu import Cpu
from tender_service.machine.memory import GuestMemory

CODE = 0x40_0000
#: fld1; fldpi: st0 = pi, st1 = 1.0
FLD1_FLDPI = b"\xd9\xe8\xd9\xeb"
PI_80 = 0x4000_C90F_DAA2_2168_C235  # exponent 0x4000, mantissa of pi
ONE_80 = 0x3FFF_8000_0000_0000_0000


def _cpu(code: bytes = b"") -> tuple[Cpu, GuestMemory]:
    mem = GuestMemory(1 << 20)
    region = mem.add_region("code", CODE, 1 << 16)
    mem.buf[region.offset : region.offset + len(code)] = code
    return Cpu(mem), mem


def test_state_round_trips_with_x87_registers_whole() -> None:
    src, smem = _cpu(FLD1_FLDPI)
    dst, dmem = _cpu()
    try:
        src.uc.emu_start(CODE, CODE + len(FLD1_FLDPI))
        state = src.read_state()
        assert (state["st0"], state["st1"]) == (PI_80, ONE_80)
        dst.write_state(state)
        assert dst.read_state() == state
    finally:
        for cpu, mem in ((src, smem), (dst, dmem)):
            cpu.close()
            mem.close()

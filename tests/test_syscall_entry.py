"""The C syscall entry (guest/runtime/syscall_hook.c, ``Cpu.hook_syscall``) on a bare
CPU: the registers the dispatcher sees, what it returns reaching rax, and what a
dispatcher that raises leaves.  The VM tests run every syscall through it too; these
pin its contract without a kernel in between."""

from __future__ import annotations

import struct
import sys

import pytest
from unicorn import x86_const as x86

from tender_service.machine.cpu import RIP, Cpu
from tender_service.machine.memory import GuestMemory

CODE = 0x40_0000


def _mov(reg: int, value: int) -> bytes:
    """movabs $value, %reg (reg: 0 rax .. 15 r15)."""
    return bytes([0x48 | (reg >> 3), 0xB8 | (reg & 7)]) + struct.pack("<Q", value)


#: ``mov %rax, <reg>``: where a syscall's result is kept for the test to read
_KEEP = {
    "rbx": b"\x48\x89\xc3",
    "rcx": b"\x48\x89\xc1",
    "r12": b"\x49\x89\xc4",
    "r13": b"\x49\x89\xc5",
    "r14": b"\x49\x89\xc6",
}


def _call(nr: int, keep: str = "") -> bytes:
    """syscall ``nr``, then its result copied into ``keep``."""
    return _mov(0, nr) + b"\x0f\x05" + _KEEP.get(keep, b"")


def _program() -> bytes:
    args = b"".join(_mov(reg, v) for reg, v in ((7, 1), (6, 2), (2, 3), (10, 4), (8, 5), (9, 6)))
    return b"".join(
        [
            args + _call(39, "rbx"),  # 1: every argument reaches sysregs; the int is rax
            _call(2, "rcx"),  # 2: a negative int (-errno) is wrapped to 64 bits
            _call(3, "r12"),  # 3: None leaves rax as the dispatcher set it
            _call(4, "r13"),  # 4: the dispatcher raises: reported, rax untouched, goes on
            _call(5, "r14"),  # 5: an int of more than 64 bits is masked, as the register
            _call(6),  # 6: stop
        ]
    )


def test_the_c_entry_passes_registers_and_writes_what_the_dispatcher_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mem = GuestMemory(1 << 20)
    region = mem.add_region("code", CODE, 1 << 16)
    code = _program()
    mem.buf[region.offset : region.offset + len(code)] = code
    cpu = Cpu(mem)
    seen: list[list[int]] = []
    unraisable: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))

    def dispatch() -> int | None:
        regs = list(cpu.sysregs)
        seen.append(regs)
        nr = regs[0]
        if nr == 39:
            return 0x1234
        if nr == 2:
            return -14
        if nr == 3:
            cpu.set_rax(77)
            return None
        if nr == 4:
            raise KeyboardInterrupt  # what the dispatcher does not catch
        if nr == 5:
            return (1 << 70) | 9
        cpu.stop()
        return None

    try:
        cpu.hook_syscall(dispatch)
        cpu.set_reg(RIP, CODE)
        cpu.run()
        assert seen[0] == [39, 1, 2, 3, 4, 5, 6]
        assert [r[0] for r in seen] == [39, 2, 3, 4, 5, 6]
        assert cpu.reg(x86.UC_X86_REG_RBX) == 0x1234
        assert cpu.reg(x86.UC_X86_REG_RCX) == (1 << 64) - 14
        assert cpu.reg(x86.UC_X86_REG_R12) == 77
        assert cpu.reg(x86.UC_X86_REG_R13) == 4  # the syscall "returned" its number
        assert [type(e) for e in unraisable] == [KeyboardInterrupt]
        assert cpu.reg(x86.UC_X86_REG_R14) == 9
        assert cpu.stopped
    finally:
        cpu.close()
        mem.close()

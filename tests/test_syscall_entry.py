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


def _program() -> bytes:
    syscall = b"\x0f\x05"
    return b"".join(
        [
            # 1: every argument register reaches sysregs; the int returned is rax
            _mov(0, 39),
            _mov(7, 1),
            _mov(6, 2),
            _mov(2, 3),
            _mov(10, 4),
            _mov(8, 5),
            _mov(9, 6),
            syscall,
            b"\x48\x89\xc3",  # mov %rax, %rbx
            # 2: a negative int (-errno) is wrapped to 64 bits
            _mov(0, 2),
            syscall,
            b"\x48\x89\xc1",  # mov %rax, %rcx
            # 3: None leaves rax as the dispatcher set it
            _mov(0, 3),
            syscall,
            b"\x49\x89\xc4",  # mov %rax, %r12
            # 4: a dispatcher that raises: reported, rax untouched, the guest goes on
            _mov(0, 4),
            syscall,
            b"\x49\x89\xc5",  # mov %rax, %r13
            # 5: an int of more than 64 bits is masked, as the register holds it
            _mov(0, 5),
            syscall,
            b"\x49\x89\xc6",  # mov %rax, %r14
            # 6: stop
            _mov(0, 6),
            syscall,
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

"""The C syscall entry (guest/runtime/syscall_hook.c, ``Cpu.hook_syscall``) on a bare
CPU: the registers the dispatcher sees, what it returns reaching rax, and what a
dispatcher that raises leaves.  The VM tests run every syscall through it too; these
pin its contract without a kernel in between."""

from __future__ import annotations

import struct
import sys

import pytest
from unicorn import x86_const as x86

from tender_service.machine.cpu import RIP, Cpu, SignalCell
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


# -- rt_sigprocmask answered in C, and the stop for a deliverable signal ------------------------
DATA = 0x50_0000
UNMAPPED = 0x90_0000
SIGKILL_BIT, SIGSTOP_BIT = 1 << 8, 1 << 18


def _sigprocmask(how: int, set_: int, oset: int, size: int = 8, keep: str = "") -> bytes:
    regs = ((7, how), (6, set_), (2, oset), (10, size))
    return b"".join(_mov(reg, v) for reg, v in regs) + _call(14, keep)


def _sigprocmask_program() -> bytes:
    return b"".join(
        [
            _sigprocmask(0, DATA, DATA + 8),  # 1 SIG_BLOCK 0x5, old -> DATA+8: C
            _sigprocmask(1, DATA + 16, 0),  # 2 SIG_UNBLOCK 0x1: C
            _sigprocmask(2, DATA + 24, DATA + 32),  # 3 SIG_SETMASK with SIGKILL/SIGSTOP: C
            _sigprocmask(7, DATA, 0, keep="rbx"),  # 4 a bad how: the kernel's
            _sigprocmask(0, DATA, 0, size=16, keep="rcx"),  # 5 a bad size: the kernel's
            _sigprocmask(0, UNMAPPED, 0, keep="r12"),  # 6 set unreadable: the kernel's
            _sigprocmask(0, DATA, UNMAPPED, keep="r13"),  # 7 oset unwritable: the kernel's
            _call(39, "r14"),  # 8 a kernel syscall, a signal pending and unblocked: stop
            _call(60),  # 9 not reached in the first run
        ]
    )


@pytest.mark.parametrize("answer_here", [True, False], ids=["c", "traced"])
def test_rt_sigprocmask_is_answered_in_c_and_the_rest_goes_to_the_kernel(
    answer_here: bool,
) -> None:
    """The C entry answers rt_sigprocmask as sys_rt_sigprocmask does (the mask cell
    changes, the old mask is written, SIGKILL and SIGSTOP stay unblockable) and
    leaves to the kernel every call it does not answer the same way, with nothing
    changed; after a kernel syscall a pending signal the mask lets through stops
    the CPU; with ``answer_here`` off (a traced VM) every call reaches the kernel."""
    mem = GuestMemory(1 << 24)
    region = mem.add_region("code", CODE, 1 << 16)
    data = mem.add_region("data", DATA, 1 << 16)
    code = _sigprocmask_program()
    mem.buf[region.offset : region.offset + len(code)] = code
    struct.pack_into("<QQQQQ", mem.buf, data.offset, 0x5, 0xDEAD, 0x1, 0, 0)
    struct.pack_into("<Q", mem.buf, data.offset + 24, 0x30 | SIGKILL_BIT | SIGSTOP_BIT)
    cpu = Cpu(mem)
    mask, pending = SignalCell(0), SignalCell(0)
    seen: list[int] = []

    def u64(addr: int) -> int:
        return struct.unpack_from("<Q", mem.buf, data.offset + addr - DATA)[0]

    def dispatch() -> int | None:
        nr, how, set_, oset = cpu.sysregs[0], cpu.sysregs[1], cpu.sysregs[2], cpu.sysregs[3]
        seen.append(nr)
        if nr == 14 and not answer_here and len(seen) <= 3:  # traced: calls 1-3 here
            if oset:
                struct.pack_into("<Q", mem.buf, data.offset + oset - DATA, mask.value)
            new = u64(set_)
            mask.value = {0: mask.value | new, 1: mask.value & ~new, 2: new}[how]
            mask.value &= ~(SIGKILL_BIT | SIGSTOP_BIT)
            return 0
        if nr == 14:
            return -22  # the kernel's answer to what the C entry left it
        if nr == 39:
            pending.value = 0x40  # signal 7 arrives: the mask (0x30) lets it through
            return 123
        cpu.stop()
        return None

    try:
        cpu.hook_syscall(dispatch, answer_here=answer_here)
        cpu.use_signal_cells(mask, pending, events=False)
        cpu.set_reg(RIP, CODE)
        cpu.run()
        assert (u64(DATA + 8), u64(DATA + 32)) == (0, 0x4)  # the masks before calls 1, 3
        assert mask.value == 0x30  # SIGKILL and SIGSTOP never blocked
        if answer_here:
            assert seen == [14, 14, 14, 14, 39]  # calls 4-7, then getpid
            assert cpu.answered == 3
        else:
            assert seen == [14] * 7 + [39]
            assert cpu.answered == 0
        assert cpu.reg(x86.UC_X86_REG_RBX) == (1 << 64) - 22
        assert cpu.reg(x86.UC_X86_REG_R13) == (1 << 64) - 22
        assert cpu.reg(x86.UC_X86_REG_RAX) == 123  # rax written before the stop
        assert cpu.reg(x86.UC_X86_REG_R14) == 0  # the stop came right after the syscall
        assert cpu.stopped and 60 not in seen
    finally:
        cpu.close()
        mem.close()

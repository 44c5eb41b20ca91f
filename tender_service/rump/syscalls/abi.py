"""Argument conversions of the Linux syscall ABI (registers are unsigned 64-bit)."""

from __future__ import annotations

import errno
import struct

from tender_service.machine.errors import GuestError

IOVEC = struct.Struct("<QQ")
TIMESPEC = struct.Struct("<qq")
IOV_MAX = 1024


def i32(x: int) -> int:
    """An ``int`` argument: the low 32 bits, signed."""
    x &= 0xFFFF_FFFF
    return x - (1 << 32) if x & 0x8000_0000 else x


def i64(x: int) -> int:
    return x - (1 << 64) if x & (1 << 63) else x


def read_iovecs(mem, iov: int, iovcnt: int) -> list[tuple[int, int]]:
    n = i32(iovcnt)
    if n < 0 or n > IOV_MAX:
        raise GuestError(errno.EINVAL)
    raw = mem.read(iov, 16 * n)
    out = [IOVEC.unpack_from(raw, 16 * i) for i in range(n)]
    if sum(length for _, length in out) > 0x7FFF_FFFF_FFFF_FFFF:
        raise GuestError(errno.EINVAL)
    return out


def read_timespec(mem, addr: int) -> tuple[int, int]:
    sec, nsec = mem.unpack(TIMESPEC, addr)
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        raise GuestError(errno.EINVAL)
    return sec, nsec

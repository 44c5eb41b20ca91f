"""Guest RAM: one host ``mmap`` buffer, mapped into the CPU in a few regions.

The buffer is anonymous and lazily backed by the host, so a 64 MiB VM costs
only the pages it touches.  Unicorn maps each region with ``mem_map_ptr`` onto
a slice of the buffer: the kernel reads and writes guest memory as plain
bytes, with no copy through the emulator.  Every access is bounds-checked; a
range that is not entirely inside one region raises ``GuestError(EFAULT)``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
from dataclasses import dataclass

from tender_service.machine.errors import GuestError

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclass(slots=True)
class Region:
    """A guest address range backed by ``buf[offset:offset+size]``."""

    name: str
    base: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.base + self.size


class GuestMemory:
    """The VM's RAM and the regions it is mapped at."""

    def __init__(self, ram_size: int) -> None:
        self.ram_size = ram_size
        self.buf = mmap.mmap(-1, ram_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.buf)
        self._cbuf = ctypes.c_char.from_buffer(self.buf)
        self.host_addr = ctypes.addressof(self._cbuf)
        self.regions: list[Region] = []
        self._used = 0  # bytes of the buffer handed to regions

    # -- setup ---------------------------------------------------------------
    def add_region(self, name: str, base: int, size: int) -> Region:
        """Carve the next ``size`` bytes of RAM and place them at ``base``."""
        if self._used + size > self.ram_size:
            raise MemoryError(f"region {name} ({size} bytes) does not fit in guest RAM")
        for r in self.regions:
            if base < r.end and r.base < base + size:
                raise ValueError(f"region {name} overlaps {r.name}")
        region = Region(name, base, size, self._used)
        self._used += size
        self.regions.append(region)
        return region

    @property
    def free_ram(self) -> int:
        return self.ram_size - self._used

    def region_view(self, region: Region) -> memoryview:
        return self.view[region.offset : region.offset + region.size]

    def close(self) -> None:
        """Release the host buffer (all views must be gone)."""
        self.regions.clear()
        try:
            self.view.release()
            del self._cbuf
            self.buf.close()
        except (BufferError, AttributeError):  # a view still exported: GC frees it later
            pass

    # -- access --------------------------------------------------------------
    def offset(self, addr: int, n: int) -> int:
        """Buffer offset of guest range [addr, addr+n), or EFAULT."""
        for r in self.regions:
            off = addr - r.base
            if off >= 0 and off + n <= r.size:
                return r.offset + off
        raise GuestError(errno.EFAULT, f"bad address {addr:#x}+{n}")

    def room(self, vecs: list[tuple[int, int]], limit: int) -> int:
        """How many bytes the buffers ``(addr, length)`` take, filled in order, up to
        ``limit`` or the first one that guest memory cuts short (a read into them
        must not take more: Linux fails it with EFAULT instead)."""
        room = 0
        for addr, length in vecs:
            length = min(length, limit - room)
            fits = next(
                (min(length, r.end - addr) for r in self.regions if r.base <= addr < r.end), 0
            )
            room += fits
            if fits < length or room >= limit:
                break
        return room

    def contains(self, addr: int, n: int = 1) -> bool:
        for r in self.regions:  # a loop, not any(): a fork asks this
            off = addr - r.base
            if off >= 0 and off + n <= r.size:
                return True
        return False

    def read(self, addr: int, n: int) -> bytes:
        if n < 0:
            raise GuestError(errno.EINVAL)
        off = self.offset(addr, n)
        return self.buf[off : off + n]

    def slice(self, addr: int, n: int) -> memoryview:
        """A writable view of guest memory (zero copy)."""
        off = self.offset(addr, n)
        return self.view[off : off + n]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        off = self.offset(addr, n)
        self.buf[off : off + n] = data

    def fill(self, addr: int, n: int, byte: int = 0) -> None:
        off = self.offset(addr, n)
        self.buf[off : off + n] = bytes([byte]) * n if n < 4096 else bytes(n)

    def read_u64(self, addr: int) -> int:
        return _U64.unpack_from(self.buf, self.offset(addr, 8))[0]

    def write_u64(self, addr: int, value: int) -> None:
        _U64.pack_into(self.buf, self.offset(addr, 8), value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_u32(self, addr: int) -> int:
        return _U32.unpack_from(self.buf, self.offset(addr, 4))[0]

    def write_u32(self, addr: int, value: int) -> None:
        _U32.pack_into(self.buf, self.offset(addr, 4), value & 0xFFFF_FFFF)

    def unpack(self, fmt: struct.Struct, addr: int) -> tuple:
        return fmt.unpack_from(self.buf, self.offset(addr, fmt.size))

    def pack(self, fmt: struct.Struct, addr: int, *values: int) -> None:
        fmt.pack_into(self.buf, self.offset(addr, fmt.size), *values)

    def cstring(self, addr: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string (ENAMETOOLONG past ``limit``)."""
        for r in self.regions:
            off = addr - r.base
            if 0 <= off < r.size:
                start = r.offset + off
                end = min(r.offset + r.size, start + limit)
                nul = self.buf.find(b"\0", start, end)
                if nul < 0:
                    if end - start >= limit:
                        raise GuestError(errno.ENAMETOOLONG)
                    raise GuestError(errno.EFAULT)
                return self.buf[start:nul]
        raise GuestError(errno.EFAULT, f"bad string address {addr:#x}")

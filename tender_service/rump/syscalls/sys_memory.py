"""Memory: brk, anonymous mmap family, and the guest runtime's malloc hypercalls.

Mappings and malloc blocks come from the bmk heap (page allocator and bucket
allocator), as on Rumprun.  There is no MMU: ``mprotect`` succeeds without
effect (the guest may write its own text and string literals, as on
Rumprun), ``brk`` cannot grow (musl then uses mmap), and MAP_FIXED is only
honoured inside a mapping the VM already has.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from tender_service.bmk.memalloc import MEMWHO_USER
from tender_service.machine.errors import GuestError
from tender_service.machine.hypercalls import HC_MAGIC
from tender_service.machine.layout import PAGE_SIZE, page_up
from tender_service.rump.files import FsFile
from tender_service.rump.syscalls.abi import i32

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE, MAP_FIXED, MAP_ANONYMOUS = 1, 2, 3, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
PROT_WRITE = 2


def sys_brk(k: Kernel, lwp: Lwp, addr: int) -> int:
    proc = lwp.proc
    if not proc.brk:
        proc.brk = k.brk_base
    return proc.brk  # the break cannot move: nothing is mapped after the image


def _find_mapping(k: Kernel, addr: int) -> tuple[Process, int, int] | None:
    """(owner, start, length) of the mapping containing ``addr``."""
    for p in k.procs.values():
        for start, length in p.mmaps.items():
            if start <= addr < start + length:
                return p, start, length
    return None


def sys_mmap(
    k: Kernel, lwp: Lwp, addr: int, length: int, prot: int, flags: int, fd: int, off: int
) -> int:
    flags = i32(flags)
    kind = flags & 3
    if length == 0 or kind not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
        raise GuestError(errno.EINVAL)
    if off & (PAGE_SIZE - 1):
        raise GuestError(errno.EINVAL)
    contents = b""
    if not flags & MAP_ANONYMOUS:
        contents = _file_contents(k, lwp, fd, kind, prot, off, length)
    size = page_up(length)
    if size > k.config.ram:
        raise GuestError(errno.ENOMEM)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr & (PAGE_SIZE - 1):
            raise GuestError(errno.EINVAL)
        m = _find_mapping(k, addr)
        if m is None or addr + size > m[1] + m[2] or flags & MAP_FIXED_NOREPLACE:
            raise GuestError(errno.EEXIST if m and flags & MAP_FIXED_NOREPLACE else errno.ENOMEM)
        k.mem.fill(addr, size)
        return addr
    start = k.pages.alloc(size // PAGE_SIZE)
    if start is None:
        raise GuestError(errno.ENOMEM)
    k.mem.fill(start, size)
    k.mem.write(start, contents)
    lwp.proc.mmaps[start] = size
    return start


def _file_contents(k: Kernel, lwp: Lwp, fd: int, kind: int, prot: int, off: int, n: int) -> bytes:
    """What a file mapping starts with: /dev/zero's zeroes, or a copy of a file's bytes.

    With no MMU a mapping is a copy: private mappings are exactly that, and a
    shared one is only allowed read-only (no later write() could show through
    a writable one, nor its stores reach the file).
    """
    f = lwp.proc.fds.get(i32(fd))
    if f.kind == "zero":
        return b""
    if not isinstance(f, FsFile) or f.is_dir:
        raise GuestError(errno.ENODEV)
    if not f.readable or (kind != MAP_PRIVATE and prot & PROT_WRITE and not f.writable):
        raise GuestError(errno.EACCES)
    if kind != MAP_PRIVATE and prot & PROT_WRITE:
        raise GuestError(errno.ENODEV)  # shared writable file mappings: not supported
    return k.fs.tree.contents(f.ofd, off, n)


def sys_munmap(k: Kernel, lwp: Lwp, addr: int, length: int) -> int:
    if addr & (PAGE_SIZE - 1) or length == 0:
        raise GuestError(errno.EINVAL)
    m = _find_mapping(k, addr)
    if m is None:
        return 0  # nothing mapped there: Linux succeeds too
    owner, start, size = m
    if start == addr and page_up(length) >= size:
        del owner.mmaps[start]
        k.pages.free(start)
    elif addr > start and addr + page_up(length) >= start + size:
        owner.mmaps[start] = addr - start  # trim the tail; pages return with the whole
    return 0


def sys_mremap(
    k: Kernel, lwp: Lwp, old: int, old_len: int, new_len: int, flags: int, new_addr: int
) -> int:
    flags = i32(flags)
    if old & (PAGE_SIZE - 1) or new_len == 0 or flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED):
        raise GuestError(errno.EINVAL)
    if flags & MREMAP_FIXED:
        raise GuestError(errno.EINVAL)
    m = _find_mapping(k, old)
    if m is None or m[1] != old:
        raise GuestError(errno.EFAULT)
    owner, start, size = m
    new_size = page_up(new_len)
    capacity = k.pages.block_pages(start) * PAGE_SIZE
    if new_size <= capacity:
        if new_size > size:
            k.mem.fill(start + size, new_size - size)
        owner.mmaps[start] = new_size
        return start
    if not flags & MREMAP_MAYMOVE:
        raise GuestError(errno.ENOMEM)
    dest = k.pages.alloc(new_size // PAGE_SIZE)
    if dest is None:
        raise GuestError(errno.ENOMEM)
    k.mem.write(dest, k.mem.slice(start, size))
    k.mem.fill(dest + size, new_size - size)
    del owner.mmaps[start]
    k.pages.free(start)
    owner.mmaps[dest] = new_size
    return dest


def sys_mprotect(k: Kernel, lwp: Lwp, addr: int, length: int, prot: int) -> int:
    if addr & (PAGE_SIZE - 1):
        raise GuestError(errno.EINVAL)
    return 0


def sys_madvise(k: Kernel, lwp: Lwp, addr: int, length: int, advice: int) -> int:
    if addr & (PAGE_SIZE - 1):
        raise GuestError(errno.EINVAL)
    if i32(advice) == MADV_DONTNEED and length:
        m = _find_mapping(k, addr)
        if m is not None:
            end = min(addr + page_up(length), m[1] + m[2])
            k.mem.fill(addr, end - addr)
    return 0


# -- hypercalls of the guest runtime (guest/runtime/unifork_hypercalls.h) -----------
def hc_probe(k: Kernel, lwp: Lwp) -> int:
    return HC_MAGIC


def _align(align: int) -> int:
    if align == 0:
        return 16
    if align & (align - 1) or align > (1 << 24):
        raise GuestError(errno.EINVAL)
    return max(align, 16)


def hc_malloc(k: Kernel, lwp: Lwp, size: int, align: int) -> int:
    if size > k.config.ram:
        return -errno.ENOMEM
    return k.heap.malloc(size, _align(align), owner=lwp.proc.pid) or -errno.ENOMEM


def hc_free(k: Kernel, lwp: Lwp, ptr: int) -> int:
    if ptr == 0:
        return 0
    return 0 if k.heap.free(ptr, who=MEMWHO_USER) else -errno.EINVAL


def _user_block(k: Kernel, ptr: int) -> bool:
    """A live block of the guest's own malloc (not a kernel stack or TLS block)."""
    a = k.heap.get(ptr)
    return a is not None and a.who == MEMWHO_USER


def hc_realloc(k: Kernel, lwp: Lwp, ptr: int, size: int) -> int:
    if ptr and not _user_block(k, ptr):
        return -errno.EINVAL
    if size > k.config.ram:
        return -errno.ENOMEM
    return k.heap.realloc(ptr, size, owner=lwp.proc.pid) or -errno.ENOMEM


def hc_calloc(k: Kernel, lwp: Lwp, nmemb: int, size: int) -> int:
    total = nmemb * size
    if total > k.config.ram:
        return -errno.ENOMEM
    return k.heap.calloc(nmemb, size, owner=lwp.proc.pid) or -errno.ENOMEM


def hc_usable_size(k: Kernel, lwp: Lwp, ptr: int) -> int:
    if ptr == 0:
        return 0
    return k.heap.usable_size(ptr) if _user_block(k, ptr) else -errno.EINVAL

"""Place an image in guest RAM and build the initial process stack.

The stack follows the Linux x86-64 process-entry ABI (argc, argv, envp,
auxv, then the strings), so musl's unmodified ``_start`` and
``__init_libc`` run as they would on Linux.

The first program is laid out at its link address (static-PIE at PIE_BASE);
``execve`` loads a static-PIE at any free page-aligned base (``load_at``):
musl's rcrt1 relocates itself from AT_PHDR, so one address space can hold
several programs at once (thread mode).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

from tender_service.machine.elf import PF_W, ElfImage
from tender_service.machine.errors import ImageError
from tender_service.machine.layout import (
    HEAP_BASE,
    PAGE_SIZE,
    PIE_BASE,
    VDSO_BASE,
    page_down,
    page_up,
)
from tender_service.machine.memory import GuestMemory, Region
from tender_service.machine.vclock import REGION, region_size, sysinfo_ehdr, vdso_image

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = (
    0,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
)
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_EXECFN, AT_SYSINFO_EHDR = 23, 25, 31, 33
#: what cpuid leaf 1 edx reports for Unicorn's default x86-64 CPU (fpu..sse2)
HWCAP_X86_64 = 0x078BFBFF


@dataclass(slots=True)
class LoadedImage:
    image: ElfImage
    bias: int
    region: Region
    heap: Region

    @property
    def entry(self) -> int:
        return self.image.entry + self.bias

    def tls(self) -> tuple[int, int, int] | None:
        """(memsz, align, vaddr) of PT_TLS, relocated; None without TLS."""
        t = self.image.tls
        return None if t is None else (t.memsz, t.align, t.vaddr + self.bias)


def layout_memory(mem: GuestMemory, image: ElfImage) -> LoadedImage:
    """Map the image at its link address (static-PIE at PIE_BASE), the vDSO and its
    clock page (machine/vclock.py), and the heap above."""
    bias = PIE_BASE - image.lo if image.is_pie else 0
    if image.span + (1 << 20) > mem.ram_size:
        raise ImageError(
            f"{image.name}: image needs {image.span} bytes, more than guest RAM "
            f"({mem.ram_size}) allows"
        )
    region = mem.add_region("image", image.lo + bias, image.span)
    view = mem.region_view(region)
    for s in image.segments:
        off = s.vaddr + bias - region.base
        view[off : off + s.filesz] = image.data[s.offset : s.offset + s.filesz]
        # bss is zero already: the RAM buffer is fresh
    vdso = vdso_image()
    if vdso is not None:
        mem.write(mem.add_region(REGION, VDSO_BASE, region_size(vdso)).base + PAGE_SIZE, vdso)
    heap = mem.add_region("heap", HEAP_BASE, page_down(mem.free_ram))
    return LoadedImage(image, bias, region, heap)


def load_at(mem: GuestMemory, image: ElfImage, base: int) -> int:
    """Copy ``image`` into RAM so that its lowest page is at ``base``; its load bias.

    The span is zeroed first (bss, and whatever an earlier user left in those
    pages); a non-PIE image can only go at its link address (``base == image.lo``).
    """
    bias = base - image.lo
    if not image.is_pie and bias:
        raise ImageError(f"{image.name}: a non-PIE image runs only at {image.lo:#x}")
    mem.fill(base, image.span)
    for s in image.segments:
        mem.write(s.vaddr + bias, image.data[s.offset : s.offset + s.filesz])
    return bias


def writable_spans(image: ElfImage) -> tuple[tuple[int, int], ...]:
    """(offset from the image's lowest page, length) of each writable PT_LOAD segment.

    In a static-PIE every absolute pointer needs a relocation, so they all lie
    in these segments (data, RELRO, GOT, bss), never in text or rodata.
    """
    return tuple((s.vaddr - image.lo, s.memsz) for s in image.segments if s.flags & PF_W)


@functools.cache
def read_only_spans(
    size: int, writable: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], ...]:
    """(offset, length) of an image of ``size`` bytes outside its ``writable`` spans
    (``writable_spans``): text, rodata and the gaps, which hold what ``load_at``
    put there for as long as nothing writes into them."""
    out, at = [], 0
    for off, n in sorted(writable):
        if off > at:
            out.append((at, off - at))
        at = max(at, off + n)
    if at < size:
        out.append((at, size - at))
    return tuple(out)


def loaded_intact(mem: GuestMemory, image: ElfImage, base: int) -> bool:
    """Whether memory at ``base`` holds, outside the writable segments, what
    ``load_at(mem, image, base)`` would write there: a kept copy of the program
    that nothing wrote into, whose translated code is still valid."""
    size = page_up(image.span)
    expected = bytearray(size)
    for s in image.segments:
        off = s.vaddr - image.lo
        expected[off : off + s.filesz] = image.data[s.offset : s.offset + s.filesz]
    at = mem.offset(base, size)
    return all(
        mem.buf[at + off : at + off + n] == expected[off : off + n]
        for off, n in read_only_spans(size, writable_spans(image))
    )


def build_stack(
    mem: GuestMemory,
    loaded: LoadedImage | tuple[ElfImage, int],
    stack_top: int,
    argv: list[bytes],
    envp: list[bytes],
    execfn: bytes | None = None,
) -> int:
    """Write argc/argv/envp/auxv below ``stack_top``; return the entry rsp.

    ``loaded`` is the boot layout or an (image, load bias) pair from ``load_at``.
    As Linux does, the file name (``execfn``, default argv[0]) is the topmost
    string and AT_EXECFN points at it; raises GuestError (EFAULT) if the
    strings do not fit below ``stack_top`` in mapped memory.
    """
    img, bias = (loaded.image, loaded.bias) if isinstance(loaded, LoadedImage) else loaded
    sp = stack_top
    strings: list[int] = []

    def push_bytes(data: bytes) -> int:
        nonlocal sp
        sp -= len(data)
        mem.write(sp, data)
        return sp

    if execfn is None:
        execfn = argv[0] if argv else b""
    fn = push_bytes(execfn + b"\0")
    platform = push_bytes(b"x86_64\0")
    random = push_bytes(os.urandom(16))
    for s in (*argv, *envp):
        strings.append(push_bytes(s + b"\0"))
    argv_ptrs, env_ptrs = strings[: len(argv)], strings[len(argv) :]
    auxv = [
        (AT_PHDR, img.phdr_vaddr + bias),
        (AT_PHENT, img.phentsize),
        (AT_PHNUM, img.phnum),
        (AT_PAGESZ, 4096),
        (AT_BASE, 0),
        (AT_FLAGS, 0),
        (AT_ENTRY, img.entry + bias),
        (AT_UID, 0),
        (AT_EUID, 0),
        (AT_GID, 0),
        (AT_EGID, 0),
        (AT_PLATFORM, platform),
        (AT_HWCAP, HWCAP_X86_64),
        (AT_CLKTCK, 100),
        (AT_SECURE, 0),
        (AT_RANDOM, random),
        (AT_EXECFN, fn),
    ]
    if ehdr := sysinfo_ehdr(mem):
        auxv.append((AT_SYSINFO_EHDR, ehdr))
    auxv.append((AT_NULL, 0))
    words = [len(argv), *argv_ptrs, 0, *env_ptrs, 0]
    for k, v in auxv:
        words += [k, v]
    sp = (sp - 8 * len(words)) & ~0xF  # rsp is 16-byte aligned at entry
    mem.write(sp, struct.pack(f"<{len(words)}Q", *words))
    return sp

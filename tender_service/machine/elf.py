"""Static x86-64 ELF images: parse and validate before anything runs.

Only what the loader needs is read (header, program headers); every field
that could send the loader out of bounds is checked, so a malformed image is
refused with a message that says what is wrong.  Accepted: ET_EXEC and
static-PIE (ET_DYN without PT_INTERP), x86-64, little endian.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tender_service.machine.errors import ImageError
from tender_service.machine.layout import GUARD_SIZE, IMAGE_MAX, PAGE_SIZE, page_down, page_up

ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_PHDR, PT_TLS = 1, 2, 3, 6, 7
PF_X = 1
PF_W = 2

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
MAX_IMAGE_BYTES = 256 << 20
MAX_PHNUM = 128


@dataclass(slots=True, frozen=True)
class Segment:
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int


@dataclass(slots=True, frozen=True)
class TlsInfo:
    vaddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(slots=True)
class ElfImage:
    """A validated image; addresses are link-time (add ``load_bias`` at load)."""

    data: bytes
    etype: int
    entry: int
    phoff: int
    phnum: int
    phentsize: int
    segments: list[Segment]
    tls: TlsInfo | None
    lo: int  # page-aligned span of all PT_LOAD segments (link-time)
    hi: int
    phdr_vaddr: int
    name: str = ""
    sha256: str = field(default="")

    @property
    def is_pie(self) -> bool:
        return self.etype == ET_DYN

    @property
    def span(self) -> int:
        return self.hi - self.lo


@dataclass(slots=True, frozen=True)
class _Header:
    etype: int
    entry: int
    phoff: int
    phnum: int
    phentsize: int


@dataclass(slots=True)
class _ProgramHeaders:
    segments: list[Segment] = field(default_factory=list)  # PT_LOAD, in file order
    tls: TlsInfo | None = None
    phdr_vaddr: int = -1  # PT_PHDR's address, -1 without one
    has_dynamic: bool = False


def parse_elf(data: bytes, name: str = "image", digest: bool = True) -> ElfImage:
    """Validate ``data`` as a static x86-64 executable or raise ImageError.

    ``digest=False`` leaves ``sha256`` empty: execve does not need it, and
    hashing a 1.4 MB program took half of an exec's time."""
    h = _read_header(data, name)
    ph = _read_program_headers(data, name, h)
    segments = _check_segments(ph, h.etype, name)
    lo = page_down(segments[0].vaddr)
    hi = page_up(max(s.vaddr + s.memsz for s in segments))
    if h.etype == ET_EXEC and lo < GUARD_SIZE:
        raise ImageError(f"{name}: linked at {lo:#x}, inside the null guard (< {GUARD_SIZE:#x})")
    if not any(s.flags & PF_X and s.vaddr <= h.entry < s.vaddr + s.memsz for s in segments):
        raise ImageError(f"{name}: entry point {h.entry:#x} is not in an executable segment")
    phdr_vaddr = ph.phdr_vaddr if ph.phdr_vaddr >= 0 else _phdr_address(segments, h.phoff)
    return ElfImage(
        data=data,
        etype=h.etype,
        entry=h.entry,
        phoff=h.phoff,
        phnum=h.phnum,
        phentsize=h.phentsize,
        segments=segments,
        tls=ph.tls,
        lo=lo,
        hi=hi,
        phdr_vaddr=max(phdr_vaddr, 0),
        name=name,
        sha256=hashlib.sha256(data).hexdigest() if digest else "",
    )


def _read_header(data: bytes, name: str) -> _Header:
    """The ELF header, refused unless it is a 64-bit little-endian x86-64 executable whose
    program headers lie inside the file."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: image too large ({len(data)} bytes)")
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise ImageError(f"{name}: not an ELF file")
    (
        ident,
        etype,
        machine,
        _ver,
        entry,
        phoff,
        _shoff,
        _flags,
        ehsize,
        phentsize,
        phnum,
        _shentsize,
        _shnum,
        _shstrndx,
    ) = _EHDR.unpack_from(data, 0)
    if ident[4] != 2:
        raise ImageError(f"{name}: not a 64-bit ELF (EI_CLASS={ident[4]})")
    if ident[5] != 1:
        raise ImageError(f"{name}: not little endian")
    if machine != EM_X86_64:
        raise ImageError(f"{name}: not an x86-64 ELF (e_machine={machine})")
    if etype not in (ET_EXEC, ET_DYN):
        raise ImageError(f"{name}: not an executable (e_type={etype})")
    if ehsize < _EHDR.size or phentsize != _PHDR.size:
        raise ImageError(f"{name}: bad header sizes (ehsize={ehsize}, phentsize={phentsize})")
    if not 0 < phnum <= MAX_PHNUM or phoff + phnum * phentsize > len(data):
        raise ImageError(f"{name}: program headers out of bounds (phoff={phoff}, phnum={phnum})")
    return _Header(etype, entry, phoff, phnum, phentsize)


def _read_program_headers(data: bytes, name: str, h: _Header) -> _ProgramHeaders:
    """What the loader uses of the program headers, each entry checked."""
    ph = _ProgramHeaders()
    for i in range(h.phnum):
        ptype, flags, off, vaddr, _paddr, filesz, memsz, align = _PHDR.unpack_from(
            data, h.phoff + i * h.phentsize
        )
        if ptype == PT_INTERP:
            raise ImageError(f"{name}: dynamically linked (PT_INTERP); build it with -static")
        if ptype == PT_DYNAMIC:
            ph.has_dynamic = True
        if ptype == PT_PHDR:
            ph.phdr_vaddr = vaddr
        if ptype == PT_TLS:
            if filesz > memsz or off + filesz > len(data) or memsz > (64 << 20):
                raise ImageError(f"{name}: bad PT_TLS segment")
            ph.tls = TlsInfo(vaddr, filesz, memsz, max(align, 1))
        if ptype == PT_LOAD:
            _check_load(name, i, len(data), off, vaddr, filesz, memsz, align)
            if memsz:
                ph.segments.append(Segment(vaddr, memsz, off, filesz, flags))
    return ph


def _check_load(
    name: str, i: int, size: int, off: int, vaddr: int, filesz: int, memsz: int, align: int
) -> None:
    """Refuse a PT_LOAD segment that would send the loader out of the file or the image."""
    if filesz > memsz:
        raise ImageError(f"{name}: segment {i} has p_filesz > p_memsz")
    if off + filesz > size:
        raise ImageError(f"{name}: segment {i} extends past the end of the file")
    if memsz > (1 << 30) or vaddr + memsz > IMAGE_MAX:
        raise ImageError(f"{name}: segment {i} at {vaddr:#x}+{memsz:#x} is out of range")
    if align > 1 and (vaddr - off) % min(align, PAGE_SIZE):
        raise ImageError(f"{name}: segment {i} is misaligned")


def _check_segments(ph: _ProgramHeaders, etype: int, name: str) -> list[Segment]:
    """The loadable segments by address; refused if none, overlapping, or a PIE that is
    not static."""
    segments = ph.segments
    if not segments:
        raise ImageError(f"{name}: no loadable segments")
    if etype == ET_DYN and not ph.has_dynamic:
        raise ImageError(f"{name}: ET_DYN without PT_DYNAMIC is not a static-PIE executable")
    segments.sort(key=lambda s: s.vaddr)
    for a, b in zip(segments, segments[1:], strict=False):
        if a.vaddr + a.memsz > b.vaddr:
            raise ImageError(f"{name}: overlapping segments")
    return segments


def _phdr_address(segments: list[Segment], phoff: int) -> int:
    """Without PT_PHDR: where the segment that maps the program headers puts them (-1 if
    none does)."""
    for s in segments:
        if s.offset <= phoff < s.offset + s.filesz:
            return s.vaddr + (phoff - s.offset)
    return -1


_cache: dict[tuple[str, int, int], ElfImage] = {}


def load_elf_file(path: str | Path) -> ElfImage:
    """Parse a file once per (path, size, mtime): tenders launch the same image often."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ImageError(f"{p}: {e.strerror}") from e
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    img = _cache.get(key)
    if img is None:
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{p}: image too large ({st.st_size} bytes)")
        img = parse_elf(p.read_bytes(), p.name)
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = img
    return img

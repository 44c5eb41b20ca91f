"""A baked image's root file system, as the kernel sees it (issue 14).

``unifork bake`` (``toolchain/bake.py``) packs static ELFs, files and
directories into one versioned image; this module holds what such an image
means once parsed: the tree of entries and the programs named with ``--bin``.
The rump layer builds the read-only lower layer of an instance's file system
from :class:`RootFs`; nothing here knows about processes or syscalls.

The format (docs/image-format.md) is parsed and validated here, before anything
runs: ``parse_image`` takes a plain ELF or a baked image and refuses a
malformed one with an ``ImageError`` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import posixpath
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tender_service.machine.elf import MAX_IMAGE_BYTES as MAX_ELF_BYTES
from tender_service.machine.elf import ElfImage, parse_elf
from tender_service.machine.errors import ImageError

ELF_MAGIC = b"\x7fELF"

FILE, DIR, SYMLINK = "file", "dir", "symlink"


@dataclass(frozen=True, slots=True)
class FsEntry:
    """One node of the tree: an absolute, normalised path ("/bin/sh")."""

    path: str
    kind: str  #: FILE, DIR or SYMLINK
    mode: int  #: permission bits (0o755), no file-type bits
    data: bytes = b""  #: a file's contents
    target: str = ""  #: a symlink's target, as stored


@dataclass(frozen=True, slots=True)
class RootFs:
    """The tree of a baked image; a directory precedes what it contains."""

    entries: tuple[FsEntry, ...]
    #: the paths given with --bin, in order: programs[0] runs when none is named
    programs: tuple[str, ...]


# -- the image format (docs/image-format.md) -----------------------------------------------------
#: PNG-style: a non-ASCII first byte, CR LF and ^Z catch text-mode and 7-bit mangling
MAGIC = b"\x89UFK\r\n\x1a\n"
FORMAT_MAJOR, FORMAT_MINOR = 1, 0
#: magic, major, minor, reserved (0), entry count, program count, total size of the file
HEADER = struct.Struct("<8sHHIIIQ")
#: kind, reserved (0), mode, path length, payload size (file contents or symlink target)
ENTRY = struct.Struct("<BBHIQ")
PROGRAM = struct.Struct("<I")  # path length, then the path
TRAILER_SIZE = 32  # SHA-256 of every byte before it
KIND_CODES = {FILE: 1, DIR: 2, SYMLINK: 3}
KINDS = {code: kind for kind, code in KIND_CODES.items()}

MAX_IMAGE_BYTES = MAX_ELF_BYTES  # a whole image, header to trailer
MAX_ENTRY_BYTES = 64 << 20  # one file's contents
MAX_ENTRIES = 65536
MAX_PROGRAMS = 1024
PATH_MAX, NAME_MAX = 4096, 255  # as Linux: a path with its NUL, one component
MAX_SYMLINK_HOPS = 40  # as Linux's ELOOP limit


@dataclass(frozen=True, slots=True)
class BootImage:
    """What a VM boots: the program to run, its path, and the tree (None: a plain ELF)."""

    elf: ElfImage
    path: str  #: the program's path in the tree; a plain ELF's name
    rootfs: RootFs | None = None
    name: str = "image"  #: the image's (file) name, for messages


def is_baked(data: bytes) -> bool:
    """Whether ``data`` starts like a baked image (not whether it is a valid one)."""
    return data[: len(MAGIC)] == MAGIC


def parse_image(data: bytes, name: str = "image") -> BootImage:
    """A plain ELF or a baked image, validated, ready to boot; ImageError says what is wrong.

    A baked image boots its first program (``select_program`` picks another).
    """
    if data[:4] == ELF_MAGIC:
        return BootImage(parse_elf(data, name), name, None, name)
    if not is_baked(data):
        raise ImageError(f"{name}: not an ELF file, nor a baked image (bad magic)")
    rootfs, first = _parse_baked(data, name)
    return BootImage(first, rootfs.programs[0], rootfs, name)


def check_path(path: str) -> None:
    """ImageError unless ``path`` is absolute, normalised, and within Linux's limits."""
    if not path.startswith("/") or path == "/":
        raise ImageError(f"path {path!r}: not an absolute path below /")
    if "\0" in path:
        raise ImageError(f"path {path!r}: contains a NUL byte")
    if len(path.encode()) >= PATH_MAX:
        raise ImageError(f"path {path[:64]!r}...: longer than {PATH_MAX - 1} bytes")
    for part in path[1:].split("/"):
        if part in ("", ".", ".."):
            raise ImageError(f"path {path!r}: empty, '.' or '..' component (not normalised)")
        if len(part.encode()) > NAME_MAX:
            raise ImageError(f"path {path[:64]!r}: a component longer than {NAME_MAX} bytes")


def parse_rootfs(data: bytes, name: str = "image") -> RootFs:
    """Validate a baked image and return its tree; ImageError names the first problem.

    The checks run outermost first: magic, version (before anything a newer version
    may lay out differently), size, checksum, then every entry.
    """
    return _parse_baked(data, name)[0]


def _parse_baked(data: bytes, name: str) -> tuple[RootFs, ElfImage]:
    """The tree and its first program's ELF (every program is parsed, once)."""
    n_entries, n_programs = _check_header(data, name)
    body = memoryview(data)[: len(data) - TRAILER_SIZE]
    reader = _Reader(body, HEADER.size, name)
    entries: dict[str, FsEntry] = {}
    for i in range(n_entries):
        e = _read_entry(reader, i)
        _check_place(e, entries, name)
        entries[e.path] = e
    programs: list[str] = []
    for i in range(n_programs):
        (length,) = reader.unpack(PROGRAM, f"program {i}")
        path = reader.text(length, f"program {i}: path")
        _check_program(path, entries, programs, name)
        programs.append(path)
    if reader.off != len(body):
        raise ImageError(f"{name}: {len(body) - reader.off} bytes after the program list")
    rootfs = RootFs(tuple(entries.values()), tuple(programs))
    # every --bin is a valid static x86-64 ELF
    elfs = [_program_elf(rootfs, path, name, entries) for path in programs]
    return rootfs, elfs[0]


def _check_header(data: bytes, name: str) -> tuple[int, int]:
    """The entry and program counts of an image whose header, size and checksum hold."""
    if len(data) < HEADER.size + TRAILER_SIZE:
        raise ImageError(
            f"{name}: truncated: {len(data)} bytes, a baked image has at least "
            f"{HEADER.size + TRAILER_SIZE}"
        )
    magic, major, minor, _reserved, n_entries, n_programs, total = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"{name}: not a baked image (bad magic)")
    if major != FORMAT_MAJOR:
        newer = "newer than" if major > FORMAT_MAJOR else "not"
        raise ImageError(
            f"{name}: image format version {major}.{minor} is {newer} the version this "
            f"unifork reads ({FORMAT_MAJOR}.{FORMAT_MINOR}); bake it again with this unifork"
            + (" or upgrade unifork" if major > FORMAT_MAJOR else "")
        )
    if len(data) > MAX_IMAGE_BYTES or total > MAX_IMAGE_BYTES:
        raise ImageError(
            f"{name}: image too large ({max(len(data), total)} bytes; at most {MAX_IMAGE_BYTES})"
        )
    if total != len(data):
        what = "truncated" if len(data) < total else "trailing bytes"
        raise ImageError(
            f"{name}: {what}: the header says {total} bytes, the image has {len(data)}"
        )
    end = len(data) - TRAILER_SIZE
    if hashlib.sha256(memoryview(data)[:end]).digest() != data[end:]:
        raise ImageError(f"{name}: checksum mismatch: the image is corrupt")
    if not 0 < n_entries <= MAX_ENTRIES:
        raise ImageError(f"{name}: {n_entries} entries (between 1 and {MAX_ENTRIES})")
    if not 0 < n_programs <= MAX_PROGRAMS:
        raise ImageError(f"{name}: {n_programs} programs (between 1 and {MAX_PROGRAMS})")
    return n_entries, n_programs


def select_program(boot: BootImage, args: Sequence[str]) -> tuple[BootImage, list[str]]:
    """The program a run names and its argv.

    A baked image: an absolute first argument names the program (symlinks in the
    tree are followed) and stays its argv[0], as given; otherwise the first
    program runs, argv[0] its path.  A plain ELF: itself, argv without argv[0].
    """
    if boot.rootfs is None:
        return boot, list(args)
    if args and args[0].startswith("/"):
        path = args[0]
        elf = boot.elf if path == boot.path else _program_elf(boot.rootfs, path, boot.name)
        return BootImage(elf, path, boot.rootfs, boot.name), list(args)
    return boot, [boot.path, *args]


def describe(rootfs: RootFs) -> dict[str, int]:
    """Counts for listings: entries by kind and the bytes of file contents."""
    counts = {kind: sum(e.kind == kind for e in rootfs.entries) for kind in KIND_CODES}
    return {
        "entries": len(rootfs.entries),
        "files": counts[FILE],
        "dirs": counts[DIR],
        "symlinks": counts[SYMLINK],
        "file_bytes": sum(len(e.data) for e in rootfs.entries),
    }


@dataclass(slots=True)
class _Reader:
    """Bounds-checked sequential reads: running off the end is 'truncated', never an
    IndexError."""

    buf: memoryview
    off: int
    name: str

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.buf) - self.off:
            raise ImageError(f"{self.name}: truncated: {what} runs past the end of the image")
        out = bytes(self.buf[self.off : self.off + n])
        self.off += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def text(self, n: int, what: str) -> str:
        if n > PATH_MAX:
            raise ImageError(f"{self.name}: {what}: {n} bytes, longer than {PATH_MAX}")
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError:
            raise ImageError(f"{self.name}: {what}: not UTF-8") from None


def _read_entry(r: _Reader, i: int) -> FsEntry:
    code, reserved, mode, path_len, size = r.unpack(ENTRY, f"entry {i}")
    path = r.text(path_len, f"entry {i}: path")
    where = f"{r.name}: entry {i} ({path[:64]!r})"
    try:
        check_path(path)
    except ImageError as e:
        raise ImageError(f"{r.name}: entry {i}: {e}") from None
    kind = KINDS.get(code)
    if kind is None or reserved:
        raise ImageError(f"{where}: unknown kind {code}")
    if mode & ~0o7777:
        raise ImageError(f"{where}: mode {mode:#o} has bits beyond 0o7777")
    if size > MAX_ENTRY_BYTES:
        raise ImageError(f"{where}: {size} bytes, more than an entry may hold ({MAX_ENTRY_BYTES})")
    if kind == DIR:
        if size:
            raise ImageError(f"{where}: a directory with {size} bytes of contents")
        return FsEntry(path, kind, mode)
    if kind == SYMLINK:
        if not 0 < size < PATH_MAX:
            raise ImageError(f"{where}: symlink target of {size} bytes (1 to {PATH_MAX - 1})")
        target = r.text(size, f"entry {i}: symlink target")
        if "\0" in target:
            raise ImageError(f"{where}: symlink target contains a NUL byte")
        return FsEntry(path, kind, mode, target=target)
    return FsEntry(path, kind, mode, data=r.take(size, f"entry {i}: contents"))


def _check_place(e: FsEntry, entries: dict[str, FsEntry], name: str) -> None:
    """A path appears once, below a directory listed before it."""
    if e.path in entries:
        raise ImageError(f"{name}: duplicate path {e.path}")
    parent = e.path.rsplit("/", 1)[0] or "/"
    if parent == "/":
        return
    up = entries.get(parent)
    if up is None:
        raise ImageError(
            f"{name}: {e.path}: its directory {parent} is not in the image before it "
            "(directories come before what they contain)"
        )
    if up.kind != DIR:
        raise ImageError(f"{name}: {e.path}: under {parent}, which is a {up.kind}, not a directory")


def _check_program(path: str, entries: dict[str, FsEntry], seen: list[str], name: str) -> None:
    if path in seen:
        raise ImageError(f"{name}: program {path} listed twice")
    e = entries.get(path)
    if e is None or e.kind != FILE:
        raise ImageError(
            f"{name}: program {path}: " + ("not in the image" if e is None else f"a {e.kind}")
        )


def _program_elf(
    rootfs: RootFs, path: str, name: str, entries: dict[str, FsEntry] | None = None
) -> ElfImage:
    """The ELF at ``path`` in the tree (symlinks followed), validated."""
    by_path = entries if entries is not None else {e.path: e for e in rootfs.entries}
    at = path
    for _ in range(MAX_SYMLINK_HOPS):
        e = by_path.get(at)
        if e is None or e.kind != SYMLINK:
            break
        at = posixpath.normpath(posixpath.join(posixpath.dirname(at), e.target))
    else:
        raise ImageError(f"{name}: program {path}: too many levels of symbolic links")
    if e is None:
        raise ImageError(
            f"{name}: no program {path} in the image (its programs: {', '.join(rootfs.programs)})"
        )
    if e.kind != FILE:
        raise ImageError(f"{name}: program {path}: a {e.kind}, not a file")
    if not e.mode & 0o111:
        raise ImageError(f"{name}: program {path}: not executable (mode {e.mode:04o})")
    try:
        return parse_elf(e.data, path)
    except ImageError as err:
        raise ImageError(f"{name}: program {err}") from None


_cache: dict[tuple[str, int, int], BootImage] = {}


def load_image_file(path: str | Path) -> BootImage:
    """Parse a file (ELF or baked) once per (path, size, mtime): tenders launch the same
    image often."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ImageError(f"{p}: {e.strerror}") from e
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    boot = _cache.get(key)
    if boot is None:
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageError(
                f"{p}: image too large ({st.st_size} bytes; at most {MAX_IMAGE_BYTES})"
            )
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ImageError(f"{p}: {e.strerror}") from e
        boot = parse_image(data, p.name)
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = boot
    return boot

"""``unifork bake``: pack static ELFs, files and directories into one image.

The analogue of ``rumprun-bake``: ``--bin /bin/sh=dash.elf`` adds a program
(the first is the one a run starts when it names none), ``--dir /etc=./etc``
a host directory's tree, ``--file /etc/motd=motd`` one file.  Directories on
the way to a path are created (mode 0755).  The result is written in the
format of docs/image-format.md and parsed back before it is kept, so a baked
image always passes the checks every boot path makes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tender_service.machine.elf import parse_elf
from tender_service.machine.errors import ImageError
from tender_service.machine.rootfs import (
    DIR,
    ENTRY,
    FILE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER,
    KIND_CODES,
    MAGIC,
    MAX_ENTRY_BYTES,
    MAX_IMAGE_BYTES,
    PROGRAM,
    SYMLINK,
    TRAILER_SIZE,
    FsEntry,
    RootFs,
    check_path,
    parse_rootfs,
)

log = logging.getLogger(__name__)

DIR_MODE, BIN_MODE = 0o755, 0o755


class BakeError(ValueError):
    """What was asked cannot be baked (a host file missing, a path given twice...)."""


@dataclass(slots=True)
class _Tree:
    """Entries by path while they are gathered."""

    entries: dict[str, FsEntry] = field(default_factory=dict)

    def add(self, e: FsEntry, origin: str) -> None:
        try:
            check_path(e.path)
        except ImageError as err:
            raise BakeError(f"{origin}: {err}") from None
        self.parents(e.path, origin)
        old = self.entries.get(e.path)
        if old is not None and not (old.kind == DIR == e.kind):
            raise BakeError(f"{origin}: {e.path} is in the image already (a {old.kind})")
        if e.kind == FILE and len(e.data) > MAX_ENTRY_BYTES:
            raise BakeError(f"{origin}: {len(e.data)} bytes, more than {MAX_ENTRY_BYTES} a file")
        self.entries[e.path] = e

    def parents(self, path: str, origin: str) -> None:
        parts = path.split("/")[1:-1]
        for n in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:n])
            old = self.entries.get(d)
            if old is None:
                self.entries[d] = FsEntry(d, DIR, DIR_MODE)
            elif old.kind != DIR:
                raise BakeError(f"{origin}: {path} would be under {d}, which is a {old.kind}")


def split_spec(spec: str, flag: str) -> tuple[str, Path]:
    """``/bin/sh=dash.elf`` -> ("/bin/sh", Path("dash.elf"))."""
    guest, sep, host = spec.partition("=")
    if not sep or not guest or not host:
        raise BakeError(f"{flag} {spec!r}: not GUEST_PATH=HOST_PATH")
    return guest, Path(host)


def build_rootfs(
    bins: Sequence[tuple[str, Path]],
    dirs: Sequence[tuple[str, Path]] = (),
    files: Sequence[tuple[str, Path]] = (),
) -> RootFs:
    """The tree of an image from host files; BakeError/ImageError say what is wrong."""
    if not bins:
        raise BakeError("no program: give at least one --bin GUEST_PATH=ELF")
    tree = _Tree()
    for guest, host in dirs:
        _add_dir(tree, guest, host, f"--dir {guest}={host}")
    for guest, host in files:
        origin = f"--file {guest}={host}"
        data = _read(host, origin)
        tree.add(FsEntry(guest, FILE, _mode(host, origin), data=data), origin)
    for guest, host in bins:
        origin = f"--bin {guest}={host}"
        data = _read(host, origin)
        try:
            parse_elf(data, str(host))  # a static x86-64 executable, or refused here
        except ImageError as e:
            raise BakeError(f"{origin}: {e}") from None
        tree.add(FsEntry(guest, FILE, BIN_MODE, data=data), origin)
    programs = [g for g, _ in bins]
    if len(set(programs)) != len(programs):
        raise BakeError("a program path is given twice with --bin")
    entries = sorted(tree.entries.values(), key=lambda e: e.path.split("/"))
    return RootFs(tuple(entries), tuple(programs))


def encode(rootfs: RootFs) -> bytes:
    """The bytes of an image (docs/image-format.md)."""
    body = bytearray()
    for e in rootfs.entries:
        path = e.path.encode()
        payload = e.target.encode() if e.kind == SYMLINK else e.data
        body += ENTRY.pack(KIND_CODES[e.kind], 0, e.mode, len(path), len(payload))
        body += path + payload
    for p in rootfs.programs:
        path = p.encode()
        body += PROGRAM.pack(len(path)) + path
    total = HEADER.size + len(body) + TRAILER_SIZE
    if total > MAX_IMAGE_BYTES:
        raise BakeError(f"the image would be {total} bytes, more than {MAX_IMAGE_BYTES}")
    out = bytearray(
        HEADER.pack(
            MAGIC,
            FORMAT_MAJOR,
            FORMAT_MINOR,
            0,
            len(rootfs.entries),
            len(rootfs.programs),
            total,
        )
    )
    out += body
    out += hashlib.sha256(out).digest()
    return bytes(out)


def bake(
    out: Path,
    bins: Sequence[tuple[str, Path]],
    dirs: Sequence[tuple[str, Path]] = (),
    files: Sequence[tuple[str, Path]] = (),
) -> RootFs:
    """Write the image to ``out`` (replaced whole, never half written) and return its tree."""
    rootfs = build_rootfs(bins, dirs, files)
    data = encode(rootfs)
    parse_rootfs(data, out.name)  # what every boot path will check, checked now
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as e:
        raise BakeError(f"-o {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("baked %s: %d entries, %d bytes", out, len(rootfs.entries), len(data))
    return rootfs


def _read(host: Path, origin: str) -> bytes:
    try:
        st = host.stat()
        if not stat.S_ISREG(st.st_mode):
            raise BakeError(f"{origin}: not a regular file")
        if st.st_size > MAX_ENTRY_BYTES:
            raise BakeError(f"{origin}: {st.st_size} bytes, more than {MAX_ENTRY_BYTES} a file")
        return host.read_bytes()
    except OSError as e:
        raise BakeError(f"{origin}: {e.strerror or e}") from None


def _mode(host: Path, origin: str) -> int:
    try:
        return stat.S_IMODE(host.stat().st_mode)
    except OSError as e:
        raise BakeError(f"{origin}: {e.strerror or e}") from None


def _add_dir(tree: _Tree, guest: str, host: Path, origin: str) -> None:
    """``host``'s tree below ``guest``: directories, regular files and symlinks (as
    links: their targets are kept, not followed); anything else is refused."""
    if not host.is_dir():
        raise BakeError(f"{origin}: not a directory")
    if guest == "/":  # the root itself is implicit: only what it holds is listed
        guest = ""
    else:
        tree.add(FsEntry(guest, DIR, _mode(host, origin)), origin)
    for root, dirnames, filenames in os.walk(host):
        dirnames.sort()
        base = Path(root)
        rel = base.relative_to(host).as_posix()
        at = guest if rel == "." else f"{guest}/{rel}"
        for name in sorted(dirnames + filenames):
            p = base / name
            st = p.lstat()
            g = f"{at}/{name}"
            if stat.S_ISLNK(st.st_mode):
                tree.add(FsEntry(g, SYMLINK, 0o777, target=os.readlink(p)), origin)
            elif stat.S_ISDIR(st.st_mode):
                tree.add(FsEntry(g, DIR, stat.S_IMODE(st.st_mode)), origin)
            elif stat.S_ISREG(st.st_mode):
                tree.add(FsEntry(g, FILE, stat.S_IMODE(st.st_mode), data=_read(p, origin)), origin)
            else:
                raise BakeError(f"{origin}: {p} is not a regular file, directory or symlink")
        # a symlink to a directory is listed in dirnames but not walked (followlinks=False)

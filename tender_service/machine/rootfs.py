"""A baked image's root file system, as the kernel sees it (issue 14).

``unifork bake`` (``toolchain/bake.py``) packs static ELFs, files and
directories into one versioned image; this module holds what such an image
means once parsed: the tree of entries and the programs named with ``--bin``.
The rump layer builds the read-only lower layer of an instance's file system
from :class:`RootFs`; nothing here knows about processes or syscalls.
"""

from __future__ import annotations

from dataclasses import dataclass

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

"""Guest images: the built-in programs in ``guest/programs`` and a content-addressed cache.

An image is a static ELF built by ``compile_guest``.  Its cache file
``cache_dir()/images/<name>-<key>.elf`` is keyed by everything that changes
the binary: the program source, the headers beside it (guest_common.h), the
guest runtime sources, the flags, the toolchain's base flags and the zig
version.  Builds write a temporary file and rename it into place under a
per-image file lock, so concurrent builders (threads or processes) produce
exactly one valid file, and a cached file is never rebuilt.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tender_service.machine.rootfs import MAGIC, is_baked
from tender_service.toolchain.cc import (
    BASE_FLAGS,
    HOST_FLAGS,
    HOST_LIBRARIES,
    TARGET,
    VDSO_FLAGS,
    WRAPPED_FUNCTIONS,
    compile_guest,
    compile_host_library,
    compile_vdso,
    host_library_source,
    runtime_sources,
    vdso_sources,
)
from tender_service.toolchain.paths import images_dir, programs_dir

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
BUILD_WORKERS = 2

#: progress(name, done, total) after each image of build_all
ProgressFn = Callable[[str, int, int], None]


class ImageNotFoundError(LookupError):
    """The spec is neither a built-in program, nor an ELF, nor a C source."""


@dataclass(frozen=True)
class ImageInfo:
    """One built-in image as ``unifork images`` shows it."""

    name: str
    source: Path
    path: Path | None
    size: int | None
    sha256: str | None


def builtin_programs() -> dict[str, Path]:
    """Built-in guest programs: ``guest/programs/<name>.c``, sorted by name."""
    return {p.stem: p for p in sorted(programs_dir().glob("*.c"))}


@functools.cache
def zig_version() -> str:
    """The ziglang package version (part of every cache key)."""
    return importlib.metadata.version("ziglang")


def image_key(source: Path, flags: Sequence[str] = ()) -> str:
    """Hex digest over everything that determines the built binary."""
    h = hashlib.sha256()
    for part in (
        f"zig={zig_version()}",
        f"target={TARGET}",
        "base=" + "\0".join(BASE_FLAGS),
        "wrap=" + "\0".join(WRAPPED_FUNCTIONS),
        "flags=" + "\0".join(flags),
    ):
        h.update(part.encode() + b"\n")
    # headers beside the source (guest/programs/guest_common.h) are part of it
    for path in (source, *sorted(source.parent.glob("*.h")), *runtime_sources()):
        data = path.read_bytes()
        h.update(f"{path.name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


def image_path(source: Path, flags: Sequence[str] = (), name: str | None = None) -> Path:
    """Where the image of ``source`` built with ``flags`` lives in the cache."""
    return images_dir() / f"{name or source.stem}-{image_key(source, flags)}.elf"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on ``path`` (separate opens conflict, so threads are covered too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _source_of(name_or_source: str | Path) -> tuple[str, Path]:
    """(image name, source path) for a built-in name or a path to a ``.c`` file."""
    if isinstance(name_or_source, str):
        builtins = builtin_programs()
        if name_or_source in builtins:
            return name_or_source, builtins[name_or_source]
    path = Path(name_or_source)
    if path.suffix == ".c" and path.is_file():
        return path.stem, path.resolve()
    raise ImageNotFoundError(f"no built-in program or C source named {str(name_or_source)!r}")


def build_image(name_or_source: str | Path, flags: Sequence[str] = ()) -> Path:
    """Build (or reuse) the image of a built-in program or a ``.c`` file; returns its path."""
    name, source = _source_of(name_or_source)
    flags = list(flags)
    target = image_path(source, flags, name)
    return _build_once(
        target, f"image {name} from {source}", lambda tmp: compile_guest([source], tmp, flags)
    )


def vdso_path() -> Path:
    """Where the guest vDSO (guest/runtime/vdso.c) lives in the cache."""
    h = hashlib.sha256(f"zig={zig_version()}\n".encode() + "\0".join(VDSO_FLAGS).encode())
    for path in vdso_sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return images_dir() / f"vdso-{h.hexdigest()[:16]}.so"


def build_vdso() -> Path:
    """Build (or reuse) the guest vDSO; returns its path."""
    return _build_once(vdso_path(), "the vDSO", compile_vdso)


def host_library_path(name: str) -> Path:
    """Where the host library of guest/runtime/<name>.c lives in the cache."""
    h = hashlib.sha256(f"zig={zig_version()}\n".encode() + "\0".join(HOST_FLAGS).encode())
    h.update(host_library_source(name).read_bytes())
    return images_dir() / f"{name}-{h.hexdigest()[:16]}.so"


def build_host_library(name: str) -> Path:
    """Build (or reuse) a host library (``HOST_LIBRARIES``); returns its path."""
    return _build_once(
        host_library_path(name),
        f"the host library {name}",
        functools.partial(compile_host_library, name),
    )


def build_vm_runtime() -> None:
    """Build (or find) what every VM process maps or loads: the vDSO and the host
    libraries.  Before a jailed process needs them: it cannot run the compiler (its
    filter allows no new process), so a pool worker started with one missing died
    in its warm-up."""
    build_vdso()
    for lib in HOST_LIBRARIES:
        build_host_library(lib)


def _build_once(target: Path, what: str, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(tmp)`` unless it exists: under a per-file lock, into a
    private name renamed into place, so readers only ever see a complete file."""
    if target.is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if target.is_file():  # another builder finished while we waited
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            log.info("building %s", what)
            build(tmp)
            tmp.chmod(0o755)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def is_elf(path: Path) -> bool:
    """True when ``path`` is a file that starts with the ELF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == ELF_MAGIC
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """True when ``path`` starts like an ELF or a baked image (``unifork bake``); the
    boot path validates the rest."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError:
        return False
    return head[:4] == ELF_MAGIC or is_baked(head)


def resolve_image(spec: str) -> Path:
    """An image spec to a file: a built-in name, a path to an ELF or a baked image, or a
    ``.c`` file."""
    if spec in builtin_programs():
        return build_image(spec)
    path = Path(spec)
    if path.suffix == ".c" and path.is_file():
        return build_image(path)
    if path.is_file():
        if not is_image_file(path):
            raise ImageNotFoundError(f"{spec} is not an ELF file nor a baked image")
        return path.resolve()
    raise ImageNotFoundError(
        f"unknown image {spec!r}: not a built-in program ({', '.join(builtin_programs())}), "
        "an ELF file, a baked image or a .c file"
    )


def build_all(
    names: Sequence[str] | None = None, progress: ProgressFn | None = None
) -> dict[str, Path]:
    """Build the named built-ins (default: all, and the vDSO) with a small thread pool.

    Every build is attempted; if any fail, the first failure is raised after
    the others have finished.
    """
    builtins = builtin_programs()
    wanted = list(builtins) if names is None else list(names)
    unknown = [n for n in wanted if n not in builtins]
    if unknown:
        raise ImageNotFoundError(f"unknown built-in programs: {', '.join(unknown)}")
    built: dict[str, Path] = {}
    failures: list[tuple[str, Exception]] = []
    with ThreadPoolExecutor(max_workers=BUILD_WORKERS, thread_name_prefix="build") as pool:
        futures = {pool.submit(build_image, name): name for name in wanted}
        for done, future in enumerate(as_completed(futures), start=1):
            name = futures[future]
            try:
                built[name] = future.result()
            except Exception as exc:  # reported below, after the other builds
                log.error("building %s failed: %s", name, exc)
                failures.append((name, exc))
            else:
                log.info("built %s (%d/%d)", name, done, len(wanted))
            if progress is not None:
                progress(name, done, len(wanted))
    if names is None:
        build_vm_runtime()  # with the images, not in a VM's first boot
    if failures:
        raise failures[0][1]
    return {name: built[name] for name in wanted}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_images() -> list[ImageInfo]:
    """Every built-in program with its cached image, if built for the current sources."""
    infos = []
    for name, source in builtin_programs().items():
        path = image_path(source, (), name)
        if path.is_file():
            infos.append(ImageInfo(name, source, path, path.stat().st_size, _sha256(path)))
        else:
            infos.append(ImageInfo(name, source, None, None, None))
    return infos

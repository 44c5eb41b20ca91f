"""Assemble and run one VM: machine + bmk + rump kernel + a fork strategy.

A thread-fork instance is one such VM (instance/backends/thread.py runs it in
this process or, for a tender, in a VM process of its own); a VM-clone
instance is many, one per tender process (instance/worker.py builds them).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tender_service.fork.copy import CopyFork
from tender_service.fork.thread import ThreadFork
from tender_service.machine.elf import ElfImage
from tender_service.machine.rootfs import BootImage, load_image_file, select_program
from tender_service.rump import signals
from tender_service.rump.console import Console, Sink
from tender_service.rump.kernel import Forker, Kernel
from tender_service.rump.vminfo import RunResult, VmConfig

log = logging.getLogger(__name__)

#: fork strategies that run inside one VM (``create_vm``'s ``fork``); the fork modes an
#: instance can have (one VM or several) are in instance/backends/
FORKERS = ("thread", "copy")
DEFAULT_ENV = ("PATH=/bin", "HOME=/", "TERM=dumb")


def make_forker(mode: str) -> Forker:
    if mode == "thread":
        return ThreadFork()
    if mode == "copy":
        return CopyFork()
    raise ValueError(f"unknown fork mode {mode!r} (choose from {', '.join(FORKERS)})")


def stdio_sink(pid_tags: bool = False) -> Sink:
    """Write guest output to this process's stdout/stderr as it comes."""

    def sink(pid: int, fd: int, data: bytes) -> None:
        out = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        if pid_tags:
            data = b"".join(b"[%d] %s" % (pid, line) for line in data.splitlines(keepends=True))
        out.write(data)
        out.flush()

    return sink


class CaptureSink:
    """Collect output in memory: stdout, stderr and the per-pid stream."""

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.chunks: list[tuple[int, int, bytes]] = []

    def __call__(self, pid: int, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).extend(data)
        self.chunks.append((pid, fd, data))


def boot_kernel(
    boot: BootImage,
    args: Sequence[str],
    env: Sequence[str],
    config: VmConfig,
    console: Console,
    forker: Forker | None,
    argv0: str | None = None,
) -> Kernel:
    """Boot a plain ELF (argv[0]: ``argv0`` or its name) or a baked image's program
    (``select_program``: argv[0] is the program's path as given), with its tree."""
    if boot.rootfs is None:
        argv = [argv0 or _program_name(boot.elf.name), *args]
        return Kernel.boot(boot.elf, argv, list(env), config, console, forker)
    chosen, argv = select_program(boot, args)
    return Kernel.boot(chosen.elf, argv, list(env), config, console, forker, rootfs=boot.rootfs)


def as_boot_image(image: BootImage | ElfImage | str | Path) -> BootImage:
    """A file is parsed (once per version of it, machine/rootfs.py caches)."""
    if isinstance(image, BootImage):
        return image
    if isinstance(image, ElfImage):
        return BootImage(image, image.name, None, image.name)
    return load_image_file(image)


def create_vm(
    image: BootImage | ElfImage | str | Path,
    args: Sequence[str] = (),
    env: Sequence[str] | None = None,
    config: VmConfig | None = None,
    sink: Sink | None = None,
    stdin: bytes | int | None = None,
    fork: str = "thread",
    argv0: str | None = None,
) -> Kernel:
    """Build a VM ready to run; raises ImageError for an image it refuses.

    A baked image runs the program its first argument names, else its first
    (``select_program``); ``argv0`` names a plain ELF only.
    """
    boot = as_boot_image(image)
    config = config or VmConfig()
    console = Console(sink or stdio_sink(), stdin=stdin, tty=config.tty)
    return boot_kernel(
        boot,
        args,
        DEFAULT_ENV if env is None else env,
        config,
        console,
        make_forker(fork),
        argv0,
    )


def run_vm(
    image: BootImage | ElfImage | str | Path,
    args: Sequence[str] = (),
    env: Sequence[str] | None = None,
    config: VmConfig | None = None,
    sink: Sink | None = None,
    stdin: bytes | int | None = None,
    fork: str = "thread",
    argv0: str | None = None,
) -> RunResult:
    """Create a VM, run it to the end, free it; return how it ended."""
    k = create_vm(image, args, env, config, sink, stdin, fork, argv0)
    try:
        return k.run()
    finally:
        k.close()


def emulator_crashed(wait_status: int | None) -> bool:
    """Whether a VM process that ended without a result died of a signal.

    Guest faults never end the process (they end a guest process), so a signal
    death is the emulator's: Unicorn 2.1.4 dies of SIGSEGV translating a long
    straight line of x87 instructions (unicorn-engine/unicorn#2240).
    """
    return wait_status is not None and wait_status >= 0 and os.WIFSIGNALED(wait_status)


def lost_vm_report(os_pid: int, wait_status: int | None) -> str:
    """What to report for a VM whose host process ended without a result.

    ``wait_status`` is that process's (as ``os.waitpid`` gives it), None if unknown.
    """
    if wait_status is None or wait_status < 0:
        how = "ended (how is unknown)"
    elif emulator_crashed(wait_status):
        how = f"died of {signals.signame(os.WTERMSIG(wait_status))} (the emulator crashed)"
    else:
        how = f"exited with code {os.WEXITSTATUS(wait_status)} without a result"
    return f"its VM was lost: the process that ran it (pid {os_pid}) {how}"


def _program_name(file_name: str) -> str:
    """'hello' for a cached image file 'hello-0123456789abcdef.elf'."""
    stem = file_name.removesuffix(".elf")
    base, _, key = stem.rpartition("-")
    return (
        base
        if base and len(key) == 16 and all(c in "0123456789abcdef" for c in key)
        else stem or "program"
    )

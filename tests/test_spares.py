"""Program images kept with their translated code (rump/spares.py, issue 17).

An exec'd program's image and a copy fork's image copy are kept when their
last process goes, for the next exec or fork of the same program: its code is
then already translated (exec ~1.1 ms -> ~0.2 ms).  What must hold:
- a file replaced between two execs of the same path runs its new code, in
  every one-VM mode, exactly as natively (the same ELF runs on the host);
- the cache is used (a second exec of an unchanged program takes a kept image);
- kept images never cost a guest memory: the page allocator takes them back
  before it fails, and a VM-clone snapshot drops them first;
- at most PER_PROGRAM per program and MAX_IMAGES in all.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tender_service.bmk.pagealloc import PageAllocator
from tender_service.fork.snapshot import capture
from tender_service.machine.elf import load_elf_file
from tender_service.machine.layout import PAGE_SIZE, page_up
from tender_service.machine.rootfs import DIR, FILE, FsEntry, RootFs
from tender_service.rump.console import Console
from tender_service.rump.kernel import Kernel
from tender_service.rump.process import Program
from tender_service.rump.spares import MAX_IMAGES, PER_PROGRAM
from tender_service.rump.vminfo import VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, create_vm, make_forker

TESTS_GUEST = Path(__file__).with_name("guest")


@pytest.fixture(scope="module")
def programs() -> dict[str, Path]:
    """exec_swap and two builds of swap_tag whose images have the same size."""
    built = {
        "swap": build_image(TESTS_GUEST / "exec_swap.c"),
        "a": build_image(TESTS_GUEST / "swap_tag.c", ["-DTAG=1"]),
        "b": build_image(TESTS_GUEST / "swap_tag.c", ["-DTAG=2"]),
    }
    spans = {page_up(load_elf_file(built[x]).span) for x in "ab"}
    assert len(spans) == 1, "the two builds must share a kept image's key (path, size)"
    return built


def _boot(programs: dict[str, Path], args: list[str], fork: str) -> tuple[Kernel, CaptureSink]:
    root = RootFs(
        (
            FsEntry("/t", DIR, 0o755),
            FsEntry("/t/a", FILE, 0o755, programs["a"].read_bytes()),
            FsEntry("/t/b", FILE, 0o755, programs["b"].read_bytes()),
        ),
        (),
    )
    sink = CaptureSink()
    k = Kernel.boot(
        load_elf_file(programs["swap"]),
        ["exec_swap", *args],
        ["PATH=/bin"],
        VmConfig(timeout=120),
        Console(sink),
        make_forker(fork),
        rootfs=root,
    )
    return k, sink


@pytest.mark.parametrize("fork", ["thread", "copy"])
def test_a_file_replaced_between_execs_runs_its_new_code_as_natively(
    fork: str, programs: dict[str, Path], tmp_path: Path
) -> None:
    order = ["a", "a", "b", "a", "a"]
    native = subprocess.run(
        [str(programs["swap"]), str(tmp_path / "x"), *(str(programs[x]) for x in order)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert native.returncode == 0, native.stderr
    assert native.stdout.decode().count("tag=2") == 1  # the reference itself is right

    k, sink = _boot(programs, ["/tmp/x", *(f"/t/{x}" for x in order)], fork)
    try:
        r = k.run()
        hits, stale = k.spares.hits, k.spares.stale
    finally:
        k.close()
    assert (r.outcome, r.status) == ("exited", 0), r.reports
    assert bytes(sink.stdout) == native.stdout
    # a -> a: the kept image is taken; a -> b: a's kept image is refused (its text
    # differs from b's), b runs from fresh pages; b -> a: b's is refused; a -> a: taken
    assert hits >= 2 and stale >= 2


def _keep_images(k: Kernel, path: bytes, n: int, pages: int = 4) -> list[int]:
    bases = []
    for _ in range(n):
        base = k.pages.alloc(pages)
        assert base is not None
        bases.append(base)
        k.spares.keep(Program(path, base, pages * PAGE_SIZE, True))
    return bases


def test_kept_images_are_capped_per_program_and_in_all() -> None:
    k = create_vm(build_image("hello"), sink=CaptureSink())
    try:
        used = k.pages.used_bytes
        _keep_images(k, b"/bin/p", PER_PROGRAM + 3)
        assert k.spares.count == PER_PROGRAM
        for i in range(MAX_IMAGES):
            _keep_images(k, b"/bin/q%d" % i, 1)
        assert k.spares.count == MAX_IMAGES
        # the oldest program's images went first
        assert k.spares.take((b"/bin/p", 4 * PAGE_SIZE), lambda base: True) is None
        assert k.spares.take((b"/bin/q0", 4 * PAGE_SIZE), lambda base: True) is not None
        assert k.spares.drop() == MAX_IMAGES - 1
        assert k.pages.used_bytes == used + 4 * PAGE_SIZE  # only the one taken is held
    finally:
        k.close()


def test_an_allocation_takes_kept_images_back_before_it_fails() -> None:
    k = create_vm(build_image("hello"), sink=CaptureSink())
    try:
        _keep_images(k, b"/bin/p", 2, pages=64)
        got = 0
        while k.pages.alloc(1) is not None:
            got += 1
        assert k.spares.count == 0
        assert k.pages.free_bytes == 0 and got >= 128  # their pages were handed out too
    finally:
        k.close()


def test_a_vm_clone_snapshot_drops_the_kept_images() -> None:
    k = create_vm(build_image("hello"), sink=CaptureSink())
    try:
        _keep_images(k, b"/bin/p", 2)
        used = k.pages.used_bytes
        snap = capture(k, k.main.lwps[0], 99)
        assert snap and k.spares.count == 0
        assert k.pages.used_bytes == used - 8 * PAGE_SIZE
    finally:
        k.close()


def test_the_page_allocator_reclaims_once_then_fails() -> None:
    pages = PageAllocator(0x100000, 4 * PAGE_SIZE)
    held = [pages.alloc(1) for _ in range(4)]
    calls: list[int] = []

    def reclaim() -> int:
        calls.append(1)
        if len(calls) == 1:
            pages.free(held.pop())
            return 1
        return 0

    pages.reclaim = reclaim
    assert pages.alloc(1) is not None  # after one reclaim
    assert pages.alloc(1) is None and len(calls) == 2  # nothing more to give back

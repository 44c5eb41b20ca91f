"""Copy fork (``--fork copy``, issue 18): private memory inside one VM.

The child gets a copy of all of its parent's memory (image, heap, mmaps,
stack, TLS) at fresh addresses of the same VM, pointers relocated
(tender_service/fork/copy.py).  The test is POSIX's: the same program prints
here what it prints natively, including the cases thread fork gets wrong by
design (globals, heap reached from globals, stdio buffers).  The shell
scripts of tests/test_shell.py run in this mode too.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
from support import native
from test_programs_native import CASES, SEMANTICS_NATIVE

from tender_service.fork.copy import RegionMap, relocate
from tender_service.instance.backends import (
    BackendContext,
    InstanceSpec,
    make_backend,
    run_instance,
)
from tender_service.rump.spares import PER_PROGRAM
from tender_service.rump.vminfo import VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, create_vm

PROBE = Path(__file__).resolve().parent / "guest" / "copy_probe.c"

#: the multi-process programs of test_programs_native (semantics and fork_hazards
#: are checked below; deadlock needs --forever)
MULTI_PROCESS = {
    "fork_exit_wait", "pipe_throughput", "token_ring", "dup2_pipe", "pipe_eof", "sigpipe",
    "ids", "wait_variants", "kill_test", "pgroup_rules", "fork_bomb", "fd_independent",
    "prefork_server", "vfork_test", "orphan", "nested_fork",
}  # fmt: skip


def run_copy(image: str | Path, *args: str, **config):
    """Run ``image`` in a copy-fork VM: (result, stdout, stderr, kernel stats)."""
    config.setdefault("timeout", 120)
    config.setdefault("tty", False)
    sink = CaptureSink()
    path = image if isinstance(image, Path) else build_image(image)
    k = create_vm(path, list(args), config=VmConfig(**config), sink=sink, fork="copy")
    try:
        r = k.run()
        k.drop_caches()  # the stacks kept for the next fork are the kernel's, not a leak
        live = k.heap.live_count
    finally:
        k.close()
    return r, bytes(sink.stdout), bytes(sink.stderr), live


@pytest.mark.parametrize(
    ("prog", "args", "expected"),
    [pytest.param(c[1], c[2], c[4], id=c[0]) for c in CASES if c[1] in MULTI_PROCESS],
)
def test_multi_process_programs_as_natively(prog: str, args: list[str], expected: str) -> None:
    r, out, err, _ = run_copy(prog, *args)
    assert out.decode() == expected, f"stderr: {err!r}\nreports: {r.reports}"
    assert (r.outcome, r.status) == ("exited", 0)


def test_semantics_probe_shows_everything_private() -> None:
    r, out, _, _ = run_copy("semantics")
    assert out.decode() == SEMANTICS_NATIVE
    assert r.forks >= 1


def test_fork_hazards_probe_shows_the_conservative_scan_and_nothing_else() -> None:
    """docs/semantics.md ("Copy fork"): an integer equal to an address in one of the
    parent's regions is rebased in the child, on the stack and in a global alike;
    every other answer is the native one (heap two levels down, a hoisted &errno)."""
    r, out, _, _ = run_copy("fork_hazards")
    assert r.outcome == "exited" and r.status == 0, r.reports
    ref = native("fork_hazards").stdout.decode()
    got = dict(ln.split("=", 1) for ln in out.decode().splitlines())
    want = dict(ln.split("=", 1) for ln in ref.splitlines())
    assert got.keys() == want.keys()
    assert {k: (want[k], v) for k, v in got.items() if v != want[k]} == {
        "int_looking_like_stack_ptr": ("unchanged", "rebased"),
        "int_looking_like_global_ptr": ("unchanged", "rebased"),
    }


def test_child_writes_to_data_bss_and_heap_stay_in_the_child() -> None:
    """NuttX-style: .data, .bss, heap from a global, heap two levels down, a pointer."""
    ref = native(build_image(PROBE), "private").stdout
    assert ref == b"data=1 bss=0 heap=1 heap2=1 lit=parent child=ok\n"
    r, out, _, _ = run_copy(build_image(PROBE), "private")
    assert out == ref, r.reports


@pytest.mark.parametrize("how", ["full", "line", "none"])
def test_stdio_buffered_at_fork_as_natively(how: str) -> None:
    """Data pending in stdout's buffer at fork is printed by both, as natively."""
    ref = native(build_image(PROBE), "stdio", how).stdout
    r, out, _, _ = run_copy(build_image(PROBE), "stdio", how)
    assert out == ref, r.reports
    assert out.count(b"pending: ") == (1 if how == "none" else 2)


def test_fork_without_memory_for_the_copy_is_enomem_and_the_parent_goes_on() -> None:
    r, out, _, _ = run_copy(build_image(PROBE), "enomem", "28", ram=64 << 20)
    assert out == b"fork: ENOMEM, parent goes on\n"
    assert (r.outcome, r.status) == ("exited", 0)
    r, out, _, _ = run_copy(build_image(PROBE), "enomem", "8", ram=64 << 20)
    assert out == b"fork: ok\n"


def test_a_childs_patch_of_its_code_stays_in_that_child() -> None:
    """A child's image copy is kept for the next fork (its code stays translated);
    a child that wrote into its text must not hand its code to the next child."""
    ref = native(build_image(PROBE), "text", "3").stdout
    assert ref == b"child: 1 then 2\n" * 3 + b"parent: 1\n"
    r, out, _, _ = run_copy(build_image(PROBE), "text", "3")
    assert out == ref, r.reports


def _kept_after(*args: str) -> tuple[bytes, int]:
    """Run fork_exit_wait in copy mode: (stdout, image copies kept at the end)."""
    sink = CaptureSink()
    k = create_vm(
        build_image("fork_exit_wait"), list(args), config=VmConfig(timeout=60, tty=False),
        sink=sink, fork="copy",
    )  # fmt: skip
    try:
        r = k.run()
        kept = k.spares.count
    finally:
        k.close()
    assert (r.outcome, r.status, r.forks) == ("exited", 0, 20), r.reports
    return bytes(sink.stdout), kept


def test_image_copies_are_kept_for_the_next_fork_two_at_most() -> None:
    # one child at a time: each runs from the copy the one before it left
    out, kept = _kept_after("-t", "-n", "20")
    assert out.count(b"fork_wait_us=") == 20 and out.endswith(b"ok 20 children\n")
    assert kept == 1
    # twenty children alive at once: twenty copies, two kept when they end
    out, kept = _kept_after("-n", "20")
    assert out == native("fork_exit_wait", "-n", "20").stdout
    assert kept == PER_PROGRAM == 2


def test_every_copy_is_freed_when_its_process_ends() -> None:
    """Parents exit before and after their children: no heap block survives the VM's end."""
    r, out, _, live = run_copy("nested_fork")
    assert r.outcome == "exited"
    assert r.forks >= 2
    assert live == 0


def test_a_tender_runs_copy_fork_in_a_vm_process_of_its_own() -> None:
    """The hosted path (fork server, VM process) gets the mode, not thread fork."""
    b = make_backend("copy", BackendContext(hosted=True, jailed=False))
    try:
        sink = CaptureSink()
        spec = InstanceSpec(
            build_image(PROBE), ["private"], config=VmConfig(timeout=60, tty=False), instance_id="c"
        )
        r = run_instance(b, spec, sink)
    finally:
        b.close()
    assert (r.outcome, r.exit_code) == ("exited", 0), r.reports
    assert bytes(sink.stdout) == b"data=1 bss=0 heap=1 heap2=1 lit=parent child=ok\n"


def test_relocate_rebases_aligned_words_in_a_region_and_nothing_else() -> None:
    """The scan (in C) rebases every aligned word in a region, and touches nothing else."""
    regions = RegionMap()
    regions.add(0x0100_0000, 0x2_0000, 0x4000_0300_0000 - 0x0100_0000)  # an image
    regions.add(0x4000_0001_0000, 0x100, 0x1000)  # a heap block
    regions.seal()
    words = [
        0x0100_0000, 0x0101_FFF8, 0x0102_0000,  # first, last word of the image, one past
        0x4000_0001_0010, 0x4000_0001_0100, 0x4000_0002_0000,  # in the block, past, elsewhere
        0, 1, 0x00FF_FFFF, 0x0100_4142,  # integers; the last looks like "BA\0\1"
    ]  # fmt: skip
    buf = bytearray(8) + b"".join(w.to_bytes(8, "little") for w in words) + bytes(3)
    buf[1:9] = (0x0100_0010).to_bytes(8, "little")  # an unaligned image address
    before = bytes(buf)
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    changed = relocate(addr, [(8, len(buf) - 11)], regions)
    got = [int.from_bytes(buf[8 + 8 * i : 16 + 8 * i], "little") for i in range(len(words))]
    delta = 0x4000_0300_0000 - 0x0100_0000
    assert got == [
        0x0100_0000 + delta, 0x0101_FFF8 + delta, 0x0102_0000,
        0x4000_0001_1010, 0x4000_0001_0100, 0x4000_0002_0000,
        0, 1, 0x00FF_FFFF, 0x0100_4142 + delta,  # the conservative scan's false positive
    ]  # fmt: skip
    assert changed == 4
    assert buf[:8] == before[:8]


def test_a_program_that_cannot_move_gets_enosys_from_fork() -> None:
    """A non-PIE image runs only at its link address: no copy of it can run."""
    nopie = build_image(PROBE, ["-no-pie", "-fno-PIE"])
    r, out, _, _ = run_copy(nopie, "enomem", "1")
    assert out == b"fork: Function not implemented, parent goes on\n"
    assert (r.outcome, r.status, r.forks) == ("exited", 0, 0)

"""Thread stacks and TLS blocks the kernel keeps for the next fork (rump/stacks.py,
issue 17).

What must hold: a fork or exec takes a kept stack when there is one, owned by
its process from then on; at most KEEP are kept; a stack of another size is
freed, not kept; kept stacks never cost the guest memory (the page allocator
takes them back before it fails, a VM-clone snapshot drops them); and an exec,
whose new stack has a temporary owner until the old memory is gone, leaves the
kept stacks alone.  Thread fork's TLS copies are kept the same way; a program
whose TLS block has another size frees the kept ones, and a block of another
size or alignment is never kept.
"""

from __future__ import annotations

import pytest

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK
from tender_service.fork.snapshot import capture
from tender_service.machine.elf import load_elf_file
from tender_service.machine.rootfs import DIR, FILE, FsEntry, RootFs
from tender_service.rump.console import Console
from tender_service.rump.kernel import Kernel
from tender_service.rump.stacks import KEEP, KEPT_OWNER, TLS_ALIGN
from tender_service.rump.vminfo import VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, create_vm, make_forker


@pytest.fixture
def k() -> Kernel:
    k = create_vm(build_image("hello"), sink=CaptureSink())
    yield k
    k.close()


def test_a_stack_given_back_is_taken_by_the_next_fork(k: Kernel) -> None:
    first = k.stacks.take(7)
    k.stacks.put(first)
    assert k.stacks.kept == [first] and k.heap.get(first).owner == KEPT_OWNER
    assert k.stacks.take(8) == first
    assert k.heap.get(first).owner == 8 and k.stacks.reused == 1
    assert k.heap.owned(KEPT_OWNER) == []


def test_at_most_keep_are_kept_and_other_sizes_are_freed(k: Kernel) -> None:
    stacks = [k.stacks.take(7) for _ in range(KEEP + 2)]
    live = k.heap.live_count
    for s in stacks:
        k.stacks.put(s)
    assert k.stacks.kept == stacks[:KEEP]
    assert k.heap.live_count == live - 2  # the two past KEEP went back to the allocator
    odd = k.heap.malloc(4096, 16, owner=7, who=MEMWHO_WIREDBMK)
    assert k.drop_caches() >= KEEP and k.stacks.kept == []
    k.stacks.put(odd)  # a stack of another size (a snapshot's, say): freed
    assert k.stacks.kept == [] and k.heap.get(odd) is None


def test_an_allocation_takes_kept_stacks_back_before_it_fails(k: Kernel) -> None:
    for s in [k.stacks.take(7) for _ in range(KEEP)]:
        k.stacks.put(s)
    while k.pages.alloc(1) is not None:
        pass
    assert k.stacks.kept == [] and k.pages.free_bytes == 0


def test_a_vm_clone_snapshot_drops_the_kept_stacks(k: Kernel) -> None:
    k.stacks.put(k.stacks.take(7))
    used = k.pages.used_bytes
    assert capture(k, k.main.lwps[0], 99)
    assert k.stacks.kept == [] and k.pages.used_bytes < used


def _run(prog: str, args: list[str], fork: str) -> Kernel:
    """Boot ``prog`` with /bin/exec_probe in its file system and run it to the end."""
    root = RootFs(
        (
            FsEntry("/bin", DIR, 0o755),
            FsEntry("/bin/exec_probe", FILE, 0o755, build_image("exec_probe").read_bytes()),
        ),
        (),
    )
    sink = CaptureSink()
    k = Kernel.boot(
        load_elf_file(build_image(prog)),
        [prog, *args],
        [],
        VmConfig(),
        Console(sink),
        make_forker(fork),
        rootfs=root,
    )
    r = k.run()
    assert (r.outcome, r.status) == ("exited", 0), (bytes(sink.stdout), r.reports)
    return k


@pytest.mark.parametrize("fork", ["thread", "copy"])
@pytest.mark.parametrize(
    ("prog", "args"),
    [("exec_loop", ["6", "/bin/exec_probe"]), ("fork_exit_wait", ["-t", "-n", "20"])],
)
def test_forks_and_execs_reuse_stacks_and_leave_only_the_kept_ones(
    fork: str, prog: str, args: list[str]
) -> None:
    """fork + exec + wait rounds (an exec takes a stack under the temporary owner
    -pid, then gives the forked one back), and 20 forks one after another: stacks
    are reused, and afterwards only the kept ones are live, owned by KEPT_OWNER."""
    k = _run(prog, args, fork)
    try:
        assert k.stacks.reused >= 5
        assert 1 <= len(k.stacks.kept) <= KEEP
        # thread fork copies each child's TLS block: those are kept too (copy fork
        # gives its children the parent's private copy, and the kernel makes none)
        tls = k.tls_blocks
        assert (tls.reused >= 5 and 1 <= len(tls.kept) <= KEEP) == (fork == "thread")
        assert tls.kept or fork == "copy"
        kept = sorted(k.stacks.kept + tls.kept)
        assert sorted(a.user for a in k.heap.owned(KEPT_OWNER)) == kept
        assert k.drop_caches() >= len(kept)
        assert k.heap.live_count == 0
    finally:
        k.close()


def test_tls_blocks_are_kept_per_size_and_alignment(k: Kernel) -> None:
    """A TLS block given back is the next child's; a program with a TLS block of
    another size frees the kept ones; a block of another alignment, or of another
    size than the program's, is freed, not kept."""
    tls = k.tls_blocks
    first = tls.take(7, 448)
    assert first % TLS_ALIGN == 0 and k.heap.get(first).owner == 7
    tls.put(first)
    assert tls.kept == [first] and k.heap.get(first).owner == KEPT_OWNER
    assert tls.take(8, 448) == first and tls.reused == 1
    tls.put(first)
    other = tls.take(9, 512)  # another program's TLS: the kept block is freed
    assert tls.kept == [] and k.heap.get(first) is None and k.heap.get(other).size == 512
    odd_align = k.heap.malloc(512, 16, owner=9, who=MEMWHO_WIREDBMK)
    odd_size = k.heap.malloc(448, TLS_ALIGN, owner=9, who=MEMWHO_WIREDBMK)
    for block in (odd_align, odd_size):
        tls.put(block)
        assert tls.kept == [] and k.heap.get(block) is None
    tls.put(other)
    assert tls.kept == [other] and k.drop_caches() >= 1 and tls.kept == []
    assert k.heap.get(other) is None


def test_a_dead_threads_context_is_the_next_threads(k: Kernel) -> None:
    """The CPU keeps the saved contexts of dead threads (at most KEPT_CONTEXTS) and
    hands them to the next thread, holding what the CPU holds when it is made."""
    from tender_service.machine.cpu import KEPT_CONTEXTS, RIP

    cpu = k.cpu
    made = [cpu.new_context() for _ in range(KEPT_CONTEXTS + 2)]
    for ctx in made:
        cpu.keep_context(ctx)
    assert cpu.kept_contexts == made[:KEPT_CONTEXTS]
    rip = cpu.reg(RIP)
    cpu.set_reg(RIP, 0x1234_5678)
    again = cpu.new_context()
    assert again is made[KEPT_CONTEXTS - 1]
    cpu.set_reg(RIP, rip)
    cpu.restore(again)
    assert cpu.reg(RIP) == 0x1234_5678  # saved now, not what it held before


def test_forked_processes_leave_their_contexts_to_the_next_forks() -> None:
    """20 forks, each child reaped before the next: each child's thread ends with
    its context kept and a later fork takes it, so a handful are ever allocated
    for 21 threads; the forks all run correctly (fork_time checks every child)."""
    from tender_service.machine.cpu import KEPT_CONTEXTS

    k = _run("fork_time", ["-n", "20"], "thread")
    try:
        assert k.forks == 20 and k.procs[2].status == 0
        assert k.cpu.contexts_made <= 4, k.cpu.contexts_made
        assert 1 <= len(k.cpu.kept_contexts) <= KEPT_CONTEXTS
    finally:
        k.close()

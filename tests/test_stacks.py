"""Thread stacks the kernel keeps for the next fork (rump/stacks.py, issue 17).

What must hold: a fork or exec takes a kept stack when there is one, owned by
its process from then on; at most KEEP are kept; a stack of another size is
freed, not kept; kept stacks never cost the guest memory (the page allocator
takes them back before it fails, a VM-clone snapshot drops them); and an exec,
whose new stack has a temporary owner until the old memory is gone, leaves the
kept stacks alone.
"""

from __future__ import annotations

import pytest

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK
from tender_service.fork.snapshot import capture
from tender_service.machine.elf import load_elf_file
from tender_service.machine.rootfs import DIR, FILE, FsEntry, RootFs
from tender_service.rump.console import Console
from tender_service.rump.kernel import Kernel
from tender_service.rump.stacks import KEEP, KEPT_OWNER
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
        assert sorted(a.user for a in k.heap.owned(KEPT_OWNER)) == sorted(k.stacks.kept)
        k.drop_caches()
        assert k.heap.live_count == 0
    finally:
        k.close()


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

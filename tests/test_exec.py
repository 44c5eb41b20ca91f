"""execve, #! scripts, clone(CLONE_VM | CLONE_VFORK), posix_spawn, system, popen (issue 14).

Each guest program runs natively and in every fork mode with the same tree of
files (natively a directory under tmp_path; in a VM the same absolute paths in
the image's root file system), and must print exactly the same thing:

1. exec_test: every exec error Linux gives (ENOENT, EACCES, ENOTDIR, ELOOP,
   ENOEXEC for a truncated ELF and a text file, #! errors, E2BIG, EFAULT),
   each in the caller itself, which keeps running; then a #! script and what
   survives an exec (pid, fds without O_CLOEXEC, ignored signals);
2. spawn_test: system(), popen() both ways, posix_spawn with dup2/open/close
   file actions, posix_spawn of a missing file, vfork + exec (musl issues
   clone(CLONE_VM | CLONE_VFORK) for the first three); /bin/sh is our
   stand-in spawn_sh in the VM (the real shell is dash: tests/test_shell.py);
3. exec_loop: 40 fork + exec + wait rounds, memory back where it was.

Modes: thread; vmclone over shm and tcp (a baked image with the tree and the
program; a clone(CLONE_VM) child's exec starts its program in a VM of its
own; a fork's child VM execs from the instance's one file system, which the
supervisor serves).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import image_path

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.machine.elf import load_elf_file
from tender_service.machine.rootfs import DIR, FILE, SYMLINK, FsEntry, RootFs
from tender_service.rump.console import Console
from tender_service.rump.kernel import Kernel
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.toolchain.bake import encode
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, make_forker

VM_MODES = ["thread", "vmclone-shm", "vmclone-tcp", "copy"]
#: fork + exec in a VM-clone child VM needs the instance-wide file system
#: (vfs phase 2): until then a child VM's tree is empty and its exec gets ENOENT


def build_tree(d: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """The files exec_test and spawn_test expect in ``d`` (see their headers):
    path -> (kind, mode, data or symlink target)."""
    probe = image_path("exec_probe").read_bytes()
    nopie = build_image("exec_probe", ["-no-pie", "-fno-PIE"]).read_bytes()
    p = str(d)
    return {
        f"{p}/exec_probe": (FILE, 0o755, probe),
        f"{p}/noexec": (FILE, 0o644, probe),
        f"{p}/trunc": (FILE, 0o755, probe[:200]),
        f"{p}/text": (FILE, 0o755, b"hello\n"),
        f"{p}/empty.sh": (FILE, 0o755, b"#!\n"),
        f"{p}/self.sh": (FILE, 0o755, f"#!{p}/self.sh\n".encode()),
        f"{p}/nointerp.sh": (FILE, 0o755, f"#!{p}/missing\n".encode()),
        f"{p}/script.sh": (FILE, 0o755, f"#!{p}/exec_probe -x\n".encode()),
        f"{p}/loop": (SYMLINK, 0o777, "loop"),
        f"{p}/probe_nopie": (FILE, 0o755, nopie),
    }


def write_native(d: Path, tree: dict[str, tuple[str, int, bytes | str]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for path, (kind, mode, data) in tree.items():
        if kind == SYMLINK:
            os.symlink(str(data), path)
        else:
            Path(path).write_bytes(bytes(data))  # type: ignore[arg-type]
            os.chmod(path, mode)


def rootfs_of(d: Path, tree: dict[str, tuple[str, int, bytes | str]]) -> RootFs:
    """The same tree as a baked image's root: every ancestor of ``d``, then the
    files; /bin/sh is the spawn_sh stand-in."""
    parts = d.parts[1:]
    dirs = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
    entries = [FsEntry("/bin", DIR, 0o755)]
    entries.append(FsEntry("/bin/sh", FILE, 0o755, image_path("spawn_sh").read_bytes()))
    entries += [FsEntry(x, DIR, 0o755) for x in dirs]
    for path, (kind, mode, data) in tree.items():
        if kind == SYMLINK:
            entries.append(FsEntry(path, SYMLINK, mode, target=str(data)))
        else:
            entries.append(FsEntry(path, FILE, mode, bytes(data)))  # type: ignore[arg-type]
    return RootFs(tuple(entries), ())


def run_thread(
    prog: str,
    args: list[str],
    rootfs: RootFs,
    observe: Callable[[Kernel], None] | None = None,
    fork: str = "thread",
) -> tuple[RunResult, str]:
    sink = CaptureSink()
    k = Kernel.boot(
        load_elf_file(image_path(prog)),
        [str(image_path(prog)), *args],
        ["PATH=/bin"],
        VmConfig(timeout=120, trace_syscalls=bool(os.environ.get("TRACE"))),
        Console(sink),
        make_forker(fork),
        rootfs=rootfs,
    )
    try:
        result = k.run()
        if observe is not None:
            observe(k)
    finally:
        k.close()
    return result, bytes(sink.stdout).decode(errors="replace")


def run_vmclone_baked(
    prog: str,
    args: list[str],
    rootfs: RootFs,
    transport: str,
    pool: WarmPool,
    tmp: Path,
    timeout: float = 120,
) -> tuple[RunResult, str]:
    """The tree and the program at /bin/PROG, baked into one image, on the pool."""
    entry = FsEntry(f"/bin/{prog}", FILE, 0o755, image_path(prog).read_bytes())
    img = tmp / f"{prog}.img"
    img.write_bytes(encode(RootFs((*rootfs.entries, entry), (entry.path,))))
    sink = CaptureSink()
    result = run_vmclone(
        img,
        [entry.path, *args],
        config=VmConfig(timeout=timeout, trace_syscalls=bool(os.environ.get("TRACE"))),
        sink=sink,
        transport=transport,
        pool=pool,
    )
    return result, bytes(sink.stdout).decode(errors="replace")


def run_mode(
    mode: str,
    prog: str,
    args: list[str],
    rootfs: RootFs,
    request: pytest.FixtureRequest,
    timeout: float = 120,
) -> tuple[RunResult, str]:
    if mode in ("thread", "copy"):
        return run_thread(prog, args, rootfs, fork=mode)
    pool = request.getfixturevalue("pool")
    tmp = request.getfixturevalue("tmp_path")
    return run_vmclone_baked(prog, args, rootfs, mode.split("-")[1], pool, tmp, timeout)


def run_native(prog: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(image_path(prog)), *args],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, RootFs]:
    d = tmp_path / "exec"
    t = build_tree(d)
    write_native(d, t)
    return d, rootfs_of(d, t)


@pytest.mark.parametrize(
    "mode",
    VM_MODES,
)
def test_exec_errors_and_what_survives_exec(
    mode: str, tree: tuple[Path, RootFs], request: pytest.FixtureRequest
) -> None:
    d, rootfs = tree
    nat = run_native("exec_test", [str(d)])
    assert nat.returncode == 0, nat.stderr
    expected = nat.stdout.decode()
    for line in ("truncated: ENOEXEC", "still running", "fd 5: open", "sig 12: ignored"):
        assert line in expected
    result, out = run_mode(mode, "exec_test", [str(d)], rootfs, request)
    assert (result.status, out) == (0, expected), result.reports


@pytest.mark.parametrize(
    "mode",
    VM_MODES,
)
def test_fexecve_and_execveat(
    mode: str, tree: tuple[Path, RootFs], request: pytest.FixtureRequest
) -> None:
    """execveat(fd, "", AT_EMPTY_PATH) and relative to a directory fd: AT_EXECFN is
    /dev/fd/N and /dev/fd/N/NAME, as Linux names them."""
    d, rootfs = tree
    nat = run_native("exec_test", [str(d), "at"])
    expected = nat.stdout.decode()
    assert "execfn=/dev/fd/3/exec_probe" in expected and "execveat: exit 0" in expected
    result, out = run_mode(mode, "exec_test", [str(d), "at"], rootfs, request)
    assert (result.status, out) == (0, expected), result.reports


@pytest.mark.parametrize("mode", VM_MODES)
def test_system_popen_posix_spawn_vfork(
    mode: str, tree: tuple[Path, RootFs], request: pytest.FixtureRequest
) -> None:
    d, rootfs = tree
    nat = run_native("spawn_test", [str(d)])
    assert nat.returncode == 0, nat.stderr
    expected = nat.stdout.decode()
    assert "spawn: exit 5" in expected and "through cat" in expected
    assert expected.endswith("argv[1]=replaced\nexecfn=" + f"{d}/exec_probe\n")
    result, out = run_mode(mode, "spawn_test", [str(d)], rootfs, request)
    assert (result.status, out) == (0, expected), result.reports
    # fork and vfork alike: each one's time in the kernel, counted once
    assert result.forks > 0 and len(result.fork_seconds or []) == result.forks


def test_exec_loop_frees_each_program(tree: tuple[Path, RootFs]) -> None:
    """Thread mode: 40 programs loaded into the one address space one after the
    other, each freed by its exit: the pages in use end where they began, and
    no stale translated code of an earlier program runs in reused pages."""
    d, rootfs = tree
    used: list[int] = []
    for n in (2, 40):
        result, out = run_thread(
            "exec_loop",
            [str(n), f"{d}/exec_probe"],
            rootfs,
            observe=lambda k: used.append(k.pages.used_bytes),
        )
        assert (result.status, out) == (0, f"{n} execs\n"), result.reports
    assert used[0] == used[1]


def test_non_pie_exec_needs_its_link_address(tree: tuple[Path, RootFs]) -> None:
    """Thread mode: a non-PIE ET_EXEC runs only at its link address, which the
    boot program's region holds while any process runs it: the exec fails
    (ENOMEM, docs/semantics.md) and the caller goes on; natively it runs."""
    d, rootfs = tree
    nat = run_native("exec_loop", ["1", f"{d}/probe_nopie"])
    assert (nat.returncode, nat.stdout) == (0, b"1 execs\n"), nat.stderr
    result, out = run_thread("exec_loop", ["1", f"{d}/probe_nopie"], rootfs)
    # the child's execve failed, it did _exit(127), the loop reports it and stops
    assert (result.status >> 8, out, result.reports) == (1, "", [])


@pytest.mark.parametrize("mode", VM_MODES)
def test_vfork_child_outlives_its_killed_parent(
    mode: str, tree: tuple[Path, RootFs], request: pytest.FixtureRequest
) -> None:
    """A vfork child runs on its parent's stack; it kills the parent and goes on to
    exec: the parent's memory stays until the child is done with it."""
    d, rootfs = tree
    nat = run_native("vfork_orphan", [f"{d}/exec_probe"])
    assert nat.returncode == -9
    expected = nat.stdout.decode()
    assert "argv[1]=orphan" in expected
    # VM-clone: the parent was the VM's process; the VM goes on for the child (it hosts
    # it until its exec) and the supervisor serves it (a short limit: this once hung)
    result, out = run_mode(mode, "vfork_orphan", [f"{d}/exec_probe"], rootfs, request, timeout=15)
    assert (result.status & 0x7F, out, result.reports) == (9, expected, [])


@pytest.mark.parametrize("mode", VM_MODES)
def test_signal_reaches_a_vfork_orphan_that_never_execs(
    mode: str, tree: tuple[Path, RootFs], request: pytest.FixtureRequest
) -> None:
    """The vfork child killed its parent and spins in the parent's memory without exec;
    a forked helper's SIGTERM reaches it there.  VM-clone: the child has no VM of its own
    (the dead parent's VM hosts it), so the supervisor signals it through that VM."""
    _, rootfs = tree
    nat = run_native("vfork_orphan", ["term"])
    assert (nat.returncode, nat.stdout) == (-9, b"helper: sent SIGTERM\n"), nat.stderr
    result, out = run_mode(mode, "vfork_orphan", ["term"], rootfs, request, timeout=10)
    assert (result.status & 0x7F, out, result.reports) == (9, nat.stdout.decode(), []), (
        result.processes
    )
    if mode == "thread":
        return  # one VM: its kernel delivers the signal (and reaps the orphan) itself
    procs = {p.pid: p for p in result.processes}
    helper, child = procs[3], procs[4]
    assert (helper.state, helper.status) == ("reaped", 0), helper
    assert (child.ppid, child.state, child.status) == (1, "reaped", 15), child  # SIGTERM

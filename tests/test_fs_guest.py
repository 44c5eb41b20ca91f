"""guest/programs/fs_ops.c: every file system syscall of issue 14, natively and in a VM.

The program makes DIR, enters it and prints one line per check, nothing that
depends on where DIR is; natively DIR is in a tmpfs (/dev/shm), in the VM in
the instance's /tmp.  The outputs must be identical, in every fork mode:
thread, copy, vmclone-shm and vmclone-tcp.  Its forks check what crosses a fork
(shared offsets, a child's file read by its parent, fcntl and flock locks held
by the other process, /proc/PID/stat of a child: in VM-clone mode the child is
in another VM and the supervisor answers).  The chown checks need root natively
(the guest is root); elsewhere both sides leave them out ("noowner").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import image_path, native, vm

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.rump.vminfo import VmConfig
from tender_service.vm import CaptureSink

#: fs_ops's arguments after DIR: natively, chown to another uid needs root
EXTRA = [] if os.geteuid() == 0 else ["noowner"]
#: fs_ops forks four times (offsets, two lock checks, /proc of a child)
FORKS = 4


@pytest.fixture(scope="module")
def native_out() -> Iterator[str]:
    top = Path(tempfile.mkdtemp(prefix="unifork-fs-", dir="/dev/shm"))
    try:
        n = native("fs_ops", str(top / "w"), *EXTRA)
        assert n.returncode == 0, n.stderr.decode(errors="replace")
        yield n.stdout.decode()
    finally:
        shutil.rmtree(top)


def test_native_output_is_complete(native_out: str) -> None:
    assert native_out.endswith("done\n")
    assert "offset after the child wrote = 14" in native_out
    assert "child F_SETLK write [5,6) = -1 EAGAIN" in native_out
    assert "child's stat: pid ok=1 comm ok=1 ppid ok=1" in native_out


@pytest.mark.parametrize("fork", ["thread", "copy"])
def test_one_vm_modes_match_native(native_out: str, fork: str) -> None:
    r = vm("fs_ops", "/tmp/w", *EXTRA, fork=fork)
    assert r.result.status == 0, (r.out, r.stderr, r.result.reports)
    assert r.out == native_out


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_vmclone_matches_native(native_out: str, pool: WarmPool, transport: str) -> None:
    """One tree per instance: the child VM's file is its parent's after wait, and the
    offset of an fd inherited across the VM-clone fork is shared (fs_ops's fork part)."""
    sink = CaptureSink()
    result = run_vmclone(
        image_path("fs_ops"),
        ["/tmp/w", *EXTRA],
        config=VmConfig(timeout=120),
        sink=sink,
        transport=transport,
        pool=pool,
    )
    out = bytes(sink.stdout).decode(errors="replace")
    assert (result.outcome, result.status) == ("exited", 0), (out, result.reports)
    assert result.forks == FORKS
    assert out == native_out


ENOSPC_RUNS = {
    # 4 MiB into a 1 MiB tmpfs: what fits is written, then ENOSPC; exactly the size fits
    "4": "write stopped: ENOSPC after 1048576 bytes\nread 1048576 bytes\n",
    "1": "wrote 1048576 bytes\nread 1048576 bytes\n",
}


def test_a_full_tmpfs_is_enospc_natively(tmp_path: Path) -> None:
    """The reference: a tmpfs of 1 MiB mounted in a mount namespace of its own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs natively needs root and unshare(1)")
    prog = image_path("fs_bench")
    for mib, expected in ENOSPC_RUNS.items():
        p = subprocess.run(
            ["unshare", "--mount", "sh", "-c",
             f'mount -t tmpfs -o size=1M none "$1" && exec "$2" "$1/big" {mib}',
             "sh", str(tmp_path), str(prog)],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if p.returncode and b"mount" in p.stderr:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode(errors='replace')}")
        assert (p.returncode, p.stdout.decode()) == (0, expected), p.stderr


@pytest.mark.parametrize("mode", ["thread", "copy", "vmclone-shm", "vmclone-tcp"])
def test_a_full_tmpfs_is_enospc_in_the_guest(mode: str, request: pytest.FixtureRequest) -> None:
    """Past the instance's tmpfs size (1 MiB here) a write writes what fits, then fails
    with ENOSPC, as natively; in VM-clone mode the supervisor's tree keeps the count."""
    for mib, expected in ENOSPC_RUNS.items():
        if mode in ("thread", "copy"):
            r = vm("fs_bench", "/tmp/big", mib, fork=mode, tmpfs_size=1 << 20)
            status, out, reports = r.result.status, r.out, r.result.reports
        else:
            sink = CaptureSink()
            result = run_vmclone(
                image_path("fs_bench"),
                ["/tmp/big", mib],
                config=VmConfig(timeout=60, tmpfs_size=1 << 20),
                sink=sink,
                transport=mode.split("-")[1],
                pool=request.getfixturevalue("pool"),
            )
            status, out = result.status, bytes(sink.stdout).decode(errors="replace")
            reports = result.reports
        assert (status, out) == (0, expected), reports

"""guest/programs/fs_ops.c: every file system syscall of issue 14, natively and in a VM.

The program makes DIR, enters it and prints one line per check, nothing that
depends on where DIR is; natively DIR is in a tmpfs (/dev/shm), in the VM in
the instance's /tmp.  The outputs must be identical.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import image_path, native, vm

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.rump.vminfo import VmConfig
from tender_service.vm import CaptureSink


@pytest.fixture(scope="module")
def native_out() -> Iterator[str]:
    top = Path(tempfile.mkdtemp(prefix="unifork-fs-", dir="/dev/shm"))
    try:
        n = native("fs_ops", str(top / "w"))
        assert n.returncode == 0, n.stderr.decode(errors="replace")
        yield n.stdout.decode()
    finally:
        shutil.rmtree(top)


def test_native_output_is_complete(native_out: str) -> None:
    assert native_out.endswith("done\n")
    assert "offset after the child wrote = 14" in native_out


def test_thread_mode_matches_native(native_out: str) -> None:
    r = vm("fs_ops", "/tmp/w")
    assert r.result.status == 0, (r.out, r.stderr, r.result.reports)
    assert r.out == native_out


@pytest.fixture(scope="module")
def pool() -> Iterator[WarmPool]:
    p = WarmPool(2)
    try:
        p.wait_ready(60)
        yield p
    finally:
        p.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_vmclone_matches_native(native_out: str, pool: WarmPool, transport: str) -> None:
    """One tree per instance: the child VM's file is its parent's after wait, and the
    offset of an fd inherited across the VM-clone fork is shared (fs_ops's fork part)."""
    sink = CaptureSink()
    result = run_vmclone(
        image_path("fs_ops"),
        ["/tmp/w"],
        config=VmConfig(timeout=120),
        sink=sink,
        transport=transport,
        pool=pool,
    )
    out = bytes(sink.stdout).decode(errors="replace")
    assert (result.outcome, result.status) == ("exited", 0), (out, result.reports)
    assert result.forks == 1
    assert out == native_out


def test_a_full_tmpfs_is_enospc_in_the_guest() -> None:
    """Past the instance's tmpfs size a write writes what fits, then fails with ENOSPC."""
    r = vm("fs_bench", "/tmp/big", "4", tmpfs_size=1 << 20)
    assert r.result.status == 0, (r.out, r.result.reports)
    assert r.out == "write stopped: ENOSPC after 1048576 bytes\nread 1048576 bytes\n"
    full = vm("fs_bench", "/tmp/big", "1", tmpfs_size=1 << 20)
    assert full.out == "wrote 1048576 bytes\nread 1048576 bytes\n"  # exactly the limit fits

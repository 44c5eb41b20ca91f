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
from support import native, vm


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

"""Credentials (issue 16): user and group ids with Linux's rules in every fork mode.

guest/programs/creds.c starts as root, sets groups, moves its effective uid
through the saved one, forks a child that drops root for good, then drops
root as mini_httpd does.  The guest is root, so the reference is the same
binary run natively as root: the outputs must be identical.  Run as another
user, the native run starts elsewhere and its answers are not comparable:
the test then checks what is (the unprivileged EPERMs) and skips the rest.
"""

from __future__ import annotations

import os

import pytest
from support import image_path, native, vm

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.rump.vminfo import VmConfig
from tender_service.vm import CaptureSink


@pytest.fixture(scope="module")
def native_out() -> str:
    n = native("creds")
    assert n.returncode == 0, n.stderr
    return n.stdout.decode()


def _compare(native_out: str, out: str) -> None:
    if os.geteuid() != 0:
        # comparable as any user: a process that is not root cannot set groups
        assert "setgroups as euid 1000 = -1 EPERM" in out
        pytest.skip("the native reference needs root (the guest is root): run the tests as root")
    assert out == native_out


def test_native_reference_drops_root(native_out: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the native run starts as root only when the tests run as root")
    assert native_out.startswith("start: uid 0/0/0 gid 0/0/0")
    assert "child setuid(0) = -1 EPERM" in native_out
    assert "dropped: uid 65534/65534/65534 gid 65534/65534/65534" in native_out
    assert native_out.endswith("done\n")


@pytest.mark.parametrize("fork", ["thread", "copy"])
def test_in_vm_modes_match_native(native_out: str, fork: str) -> None:
    """Thread fork shares globals, not credentials: the child's setuid stays its own."""
    r = vm("creds", fork=fork)
    assert r.result.status == 0, (r.out, r.stderr)
    _compare(native_out, r.out)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_vmclone_matches_native(native_out: str, pool: WarmPool, transport: str) -> None:
    """The ids travel in the snapshot to the child's VM."""
    sink = CaptureSink()
    result = run_vmclone(
        image_path("creds"),
        [],
        config=VmConfig(timeout=120),
        sink=sink,
        transport=transport,
        pool=pool,
    )
    assert result.status == 0, (bytes(sink.stderr), result.reports)
    _compare(native_out, bytes(sink.stdout).decode())

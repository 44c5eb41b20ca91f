"""A tender's overall limits (issue 12, finding 9), against real ``unifork serve`` processes.

* ``--max-guest-memory``: the guest RAM every VM on the tender declares, together.
  Before, 64 instances of 4 GiB each were accepted by any tender.  A launch past
  the limit is RESOURCE_EXHAUSTED naming the limit and what is in use; a
  VM-clone fork past it fails in the guest with ENOMEM; what an instance held
  comes back when it ends.
* ``--max-image-store`` and ``DeleteImage``: uploads had no total; now the bytes
  on disk have a quota, and deleting frees them (an instance running from a
  deleted image keeps running, and keeps its bytes until it ends).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import grpc
import pytest
from support import wait_until
from test_service import (
    MODES,
    RPC_TIMEOUT,
    Tender,
    console,
    descendants,
    launch,
    rpc_error,
    stdout_of,
    stopped_cleanly,
    unifork_cmd,
    wait,
    wait_for_output,
)

from tender_service import protos
from tender_service.instance.budget import default_limit, host_memory
from tender_service.toolchain.images import build_image

pb2, _ = protos.tender()
MiB = 1 << 20


def ended(c, iid: str):
    return wait_until(lambda: (r := wait(c, iid, 1.0)).done and r, 60, f"{iid} to end")


def the_same_processes(t: Tender, before: set[int]) -> None:
    """Every process the tender started for instances is gone: as many as before (its
    pool, its VM fork server and the spare VM process that server keeps forked)."""
    wait_until(
        lambda: len(descendants(t.proc.pid)) <= len(before),
        30,
        "the instances' processes to go",
        detail=lambda: str(descendants(t.proc.pid)),
    )


# -- guest memory -------------------------------------------------------------------------------
def test_default_guest_memory_limit_is_half_the_host():
    assert default_limit() == host_memory() // 2 > 0


def test_the_default_limit_refuses_64_instances_of_4_gib(tmp_path):
    """The attack as found: 4 GiB instances launched until refused.  Before, all 64 were
    accepted; with the default limit the tender takes what half its RAM holds."""
    fit = default_limit() // (4 << 30)
    if fit > 6:
        pytest.skip(f"{fit} spinning 4 GiB guests before the limit: too many for this test")
    t = Tender.start(tmp_path, "--pool", "1")
    c = t.client()
    held = []
    try:
        big = dict(memory_bytes=4 << 30, console_pipe=True, time_limit_seconds=300)
        for _ in range(fit):
            held.append(launch(c, "spin", **big))
            wait_for_output(c, held[-1], b"spinning")
        e = rpc_error(lambda: launch(c, "spin", **big))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        assert re.fullmatch(
            r"guest memory: \S+ GiB in use of a \S+ GiB limit "
            r"\(--max-guest-memory\); 4 GiB more asked",
            e.details(),
        ), e.details()
        assert len([s for s in c.instances() if s.state == "running"]) == fit
    finally:
        for iid in held:
            c.kill(iid)
        for iid in held:
            ended(c, iid)
        c.close()
    stopped_cleanly(t)


def test_launch_past_the_guest_memory_limit_is_refused(tmp_path):
    """Two 32 MiB instances fill a 64 MiB tender: a third is refused until one ends."""
    t = Tender.start(tmp_path, "--pool", "1", "--max-guest-memory", "64M")
    c = t.client()
    try:
        assert wait(c, launch(c, "hello", console_pipe=True)).exit_code == 0  # warm
        before = set(descendants(t.proc.pid))
        spin = dict(memory_bytes=32 * MiB, console_pipe=True, time_limit_seconds=300)
        first, second = (launch(c, "spin", **spin) for _ in range(2))
        for iid in (first, second):
            wait_for_output(c, iid, b"spinning")
        for mode in ("thread", "vmclone-shm"):
            e = rpc_error(lambda m=mode: launch(c, "hello", **spin, **MODES[m]))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
            assert e.details() == (
                "guest memory: 64 MiB in use of a 64 MiB limit "
                "(--max-guest-memory); 32 MiB more asked"
            ), e.details()
        e = rpc_error(lambda: launch(c, "hello", memory_bytes=128 * MiB))  # never fits
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        assert c.kill(first)
        assert ended(c, first).outcome == "killed"
        third = launch(c, "hello", **spin)  # what the first held is back
        assert (wait(c, third).outcome, wait(c, third).exit_code) == ("exited", 0)
        assert c.kill(second)
        ended(c, second)
        # nothing held any more: the whole limit fits one instance
        whole = launch(c, "hello", memory_bytes=64 * MiB, console_pipe=True)
        assert wait(c, whole).exit_code == 0
        the_same_processes(t, before)
    finally:
        c.close()
    stopped_cleanly(t)


def test_vmclone_fork_past_the_guest_memory_limit_fails_with_enomem(tmp_path):
    """Each VM of a VM-clone instance holds its RAM on the tender it runs on: with room
    for four 16 MiB VMs, the fourth fork fails in the guest (ENOMEM), not the tender."""
    t = Tender.start(tmp_path, "--pool", "2", "--max-guest-memory", "64M")
    c = t.client()
    try:
        for transport in ("vmclone-shm", "vmclone-tcp"):
            iid = launch(
                c,
                "fork_bomb",
                ["-n", "10"],
                memory_bytes=16 * MiB,
                console_pipe=True,
                time_limit_seconds=120,
                **MODES[transport],
            )
            r = wait(c, iid)
            out = stdout_of(console(c, iid)).decode()
            assert (r.outcome, r.exit_code) == ("exited", 0), (transport, r, out)
            assert "fork failed errno=ENOMEM" in out and "forked=3\n" in out, out
            assert "reaped=3\n" in out, out
            assert any(
                re.search(
                    r"fork refused \(ENOMEM\): guest memory: 64 MiB in use of a "
                    r"64 MiB limit \(--max-guest-memory\)",
                    line,
                )
                for line in r.reports
            ), r.reports
            # every VM gave its RAM back: the whole limit fits one instance again
            whole = launch(c, "hello", memory_bytes=64 * MiB, console_pipe=True, **MODES[transport])
            assert wait(c, whole).exit_code == 0
    finally:
        c.close()
    stopped_cleanly(t)


# -- the image store ----------------------------------------------------------------------------
def store_dir(t: Tender) -> Path:
    """Where the tender keeps uploads, from its start-up log line (the log file may
    reach the disk a moment after the tender answers)."""
    m = wait_until(
        lambda: re.search(r"uploaded images are kept in (\S+)", t.log()),
        30,
        "the tender's log line naming its upload store",
        detail=t.log,
    )
    assert isinstance(m, re.Match)
    return Path(m[1])


def test_image_store_quota_and_delete_image(tmp_path):
    hello, spin, fork_time = (build_image(n).read_bytes() for n in ("hello", "spin", "fork_time"))
    quota = len(hello) + len(spin) + len(fork_time) // 2
    t = Tender.start(tmp_path, "--pool", "1", "--max-image-store", str(quota))
    c = t.client()
    try:
        store = store_dir(t)
        assert c.upload("img-a", hello).size_bytes == len(hello)
        c.upload("img-a2", hello)  # the same bytes: stored once, counted once
        c.upload("img-s", spin)
        assert len(list(store.iterdir())) == 2
        e = rpc_error(lambda: c.upload("img-f", fork_time))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        assert re.search(
            r"image store: \S+ MiB in use of a \S+ MiB limit \(--max-image-store\)", e.details()
        ), e.details()
        assert "img-f" not in {i.name for i in c.images()}

        # an image deleted under a running instance: the instance keeps running
        iid = launch(c, "img-s", console_pipe=True, time_limit_seconds=300)
        wait_for_output(c, iid, b"spinning")
        deleted = c.delete_image("img-s")
        assert (deleted.name, deleted.size_bytes, deleted.builtin) == ("img-s", len(spin), False)
        assert "img-s" not in {i.name for i in c.images()}
        assert rpc_error(lambda: launch(c, "img-s")).code() == grpc.StatusCode.NOT_FOUND
        assert c.describe(iid).summary.state == "running"
        # ... and its bytes count until it ends
        e = rpc_error(lambda: c.upload("img-f", fork_time))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        assert c.kill(iid)
        ended(c, iid)
        wait_until(lambda: len(list(store.iterdir())) == 1, 10, "the deleted file to go")
        assert c.upload("img-f", fork_time).size_bytes == len(fork_time)

        for name, code in (
            ("hello", grpc.StatusCode.FAILED_PRECONDITION),
            ("no-such-image", grpc.StatusCode.NOT_FOUND),
            ("../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
            ("", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            e = rpc_error(lambda n=name: c.delete_image(n))
            assert e.code() == code, (name, e.code(), e.details())
            assert e.details().startswith("name:"), e.details()
        assert "hello" in {i.name for i in c.images()}

        c.delete_image("img-a")
        assert len(list(store.iterdir())) == 2  # img-a2 has the same bytes
        # the command line: `unifork delete-image NAME`
        cli = [*unifork_cmd(), "delete-image", "--target", t.target]
        ok = subprocess.run([*cli, "img-a2"], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and ok.stdout.startswith("deleted img-a2 "), ok
        refused = subprocess.run([*cli, "hello"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "FAILED_PRECONDITION" in refused.stderr, refused
        c.delete_image("img-f")
        assert list(store.iterdir()) == []  # nothing left on disk
        assert [i.name for i in c.images() if not i.builtin] == []
    finally:
        c.close()
    stopped_cleanly(t)
    assert not store.exists()  # the tender's uploads go with it


@pytest.mark.parametrize("flag", ["--max-guest-memory", "--max-image-store"])
def test_a_zero_limit_is_refused_at_start(tmp_path, flag):
    r = subprocess.run(
        [*unifork_cmd(), "serve", "--listen", "127.0.0.1:0", flag, "0"],
        capture_output=True,
        text=True,
        timeout=RPC_TIMEOUT,
    )
    assert r.returncode == 2 and flag in r.stderr, r

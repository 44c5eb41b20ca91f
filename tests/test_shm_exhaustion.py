"""A full /dev/shm must not kill the tender (issue 12, finding 6).

The attack: VM-clone instances over shm until /dev/shm is full.  A segment
is sized with ftruncate, which a tmpfs grants beyond its room; the first
touch of a page it cannot back was a SIGBUS, and the tender (which writes
into every VM's rings) died of it.  Now each segment is reserved whole with
posix_fallocate when it is made: ENOSPC there makes the VM use tcp over the
same supervisor socket, the instance says so in its transport_note, and
``unifork_shm_exhausted_total`` counts it.

The tender runs in a private mount namespace (``unshare -m``, as root) with a
12 MiB tmpfs on /dev/shm: two 4 MiB channel segments fit (2 MiB rings), not three.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import wait_until
from test_service import (
    MODES,
    ROOT,
    Tender,
    free_port,
    launch,
    metric,
    start_retrying,
    stopped_cleanly,
    unifork_cmd,
    wait,
)

SHM_SIZE = "12M"
INSTANCES = 4

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private small /dev/shm",
)


def _small_shm_tender(tmp_path) -> Tender:
    # the peer port too: its default (the client port + 1) is no port free_port() checked
    port, mport, pport = free_port(), free_port(), free_port()
    log_path = tmp_path / "tender.log"
    mount = f'mount -t tmpfs -o size={SHM_SIZE} unifork-test-shm /dev/shm && exec "$@"'
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                mount,
                "sh",
                *unifork_cmd(),
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-port",
                str(mport),
                "--peer-listen",
                f"127.0.0.1:{pport}",
                "--pool",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    t = Tender(proc, port, mport, log_path)
    try:
        t.wait_serving()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return t


@pytest.fixture
def small_shm_tender(tmp_path):
    t = start_retrying(lambda: _small_shm_tender(tmp_path))
    proc = t.proc
    yield t
    if proc.poll() is None:
        stopped_cleanly(t)


def test_full_dev_shm_falls_back_to_tcp(small_shm_tender):
    t = small_shm_tender
    shm = f"/proc/{t.proc.pid}/root/dev/shm"  # the tender's /dev/shm, seen from outside
    st = os.statvfs(shm)
    assert st.f_blocks * st.f_frsize == 12 << 20, "the tender does not see the small tmpfs"
    c = t.client()

    def one(_):
        iid = launch(c, "pipe_bw", ["-m", "8"], console_pipe=True, **MODES["vmclone-shm"])
        return iid, wait(c, iid)

    try:
        with ThreadPoolExecutor(INSTANCES) as ex:
            done = list(ex.map(one, range(INSTANCES)))
        assert t.proc.poll() is None, f"the tender died ({t.proc.returncode}):\n{t.log()}"
        assert t.health() == 1  # SERVING
        for iid, r in done:
            assert (r.outcome, r.exit_code) == ("exited", 0), (iid, r, t.log())
        notes = [c.describe(iid).transport_note for iid, _ in done]
        fell_back = [n for n in notes if "no room in /dev/shm" in n]
        assert fell_back, f"no instance fell back to tcp: {notes}"
        assert metric(t.metrics(), "unifork_shm_exhausted_total") >= len(fell_back)
        # nothing left behind: no segment names, and every segment's pages freed (what
        # else is there: multiprocessing's semaphores of the warm pool, a few bytes)
        assert [n for n in os.listdir(shm) if n.startswith("ufp-")] == []
        wait_until(
            lambda: os.statvfs(shm).f_bfree >= os.statvfs(shm).f_blocks - 16,
            30,
            "the segments' pages to be freed",
        )
    finally:
        c.close()

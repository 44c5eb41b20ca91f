"""Shared memory that cannot be had must not kill the tender, nor the work (issue 12,
finding 6; issue 17).

The attack was VM-clone instances over shm until /dev/shm is full: a segment sized
with ftruncate, which a tmpfs grants beyond its room, made the first touch of a page
it cannot back a SIGBUS, and the tender (which writes into every VM's rings) died.

Now a channel's segment and a pipe's ring are sealed memfds the supervisor makes
(``transports/shm_segment.py``): they do not live in /dev/shm, and no mount's size
limit stands behind them, so a full /dev/shm changes nothing (unifork puts nothing
there).  When no channel segment can be made
(ENOMEM, or EFBIG of a file size limit below its size, the one a test can set
without touching the host), the VM's channel is tcp over the same socket (which
still carries ring fds: the rings, 68 KiB, are below that limit), the instance
says so in its transport_note, and ``unifork_shm_exhausted_total`` counts it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_service import (
    MODES,
    ROOT,
    Tender,
    console,
    free_port,
    launch,
    metric,
    start_retrying,
    stdout_of,
    stopped_cleanly,
    unifork_cmd,
    wait,
)

SHM_SIZE = "12M"
INSTANCES = 4
#: a file size limit below one channel segment (4 MiB + 12 KiB) and above the rest
FSIZE = 2 << 20
#: what pipe_bw -m 8 prints first: every byte it wrote was read
PIPE_BW_OUT = b"bytes=8388608 blocks=128\nmib_per_s="


def _tender(tmp_path: Path, prefix: list[str]) -> Tender:
    # the peer port too: its default (the client port + 1) is no port free_port() checked
    port, mport, pport = free_port(), free_port(), free_port()
    log_path = tmp_path / f"tender-{port}.log"
    serve = ["serve", "--listen", f"127.0.0.1:{port}", "--metrics-port", str(mport)]
    serve += ["--peer-listen", f"127.0.0.1:{pport}", "--pool", "2"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*prefix, *unifork_cmd(), *serve],
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


def _serving(tmp_path: Path, prefix: list[str]):
    t = start_retrying(lambda: _tender(tmp_path, prefix))
    proc = t.proc
    yield t
    if proc.poll() is None:
        stopped_cleanly(t)


@pytest.fixture
def small_shm_tender(tmp_path):
    """A tender in its own mount namespace whose /dev/shm is a 12 MiB tmpfs."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private small /dev/shm")
    mount = f'mount -t tmpfs -o size={SHM_SIZE} unifork-test-shm /dev/shm && exec "$@"'
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]
    yield from _serving(tmp_path, prefix)


@pytest.fixture
def small_fsize_tender(tmp_path):
    """A tender whose file size limit is below a channel segment's size."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit(1) (util-linux) to start the tender with RLIMIT_FSIZE")
    yield from _serving(tmp_path, ["prlimit", f"--fsize={FSIZE}:{FSIZE}", "--"])


def _run_all(t: Tender) -> list[tuple[str, str, bytes]]:
    """INSTANCES pipe_bw instances over shm at once; (id, transport_note, stdout) of
    each, every one of which exited 0, with the tender serving after them."""
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
        return [
            (iid, c.describe(iid).transport_note, stdout_of(console(c, iid))) for iid, _ in done
        ]
    finally:
        c.close()


def _ring_bytes_only(t: Tender) -> None:
    """Every instance's 8 MiB went through pipe rings: none through the supervisor."""
    m = t.metrics()
    assert metric(m, "unifork_pipe_bytes_total", transport="shm") >= INSTANCES * (8 << 20)
    assert metric(m, "unifork_pipe_write_latency_seconds_count") == 0  # no brokered write
    assert "a pipe ring could not be made" not in t.log()


def test_full_dev_shm_leaves_channels_and_pipes_on_shm(small_shm_tender):
    t = small_shm_tender
    shm = f"/proc/{t.proc.pid}/root/dev/shm"  # the tender's /dev/shm, seen from outside
    st = os.statvfs(shm)
    assert st.f_blocks * st.f_frsize == 12 << 20, "the tender does not see the small tmpfs"
    filler = Path(shm) / "filler"
    with open(filler, "wb") as f:  # every block of it, as the attack left it
        try:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        except OSError:
            pass
    try:
        assert os.statvfs(shm).f_bavail < 17  # not even one ring (68 KiB) fits
        for iid, note, out in _run_all(t):
            assert note == "", (iid, note)  # every VM's channel is shm
            assert out.startswith(PIPE_BW_OUT), (iid, out)  # its bytes moved
        _ring_bytes_only(t)
        assert metric(t.metrics(), "unifork_shm_exhausted_total") == 0
    finally:
        filler.unlink()
    assert [n for n in os.listdir(shm) if n.startswith("uf")] == []


def test_a_channel_segment_that_cannot_be_made_falls_back_to_tcp(small_fsize_tender):
    t = small_fsize_tender
    results = _run_all(t)
    for iid, note, out in results:
        assert "tcp used for some VMs: cannot make a" in note, (iid, note)
        assert os.strerror(27) in note  # EFBIG: "File too large"
        assert out.startswith(PIPE_BW_OUT), (iid, out)
    # every VM of every instance fell back, each counted
    assert metric(t.metrics(), "unifork_shm_exhausted_total") >= len(results)
    _ring_bytes_only(t)  # the ring fds came over the tcp channels

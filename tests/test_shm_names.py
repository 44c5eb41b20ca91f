"""What unifork leaves in /dev/shm when it is killed, and the sweep that removes it
(transports/shm_names.py): names of dead makers go, names of live ones stay."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from support import image_path, wait_until

from tender_service.transports.shm_names import SHM_DIR, owner, sweep_stale

UNIFORK = Path(sys.executable).parent / "unifork"


def _dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def _ours(pid: int) -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if owner(n) == pid}


def test_every_name_we_sweep_names_its_maker() -> None:
    me = os.getpid()
    assert owner(f"ufp-{me}-0a1b2c") == me  # the names of older versions' segments
    assert owner(f"ufr-{me}-0a1b2c") == me
    assert owner(f"ufw-{me}-0000000f") == me  # and wake-up FIFOs'
    for other in ("ufx-1-ab", "ufp-1", "ufp--ab", "ufp-x-ab", "ufp-0-ab", "sem.ufp-1-ab", "ufp-1-"):
        assert owner(other) is None, other


def test_the_sweep_takes_names_of_dead_makers_only(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    made = {
        f"ufp-{dead}-aa": "dead", f"ufr-{dead}-bb": "dead", f"ufw-{dead}-0000000f": "dead",
        f"ufp-{live}-aa": "live", f"ufr-{os.getpid()}-cc": "live", "other-file": "other",
        f"ufq-{dead}-aa": "other",
    }  # fmt: skip
    for name in made:
        (tmp_path / name).touch()
    os.mkfifo(tmp_path / f"ufw-{dead}-00000011")  # the wake-ups are FIFOs
    removed = sweep_stale(str(tmp_path))
    assert sorted(removed) == sorted(
        [n for n, who in made.items() if who == "dead"] + [f"ufw-{dead}-00000011"]
    )
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, who in made.items() if who != "dead")
    assert sweep_stale(str(tmp_path)) == []


def test_a_zombie_maker_counts_as_dead(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", ""])
    wait_until(lambda: _state(p.pid) == "Z", 30, "the child to end (unreaped)")
    (tmp_path / f"ufr-{p.pid}-aa").touch()
    try:
        assert sweep_stale(str(tmp_path)) == [f"ufr-{p.pid}-aa"]
    finally:
        p.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _piping_run() -> subprocess.Popen:
    """`unifork run` of a VM-clone instance over shm whose two VMs pipe for minutes,
    in a session of its own (its pid is the session's id)."""
    return subprocess.Popen(
        [str(UNIFORK), "run", "--fork", "vmclone", "--pipe", "shm",
         str(image_path("pipe_bw")), "-m", "1000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _wait_for_its_ring(run: subprocess.Popen) -> None:
    """Until the run's pipe ring is mapped (a memfd named ``unifork-pipe-ring``) in a
    process of its, and both its VMs have their wake-up pipes."""
    wait_until(
        lambda: sum(_maps_a_ring(pid) for pid in _session(run.pid)) >= 2,
        60,
        "the run's pipe ring mapped by both its VMs",
    )


def _maps_a_ring(pid: int) -> bool:
    try:
        return "/memfd:unifork-pipe-ring" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_a_run_killed_mid_pipe_leaves_nothing_in_dev_shm() -> None:
    """A `unifork run` (the supervisor and its VM processes) killed by SIGKILL mid-pipe
    leaves nothing in /dev/shm: its channel segments and pipe rings are memfds and its
    wake-up pipes are pipes, none with a name (older versions left ``ufp-``, ``ufr-``
    and ``ufw-`` names there; the next supervisor over shm sweeps those, above)."""
    before = _uf_names()
    run = _piping_run()
    try:
        _wait_for_its_ring(run)
        assert _uf_names() - before == set()
    finally:
        # every process of the run but multiprocessing's resource tracker, which
        # unlinks the pool's semaphores once the processes holding them are gone
        for pid in _session(run.pid):
            with contextlib.suppress(OSError):  # it ended meanwhile
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        run.wait()
    wait_until(lambda: not _session(run.pid), 30, "the killed processes to go")
    assert _uf_names() - before == set()


def _uf_names() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("uf")}


def _family(pid: int | None, session: int) -> bool:
    """``pid`` is (or was, a zombie) in the killed run's session."""
    try:
        return pid is not None and os.getsid(pid) == session
    except OSError:
        return False


def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and _state(pid) != "Z"
    except OSError:
        return False


def test_a_run_stopped_by_sigterm_leaves_nothing_in_dev_shm() -> None:
    """SIGTERM to a `unifork run` of a VM-clone instance (what `timeout`, systemd and
    test harnesses send) ends it as ^C would: the guest processes go, leaving
    nothing in /dev/shm."""
    run = _piping_run()
    try:
        _wait_for_its_ring(run)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM, err
    assert _ours(run.pid) == set()
    wait_until(lambda: not _session(run.pid), 30, "the run's pool processes to end")


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    return [p for p in pids if _family(p, sid) and _alive(p)]

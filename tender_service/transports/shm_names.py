"""The names unifork made in /dev/shm, and the sweep of those a dead process left.

unifork makes none now: channel segments and pipe rings are memfds, wake-up pipes
are pipes, none with a name (a name there was anyone's of the tender's uid to open).
Older versions made channel segments (``ufp-``), pipe rings (``ufr-``) and wake-up
FIFOs (``ufw-``), each name a prefix, the pid of the process that made it, and
random hex.  Their makers removed them when they were done;
a process killed by SIGKILL (a tender, a `unifork run`, a pool worker) cannot, and
/dev/shm is memory that outlives it.  So a supervisor, when it starts, removes every
such name whose maker is no longer running (``sweep_stale``).  A name whose pid is
running (its maker, or a new process that reuses the pid) is kept: a sweep never
takes a name from a live process.  Mappings do not depend on names, so a VM that
mapped a segment before its maker died keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIXES = ("ufp-", "ufr-", "ufw-")


def owner(name: str) -> int | None:
    """The pid that made ``name``, or None if it is not one of our names."""
    prefix, _, rest = name.partition("-")
    pid, sep, tag = rest.partition("-")
    if prefix + "-" not in PREFIXES or not sep or not pid.isdigit() or not tag:
        return None
    return int(pid) or None  # 0 would name our process group to kill()


def _running(pid: int) -> bool:
    """``pid`` is a process that may still use its names (not ended, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process (a reused pid): not ours to judge
        return True
    try:  # an ended process not yet reaped (its parent was killed too, say)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc here: kill() said it is there
        return True


def sweep_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove our names in ``shm_dir`` whose maker is not running; return them."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    dead: dict[int, bool] = {}
    removed = []
    for name in names:
        pid = owner(name)
        if pid is None or pid == os.getpid():
            continue
        if pid not in dead:
            dead[pid] = not _running(pid)
        if dead[pid]:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
    if removed:
        log.info("removed %d name(s) that dead processes left in %s", len(removed), shm_dir)
    return removed

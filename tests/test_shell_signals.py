"""A real shell's signals in every fork mode (issue 15): dash's traps, background jobs
and job control, natively and in a VM, with the same output.

The image is tests/test_shell.py's (dash from Debian's sources as /bin/sh, our cat,
ls, rm and sleep).  Three scripts:

* ``traps``: ``trap '...' INT TERM CHLD EXIT``, ``trap ''`` and ``trap -``, a
  foreground child killed by SIGTERM (exit status 143), signals to the shell itself;
* ``traps_jobs``: background jobs killed with ``kill $!`` and waited for with
  ``wait``, a background subshell with a TERM trap of its own (spinning without a
  syscall until its trap runs), a USR1 trap run for a child's ``kill $PPID``, a CHLD
  trap for a background job;
* ``jobs``: ``set -m`` job control with the console a pseudo-terminal (the shell
  takes the terminal for each foreground job): ``jobs``, ``kill %1``, ``fg %1``,
  a job stopped with ``kill -STOP %1`` and seen by ``wait`` (147) and ``jobs``,
  then killed.  (Not ``bg``: whether dash's ``wait`` after ``bg``/``kill -CONT``
  sees the continue varies natively too.)  Everything the shell writes there (stdout and stderr: dash reports
  ``Terminated`` and the job lines) is compared.

Thread fork shares globals and heap with the parent (docs/semantics.md, "Thread
fork"): the scripts whose background jobs run shell code fail there, as
tests/test_shell.py's do; they are strict xfails, so the list stays exact.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import under_pty
from test_shell import MODES, UNIFORK, run_native, run_vm

SCRIPTS = {
    "traps": """
trap 'echo INT trapped' INT
trap 'echo TERM trapped' TERM
kill -INT $$
kill -TERM $$
echo "after the traps: $?"
trap 'echo CHLD trapped' CHLD
sh -c 'exit 3'
echo "child: $?"
trap - CHLD
trap '' INT
kill -INT $$
echo "INT ignored"
trap - TERM
trap 'echo EXIT trap, status $?' EXIT
sh -c 'kill -TERM $$'; echo "killed: $?"
exit 4
""",
    "traps_jobs": """
cd "$W"
rm -f ready
sleep 10 &
kill $!
wait $!
echo "wait for a killed job: $?"
(trap 'echo subshell got TERM; exit 5' TERM; echo up > ready; while :; do :; done) &
while [ ! -s ready ]; do :; done
kill $!
wait $!
echo "trapped job: $?"
trap 'echo parent got USR1' USR1
sh -c 'kill -USR1 $PPID; exit 2'
echo "foreground child: $?"
trap 'echo CHLD trapped' CHLD
(sleep 0.1; exit 3) &
wait $!
echo "job: $?"
trap - CHLD
sleep 0.1 &
sleep 0.2 &
wait
echo "all waited: $?"
trap 'echo TERM trapped' TERM
kill -TERM $$
echo end
""",
}
STATUS = {"traps": 4, "traps_jobs": 0}
#: each script's stdout natively (so everywhere): the test's own statement of Linux
EXPECTED = {
    "traps": "INT trapped\nTERM trapped\nafter the traps: 0\nCHLD trapped\nchild: 3\n"
    "INT ignored\nkilled: 143\nEXIT trap, status 4\n",
    "traps_jobs": "wait for a killed job: 143\nsubshell got TERM\ntrapped job: 5\n"
    "parent got USR1\nforeground child: 2\nCHLD trapped\njob: 3\nall waited: 0\n"
    "TERM trapped\nend\n",
}

#: run with the console a pseudo-terminal: job control (set -m)
JOBS = """set -m
sleep 10 &
jobs
kill %1
wait %1 2>/dev/null
echo "kill %1: $?"
jobs
sleep 0.2 &
fg %1
echo "fg: $?"
sleep 10 &
kill -STOP %1
wait %1
echo "wait for a stopped job: $?"
jobs
trap 'echo INT trapped' INT
kill -INT $$
kill -KILL %1
echo end
"""
JOBS_OUT = (
    "[1] + Running                    sleep 10\nkill %1: 143\n"
    "[1] + Terminated                 sleep 10\nsleep 0.2\nfg: 0\n"
    "wait for a stopped job: 147\n[1] + Stopped (signal)           sleep 10\n"
    "INT trapped\nend\n"
)

_THREAD_FORK = (
    "thread fork shares globals and heap (docs/semantics.md): dash's background jobs "
    "run shell code in a forked child that overwrites the parent's job table and traps"
)
#: (script, mode) -> why it fails, by design
GAPS = {("traps_jobs", "thread"): _THREAD_FORK, ("jobs", "thread"): _THREAD_FORK}


def _marks(name: str, mode: str) -> list:
    gap = GAPS.get((name, mode))
    return [pytest.mark.xfail(reason=gap, strict=True)] if gap else []


def _cases(names: list[str]) -> list:
    return [
        pytest.param(name, mode, marks=_marks(name, mode), id=f"{name}-{mode}")
        for name in names
        for mode in ["native", *MODES]
    ]


@pytest.mark.parametrize(("name", "mode"), _cases(list(SCRIPTS)))
def test_traps_as_natively(
    name: str, mode: str, app: Path, native_bin: Path, tmp_path: Path
) -> None:
    if mode == "native":
        p: subprocess.CompletedProcess = run_native(SCRIPTS[name], native_bin, tmp_path)
    else:
        p = run_vm(SCRIPTS[name], app, mode)
    err = p.stderr.decode(errors="replace")
    assert (p.stdout.decode(errors="replace"), p.returncode) == (EXPECTED[name], STATUS[name]), err


@pytest.mark.parametrize(("name", "mode"), _cases(["jobs"]))
def test_job_control_under_a_pty(name: str, mode: str, app: Path, native_bin: Path) -> None:
    """``set -m`` with a terminal: the shell puts each job in its own group, gives the
    terminal to the foreground one, and sees stops with WUNTRACED."""
    if mode == "native":
        rc, out = under_pty(
            [str(native_bin / "sh"), "-c", JOBS], timeout=60, env={"PATH": str(native_bin)}
        )
    else:
        argv = [str(UNIFORK), "run", *MODES[mode], "--timeout", "60", "--env", "PATH=/bin"]
        rc, out = under_pty([*argv, str(app), "--", "/bin/sh", "-c", JOBS], timeout=120)
    assert (rc, out) == (0, JOBS_OUT), out

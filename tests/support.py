"""Helpers the test modules import: run a guest in a VM or natively, wait on a condition, ports.

Plain functions only; pytest fixtures stay in conftest.py, where pytest finds them.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, run_vm


@dataclass
class VmRun:
    result: RunResult
    stdout: bytes
    stderr: bytes
    chunks: list[tuple[int, int, bytes]]

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


def image_path(name: str) -> Path:
    return build_image(name)


def vm(
    name: str | Path, *args: str, stdin: bytes | None = None, fork: str = "thread", **config
) -> VmRun:
    """Run a built-in image (or an ELF path) in a fresh VM and capture everything
    (``fork``: an in-VM fork mode, thread or copy)."""
    path = Path(name) if isinstance(name, Path) else image_path(name)
    config.setdefault("timeout", 120)
    sink = CaptureSink()
    result = run_vm(path, list(args), config=VmConfig(**config), sink=sink, stdin=stdin, fork=fork)
    return VmRun(result, bytes(sink.stdout), bytes(sink.stderr), sink.chunks)


def native(
    name: str | Path, *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the very same static binary on the host (in ``cwd`` if given).

    In a session of its own, as a VM's first process is: a group signal or a terminal
    left behind by another test cannot reach it. A run that outlives ``timeout`` fails
    saying where it sat (its /proc state, wait channel and syscall), then is killed."""
    path = Path(name) if isinstance(name, Path) else image_path(name)
    with subprocess.Popen(
        [str(path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            where = _where(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)  # its children too: they hold the pipes
            out, err = proc.communicate(timeout=30)
            raise AssertionError(
                f"{path.name} {' '.join(args)}: still running after {timeout} s ({where});"
                f" stdout {out[-2000:]!r} stderr {err[-2000:]!r}"
            ) from e
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _where(pid: int) -> str:
    """What the kernel says a process is doing, for a hang's failure message."""
    facts = []
    for name in ("stat", "wchan", "syscall"):
        try:
            facts.append(f"{name}: {Path(f'/proc/{pid}/{name}').read_text().strip()}")
        except OSError as e:
            facts.append(f"{name}: {e.strerror}")
    try:
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        facts.append(f"fds: {fds}")
    except OSError as e:
        facts.append(f"fds: {e.strerror}")
    return "; ".join(facts)


def wait_until(
    cond: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] = lambda: "",
) -> object:
    """Wait until ``cond()`` is truthy and return it; fail naming ``what`` after ``timeout``.

    This is how tests wait for something to happen: on the condition, with a
    deadline (the sleep is only the polling interval).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{detail()}")
        time.sleep(interval)  # ok-sleep: the polling interval of a wait with a deadline


def channel_segments(pid: int | str = "self") -> list[str]:
    """The shm channel segments (memfds, transports/shm_segment.py) a process maps
    (its /proc maps lines) or holds open (its fd numbers): none once its channels
    and spares are closed."""
    name = "memfd:unifork-channel"
    proc = Path(f"/proc/{pid}")
    maps = [line for line in (proc / "maps").read_text().splitlines() if name in line]
    fds = []
    for fd in os.listdir(proc / "fd"):
        try:
            if name in os.readlink(proc / "fd" / fd):
                fds.append(fd)
        except OSError:
            pass  # closed meanwhile (the listing's own fd, say)
    return maps + fds


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, for a server started after this.

    Racy by nature: another process may take the port before the server binds
    it.  Only for a port that must be known before its process starts and
    that ``reserved_port()`` cannot hold: ``unifork serve`` logs the address
    it was given, not the port it bound, and ``--metrics-port 0`` means no
    metrics (and the metrics server does not set SO_REUSEPORT).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def reserved_port() -> Iterator[int]:
    """A loopback TCP port held for a gRPC server this test starts: no race for it.

    The port stays bound (never listening) by a socket with SO_REUSEPORT for
    as long as the block runs.  A gRPC server sets SO_REUSEPORT on its
    listener (grpc's default on Linux), so it binds the port beside the
    holder and gets every connection; any other socket is refused the port,
    and the kernel never hands it out for a bind to port 0.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback TCP port where connections are refused, for as long as the block runs.

    The port stays bound (never listening) by a socket without SO_REUSEADDR
    or SO_REUSEPORT, so no other socket can bind it meanwhile: unlike a port
    merely found free, it cannot start answering half-way through a test.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# -- job control: the console as a controlling terminal ------------------------------------
#: makes the terminal on its stdin its controlling one (a session leader), then runs
#: the program as its child: the program's session and group are the leader's, as a
#: VM's main process is in init's session and group
_PTY_LEADER = """
import fcntl, subprocess, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
sys.exit(subprocess.run(sys.argv[1:]).returncode)
"""


def under_pty(
    argv: list[str], timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run ``argv`` with a new pseudo-terminal as its console and controlling terminal;
    its exit code and everything it wrote there (newlines as the program wrote them)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PTY_LEADER, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    return rc, bytes(out).replace(b"\r\n", b"\n").decode(errors="replace")

"""Hosts for multi-host tests: Linux network namespaces on one machine.

``Hosts(n)`` makes ``n`` namespaces ``ufhostK-<random>`` (K = 1..n), each
with ``lo`` up and an ``eth0`` at ``10.200.0.(10+K)/24``; every ``eth0`` is
one end of a veth pair whose other end is a port of the bridge ``br0``,
which lives in a namespace of its own (``ufbr-<random>``), so the machine's
own network is never touched.  Commands run inside with ``ip netns exec``;
``ip netns exec`` also gives each command a mount namespace of its own
(with / a slave, so nothing mounted in it shows outside), and ``mounts``
bind-mounts directories of the test over given paths in it (a host that does
not share /tmp or /dev/shm with the others, but whose files the test can
still inspect), or an empty tmpfs.  ``close()`` kills every process
left in the namespaces (``ip netns pids``: only processes started in them)
and deletes the namespaces; it runs even when the setup failed half way.

    with Hosts(3) as hosts:
        p = hosts.popen(0, ["ping", "-c1", hosts.addr(1)])

The ``hosts`` pytest fixture skips with the reason when namespaces cannot be
made (not root, no ``ip``, EPERM in a container).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SUBNET = "10.200.0"
PREFIX_LEN = 24
IP_TIMEOUT = 30.0


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (the reason is the message)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, ["ip", *args], p.stdout, p.stderr)
    return p


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they (probably) can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    return None


def pids_in(ns: str) -> list[int]:
    """OS pids of the processes in namespace ``ns`` (empty if it is gone)."""
    p = _ip("netns", "pids", ns, check=False)
    if p.returncode != 0:
        return []
    return [int(x) for x in p.stdout.split()]


def namespaces() -> list[str]:
    p = _ip("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


class Hosts:
    def __init__(self, n: int, prefix: str = "ufhost") -> None:
        if not 1 <= n <= 200:
            raise ValueError("between 1 and 200 hosts")
        self.n = n
        self.tag = secrets.token_hex(3)
        self.bridge_ns = f"ufbr-{self.tag}"
        self.names = [f"{prefix}{k + 1}-{self.tag}" for k in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._closed = False

    # -- set up -----------------------------------------------------------------------
    def addr(self, k: int) -> str:
        """The address of host ``k`` (0-based): 10.200.0.(11+k)."""
        return f"{SUBNET}.{11 + k}"

    def __enter__(self) -> Hosts:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        try:
            self._add_ns(self.bridge_ns)
        except subprocess.CalledProcessError as e:
            raise NetnsUnavailable(
                f"cannot create a network namespace: {(e.stderr or '').strip() or e}"
            ) from e
        br = ("-n", self.bridge_ns)
        _ip(*br, "link", "set", "lo", "up")
        _ip(*br, "link", "add", "br0", "type", "bridge")
        _ip(*br, "link", "set", "br0", "up")
        for k, ns in enumerate(self.names):
            self._add_ns(ns)
            port = f"p{k + 1}"
            # made in the bridge's namespace, the peer end straight into the host's
            _ip(*br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip(*br, "link", "set", port, "master", "br0")
            _ip(*br, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(k)}/{PREFIX_LEN}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    # -- running things inside ----------------------------------------------------------
    def command(
        self, k: int, argv: list[str], mounts: dict[str, str | None] | None = None
    ) -> list[str]:
        """``argv`` as run in host ``k``; ``mounts`` maps a directory to the directory
        bind-mounted over it in the command's mount namespace (None: an empty tmpfs)."""
        cmd = ["ip", "netns", "exec", self.names[k]]
        if not mounts:
            return cmd + list(argv)
        steps = []
        for target, source in mounts.items():
            if source is None:
                steps.append(f"mount -t tmpfs -o size=256m,mode=1777 ufhost {shlex.quote(target)}")
            else:
                steps.append(f"mount --bind {shlex.quote(source)} {shlex.quote(target)}")
        return cmd + ["sh", "-c", f'{" && ".join(steps)} && exec "$@"', "sh", *argv]

    def popen(
        self, k: int, argv: list[str], mounts: dict[str, str | None] | None = None, **kw
    ) -> subprocess.Popen:
        """Start ``argv`` in host ``k`` (killed by ``close`` if still running)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        for target, source in (mounts or {}).items():
            Path(target).mkdir(parents=True, exist_ok=True)
            if source is not None:
                Path(source).mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen(self.command(k, argv, mounts), **kw)
        self.procs.append(p)
        return p

    def run(
        self, k: int, argv: list[str], timeout: float = 60.0, **kw
    ) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(k, argv), timeout=timeout, check=False, **kw)

    def set_link(self, k: int, up: bool) -> None:
        """Take host ``k``'s ``eth0`` down (its packets are dropped, no FIN or RST is
        sent: as if the cable were pulled) or bring it back up."""
        _ip("-n", self.names[k], "link", "set", "eth0", "up" if up else "down")
        if up:  # the address's route went with the link: it comes back with it
            _ip("-n", self.names[k], "route", "replace", f"{SUBNET}.0/{PREFIX_LEN}", "dev", "eth0")

    def pids(self, k: int) -> list[int]:
        return pids_in(self.names[k])

    # -- tearing down -------------------------------------------------------------------
    def kill_all(self, k: int, timeout: float = 10.0) -> None:
        """SIGKILL every process in host ``k`` and wait until none is left."""
        ns = self.names[k]
        deadline = time.monotonic() + timeout
        while True:
            left = pids_in(ns)
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._reap()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"processes {left} in {ns} did not die")
            time.sleep(0.05)  # ok-sleep: polling interval of this wait with a deadline

    def _reap(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.poll()

    def close(self) -> None:
        """Kill what runs inside, delete the namespaces; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        for k, ns in enumerate(self.names):
            if ns in self._made:
                try:
                    self.kill_all(k)
                except TimeoutError as e:
                    errors.append(str(e))
        for ns in reversed(self._made):
            p = _ip("netns", "del", ns, check=False)
            if p.returncode != 0 and ns in namespaces():
                errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
        if errors:
            raise RuntimeError("; ".join(errors))


def hosts_or_skip(n: int) -> Hosts:
    """``Hosts(n)`` entered, or ``pytest.skip`` with the reason namespaces are unavailable."""
    h = Hosts(n)
    try:
        return h.__enter__()
    except NetnsUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Three hosts for one test (use ``hosts_or_skip`` for other counts or scopes)."""
    h = hosts_or_skip(3)
    try:
        yield h
    finally:
        h.close()

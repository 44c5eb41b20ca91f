"""The ways one static guest binary is run: natively, thread fork, copy fork, VM-clone fork.

Every runner takes the image (a built ELF), its arguments and an optional
``probe``: a callable run once, at the moment the program's console shows a
line starting with ``marker`` (``children=``), while the program's
children are alive; its result lands in ``Outcome.probe``.  Each run's exit
status is checked: a failed run raises :class:`RunFailed` instead of giving a
figure.

* ``native``: the binary as an ordinary Linux process (stdout a pipe, stdin
  ``/dev/null``);
* ``thread``: the thread backend in this process (thread fork, one VM);
* ``copy``: the copy backend in this process (copy fork: private memory, one VM);
* ``vmclone-shm`` / ``vmclone-tcp``: the vmclone backend on the one shared
  ``WarmPool`` (every process a VM of its own, cross-VM pipes over shared
  memory or TCP);
* ``vmclone-remote``: launched over gRPC on a tender (``--target``) with
  placement ``remote``: every VM of the instance runs on that tender's peers.

The console is a plain stream everywhere (``tty=False`` in the VMs, a pipe
natively), so stdio is fully buffered alike in every mode.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE, THREAD, VMCLONE_SHM, VMCLONE_TCP, VMCLONE_REMOTE = (
    "native",
    "thread",
    "vmclone-shm",
    "vmclone-tcp",
    "vmclone-remote",
)
#: copy fork (issue 18): private memory inside one VM
COPY = "copy"
ALL_MODES = (NATIVE, THREAD, COPY, VMCLONE_SHM, VMCLONE_TCP, VMCLONE_REMOTE)
LOCAL_MODES = (NATIVE, THREAD, COPY, VMCLONE_SHM, VMCLONE_TCP)
#: modes whose processes all live in one VM in the harness process (guest peak memory)
ONE_VM_MODES = (THREAD, COPY)
VMCLONE_MODES = (VMCLONE_SHM, VMCLONE_TCP, VMCLONE_REMOTE)
RUN_TIMEOUT = 120.0  # seconds of wall time for any one program run

#: called with the program's host pid natively, None in a VM
Probe = Callable[[int | None], dict]


class RunFailed(RuntimeError):
    """A program run failed (bad exit status, time limit): no figure from it."""


@dataclass
class Outcome:
    stdout: str
    wall: float  # seconds, launch to exit, perf_counter on this host
    peak_memory: int | None = None  # thread mode: guest bytes the bmk allocator committed
    snapshot_bytes: list[int] = field(default_factory=list)  # vmclone: one per fork
    probe: dict | None = None
    #: launch to exit of the workload's baseline run just before this one (if it has one)
    baseline_wall: float | None = None
    #: vmclone: each fork's steps in seconds (RunResult.fork_phases)
    fork_phases: list[dict[str, float]] = field(default_factory=list)
    #: each fork's seconds in the parent's kernel (RunResult.fork_seconds; empty natively
    #: and where the run's result does not say; a ``unifork run`` process: its first)
    fork_seconds: list[float] = field(default_factory=list)


def _args_text(args: Sequence[str], limit: int = 60) -> str:
    """A run's arguments for an error message, cut short (a script must not hide the error)."""
    text = " ".join(args)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _marker_sink(sink, marker: bytes, probe: Probe | None, holder: dict):
    """A console sink that calls ``probe`` once, when ``marker`` starts a stdout line."""
    seen = bytearray()

    def call(pid: int, fd: int, data: bytes) -> None:
        sink(pid, fd, data)
        if probe is None or "probe" in holder or fd != 1:
            return
        seen.extend(data)
        if seen.startswith(marker) or b"\n" + marker in seen:
            holder["probe"] = probe(None)

    return call


# -- host memory --------------------------------------------------------------------------------


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users).

    Falls back to the resident set size where ``smaps_rollup`` is missing.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0  # it ended meanwhile


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
            except OSError:
                pass
    return out


# -- runners -----------------------------------------------------------------------------------


class Runner:
    """Runs programs in one mode; ``close`` releases what it holds."""

    name = ""

    def run(
        self,
        image: Path,
        args: Sequence[str],
        *,
        ram: int | None = None,
        probe: Probe | None = None,
        marker: str = "children=",
        env: Sequence[str] | None = None,
    ) -> Outcome:
        """Run ``image`` (a built ELF or a baked image, whose program ``args[0]`` names) with
        ``args``; ``env`` (``NAME=VALUE``), if given, is all of its environment."""
        raise NotImplementedError

    def host_memory(self, pid: int | None = None) -> int:
        """Bytes of host memory (PSS) of everything that hosts a run of this mode."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class NativeRunner(Runner):
    name = NATIVE

    def run(self, image, args, *, ram=None, probe=None, marker="children=", env=None):
        argv = [str(image), *args]
        environ = None if env is None else dict(e.split("=", 1) for e in env)
        if probe is None:
            t0 = time.perf_counter()
            p = subprocess.run(
                argv,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=RUN_TIMEOUT,
                check=False,
                env=environ,
            )
            wall = time.perf_counter() - t0
            out, err, code, seen = p.stdout, p.stderr, p.returncode, None
        else:
            t0 = time.perf_counter()
            with subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=environ,
            ) as proc:
                chunks, seen = [], None
                assert proc.stdout is not None
                for line in proc.stdout:  # the program flushes the marker line itself
                    chunks.append(line)
                    if seen is None and line.startswith(marker.encode()):
                        seen = probe(proc.pid)
                try:
                    err = proc.stderr.read() if proc.stderr else b""
                    code = proc.wait(RUN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise
                wall = time.perf_counter() - t0
            out = b"".join(chunks)
        if code != 0:
            raise RunFailed(
                f"native {image.name} {_args_text(args)}: exit {code}: "
                f"{err.decode(errors='replace').strip()[-300:]}"
            )
        return Outcome(out.decode(errors="replace"), wall, probe=seen)

    def host_memory(self, pid=None):
        return sum(pss_bytes(p) for p in process_tree(pid)) if pid else 0


class _SnapshotObserver:
    """Receives the supervisor's per-fork figures (the snapshot size is the child's guest RAM)."""

    def __init__(self) -> None:
        self.snapshots: list[int] = []

    def fork_done(self, seconds: float, snapshot: int, remote: bool) -> None:
        self.snapshots.append(int(snapshot))

    def pipe_write(self, nbytes: int, seconds: float) -> None:
        pass


class BackendRunner(Runner):
    """A fork mode of this library, run through its instance backend (one-shot runs)."""

    #: report the run's peak guest memory (one VM: what the bmk allocator committed)
    peak_memory = False
    #: report each fork's snapshot size (VM-clone: the clone's guest RAM) on probed runs
    snapshots = False

    def __init__(self, name: str, fork_mode: str, pool=None, transport: str = "shm") -> None:
        from tender_service.instance.backends import BackendContext, make_backend

        self.name = name
        self.transport = transport
        self.backend = make_backend(fork_mode, BackendContext(pool=pool))

    def run(self, image, args, *, ram=None, probe=None, marker="children=", env=None):
        from tender_service.instance.backends import InstanceSpec, run_instance
        from tender_service.rump.vminfo import VmConfig
        from tender_service.vm import CaptureSink

        config = VmConfig(timeout=RUN_TIMEOUT, tty=False)
        if ram:
            config.ram = ram
        sink, holder = CaptureSink(), {}
        console = _marker_sink(sink, marker.encode(), probe, holder)
        observer = _SnapshotObserver()
        t0 = time.perf_counter()
        r = run_instance(
            self.backend,
            InstanceSpec(
                image,
                list(args),
                None if env is None else list(env),
                config,
                transport=self.transport,
            ),  # fmt: skip
            console,
            observer if probe is not None and self.snapshots else None,
        )
        wall = time.perf_counter() - t0
        if r.outcome != "exited" or r.exit_code != 0:
            raise RunFailed(
                f"{self.name} {image.name} {_args_text(args)}: {r.outcome}, exit "
                f"{r.exit_code}: {'; '.join(r.reports)} "
                f"{sink.stderr.decode(errors='replace').strip()[-300:]}"
            )
        return Outcome(
            sink.stdout.decode(errors="replace"),
            wall,
            peak_memory=r.peak_memory if self.peak_memory else None,
            snapshot_bytes=observer.snapshots,
            probe=holder.get("probe"),
            fork_phases=list(r.fork_phases or []),
            fork_seconds=list(r.fork_seconds or []),
        )

    def close(self) -> None:
        self.backend.close()


class ThreadRunner(BackendRunner):
    """Thread fork: a fresh VM in this process."""

    peak_memory = True

    def __init__(self) -> None:
        super().__init__(THREAD, "thread")

    def host_memory(self, pid=None):
        return pss_bytes(os.getpid())


class CopyRunner(ThreadRunner):
    """Copy fork (private memory in one VM): a fresh VM in this process."""

    def __init__(self) -> None:
        BackendRunner.__init__(self, COPY, "copy")


class VmcloneRunner(BackendRunner):
    """VM-clone fork on the shared warm pool, pipes over ``transport``."""

    snapshots = True

    def __init__(self, pool, transport: str) -> None:
        super().__init__(f"vmclone-{transport}", "vmclone", pool, transport)
        self.pool = pool

    def host_memory(self, pid=None):
        return pss_bytes(os.getpid()) + sum(pss_bytes(w.pid) for w in list(self.pool.workers))


#: ``unifork run`` flags that start each local fork mode as a user would
UNIFORK_RUN_FLAGS: dict[str, tuple[str, ...]] = {
    THREAD: ("--fork", "thread"),
    COPY: ("--fork", "copy"),
    VMCLONE_SHM: ("--fork", "vmclone", "--pipe", "shm"),
    VMCLONE_TCP: ("--fork", "vmclone", "--pipe", "tcp"),
}


def unifork_run_argv(mode: str, image: Path, args: Sequence[str]) -> list[str]:
    """The ``unifork run`` command line for ``mode`` (console a pipe, stdin EOF; its
    statistics on stderr, after the program's end)."""
    import sys

    script = Path(sys.executable).parent / "unifork"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "unifork"]
    return [
        *cmd,
        "run",
        "--console",
        "pipe",
        "--stdin",
        "none",
        "--stats",
        *UNIFORK_RUN_FLAGS[mode],
        str(image),
        *args,
    ]


def run_unifork_process(mode: str, image: Path, args: Sequence[str]) -> Outcome:
    """One fresh ``unifork run`` process: what a user of the thesis's listing runs."""
    argv = unifork_run_argv(mode, image, args)
    t0 = time.perf_counter()
    p = subprocess.run(
        argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT, check=False
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RunFailed(
            f"unifork run ({mode}) {image.name} {_args_text(args)}: exit "
            f"{p.returncode}: {p.stderr.decode(errors='replace').strip()[-300:]}"
        )
    # --stats: its first fork's time in the kernel (unifork/cli.py, fork_kernel_text)
    first = re.search(rb"^unifork: fork in the kernel: 1st ([0-9.]+) us", p.stderr, re.M)
    return Outcome(
        p.stdout.decode(errors="replace"),
        wall,
        fork_seconds=[float(first.group(1)) / 1e6] if first else [],
    )


class RemoteRunner(Runner):
    """VM-clone instances launched over gRPC on ``target``, placement ``remote``.

    Each image is uploaded once under a content-derived name, so the peer runs
    exactly the binary measured in the other modes.
    """

    name = VMCLONE_REMOTE

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: str | None = None,
        transport: str = "tcp",
    ) -> None:
        from tender_service.service.client import Client

        self.client = Client(target, token, tls_ca)
        self.target = target
        self.transport = transport
        self._names: dict[Path, str] = {}

    def check(self, timeout: float = 10.0) -> None:
        """Raise (with the reason) unless the tender answers its health check."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.client.channel)
        check = stub.Check  # type: ignore[attr-defined]  # the stubs declare no HealthStub methods
        r = check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=self.client.md
        )
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"tender {self.target} is not serving")

    def image_name(self, image: Path) -> str:
        if image not in self._names:
            data = image.read_bytes()
            stem = image.name.split("-", 1)[0][:40]
            name = f"cmp-{stem}-{hashlib.sha256(data).hexdigest()[:12]}"
            self.client.upload(name, data)
            self._names[image] = name
        return self._names[image]

    def run(self, image, args, *, ram=None, probe=None, marker="children=", env=None):
        pb2 = self.client.pb2
        name = self.image_name(image)
        t0 = time.perf_counter()
        iid = self.client.launch(
            name,
            list(args),
            fork_mode=pb2.FORK_MODE_VMCLONE,
            pipe_transport=pb2.PIPE_TRANSPORT_TCP
            if self.transport == "tcp"
            else pb2.PIPE_TRANSPORT_SHM,
            placement=pb2.PLACEMENT_REMOTE,
            memory_bytes=ram or 0,
            time_limit_seconds=RUN_TIMEOUT,
            console_pipe=True,
            env=list(env or ()),
        )
        out, err = bytearray(), bytearray()
        for chunk in self.client.logs(iid):
            (out if chunk.fd == 1 else err).extend(chunk.data)
        r = self.client.wait(iid, RUN_TIMEOUT)
        wall = time.perf_counter() - t0
        if not r.done or r.outcome != "exited" or r.exit_code != 0:
            raise RunFailed(
                f"{self.name} {image.name} {_args_text(args)}: {r.outcome}, exit "
                f"{r.exit_code}: {'; '.join(r.reports)} "
                f"{err.decode(errors='replace').strip()[-300:]}"
            )
        return Outcome(out.decode(errors="replace"), wall)

    def host_memory(self, pid=None):
        raise NotImplementedError("host memory of a remote tender is not observable from here")

    def close(self) -> None:
        self.client.close()

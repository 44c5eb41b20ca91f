"""Thread-fork instances in processes of their own: the tender's side.

``ThreadVmHost`` keeps one fork server (instance/vmserver.py) and asks it
for a VM process per instance; ``ThreadVm`` follows one such process over
its connection: console, fork latencies, process table, kill, result.  A VM
process that dies without a result (the emulator crashed) leaves a result
all the same: killed by SIGKILL, with a report naming what the process died
of.  Nothing else is lost: other instances run in other processes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import reduction

from tender_service.instance import jail, vmserver
from tender_service.instance.backends.base import VmStatus
from tender_service.rump import signals
from tender_service.rump.console import Sink
from tender_service.rump.vminfo import FORK_TIMES_KEPT, RunResult, VmConfig
from tender_service.vm import emulator_crashed, lost_vm_report

log = logging.getLogger(__name__)

KILL_GRACE = 10.0  # s a killed VM may take to stop before its process gets SIGKILL
LIMIT_GRACE = 30.0  # s past the instance's time limit before the tender SIGKILLs it
EXIT_WAIT = 5.0  # s to wait for the server to report how a process ended
QUERY_TIMEOUT = 2.0


@dataclass(eq=False)
class ThreadVm:
    """One thread-fork instance running in its own process."""

    rid: int
    conn: multiprocessing.connection.Connection
    sink: Sink
    fork_observer: Callable[[float], None]
    time_limit: float | None
    started: float = field(default_factory=time.monotonic)
    os_pid: int = 0
    wait_status: int | None = None  # the process's, as the fork server reaped it
    exited: threading.Event = field(default_factory=threading.Event)  # wait_status is set
    forks_seen: int = 0
    pipe_bytes: int = 0
    crashed: bool = False  # its process died of a signal we did not send (the emulator's)
    _sigkilled: bool = False
    status: VmStatus = field(default_factory=lambda: VmStatus([], 0))
    _send_lock: threading.Lock = field(default_factory=threading.Lock)
    _query_lock: threading.Lock = field(default_factory=threading.Lock)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _answers: int = 0
    _closed: bool = False
    _kill_deadline: float | None = None

    # -- from other threads ------------------------------------------------------------
    def kill(self, reason: str = "killed") -> None:
        """Stop the VM (it ends with SIGKILL status); SIGKILL the process if it ignores us."""
        if self._kill_deadline is None:
            self._kill_deadline = time.monotonic() + KILL_GRACE
        self._send(b"K" + reason.encode())

    def query(self, timeout: float = QUERY_TIMEOUT) -> VmStatus:
        """The live process table and committed memory (the last known if no answer)."""
        with self._query_lock:
            with self._cond:
                seen = self._answers
            if not self._closed and self._send(b"Q"):
                with self._cond:
                    self._cond.wait_for(lambda: self._answers > seen or self._closed, timeout)
            return self.status

    def _send(self, frame: bytes) -> bool:
        with self._send_lock:
            try:
                self.conn.send_bytes(frame)
                return True
            except OSError:  # the process is gone: wait() will say how
                return False

    def _ended(self, status: int | None) -> None:
        self.wait_status = status
        self.exited.set()

    # -- the instance's thread -----------------------------------------------------------
    def wait(self) -> RunResult:
        """Follow the process to its end: console, forks, answers, result."""
        result, error = None, None
        try:
            while True:
                if not self.conn.poll(0.5):
                    self._check_deadlines()
                    continue
                try:
                    frame = self.conn.recv_bytes(vmserver.MAX_FRAME)
                except (EOFError, OSError):
                    break
                kind, payload = frame[:1], frame[1:]
                if kind == b"R":  # the last frame: no need to wait for the process to exit
                    result = self._result(json.loads(payload))
                    break
                if kind == b"E":
                    error = str(json.loads(payload)["error"])
                    break
                self._dispatch(kind, payload)
        except (ValueError, TypeError, KeyError) as e:  # not our VM's frames any more
            log.error(
                "thread-fork VM process %d sent a malformed frame (%s): killing it", self.os_pid, e
            )
            self._sigkill()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self.conn.close()
        if error is not None:
            raise RuntimeError(error)
        if result is not None:
            return result
        if not self.exited.wait(EXIT_WAIT):
            log.warning("the fork server did not report how VM process %d ended", self.os_pid)
        return self._lost()

    def _dispatch(self, kind: bytes, payload: bytes) -> None:
        if kind == b"C":
            pid, fd = vmserver.CONSOLE.unpack_from(payload)
            self.sink(pid, fd, payload[vmserver.CONSOLE.size :])
        elif kind == b"F":
            for seconds in array("d", payload):  # ValueError unless whole doubles
                self.forks_seen += 1
                self.fork_observer(seconds)
        elif kind == b"T":
            msg = json.loads(payload)
            status = VmStatus(vmserver.procs_of(msg["processes"]), int(msg["memory"]))
            with self._cond:
                self.status = status
                self._answers += 1
                self._cond.notify_all()
        elif kind == b"L":
            vmserver.relay_log(payload)
        elif kind == b"S":  # built and running; the server's report of its pid may lag
            self.os_pid = self.os_pid or int(json.loads(payload)["pid"])
        else:
            raise ValueError(f"unknown frame kind {kind!r}")

    def _result(self, msg: dict) -> RunResult:
        self.pipe_bytes = int(msg["pipe_bytes"])
        return RunResult(
            status=int(msg["status"]),
            outcome=str(msg["outcome"]),
            reports=[str(r) for r in msg["reports"]],
            elapsed=float(msg["elapsed"]),
            forks=int(msg["forks"]),
            fork_seconds=[float(x) for x in msg["fork_seconds"][:FORK_TIMES_KEPT]],
            syscalls=int(msg["syscalls"]),
            peak_memory=int(msg["peak_memory"]),
            processes=vmserver.procs_of(msg["processes"]),
        )

    def _check_deadlines(self) -> None:
        """The VM enforces its time limit and obeys kills; this is for one that doesn't."""
        now = time.monotonic()
        overdue = self._kill_deadline is not None and now > self._kill_deadline
        if self.time_limit is not None:
            overdue |= now > self.started + self.time_limit + LIMIT_GRACE
        if overdue:
            log.error("thread-fork VM process %d does not stop: SIGKILL", self.os_pid)
            self._sigkill()

    def _sigkill(self) -> None:
        """Only called while the connection is open: the process holds its other end,
        so the pid is still its own."""
        if self.os_pid:
            self._sigkilled = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.os_pid, signal.SIGKILL)

    def _lost(self) -> RunResult:
        """The result of a VM whose process ended without reporting (a crash)."""
        report = lost_vm_report(self.os_pid, self.wait_status)
        self.crashed = emulator_crashed(self.wait_status) and not self._sigkilled
        log.error("thread-fork instance: %s", report)
        return RunResult(
            status=signals.signaled_status(signals.SIGKILL),
            outcome="signaled",
            reports=[report],
            elapsed=time.monotonic() - self.started,
            forks=self.forks_seen,
            syscalls=0,
            peak_memory=self.status.committed_memory,
            processes=self.status.processes,
        )


@dataclass(eq=False)
class _Server:
    """One fork server process, its control connection, the VMs it has to report."""

    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    vms: dict[int, ThreadVm] = field(default_factory=dict)
    dead: bool = False


class ThreadVmHost:
    """Keeps the fork server running and starts thread-fork instances through it."""

    def __init__(self, level: int | None = None, jailed: bool | None = None) -> None:
        self.level = logging.getLogger().getEffectiveLevel() if level is None else level
        #: VM processes jail themselves (instance/jail.py) unless --no-jail / UNIFORK_NO_JAIL
        self.jailed = jail.enabled() if jailed is None else jailed
        self._mp = multiprocessing.get_context("spawn")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._closed = False
        self._start_server()

    def _start_server(self) -> _Server:
        mine, theirs = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(
            target=vmserver.serve,
            args=(theirs, self.level, self.jailed),
            name="unifork-vm-server",
            daemon=True,
        )
        proc.start()
        theirs.close()
        self._server = server = _Server(proc, mine)
        threading.Thread(target=self._follow, args=(server,), name="vm-server", daemon=True).start()
        return server

    def _follow(self, server: _Server) -> None:
        """A server's reports: which pid each VM got, and how it ended."""
        while True:
            try:
                frame = server.conn.recv_bytes(vmserver.MAX_FRAME)
                kind, msg = frame[:1], frame[1:]
                if kind == b"L":
                    vmserver.relay_log(msg)
                    continue
                msg = json.loads(msg)
                rid = int(msg["id"])
                with self._lock:
                    vm = server.vms.get(rid)
                    if kind == b"X":  # its last report
                        server.vms.pop(rid, None)
                if vm is None:
                    continue
                if kind == b"F":
                    vm.os_pid = int(msg["pid"])
                elif kind == b"X":
                    vm._ended(int(msg["status"]))
            except (EOFError, OSError):
                break
            except (ValueError, TypeError, KeyError) as e:
                log.error("the VM fork server sent a malformed report: %s", e)
        server.conn.close()
        with self._lock:  # the server is gone: nobody will report these processes' ends
            server.dead = True
            orphans = list(server.vms.values())
            server.vms.clear()
        for vm in orphans:
            vm._ended(None)
        if not self._closed:
            log.warning(
                "the VM fork server %d exited: starting another at the next launch", server.proc.pid
            )

    def launch(
        self,
        instance_id: str,
        image_path: str,
        args: Sequence[str],
        env: Sequence[str],
        config: VmConfig,
        argv0: str,
        sink: Sink,
        fork_observer: Callable[[float], None],
        fork: str = "thread",
        publish: Sequence[tuple[str, int, int]] = (),
        listeners: Sequence[int] = (),
    ) -> ThreadVm:
        """``publish``/``listeners``: the host ports bound for the instance ((IP, port,
        guest port) each) and their listening sockets, which the VM process serves."""
        start = dict(
            publish=[list(m) for m in publish],
            instance_id=instance_id,
            fork=fork,
            image_path=str(image_path),
            args=list(args),
            env=list(env),
            argv0=argv0,
            config=dict(
                ram=config.ram,
                stack_size=config.stack_size,
                timeout=config.timeout,
                quantum=config.quantum,
                max_procs=config.max_procs,
                tty=config.tty,
            ),
        )
        mine, theirs = multiprocessing.Pipe(duplex=True)
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the tender is shutting down")
                rid = next(self._ids)
                vm = ThreadVm(rid, mine, sink, fork_observer, config.timeout)
                request = json.dumps({"id": rid, "start": start}).encode()
                for attempt in (1, 2):  # a server that died since the last launch: another
                    server = self._server
                    if server is None or server.dead or not server.proc.is_alive():
                        server = self._start_server()
                    server.vms[rid] = vm
                    try:
                        server.conn.send_bytes(request)
                        for fd in (theirs.fileno(), *listeners):
                            reduction.send_handle(server.conn, fd, server.proc.pid)
                        break
                    except OSError as e:
                        server.vms.pop(rid, None)
                        server.dead = True
                        if attempt == 2:
                            raise RuntimeError(f"the VM fork server is gone: {e}") from e
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return vm

    def close(self) -> None:
        """Stop the server; VM processes still running stop when their instance's
        connection closes (the tender kills what is left before it calls this)."""
        with self._lock:
            self._closed = True
            server = self._server
        if server is not None:
            server.proc.kill()  # it runs no guest code and holds no state worth a goodbye
            server.proc.join()

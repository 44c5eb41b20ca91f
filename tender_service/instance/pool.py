"""A warm pool of local tender processes for VM-clone children.

Starting a Python interpreter with Unicorn costs a few hundred
milliseconds; the pool starts tender processes ahead of time, so that a
clone only pays for its snapshot.  Each process hosts many VMs; a clone is
placed on a different process than its parent's when the pool has more than
one.  Processes that die are replaced in the background.  ``close`` kills
them all and removes their sockets.

Workers are spawned (not forked: the parent runs gRPC, which does not
survive a fork) as ``multiprocessing`` processes; their log records come
back through a multiprocessing-logging handler into this process's logging.
As with any spawned ``multiprocessing`` child, a script that creates a pool
must guard its top level with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tender_service.instance import jail
from tender_service.instance.childproc import log_receiver
from tender_service.toolchain.images import build_vm_runtime

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0


@dataclass(eq=False)
class WorkerHandle:
    proc: multiprocessing.process.BaseProcess
    address: str
    host: str = "local"
    remote = False

    @property
    def pid(self) -> int:
        return self.proc.pid or 0

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def start_vm(self, start: dict, snapshot: bytes | None, image: bytes | None = None):
        from tender_service.instance.worker import start_vm

        return start_vm(self.address, start, snapshot, image=image)

    def send_vm(self, chunks, timeout: float = 30.0):
        """Hand a StartVm stream (from a peer tender, checked by ours) to this process."""
        from tender_service.instance.worker import send_vm

        return send_vm(self.address, chunks, timeout)

    def load(self) -> int:
        """VMs this tender process hosts (Peer.GetLoad)."""
        from tender_service import protos

        pb2, pb2_grpc = protos.peer()
        with grpc.insecure_channel(self.address) as ch:
            return int(pb2_grpc.PeerStub(ch).GetLoad(pb2.LoadRequest(), timeout=2.0).vms)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()

    def reap(self, timeout: float = 5.0) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class PoolStartError(RuntimeError):
    """The pool's tender processes did not all start: one died starting, or timed out."""


class _Ready:
    """A worker's "ready" (``.set()``, as worker.serve calls it) over a pipe, so that
    the pool waits for it or for the worker's end, whichever comes first."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn

    def set(self) -> None:
        self.conn.send_bytes(b"ready")
        self.conn.close()


def _worker_main(
    listen: str, log_queue, env: dict[str, str], level: int, ready, jailed: bool
) -> None:
    """A pool process's entry point: the worker module (the VM stack, gRPC: ~0.35 s of
    imports) is imported in the new process only.  Named as its target, it had to be
    imported here first, holding the GIL before the spawn even began: on the path of
    every VM-clone instance's start when the pool is its own (``unifork run``)."""
    from tender_service.instance.worker import run_worker

    run_worker(listen, log_queue, env, level, ready, jailed)


def _said_ready(conn: multiprocessing.connection.Connection) -> bool:
    try:
        return conn.poll() and conn.recv_bytes() == b"ready"
    except (EOFError, OSError):  # it ended (or closed its end) without a word
        return False


class WarmPool:
    def __init__(
        self,
        size: int = 2,
        verbose: int = 0,
        env: dict[str, str] | None = None,
        host: str = "local",
        jailed: bool | None = None,
        on_crash: Callable[[int, int], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self.level = (
            logging.getLogger().getEffectiveLevel()
            if not verbose
            else logging.WARNING - 10 * verbose
        )
        self.env = dict(env or {})
        self.host = host
        #: workers jail themselves (instance/jail.py) unless --no-jail / UNIFORK_NO_JAIL
        self.jailed = jail.enabled() if jailed is None else jailed
        if self.jailed:  # they keep our uid: our memory is closed to them (/proc/PID/mem)
            jail.shield_host()
        self.on_crash = on_crash  # (pid, signal) of a process that died of a signal
        self.dir = tempfile.mkdtemp(prefix="unifork-pool-")
        self.workers: list[WorkerHandle] = []
        self._ids = itertools.count()
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._ready = threading.Condition(self._lock)
        #: why a worker died before it was ready (``wait_ready`` raises it at once)
        self.start_error: str | None = None
        # workers jail themselves before their warm-up, and a jailed process cannot
        # run the compiler: what every VM process loads is built here, first
        build_vm_runtime()
        self._mp = multiprocessing.get_context("spawn")
        self.logs = log_receiver("unifork-worker-logs", self._mp)
        self._starters = [
            threading.Thread(target=self._start_one, daemon=True) for _ in range(size)
        ]
        for t in self._starters:
            t.start()

    def _start_one(self) -> None:
        path = os.path.join(self.dir, f"w{next(self._ids)}.sock")
        reader, writer = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(
            target=_worker_main,
            daemon=True,
            name=f"unifork-worker-{path}",
            args=(
                f"unix:{path}",
                self.logs.queue,
                self.env,
                self.level,
                _Ready(writer),
                self.jailed,
            ),
        )
        proc.start()
        writer.close()
        with reader:
            multiprocessing.connection.wait([reader, proc.sentinel], START_TIMEOUT)
            ready = _said_ready(reader)
        if not ready:
            proc.join(0)
            if proc.exitcode is None:
                log.warning("tender process %d did not start", proc.pid)
                proc.kill()
                proc.join()
                return
            why = f"a tender process died while starting (exit code {proc.exitcode}; its log says why)"
            log.error("%s", why)
            with self._lock:
                self.start_error = why
                self._ready.notify_all()
            return
        with self._lock:
            if self._closed:
                proc.kill()
                proc.join()
                return
            self.workers.append(WorkerHandle(proc, f"unix:{path}", self.host))
            self._ready.notify_all()

    def acquire(self, avoid: int = 0, timeout: float = START_TIMEOUT) -> WorkerHandle:
        """A live tender process (not the one with OS pid ``avoid`` if there is a choice)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                self._reap_dead()
                live = [w for w in self.workers if w.pid != avoid] or self.workers
                if live:
                    return live[next(self._rr) % len(live)]
                if self._closed:
                    raise RuntimeError("the pool is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no tender process became ready")
                self._ready.wait(left)

    def reap_dead(self) -> None:
        """Replace the processes that died (the tender calls it every second)."""
        with self._lock:
            self._reap_dead()

    def _reap_dead(self) -> None:
        for w in [w for w in self.workers if not w.alive]:
            self.workers.remove(w)
            code = w.proc.exitcode
            log.warning("tender process %d died (exit code %s): starting another", w.pid, code)
            if code is not None and code < 0 and self.on_crash is not None:
                self.on_crash(w.pid, -code)  # a signal: the emulator crashed
            threading.Thread(target=self._start_one, daemon=True).start()

    def load(self) -> int:
        """VMs hosted by all the pool's processes (dead or slow ones count as busy)."""
        total = 0
        for w in list(self.workers):
            try:
                total += w.load()
            except grpc.RpcError:
                total += 1000
        return total

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.workers) < self.size:
                if self.start_error is not None:
                    raise PoolStartError(self.start_error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolStartError(f"the pool did not start in {timeout:g} s")
                self._ready.wait(left)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self.workers = self.workers, []
            self._ready.notify_all()
        for w in workers:
            w.kill()
        for w in workers:
            w.reap()
        for t in self._starters:
            t.join(START_TIMEOUT)
        self.logs.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The supervisor of a VM-clone instance: init, process tree, pipes, console.

Every process of a VM-clone instance runs in its own VM, in its own tender
process.  The supervisor is what they share: it hands out pids, is the
instance's init (pid 1: it adopts orphans and reaps them), keeps each
process's parent, group and status for ``wait``/``kill``/``setpgid``,
hosts the pipe broker for pipes that cross VMs, merges the console output
of every VM into one stream tagged with pids, and places child VMs on
tender processes (the warm pool).  Each VM talks to it over one channel of
the instance's transport (tcp or shm).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tender_service.instance.budget import MemoryBudget
from tender_service.instance.clone_ports import ClonePorts
from tender_service.instance.observer import notify
from tender_service.instance.publish import Publisher
from tender_service.instance.stdin import StdinServer
from tender_service.machine.rootfs import RootFs
from tender_service.rump import pgroups, signals
from tender_service.rump.fs import FileSystem
from tender_service.rump.vminfo import FORK_PHASES, FORK_TIMES_KEPT, ProcInfo, RunResult, VmConfig
from tender_service.transports.broker import IN_FLIGHT_HOLDER, PipeBroker
from tender_service.transports.channel import (
    PEER_TIMEOUT,
    Channel,
    ChannelClosed,
    accept_channel,
    check_peer_timeout,
    keep_alive,
)
from tender_service.transports.frames import Frame, ProtocolError
from tender_service.transports.fs_host import FsHost
from tender_service.transports.listeners import Connection, ListenerBroker
from tender_service.transports.pipe_ring import (
    HELLO_RINGS_KEY,
    HELLO_WAKERS_KEY,
    IDLE_RINGS,
    WAKE_KEY,
    PipeRing,
    Wakers,
    new_token,
    wake_pipe,
)
from tender_service.transports.protocol import (
    END_READ,
    FILES,
    NONBLOCK,
    PIPE_REFS,
    SIGNAL_INFO,
    SIGPIPE_FLAG,
    Msg,
    pack_files,
    unpack_files,
)
from tender_service.transports.shm_names import sweep_stale

log = logging.getLogger(__name__)

#: requests a VM's thread waits on, and the method that takes each
_REQUESTS: dict[int, str] = {
    Msg.PIPE_READ: "_pipe_read",
    Msg.PIPE_WRITE: "_pipe_write",
    Msg.STDIN_READ: "_stdin_read",
    Msg.ACCEPT: "_accept",
    Msg.CONNECT: "_connect_out",
}

INIT_PID = 1
MAIN_PID = 2
#: seconds the launcher's thread waits at a time for the instance's end (see ``wait``)
WAIT_SLICE = 0.5
#: file kinds every VM has of its own (nothing in the supervisor to hold)
_LOCAL_KINDS = {"console", "null", "zero", "urandom"}
_DATA_OPS = {
    "pipe_create",
    "pipe_refs_many",
    "fs",
    "fs_raw",
    "fs_write",
    "proc_comm",
    "listen_connect",
}
#: places tried for a VM; each try is another place (a dead one is marked down), so no
#: backoff: waiting would only delay the launch
PLACEMENT_TRIES = 3
#: seconds a VM's own time limit lies behind the instance's (the supervisor's comes first)
VM_GRACE = 2.0
#: seconds a VM started on a tender process has to say hello over its channel (the
#: worker dials and, for shm, makes its rings after StartVm has answered): then it
#: counts as lost, as a VM whose tender died (above the worker's own dial and hello
#: timeouts, with room for a loaded host)
HELLO_DEADLINE = 30.0
#: the most ring fds and other VMs' wake-up pipes a VM gets with the hello (the
#: rest it asks for when it first needs them)
HELLO_RINGS = HELLO_WAKERS = 64
#: messages that may wake a VM that said it was idle
_WAKING = {
    Msg.PIPE_DATA,
    Msg.PIPE_WROTE,
    Msg.CHILD_EXIT,
    Msg.SIGNAL,
    Msg.REPARENT,
    Msg.CHILD_STATE,
    Msg.POLL_WAKE,
}


@dataclass(eq=False)
class ProcRec:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str = "starting"  # starting | running | zombie | reaped
    status: int = 0
    report: str = ""
    channel: Channel | None = None
    host: str = "local"
    host_pid: int = 0
    # the handle of the tender process running the VM: a warm-pool worker or a peer
    # tender's handle, used by what they share (remote, address, on_failure)
    worker: Any = None
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    connected: threading.Event = field(default_factory=threading.Event)
    #: its VM was handed to a tender process, which answered: what is sent to it waits
    #: in ``backlog`` until its hello (a kill right after fork is not lost), and it
    #: must say hello before ``hello_by`` (monotonic) or it counts as lost
    launched: bool = False
    backlog: list[Frame] = field(default_factory=list)
    hello_by: float = 0.0
    #: messages sent that could wake the VM, and how many it had handled when it
    #: last said it was idle (-1: busy since)
    events_sent: int = 0
    idle_at: int = -1
    idle_report: str = ""
    #: the ring pipes its threads waited on when it said it was idle, with the epoch
    #: of each wait (see ``_ring_stuck``)
    idle_rings: list[tuple[int, int]] = field(default_factory=list)
    peak_memory: int = 0
    #: bytes of the tender's guest-memory budget this VM holds (its RAM, if it runs here)
    reserved: int = 0
    #: the VM (its first process's pid) that leased this pid: a clone(CLONE_VM) child runs
    #: there until it execs, and that VM speaks for it (0: the instance's first process)
    leased_by: int = 0
    #: the process ended but its VM still runs clone(CLONE_VM) children of it that have not
    #: exec'd (one may have killed it): the VM's messages are served until it ends, and
    #: what the VM holds (pipe ends, files, memory) is given back only then
    hosting: bool = False
    #: the program's name (/proc/PID/stat's comm): argv[0]'s at start, the parent's at
    #: fork, the new program's at exec (the VM tells)
    comm: str = ""
    exe: str = ""  # its /proc/PID/exe

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "running")


class Supervisor:
    """One VM-clone instance.  ``start()``, then ``wait()``, then ``close()``."""

    def __init__(
        self,
        pool,
        transport: str,
        sink: Callable[[int, int, bytes], None],
        config: VmConfig,
        instance_id: str | None = None,
        listen_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        placement: str = "local",
        observer: object | None = None,
        self_handle: object | None = None,
        peer_timeout: float = PEER_TIMEOUT,
        budget: MemoryBudget | None = None,
        ticket_for: Callable[[str, int, str], str] | None = None,
        stdin: int | bytes | None = None,
        hello_deadline: float = HELLO_DEADLINE,
        publisher: Publisher | None = None,
        deny_outbound: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        if transport not in ("tcp", "shm"):
            raise ValueError("transport must be tcp or shm")
        self.pool = pool
        self.transport = transport
        self.sink = sink
        self.config = config
        self.id = instance_id or uuid.uuid4().hex[:12]
        self.placement = placement
        #: pipes shared by this instance's VMs are rings they read and write directly
        #: (transports/pipe_ring.py): shared memory, so only when every VM is on this host
        self.rings = transport == "shm" and placement == "local"
        #: the wake-up pipes of this instance's VMs, by token (each VM gets its own
        #: with the supervisor's hello, any other on asking: ``wake_fd``)
        self.wakers = Wakers()
        if transport == "shm":  # what killed tenders and runs left there
            sweep_stale()
        #: seconds a VM's TCP connection may stay silent before the VM counts as lost
        #: (both ends of the connection use it: the VM's tender gets it in vm_start)
        self.peer_timeout = check_peer_timeout(peer_timeout)
        #: seconds a started VM has to say hello (HELLO_DEADLINE)
        self.hello_deadline = hello_deadline
        #: this tender as a place for VMs, reachable from other hosts (its Peer service);
        #: used when a VM on another host forks a child that placement keeps here
        self.self_handle = self_handle
        #: (instance, pid, tender address) -> a single-use ticket a VM's clone carries to a
        #: peer tender instead of the peer credential (VM processes hold no secret)
        self.ticket_for = ticket_for
        #: metrics: any subset of InstanceObserver's methods (instance/observer.py)
        self.observer = observer
        # every brokered write reports: look the method up once, not per write
        self._on_pipe_write = getattr(observer, "pipe_write", None)
        #: the tender's guest RAM (--max-guest-memory): each VM on this tender holds its RAM
        self.budget = budget
        self._memory_refused = False
        self.token = uuid.uuid4().hex
        self.broker = PipeBroker(
            discard=lambda states: self._release_files(IN_FLIGHT_HOLDER, states),
            # a ring's writes pass no supervisor: its bytes are counted when it goes
            ring_done=lambda nbytes: notify(observer, "pipe_bytes", nbytes),
        )
        #: every TCP listener of the instance's VMs (their queues: transports/listeners.py)
        self.listen_broker = ListenerBroker(self.broker)
        #: ``--publish``/``--allow-outbound``: the host side, served into the brokers
        self.publisher = publisher
        self.ports: ClonePorts | None = None
        #: the instance's one file system, which every VM's kernel calls (issue 14)
        self.fs = FsHost(FileSystem(None, config.tmpfs_size))
        self.procs: dict[int, ProcRec] = {}
        self.lock = threading.RLock()
        self._hello_watch = threading.Condition(self.lock)  # see _watch_hellos
        self._watching = False
        #: fd 0 of every VM (the launcher's stdin; None: EOF)
        self.stdin = StdinServer(stdin, self.lock)
        self.done = threading.Event()
        self.reports: list[str] = []
        self.forks = 0
        self.fork_seconds: list[float] = []
        #: each fork's steps (FORK_PHASES) by child pid, and the restores the children's
        #: VMs reported (``vm_restored``, either may come first): merged in ``result``
        self.fork_phases: dict[int, dict[str, float]] = {}
        self._restored: dict[int, float] = {}
        self._next_pid = MAIN_PID
        #: the console as the controlling terminal of init's session (thread fork's
        #: kernel keeps the same record: Kernel.terminal)
        self.terminal = pgroups.Terminal(INIT_PID, INIT_PID) if config.tty else pgroups.Terminal()
        #: init as the process-group rules see it (it has no VM, so no entry in procs)
        self._init_rec = ProcRec(INIT_PID, 0, INIT_PID, INIT_PID, state="running")
        self._outcome: str | None = None
        self.transport_note = ""
        self._console_lock = threading.Lock()
        #: the threads running now (each takes itself out when it ends: an instance
        #: that runs thousands of processes does not keep a Thread per ended VM)
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._tmp = tempfile.mkdtemp(prefix=f"unifork-{self.id}-")
        # local VMs reach us over a Unix socket (shm) or loopback TCP; VMs on other hosts
        # over TCP at the address this host advertises
        path = os.path.join(self._tmp, "supervisor.sock")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(path)
        unix.listen(128)
        tcp = socket.create_server((listen_host, 0))
        port = tcp.getsockname()[1]
        self._listeners = [unix, tcp]
        self.unix_address = f"unix:{path}"
        self.tcp_address = f"tcp:{advertise_host or listen_host}:{port}"
        self.address = self.unix_address if transport == "shm" else self.tcp_address
        for listener in self._listeners:
            self._spawn(self._accept_loop, "accept", listener)
        if publisher is not None:
            # never out to the instance's own host ports, ours, nor the tender's
            mine = {("127.0.0.1", port), (listen_host, port)}
            self.ports = ClonePorts(
                self.broker, self.listen_broker, publisher, publisher.guest_ports, observer,
                publisher.outbound, publisher.own_addresses() | deny_outbound | mine,
            )  # fmt: skip
            publisher.serve(self._deliver_host_event)
        self.t0 = time.monotonic()

    # -- lifecycle -----------------------------------------------------------------------
    def start(
        self,
        image_path: str,
        args: list[str],
        env: list[str],
        argv0: str,
        reserved: int = 0,
        rootfs: RootFs | None = None,
    ) -> None:
        """Boot the launched program as pid 2 on a tender process of the pool.

        ``reserved``: bytes of the budget the caller already took for this first VM
        (a launch is refused up front when they are not there); the supervisor owns
        them from now on and gives them back when the VM ends, or runs elsewhere.
        The image travels as bytes with their SHA-256 (the receiver checks them):
        no process that runs VMs opens a file a request names.
        """
        if rootfs is not None:  # a baked image: its tree is the file system's lower layer
            self.fs = FsHost(FileSystem(rootfs, self.config.tmpfs_size))
        # in init's group and session, as in a thread-fork VM (rump.kernel._spawn_main)
        rec = self._new_proc(MAIN_PID, INIT_PID, INIT_PID, INIT_PID)
        rec.reserved = reserved
        rec.comm = argv0.rsplit("/", 1)[-1][:15]
        rec.exe = argv0 if argv0.startswith("/") else "/" + argv0.rsplit("/", 1)[-1]
        image = Path(image_path).read_bytes()
        digest = hashlib.sha256(image).hexdigest()
        error: Exception | None = None
        for _ in range(PLACEMENT_TRIES):  # a peer that just died is marked down: try another
            worker = self.pool.acquire()
            rec.worker, rec.host_pid = worker, worker.pid
            rec.host = getattr(worker, "host", "local")
            remote = bool(getattr(worker, "remote", False))
            try:
                self._hold_memory(rec, remote)
            except OverflowError as e:
                error = e
                break
            if remote and self.transport == "shm":
                self.transport_note = "shm requested, tcp used for VMs on other hosts"
            start = self.vm_start(
                MAIN_PID, remote=remote, image_sha256=digest, args=args, env=env, argv0=argv0
            )
            try:
                worker.start_vm(start, None, image)
            except Exception as e:
                # the VM may have said hello (and its process died) before the answer
                # came: it started, its channel reports the rest; no second VM for pid 2
                with self.lock:
                    reached = rec.channel is not None or rec.state != "starting"
                if reached:
                    log.warning("instance %s: pid %d started, then its start failed: %s",
                                self.id, MAIN_PID, e)  # fmt: skip
                    return
                error = e
                continue
            self._launched(rec)
            return
        self._ended(
            rec, signals.signaled_status(signals.SIGKILL), f"pid 2: could not start: {error}"
        )
        raise RuntimeError(f"could not start the first VM: {error}")

    def vm_start(self, pid: int, remote: bool = False, **boot) -> dict:
        """The start header of a VM of this instance (see proto/unifork/v1/peer.proto).

        A VM on another host talks to us over TCP whatever was asked: shared
        memory does not cross hosts.
        """
        left = None
        if self.config.timeout:  # the VM's own limit is a safety net behind ours
            left = max(0.001, self.config.timeout - (time.monotonic() - self.t0)) + VM_GRACE
        transport = "tcp" if remote else self.transport
        address = self.tcp_address if transport == "tcp" else self.unix_address
        return dict(
            instance_id=self.id,
            pid=pid,
            supervisor=address,
            transport=transport,
            instance_token=self.token,
            timeout_seconds=left or 0.0,
            ram_bytes=self.config.ram,
            stack_bytes=self.config.stack_size,
            quantum=self.config.quantum,
            max_procs=self.config.max_procs,
            tty=self.config.tty,
            peer_timeout_seconds=self.peer_timeout,
            **boot,
        )

    def wait(self) -> RunResult:
        deadline = None if self.config.timeout is None else self.t0 + self.config.timeout
        # in short waits: a ^C the kernel gave another of our threads is only seen when
        # the main thread runs Python again (a long Event.wait would hide it)
        while not self.done.wait(
            WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
        ):
            if deadline is not None and time.monotonic() >= deadline:
                self.kill("timeout")
                self.done.wait(10)
                break
        main = self.procs.get(MAIN_PID)
        status = main.status if main else signals.signaled_status(signals.SIGKILL)
        outcome = self._outcome or ("exited" if status & 0x7F == 0 else "signaled")
        return RunResult(
            status=status,
            outcome=outcome,
            reports=list(self.reports),
            elapsed=time.monotonic() - self.t0,
            forks=self.forks,
            syscalls=None,
            peak_memory=sum(r.peak_memory for r in self.procs.values()),
            processes=self.process_table(),
            fork_seconds=list(self.fork_seconds),
            fork_phases=[
                {**steps, "restore": self._restored.get(pid, steps["restore"])}
                for pid, steps in self.fork_phases.items()
            ],
        )

    def kill(self, reason: str = "killed") -> None:
        """End every VM of the instance (SIGKILL to each guest process and its tender)."""
        with self.lock:  # all kills queued before anything else a VM could react to
            if self._outcome is None:
                self._outcome = reason
                if reason == "timeout":
                    self.reports.append(
                        f"time limit of {self.config.timeout:g} s exceeded: all processes killed"
                    )
            for r in self.procs.values():
                if r.alive:
                    self._signal(r, signals.SIGKILL)

    def close(self) -> None:
        """Release everything: listener, channels, tender processes, temp files."""
        if self._closed:
            return
        self._closed = True
        with self.lock:
            self._hello_watch.notify_all()
        if not self.done.is_set():
            self.kill("killed")
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            with contextlib.suppress(OSError):
                listener.close()
        if self.publisher is not None:
            self.publisher.close()  # its host connections and ports
        with self.lock:
            recs = list(self.procs.values())
        for r in recs:
            self._free_memory(r)
            if r.channel is not None:
                r.channel.close()
        for t in list(self._threads):
            t.join(5)
        with self.lock:
            self.broker.close_rings()
        self.wakers.close()
        self.stdin.close()
        try:
            for name in os.listdir(self._tmp):
                os.unlink(os.path.join(self._tmp, name))
            os.rmdir(self._tmp)
        except OSError:
            pass

    # -- process records ------------------------------------------------------------
    def _new_proc(self, pid: int, ppid: int, pgid: int, sid: int) -> ProcRec:
        rec = ProcRec(pid, ppid, pgid, sid)
        with self.lock:
            self.procs[pid] = rec
            self._next_pid = max(self._next_pid, pid + 1)
        return rec

    def process_table(self) -> list[ProcInfo]:
        with self.lock:
            running = any(r.alive for r in self.procs.values())
            rows = [
                ProcInfo(
                    INIT_PID,
                    0,
                    "init",
                    "alive" if running else "reaped",
                    None if running else 0,
                    "",
                )
            ]
            for r in sorted(self.procs.values(), key=lambda r: r.pid):
                state = {"starting": "alive", "running": "alive"}.get(r.state, r.state)
                rows.append(
                    ProcInfo(
                        r.pid,
                        r.ppid,
                        f"vm@{r.host}/{r.host_pid}",
                        state,
                        None if r.alive else r.status,
                        r.report,
                    )
                )
        return rows

    def _hold_memory(self, rec: ProcRec, remote: bool) -> None:
        """Hold ``rec``'s RAM in the budget iff its VM runs on this tender.

        OverflowError (naming the limit) when the budget cannot take it.
        """
        if self.budget is None:
            return
        want = 0 if remote else self.config.ram
        with self.lock:
            if want > rec.reserved:
                self.budget.reserve(want - rec.reserved)
            elif want < rec.reserved:
                self.budget.release(rec.reserved - want)
            rec.reserved = want

    def _free_memory(self, rec: ProcRec) -> None:
        with self.lock:
            held, rec.reserved = rec.reserved, 0
        if held and self.budget is not None:
            self.budget.release(held)

    def _refuse_fork(
        self, rec: ProcRec, child: ProcRec, why: OverflowError, forget: bool = True
    ) -> tuple[int, bytes]:
        """A fork past the tender's guest-memory limit: ENOMEM to the guest, as Linux
        says when it cannot commit the memory of a child; one report per instance."""
        self._free_memory(child)
        if forget:  # else the VM's fork_failed forgets it
            self.procs.pop(child.pid, None)
        if not self._memory_refused:
            self._memory_refused = True
            self.reports.append(f"pid {rec.pid}: fork refused (ENOMEM): {why}")
        log.warning("instance %s: pid %d: fork refused: %s", self.id, rec.pid, why)
        return -errno.ENOMEM, b""

    def _live_count(self) -> int:
        return sum(1 for r in self.procs.values() if r.state != "reaped") + 1  # + init

    # -- connections ------------------------------------------------------------------
    def _launched(self, rec: ProcRec) -> None:
        """``rec``'s VM was handed to a tender process that answered before its VM said
        hello (it dials us after answering): hold its messages, and watch the time."""
        with self.lock:
            if rec.state != "starting" or rec.channel is not None:
                return
            rec.launched = True
            rec.hello_by = time.monotonic() + self.hello_deadline
            if not self._watching:
                self._watching = True
                self._spawn(self._watch_hellos, "hellos")
            self._hello_watch.notify()

    def _watch_hellos(self) -> None:
        """Report lost each launched VM that did not say hello in time: its pid ends as
        killed by SIGKILL (its parent's wait sees it), what it held is given back."""
        with self.lock:
            while not self._closed and not self.done.is_set():
                now = time.monotonic()
                waiting = [r for r in self.procs.values() if r.launched and r.state == "starting"]
                for r in waiting:
                    if r.channel is None and r.hello_by <= now:
                        self._hello_missed(r)
                left = [r.hello_by - now for r in waiting if r.state == "starting"]
                self._hello_watch.wait(min(left) if left else None)
            self._watching = False

    def _hello_missed(self, rec: ProcRec) -> None:
        log.warning(
            "instance %s: pid %d's VM never connected (%g s): killed by SIGKILL",
            self.id,
            rec.pid,
            self.hello_deadline,
        )
        rec.backlog.clear()
        self._ended(
            rec,
            signals.signaled_status(signals.SIGKILL),
            f"pid {rec.pid}: its VM was lost (it never connected to the supervisor "
            f"within {self.hello_deadline:g} s of its start)",
        )

    def _spawn(self, fn, name: str, *args) -> None:
        def run() -> None:
            try:
                fn(*args)
            finally:
                self._threads.discard(t)

        t = threading.Thread(target=run, name=f"sup-{self.id}-{name}", daemon=True)
        self._threads.add(t)
        t.start()

    @property
    def threads(self) -> int:
        """Threads of this supervisor still running (accept loops, one per live VM)."""
        return len(self._threads)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            try:
                keep_alive(sock, self.peer_timeout)
            except OSError:  # the connection is already gone
                sock.close()
                continue
            self._spawn(self._serve, "conn", sock)

    def _member(self, hello: dict) -> bool:
        """A hello from one of this instance's VMs: the instance token and an int pid."""
        token = hello.get("token")
        if not (
            isinstance(token, str)
            and type(hello.get("pid")) is int
            and hmac.compare_digest(token.encode(errors="replace"), self.token.encode())
        ):
            return False
        with self.lock:  # not one reported lost meanwhile (its shm is never mapped)
            rec = self.procs.get(hello["pid"])
            return rec is not None and rec.state == "starting" and rec.channel is None

    def _shm_fell_back(self, pid: int, reason: str) -> None:
        """No segment could be made for a VM's shm channel, which is tcp instead:
        say so, count it."""
        log.warning("instance %s: pid %d uses tcp, not shm: %s", self.id, pid, reason)
        self.transport_note = f"shm requested, tcp used for some VMs: {reason}"
        notify(self.observer, "shm_exhausted")

    def _serve(self, sock: socket.socket) -> None:
        reply: dict[str, Any] = {}
        token, fds = 0, []
        if self.rings:  # the VM's wake-up pipe, which it cannot make (its jail); known
            # before the VM has it, so that no other VM asks for it in vain
            token, wake = new_token(), wake_pipe()
            self.wakers.add(token, wake)
            reply[WAKE_KEY], fds = token, [wake]
        given: list[int] = []  # what admit adds to the answer's fds (ours to close)

        def admit(hello: dict) -> bool:
            if not self._member(hello):
                return False
            if self.rings:
                given.extend(self._hello_fds(hello["pid"], token, reply))
                fds.extend(given)
            return True

        try:  # a stranger gets no answer at all (and no shm segment is made for it)
            channel, hello = accept_channel(sock, reply, admit=admit, fds=fds)
        except (ProtocolError, ChannelClosed, OSError, ValueError) as e:
            log.warning("instance %s: refused a connection: %s", self.id, e)
            sock.close()
            self.wakers.remove(token)
            return
        finally:
            for fd in given:
                os.close(fd)
        try:
            self._serve_vm(channel, hello)
        finally:
            self.wakers.remove(token)

    def _hello_fds(self, pid: int, token: int, reply: dict[str, Any]) -> list[int]:
        """New fds of the rings ``pid`` holds ends of (a fork's child: its parent gave
        them) and of the other VMs' wake-up pipes, for its hello: without them its
        first touch of each would be a round trip (``ring_fd``, ``wake_fd``).  Their
        pipe ids and tokens go into ``reply``, in the order of the fds."""
        with self.lock:
            rings = self.broker.rings_held(pid)[:HELLO_RINGS]
        wakers = self.wakers.dup_some(HELLO_WAKERS, but=token)
        reply[HELLO_RINGS_KEY] = [pipe for pipe, _ in rings]
        reply[HELLO_WAKERS_KEY] = [t for t, _ in wakers]
        return [ring.reopen() for _, ring in rings] + [fd for _, fd in wakers]

    def _serve_vm(self, channel: Channel, hello: dict) -> None:
        pid = hello["pid"]
        with self.lock:
            rec = self.procs.get(pid)
            if rec is None or rec.channel is not None or rec.state != "starting":
                log.warning("instance %s: refused a connection claiming pid %.20r", self.id, pid)
                channel.close()
                return
            host_pid = hello.get("host_pid")
            if channel.fallback:
                self._shm_fell_back(pid, channel.fallback)
            rec.channel, rec.state = channel, "running"
            rec.host_pid = host_pid if type(host_pid) is int else rec.host_pid
            rec.host = str(hello.get("host") or rec.host)[:256]
            rec.connected.set()
            backlog, rec.backlog = rec.backlog, []
            for frame in backlog:  # what was sent to it before its hello, in order
                self._send(rec, frame)
            if self._outcome is not None:  # killed while this VM was starting
                self._send(rec, Frame(Msg.SIGNAL, 0, 0, 0, signals.SIGKILL, b""))
        try:
            while True:
                f = channel.recv()
                if f is not None:
                    self._handle(rec, f)
        except (ChannelClosed, ProtocolError, OSError) as e:
            self._lost(
                rec,
                f"its VM was lost (its tender process died, or its host was silent "
                f"for {self.peer_timeout:g} s): {e}",
            )
        except Exception as e:  # a defect of ours: the process ends, the instance goes on
            log.exception("instance %s: serving pid %d failed", self.id, pid)
            self._lost(rec, f"the supervisor failed serving it: {type(e).__name__}: {e}")
        finally:
            channel.close()

    def _lost(self, rec: ProcRec, why: str) -> None:
        """``rec``'s channel is gone: its VM no longer counts, and its process (if it
        has not ended) is killed by SIGKILL, so that its parent and the run go on."""
        if rec.hosting:
            self._vm_ended(rec)
        if rec.alive:
            log.warning("instance %s: pid %d: %s: killed by SIGKILL", self.id, rec.pid, why)
            self._ended(rec, signals.signaled_status(signals.SIGKILL), f"pid {rec.pid}: {why}")

    def _signal(self, rec: ProcRec, sig: int, sender: int = 0, info: bytes = b"") -> None:
        """Send ``sig`` (from pid ``sender``, 0: the kernel) to ``rec``'s VM; a process
        with no VM of its own yet may be a clone(CLONE_VM) child running in the VM that
        leased its pid (until it execs): that VM gets it, naming the pid in ``req`` (a
        fork's child not yet started drops it there)."""
        host = None
        if rec.channel is None and not rec.launched:
            host = self.procs.get(rec.leased_by)
        if host is not None and host.channel is not None:
            self._send(host, Frame(Msg.SIGNAL, 0, rec.pid, sender, sig, info))
        else:
            self._send(rec, Frame(Msg.SIGNAL, 0, 0, sender, sig, info))

    def _send(self, rec: ProcRec, frame: Frame, fd: int | None = None) -> None:
        """``frame`` (with ``fd``: an answer to its running VM) to ``rec``'s VM."""
        ch = rec.channel
        if frame.type in _WAKING:
            rec.events_sent += 1
        if ch is None:
            with self.lock:  # its hello (which flushes the backlog) takes the lock too
                ch = rec.channel
                if ch is None:
                    if rec.launched and rec.state == "starting":
                        rec.backlog.append(frame)  # for its hello
                    return
        with contextlib.suppress(ChannelClosed, OSError):
            ch.send(frame, fd)

    # -- messages ---------------------------------------------------------------------
    def _console(self, rec: ProcRec, f: Frame) -> None:
        with self._console_lock:
            try:
                self.sink(f.arg, f.pipe, f.payload)
            except BrokenPipeError:  # `unifork run prog | head`: SIGPIPE, as natively
                self._send(rec, Frame(Msg.SIGNAL, 0, 0, 0, signals.SIGPIPE, b""))

    def _handle(self, rec: ProcRec, f: Frame) -> None:
        t = f.type
        if t == Msg.CONSOLE:
            self._console(rec, f)
            return
        with self.lock:
            if not rec.alive and not rec.hosting:
                return  # what a VM sends after its EXITED (its fds closing) is moot
            if t == Msg.IDLE:
                rec.idle_at = f.arg
                rec.idle_rings, rec.idle_report = _idle_rings(f.payload.decode(errors="replace"))
                self._check_deadlock()
                return
            rec.idle_at = -1
            request = _REQUESTS.get(t)
            if request is not None:  # answered when it can be (PIPE_READ, ACCEPT, ...)
                getattr(self, request)(rec, f)
            elif t == Msg.PIPE_CLOSE:
                self.broker.close(f.pipe, rec.pid, "r" if f.arg == END_READ else "w")
            elif t == Msg.CALL:
                value, payload, fd = self._answer(rec, f.payload)
                try:
                    self._send(rec, Frame(Msg.RESULT, 0, f.req, 0, value, payload), fd)
                finally:
                    if fd is not None:
                        os.close(fd)
            elif t == Msg.EXITED:
                self._exited(rec, f)
            elif t == Msg.REAPED:
                child = self.procs.get(f.arg)
                if child is not None and child.ppid == rec.pid and child.state == "zombie":
                    child.state = "reaped"
                self._check_done()
            else:
                log.warning("instance %s: unexpected message %d from pid %d", self.id, t, rec.pid)

    def _pipe_read(self, rec: ProcRec, f: Frame) -> None:
        """A VM reads a brokered pipe: the data (or -errno) goes back when there is some,
        with the files it carries (their refs become the reader's)."""
        room = int.from_bytes(f.payload, "little") if len(f.payload) == 8 else None

        def read(res: bytes | int, states: list[dict] | None = None, req: int = f.req) -> None:
            if states is None or isinstance(res, int):
                self._send(rec, _data_frame(req, res))
                return
            if not self._hold_files(IN_FLIGHT_HOLDER, rec.pid, states):  # cannot fail: held
                log.warning("instance %s: files in flight lost their refs", self.id)
            self._release_files(IN_FLIGHT_HOLDER, states)
            self._send(rec, Frame(Msg.PIPE_DATA, FILES, req, 0, 0, pack_files(states, res)))

        self.broker.read(f.pipe, rec.pid, f.arg, bool(f.flags & NONBLOCK), read, room)

    def _stdin_read(self, rec: ProcRec, f: Frame) -> None:
        """A VM reads its console's fd 0: the instance's stdin, when there is some."""

        def read(res: bytes | int, req: int = f.req) -> None:
            self._send(rec, _data_frame(req, res))

        self.stdin.read(rec.pid, f.arg, bool(f.flags & NONBLOCK), read)

    def _op_stdin_isatty(self, rec: ProcRec) -> int:
        return int(self.stdin.tty)

    def _pipe_write(self, rec: ProcRec, f: Frame) -> None:
        """A VM writes a brokered pipe: the count (and SIGPIPE) goes back once written.

        Files (SCM_RIGHTS on a socket across VMs) ride on the write's first byte:
        the pipe holds refs of them (``IN_FLIGHT_HOLDER``) from now until a reader gets
        them or nobody can; the writer's own refs are its to close."""
        t0 = time.perf_counter()
        data, states = f.payload, None
        if f.flags & FILES:
            try:
                states, data = unpack_files(f.payload)
            except ValueError:
                self._send(rec, Frame(Msg.PIPE_WROTE, 0, f.req, 0, -errno.EINVAL, b""))
                return
            if not self._hold_files(rec.pid, IN_FLIGHT_HOLDER, states):
                self._send(rec, Frame(Msg.PIPE_WROTE, 0, f.req, 0, -errno.EBADF, b""))
                return

        def wrote(n: int, sig: bool, req: int = f.req) -> None:
            if states is not None and n <= 0:  # not in the pipe: the refs go back
                self._release_files(IN_FLIGHT_HOLDER, states)
            if n > 0 and self._on_pipe_write is not None:
                self._on_pipe_write(n, time.perf_counter() - t0)
            self._send(rec, Frame(Msg.PIPE_WROTE, SIGPIPE_FLAG if sig else 0, req, 0, n, b""))

        self.broker.write(f.pipe, rec.pid, data, bool(f.flags & NONBLOCK), wrote, states)

    # -- files in flight (SCM_RIGHTS across VMs) -----------------------------------------
    def _hold_files(self, src: int, dst: int, states: list[dict]) -> bool:
        """Give ``dst`` one ref of each file ``states`` describes, each of which
        ``src`` must hold (else nothing is taken: False).  Holders are VM pids and
        ``IN_FLIGHT_HOLDER``; unlike ``_op_pipe_refs_many`` and its kind, this serves no VM's
        request for another pid, so the fork checks do not apply."""
        taken: list[dict] = []
        for st in states:
            if not self._hold_file(src, dst, st):
                self._release_files(dst, taken)
                return False
            taken.append(st)
        return True

    def _hold_file(self, src: int, dst: int, st: dict) -> bool:
        try:
            kind = st.get("kind")
            if kind in _LOCAL_KINDS:
                return True
            if kind == "fsfile":
                return self.fs.hold(src, int(st["ofd"]), dst) == 0
            if kind == "inet_listener":
                lid = int(st["lid"])
                if not self.listen_broker.holds(lid, src):
                    return False
                self.listen_broker.add_ref(lid, dst)
                return True
            ends = _pipe_ends(st)
            if ends is None or not all(self.broker.holds(p, src, e) for p, e in ends):
                return False
            for p, e in ends:
                self.broker.add_refs(p, dst, int(e == "r"), int(e == "w"))
            return True
        except (KeyError, TypeError, ValueError):
            return False

    def _release_files(self, holder: int, states: list[dict]) -> None:
        """Give back ``holder``'s ref of each file ``states`` describes."""
        for st in states:
            kind = st.get("kind")
            if kind == "fsfile":
                self.fs.release(holder, int(st["ofd"]))
            elif kind == "inet_listener":
                self.listen_broker.close(int(st["lid"]), holder)
            else:
                for p, e in _pipe_ends(st) or []:
                    self.broker.close(p, holder, e)

    # -- shared listeners ----------------------------------------------------------------
    def _deliver_host_event(self, fn: Callable[..., None]) -> None:
        """The Publisher's events, on its thread: under our lock, into the brokers."""
        with self.lock:
            if self.ports is not None and not self._closed:
                fn(None, self.ports)

    def _accept(self, rec: ProcRec, f: Frame) -> None:
        """A VM accepts on a shared listener: the next connection when there is one."""

        def accepted(res: Connection | int, req: int = f.req) -> None:
            if isinstance(res, int):
                self._send(rec, _data_frame(req, res))
            else:
                notify(self.observer, "conn_accepted", time.monotonic() - res.queued)
                info = {"rx": res.rx, "tx": res.tx, "peer": list(res.peer)}
                self._send(rec, _data_frame(req, json.dumps(info).encode()))

        self.listen_broker.accept(f.pipe, rec.pid, bool(f.flags & NONBLOCK), accepted)

    def _connect_out(self, rec: ProcRec, f: Frame) -> None:
        """A VM connects out of the instance (``unifork run --allow-outbound``)."""

        def done(res: dict | int, req: int = f.req) -> None:
            if isinstance(res, int):
                self._send(rec, _data_frame(req, res))
            else:
                self._send(rec, _data_frame(req, json.dumps(res).encode()))

        try:
            want = json.loads(f.payload)
            ip, port = ipaddress.ip_address(str(want["ip"])).packed, int(want["port"])
        except (ValueError, KeyError, TypeError):
            done(-errno.EINVAL)
            return
        if self.ports is None or not 0 < port < 65536:
            done(-errno.ENETUNREACH)  # nothing leaves an instance without an allow-list
            return
        self.ports.dial(rec.pid, ip, port, done)

    def _op_listen(self, rec: ProcRec, family: int, port: int) -> int:
        """A VM listens: the listener is the instance's at once, so that any VM may
        connect to it (and the host, if its port is published); its id."""
        return self.listen_broker.create(rec.pid, family, port)

    def _op_listen_refs(self, rec: ProcRec, lid: int, holder: int) -> int:
        """A child this VM is forking (or that execs) holds a listener this VM holds."""
        target = self.procs.get(holder)
        if target is None or target.leased_by != rec.pid:
            return -errno.ESRCH
        if not self.listen_broker.holds(lid, rec.pid):
            return -errno.EBADF  # none of its own, or another VM's
        self.listen_broker.add_ref(lid, holder)
        return 0

    def _op_listen_poll(self, rec: ProcRec, lid: int, watch: int = 0) -> int:
        """A shared listener's events; with ``watch``, its next connection wakes the
        VM's pollers (POLL_WAKE)."""
        try:
            return self.listen_broker.poll(lid, (rec.pid, self._poll_waker(rec)) if watch else None)
        except ValueError:
            return -errno.EBADF

    def _poll_waker(self, rec: ProcRec) -> Callable[[], None]:
        """What tells ``rec``'s VM that a pipe or listener it polled changed."""
        return lambda: self._send(rec, Frame(Msg.POLL_WAKE, 0, 0, 0, 0, b""))

    def _op_listen_close(self, rec: ProcRec, lid: int) -> int:
        self.listen_broker.close(lid, rec.pid)
        return 0

    def _op_listen_connect(
        self, rec: ProcRec, lid: int, family: int, port: int, client_port: int, data: bytes
    ) -> tuple[int, bytes]:
        """A process connects to shared listener ``lid`` (0: the one on ``port``);
        ``data`` is its IP as text.  The client's ends (``rx`` read, ``tx`` written)."""
        if not lid:
            lid = self.listen_broker.for_port(port, family) or 0
        peer = (data.decode(errors="replace"), client_port)
        conn = self.listen_broker.connect(lid, rec.pid, peer)
        if conn is None:
            return -errno.ECONNREFUSED, b""
        return 0, json.dumps({"rx": conn.tx, "tx": conn.rx}).encode()

    def _exited(self, rec: ProcRec, f: Frame) -> None:
        """A VM's process ended: its status, peak memory and report (if it sent them)."""
        report = ""
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            info = json.loads(f.payload)
            rec.peak_memory = int(info.get("peak_memory", 0))
            report = str(info.get("report") or "")[:1000]
            rec.hosting = info.get("hosting") is True
        self._ended(rec, f.arg, report)

    def _call(self, rec: ProcRec, payload: bytes) -> tuple[int, bytes]:
        """A call's value and payload (what the tests ask; an fd it gives is closed)."""
        value, data, fd = self._answer(rec, payload)
        if fd is not None:
            os.close(fd)
        return value, data

    def _answer(self, rec: ProcRec, payload: bytes) -> tuple[int, bytes, int | None]:
        """A call's value, payload and the fd that goes with them, if any (the caller
        closes it once it is sent)."""
        try:
            head, _, data = payload.partition(b"\n")  # vmlink.call_payload: JSON, data
            req = json.loads(head)
            op, args = str(req["op"]), [int(a) for a in req["args"]]
            if "data" in req:  # the older form: base64 inside the JSON
                data = base64.b64decode(req["data"], validate=True)
        except (ValueError, KeyError, TypeError):
            return -errno.EINVAL, b"", None
        fn = getattr(self, f"_op_{op}", None)
        if fn is None:
            return -errno.ENOSYS, b"", None
        try:
            out = fn(rec, *args, data=data) if op in _DATA_OPS else fn(rec, *args)
        except (TypeError, ValueError, KeyError) as e:
            log.warning("instance %s: bad %s request from pid %d: %s", self.id, op, rec.pid, e)
            return -errno.EINVAL, b"", None
        if not isinstance(out, tuple):
            return out, b"", None
        if len(out) == 3:  # (value, payload, fd): an fd goes with a success only
            return out[0], out[1], out[2] if out[0] >= 0 else None
        return out[0], out[1], None

    def _op_fork_lease(self, rec: ProcRec) -> tuple[int, bytes]:
        if self._live_count() >= self.config.max_procs or self._outcome is not None:
            return -errno.EAGAIN, b""
        pid = self._next_pid
        child = self._new_proc(pid, rec.pid, rec.pgid, rec.sid)
        child.leased_by, child.comm, child.exe = rec.pid, rec.comm, rec.exe
        try:
            worker = self._place(rec)
        except Exception as e:
            log.warning("instance %s: no tender process for a child: %s", self.id, e)
            del self.procs[pid]
            return -errno.EAGAIN, b""
        child.worker, child.host_pid = worker, worker.pid
        remote = bool(getattr(worker, "remote", False))
        child.host = getattr(worker, "host", "local")
        try:
            self._hold_memory(child, remote)
        except OverflowError as e:
            return self._refuse_fork(rec, child, e)
        if remote and self.transport == "shm":
            self.transport_note = "shm requested, tcp used for VMs on other hosts"
        self.forks += 1
        return pid, self._lease(pid, worker)

    def _lease(self, pid: int, worker) -> bytes:
        """What a forking VM needs to start its child on ``worker``: the address, the
        start header and, for a tender (not a worker of this host), a ticket."""
        via_tender = not worker.address.startswith("unix:")  # a peer tender, or this one
        start = self.vm_start(pid, remote=via_tender)  # tenders take tcp supervisors only
        if via_tender and self.ticket_for is not None:
            start["ticket"] = self.ticket_for(self.id, pid, worker.address)
        return json.dumps({"worker": worker.address, "start": start}).encode()

    def _place(self, parent: ProcRec):
        """Where a child of ``parent`` runs.  The warm pool's Unix sockets exist on this
        host only: a parent on another host reaches this host through the tender."""
        worker = self.pool.acquire(avoid=parent.host_pid)
        if (
            getattr(parent.worker, "remote", False)
            and not getattr(worker, "remote", False)
            and self.self_handle is not None
        ):
            return self.self_handle
        return worker

    def _op_fork_relocate(self, rec: ProcRec, pid: int) -> tuple[int, bytes]:
        """The place chosen for a child did not answer: mark it down, choose again."""
        child = self.procs.get(pid)
        if child is None or child.state != "starting":
            return -errno.ESRCH, b""
        failed = getattr(child.worker, "on_failure", None)
        if failed is not None:
            failed(child.worker.address)
        try:
            worker = self._place(rec)
        except Exception:
            return -errno.EAGAIN, b""
        log.info(
            "instance %s: the clone of pid %d to %s failed: placed again on %s",
            self.id,
            pid,
            child.host,
            getattr(worker, "host", "local"),
        )
        remote = bool(getattr(worker, "remote", False))
        try:
            self._hold_memory(child, remote)
        except OverflowError as e:
            return self._refuse_fork(rec, child, e, forget=False)
        child.worker, child.host_pid = worker, worker.pid
        child.host = getattr(worker, "host", "local")
        if remote and self.transport == "shm":
            self.transport_note = "shm requested, tcp used for VMs on other hosts"
        return pid, self._lease(pid, worker)

    def _op_fork_failed(self, rec: ProcRec, pid: int) -> int:
        child = self.procs.pop(pid, None)
        if child is not None:
            self._free_memory(child)
            self.forks -= 1
        self.fs.drop_holder(pid)
        return 0

    def _op_vm_restored(self, rec: ProcRec, micros: int) -> int:
        """A fork's child VM was restored after its tender process answered the fork (the
        parent did not wait for it): the 'restore' step of that fork."""
        self._restored[rec.pid] = micros / 1e6
        return 0

    def _op_vm_unrestorable(self, rec: ProcRec) -> int:
        """A fork's child VM could not be restored after its tender process answered the
        fork (a snapshot that parses but does not hold together, no memory): the process
        is killed by SIGKILL now, as if its VM were lost (its channel closes next)."""
        self._lost(rec, "its VM could not be restored from its snapshot")
        return 0

    def _op_vm_child_exited(self, rec: ProcRec, pid: int, status: int, micros: int) -> int:
        """A clone(CLONE_VM) child of ``rec`` ended inside ``rec``'s VM without exec (the
        VM reaps it itself): it never needs its leased place, and was a process, made
        in ``micros`` (the lease)."""
        child = self.procs.get(pid)
        if child is None or child.leased_by != rec.pid or child.state != "starting":
            return -errno.ESRCH  # (its parent may have died: then it is init's)
        self._fork_took(micros)
        # refs its exec registered for a VM that never started (a failed start)
        self.broker.drop_holder(pid)
        child.state, child.status, child.ended = "reaped", status, time.monotonic()
        child.host, child.host_pid = rec.host, rec.host_pid
        self._free_memory(child)
        self._check_done()  # it may be the last: its parent (the VM's process) died first
        return 0

    def _fork_took(self, micros: int) -> bool:
        """Keep a fork's time in its parent's kernel; False past ``FORK_TIMES_KEPT``."""
        if len(self.fork_seconds) >= FORK_TIMES_KEPT:
            return False
        self.fork_seconds.append(micros / 1e6)
        return True

    def _op_fork_started(
        self, rec: ProcRec, pid: int, micros: int, snapshot: int = 0, *phases: int
    ) -> int:
        if self._fork_took(micros) and len(phases) == len(FORK_PHASES):
            self.fork_phases[pid] = {k: v / 1e6 for k, v in zip(FORK_PHASES, phases, strict=True)}
        child = self.procs.get(pid)
        if child is not None and child.leased_by == rec.pid:
            self._launched(child)
        remote = bool(child is not None and getattr(child.worker, "remote", False))
        notify(self.observer, "fork_done", micros / 1e6, snapshot, remote)
        return 0

    def _op_kill(
        self, rec: ProcRec, pid: int, sig: int, code: int = signals.SI_USER, value: int = 0
    ) -> int:
        """kill, tkill and sigqueue to processes of other VMs; the target's siginfo says
        who sent it (si_pid) and, for sigqueue, its si_code and si_value."""
        if not 0 <= sig < signals.NSIG:
            return -errno.EINVAL
        if code > 0:
            return -errno.EPERM  # the kernel's own si_codes are not a process's to send
        if code < -(2**31) or not -(2**63) <= value < 2**64:
            return -errno.EINVAL
        plain = (code, value) == (signals.SI_USER, 0)
        info = b"" if plain else SIGNAL_INFO.pack(code, value - 2**64 if value >= 2**63 else value)
        if pid > 0:
            targets = [self.procs[pid]] if pid in self.procs else []
        elif pid == -1:
            targets = [r for r in self.procs.values() if r.pid != rec.pid]
        else:
            pgid = rec.pgid if pid == 0 else -pid
            targets = [r for r in self.procs.values() if r.pgid == pgid]
        targets = [r for r in targets if r.state != "reaped"]
        if not targets and pid != -1:
            return -errno.ESRCH
        for r in targets:
            if r.pid != rec.pid and r.alive and sig:
                self._signal(r, sig, rec.pid, info)
        return 0

    def _op_child_state(self, rec: ProcRec, status: int) -> int:
        """The VM's process stopped or continued (job control): its parent's VM hears."""
        if status != signals.CONTINUED_STATUS and status & 0xFFFF00FF != 0x7F:
            return -errno.EINVAL
        parent = self.procs.get(rec.ppid)
        if rec.ppid != INIT_PID and parent is not None and parent.alive:
            self._send(parent, Frame(Msg.CHILD_STATE, 0, 0, rec.pid, status, b""))
        return 0

    def _op_getpgid(self, rec: ProcRec, pid: int) -> int:
        r = self.procs.get(pid or rec.pid)
        return -errno.ESRCH if r is None or r.state == "reaped" else r.pgid

    def _op_getsid(self, rec: ProcRec, pid: int) -> int:
        r = self.procs.get(pid or rec.pid)
        return -errno.ESRCH if r is None or r.state == "reaped" else r.sid

    def _members(self) -> list[ProcRec]:
        return [r for r in self.procs.values() if r.state != "reaped"]

    def _rule_members(self) -> list[ProcRec]:
        """The members the process-group rules see: every process not reaped and init
        (pid 1, group and session 1), as a thread-fork VM's table has it: a process may
        go back to init's group, and init's group exists for tcsetpgrp."""
        return [self._init_rec, *self._members()]

    def _op_setpgid(self, rec: ProcRec, pid: int, pgid: int) -> int:
        """The group the target joins (the VM updates its own copy), or -errno."""
        target = self.procs.get(pid or rec.pid)
        if target is not None and target.state == "reaped":
            target = None
        new = pgroups.setpgid(rec, target, pgid, self._rule_members())
        if new > 0:
            assert target is not None  # setpgid refuses a missing target (ESRCH)
            target.pgid = new
        return new

    # -- the console as a controlling terminal (rump/pgroups.py, rump/jobctl.py) ---------
    def _tty_signal(self, rec: ProcRec, r: int) -> int:
        """A job-control signal for the caller's group: sent here to its members in
        other VMs; the caller's VM sends it to its own and restarts the call."""
        if r > 0:
            for m in self._members():
                if m.pgid == rec.pgid and m.pid != rec.pid and m.alive:
                    self._signal(m, r, 0, SIGNAL_INFO.pack(signals.SI_KERNEL, 0))
        return r

    def _op_tty_check(self, rec: ProcRec, sig: int, ignored: int) -> int:
        if sig not in (signals.SIGTTIN, signals.SIGTTOU):
            return -errno.EINVAL
        r = pgroups.check_access(rec, self.terminal, sig, bool(ignored), self._rule_members())
        return self._tty_signal(rec, r)

    def _op_tty_getpgrp(self, rec: ProcRec) -> int:
        return pgroups.tcgetpgrp(rec, self.terminal)

    def _op_tty_setpgrp(self, rec: ProcRec, pgid: int, ignored: int) -> int:
        r = pgroups.tcsetpgrp(rec, self.terminal, pgid, bool(ignored), self._rule_members())
        return self._tty_signal(rec, r)

    def _op_tty_sctty(self, rec: ProcRec) -> int:
        return pgroups.tiocsctty(rec, self.terminal)

    def _op_setsid(self, rec: ProcRec) -> int:
        err = pgroups.setsid(rec, self._rule_members())
        if err:
            return err
        rec.sid = rec.pgid = rec.pid
        return rec.pid

    def _op_pipe_create(
        self, rec: ProcRec, readers: int, writers: int, ring: int = 0, *, data: bytes
    ) -> tuple[int, bytes] | tuple[int, bytes, int]:
        """A VM's pipe becomes shared: its id, and, if it is a plain pipe (``ring``) of
        an instance whose pipes are rings (and there is memory for one), its ring's
        label (``memfd:<inode>``) and fd (the VM maps it at once: ``ring_fd`` is for
        the VMs that get an end later)."""
        segment = None
        if ring and self.rings:
            try:
                segment = PipeRing.create(
                    data if readers else b"", readers, writers, mapped=False, wakers=self.wakers
                )
            except OSError as e:
                log.warning("instance %s: a pipe ring could not be made (%s): brokered", self.id, e)
        try:
            pipe = self.broker.create(rec.pid, data, readers, writers, ring=segment)
        except ValueError:
            if segment is not None:
                segment.close()
            raise
        if segment is None:
            return pipe, b""
        return pipe, segment.name.encode(), segment.reopen()

    def _op_ring_fd(self, rec: ProcRec, pipe: int) -> tuple[int, bytes, int]:
        """A new fd of ring pipe ``pipe``'s segment (its own open file description:
        ``PipeRing.reopen``), for a VM that holds an end of it (EBADF otherwise;
        EINVAL: not a ring pipe); the answer names its inode."""
        if not (self.broker.holds(pipe, rec.pid, "r") or self.broker.holds(pipe, rec.pid, "w")):
            return -errno.EBADF, b"", -1
        ring = self.broker.ring_of(pipe)
        if ring is None:
            return -errno.EINVAL, b"", -1
        return 0, str(ring.ino).encode(), ring.reopen()

    def _op_wake_fd(self, rec: ProcRec, token: int) -> tuple[int, bytes, int]:
        """A new fd of the wake-up pipe ``token`` names, one of a VM of this instance
        (ENOENT otherwise: a token in a ring's waiter table is any VM's word); the
        answer names its inode."""
        fd = self.wakers.dup(token)
        if fd < 0:
            return -errno.ENOENT, b"", -1
        return 0, str(os.fstat(fd).st_ino).encode(), fd

    def _op_pipe_close(self, rec: ProcRec, pipe: int, end: int) -> int:
        """A ring pipe's end closed, answered once the ring's counts say so."""
        self.broker.close(pipe, rec.pid, "r" if end == END_READ else "w")
        return 0

    def _op_pipe_refs_many(self, rec: ProcRec, holder: int, data: bytes) -> int:
        """A child this VM is forking (or that execs) gets its ends of every pipe its
        fd table holds (``PIPE_REFS`` entries): one call a fork, all or none, and only
        ends this VM holds itself (every process in a VM holds its ends as the VM)."""
        target = self.procs.get(holder)
        if target is None or target.leased_by != rec.pid:
            return -errno.ESRCH
        if len(data) % PIPE_REFS.size:
            return -errno.EINVAL
        refs = list(PIPE_REFS.iter_unpack(data))
        for pipe, readers, writers in refs:
            for end, n in (("r", readers), ("w", writers)):
                if n and not self.broker.holds(pipe, rec.pid, end):
                    return -errno.EBADF
        try:
            self.broker.add_refs_many(holder, refs)
        except ValueError:
            return -errno.EBADF
        return 0

    def _op_pipe_poll(self, rec: ProcRec, pipe: int, write_end: int, watch: int = 0) -> int:
        """The ready events of a brokered pipe end (poll/select/epoll in a VM); with
        ``watch``, the pipe's next change wakes the VM's pollers (POLL_WAKE)."""
        try:
            return self.broker.poll(
                pipe, bool(write_end), (rec.pid, self._poll_waker(rec)) if watch else None
            )
        except ValueError:
            return -errno.EBADF

    def _op_proc_comm(self, rec: ProcRec, pid: int, data: bytes) -> int:
        """A process of ``rec``'s VM (or one it leased) runs a new program."""
        target = self.procs.get(pid)
        if target is None or rec.pid not in (target.pid, target.leased_by):
            return -errno.ESRCH
        name, _, exe = data.partition(b"\0")
        target.comm = name[:15].decode(errors="replace")
        target.exe = exe.decode(errors="surrogateescape")
        return 0

    def _op_proc_stat(self, rec: ProcRec, pid: int) -> tuple[int, bytes]:
        """/proc/PID/stat of a process in another VM: what the instance's table knows."""
        r = self.procs.get(pid)
        if r is None or r.state == "reaped":
            return -errno.ENOENT, b""
        state = "Z" if r.state == "zombie" else "S"
        info = [r.pid, r.ppid, r.pgid, r.sid, state, r.comm or "?", r.exe]
        return 0, json.dumps(info).encode()

    def _op_proc_list(self, rec: ProcRec) -> tuple[int, bytes]:
        """The pids /proc lists: every process of the instance not yet reaped."""
        return 0, json.dumps(sorted(r.pid for r in self._members())).encode()

    def _op_fs(self, rec: ProcRec, data: bytes) -> tuple[int, bytes]:
        return self.fs.call(rec.pid, data)

    def _op_fs_raw(self, rec: ProcRec, data: bytes) -> tuple[int, bytes]:
        return self.fs.call_raw(rec.pid, data)

    def _op_fs_write(self, rec: ProcRec, ofd: int, offset: int, data: bytes) -> int:
        return self.fs.write(rec.pid, ofd, offset, data)

    def _op_fs_hold(self, rec: ProcRec, ofd: int, child: int) -> int:
        target = self.procs.get(child)
        if target is None or target.leased_by != rec.pid:
            return -errno.ESRCH  # only for a child this VM is forking (or that execs)
        return self.fs.hold(rec.pid, ofd, child)

    def _op_fs_release(self, rec: ProcRec, ofd: int) -> int:
        return self.fs.release(rec.pid, ofd)

    # -- process ends -----------------------------------------------------------------
    def _ended(self, rec: ProcRec, status: int, report: str) -> None:
        with self.lock:
            if not rec.alive:
                return
            rec.state, rec.status, rec.ended = "zombie", status, time.monotonic()
            if not rec.hosting:
                self._free_memory(rec)
            if report:
                rec.report = report
                self.reports.append(report)
            for child in self.procs.values():  # orphans go to init, before any EOF reaches them
                if child.ppid == rec.pid and child.state != "reaped":
                    child.ppid = INIT_PID
                    if child.state == "zombie":
                        child.state = "reaped"
                    else:
                        self._send(child, Frame(Msg.REPARENT, 0, 0, 0, INIT_PID, b""))
            if not rec.hosting:
                self._drop_holder(rec)
            parent = self.procs.get(rec.ppid)
            if rec.ppid == INIT_PID or parent is None:
                rec.state = "reaped"  # init reaps at once (the status stays on record)
            else:
                self._send(parent, Frame(Msg.CHILD_EXIT, 0, 0, rec.pid, status, b""))
            self._check_done()

    def _drop_holder(self, rec: ProcRec) -> None:
        self.listen_broker.drop_holder(rec.pid)  # before the pipes: discards close some
        if self.ports is not None:
            self.ports.drop_holder(rec.pid)
        self.broker.drop_holder(rec.pid)
        self.stdin.drop_holder(rec.pid)
        self.fs.drop_holder(rec.pid)

    def _vm_ended(self, rec: ProcRec) -> None:
        """The VM of a process that ended while it hosted clone(CLONE_VM) children is gone
        (they exec'd or exited): what it held goes back now."""
        with self.lock:
            if not rec.hosting:
                return
            rec.hosting = False
            self._drop_holder(rec)
        self._free_memory(rec)

    def _check_deadlock(self) -> None:
        """Every live VM idle, and none with a message on its way: nothing can move."""
        live = [r for r in self.procs.values() if r.alive]
        if not live or self._outcome is not None or self.stdin.waiting():
            return  # a reader of stdin waits for the user, not for another VM
        if self.ports is not None:
            return  # published ports: a host client may come and wake any of them
        if all(
            r.state == "running" and r.idle_at == r.events_sent and self._ring_stuck(r)
            for r in live
        ):
            lines = ["deadlock: every process is blocked and nothing can wake it"]
            lines += [r.idle_report for r in sorted(live, key=lambda r: r.pid) if r.idle_report]
            report = "\n".join(lines)
            log.warning("instance %s: %s", self.id, report)
            self.reports.append(report)
            self._spawn(self.kill, "deadlock", "deadlock")

    def _ring_stuck(self, rec: ProcRec) -> bool:
        """Whether ``rec``'s VM still waits, since its idle report, on every ring that
        report named: the very entries (pid and epoch) are still in those rings'
        waiter tables.  Whoever changes a ring takes all its entries and wakes their
        VMs; a VM that waits again registers with a new epoch and reports again.  So
        a VM that has run since its report (and may have sent messages still on their
        way here: a pipe's close) never counts as stuck on its old report."""
        for pipe, epoch in rec.idle_rings:
            ring = self.broker.ring_of(pipe)
            if ring is None or (rec.pid, epoch) not in {(p, e) for p, _, e in ring.waiting()}:
                return False
        return True

    def _check_done(self) -> None:
        if not any(r.alive for r in self.procs.values()):
            self.done.set()
            with self.lock:
                self._hello_watch.notify_all()  # the watch ends with the instance


def _idle_rings(payload: str) -> tuple[list[tuple[int, int]], str]:
    """An idle report's ring waits, (pipe, epoch) (its first line, if it names them),
    and the rest."""
    first, _, rest = payload.partition("\n")
    words = first.split()
    if not words or words[0] != IDLE_RINGS:
        return [], payload
    if len(words) > 65:  # more than the check reads (a poll over many rings): never stuck
        return [(-1, 0)], rest
    try:
        return [(int(p), int(e)) for p, _, e in (w.partition(":") for w in words[1:])], rest
    except ValueError:
        return [], rest


def _pipe_ends(st: dict) -> list[tuple[int, str]] | None:
    """The broker pipe ends (id, "r"/"w") a remote pipe end's or socket's state names."""
    if st.get("kind") == "rpipe":
        return [(int(st["pipe"]), "w" if st["end"] == "w" else "r")]
    if st.get("kind") == "rsock":
        return [(int(st[k]), e) for k, e in (("rx", "r"), ("tx", "w")) if int(st[k]) >= 0]
    return None


def _data_frame(req: int, res: bytes | int) -> Frame:
    if isinstance(res, int):
        return Frame(Msg.PIPE_DATA, 0, req, 0, res, b"")
    return Frame(Msg.PIPE_DATA, 0, req, 0, 0, res)

"""The fork server of thread-fork instances, and the VM process it forks.

Guest code can crash the emulator (Unicorn 2.1.4 dies of SIGSEGV translating
a long straight line of x87 instructions, unicorn-engine/unicorn#2240), so a
tender runs every thread-fork instance in a process of its own.  Starting a
Python interpreter with the VM stack costs ~0.5 s; instead one server
process (spawned once per tender) imports the stack, runs a tiny VM to warm
it up, and forks a child per instance.  The next child is always forked
ahead and warms itself up too, so an instance waits only for its own VM to
be built (see docs/reliability.md for the figures).  The server runs no
guest code itself and stays single-threaded, so its forks are safe.

Control connection (tender <-> server), frames of one kind byte + payload:

  tender -> server  {"id", "start"} JSON, then the child's socket (SCM_RIGHTS), then
                    one listening socket per start["publish"] mapping (the ports
                    the tender bound for the instance: the VM process serves them)
  server -> tender  F {"id", "pid"}      forked
                    X {"id", "status"}   the child ended (its raw wait status)
                    L {"name", "level", "msg"}  a log record

Child connection (tender <-> one VM process); nothing the child sends is
unpickled:

  child -> tender   S {"pid"}                 the VM is built and about to run
                    C <pid i32><fd u32> data  console output
                    F <f64>...                fork latencies (seconds), batched
                    T {"processes","memory"}  answer to Q
                    R {result}                the run's result; then the child exits
                    E {"error"}               the VM could not be built
                    L {"name", "level", "msg"}  a log record
  tender -> child   K reason                  stop the VM (kill)
                    Q                         ask for the process table and memory
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import Pipe, reduction
from multiprocessing.connection import Connection

from tender_service.instance import jail
from tender_service.instance.childproc import setup_child
from tender_service.instance.jail import JailReport
from tender_service.instance.publish import PortMapping, Publisher
from tender_service.machine.cpu import keep_spare_engine
from tender_service.machine.elf import parse_elf
from tender_service.machine.errors import ImageError
from tender_service.machine.rootfs import load_image_file
from tender_service.rump.kernel import Kernel
from tender_service.rump.vminfo import ProcInfo, VmConfig
from tender_service.toolchain.cc import CompileError
from tender_service.toolchain.images import build_image
from tender_service.vm import FORKERS, create_vm, run_vm

log = logging.getLogger(__name__)

MAX_FRAME = 2 << 20  # a console frame carries at most CONSOLE_PIECE bytes of output
CONSOLE_PIECE = 1 << 20
FORK_BATCH = 256  # fork latencies sent together
CONSOLE = struct.Struct("<iI")


def rows(procs: Sequence[ProcInfo]) -> list[list]:
    return [[p.pid, p.ppid, p.name, p.state, p.status, p.report] for p in procs]


def procs_of(table: object) -> list[ProcInfo]:
    """ProcInfo from a child's rows; raises ValueError/TypeError on anything else."""
    if not isinstance(table, list):
        raise TypeError("processes: not a list")
    return [
        ProcInfo(
            int(pid),
            int(ppid),
            str(name),
            str(state),
            None if status is None else int(status),
            str(report),
        )
        for pid, ppid, name, state, status, report in table
    ]


class FrameLog(logging.Handler):
    """Sends each record as an ``L`` frame, tagged with where it comes from."""

    def __init__(self, send: Callable[[bytes], None], where: str) -> None:
        super().__init__()
        self.send, self.where = send, where

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"[{self.where}] {record.getMessage()}"
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
        with contextlib.suppress(OSError):  # the tender is gone: nobody to tell
            self.send(
                b"L"
                + json.dumps({"name": record.name, "level": record.levelno, "msg": msg}).encode()
            )


def relay_log(payload: bytes) -> None:
    """Log an ``L`` frame's record in this process (the tender)."""
    msg = json.loads(payload)
    level = min(max(int(msg["level"]), logging.DEBUG), logging.CRITICAL)
    logging.getLogger(str(msg["name"])[:200]).log(level, "%s", str(msg["msg"]))


# -- the VM process -------------------------------------------------------------------------
class _ChildLink:
    """The child's end: frames out (from the VM thread and the control thread)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.forks = array("d")

    def send(self, frame: bytes) -> None:
        with self.lock:
            if self.forks:
                self.conn.send_bytes(b"F" + self.forks.tobytes())
                del self.forks[:]
            if frame[:1] != b"F":
                self.conn.send_bytes(frame)

    def send_json(self, kind: bytes, value: dict) -> None:
        self.send(kind + json.dumps(value).encode())

    def console(self, pid: int, fd: int, data: bytes) -> None:
        for off in range(0, len(data), CONSOLE_PIECE):
            self.send(b"C" + CONSOLE.pack(pid, fd) + bytes(data[off : off + CONSOLE_PIECE]))

    def fork_time(self, seconds: float) -> None:
        with self.lock:
            self.forks.append(seconds)
            full = len(self.forks) >= FORK_BATCH
        if full:
            self.send(b"F")  # just the batch

    def serve_controls(self, k: Kernel) -> None:
        """Kill and status requests from the tender; its going away stops the VM."""
        while True:
            try:
                msg = self.conn.recv_bytes(4096)
            except (EOFError, OSError):
                k.request_stop("killed")
                return
            if msg[:1] == b"K":
                k.request_stop(msg[1:].decode(errors="replace") or "killed")
            elif msg[:1] == b"Q":
                try:
                    self.send_json(
                        b"T", {"processes": rows(k.process_table()), "memory": k.committed_memory()}
                    )
                except OSError:
                    return


def run_child(
    conn: Connection,
    start: dict,
    level: int,
    jailed: JailReport | None = None,
    listeners: Sequence[int] = (),
) -> None:
    """Run one thread-fork VM to the end and report it (a forked child's work).

    ``jailed``: confine this process (instance/jail.py) once its VM is built,
    before any thread starts; the report says what the fork server did already.
    ``listeners``: the listening sockets of start["publish"], which this process
    serves (instance/publish.py) from when its VM runs."""
    link = _ChildLink(conn)
    setup_child(
        FrameLog(link.send, f"thread-vm {os.getpid()} instance {start['instance_id']}"), level
    )
    try:
        k = create_vm(
            start["image_path"],
            start["args"],
            start["env"],
            VmConfig(**start["config"]),
            sink=link.console,
            fork=start.get("fork", "thread"),
            argv0=start["argv0"],
        )
    except (ImageError, ValueError, MemoryError, OSError) as e:
        link.send_json(b"E", {"error": str(e)})
        return
    k.fork_observer = link.fork_time
    publisher = _adopt(start.get("publish") or [], listeners)
    if jailed is not None:
        try:
            serving = publisher is not None
            report = jail.jail_vm_process(jailed, jail.vm_filter(serving), serving)
            log.info("%s", report.line())
        except (OSError, ImportError) as e:  # fail closed: no VM runs half-jailed
            k.close()
            link.send_json(
                b"E",
                {
                    "error": f"cannot jail the VM process: {e} "
                    "(unifork serve --no-jail runs VMs unconfined)"
                },
            )
            return
    try:
        if publisher is not None:
            publisher.attach(k)  # its thread starts: after the jail
        link.send_json(b"S", {"pid": os.getpid()})
        threading.Thread(
            target=link.serve_controls, args=(k,), name="controls", daemon=True
        ).start()
        r = k.run()
        link.send_json(
            b"R",
            {
                "status": r.status,
                "outcome": r.outcome,
                "reports": r.reports,
                "elapsed": r.elapsed,
                "forks": r.forks,
                "fork_seconds": r.fork_seconds or [],  # None: a figure the VM did not keep
                "syscalls": r.syscalls,
                "peak_memory": r.peak_memory,
                "pipe_bytes": k.pipe_bytes,
                "processes": rows(r.processes),
            },
        )
    except OSError:
        log.warning("the tender went away; VM abandoned")
    finally:
        if publisher is not None:
            publisher.close()
        k.close()


def _adopt(publish: list, listeners: Sequence[int]) -> Publisher | None:
    """The Publisher of the listening sockets the tender bound (``publish``: their
    [host IP, host port, guest port]), or None."""
    if not listeners:
        return None
    mappings = [PortMapping(int(port), int(guest), str(ip)) for ip, port, guest in publish]
    return Publisher(mappings, listeners=[socket.socket(fileno=fd) for fd in listeners])


# -- the fork server ------------------------------------------------------------------------
_BASE = 0x400000
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
#: fork; the parent waits for the child (wait4(-1, NULL, 0, NULL)); both exit_group(0)
_CODE = bytes.fromhex(
    "b839000000"
    "0f05"
    "85c0"
    "7413"  # fork; jz exit
    "bfffffffff"
    "31f6"
    "31d2"
    "4d31d2"
    "b83d000000"
    "0f05"  # wait4
    "b8e7000000"
    "31ff"
    "0f05"
)  # exit: exit_group(0)


def tiny_elf() -> bytes:
    """A static x86-64 executable of one page that forks once and exits with status 0."""
    code_off = _EHDR.size + _PHDR.size
    size = code_off + len(_CODE)
    ehdr = _EHDR.pack(
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,
        62,
        1,
        _BASE + code_off,
        _EHDR.size,
        0,
        0,
        _EHDR.size,
        _PHDR.size,
        1,
        0,
        0,
        0,
    )
    phdr = _PHDR.pack(1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + _CODE


def warm_up() -> int:
    """Run :func:`tiny_elf` once: what a VM imports or sets up lazily (the syscall
    table at boot, Unicorn's first use) is then done before any fork; then set up
    the engine of this process's next VM (machine/cpu.py, ~1 ms less for it).  No
    time limit, so no watchdog thread starts.  Returns the exit status (0)."""
    status = run_vm(
        parse_elf(tiny_elf(), "warm-up"), config=VmConfig(), sink=lambda pid, fd, data: None
    ).status
    keep_spare_engine()
    return status


#: the server's second warm-up: a musl program that forks in a loop (fork_time's
#: ``-n``), once per one-VM fork mode
WARM_FORKS = 10


def warm_up_fork_paths() -> dict[str, int]:
    """Run a real musl program's forks (TLS copy, heap, sigprocmask, wait4, exit)
    in every one-VM fork mode, ``WARM_FORKS`` times each: CPython specializes code
    after its first runs, so the first fork of every VM process the server forks
    then runs the kernel's warm code (issue 17: a tender instance's first fork cost
    ~440 us against ~75 us warm).  Once, in the server: not in each spare.
    Returns each mode's exit status (none without the program)."""
    statuses: dict[str, int] = {}
    try:
        image = build_image("fork_time")
    except (OSError, CompileError) as e:  # no toolchain here: the tiny warm-up still ran
        log.warning("no fork warm-up program (%s): first forks run cold code", e)
        return statuses
    for mode in FORKERS:
        r = run_vm(
            image,
            ["-n", str(WARM_FORKS)],
            config=VmConfig(),
            sink=lambda pid, fd, data: None,
            fork=mode,
        )
        if r.status:
            log.warning("the %s fork warm-up ended with status %#x", mode, r.status)
        statuses[mode] = r.status
    return statuses


@dataclass(eq=False)
class _Spare:
    """A forked child that has warmed itself up and waits for its instance."""

    pid: int
    conn: Connection  # the server's end: one request, then the VM's socket


def freeze_for_fork(full: bool = False) -> None:
    """Move every object this process has now out of the garbage collector's sight
    (``gc.freeze``, as CPython's docs advise before a fork without exec): a forked
    VM process's collections then never write to the server's objects, so they stay
    shared pages instead of being copied, thousands at a time, by the first full
    collection in the child.  The young generations are collected first (``full``:
    all of them, once after the warm-ups), so little garbage is frozen with them."""
    if full:
        gc.collect()
    else:
        gc.collect(1)
    gc.freeze()


def _fork_spare(conn: Connection, level: int, jailed: JailReport | None) -> _Spare:
    """Fork the next VM process ahead of its request.  It runs :func:`warm_up` in the
    meantime, so the page faults a VM's first steps take in a fresh copy of the
    server (copy-on-write) are paid before the instance waits for them."""
    mine, theirs = Pipe(duplex=True)
    freeze_for_fork()
    pid = os.fork()
    if pid:
        theirs.close()
        return _Spare(pid, mine)
    code = 0
    try:  # the child: nothing of the server's but the VM stack
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.close()
        mine.close()
        # every other inherited fd too: multiprocessing's sentinel pipe among them, which
        # would keep the server looking alive to the tender as long as this VM runs
        keep = theirs.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        warm_up()
        try:
            req = json.loads(theirs.recv_bytes(MAX_FRAME))
            fd = reduction.recv_handle(theirs)
            listeners = [reduction.recv_handle(theirs) for _ in req["start"].get("publish", ())]
        except (EOFError, OSError):
            pass  # the server is gone before it needed this one: exit quietly
        else:
            theirs.close()
            run_child(Connection(fd), req["start"], level, jailed, listeners)
    except BaseException:  # noqa: BLE001 - a forked child must never return to the loop
        code = 1
        logging.getLogger(__name__).exception("thread-fork VM process failed")
    finally:
        os._exit(code)


def _hand_over(spare: _Spare, request: bytes, fds: Sequence[int]) -> None:
    spare.conn.send_bytes(request)
    for fd in fds:  # the VM's socket, then the listeners it is to serve
        reduction.send_handle(spare.conn, fd, spare.pid)
    spare.conn.close()


def serve(conn: Connection, level: int, jailed: bool = True) -> None:
    """The server's loop (a spawned process's target): hand each request to the
    waiting spare VM process, fork the next spare, report each VM's end; exit when
    the tender hangs up (spares and VMs notice on their own connections).

    ``jailed``: the server scrubs its environment (the tender's secrets never reach
    a VM process) and each VM process jails itself (instance/jail.py)."""
    setup_child(FrameLog(conn.send_bytes, f"vm-server {os.getpid()}"), level)
    report = JailReport(env=jail.scrub_environment()) if jailed else None
    if report is None:
        log.warning("VM processes run unjailed (--no-jail)")
    else:
        try:
            jail.vm_filter()  # compiled once, here: the VM processes inherit it (a cache)
            jail.vm_filter(publish=True)
        except OSError as e:
            log.error("no seccomp filter for VM processes (%s): they will refuse to run", e)
    warm_up()
    warm_up_fork_paths()
    freeze_for_fork(full=True)
    wake = os.pipe()
    os.set_blocking(wake[1], False)
    signal.set_wakeup_fd(wake[1])
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children: dict[int, int] = {}  # OS pid -> request id
    spare: _Spare | None = None
    while True:
        if spare is None:
            try:
                spare = _fork_spare(conn, level, report)
            except OSError as e:
                log.error("cannot fork a VM process: %s", e)
        ready, _, _ = select.select([conn.fileno(), wake[0]], [], [])
        if wake[0] in ready:
            os.read(wake[0], 4096)
            _reap(conn, children)
        if conn.fileno() not in ready:
            continue
        try:
            request = conn.recv_bytes(MAX_FRAME)
            req = json.loads(request)
            fds = [
                reduction.recv_handle(conn) for _ in range(1 + len(req["start"].get("publish", ())))
            ]
        except (EOFError, OSError):
            return
        _parse_ahead(req["start"]["image_path"])
        for _ in range(2):  # a spare that died meanwhile: fork another
            try:
                spare = spare or _fork_spare(conn, level, report)
                _hand_over(spare, request, fds)
            except OSError as e:
                log.warning("spare VM process unusable (%s): forking another", e)
                spare = None
                continue
            children[spare.pid] = req["id"]
            conn.send_bytes(b"F" + json.dumps({"id": req["id"], "pid": spare.pid}).encode())
            spare = None
            break
        else:
            conn.send_bytes(b"X" + json.dumps({"id": req["id"], "status": -1}).encode())
        for fd in fds:
            os.close(fd)


def _parse_ahead(path: str) -> None:
    """Parse the image into the loader's cache (tender_service/machine/rootfs.py), so
    that the spares forked from now on find it parsed.  The VM process parses it
    again if this fails, and reports why."""
    with contextlib.suppress(Exception):  # noqa: BLE001 - the VM process reports errors
        load_image_file(path)


def _reap(conn: Connection, children: dict[int, int]) -> None:
    """Report the end of every VM process that ended (spares that end unused: none)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        rid = children.pop(pid, None)
        if rid is not None:
            conn.send_bytes(b"X" + json.dumps({"id": rid, "status": status}).encode())

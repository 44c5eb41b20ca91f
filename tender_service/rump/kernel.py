"""The rump kernel of one VM: processes, the syscall boundary and the run loop.

Every guest ``syscall`` lands in the dispatcher of :meth:`Kernel._make_dispatcher` (the hot path:
one table lookup, one handler call).  A handler returns the value for
``rax`` (negative errno on failure), raises ``GuestError`` (turned into
-errno), raises ``Block`` (the thread waits and the syscall is restarted when
it is woken), or returns a sentinel that asks the loop to switch threads.
Nothing a guest does lets a Python exception escape: an unexpected one ends
the calling process with SIGSYS and a report, and the VM goes on.

The run loop is Rumprun's scheduler loop: pick a runnable bmk thread, load
its CPU context, run until it blocks, yields, exits or faults.  When nothing
can run and nothing outside the VM can change that, the VM is deadlocked and
stops at once with a report of what each process waits on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import selectors
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK, MemAlloc
from tender_service.bmk.pagealloc import PageAllocator
from tender_service.bmk.sched import BmkThread, Scheduler, ThreadState, WaitQueue
from tender_service.machine.cpu import (
    RAX,
    RIP,
    RSP,
    SYSCALL_INSN_LEN,
    Cpu,
    ExitKind,
)
from tender_service.machine.elf import ElfImage
from tender_service.machine.errors import GuestError, ImageError
from tender_service.machine.layout import DEFAULT_RAM, DEFAULT_STACK, MAX_RAM, MIN_RAM, PAGE_SIZE
from tender_service.machine.loader import build_stack, layout_memory
from tender_service.machine.memory import GuestMemory
from tender_service.machine.watchdog import WATCHDOG
from tender_service.rump import signals
from tender_service.rump.console import Console
from tender_service.rump.fdtable import FdTable
from tender_service.rump.files import O_RDONLY, O_WRONLY, Block, ConsoleFile
from tender_service.rump.process import Lwp, Process, ProcState
from tender_service.rump.syscalls.names import syscall_name

log = logging.getLogger(__name__)

INIT_PID = 1
#: reaped processes remembered for the process table (``--ps``, describe)
MAX_FINISHED = 10_000
#: seconds between stops while an event from another thread waits for the VM's loop
EVENT_POKE = 0.02


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: handler result: the calling thread gave up the CPU (sched_yield); rax = 0
SWITCH = _Sentinel("SWITCH")
#: handler result: the calling thread is gone (exit, fatal signal)
NORETURN = _Sentinel("NORETURN")


class BlockAfter(Exception):  # noqa: N818 - control flow
    """The syscall completed with ``value`` but the thread must now wait (vfork)."""

    def __init__(self, value: int, why: str) -> None:
        self.value, self.why = value, why


class Forker(Protocol):
    """A fork strategy (thread fork, VM clone); the layer above plugs it in."""

    mode: str

    def fork(self, k: Kernel, lwp: Lwp, vfork: bool) -> int: ...


class RemoteHost(Protocol):
    """Where the other processes of the instance live (VM-clone fork).

    The rump layer calls it when something it does concerns a process of
    another VM; the layer above implements it over a transport.
    """

    def process_exited(self, proc: Process) -> None: ...

    def child_reaped(self, parent: Process, child: Process) -> None: ...

    def signal(self, sender: Process, pid: int, sig: int) -> int: ...

    def call(self, op: str, *args: int) -> int: ...

    def idle(self, blocked: list[str]) -> None: ...


@dataclass(slots=True)
class VmConfig:
    ram: int = DEFAULT_RAM
    stack_size: int = DEFAULT_STACK
    timeout: float | None = None  # seconds of wall time for the whole VM
    quantum: int = 0  # instructions before a forced switch; 0 = cooperative only
    max_procs: int = 1024
    tty: bool = True
    trace_syscalls: bool = False

    def validate(self) -> None:
        if not MIN_RAM <= self.ram <= MAX_RAM:
            raise ValueError(f"ram must be between {MIN_RAM} and {MAX_RAM} bytes")
        if not 16 << 10 <= self.stack_size <= 64 << 20:
            raise ValueError("stack size must be between 16 KiB and 64 MiB")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.quantum < 0 or self.max_procs < 2:
            raise ValueError("quantum must be >= 0 and max_procs >= 2")


@dataclass(slots=True)
class ProcInfo:
    pid: int
    ppid: int
    name: str
    state: str
    status: int | None
    report: str


@dataclass(slots=True)
class RunResult:
    status: int  # wait status of the launched program
    outcome: str  # exited | signaled | timeout | deadlock | killed
    reports: list[str]
    elapsed: float
    forks: int
    syscalls: int
    peak_memory: int
    processes: list[ProcInfo] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return signals.shell_code(self.status)


class Kernel:
    """One VM: machine + bmk + rump.  Build it, then call :meth:`run` once."""

    def __init__(self, config: VmConfig, console: Console, mem: GuestMemory, brk_base: int,
                 pages: PageAllocator, heap: MemAlloc, forker: Forker | None = None) -> None:
        """A VM over prepared memory (see :meth:`boot`, and fork/snapshot.py's restore)."""
        config.validate()
        self.config = config
        self.console = console
        self.forker = forker
        self.remote: RemoteHost | None = None
        self._events: deque[Callable[[], None]] = deque()
        self.mem = mem
        self.brk_base = brk_base
        self.pages = pages
        self.heap = heap
        self.cpu = Cpu(mem)
        self.sched = Scheduler()
        self.procs: dict[int, Process] = {}
        self.futexes: dict[int, WaitQueue] = {}
        self.finished: list[ProcInfo] = []  # reaped processes, for the process table
        self._next_pid = INIT_PID
        self.current: Lwp | None = None
        self._loaded: BmkThread | None = None
        self._restart = False
        self._stop_reason: str | None = None
        self._finished = False  # run() has returned: no more pokes
        self._event_poke = False
        self.reports: list[str] = []
        self.forks = 0
        self.pipe_bytes = 0  # bytes written into this VM's pipes
        #: called with the seconds each successful fork took (metrics)
        self.fork_observer: Callable[[float], None] | None = None
        self.syscalls = 0
        self._unknown_logged: set[int] = set()
        self._warned: set[str] = set()
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        from tender_service.rump.syscalls.table import dispatch_table, hypercall_table

        self._table = dispatch_table()
        self._hypercalls = hypercall_table()
        self._dispatch = self._make_dispatcher()
        self.cpu.hook_syscall(self._on_syscall_traced if config.trace_syscalls
                              else self._dispatch)
        self.init = self._new_process(None, FdTable(), "init")
        self.main: Process | None = None

    @classmethod
    def boot(cls, image: ElfImage, argv: list[str | bytes], env: list[str | bytes],
             config: VmConfig, console: Console, forker: Forker | None = None) -> Kernel:
        """A VM that starts ``image`` as its first program (pid 2)."""
        config.validate()
        mem = GuestMemory(config.ram)
        try:
            loaded = layout_memory(mem, image)
            heap = loaded.heap
            pages = PageAllocator(heap.base, heap.size, PAGE_SIZE)
            k = cls(config, console, mem, loaded.region.end, pages,
                    MemAlloc(mem.region_view(heap), heap.base, pages), forker)
        except Exception:
            mem.close()
            raise
        k.loaded = loaded
        k.main = k._spawn_main(argv, env)
        return k

    # -- building ------------------------------------------------------------------
    def alloc_pid(self) -> int:
        pid = self._next_pid
        self._next_pid += 1
        return pid

    def _new_process(self, parent: Process | None, fds: FdTable, name: str,
                     pid: int | None = None) -> Process:
        pid = self.alloc_pid() if pid is None else pid
        p = Process(pid=pid, ppid=parent.pid if parent else 0,
                    pgid=parent.pgid if parent else pid, sid=parent.sid if parent else pid,
                    fds=fds, parent=parent, name=name)
        if parent is not None:
            parent.children[pid] = p
            p.sigactions = dict(parent.sigactions)
            p.brk = parent.brk
        self.procs[pid] = p
        return p

    def new_child(self, parent: Process) -> Process:
        """A process for a fork: same pgid/sid, copied fd table and dispositions."""
        return self._new_process(parent, parent.fds.copy(), parent.name)

    def new_lwp(self, proc: Process, stack: int, stack_base: int, stack_size: int,
                ctx: object) -> Lwp:
        t = BmkThread(tid=proc.pid, name=f"{proc.name}:{proc.pid}", ctx=ctx,
                      stack_base=stack_base, stack_size=stack_size)
        lwp = Lwp(proc=proc, thread=t, tid=proc.pid, stack=stack)
        t.cookie = lwp
        proc.lwps.append(lwp)
        self.sched.add(t)
        return lwp

    def discard_process(self, proc: Process) -> None:
        """Undo a fork that failed half way: the pid never ran."""
        self.heap.free_owner(proc.pid)
        proc.fds.close_all(self)
        if proc.parent is not None:
            proc.parent.children.pop(proc.pid, None)
        self.procs.pop(proc.pid, None)
        proc.state = ProcState.REAPED

    def alloc_stack(self, pid: int) -> int:
        """A thread stack from the bmk heap (0 if there is no room).

        The allocator puts its header and alignment pad (16 bytes) in front
        of the user pointer; asking for exactly that much less than the
        configured size keeps a stack in one power-of-two block instead of
        the next larger one.
        """
        return self.heap.malloc(self.stack_bytes, 16, owner=pid, who=MEMWHO_WIREDBMK)

    @property
    def stack_bytes(self) -> int:
        return self.config.stack_size - 16

    @property
    def peak_memory(self) -> int:
        """The most guest memory (heap pages) the VM had committed at once."""
        return max(self.pages.peak_bytes, self.pages.used_bytes)

    def _spawn_main(self, argv: list[str | bytes], env: list[str | bytes]) -> Process:
        name = _b(argv[0]).decode(errors="replace").rsplit("/", 1)[-1] if argv else "main"
        fds = FdTable()
        fds.install(ConsoleFile(O_RDONLY, 0), fd=0)
        fds.install(ConsoleFile(O_WRONLY, 1), fd=1)
        fds.install(ConsoleFile(O_WRONLY, 2), fd=2)
        proc = self._new_process(self.init, fds, name)
        size = self.stack_bytes
        stack = self.alloc_stack(proc.pid)
        if not stack:
            self.close()
            raise ImageError(f"guest RAM ({self.config.ram} bytes) too small for a "
                             f"{self.config.stack_size}-byte stack")
        try:
            sp = build_stack(self.mem, self.loaded, stack + size, [_b(a) for a in argv],
                             [_b(e) for e in env])
        except GuestError as e:
            self.close()
            raise ImageError("arguments and environment do not fit on the stack") from e
        cpu = self.cpu
        cpu.set_reg(RSP, sp)
        cpu.set_reg(RIP, self.loaded.entry)
        self.new_lwp(proc, stack, stack, size, cpu.new_context())
        return proc

    # -- the syscall boundary ---------------------------------------------------------
    def _make_dispatcher(self) -> Callable[[ctypes.Array], None]:
        """The syscall entry: a closure over locals, since it runs for every syscall."""
        kernel, cpu = self, self.cpu
        table, ntable, hypercalls = self._table, len(self._table), self._hypercalls
        set_rax, stop = cpu.set_rax, cpu.stop

        def dispatch(regs: ctypes.Array) -> None:
            nr = regs[0]
            lwp = kernel.current
            kernel.syscalls += 1
            try:
                entry = table[nr] if nr < ntable else hypercalls.get(nr)
                if entry is None:
                    ret = kernel._unknown(nr)
                else:
                    fn, argc = entry
                    ret = fn(kernel, lwp, *regs[1 : argc + 1]) if argc else fn(kernel, lwp)
            except GuestError as e:
                ret = -e.errno
            except Block as b:
                kernel._park(lwp, b)
                return
            except BlockAfter as b:
                set_rax(b.value)
                kernel.sched.block(lwp.thread, None, b.why)
                stop()
                return
            except Exception as e:  # a kernel bug must not take the tender down
                kernel._internal_error(lwp, nr, e)
                return
            if ret.__class__ is int:
                set_rax(ret)
            elif ret is SWITCH:
                set_rax(0)
                stop()
            else:  # NORETURN
                stop()

        return dispatch

    def _on_syscall_traced(self, regs) -> None:
        nr, args = regs[0], list(regs[1:7])
        pid = self.current.proc.pid if self.current else 0
        self._dispatch(regs)
        if self._restart:
            result = "(blocked, will restart)"
        else:
            rax = self.cpu.reg(RAX)
            rax = rax - (1 << 64) if rax >> 63 else rax
            result = f"-{errno.errorcode.get(-rax, -rax)}" if -4096 < rax < 0 else f"{rax:#x}"
        log.info("[pid %d] %s(%s) = %s", pid, syscall_name(nr) if nr < 0x1000 else f"hc_{nr:#x}",
                 ", ".join(f"{a:#x}" for a in args), result)

    def _park(self, lwp: Lwp, b: Block) -> None:
        self.sched.block(lwp.thread, b.wq, b.why, b.until)
        self._restart = True
        self.cpu.stop()

    def _unknown(self, nr: int) -> int:
        if nr not in self._unknown_logged:
            self._unknown_logged.add(nr)
            log.warning("unsupported syscall %d (%s): returning ENOSYS", nr, syscall_name(nr))
        return -errno.ENOSYS

    def warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _internal_error(self, lwp: Lwp, nr: int, e: Exception) -> None:
        log.exception("internal error in syscall %s of pid %d", syscall_name(nr), lwp.proc.pid)
        report = (f"pid {lwp.proc.pid}: killed by SIGSYS: internal error in "
                  f"{syscall_name(nr)}: {type(e).__name__}: {e}")
        self.reports.append(report)
        lwp.proc.report = report
        try:
            self.exit_process(lwp.proc, signals.signaled_status(signals.SIGSYS))
        except Exception:
            log.exception("cleanup after internal error failed")
            self._stop_reason = "error"
        self.cpu.stop()

    # -- processes ---------------------------------------------------------------
    def exit_process(self, proc: Process, status: int) -> None:
        """End ``proc`` (exit or fatal signal): free, close, reparent, notify."""
        if proc.state is not ProcState.ALIVE:
            return
        proc.state = ProcState.ZOMBIE
        proc.status = status
        proc.ended = time.monotonic()
        for lwp in proc.lwps:
            self.sched.kill(lwp.thread)
            if lwp.stack:
                self.heap.free(lwp.stack, who=MEMWHO_WIREDBMK)
            if lwp.tls:
                self.heap.free(lwp.tls, who=MEMWHO_WIREDBMK)
        if self.remote is not None:
            # before the fds close: the supervisor re-parents our children before any
            # of them can see EOF on a pipe we held (as Linux orders it for them)
            self.remote.process_exited(proc)
        proc.fds.close_all(self)
        self._release_memory(proc)
        for child in list(proc.children.values()):
            if child.remote:  # the instance's supervisor re-parents it
                proc.children.pop(child.pid, None)
            else:
                self._reparent(child, self.init)
        parent = proc.parent
        if parent is not None and parent.vfork_child == proc.pid:
            parent.vfork_child = 0
            for lwp in parent.lwps:
                self.sched.make_runnable(lwp.thread)
        if parent is None:
            return
        if parent is self.init or parent.disposition(signals.SIGCHLD) == signals.SIG_IGN:
            self.reap(parent, proc)
        else:
            self.sched.wake_all(parent.child_wq)

    def _release_memory(self, proc: Process) -> None:
        """Free what ``proc`` owns, or hand it to a live descendant that may share it.

        In thread mode a forked child still sees its ancestors' heap through
        globals; freeing a parent's blocks while a child runs would let the
        child use freed memory.  The oldest live child inherits them instead
        and frees them when it ends.
        """
        heir = next((c for c in proc.children.values() if c.alive and not c.remote), None)
        if heir is None:
            self.heap.free_owner(proc.pid)
            for addr in list(proc.mmaps):
                self.pages.free(addr)
        else:
            self.heap.reown(proc.pid, heir.pid)
            heir.mmaps.update(proc.mmaps)
        proc.mmaps.clear()

    def _reparent(self, child: Process, new_parent: Process) -> None:
        old = child.parent
        if old is not None:
            old.children.pop(child.pid, None)
        child.parent, child.ppid = new_parent, new_parent.pid
        new_parent.children[child.pid] = child
        if new_parent is self.init and child.state is ProcState.ZOMBIE:
            self.reap(new_parent, child)

    def reap(self, parent: Process, child: Process) -> int:
        """Remove a zombie; its pid becomes free for ``kill`` (ESRCH)."""
        parent.children.pop(child.pid, None)
        child.state = ProcState.REAPED
        if child.remote and self.remote is not None:
            self.remote.child_reaped(parent, child)
        if child is not self.main:
            self.procs.pop(child.pid, None)
            if len(self.finished) < MAX_FINISHED:
                self.finished.append(_info(child))
        return child.status

    def post_signal(self, proc: Process, sig: int) -> bool:
        """Deliver ``sig`` with its disposition; True if it ended the process."""
        if sig == 0 or not proc.alive:
            return False
        if proc.remote:
            if self.remote is not None:
                self.remote.signal(self.current.proc if self.current else self.init, proc.pid, sig)
            return False
        disp = proc.disposition(sig)
        if sig in (signals.SIGKILL, signals.SIGSTOP):
            disp = signals.SIG_DFL
        if disp == signals.SIG_IGN:
            return False
        if disp != signals.SIG_DFL:
            proc.pending |= 1 << (sig - 1)  # a Linux sigset keeps signal n in bit n-1
            self.warn_once(f"handler:{sig}", "signal handlers are not run: %s to pid %d "
                           "left pending", signals.signame(sig), proc.pid)
            return False
        action = signals.default_action(sig)
        if action is not signals.Action.TERMINATE:
            return False
        proc.report = proc.report or f"pid {proc.pid}: killed by {signals.signame(sig)}"
        self.exit_process(proc, signals.signaled_status(sig))
        return True

    # -- the run loop ------------------------------------------------------------
    def run(self) -> RunResult:
        start = time.monotonic()
        token = None
        if self.config.timeout:
            token = WATCHDOG.arm(start + self.config.timeout, self._on_timeout)
        outcome = None
        try:
            outcome = self._loop()
        finally:
            if token is not None:
                WATCHDOG.cancel(token)
            self._stop_reason = self._stop_reason or "done"
            self._finished = True
        main = self.main
        if outcome is None:
            outcome = "exited" if main.status & 0x7F == 0 else "signaled"
        return RunResult(status=main.status, outcome=outcome, reports=list(self.reports),
                         elapsed=time.monotonic() - start, forks=self.forks,
                         syscalls=self.syscalls, peak_memory=self.peak_memory,
                         processes=self.process_table())

    # -- events from other threads (VM-clone: messages from the supervisor) ------------
    def post_event(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the VM's thread soon (thread safe); interrupts a running guest."""
        self._events.append(fn)
        if not self._finished:
            self.cpu.stop()
            self._notify()
            if not self._event_poke:
                # a stop that lands just before the loop enters the CPU is lost: poke
                # again until the loop has taken the event
                self._event_poke = True
                WATCHDOG.arm(time.monotonic() + EVENT_POKE, self._poke_events)

    def _poke_events(self) -> None:
        if self._events and not self._finished:
            self.cpu.stop()
            self._notify()
            WATCHDOG.arm(time.monotonic() + EVENT_POKE, self._poke_events)
        else:
            self._event_poke = False

    def _drain_events(self) -> None:
        while self._events:
            fn = self._events.popleft()
            try:
                fn()
            except Exception:
                log.exception("event handler failed")

    def add_remote_child(self, parent: Process, pid: int) -> Process:
        """A proxy for a child that runs in another VM; its exit arrives as an event."""
        child = Process(pid=pid, ppid=parent.pid, pgid=parent.pgid, sid=parent.sid,
                        fds=FdTable(), parent=parent, name=parent.name, remote=True)
        parent.children[pid] = child
        parent.child_wq.host = True
        return child

    def remote_child_exited(self, pid: int, status: int) -> None:
        """Event: a remote child ended (VM thread)."""
        for p in list(self.procs.values()):
            child = p.children.get(pid)
            if child is not None and child.remote and child.alive:
                child.state, child.status, child.ended = ProcState.ZOMBIE, status, time.monotonic()
                if p.vfork_child == pid:
                    p.vfork_child = 0
                    for lwp in p.lwps:
                        self.sched.make_runnable(lwp.thread)
                if p.disposition(signals.SIGCHLD) == signals.SIG_IGN:
                    self.reap(p, child)
                else:
                    self.sched.wake_all(p.child_wq)

    def _loop(self) -> str | None:
        cpu, sched = self.cpu, self.sched
        quantum = self.config.quantum
        while True:
            if self._events:
                self._drain_events()
            if self._stop_reason is not None:
                return self._stop_all(self._stop_reason)
            t = sched.pick()
            if t is None:
                if not sched.threads:
                    return None
                if self._wait_host():
                    continue
                return self._deadlock()
            if t is not self._loaded:
                if self._loaded is not None and self._loaded.state is not ThreadState.DEAD:
                    cpu.save(self._loaded.ctx)
                cpu.restore(t.ctx)
                self._loaded = t
                sched.switches += 1
            lwp = t.cookie
            self.current = lwp
            self._restart = False
            ex = cpu.run(quantum)
            if ex.kind is ExitKind.FAULT and t.state is not ThreadState.DEAD:
                self._fault(lwp, ex)
                continue
            if t.state is ThreadState.RUNNABLE:
                sched.runq.append(t)
            elif t.state is ThreadState.BLOCKED and self._restart:
                cpu.set_reg(RIP, cpu.reg(RIP) - SYSCALL_INSN_LEN)

    def _fault(self, lwp: Lwp, ex) -> None:
        insn = self.cpu.instruction_bytes(ex.rip)
        where = f" address={ex.address:#x}" if ex.address is not None else ""
        report = (f"pid {lwp.proc.pid}: {signals.signame(ex.signal)}: {ex.what} at "
                  f"rip={ex.rip:#x}{where} insn={insn.hex(' ') or '??'}")
        log.info("%s", report)  # callers print RunResult.reports
        self.reports.append(report)
        lwp.proc.report = report
        self.exit_process(lwp.proc, signals.signaled_status(ex.signal))

    def _wait_host(self) -> bool:
        """Nothing can run: wait for a timer or host event.  False if none can come."""
        sched = self.sched
        if self._events:
            return True
        if not sched.host_wakeable():
            return False
        timer = sched.next_timer()
        timeout = None if timer is None else max(0.0, timer - time.monotonic())
        if self.remote is not None and timer is None:
            # only another VM can wake us now: say so (the supervisor detects deadlocks)
            self.remote.idle(self.blocked_report())
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wakeup_r, selectors.EVENT_READ)
            host_fd = self.console.host_fd
            if self.console.input_wq.waiters and host_fd is not None and not self.console.input_eof:
                sel.register(host_fd, selectors.EVENT_READ)
            for key, _ in sel.select(timeout):
                if key.fd == self._wakeup_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wakeup_r, 4096)
                elif self.console.pump_host_input():
                    sched.wake_all(self.console.input_wq)
        finally:
            sel.close()
        return True

    def blocked_report(self) -> list[str]:
        """'pid N (name): what it waits on' for every blocked process."""
        return [f"  pid {t.cookie.proc.pid} ({t.cookie.proc.name}): {t.why or 'blocked'}"
                for t in self.sched.blocked()]

    def _deadlock(self) -> str:
        lines = ["deadlock: every process is blocked and nothing can wake it",
                 *self.blocked_report()]
        report = "\n".join(lines)
        log.info("%s", report)  # callers print RunResult.reports
        self.reports.append(report)
        return self._stop_all("deadlock")

    def _stop_all(self, reason: str) -> str:
        """End every live process with SIGKILL (time limit, deadlock, kill)."""
        if reason == "timeout":
            self.reports.append(f"time limit of {self.config.timeout:g} s exceeded: "
                                "all processes killed")
        for p in sorted(self.procs.values(), key=lambda p: -p.pid):
            if p.alive and p is not self.init:
                p.report = p.report or f"pid {p.pid}: killed ({reason})"
                self.exit_process(p, signals.signaled_status(signals.SIGKILL))
        return reason

    def _on_timeout(self) -> None:
        if self._stop_reason is None:
            self.request_stop("timeout")
            # the loop may be between runs; keep poking until it has noticed
            WATCHDOG.arm(time.monotonic() + 0.05, self._poke)

    def _poke(self) -> None:
        if not self._finished:
            self.cpu.stop()
            self._notify()
            WATCHDOG.arm(time.monotonic() + 0.05, self._poke)

    def request_stop(self, reason: str = "killed") -> None:
        """Stop the VM from another thread (kill, time limit)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if not self._finished:
            self.cpu.stop()
            self._notify()

    def _notify(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wakeup_w, b"!")

    # -- introspection -------------------------------------------------------------
    def process_table(self) -> list[ProcInfo]:
        """Every process of the run: live, zombie, and (up to MAX_FINISHED) reaped."""
        rows = self.finished + [_info(p) for p in self.procs.values()]
        return sorted(rows, key=lambda p: p.pid)

    def committed_memory(self) -> int:
        return self.pages.used_bytes

    def close(self) -> None:
        """Free the host resources of the VM (RAM buffer, emulator, wake-up pipe)."""
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1
        cpu = getattr(self, "cpu", None)
        if cpu is not None:
            cpu.close()
            del self.cpu
        self.heap = None  # drop the heap's view of RAM before unmapping
        self.mem.close()


def _info(p: Process) -> ProcInfo:
    return ProcInfo(p.pid, p.ppid, p.name, p.state.value, None if p.alive else p.status,
                    p.report)


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()

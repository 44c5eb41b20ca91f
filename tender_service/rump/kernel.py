"""The rump kernel of one VM: a process table with a CPU, a scheduler and the run loop.

Every guest ``syscall`` lands in the dispatcher of ``rump/dispatch.py``; a
handler's outcomes are listed in ``rump/outcomes.py``; processes, exit and
reaping are ``rump/proctable.py``, which ``Kernel`` inherits.

The run loop is Rumprun's scheduler loop: pick a runnable bmk thread, load
its CPU context, run until it blocks, yields, exits or faults.  When nothing
can run and nothing outside the VM can change that, the VM is deadlocked and
stops at once with a report of what each process waits on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tender_service.bmk.memalloc import MemAlloc
from tender_service.bmk.pagealloc import PageAllocator
from tender_service.bmk.sched import BmkThread, Scheduler, ThreadState, WaitQueue
from tender_service.machine.cpu import RAX, RIP, RSP, SYSCALL_INSN_LEN, Cpu, CpuExit, ExitKind
from tender_service.machine.elf import ElfImage
from tender_service.machine.errors import GuestError, ImageError
from tender_service.machine.layout import PAGE_SIZE
from tender_service.machine.loader import LoadedImage, build_stack, layout_memory, writable_spans
from tender_service.machine.memory import GuestMemory
from tender_service.machine.rootfs import RootFs
from tender_service.machine.vclock import GuestClock
from tender_service.machine.watchdog import WATCHDOG
from tender_service.rump import pgroups, sigframe, signals
from tender_service.rump.console import Console
from tender_service.rump.dispatch import make_dispatcher, traced
from tender_service.rump.fdtable import FdTable
from tender_service.rump.files import O_RDONLY, O_WRONLY, ConsoleFile
from tender_service.rump.fs import FileSystem
from tender_service.rump.inet import InetNames, InetSocket
from tender_service.rump.process import Lwp, Process, Program
from tender_service.rump.proctable import ProcessTable
from tender_service.rump.published import PublishedPorts
from tender_service.rump.socket import Socket, UnixNames
from tender_service.rump.spares import ImageSpares
from tender_service.rump.stacks import KeptBlocks
from tender_service.rump.timers import SIGEV_NONE, PosixTimer
from tender_service.rump.vfs import Vfs
from tender_service.rump.vminfo import RunResult, VmConfig

log = logging.getLogger(__name__)

#: seconds a VM-clone VM waits for another VM before it tells the supervisor it is idle
IDLE_GRACE = 0.002

#: translated blocks a guest runs per microsecond, about: a time slice's budget
BLOCKS_PER_MICROSECOND = 10

#: seconds between stops while an event that interrupts waits for the VM's loop
EVENT_POKE = 0.02


class Forker(Protocol):
    """A fork strategy (thread fork, VM clone); the layer above plugs it in."""

    mode: str
    #: True: clone(CLONE_VM) children share the parent's memory (see sys_clone)
    one_address_space: bool

    def fork(self, k: Kernel, lwp: Lwp, vfork: bool) -> int: ...


class RemoteHost(Protocol):
    """Where the other processes of the instance live (VM-clone fork).

    The rump layer calls it when something it does concerns a process of
    another VM; the layer above implements it over a transport.
    """

    def process_exited(self, proc: Process) -> None: ...

    def child_reaped(self, parent: Process, child: Process) -> None: ...

    def signal(self, sender: Process, pid: int, sig: int, code: int = 0, value: int = 0) -> int: ...

    def child_state(self, proc: Process, status: int) -> None:
        """``proc`` (this VM's) stopped or continued: tell its parent's VM."""

    def call(self, op: str, *args: int) -> int: ...

    def idle(self, blocked: list[str]) -> None: ...

    def polls_begin(self, lwp: Lwp) -> None:
        """``lwp`` starts looking at its files' readiness (poll, select, epoll_wait)."""

    def renamed(self, pid: int, name: str, exe: bytes) -> None:
        """``pid`` execs program ``exe`` under ``name`` (the instance's /proc shows it)."""

    def proc_stat(self, pid: int) -> tuple[int, int, int, int, str, str, bytes] | None:
        """(pid, ppid, pgid, sid, state, comm, exe) of a process of another VM, or None."""

    def proc_list(self) -> list[int]:
        """Every pid of the instance that /proc lists."""
        return []

    def listening(self, family: int, port: int) -> int:
        """A TCP socket of ours listens on ``port``: the instance's id for the
        listener, whose queue the supervisor holds (any VM may connect, and the host
        if the port is published)."""
        return 0

    def accept_shared(self, k: Kernel, lwp: Lwp, sock: InetSocket) -> Socket:
        """The next connection of a shared listener (Block while it waits)."""
        ...

    def connect_shared(self, k: Kernel, sock: InetSocket, lid: int, ip: bytes, port: int) -> None:
        """``sock`` connects to shared listener ``lid`` (0: whichever VM of the
        instance listens at ip:port): this VM's files hold the connected socket in
        its place from now on (ECONNREFUSED: no listener)."""
        ...

    def connect_out(self, k: Kernel, lwp: Lwp, sock: InetSocket, ip: bytes, port: int) -> None:
        """``sock`` connects to ip:port outside the instance (Block while the supervisor
        connects; ENETUNREACH if the instance may not): this VM's files hold the
        connected socket in its place from now on."""
        ...

    def listener_poll(self, lid: int) -> int:
        """poll events of a shared listener's queue (POLLIN: a connection waits); its
        next connection wakes this VM's threads in poll."""
        return 0

    def listener_closed(self, lid: int) -> None:
        """This VM's last reference to a shared listener is closed."""


class Kernel(ProcessTable):
    """One VM: machine + bmk + rump.  Build it, then call :meth:`run` once."""

    loaded: LoadedImage  # set by boot(): where the first program was laid out

    def __init__(
        self,
        config: VmConfig,
        console: Console,
        mem: GuestMemory,
        brk_base: int,
        pages: PageAllocator,
        heap: MemAlloc,
        forker: Forker | None = None,
    ) -> None:
        """A VM over prepared memory (see :meth:`boot`, and fork/snapshot.py's restore)."""
        config.validate()
        super().__init__()
        self.config = config
        self.console = console
        self.forker = forker
        self.remote: RemoteHost | None = None
        #: the host's ^C came (``_on_sigint``): KeyboardInterrupt once the CPU stopped
        self.host_interrupted = False
        #: work from other threads (VM-clone: the supervisor's messages) for the loop;
        #: a running guest's next syscall yields to it (see ``post_event``)
        self.events: deque[Callable[[], None]] = deque()
        self.mem = mem
        self.brk_base = brk_base
        self.pages = pages
        self.heap = heap
        self.cpu = Cpu(mem)
        #: freed program images kept with their translated code (rump/spares.py); the
        #: page allocator takes them back before it fails
        self.spares = ImageSpares(pages, self.cpu.forget_code)
        #: thread stacks and thread fork's TLS blocks, a few kept when processes end
        #: (rump/stacks.py)
        self.stacks = KeptBlocks.stacks(heap, self.stack_bytes)
        self.tls_blocks = KeptBlocks.tls(heap)
        pages.reclaim = self.drop_caches
        #: CLOCK_MONOTONIC/REALTIME as the vDSO and the clock syscalls give them
        self.clock = GuestClock.for_memory(mem)
        self.sched = Scheduler()
        self.futexes: dict[int, WaitQueue] = {}
        #: poll/select/epoll_wait sleep here; any file whose readiness changes wakes
        #: it (broad: the sleepers re-check their files), see ``poll_wake``
        self.poll_wq = WaitQueue("poll")
        #: AF_UNIX names bound in this kernel (rump/socket.py)
        self.unix_names = UnixNames()
        #: the instance's private loopback network, as seen by this kernel (rump/inet.py)
        self.inet = InetNames()
        #: ports published on the host (rump/published.py), set before the VM runs
        self.published: PublishedPorts | None = None
        self.current: Lwp | None = None
        self._loaded: BmkThread | None = None
        #: the syscall in progress parked its thread (it runs again when woken) or
        #: yielded to an event (it runs again once the loop has taken it)
        self.restart_pending = False
        #: a time slice as a budget of translated blocks (VmConfig.quantum is
        #: microseconds), counted by the CPU's block hook (machine/cpu.py)
        self._slice = config.quantum * BLOCKS_PER_MICROSECOND
        self._slice_seconds = config.quantum / 1e6
        #: the thread whose time slice runs and its wall-clock end: a thread that left
        #: the CPU only to take a signal or return from a handler (or for an event)
        #: goes on with the rest of its slice, not a new one (see ``_ran``)
        self.slice_owner: BmkThread | None = None
        self.slice_end = 0.0
        self._sliced = False  # the VM has had a reason for time slices (``_needs_slices``)
        self._stop_reason: str | None = None
        self._finished = False  # run() has returned: no more pokes
        self.reports: list[str] = []
        self.forks = 0
        self.pipe_bytes = 0  # bytes written into this VM's pipes
        #: called with the seconds each successful fork took (metrics)
        self.fork_observer: Callable[[float], None] | None = None
        #: the seconds each successful fork spent in this kernel (the first
        #: ``FORK_TIMES_KEPT``; ``RunResult.fork_seconds``)
        self.fork_seconds = array("d")
        self.syscalls = 0
        self._warned: set[str] = set()
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        #: threads waiting on a pipe ring (transports/pipe_ring.py), woken by a byte
        #: another VM writes to the wake-up pipe (``use_wake_fd``)
        self.ring_wq = WaitQueue("pipe ring", host=True)
        dispatch = make_dispatcher(self)
        # a traced VM logs every syscall: none is answered in C (rt_sigprocmask)
        self.cpu.hook_syscall(
            traced(self, dispatch) if config.trace_syscalls else dispatch,
            answer_here=not config.trace_syscalls,
        )
        if self._slice:
            self.cpu.enable_slices()  # before any guest block is translated
        #: the instance's file system (boot() gives it the image's tree; VM-clone a proxy)
        self.fs = Vfs(FileSystem(None, config.tmpfs_size))
        self.init = self.new_process(None, FdTable(), "init")
        #: the console as the controlling terminal of init's session (a tty console);
        #: a VM of a VM-clone instance asks the supervisor's instead
        self.terminal = (
            pgroups.Terminal(self.init.sid, self.init.pgid) if config.tty else (pgroups.Terminal())
        )

    @classmethod
    def boot(
        cls,
        image: ElfImage,
        argv: Sequence[str | bytes],
        env: Sequence[str | bytes],
        config: VmConfig,
        console: Console,
        forker: Forker | None = None,
        rootfs: RootFs | None = None,
    ) -> Kernel:
        """A VM that starts ``image`` as its first program (pid 2).

        ``rootfs`` (a baked image's tree) is the file system's read-only lower
        layer; without one the tree holds only /tmp, /dev and /proc.
        """
        config.validate()
        mem = GuestMemory(config.ram)
        try:
            loaded = layout_memory(mem, image)
            heap = loaded.heap
            pages = PageAllocator(heap.base, heap.size, PAGE_SIZE)
            k = cls(
                config,
                console,
                mem,
                loaded.region.end,
                pages,
                MemAlloc(mem.region_view(heap), heap.base, pages),
                forker,
            )
        except Exception:
            mem.close()
            raise
        if rootfs is not None:
            k.fs = Vfs(FileSystem(rootfs, config.tmpfs_size))
        k.loaded = loaded
        k.main = k._spawn_main(argv, env)
        return k

    # -- building ------------------------------------------------------------------
    def drop_caches(self) -> int:
        """Free what the kernel keeps only to be fast (program images with their
        translated code, thread stacks, TLS blocks): the page allocator's last resort
        before it fails, and a snapshot's first step.  Returns how many blocks were freed."""
        return self.spares.drop() + self.stacks.drop() + self.tls_blocks.drop()

    @property
    def stack_bytes(self) -> int:
        """The allocator puts its header and alignment pad (16 bytes) in front of the
        user pointer; asking for exactly that much less than the configured size keeps
        a stack in one power-of-two block instead of the next larger one."""
        return self.config.stack_size - 16

    @property
    def peak_memory(self) -> int:
        """The most guest memory (heap pages) the VM had committed at once."""
        return max(self.pages.peak_bytes, self.pages.used_bytes)

    def _spawn_main(self, argv: Sequence[str | bytes], env: Sequence[str | bytes]) -> Process:
        name = _b(argv[0]).decode(errors="replace").rsplit("/", 1)[-1] if argv else "main"
        fds = FdTable()
        fds.install(ConsoleFile(O_RDONLY, 0), fd=0)
        fds.install(ConsoleFile(O_WRONLY, 1), fd=1)
        fds.install(ConsoleFile(O_WRONLY, 2), fd=2)
        proc = self.new_process(self.init, fds, name)
        exe = _b(argv[0]) if argv else b""
        proc.exe = exe if exe.startswith(b"/") else b"/" + exe.rsplit(b"/", 1)[-1]
        size = self.stack_bytes
        stack = self.stacks.take(proc.pid)
        if not stack:
            self.close()
            raise ImageError(
                f"guest RAM ({self.config.ram} bytes) too small for a "
                f"{self.config.stack_size}-byte stack"
            )
        try:
            sp = build_stack(
                self.mem, self.loaded, stack + size, [_b(a) for a in argv], [_b(e) for e in env]
            )
        except GuestError as e:
            self.close()
            raise ImageError("arguments and environment do not fit on the stack") from e
        cpu = self.cpu
        cpu.set_reg(RSP, sp)
        cpu.set_reg(RIP, self.loaded.entry)
        self.new_lwp(proc, stack, stack, size, cpu.new_context())
        region = self.loaded.region
        path = _b(argv[0]) if argv else b"main"
        image = self.loaded.image
        self.boot_program = Program(
            path, region.base, region.size, False, 0, writable_spans(image), image.is_pie
        )
        self.use_program(proc, self.boot_program)
        return proc

    # -- the run loop ------------------------------------------------------------
    def run(self) -> RunResult:
        start = time.monotonic()
        token = None
        if self.config.timeout:
            token = WATCHDOG.arm(start + self.config.timeout, self._on_timeout)
        outcome = None
        old_sigint = self._take_sigint()
        try:
            outcome = self._loop()
        finally:
            if old_sigint is not None:
                handler, wakeup = old_sigint
                signal.signal(signal.SIGINT, handler)
                if wakeup is not None:
                    signal.set_wakeup_fd(wakeup)
            if token is not None:
                WATCHDOG.cancel(token)
            self._stop_reason = self._stop_reason or "done"
            self._finished = True
        main = self.main
        assert main is not None  # boot() or a restored snapshot made it
        if outcome is None:
            outcome = "exited" if main.status & 0x7F == 0 else "signaled"
        return RunResult(
            status=main.status,
            outcome=outcome,
            reports=list(self.reports),
            elapsed=time.monotonic() - start,
            forks=self.forks,
            syscalls=self.syscalls + self.cpu.answered,
            peak_memory=self.peak_memory,
            processes=self.process_table(),
            fork_seconds=list(self.fork_seconds),
        )

    def _take_sigint(self) -> tuple[Any, int | None] | None:
        """On the main thread with Python's own ^C handler: ours for the run; returns
        what to restore (the handler, the wake-up fd), None if not taken.  Python's raises
        KeyboardInterrupt wherever the main thread is, often in the syscall hook, where
        ctypes would swallow it and the guest run on; ours stops the CPU and wakes the
        loop, which raises it (``_ran``, ``_wait_fds``).  The kernel may deliver ^C to
        any thread of the process (a published port's I/O thread, the watchdog): the
        signal's C handler then writes to the wake-up pipe (``set_wakeup_fd``), or the
        main thread, asleep in poll with no timeout, would never run ours (an idle
        server ignored ^C; test_host_sigint.py)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        try:
            wakeup = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        except (OSError, ValueError):  # it fstats the fd: a jailed VM process may not
            wakeup = None
        return signal.signal(signal.SIGINT, self._on_sigint), wakeup

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.host_interrupted = True
        self.cpu.stop()
        self._notify()

    def _check_interrupt(self) -> None:
        if self.host_interrupted:
            self.host_interrupted = False
            raise KeyboardInterrupt

    # -- events from other threads (VM-clone: messages from the supervisor) ------------
    def post_event(self, fn: Callable[[], None], interrupt: bool = False) -> None:
        """Run ``fn`` on the VM's thread soon (thread safe).

        A blocked VM wakes at once; a running guest takes the event at its next
        syscall (or when it blocks, or its quantum ends).  ``interrupt`` stops a
        running guest at once: only for an event that ends its process (SIGKILL).
        Unicorn stops a guest from another thread after any memory access and
        resumes it at the start of that instruction, so an instruction whose store
        was done runs again (``addq $1, mem`` counts twice: unicorn#1355); a
        process that goes on running must never be stopped that way.
        """
        if not interrupt:
            self.events.append(fn)
            self.cpu.post_events()
            if not self._finished:
                self._notify()
            return
        taken = threading.Event()

        def run() -> None:
            taken.set()
            fn()

        self.events.append(run)
        self._interrupt(taken)

    def _interrupt(self, taken: threading.Event) -> None:
        """Stop the guest until the loop has taken an interrupting event (a stop that
        lands just before the loop enters the CPU is lost: poke again)."""
        if not taken.is_set() and not self._finished:
            self.cpu.stop()
            self._notify()
            WATCHDOG.arm(time.monotonic() + EVENT_POKE, lambda: self._interrupt(taken))

    def _drain_events(self) -> None:
        while self.events:
            fn = self.events.popleft()
            try:
                fn()
            except Exception:
                log.exception("event handler failed")

    def _take_host_events(self) -> None:
        """What other threads posted; while other threads run, a pipe ring's wake-up
        (when nothing runs, the wait in ``_wait_host`` sees it)."""
        if self.events:
            self._drain_events()
        if self.ring_wq.waiters and self.sched.runq:
            self._wait_fds(0)

    def _loop(self) -> str | None:
        cpu, sched = self.cpu, self.sched
        while True:
            self._take_host_events()
            if self._stop_reason is not None:
                return self._stop_all(self._stop_reason)
            t = sched.pick()
            if t is None:
                if not sched.threads:
                    return None
                if self._wait_host():
                    continue
                return self._deadlock()
            lwp = t.cookie
            if lwp.first_run is not None:  # copy fork: the child's relocation
                first, lwp.first_run = lwp.first_run, None
                first()
            proc = lwp.proc
            if proc.stopped:  # job control: it waits for SIGCONT, its syscall to restart
                self.park_stopped(lwp)
                continue
            if t is not self._loaded:
                if self._loaded is not None and self._loaded.state is not ThreadState.DEAD:
                    cpu.save(self._loaded.ctx)
                cpu.restore(t.ctx)
                self._loaded = t
                sched.switches += 1
            self.current = lwp
            # the return to user mode: signals are delivered here.  A woken syscall
            # runs again first (it may complete, as wait4 for an exited child does);
            # it is interrupted only when it would block again (``interrupted``)
            if (
                proc.pending & ~lwp.sigmask
                and (lwp.restart_nr < 0 or lwp.interrupted)
                and not sigframe.deliver(self, lwp)
            ):
                continue
            # (restart_nr is cleared when the parked syscall runs again, by the
            # dispatcher: a slice may end before it does, with rip still on it)
            self.restart_pending = False
            self.clock.tick()
            cpu.use_signal_cells(lwp.sigcell, proc.pendcell, bool(self.events))
            self._ran(lwp, cpu.run(self._budget(t) if self._needs_slices(proc) else 0))

    def _budget(self, t: BmkThread) -> int:
        """The blocks ``t`` may run now: the rest of its slice if it left the CPU
        within one (a signal, a handler's return), else a new slice."""
        now = time.monotonic()
        if self.slice_owner is t and now < self.slice_end:
            left = int(self._slice * (self.slice_end - now) / self._slice_seconds)
            return max(left, 1)
        self.slice_owner, self.slice_end = t, now + self._slice_seconds
        return self._slice

    def slice_used(self) -> bool:
        """The running thread's slice is over by the wall clock and another thread
        waits: the dispatcher preempts it at this syscall (a thread that makes many
        syscalls runs far fewer instructions than its budget in its slice's time)."""
        if self.sched.runq and self.slice_end and time.monotonic() >= self.slice_end:
            self.slice_owner = None
            return True
        return False

    def slices_needed(self) -> None:
        """A syscall made a reason for time slices (a second thread, a timer, a handler
        that a signal from another VM must run): the running thread gets its slice at
        once (the block hook reads it while the guest runs)."""
        t = self.current.thread if self.current is not None else None
        if self._slice and not self._sliced and t is not None:
            self._sliced = True
            self.cpu.arm(self._budget(t))

    def _needs_slices(self, proc: Process) -> bool:
        """Whether the guest runs in time slices (a budget of translated blocks).

        Preemption is the block hook's count, never a stop from another thread (that
        replays instructions: see ``Cpu.stop``).  The hook is in every block from
        the VM's start (``Cpu.enable_slices``): a VM without a reason for slices
        runs unarmed (a compare per block); once it has something that must get the
        CPU back from a guest that makes no syscalls (a second thread, an interval
        timer, or (VM-clone) a handler a signal from another VM must run), every run
        is a slice until the VM ends.
        """
        if self._sliced:
            return True
        if not self._slice:
            return False
        if (
            len(self.sched.threads) > 1
            or any(p.itimer[0] or _armed(p) for p in self.procs.values())
            or (self.remote is not None and signals.catches_any(proc))
        ):
            self._sliced = True
            return True
        return False

    def _ran(self, lwp: Lwp, ex: CpuExit) -> None:
        """After ``lwp`` ran: a fault, a requeue, or a blocked syscall to restart later."""
        self._check_interrupt()
        t, cpu = lwp.thread, self.cpu
        if ex.kind is ExitKind.FAULT and t.state is not ThreadState.DEAD:
            self._fault(lwp, ex)
            return
        if self.restart_pending and t.state is not ThreadState.DEAD:
            # parked in a syscall (or stopped short of parking by a signal): it runs
            # the syscall again when woken
            cpu.set_reg(RIP, cpu.reg(RIP) - SYSCALL_INSN_LEN)
            lwp.restart_nr = cpu.reg(RAX)
        if t.state is not ThreadState.RUNNABLE:
            return
        if not self._sliced:  # no slices: a signal for it is delivered before others run
            if lwp.proc.pending & ~lwp.sigmask:
                self.sched.runq.appendleft(t)
            else:
                self.sched.runq.append(t)
        elif self.slice_owner is t and cpu.stopped and time.monotonic() < self.slice_end:
            # it left the CPU within its slice (a signal to deliver, rt_sigreturn, an
            # event, an exec): it goes on with the rest of it.  Before, each sigreturn
            # sent it to the back and each signal gave it a new slice, so a flood of
            # signals starved it or its siblings
            self.sched.runq.appendleft(t)
        else:
            self.slice_owner = None  # its slice is used (or it yielded): the others run
            self.sched.runq.append(t)

    def _fault(self, lwp: Lwp, ex: CpuExit) -> None:
        """A CPU fault: the guest's handler for it runs, or the process dies (as Linux's
        force_sig_fault: a blocked or ignored fault signal kills all the same)."""
        proc, sig = lwp.proc, ex.signal
        handler = proc.disposition(sig)
        if handler not in (signals.SIG_DFL, signals.SIG_IGN) and not lwp.sigmask & signals.bit(sig):
            self.cpu.set_reg(RIP, ex.rip)
            if ex.address is not None:
                info = signals.SigInfo(
                    sig, _FAULT_CODE.get(sig, signals.SI_KERNEL), addr=ex.address
                )
            elif sig == signals.SIGSEGV:
                info = signals.SigInfo(sig, signals.SI_KERNEL, addr=0)
            else:
                info = signals.SigInfo(sig, _FAULT_CODE.get(sig, signals.SI_KERNEL), addr=ex.rip)
            proc.sigqueue.insert(0, info)
            proc.pending |= signals.bit(sig)
            lwp.restart_nr = -1
            if sigframe.deliver(self, lwp):
                self.sched.runq.appendleft(lwp.thread)
            return
        insn = self.cpu.instruction_bytes(ex.rip)
        where = f" address={ex.address:#x}" if ex.address is not None else ""
        report = (
            f"pid {lwp.proc.pid}: {signals.signame(ex.signal)}: {ex.what} at "
            f"rip={ex.rip:#x}{where} insn={insn.hex(' ') or '??'}"
        )
        log.info("%s", report)  # callers print RunResult.reports
        self.reports.append(report)
        lwp.proc.report = report
        self.exit_process(lwp.proc, signals.death_status(lwp.proc, ex.signal))

    def fire_itimer(self, proc: Process, deadline: float) -> None:
        """ITIMER_REAL of ``proc`` expired (VM thread): SIGALRM, and re-arm an interval."""
        if not proc.alive or not proc.itimer_token or proc.itimer[0] != deadline:
            return  # cancelled or re-armed since
        interval = proc.itimer[1]
        if interval:
            self.arm_itimer(proc, max(deadline + interval, time.monotonic()), interval)
        else:
            proc.itimer, proc.itimer_token = (0.0, 0.0), 0
        self.post_signal(proc, signals.SIGALRM, signals.SigInfo(signals.SIGALRM, signals.SI_KERNEL))

    def arm_itimer(self, proc: Process, deadline: float, interval: float) -> None:
        """Set (deadline > 0) or cancel ITIMER_REAL; it fires on the VM's thread."""
        if proc.itimer_token:
            WATCHDOG.cancel(proc.itimer_token)
        proc.itimer, proc.itimer_token = (deadline, interval), 0
        if deadline:
            self.slices_needed()  # the timer's signal must not wait for a syscall
            proc.itimer_token = WATCHDOG.arm(
                deadline, lambda: self.post_event(lambda: self.fire_itimer(proc, deadline))
            )

    def fire_ptimer(self, proc: Process, timer: PosixTimer, deadline: float) -> None:
        """A POSIX timer of ``proc`` expired (VM thread): its signal, or an overrun if
        the last one is still pending; a periodic timer is armed for its next period."""
        if not proc.alive or proc.timers.get(timer.id) is not timer or timer.deadline != deadline:
            return  # deleted, re-armed or disarmed since
        timer.token = 0
        missed = 0
        if timer.interval:
            missed = timer.missed(time.monotonic())
            self.arm_ptimer(proc, timer, timer.deadline, timer.interval)
        else:
            timer.deadline = 0.0
        if timer.queued:
            timer.overrun += 1 + missed
            return
        timer.overrun += missed
        timer.queued = True
        info = signals.SigInfo(timer.signo, signals.SI_TIMER, timer.id, 0, timer.value)
        info.timer = timer
        self.post_signal(proc, timer.signo, info)
        if not any(q.timer is timer for q in proc.sigqueue):
            timer.queued = False  # ignored, or taken at once: nothing pending to overrun

    def arm_ptimer(
        self, proc: Process, timer: PosixTimer, deadline: float, interval: float
    ) -> None:
        """Set (deadline > 0) or disarm a POSIX timer; a signalling one fires on the VM's
        thread through the watchdog, a SIGEV_NONE one is only ever read."""
        if timer.token:
            WATCHDOG.cancel(timer.token)
        timer.deadline, timer.interval, timer.token = deadline, interval, 0
        if deadline and timer.notify != SIGEV_NONE:
            self.slices_needed()  # its signal must not wait for a syscall
            timer.token = WATCHDOG.arm(
                deadline, lambda: self.post_event(lambda: self.fire_ptimer(proc, timer, deadline))
            )

    def _next_timer(self) -> float | None:
        """The earliest sleeper, interval timer (ITIMER_REAL) or POSIX timer of the VM."""
        timer = self.sched.next_timer()
        for p in self.procs.values():
            if p.itimer_token and (timer is None or p.itimer[0] < timer):
                timer = p.itimer[0]
            for t in p.timers.values():
                if t.token and (timer is None or t.deadline < timer):
                    timer = t.deadline
        return timer

    def _wait_host(self) -> bool:
        """Nothing can run: wait for a timer or host event.  False if none can come."""
        sched = self.sched
        if self.events:
            return True
        now = time.monotonic()
        for p in list(self.procs.values()):
            if p.itimer_token and p.itimer[0] <= now:
                self.fire_itimer(p, p.itimer[0])
                return True
            for t in list(p.timers.values()):
                if t.token and t.deadline <= now:
                    self.fire_ptimer(p, t, t.deadline)
                    return True
        timer = self._next_timer()
        # a server with published ports waits for its clients, as a VM-clone one does
        serving = self.published is not None and bool(self.published.guest_ports)
        if not sched.host_wakeable() and timer is None and not serving:
            return False
        timeout = None if timer is None else max(0.0, timer - time.monotonic())
        if self.remote is not None and timer is None:
            # only another VM can wake us now: say so (the supervisor detects deadlocks).
            # A reply on its way (a pipe's data) mostly comes within microseconds:
            # wait IDLE_GRACE first, saving a message and a report per wait
            if self._wait_fds(IDLE_GRACE) or self.events:
                return True
            self.remote.idle(self.blocked_report())
        self._wait_fds(timeout)
        return True

    def _wait_fds(self, timeout: float | None) -> bool:
        """Wait for the wake-up pipe or the console's input; True if either came.

        poll, not epoll: the console's stdin may be a regular file or /dev/null.  A
        plain ``select.poll`` (1.1 us) rather than a ``selectors`` object (3.9 us):
        a VM-clone VM waits here for every reply that does not come at once."""
        poller = select.poll()
        poller.register(self._wakeup_r, select.POLLIN)
        host_fd = self.console.host_fd
        if host_fd is not None:
            poller.register(host_fd, select.POLLIN)
        ready = poller.poll(None if timeout is None else math.ceil(timeout * 1e3))
        self._check_interrupt()
        for fd, _ in ready:
            if fd == self._wakeup_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wakeup_r, 4096)
                self.ring_woken()
            else:  # the readers read it themselves, as much as each asks
                self.sched.wake_all(self.console.input_wq)
        return bool(ready)

    def _deadlock(self) -> str:
        lines = [
            "deadlock: every process is blocked and nothing can wake it",
            *self.blocked_report(),
        ]
        report = "\n".join(lines)
        log.info("%s", report)  # callers print RunResult.reports
        self.reports.append(report)
        return self._stop_all("deadlock")

    def _stop_all(self, reason: str) -> str:
        """End every live process with SIGKILL (time limit, deadlock, kill)."""
        if reason == "timeout":
            self.reports.append(
                f"time limit of {self.config.timeout:g} s exceeded: all processes killed"
            )
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

    def use_wake_fd(self, fd: int) -> None:
        """Wake up through ``fd`` (a pipe open for reading and writing, which the
        supervisor made, and which this kernel now owns) instead of its own pipe:
        other VMs write to it when a pipe ring this VM waits on changes (the same poll
        then sees events, console input and ring wake-ups)."""
        os.set_blocking(fd, False)
        old = (self._wakeup_r, self._wakeup_w)
        self._wakeup_r = self._wakeup_w = fd
        for f in old:
            os.close(f)
        self._notify()  # what an old pipe held is not lost: look again

    def ring_woken(self) -> None:
        """A wake-up came: threads waiting on a pipe ring run their syscall again
        (the ring tells them whether they must still wait)."""
        if self.ring_wq.waiters:
            self.sched.wake_all(self.ring_wq)
        self.poll_wake()  # a thread in poll may wait on rings too

    # -- introspection -------------------------------------------------------------
    def poll_wake(self) -> None:
        """Some file's readiness changed: threads in poll/select/epoll_wait re-check."""
        if self.poll_wq.waiters:
            self.sched.wake_all(self.poll_wq)

    def warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def committed_memory(self) -> int:
        return self.pages.used_bytes

    def close(self) -> None:
        """Free the host resources of the VM (RAM buffer, emulator, wake-up pipe)."""
        for fd in dict.fromkeys((self._wakeup_r, self._wakeup_w)):  # one fd: use_wake_fd
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1
        cpu = getattr(self, "cpu", None)
        if cpu is not None:
            cpu.close()
            del self.cpu
        with contextlib.suppress(AttributeError):  # close() may run twice
            del self.heap  # drop the heap's view of RAM before unmapping
        self.mem.close()


#: si_code of a fault signal with an address
_FAULT_CODE = {
    signals.SIGSEGV: signals.SEGV_MAPERR,
    signals.SIGBUS: signals.BUS_ADRERR,
    signals.SIGILL: signals.ILL_ILLOPN,
    signals.SIGFPE: signals.FPE_INTDIV,
    signals.SIGTRAP: signals.TRAP_BRKPT,
}


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


def _armed(proc: Process) -> bool:
    """Whether ``proc`` has a POSIX timer that will send a signal."""
    return any(t.token for t in proc.timers.values())

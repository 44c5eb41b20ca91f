"""The process table of a VM: processes, their LWPs, exit, reaping, orphans, signals.

The rump layer's process bookkeeping, apart from the run loop (``rump/kernel.py``),
which inherits it: ``Kernel`` is a process table with a CPU and a scheduler.
Snapshots (VM-clone fork) export one process and rebuild it in the child VM
through :meth:`ProcessTable.export_process` and :meth:`ProcessTable.restore_process`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tender_service.bmk.sched import BmkThread, ThreadState
from tender_service.machine.watchdog import WATCHDOG
from tender_service.rump import signals
from tender_service.rump.fdtable import FdTable
from tender_service.rump.process import Creds, Lwp, Process, ProcState, Program
from tender_service.rump.vminfo import ProcInfo

if TYPE_CHECKING:
    from tender_service.bmk.memalloc import MemAlloc
    from tender_service.bmk.pagealloc import PageAllocator
    from tender_service.bmk.sched import Scheduler
    from tender_service.machine.cpu import Cpu
    from tender_service.rump.kernel import Forker, Kernel, RemoteHost
    from tender_service.rump.stacks import KeptBlocks

INIT_PID = 1
#: reaped processes remembered for the process table (``--ps``, describe)
MAX_FINISHED = 10_000
#: pending signal instances a process may have queued (Linux's RLIMIT_SIGPENDING role)
MAX_QUEUED = 1024


class ProcessTable:
    """Processes by pid, the init process (pid 1) and the launched program."""

    # provided by the kernel that inherits this table
    heap: MemAlloc
    pages: PageAllocator
    stacks: KeptBlocks
    tls_blocks: KeptBlocks
    sched: Scheduler
    remote: RemoteHost | None
    forker: Forker | None
    current: Lwp | None
    cpu: Cpu
    slices_needed: Callable[[], None]
    warn_once: Callable[..., None]

    def __init__(self) -> None:
        self.procs: dict[int, Process] = {}
        self.finished: list[ProcInfo] = []  # reaped processes, for the process table
        self._next_pid = INIT_PID
        self.init: Process
        self.main: Process | None = None
        #: the program the VM booted (or was restored with), in the "image" region
        self.boot_program: Program | None = None
        self.execs = 0

    def alloc_pid(self) -> int:
        pid = self._next_pid
        self._next_pid += 1
        return pid

    def new_process(
        self, parent: Process | None, fds: FdTable, name: str, pid: int | None = None
    ) -> Process:
        pid = self.alloc_pid() if pid is None else pid
        if parent is None:
            p = Process(pid=pid, ppid=0, pgid=pid, sid=pid, fds=fds, name=name)
        else:  # what fork(2) inherits, in the constructor (no default made and replaced)
            p = Process(
                pid=pid,
                ppid=parent.pid,
                pgid=parent.pgid,
                sid=parent.sid,
                fds=fds,
                parent=parent,
                name=name,
                sigactions=dict(parent.sigactions),
                brk=parent.brk,
                cwd=parent.cwd,
                umask=parent.umask,
                creds=parent.creds.copy(),
                exe=parent.exe,
                core_limit=parent.core_limit,
            )
            parent.children[pid] = p
            self.use_program(p, parent.program)
        self.procs[pid] = p
        return p

    def use_program(self, proc: Process, program: Program | None) -> None:
        """``proc`` runs ``program`` from now on (it leaves the one it ran)."""
        if program is not None:
            program.users += 1
        self.release_program(proc)
        proc.program = program

    def release_program(self, proc: Process) -> None:
        """``proc`` no longer runs its program: the last user frees exec'd pages."""
        prog, proc.program = proc.program, None
        if prog is None:
            return
        prog.users -= 1
        if prog.users == 0 and prog.in_pages:
            if prog.recycle is not None:
                prog.recycle(prog)
            else:
                self.pages.free(prog.base)

    def new_child(self, parent: Process) -> Process:
        """A process for a fork: same pgid/sid, copied fd table and dispositions."""
        return self.new_process(parent, parent.fds.copy(), parent.name)

    def new_lwp(
        self, proc: Process, stack: int, stack_base: int, stack_size: int, ctx: object
    ) -> Lwp:
        t = BmkThread(
            tid=proc.pid,
            name=f"{proc.name}:{proc.pid}",
            ctx=ctx,
            stack_base=stack_base,
            stack_size=stack_size,
        )
        lwp = Lwp(proc=proc, thread=t, tid=proc.pid, stack=stack)
        t.cookie = lwp
        proc.lwps.append(lwp)
        self.sched.add(t)
        if len(self.sched.threads) > 1:
            self.slices_needed()  # a second thread: it must get the CPU back
        return lwp

    def end_thread(self, t: BmkThread) -> None:
        """``t`` never runs again: off the scheduler, its saved context kept by the CPU
        for the next thread (the run loop never saves into or restores a dead
        thread's context)."""
        self.sched.kill(t)
        ctx, t.ctx = t.ctx, None
        if ctx is not None:
            self.cpu.keep_context(ctx)

    def discard_process(self, proc: Process) -> None:
        """Undo a fork that failed half way: the pid never ran."""
        self.release_program(proc)
        self.heap.free_owner(proc.pid)
        proc.fds.close_all(cast("Kernel", self))  # the Kernel class mixes this table in
        if proc.parent is not None:
            proc.parent.children.pop(proc.pid, None)
        self.procs.pop(proc.pid, None)
        proc.state = ProcState.REAPED

    def exit_process(self, proc: Process, status: int) -> None:
        """End ``proc`` (exit or fatal signal): free, close, reparent, notify."""
        if proc.state is not ProcState.ALIVE:
            return
        proc.state = ProcState.ZOMBIE
        proc.status = status
        proc.ended = time.monotonic()
        # a clone(CLONE_VM)/vfork child still runs on this stack and TLS: they go
        # to it with the rest of the memory (release_memory), as Linux keeps the mm
        borrowed = any(c.alive and c.vm_parent == proc.pid for c in proc.children.values())
        for lwp in proc.lwps:
            self.end_thread(lwp.thread)
            if lwp.stack and not borrowed:
                self.stacks.put(lwp.stack)
            if lwp.tls and not borrowed:
                self.tls_blocks.put(lwp.tls)
        if self.remote is not None and proc.vm_parent:
            # a clone(CLONE_VM) child that never exec'd: its pid was only leased
            assert self.forker is not None and hasattr(self.forker, "child_ended_here")
            self.forker.child_ended_here(proc.pid, status)
        elif self.remote is not None:
            # before the fds close: the supervisor re-parents our children before any
            # of them can see EOF on a pipe we held (as Linux orders it for them)
            self.remote.process_exited(proc)
        proc.fds.close_all(cast("Kernel", self))  # the Kernel class mixes this table in
        self.release_memory(proc)
        self.release_program(proc)
        for child in list(proc.children.values()):
            if child.remote:  # the instance's supervisor re-parents it
                proc.children.pop(child.pid, None)
            else:
                self._reparent(child, self.init)
        parent = proc.parent
        self.release_vfork_parent(proc)
        if proc.itimer_token:
            WATCHDOG.cancel(proc.itimer_token)
            proc.itimer_token, proc.itimer = 0, (0.0, 0.0)
        self.delete_ptimers(proc)
        proc.sigqueue.clear()
        proc.pending = 0
        if parent is not None:
            self._notify_exit(parent, proc, status)

    def _notify_exit(self, parent: Process, proc: Process, status: int) -> None:
        """The parent learns of the exit: a wake-up and SIGCHLD, or an automatic reap
        (init, SIGCHLD ignored, SA_NOCLDWAIT)."""
        if parent is self.init or parent.disposition(signals.SIGCHLD) == signals.SIG_IGN:
            self.reap(parent, proc)
            self.sched.wake_all(parent.child_wq)  # a wait with no child left: ECHILD
            return
        if parent.flags(signals.SIGCHLD) & signals.SA_NOCLDWAIT:
            self.reap(parent, proc)
        self.sched.wake_all(parent.child_wq)
        self.child_signal(parent, proc.pid, status)

    def leave_vm(self, proc: Process) -> None:
        """A clone(CLONE_VM) child exec'd into a VM of its own (VM-clone): it is no
        longer a process of this VM (its parent then holds a proxy of it)."""
        for lwp in proc.lwps:
            self.end_thread(lwp.thread)
        proc.lwps.clear()
        self.release_memory(proc)
        self.release_program(proc)
        proc.fds.close_all(cast("Kernel", self))
        self.release_vfork_parent(proc)
        if proc.parent is not None:
            proc.parent.children.pop(proc.pid, None)
        self.procs.pop(proc.pid, None)
        proc.state = ProcState.REAPED

    def release_vfork_parent(self, proc: Process) -> None:
        """``proc`` exited or exec'd: a parent suspended in vfork/CLONE_VFORK runs again."""
        parent = proc.parent
        if parent is not None and parent.vfork_child == proc.pid:
            parent.vfork_child = 0
            for lwp in parent.lwps:
                self.sched.make_runnable(lwp.thread)

    def release_memory(self, proc: Process) -> None:
        """Free what ``proc`` owns, or hand it to a live descendant that may share it.

        In thread mode a forked child still sees its ancestors' heap through
        globals; freeing a parent's blocks while a child runs would let the
        child use freed memory.  The oldest live child inherits them instead
        and frees them when it ends.  A clone(CLONE_VM) child's blocks are
        its parent's memory: they go back to the parent.  With private
        memory (copy fork) a forked child has copies of its own: only a
        clone(CLONE_VM) child, which runs in this memory, inherits it.
        """
        heir: Process | None = self.procs.get(proc.vm_parent) if proc.vm_parent else None
        private = getattr(getattr(self, "forker", None), "private_memory", False)
        if heir is None or not heir.alive:
            kids = [
                c
                for c in proc.children.values()
                if c.alive and not c.remote and (c.vm_parent == proc.pid or not private)
            ]
            # a child running in this memory first (it may be on our stack)
            kids.sort(key=lambda c: c.vm_parent != proc.pid)
            heir = kids[0] if kids else None
        if heir is None or not heir.alive:
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

    def post_signal(self, proc: Process, sig: int, info: signals.SigInfo | None = None) -> bool:
        """Send ``sig`` to ``proc`` (Linux's send_signal); True if it ended the process.

        A signal the process ignores is dropped, a fatal one with no handler ends the
        process at once, a stop signal stops it; anything else is queued (standard
        signals coalesce, real-time ones queue) and wakes a thread blocked in an
        interruptible call, to be delivered when it returns to user mode.
        """
        if sig == 0 or not proc.alive:
            return False
        if proc.remote:
            if self.remote is not None:
                me = self.current.proc if self.current else self.init
                if info is not None and info.code <= 0 and info.addr is None:
                    self.remote.signal(me, proc.pid, sig, info.code, info.value)
                else:
                    self.remote.signal(me, proc.pid, sig)
            return False
        if info is None:
            sender = self.current.proc.pid if self.current is not None else 0
            info = signals.SigInfo(sig, signals.SI_USER, pid=sender)
        b = signals.bit(sig)
        self._job_control(proc, sig)
        lwp = proc.lwps[0] if proc.lwps else None
        blocked = lwp is not None and bool(lwp.sigmask & b) and not b & signals.UNBLOCKABLE
        waited = lwp is not None and bool(lwp.sigwait & b)
        if not blocked and not waited:
            if (
                sig in (signals.SIGKILL, signals.SIGSTOP)
                or proc.disposition(sig) == signals.SIG_DFL
            ):
                return self.default_action(proc, sig)
            if proc.disposition(sig) == signals.SIG_IGN:
                return False
        if signals.is_realtime(sig) or not proc.pending & b:
            if len(proc.sigqueue) >= MAX_QUEUED:
                self.warn_once("sigqueue", "pid %d: signal queue full, dropped", proc.pid)
                return False
            proc.sigqueue.append(info)
            proc.pending |= b
        if lwp is not None and (waited or not blocked):
            self._signal_wake(lwp)
        return False

    def _job_control(self, proc: Process, sig: int) -> None:
        """What sending a stop signal or SIGCONT does at once, whatever the disposition."""
        if signals.bit(sig) & signals.STOP_SIGNALS:
            self._discard(proc, signals.bit(signals.SIGCONT))
        elif sig == signals.SIGCONT:
            self._discard(proc, signals.STOP_SIGNALS)
            if proc.stopped:
                self.continue_process(proc)

    def _discard(self, proc: Process, mask: int) -> None:
        if proc.pending & mask:
            proc.sigqueue = [q for q in proc.sigqueue if not signals.bit(q.signo) & mask]
            proc.pending &= ~mask

    def _signal_wake(self, lwp: Lwp) -> None:
        """A signal for ``lwp`` is ready: interrupt its blocked syscall, or make the
        running thread come back to the loop, which delivers it."""
        t = lwp.thread
        if lwp is self.current:
            self.cpu.stop()
        if t.state is ThreadState.BLOCKED and lwp.restart_nr >= 0 and not lwp.proc.stopped:
            self.sched.make_runnable(t)

    def delete_ptimers(self, proc: Process) -> None:
        """exit and exec: the process's POSIX timers go (a signal already sent stays)."""
        for timer in proc.timers.values():
            if timer.token:
                WATCHDOG.cancel(timer.token)
            timer.deadline, timer.token = 0.0, 0
        proc.timers.clear()

    def default_action(self, proc: Process, sig: int) -> bool:
        """What a signal with no handler does; True if it ended the process."""
        action = signals.default_action(sig)
        if sig == signals.SIGKILL or action is signals.Action.TERMINATE:
            proc.report = proc.report or f"pid {proc.pid}: killed by {signals.signame(sig)}"
            self.exit_process(proc, signals.death_status(proc, sig))
            return True
        if action is signals.Action.STOP:
            self.stop_process(proc, sig)
        return False

    def stop_process(self, proc: Process, sig: int) -> None:
        """Job control: ``proc`` stops until SIGCONT; its parent may see it (WUNTRACED)."""
        if proc.stopped or not proc.alive:
            return
        proc.stopped = True
        proc.state_report = signals.stopped_status(sig)
        proc.stop_wq.host = self.remote is not None  # SIGCONT may come from another VM
        for lwp in proc.lwps:
            if lwp.thread.state is ThreadState.RUNNABLE:
                self.park_stopped(lwp)
            elif lwp.restart_nr >= 0:  # blocked in a call: it stays there, interrupted
                lwp.interrupted = True
            if lwp is self.current:
                self.cpu.stop()
        self._notify_parent(proc, signals.CLD_STOPPED, sig)

    def park_stopped(self, lwp: Lwp) -> None:
        """``lwp`` of a stopped process waits for SIGCONT.  A syscall it was in counts
        as interrupted: once continued, the signals pending then (SIGCONT's handler, a
        SIGINT) are delivered before it restarts, as Linux's stop happens in signal
        delivery, after the call was interrupted (EINTR without SA_RESTART)."""
        if lwp.restart_nr >= 0:
            lwp.interrupted = True
        self.sched.block(lwp.thread, lwp.proc.stop_wq, "stopped")

    def continue_process(self, proc: Process) -> None:
        proc.stopped = False
        proc.state_report = signals.CONTINUED_STATUS
        self.sched.wake_all(proc.stop_wq)
        self._notify_parent(proc, signals.CLD_CONTINUED, signals.SIGCONT)

    def _notify_parent(self, proc: Process, code: int, status: int) -> None:
        """A stop or continue: wake the parent's wait, send SIGCHLD (not with SA_NOCLDSTOP)."""
        parent = proc.parent
        if parent is None and self.remote is not None:
            self.remote.child_state(proc, proc.state_report)
            return
        if parent is None or parent is self.init or not parent.alive:
            return
        self.sched.wake_all(parent.child_wq)
        if not parent.flags(signals.SIGCHLD) & signals.SA_NOCLDSTOP:
            self.post_signal(
                parent, signals.SIGCHLD, signals.SigInfo(signals.SIGCHLD, code, proc.pid, 0, status)
            )

    def child_signal(self, parent: Process, pid: int, status: int) -> None:
        """SIGCHLD for a child that ended with wait status ``status``."""
        if status & 0x7F == 0:
            code, value = signals.CLD_EXITED, (status >> 8) & 0xFF
        else:
            code = signals.CLD_DUMPED if status & 0x80 else signals.CLD_KILLED
            value = status & 0x7F
        self.post_signal(
            parent, signals.SIGCHLD, signals.SigInfo(signals.SIGCHLD, code, pid, 0, value)
        )

    def remote_child_state(self, pid: int, status: int) -> None:
        """Event: a child in another VM stopped or continued (VM-clone)."""
        for p in list(self.procs.values()):
            child = p.children.get(pid)
            if child is not None and child.remote and child.alive:
                child.state_report = status
                self.sched.wake_all(p.child_wq)
                code = (
                    signals.CLD_CONTINUED
                    if status == signals.CONTINUED_STATUS
                    else (signals.CLD_STOPPED)
                )
                if not p.flags(signals.SIGCHLD) & signals.SA_NOCLDSTOP:
                    sig = signals.SIGCONT if code == signals.CLD_CONTINUED else (status >> 8) & 0xFF
                    self.post_signal(
                        p, signals.SIGCHLD, signals.SigInfo(signals.SIGCHLD, code, pid, 0, sig)
                    )

    def add_remote_child(self, parent: Process, pid: int) -> Process:
        """A proxy for a child that runs in another VM; its exit arrives as an event."""
        child = Process(
            pid=pid,
            ppid=parent.pid,
            pgid=parent.pgid,
            sid=parent.sid,
            fds=FdTable(),
            parent=parent,
            name=parent.name,
            remote=True,
        )
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
                self._notify_exit(p, child, status)

    def blocked_report(self) -> list[str]:
        """'pid N (name): what it waits on' for every blocked process."""
        return [
            f"  pid {t.cookie.proc.pid} ({t.cookie.proc.name}): {t.why or 'blocked'}"
            for t in self.sched.blocked()
        ]

    def process_table(self) -> list[ProcInfo]:
        """Every process of the run: live, zombie, and (up to MAX_FINISHED) reaped."""
        rows = self.finished + [_info(p) for p in self.procs.values()]
        return sorted(rows, key=lambda p: p.pid)

    # -- snapshots (VM-clone fork) ----------------------------------------------------
    def export_process(self, lwp: Lwp, child_pid: int) -> dict:
        """The state of the process of ``lwp`` as its fork child ``child_pid`` starts
        with it (plain JSON-able data; fds and registers are the snapshot's)."""
        proc, t = lwp.proc, lwp.thread
        return {
            "process": {
                "pid": child_pid,
                "ppid": proc.pid,
                "pgid": proc.pgid,
                "sid": proc.sid,
                "name": proc.name,
                "pending": 0,
                "brk": proc.brk,
                "sigactions": [[sig, *act] for sig, act in sorted(proc.sigactions.items())],
                "mmaps": sorted(proc.mmaps.items()),
                "owner": proc.pid,
                "program": _program_state(proc.program),
                "cwd": proc.cwd,
                "umask": proc.umask,
                "creds": proc.creds.to_state(),
                "exe": proc.exe.decode(errors="surrogateescape"),
                "core_limit": list(proc.core_limit),
            },
            "lwp": {
                "stack": lwp.stack,
                "stack_base": t.stack_base,
                "stack_size": t.stack_size,
                "tls": lwp.tls,
                "sigmask": lwp.sigmask,
            },
        }

    def restore_process(self, state: dict, fds: FdTable, ctx: object) -> Process:
        """Rebuild the process of :meth:`export_process` as this VM's main process,
        running on the saved context ``ctx``; it owns the heap blocks its parent did.
        ``state`` comes checked (the snapshot decoder refuses pids <= INIT_PID)."""
        p, lw = state["process"], state["lwp"]
        pid = int(p["pid"])
        proc = self.new_process(None, fds, str(p["name"]), pid=pid)
        proc.ppid, proc.pgid, proc.sid = int(p["ppid"]), int(p["pgid"]), int(p["sid"])
        proc.brk = int(p["brk"])
        proc.cwd, proc.umask = int(p.get("cwd", proc.cwd)), int(p.get("umask", 0o022)) & 0o777
        proc.exe = str(p.get("exe", "")).encode(errors="surrogateescape")
        proc.creds = Creds.from_state(p.get("creds") or {})
        soft, hard = p.get("core_limit", proc.core_limit)
        proc.core_limit = (int(soft), int(hard))
        proc.sigactions = {
            int(a[0]): (int(a[1]), int(a[2]), int(a[3]), int(a[4])) for a in p["sigactions"]
        }
        proc.mmaps = {int(a): int(n) for a, n in p["mmaps"]}
        prog = p.get("program")
        if prog:
            path, base, size, in_pages = prog
            proc.program = Program(bytes.fromhex(str(path)), int(base), int(size), bool(in_pages))
            proc.program.users = 1
            if not proc.program.in_pages:
                self.boot_program = proc.program
        self._next_pid = max(self._next_pid, pid + 1)
        self.heap.reown(int(p["owner"]), pid)
        lwp = self.new_lwp(
            proc, int(lw["stack"]), int(lw["stack_base"]), int(lw["stack_size"]), ctx
        )
        lwp.tls, lwp.sigmask = int(lw["tls"]), int(lw["sigmask"])
        self.main = proc
        return proc


def _program_state(prog: Program | None) -> list | None:
    return None if prog is None else [prog.path.hex(), prog.base, prog.size, prog.in_pages]


def _info(p: Process) -> ProcInfo:
    return ProcInfo(p.pid, p.ppid, p.name, p.state.value, None if p.alive else p.status, p.report)

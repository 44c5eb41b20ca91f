"""The syscall table: Linux x86-64 number -> (handler, support level, note).

One table maps numbers to handlers; the handlers live with their family, one
module each (``sys_io``, ``sys_fs``, ``sys_pipe``, ``sys_process``, ``sys_signal``,
``sys_memory``, ``sys_time``, ``sys_sched``, ``sys_futex``, ``sys_system``, as
gVisor's ``sys_*.go``).  The table is also
the documentation: ``unifork syscalls`` and docs/syscalls.md are generated
from it, so the list of what is supported cannot drift from the code.
Anything not listed returns ENOSYS and is logged once with its name.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tender_service.machine import hypercalls as hc
from tender_service.rump.syscalls import (
    sys_creds,
    sys_exec,
    sys_fs,
    sys_futex,
    sys_io,
    sys_memory,
    sys_pipe,
    sys_poll,
    sys_process,
    sys_sched,
    sys_signal,
    sys_socket,
    sys_system,
    sys_time,
)
from tender_service.rump.syscalls.names import syscall_name


class Support(enum.Enum):
    FULL = "supported"
    PARTIAL = "partial"
    ERROR = "fixed error"  # always fails with a documented errno


@dataclass(frozen=True, slots=True)
class Entry:
    nr: int
    name: str
    handler: Callable[..., object]
    support: Support
    note: str = ""

    @property
    def argc(self) -> int:
        return self.handler.__code__.co_argcount - 2


F, P, E = Support.FULL, Support.PARTIAL, Support.ERROR

SYSCALLS: list[tuple[int, Callable[..., object], Support, str]] = [
    # io (open files of any kind)
    (0, sys_io.sys_read, F, ""),
    (1, sys_io.sys_write, F, ""),
    (3, sys_io.sys_close, F, ""),
    (8, sys_io.sys_lseek, F, "files and directories; ESPIPE on console and pipes"),
    (16, sys_io.sys_ioctl, P, "TCGETS/TIOCGWINSZ on a tty console, FIONREAD, FIONBIO"),
    (17, sys_io.sys_pread64, F, "files; ESPIPE on pipes and the console"),
    (18, sys_io.sys_pwrite64, F, "files (O_APPEND appends, as Linux); ESPIPE on pipes"),
    (19, sys_io.sys_readv, F, ""),
    (20, sys_io.sys_writev, F, "atomic for pipes like write"),
    (32, sys_io.sys_dup, F, ""),
    (40, sys_io.sys_sendfile, F, "from a file to any writable fd; 4 MiB at most per call"),
    (33, sys_io.sys_dup2, F, ""),
    (
        72,
        sys_io.sys_fcntl,
        P,
        "F_DUPFD(_CLOEXEC), F_GETFD/SETFD, F_GETFL/SETFL, record locks F_(OFD_)GETLK/SETLK(W); "
        "no EDEADLK detection",
    ),
    (73, sys_io.sys_flock, F, "per open file description, across VMs too"),
    (74, sys_io.sys_fsync, F, "memory is the storage; EINVAL on pipes and the console"),
    (75, sys_io.sys_fsync, F, "fdatasync: as fsync"),
    (217, sys_io.sys_getdents64, F, "tree directories, /proc"),
    (292, sys_io.sys_dup3, F, ""),
    # file system (paths): one tree per instance, rump/fs.py
    (2, sys_fs.sys_open, F, "O_CREAT/EXCL/TRUNC/APPEND/DIRECTORY/NOFOLLOW/CLOEXEC; /dev, /proc"),
    (4, sys_fs.sys_stat, F, ""),
    (5, sys_fs.sys_fstat, F, ""),
    (6, sys_fs.sys_lstat, F, ""),
    (21, sys_fs.sys_access, F, "root: only X_OK can fail (EACCES without an x bit)"),
    (76, sys_fs.sys_truncate, F, "ENOSPC past the instance's tmpfs size"),
    (77, sys_fs.sys_ftruncate, F, ""),
    (79, sys_fs.sys_getcwd, F, ""),
    (80, sys_fs.sys_chdir, F, ""),
    (81, sys_fs.sys_fchdir, F, ""),
    (82, sys_fs.sys_rename, F, ""),
    (83, sys_fs.sys_mkdir, F, ""),
    (84, sys_fs.sys_rmdir, F, ""),
    (85, sys_fs.sys_creat, F, ""),
    (86, sys_fs.sys_link, F, ""),
    (87, sys_fs.sys_unlink, F, ""),
    (88, sys_fs.sys_symlink, F, ""),
    (89, sys_fs.sys_readlink, F, "also /proc/self/exe, /proc/self/fd/N"),
    (90, sys_fs.sys_chmod, F, ""),
    (91, sys_fs.sys_fchmod, F, ""),
    (92, sys_fs.sys_chown, F, "as root: recorded (st_uid/st_gid); set-id bits dropped"),
    (93, sys_fs.sys_fchown, F, "as chown"),
    (94, sys_fs.sys_lchown, F, "as chown, on the link itself"),
    (95, sys_fs.sys_umask, F, "per process, inherited at fork"),
    (137, sys_fs.sys_statfs, F, "TMPFS_MAGIC (the instance's tree, its size limit), /proc"),
    (138, sys_fs.sys_fstatfs, F, "as statfs"),
    (257, sys_fs.sys_openat, F, "as open"),
    (258, sys_fs.sys_mkdirat, F, ""),
    (262, sys_fs.sys_newfstatat, F, "AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW"),
    (260, sys_fs.sys_fchownat, F, "AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH"),
    (263, sys_fs.sys_unlinkat, F, "AT_REMOVEDIR"),
    (264, sys_fs.sys_renameat, F, ""),
    (265, sys_fs.sys_linkat, F, "AT_SYMLINK_FOLLOW"),
    (266, sys_fs.sys_symlinkat, F, ""),
    (267, sys_fs.sys_readlinkat, F, ""),
    (268, sys_fs.sys_fchmodat, F, ""),
    (269, sys_fs.sys_faccessat, F, "as access"),
    (280, sys_fs.sys_utimensat, F, "UTIME_NOW, UTIME_OMIT, futimens"),
    (316, sys_fs.sys_renameat2, P, "flags 0 only (EINVAL otherwise)"),
    (332, sys_fs.sys_statx, F, "STATX_BASIC_STATS"),
    (439, sys_fs.sys_faccessat2, F, "AT_SYMLINK_NOFOLLOW, AT_EACCESS"),
    # pipes
    (22, sys_pipe.sys_pipe, F, "64 KiB, PIPE_BUF 4096 atomic"),
    (293, sys_pipe.sys_pipe2, F, "O_NONBLOCK, O_CLOEXEC"),
    # readiness
    (7, sys_poll.sys_poll, F, "pipes, sockets, eventfd, epoll, console, files"),
    (271, sys_poll.sys_ppoll, F, "temporary signal mask"),
    (23, sys_poll.sys_select, F, "FD_SETSIZE 1024; the timeval is updated"),
    (270, sys_poll.sys_pselect6, F, "temporary signal mask"),
    (213, sys_poll.sys_epoll_create, F, ""),
    (291, sys_poll.sys_epoll_create1, F, "EPOLL_CLOEXEC"),
    (
        233,
        sys_poll.sys_epoll_ctl,
        P,
        "EPOLLET, EPOLLONESHOT; EPOLLEXCLUSIVE accepted, all waiters woken",
    ),
    (232, sys_poll.sys_epoll_wait, F, "level and edge triggered"),
    (281, sys_poll.sys_epoll_pwait, F, "temporary signal mask"),
    (441, sys_poll.sys_epoll_pwait2, F, "timespec timeout"),
    (284, sys_poll.sys_eventfd, F, ""),
    (290, sys_poll.sys_eventfd2, F, "EFD_SEMAPHORE, EFD_NONBLOCK, EFD_CLOEXEC"),
    # sockets
    (41, sys_socket.sys_socket, P, "AF_UNIX stream/datagram; AF_INET/AF_INET6 TCP/UDP on loopback"),
    (53, sys_socket.sys_socketpair, P, "AF_UNIX stream and datagram"),
    (49, sys_socket.sys_bind, P, "AF_UNIX paths and abstract names; loopback/any ports"),
    (50, sys_socket.sys_listen, F, ""),
    (43, sys_socket.sys_accept, F, ""),
    (288, sys_socket.sys_accept4, F, "SOCK_NONBLOCK, SOCK_CLOEXEC"),
    (42, sys_socket.sys_connect, P, "names and ports of this VM (VM-clone: not another VM's)"),
    (48, sys_socket.sys_shutdown, F, ""),
    (44, sys_socket.sys_sendto, F, "MSG_DONTWAIT, MSG_NOSIGNAL"),
    (45, sys_socket.sys_recvfrom, F, "MSG_PEEK, MSG_WAITALL, MSG_TRUNC, MSG_DONTWAIT"),
    (46, sys_socket.sys_sendmsg, F, "SCM_RIGHTS (VM-clone: kinds a fork hands on)"),
    (47, sys_socket.sys_recvmsg, F, "SCM_RIGHTS, MSG_CMSG_CLOEXEC, MSG_CTRUNC"),
    (51, sys_socket.sys_getsockname, F, ""),
    (52, sys_socket.sys_getpeername, F, ""),
    (54, sys_socket.sys_setsockopt, P, "buffer sizes kept; other options recorded"),
    (55, sys_socket.sys_getsockopt, P, "SOL_SOCKET: SO_TYPE, SO_ERROR, SO_*BUF, recorded values"),
    # memory
    (
        9,
        sys_memory.sys_mmap,
        P,
        "anonymous, /dev/zero, files (a private copy; MAP_SHARED read-only); "
        "MAP_FIXED only inside existing mappings",
    ),
    (10, sys_memory.sys_mprotect, P, "no MMU: succeeds without effect, as on Rumprun"),
    (
        11,
        sys_memory.sys_munmap,
        P,
        "whole mappings freed; a trimmed tail is freed with the mapping",
    ),
    (12, sys_memory.sys_brk, P, "the break cannot grow (musl falls back to mmap)"),
    (25, sys_memory.sys_mremap, P, "grows in place inside the buddy block, else MREMAP_MAYMOVE"),
    (28, sys_memory.sys_madvise, P, "MADV_DONTNEED zeroes; other advice ignored"),
    # signals
    (13, sys_signal.sys_rt_sigaction, F, "handlers run on a Linux rt_sigframe; every SA_ flag"),
    (14, sys_signal.sys_rt_sigprocmask, F, ""),
    (15, sys_signal.sys_rt_sigreturn, F, "a frame it cannot read: SIGSEGV"),
    (34, sys_signal.sys_pause, F, ""),
    (36, sys_signal.sys_getitimer, P, "ITIMER_REAL only"),
    (37, sys_signal.sys_alarm, F, ""),
    (38, sys_signal.sys_setitimer, P, "ITIMER_REAL only (EINVAL for CPU-time timers)"),
    (62, sys_signal.sys_kill, F, "pid, 0, -1, -pgid; across VMs in VM-clone mode"),
    (127, sys_signal.sys_rt_sigpending, F, ""),
    (128, sys_signal.sys_rt_sigtimedwait, F, ""),
    (129, sys_signal.sys_rt_sigqueueinfo, F, "si_code and si_value cross VMs too"),
    (130, sys_signal.sys_rt_sigsuspend, F, ""),
    (131, sys_signal.sys_sigaltstack, F, ""),
    (200, sys_signal.sys_tkill, F, ""),
    (234, sys_signal.sys_tgkill, F, ""),
    (
        222,
        sys_signal.sys_timer_create,
        P,
        "REALTIME, MONOTONIC, BOOTTIME; SIGEV_SIGNAL, SIGEV_NONE (SIGEV_THREAD_ID, so musl's SIGEV_THREAD: EINVAL)",
    ),
    (223, sys_signal.sys_timer_settime, F, "TIMER_ABSTIME; overruns while the signal is pending"),
    (224, sys_signal.sys_timer_gettime, F, ""),
    (225, sys_signal.sys_timer_getoverrun, F, ""),
    (226, sys_signal.sys_timer_delete, F, ""),
    # processes
    (39, sys_process.sys_getpid, F, ""),
    (
        56,
        sys_process.sys_clone,
        P,
        "fork form, and CLONE_VM|CLONE_VFORK with a stack (posix_spawn); else ENOSYS",
    ),
    (57, sys_process.sys_fork, F, "by the instance's fork strategy (thread or vmclone)"),
    (58, sys_process.sys_vfork, P, "a fork; the parent waits until the child execs or exits"),
    (59, sys_exec.sys_execve, F, "ELF (static, static-PIE) and #! scripts from the file system"),
    (60, sys_process.sys_exit, F, "ends the process (one LWP per process)"),
    (61, sys_process.sys_wait4, F, "Linux status words, WNOHANG, pid/-1/0/-pgid; rusage zeroed"),
    (
        97,
        sys_process.sys_getrlimit,
        P,
        "STACK, NOFILE, NPROC, AS from the VM config; CORE per process (WCOREDUMP)",
    ),
    (98, sys_process.sys_getrusage, P, "zeroed"),
    (102, sys_creds.sys_getuid, F, "root until the program sets another"),
    (104, sys_creds.sys_getgid, F, ""),
    (105, sys_creds.sys_setuid, F, "Linux's rules: root (euid 0) sets all three ids"),
    (106, sys_creds.sys_setgid, F, "Linux's rules: euid 0 sets all three ids"),
    (107, sys_creds.sys_geteuid, F, ""),
    (108, sys_creds.sys_getegid, F, ""),
    (109, sys_process.sys_setpgid, F, ""),
    (110, sys_process.sys_getppid, F, ""),
    (111, sys_process.sys_getpgrp, F, ""),
    (112, sys_process.sys_setsid, F, ""),
    (113, sys_creds.sys_setreuid, F, ""),
    (114, sys_creds.sys_setregid, F, ""),
    (115, sys_creds.sys_getgroups, F, "none until setgroups"),
    (116, sys_creds.sys_setgroups, F, "euid 0 only (EPERM), as CAP_SETGID"),
    (117, sys_creds.sys_setresuid, F, ""),
    (118, sys_creds.sys_getresuid, F, ""),
    (119, sys_creds.sys_setresgid, F, ""),
    (120, sys_creds.sys_getresgid, F, ""),
    (122, sys_creds.sys_setfsuid, P, "fsuid is the euid: returns it, changes nothing"),
    (123, sys_creds.sys_setfsgid, P, "fsgid is the egid: returns it, changes nothing"),
    (121, sys_process.sys_getpgid, F, ""),
    (124, sys_process.sys_getsid, F, ""),
    (
        160,
        sys_process.sys_setrlimit,
        P,
        "NOFILE may be lowered; CORE kept per process; others accepted, fixed by config",
    ),
    (186, sys_process.sys_gettid, F, ""),
    (218, sys_process.sys_set_tid_address, F, ""),
    (231, sys_process.sys_exit_group, F, ""),
    (247, sys_process.sys_waitid, F, "P_ALL/P_PID/P_PGID, WNOHANG, WNOWAIT"),
    (302, sys_process.sys_prlimit64, P, "as getrlimit/setrlimit"),
    # time
    (35, sys_time.sys_nanosleep, F, ""),
    (96, sys_time.sys_gettimeofday, F, ""),
    (201, sys_time.sys_time, F, ""),
    (
        228,
        sys_time.sys_clock_gettime,
        F,
        "also read without a syscall (vDSO); CPU-time clocks count the whole VM",
    ),
    (229, sys_time.sys_clock_getres, F, ""),
    (230, sys_time.sys_clock_nanosleep, F, ""),
    # futex
    (
        202,
        sys_futex.sys_futex,
        P,
        "WAIT/WAKE(_BITSET), (CMP_)REQUEUE; shared across thread-fork processes",
    ),
    # scheduling
    (24, sys_sched.sys_sched_yield, F, "cooperative: switches to the next runnable process"),
    (203, sys_sched.sys_sched_setaffinity, P, "one CPU"),
    (204, sys_sched.sys_sched_getaffinity, F, "one CPU"),
    (309, sys_sched.sys_getcpu, F, "CPU 0"),
    # system
    (63, sys_system.sys_uname, F, "sysname Linux, release 6.1.0-unifork"),
    (99, sys_system.sys_sysinfo, P, "RAM and process count"),
    (158, sys_system.sys_arch_prctl, P, "ARCH_SET_FS/ARCH_GET_FS"),
    (318, sys_system.sys_getrandom, F, ""),
    (322, sys_exec.sys_execveat, F, "AT_FDCWD, a directory fd, AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW"),
]

HYPERCALLS: list[tuple[int, Callable[..., object], str]] = [
    (hc.HC_PROBE, sys_memory.hc_probe, "probe"),
    (hc.HC_MALLOC, sys_memory.hc_malloc, "malloc"),
    (hc.HC_FREE, sys_memory.hc_free, "free"),
    (hc.HC_REALLOC, sys_memory.hc_realloc, "realloc"),
    (hc.HC_CALLOC, sys_memory.hc_calloc, "calloc"),
    (hc.HC_USABLE_SIZE, sys_memory.hc_usable_size, "usable_size"),
]


def entries() -> list[Entry]:
    return [Entry(nr, syscall_name(nr), fn, sup, note) for nr, fn, sup, note in SYSCALLS]


@functools.cache
def dispatch_table() -> tuple[tuple[Callable[..., object], int] | None, ...]:
    """A tuple indexed by syscall number: the dispatcher's one lookup (built once per
    process: every VM, a forked child's included, shares it)."""
    table: list[tuple[Callable[..., object], int] | None] = [None] * 512
    for e in entries():
        if table[e.nr] is not None:
            raise ValueError(f"syscall {e.nr} listed twice")
        table[e.nr] = (e.handler, e.argc)
    return tuple(table)


@functools.cache
def hypercall_table() -> Mapping[int, tuple[Callable[..., object], int]]:
    return MappingProxyType({nr: (fn, fn.__code__.co_argcount - 2) for nr, fn, _ in HYPERCALLS})


def markdown() -> str:
    """docs/syscalls.md, generated from the table."""
    lines = [
        "# Supported syscalls",
        "",
        "Generated from `tender_service/rump/syscalls/table.py` by `unifork syscalls "
        "--markdown`. Every other number returns `ENOSYS` (logged once per number).",
        "",
        "| nr | name | support | note |",
        "|---:|---|---|---|",
    ]
    for e in sorted(entries(), key=lambda e: e.nr):
        lines.append(f"| {e.nr} | `{e.name}` | {e.support.value} | {e.note} |")
    lines += [
        "",
        "## Hypercalls (guest runtime, numbers >= 0x1000)",
        "",
        "| nr | name |",
        "|---:|---|",
    ]
    for nr, _, name in HYPERCALLS:
        lines.append(f"| {nr:#x} | `{name}` |")
    return "\n".join(lines) + "\n"

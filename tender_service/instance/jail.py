"""The jail of the processes that run guest code, in the spirit of Firecracker's jailer.

Guest code runs only in processes the tender starts (instance/vmserver.py:
one process per thread-fork instance; instance/worker.py: the warm pool's
processes for VM-clone VMs).  A guest that takes over the emulator holds
that process, so each one confines itself, one layer per function:

``drop_identity``       a root tender's VM process becomes uid/gid 65534
``scrub_environment``   only a fixed allowlist of variables is left, and the
                        process's original environment block (what
                        /proc/PID/environ shows) is zeroed
``unshare_namespaces``  user, mount, network, ipc, uts (not pid: see
                        ``NO_PID_NAMESPACE``): each one the
                        kernel grants (a refusal is logged and reported, the
                        others still apply); a new user namespace leaves the
                        process no capability on the host
``set_no_new_privs``    no setuid/file-capability gain through execve
``shield_from_peers``   not dumpable, and (root) no CAP_SYS_PTRACE: no process of
                        ours can open another's ``/proc/PID/mem`` or fd links (nor,
                        under a non-root uid, its ``environ`` and ``maps``): a pool
                        process runs as the tender's uid, so by default it could
                        read and write the tender's memory and its sibling pool
                        processes'; ``shield_host`` is the same for the tender or
                        ``unifork run`` that starts them
``set_limits``          RLIMIT_AS (the VM's RAM plus the emulator's
                        overhead), RLIMIT_NOFILE, RLIMIT_CORE = 0
``load_filter``         a syscall filter (compiled by libseccomp through
                        pyseccomp): ``VM_SYSCALLS`` is the allowlist of a
                        thread-fork VM process, which talks to the tender
                        only over the socket it already holds
``install_denylist``    ``WORKER_DENIED`` is what a pool process, which must
                        still connect, accept and map shared memory, may not do

Anything not allowed fails with EPERM (the process is not killed): the
emulator's error paths (a traceback's source lines, say) keep working, and
a guest gains nothing from the difference.  Everything a jailed process needs
later must be imported and opened before its filter goes in.

The switch for debugging: ``unifork serve --no-jail``, or ``UNIFORK_NO_JAIL=1``
in the tender's environment.  Each jailed process logs one line saying what
it got (``JailReport.line``).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import resource
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

try:  # ctypes binding of the system's libseccomp.so.2, loaded before any filter goes in
    import pyseccomp as sc
except (ImportError, OSError) as _e:  # the jail then refuses to run VMs (fail closed)
    sc, _NO_SECCOMP = None, str(_e)

log = logging.getLogger(__name__)

NO_JAIL_ENV = "UNIFORK_NO_JAIL"
#: what survives the scrub in every jailed process
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
#: the user namespace first: it owns the others, and grants them without host privileges
#: (a root tender's VM process makes the others first, then becomes nobody, then the user ns)
NAMESPACES = (
    ("user", CLONE_NEWUSER),
    ("mount", CLONE_NEWNS),
    ("net", CLONE_NEWNET),
    ("ipc", CLONE_NEWIPC),
    ("uts", CLONE_NEWUTS),
)
#: why no process of ours gets a pid namespace: unshare(CLONE_NEWPID) applies to the
#: children only, and after it the kernel refuses clone(CLONE_THREAD) (EINVAL: a thread
#: would live in another pid namespace than its process), so a VM process could start
#: no thread; its processes never fork (the filter refuses), so there is nothing to hide
NO_PID_NAMESPACE = (
    "the kernel refuses new threads after unshare(CLONE_NEWPID); the process forks none"
)
PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE, PR_CAPBSET_DROP = 4, 24
CAP_SYS_PTRACE = 19
_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
NOBODY = 65534  # the uid and gid a root tender's VM processes take

#: address space a thread-fork VM process may add to what it has when its VM is
#: built: Python's heap (console pieces, the process table, fork stack scans),
#: malloc arenas and thread stacks; docs/reliability.md has the measured peaks
VM_AS_HEADROOM = 1 << 30
VM_NOFILE = 64
#: a VM process that serves published ports holds their host connections too (at
#: most instance/publish.py's MAX_INFLIGHT, 512)
VM_PUBLISH_NOFILE = 640
WORKER_NOFILE = 16384

#: the host syscalls a thread-fork VM process makes once its VM is built, measured with
#: strace over tests/test_threadvm.py and 19 guest programs (read, write, close, memory,
#: futexes, threads, signal masks, getpid/gettid, exit), and their near kin the same code
#: reaches on other paths (the VM's idle wait is an epoll selector, realloc may mremap, a
#: signal handler returns through rt_sigreturn).  No open, stat, socket, exec or fork:
#: the process talks to the tender over the socket it already holds.
VM_SYSCALLS = (
    "read",
    "write",
    "close",
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "madvise",
    "brk",
    "futex",
    "set_robust_list",
    "rseq",
    "sched_yield",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "restart_syscall",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "nanosleep",
    "clock_nanosleep",
    "clock_gettime",
    "clock_getres",
    "gettimeofday",
    "getrandom",
    "getpid",
    "gettid",
    "exit",
    "exit_group",
)
#: what a VM process that serves published ports (``unifork launch -p``) may do besides:
#: accept on the listening sockets the tender handed it, move bytes on the connections,
#: half-close them (no socket, no connect: it opens nothing new), and make an accepted
#: socket non-blocking (ioctl FIONBIO only)
PUBLISH_SYSCALLS = ("accept4", "recvfrom", "sendto", "shutdown")
FIONBIO = 0x5421
#: what a pool process may not do; everything else it may (see docs/reliability.md)
WORKER_DENIED = (
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    "kcmp",
    "mount",
    "umount2",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setfsuid",
    "setfsgid",
    "setgroups",
    "capset",
    "personality",
    "syslog",
    "lookup_dcookie",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "mknod",
    "mknodat",
    "tkill",
    "pidfd_open",
    "pidfd_send_signal",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
)
#: socket families a pool process may open: Unix (its socket, supervisors), IPv4, IPv6
WORKER_SOCKET_FAMILIES = (1, 2, 10)
_MAX_FAMILY = 46


@dataclass
class JailReport:
    """What one process got (the log line, and the test's evidence)."""

    identity: str = ""
    namespaces: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why not
    seccomp: str = ""
    limits: dict[str, int] = field(default_factory=dict)
    env: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        limits = " ".join(f"{k}={v}" for k, v in self.limits.items())
        skipped = "; ".join(f"no {k}: {v}" for k, v in self.skipped.items())
        return (
            f"jail: {self.identity or 'same uid'}, namespaces [{','.join(self.namespaces)}], seccomp {self.seccomp or 'none'}, "
            f"limits {limits or 'none'}, env [{','.join(self.env)}], no_new_privs, "
            f"{self.seconds * 1e3:.2f} ms" + (f" ({skipped})" if skipped else "")
        )


def enabled() -> bool:
    """False when the tender's environment says UNIFORK_NO_JAIL=1 (debugging)."""
    return os.environ.get(NO_JAIL_ENV, "") not in ("1", "true", "yes")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


# -- the layers, one function each ---------------------------------------------------------
def scrub_environment(keep: Iterable[str] = BASE_ENV) -> list[str]:
    """Leave only ``keep`` in the environment; zero the original environment block
    (the strings /proc/PID/environ shows, which os.environ's changes leave in place).
    Returns the names kept."""
    kept = {k: os.environ[k] for k in keep if k in os.environ}
    os.environ.clear()  # unsetenv: nothing points into the block any more
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
        if 0 < start < end:
            ctypes.memset(start, 0, end - start)
    except (OSError, ValueError, IndexError) as e:
        log.warning("jail: cannot zero the environment block: %s", e)
    os.environ.update(kept)  # setenv copies: the block is not used again
    return sorted(kept)


def drop_identity(report: JailReport, uid: int = NOBODY, gid: int = NOBODY) -> None:
    """Become ``nobody`` on the host (a root tender's VM process would otherwise still
    own, and so read, every root-owned file: a user namespace removes capabilities,
    not the uid files are checked against)."""
    if os.geteuid() != 0:
        report.identity = f"uid {os.geteuid()}"
        report.skipped["uid change"] = "the tender is not root"
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    report.identity = f"uid {uid}"


def unshare_namespaces(
    report: JailReport, namespaces: Iterable[tuple[str, int]] = NAMESPACES
) -> None:
    """Enter a new namespace of each kind the kernel grants (one call each, so a
    refused kind does not cost the others).  Only in a single-threaded process."""
    libc = _libc()
    for name, flag in namespaces:
        if libc.unshare(flag) == 0:
            report.namespaces.append(name)
        else:
            err = ctypes.get_errno()
            report.skipped[f"{name} namespace"] = os.strerror(err)
            log.info("jail: no %s namespace: unshare refused (%s)", name, os.strerror(err))


def set_no_new_privs() -> None:
    if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def shield_host() -> None:
    """Close this process's /proc/PID/mem and fd links (and environ and maps, to a
    non-root peer) to processes without CAP_SYS_PTRACE, its own uid's included:
    what the process that starts pool processes (which keep its uid) does first.
    Its own /proc/self stays open to it; a core dump is not written any more."""
    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


def shield_from_peers(report: JailReport) -> None:
    """``shield_host`` for a pool process, and, when it runs as root, the loss of
    CAP_SYS_PTRACE (bounding, effective, permitted, inheritable): a taken-over pool
    process can no longer open the tender's or a sibling's memory through /proc,
    which the same uid (root: this capability) had allowed."""
    shield_host()
    if os.geteuid() != 0:
        return
    libc = _libc()
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) != 0:
        report.skipped["CAP_SYS_PTRACE drop"] = os.strerror(ctypes.get_errno())
        return
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~(1 << CAP_SYS_PTRACE) & 0xFFFF_FFFF  # the bit is in the first word
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def set_limits(report: JailReport, address_space: int | None, nofile: int) -> None:
    """Lower (never raise) the limits: soft and hard, so the process cannot undo them."""
    wanted = {"core": (resource.RLIMIT_CORE, 0), "nofile": (resource.RLIMIT_NOFILE, nofile)}
    if address_space is not None:
        wanted["as"] = (resource.RLIMIT_AS, address_space)
    for name, (which, value) in wanted.items():
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
            report.limits[name] = value
        except (ValueError, OSError) as e:
            report.skipped[f"RLIMIT_{name.upper()}"] = str(e)


def _need_seccomp() -> None:
    if sc is None:
        raise OSError(errno.ENOSYS, f"no libseccomp for the seccomp filter: {_NO_SECCOMP}")


@functools.cache
def vm_filter(publish: bool = False) -> bytes:
    """The thread-fork VM processes' allowlist as a BPF program, compiled once (by
    libseccomp, in the fork server): each VM process then loads it with one prctl
    instead of compiling it again (~1.8 ms).  Threads may be made (clone with
    CLONE_THREAD), processes may not; clone3 says ENOSYS so that libc falls back to
    clone, whose flags the filter can see; no signal to anyone (not even itself).
    ``publish``: also PUBLISH_SYSCALLS (a VM serving published ports)."""
    _need_seccomp()
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    for name in (*VM_SYSCALLS, *(PUBLISH_SYSCALLS if publish else ())):
        f.add_rule(sc.ALLOW, name)
    if publish:
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, FIONBIO))
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_filter(report: JailReport, bpf: bytes, publish: bool = False) -> None:
    """Load a compiled filter (``vm_filter``) on this thread; the process must have no
    other thread yet (the filter is inherited by the threads made after)."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    if _libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    report.seccomp = f"allowlist of {len(VM_SYSCALLS) + 2} syscalls" + (
        f" and {len(PUBLISH_SYSCALLS) + 1} to serve published ports" if publish else ""
    )


def install_denylist(report: JailReport, deny: Iterable[str]) -> None:
    """Load a filter on every thread of the process: ``deny``, processes (clone without
    CLONE_THREAD; clone3 ENOSYS as above), signals to other processes and socket
    families but Unix, IPv4 and IPv6 get EPERM; everything else is allowed."""
    _need_seccomp()
    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    names = list(deny)
    for name in names:
        f.add_rule(eperm, name)
    f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    me = os.getpid()
    for name in ("kill", "tgkill"):  # signals to itself only
        f.add_rule(eperm, name, sc.Arg(0, sc.NE, me))
    for family in range(_MAX_FAMILY):
        if family not in WORKER_SOCKET_FAMILIES:
            for call in ("socket", "socketpair"):
                f.add_rule(eperm, call, sc.Arg(0, sc.EQ, family))
    f.add_rule(eperm, "socket", sc.Arg(0, sc.GE, _MAX_FAMILY))
    f.load()
    report.seccomp = (
        f"denylist of {len(names) + 2} syscalls, signals to itself only, sockets unix/inet/inet6"
    )


# -- the two kinds of jailed process ------------------------------------------------------
def jail_vm_process(report: JailReport, bpf: bytes, publish: bool = False) -> JailReport:
    """Confine a thread-fork VM process whose VM is built and whose threads are not
    started yet (unshare needs a single thread): nobody's uid, namespaces, limits,
    the filter ``bpf`` (``vm_filter``; ``publish``: it serves published ports).  The
    fork server scrubbed the environment before it forked this process."""
    t0 = time.perf_counter()
    user = [ns for ns in NAMESPACES if ns[0] == "user"]
    if os.geteuid() == 0:  # the others while root can make them, nobody's user ns last
        unshare_namespaces(report, [ns for ns in NAMESPACES if ns[0] != "user"])
        drop_identity(report)
        unshare_namespaces(report, user)
    else:  # the user namespace first: it grants the others
        drop_identity(report)
        unshare_namespaces(report)
    report.skipped["pid namespace"] = NO_PID_NAMESPACE
    # the VM's RAM is mapped already: what the process has now, plus the emulator's growth
    nofile = VM_PUBLISH_NOFILE if publish else VM_NOFILE
    set_limits(report, _address_space() + VM_AS_HEADROOM, nofile)
    set_no_new_privs()
    load_filter(report, bpf, publish)
    report.seconds += time.perf_counter() - t0
    return report


def jail_worker(keep_env: Iterable[str]) -> JailReport:
    """Confine a pool process (VM-clone VMs) as far as it can be while it still
    dials supervisors, serves its Unix socket and maps shared memory: scrubbed
    environment, its own ipc and uts namespaces, limits, no_new_privs, no ptrace
    access to its peers or theirs to it, a denylist."""
    t0 = time.perf_counter()
    report = JailReport(env=scrub_environment((*BASE_ENV, *keep_env)))
    unshare_namespaces(report, [(n, f) for n, f in NAMESPACES if n in ("ipc", "uts")])
    for name, why in (
        ("user", "its shm segments, sockets and images are the tender's uid's"),
        ("mount", "it needs the host's /dev/shm and the supervisors' sockets"),
        ("net", "it dials supervisors and peers on the host's network"),
        ("pid", NO_PID_NAMESPACE),
    ):
        report.skipped[f"{name} namespace"] = why
    set_limits(report, None, WORKER_NOFILE)
    report.skipped["RLIMIT_AS"] = "a pool process hosts any number of VMs"
    set_no_new_privs()
    shield_from_peers(report)
    install_denylist(report, WORKER_DENIED)
    report.seconds = time.perf_counter() - t0
    return report


def _address_space() -> int:
    """This process's current virtual size (VmSize), in bytes."""
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmSize:"):
            return int(row.split()[1]) * 1024
    raise OSError(errno.ENOENT, "no VmSize in /proc/self/status")

"""Isolation: a guest cannot reach outside its VM (guest/programs/escape_probe.c).

Real zig, real Unicorn, real host files, sockets and processes; nothing
mocked.  Each test runs the probe in a VM (thread fork; VM-clone where a
forked child is another VM) and checks the host side, not just what the
guest printed:

- files: every open/stat/create/rename/mount... of a host path fails with an
  errno; a host directory the guest was pointed at is byte-for-byte, mode and
  mtime unchanged and holds no new entry; a secret in it never shows up;
- paths of the VM's own devices resolve exactly as Linux resolves them
  (same output natively and in the VM);
- sockets: only the instance's own names and private loopback network answer;
  the host's TCP, Unix and UDP sockets the guest was given never see a
  connection or a datagram;
- processes: execve, ptrace, process_vm_*, kill/tkill/tgkill/pidfd of the
  tender's own host pid fail; kill(-1, SIGKILL) reaches only the caller's own
  VM (or instance); the tender, the pool's tender processes and a VM running
  beside it survive;
- memory: loads, stores and calls outside guest RAM (NULL page, past the image
  and the heap, typical host addresses, the host address of a Python buffer
  and of the VM's own RAM buffer) kill only the forked child with SIGSEGV;
  the same addresses given to read/write fail with EFAULT; the Python buffer
  is untouched;
- CPU: privileged instructions fault (SIGSEGV) as in a Linux process: the
  emulated CPU runs in ring 3 (it ran in ring 0 before this file existed);
- two VMs in one process at once: one overwrites its whole heap, its globals
  and exactly the guest addresses where the other keeps a secret; the other's
  memory is unchanged and the first never saw the secret.

Every run is also made natively where that is safe (the positive control: the
same probe DOES open the secret, create files, connect to the sockets), so a
probe that silently stopped trying would fail these tests.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import image_path, wait_until

from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.machine.layout import GUARD_SIZE, HEAP_BASE
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.vm import CaptureSink, create_vm

PROBE = "escape_probe"
SIGILL, SIGTRAP, SIGKILL, SIGSEGV = 4, 5, 9, 11
WAIT = 30.0
RAM = 64 << 20
#: an attempt's result: "-1 ENAME"
FAILED = re.compile(r"-1 E[A-Z0-9]+")


# -- running the probe ----------------------------------------------------------------------
@dataclass
class Out:
    """A probe run: its stdout, stderr and how the VM (or process) ended."""

    out: str
    err: str
    status: int  # wait status word of the probe (its main process)
    reports: list[str]

    def results(self) -> list[tuple[str, str]]:
        """(attempt, result) for every "<attempt> = <result>" line."""
        return [
            tuple(line.split(" = ", 1))
            for line in self.out.splitlines()  # type: ignore[misc]
            if " = " in line
        ]

    def children(self) -> dict[str, str]:
        """attempt -> how its child ended, for every "<attempt>: <how>" line."""
        found = {}
        for line in self.out.splitlines():
            m = re.fullmatch(r"(.+): ((?:exited|killed by signal) \d+)", line)
            if m:
                found[m.group(1)] = m.group(2)
        return found

    def done(self, cmd: str) -> int:
        m = re.search(rf"^{cmd}: done (\d+) attempts$", self.out, re.M)
        assert m, self.why()
        return int(m.group(1))

    def why(self) -> str:
        return f"status={self.status:#x}\nstdout:\n{self.out}\nstderr:\n{self.err}\n{self.reports}"


def from_vm(result: RunResult, sink: CaptureSink) -> Out:
    return Out(
        bytes(sink.stdout).decode(errors="replace"),
        bytes(sink.stderr).decode(errors="replace"),
        result.status,
        [str(r) for r in result.reports],
    )


def run_thread(*args: str, stdin: bytes | int | None = None) -> Out:
    """The probe in a thread-fork VM inside this very process (the tender is pytest)."""
    sink = CaptureSink()
    k = create_vm(image_path(PROBE), list(args), None, VmConfig(timeout=60, ram=RAM), sink, stdin)
    try:
        return from_vm(k.run(), sink)
    finally:
        k.close()


def run_native(*args: str, cwd: str | Path | None = None) -> Out:
    p = subprocess.run(
        [str(image_path(PROBE)), *args],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        check=False,
    )
    status = (p.returncode & 0xFF) << 8 if p.returncode >= 0 else -p.returncode
    return Out(p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), status, [])


def run_vmclone_probe(pool: WarmPool, *args: str) -> Out:
    """``escape_probe -f ARGS`` with VM-clone fork: the attempts run in a child VM."""
    sink = CaptureSink()
    result = run_vmclone(
        image_path(PROBE), ["-f", *args], config=VmConfig(timeout=60, ram=RAM), sink=sink, pool=pool
    )
    return from_vm(result, sink)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# -- files ----------------------------------------------------------------------------------
SECRET = "TOPSECRET-7f3a9c"


def host_dir(root: Path) -> Path:
    """The directory the probe is pointed at: files it will try to read, change, remove."""
    d = root / "victim_dir"
    d.mkdir()
    (d / "secret").write_text(SECRET + "\n")
    (d / "victim").write_text("victim\n")
    (d / "moveme").write_text("moveme\n")
    (d / "subdir").mkdir()
    return d


def tree(d: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry under d: mode, size, mtime (ns) and content."""
    snap = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        snap[str(p.relative_to(d))] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return snap


#: what a VM may succeed at: its own devices (the NUL cuts the path to /dev/null)
FILES_ALLOWED_OK = {"open(/dev/null\\0/../etc/passwd, 0)": "3", "getcwd": "/"}
#: what succeeds in the VM's own file system (issue 14), never reaching the host's
FILES_IN_VM_TREE = (
    "open(/, 0200000)",
    "open(created4, 0101)",
    '  write(fd, "pwned", 5)',  # into the VM's own /created4
    "readlink(/proc/self/exe)",
    "statfs(/)",  # the VM's own root (a tmpfs over the image), not the host's
)
#: chown and statfs exist now (issue 14): of host paths they get ENOENT like open does
FILES_SYSCALLS_ENOSYS = (
    "name_to_handle_at",
    "open_by_handle_at",
    "mknod",
    "setxattr",
    "chroot",
    "mount",
    "umount2",
    "pivot_root",
    "acct",
)


def check_files_contained(r: Out, d: Path, before: dict) -> int:
    results = r.results()
    assert len(results) >= 60, r.why()
    for what, got in results:
        if what in FILES_ALLOWED_OK:
            assert got == FILES_ALLOWED_OK[what], (what, got)
        elif what in FILES_IN_VM_TREE:
            assert not got.startswith("-1"), (what, got)
        elif what.split("(")[0] in FILES_SYSCALLS_ENOSYS:
            assert got == "-1 ENOSYS", (what, got)
        elif "<4999-byte path" in what:
            assert got == "-1 ENAMETOOLONG", (what, got)
        else:  # open/openat/stat/access of anything but a device: no such file
            assert got in ("-1 ENOENT", "-1 ENOTDIR", "-1 EBADF"), (what, got)
    assert SECRET not in r.out and "  read" not in r.out, r.why()
    assert tree(d) == before  # nothing created, changed, renamed or removed
    assert not Path("/created4").exists() and not Path("/secret").exists()
    return r.done("files")


def test_files_host_paths_all_fail_and_the_host_dir_is_untouched(tmp_path: Path) -> None:
    d = host_dir(tmp_path)
    before = tree(d)
    r = run_thread("files", str(d))
    assert r.status == 0, r.why()
    n = check_files_contained(r, d, before)
    assert n == len(r.results()) - 1  # all but "getcwd = /"
    assert {w for w, g in r.results() if not g.startswith("-1")} == {
        *FILES_ALLOWED_OK,
        *FILES_IN_VM_TREE,
    }  # in the VM's own tree only: the host's stays out of reach
    # traversal through a device and a relative path against a non-directory: as Linux
    got = dict(r.results())
    assert got["open(/dev/null/../../etc/passwd, 0)"] == "-1 ENOTDIR"
    assert got["openat(<fd of /dev/null>, ../etc/passwd)"] == "-1 ENOTDIR"
    assert got["openat(-1, etc/passwd)"] == "-1 EBADF"


def test_files_natively_the_same_probe_does_reach_the_host(tmp_path: Path) -> None:
    """The positive control: the attempts are real; natively they read and change DIR."""
    d = host_dir(tmp_path)
    r = run_native("files", str(d), cwd=tmp_path)
    assert r.status == 0, r.why()
    got = dict(r.results())
    assert SECRET in r.out  # read through open(DIR/secret)
    assert got["mkdir(DIR/newdir)"] == "0" and (d / "newdir").is_dir()
    assert (d / "created").read_text() == "pwned"
    assert not (d / "victim").exists() and (d / "moved").exists()
    assert got["open(/etc/passwd, 0)"] != "-1 ENOENT"


def test_files_from_a_vmclone_child(pool: WarmPool, tmp_path: Path) -> None:
    d = host_dir(tmp_path)
    before = tree(d)
    r = run_vmclone_probe(pool, "files", str(d))
    assert r.status == 0 and "forked child: exited 0" in r.out, r.why()
    check_files_contained(r, d, before)


def test_paths_of_devices_resolve_exactly_as_on_linux() -> None:
    """Regression: the VM used to compare path strings (dev/null, //dev//null and
    /dev/../dev/null were ENOENT, /dev/null/.. ENOENT instead of ENOTDIR, openat
    ignored its dirfd, O_CREAT|O_EXCL and O_DIRECTORY opened /dev/null)."""
    vm, nat = run_thread("paths"), run_native("paths", cwd="/")
    assert vm.status == nat.status == 0, vm.why() + nat.why()
    assert vm.out == nat.out
    got = dict(vm.results())
    assert got["open(/dev/../dev/null, 0)"] == "3"
    assert got["open(/dev/null/.., 0)"] == "-1 ENOTDIR"
    assert got["open(/dev/null, 0301)"] == "-1 EEXIST"
    assert got["openat(-1, dev/null)"] == "-1 EBADF"


# -- sockets --------------------------------------------------------------------------------
@dataclass
class HostSockets:
    tcp: socket.socket
    unix: socket.socket
    udp: socket.socket
    unix_path: Path

    def args(self) -> list[str]:
        return [str(self.tcp.getsockname()[1]), str(self.unix_path), str(self.udp.getsockname()[1])]

    def untouched(self) -> None:
        """Nobody connected to the listeners and no datagram came (non-blocking checks)."""
        for s in (self.tcp, self.unix):
            with pytest.raises(BlockingIOError):
                s.accept()
        with pytest.raises(BlockingIOError):
            self.udp.recvfrom(100)


@pytest.fixture
def host_sockets(tmp_path: Path) -> Iterator[HostSockets]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    path = tmp_path / "host.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(path))
    unix.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    for s in (tcp, unix, udp):
        s.setblocking(False)
    try:
        yield HostSockets(tcp, unix, udp, path)
    finally:
        for s in (tcp, unix, udp):
            s.close()


#: what the probe's socket attempts give in a VM since guests have sockets (issue 16):
#: the instance's own AF_UNIX names and private loopback network, nothing of the host's
SOCKETS_IN_VM = {
    "socket(AF_INET, SOCK_STREAM)": "3",
    "  connect(127.0.0.1:TCPPORT)": "-1 ECONNREFUSED",  # no such port in the instance
    "socket(AF_INET6, SOCK_STREAM)": "3",
    "  connect([::ffff:127.0.0.1]:TCPPORT)": "-1 ENETUNREACH",
    "socket(AF_UNIX, SOCK_STREAM)": "3",
    "  connect(UNIXPATH)": "-1 ENOENT",  # the host's path is not in the instance's tree
    "socket(AF_INET, SOCK_DGRAM)": "3",
    "  sendto(127.0.0.1:UDPPORT)": "5",  # lost: nobody bound that port in the instance
    "socket(AF_UNIX, SOCK_DGRAM)": "3",
    "  sendto(UNIXPATH)": "-1 ENOENT",
    "socket(AF_INET, SOCK_STREAM) to listen": "3",
    "  bind(0.0.0.0:0)": "0",  # inside the instance only
    "  listen": "0",
    "socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)": "-1 EAFNOSUPPORT",
    "socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)": "-1 EAFNOSUPPORT",
    "socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)": "-1 ESOCKTNOSUPPORT",
    "socketpair(AF_UNIX, SOCK_STREAM)": "0",
    "connect(1, 127.0.0.1:TCPPORT)": "-1 ENOTSOCK",
    "sendto(1, 127.0.0.1:UDPPORT)": "-1 ENOTSOCK",
}


def check_sockets_contained(r: Out, socks: HostSockets) -> int:
    """Every attempt stays in the instance (the errnos say where it ended) and the
    host's listeners see nothing: the real check."""
    results = r.results()
    assert [w for w, _ in results] == list(SOCKETS_IN_VM), r.why()
    for what, got in results:
        want = SOCKETS_IN_VM[what]
        assert got == want or (want == "3" and got.isdigit()), (what, got, r.why())
    socks.untouched()
    return r.done("sockets")


def test_sockets_stay_in_the_instance_and_the_host_sockets_stay_silent(
    host_sockets: HostSockets,
) -> None:
    r = run_thread("sockets", *host_sockets.args())
    assert r.status == 0, r.why()
    check_sockets_contained(r, host_sockets)


def test_sockets_natively_the_same_probe_does_connect(host_sockets: HostSockets) -> None:
    r = run_native("sockets", *host_sockets.args())
    assert r.status == 0, r.why()
    got = dict(r.results())
    assert got["  connect(127.0.0.1:TCPPORT)"] == "0"
    assert got["  connect(UNIXPATH)"] == "0"
    assert wait_until(lambda: _accepted(host_sockets.tcp), WAIT, "the native TCP connect")
    assert wait_until(lambda: _accepted(host_sockets.unix), WAIT, "the native Unix connect")
    assert host_sockets.udp.recvfrom(100)[0] == b"pwned"


def _accepted(s: socket.socket) -> bool:
    try:
        s.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def test_sockets_from_a_vmclone_child(pool: WarmPool, host_sockets: HostSockets) -> None:
    r = run_vmclone_probe(pool, "sockets", *host_sockets.args())
    assert r.status == 0 and "forked child: exited 0" in r.out, r.why()
    check_sockets_contained(r, host_sockets)


# -- processes ------------------------------------------------------------------------------
#: attempts that succeed in the VM, as in a Linux pid namespace whose init ignores them
#: (and setuid: the guest's own credentials, root dropping to 1000 inside the VM, issue 16)
PROCS_OK = {
    "kill(1, SIGKILL)",
    "kill(1, SIGTERM)",
    "kill(1, 0)",
    "kill(-1, SIGKILL)",
    "setuid(1000)",
}
PROCS_ESRCH = {
    "kill(HOSTPID, 0)",
    "kill(HOSTPID, SIGKILL)",
    "kill(-HOSTPID, SIGKILL)",
    "tkill(HOSTPID, SIGKILL)",
    "tgkill(HOSTPID, HOSTPID, SIGKILL)",
}


def check_procs_contained(r: Out, marker: Path) -> int:
    results = r.results()
    assert len(results) >= 35, r.why()
    for what, got in results:
        if what in PROCS_OK:
            assert got == "0", (what, got)
        elif what in PROCS_ESRCH:
            assert got == "-1 ESRCH", (what, got)
        elif what.startswith(("execve(", "execveat(")):
            # the VM's own tree has no /bin/sh (the host's is out of reach), and a
            # plain ELF launch puts no file behind /proc/self/exe
            assert got == "-1 ENOENT", (what, got)
        else:
            assert got == "-1 ENOSYS", (what, got)
    # Linux: kill(-1) signals every process the caller may signal but init and itself
    assert "child after kill(-1): killed by signal 9\nstill alive\n" in r.out, r.why()
    assert not marker.exists()
    return r.done("procs")


class Bystander:
    """A VM running beside the attacker in this process: blocked on its stdin, which
    the test closes when it is time for it to check its memory and end."""

    def __init__(self, token: str = "BYSTANDER") -> None:
        self.sink = CaptureSink()
        self.rfd, self.wfd = os.pipe()
        self.k = create_vm(
            image_path(PROBE),
            ["wall", token, "8"],
            None,
            VmConfig(timeout=60, ram=RAM),
            self.sink,
            self.rfd,
        )
        self.box: dict[str, object] = {}
        self.thread = threading.Thread(target=self._run, name="bystander-vm", daemon=True)
        self.thread.start()
        wait_until(
            lambda: "wall ready" in self.out,
            WAIT,
            "the bystander VM to be ready",
            detail=lambda: self.out,
        )

    def _run(self) -> None:
        try:
            self.box["result"] = self.k.run()
        except BaseException as e:  # re-raised by finish()
            self.box["error"] = e

    @property
    def out(self) -> str:
        return bytes(self.sink.stdout).decode(errors="replace")

    def ranges(self) -> list[tuple[int, int]]:
        return [
            (int(a, 16), int(n)) for a, n in re.findall(r"wall \w+ (0x[0-9a-f]+) (\d+)", self.out)
        ]

    def finish(self) -> RunResult:
        os.close(self.wfd)  # EOF: the bystander checks its memory and exits
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the bystander VM did not end"
        os.close(self.rfd)
        self.k.close()
        if "error" in self.box:
            raise self.box["error"]  # type: ignore[misc]
        return self.box["result"]  # type: ignore[return-value]


def test_procs_cannot_reach_the_tender_and_kill_minus_one_stays_in_the_vm(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    bystander = Bystander()
    r = run_thread("procs", str(os.getpid()), str(marker))
    assert r.status == 0, r.why()
    check_procs_contained(r, marker)
    assert alive(os.getpid())  # we are the tender: still here (trivially, but said)
    res = bystander.finish()
    assert (res.outcome, res.status) == ("exited", 0), bystander.out
    assert re.search(r"^wall intact \d+$", bystander.out, re.M), bystander.out


def test_procs_from_a_vmclone_child(pool: WarmPool, tmp_path: Path) -> None:
    """kill(-1, SIGKILL) from a child VM: Linux kills every process but init and the
    caller, so the parent (another VM) dies too; the tender processes do not."""
    marker = tmp_path / "marker"
    workers = {w.pid for w in pool.workers}
    target = min(workers)  # a tender process that hosts VMs of this very instance
    bystander = Bystander()
    r = run_vmclone_probe(pool, "procs", str(target), str(marker))
    check_procs_contained(r, marker)
    # the parent (pid 2) was signalled by its child's kill(-1): Linux does the same
    assert r.status == SIGKILL, r.why()
    assert all(alive(pid) for pid in workers), workers
    assert alive(os.getpid())
    res = bystander.finish()
    assert (res.outcome, res.status) == ("exited", 0), bystander.out
    # and the pool still serves
    again = run_vmclone_probe(pool, "paths")
    assert again.status == 0 and "forked child: exited 0" in again.out, again.why()


def test_procs_refuses_to_run_natively() -> None:
    r = run_native("procs", str(os.getpid()), "/nonexistent/marker")
    assert r.status == 2 << 8 and "VM only" in r.out, r.why()


# -- memory ---------------------------------------------------------------------------------
def guest_regions() -> dict[str, tuple[int, int]]:
    k = create_vm(image_path(PROBE), ["cpu"], None, VmConfig(ram=RAM), CaptureSink())
    try:
        return {r.name: (r.base, r.end) for r in k.mem.regions}
    finally:
        k.close()


def outside_addresses() -> list[int]:
    regions = guest_regions()
    image_end, heap_end = regions["image"][1], regions["heap"][1]
    return [
        0,
        0x1000,
        GUARD_SIZE - 8,  # the null guard
        image_end,
        regions["image"][0] - 8,  # just past / before the image
        heap_end,
        heap_end - 4,  # past the heap, and an 8-byte access across its end
        HEAP_BASE - 8,
        0x7FFF_FFFF_F000,
        0x5555_5555_0000,  # a host stack and a host PIE
        0xFFFF_8000_0000_0000,
        0x8000_0000_0000_0000,  # kernel half, non-canonical
    ]


def check_memory_contained(r: Out, addrs: list[str]) -> int:
    kids = r.children()
    got = dict(r.results())
    for a in addrs:
        for op in ("load", "store", "call"):
            assert kids[f"{op} {a}"] == f"killed by signal {SIGSEGV}", (op, a, r.why())
        assert got[f"write(pipe, {a}, 8)"] == "-1 EFAULT"
        assert got[f"read(pipe, {a}, 8)"] == "-1 EFAULT"
        assert kids[f"mmap_fixed+store {a}"] == "exited 0"  # the mmap failed: no store
    assert all(FAILED.fullmatch(v) for k, v in got.items() if k.startswith("  mmap(")), r.why()
    # the control: the probe's own block is readable and writable
    assert (kids["load self"], kids["store self"]) == ("exited 0", "exited 0"), r.why()
    assert (got["write(pipe, self, 8)"], got["read(pipe, self, 8)"]) == ("8", "8")
    return r.done("memory")


def test_memory_outside_guest_ram_faults_and_efaults() -> None:
    """Host addresses included: a Python buffer of this process (the tender) and the
    host mapping of another VM's RAM, running beside it in this process."""
    host = bytearray(b"\xa5" * 4096)
    host_addr = ctypes.addressof((ctypes.c_char * len(host)).from_buffer(host))
    other = Bystander()
    other_ram = other.k.mem.host_addr
    addrs = [hex(a) for a in (*outside_addresses(), host_addr, other_ram, other_ram + 0x35000)]
    r = run_thread("memory", "self", *addrs)
    assert r.status == 0, r.why()
    n = check_memory_contained(r, addrs)
    assert n == 6 * (len(addrs) + 1)
    assert host == bytearray(b"\xa5" * 4096)  # no store reached the host buffer
    assert sum("SIGSEGV" in rep for rep in r.reports) == 3 * len(addrs) + 1, r.reports
    res = other.finish()
    assert (res.outcome, res.status) == ("exited", 0), other.out
    assert re.search(r"^wall intact \d+$", other.out, re.M), other.out


def test_memory_from_a_vmclone_child(pool: WarmPool) -> None:
    addrs = [hex(a) for a in outside_addresses()[::3]]
    r = run_vmclone_probe(pool, "memory", "self", *addrs)
    assert r.status == 0 and "forked child: exited 0" in r.out, r.why()
    check_memory_contained(r, addrs)


# -- the CPU --------------------------------------------------------------------------------
PRIVILEGED = [
    "hlt",
    "cli",
    "sti",
    "in",
    "out",
    "rdmsr",
    "wrmsr",
    "mov cr0",
    "mov cr3",
    "lgdt",
    "lidt",
    "invd",
    "wbinvd",
    "swapgs",
]
CPU_EXPECTED = {
    **{i: f"killed by signal {SIGSEGV}" for i in PRIVILEGED},
    "vmcall": f"killed by signal {SIGILL}",
    "vmmcall": f"killed by signal {SIGILL}",
    # no ia32 emulation (as Linux with ia32_emulation=0): the gate faults
    "int 0x80": f"killed by signal {SIGSEGV}",
    "int3": f"killed by signal {SIGTRAP}",
    "ud2": f"killed by signal {SIGILL}",
}


def test_privileged_instructions_fault_as_in_a_linux_process() -> None:
    """Regression: Unicorn ran the guest in ring 0, where cli, in/out, rdmsr/wrmsr,
    mov to cr3, lgdt... simply ran (wrmsr could rewrite EFER of the emulated CPU)."""
    r = run_thread("cpu")
    assert r.status == 0, r.why()
    assert r.children() == CPU_EXPECTED, r.why()
    assert sum("privileged instruction" in rep for rep in r.reports) == len(PRIVILEGED), r.reports
    nat = run_native("cpu").children()
    assert {i: nat[i] for i in PRIVILEGED} == {i: CPU_EXPECTED[i] for i in PRIVILEGED}


def test_privileged_instructions_fault_in_a_vmclone_child(pool: WarmPool) -> None:
    """A VM restored from a snapshot in another tender process is in ring 3 too."""
    r = run_vmclone_probe(pool, "cpu")
    assert r.status == 0 and "forked child: exited 0" in r.out, r.why()
    assert r.children() == {**CPU_EXPECTED, "forked child": "exited 0"}, r.why()


# -- two VMs in one process ------------------------------------------------------------------
def test_two_vms_in_one_process_cannot_see_or_change_each_other() -> None:
    """The victim fills 8 heap blocks and a global with a token and waits; the attacker,
    in the same process at the same time, looks for the token at exactly those guest
    addresses (its own RAM there), then overwrites them, its whole heap and its globals."""
    token = "VICTIM-SECRET-1b2c3d"
    victim = Bystander(token)
    ranges = victim.ranges()
    assert len(ranges) == 9, victim.out
    heap_lo, heap_hi = guest_regions()["heap"]
    assert all(heap_lo <= a and a + n <= heap_hi for a, n in ranges[:8])  # same addresses exist
    args = [x for a, n in ranges for x in (hex(a), str(n))]
    r = run_thread("smash", token, *args)
    assert r.status == 0, r.why()
    assert r.out.count("token no") == len(ranges) and "token yes" not in r.out, r.why()
    smashed = int(re.search(r"^smashed (\d+)$", r.out, re.M).group(1))  # type: ignore[union-attr]
    assert smashed > RAM // 2  # most of its RAM, the victim's addresses included
    res = victim.finish()
    assert (res.outcome, res.status) == ("exited", 0), victim.out
    assert re.search(rf"^wall intact {9 * 65536}$", victim.out, re.M), victim.out

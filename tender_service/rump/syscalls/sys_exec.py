"""execve / execveat: a process starts another program, keeping its pid (issue 14).

The file comes from the instance's file system (``k.fs.open_exec``, which
resolves the path as Linux does and checks the x bit).  ``#!`` scripts run
their interpreter as Linux's binfmt_script does: argv becomes
``interpreter [one optional argument] path-as-given argv[1:]``, at most
MAX_INTERP_DEPTH scripts deep (ELOOP past it).

Everything that can fail is done before the point of no return, so a failed
exec (ENOENT, EACCES, ENOEXEC for a truncated ELF, E2BIG, ENOMEM...) returns
to the caller with its program untouched.  Then, in order: the old stack,
TLS block, heap blocks and mappings are released (to a thread-fork child that
may still reach them, or to the parent a clone(CLONE_VM) child borrowed them
from), the old image is released (its last user leaves it to the kernel's kept
images, rump/spares.py, with its translated code), O_CLOEXEC fds
are closed, handled signals go back to SIG_DFL (ignored ones stay ignored),
a parent suspended in vfork/CLONE_VFORK runs again, and the thread starts at
the new entry point with Linux's initial stack and clean registers.

A static-PIE goes into a kept image of the same program whose text is intact
(the emulator's translations of it stay valid: an exec then costs ~0.2 ms,
not ~1.1 ms), else into fresh page-allocator pages anywhere in the one address
space (thread mode: several programs live side by side; VM-clone mode: the
VM's memory is replaced the same way, since a VM runs one process).  A non-PIE
ET_EXEC can only run at its link address: inside the boot image region once
no process runs the boot program any more, else ENOMEM.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from tender_service.machine.cpu import GPRS, SYSCALL_INSN_LEN
from tender_service.machine.elf import ElfImage, parse_elf
from tender_service.machine.errors import GuestError, ImageError
from tender_service.machine.layout import PAGE_SIZE, page_up
from tender_service.machine.loader import (
    build_stack,
    load_at,
    loaded_intact,
    read_only_spans,
    writable_spans,
)
from tender_service.rump import signals
from tender_service.rump.outcomes import NORETURN
from tender_service.rump.process import Program
from tender_service.rump.syscalls.abi import i32

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp, Process

log = logging.getLogger(__name__)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000
PATH_MAX = 4096
#: Linux's limits: one string (32 pages), the number of strings
MAX_ARG_STRLEN = 32 * PAGE_SIZE
MAX_ARG_STRINGS = 0x7FFF_FFFF
#: Linux reads the first 256 bytes of a script for its ``#!`` line
BINPRM_BUF_SIZE = 256
#: scripts whose interpreter is a script...: Linux's exec_binprm allows 5 levels
MAX_INTERP_DEPTH = 5
#: a new program starts with every general register zero but rsp (as Linux)
_ZERO_GPRS = dict.fromkeys(GPRS, 0)


def sys_execve(k: Kernel, lwp: Lwp, path: int, argv: int, envp: int) -> object:
    return _execve(k, lwp, AT_FDCWD, path, argv, envp, 0)


def sys_execveat(
    k: Kernel, lwp: Lwp, dirfd: int, path: int, argv: int, envp: int, flags: int
) -> object:
    flags = i32(flags)
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise GuestError(errno.EINVAL)
    return _execve(k, lwp, i32(dirfd), path, argv, envp, flags)


def _execve(k: Kernel, lwp: Lwp, dirfd: int, path: int, argv: int, envp: int, flags: int) -> object:
    filename = k.mem.cstring(path, PATH_MAX)
    args = read_strings(k, argv)
    env = read_strings(k, envp)
    check_size(k, args, env)
    proc = lwp.proc
    data, resolved = k.fs.open_exec(proc, dirfd, filename, flags)
    # the name the program gets (AT_EXECFN, a script's argv), as Linux's bprm->filename
    if not filename:
        filename = b"/dev/fd/%d" % dirfd
    elif dirfd != AT_FDCWD and not filename.startswith(b"/"):
        filename = b"/dev/fd/%d/%s" % (dirfd, filename)
    image, exe, args = interpret(k, proc, filename, data, resolved, args)
    check_size(k, args, env)
    if proc.vm_parent and k.forker is not None and not k.forker.one_address_space:
        # VM clone: a clone(CLONE_VM) child runs its new program in a VM of its own
        signals.reset_on_exec(proc)
        k.delete_ptimers(proc)
        old_exe, proc.exe = proc.exe, exe  # what the new VM's /proc/self/exe names
        try:
            k.forker.exec_elsewhere(k, lwp, image, filename, args, env)  # type: ignore[attr-defined]
        except GuestError:
            proc.exe = old_exe
            raise
        k.execs += 1
        return NORETURN
    replace_program(k, lwp, image, filename, args, env)
    proc.exe = exe
    if k.remote is not None:
        k.remote.renamed(proc.pid, proc.name, exe)
    return NORETURN


def read_strings(k: Kernel, vec: int) -> list[bytes]:
    """A NULL-terminated array of C strings (argv, envp); NULL is an empty one."""
    out: list[bytes] = []
    if not vec:
        return out
    total = 0
    while True:
        ptr = k.mem.read_u64(vec + 8 * len(out))
        if not ptr:
            return out
        if len(out) >= MAX_ARG_STRINGS:
            raise GuestError(errno.E2BIG)
        try:
            s = k.mem.cstring(ptr, MAX_ARG_STRLEN)
        except GuestError as e:
            raise GuestError(errno.E2BIG if e.errno == errno.ENAMETOOLONG else e.errno) from e
        total += len(s) + 1 + 8
        if total > k.config.stack_size // 4:
            raise GuestError(errno.E2BIG)
        out.append(s)


def check_size(k: Kernel, args: list[bytes], env: list[bytes]) -> None:
    """E2BIG as Linux: strings and pointers may take a quarter of the stack."""
    total = sum(len(s) + 1 + 8 for s in (*args, *env))
    if total > k.config.stack_size // 4:
        raise GuestError(errno.E2BIG)


def parse_shebang(data: bytes) -> tuple[bytes, bytes | None]:
    """(interpreter, optional argument) of a ``#!`` line; ENOEXEC if it names none."""
    head = data[2:BINPRM_BUF_SIZE]
    line = head.split(b"\n", 1)[0].replace(b"\t", b" ").strip(b" ")
    if not line:
        raise GuestError(errno.ENOEXEC, "#! names no interpreter")
    if b"\n" not in head and len(data) > BINPRM_BUF_SIZE and b" " not in line:
        raise GuestError(errno.ENOEXEC, "#! interpreter name longer than the line buffer")
    interp, _, rest = line.partition(b" ")
    rest = rest.strip(b" ")
    return interp, rest or None


def interpret(
    k: Kernel, proc: Process, filename: bytes, data: bytes, resolved: bytes, args: list[bytes]
) -> tuple[ElfImage, bytes, list[bytes]]:
    """Follow ``#!`` lines to an ELF; (the image, its resolved path, argv as the
    program sees it)."""
    for _ in range(MAX_INTERP_DEPTH + 1):
        if not data.startswith(b"#!"):
            try:
                name = filename.decode(errors="replace")
                return parse_elf(data, name, digest=False), resolved, args
            except ImageError as e:
                raise GuestError(errno.ENOEXEC, str(e)) from e
        interp, arg = parse_shebang(data)
        args = [interp, *([arg] if arg is not None else []), filename, *args[1:]]
        filename = interp
        data, resolved = k.fs.open_exec(proc, AT_FDCWD, interp, 0)
    raise GuestError(errno.ELOOP, "#! interpreters nested too deep")


def _place(k: Kernel, proc: Process, image: ElfImage, path: bytes) -> tuple[int, bool, bool]:
    """Where the image goes: (base, in page-allocator pages, its code is there and
    translated already: a kept image of the same program, rump/spares.py); ENOMEM
    if nowhere."""
    if image.is_pie:
        size = page_up(image.span)
        base = k.spares.take((path, size), lambda b: loaded_intact(k.mem, image, b))
        if base is not None:
            return base, True, True
        base = k.pages.alloc(size // PAGE_SIZE)
        if base is None:
            raise GuestError(errno.ENOMEM, "no memory for the new program")
        return base, True, False
    boot = k.boot_program
    users = 0 if boot is None else boot.users - (proc.program is boot)
    if boot is None or users or not (boot.base <= image.lo and image.hi <= boot.base + boot.size):
        raise GuestError(errno.ENOMEM, f"non-PIE program linked at {image.lo:#x}: not free")
    return image.lo, False, False


def replace_program(
    k: Kernel, lwp: Lwp, image: ElfImage, filename: bytes, args: list[bytes], env: list[bytes]
) -> None:
    """Everything that can fail, then the point of no return (module docstring)."""
    proc = lwp.proc
    base, in_pages, warm = _place(k, proc, image, filename)
    size = page_up(image.span)
    temp_owner = -proc.pid  # owns the new stack until the old memory is gone
    stack_size = k.stack_bytes
    stack = k.stacks.take(temp_owner)
    if not stack:
        if in_pages:
            k.cpu.forget_code(base, size)
            k.pages.free(base)
        raise GuestError(errno.ENOMEM, "no memory for the new program's stack")
    # -- the point of no return (check_size made sure the strings fit) -----------------
    _release_old(k, lwp)
    bias = load_at(k.mem, image, base)
    spans = writable_spans(image)
    _forget_stale_code(k, base, size, read_only_spans(size, spans) if warm else ())
    sp = build_stack(k.mem, (image, bias), stack + stack_size, args, env, filename)
    k.heap.reown(temp_owner, proc.pid)
    prog = Program(filename, base, size, in_pages, 0, spans, image.is_pie)
    if in_pages:
        prog.recycle = k.spares.keep  # kept with its translated code when its last user goes
    k.use_program(proc, prog)
    proc.brk = base + size
    proc.name = filename.rsplit(b"/", 1)[-1].decode(errors="replace")
    proc.fds.close_cloexec(k)
    signals.reset_on_exec(proc)
    k.delete_ptimers(proc)
    k.release_vfork_parent(proc)
    lwp.stack, lwp.tls, lwp.clear_child_tid = stack, 0, 0
    lwp.thread.stack_base, lwp.thread.stack_size = stack, stack_size
    lwp.thread.name = f"{proc.name}:{proc.pid}"
    # Unicorn adds the syscall's length to rip after the syscall hook returns
    rip = image.entry + bias - SYSCALL_INSN_LEN
    k.cpu.write_state({**_ZERO_GPRS, "rsp": sp, "rip": rip, "fs_base": 0})
    k.execs += 1


def _forget_stale_code(k: Kernel, base: int, size: int, keep: tuple[tuple[int, int], ...]) -> None:
    """Drop the translations of [base, base + size) but those of ``keep`` (offset, length):
    guest RAM is written through the host buffer, which Unicorn does not watch, so an
    exec into pages another program ran from would otherwise run its stale code."""
    at = 0
    for off, n in (*sorted(keep), (size, 0)):
        if off > at:
            k.cpu.forget_code(base + at, off - at)
        at = max(at, off + n)


def _release_old(k: Kernel, lwp: Lwp) -> None:
    """Give up the old program's memory (see ProcessTable.release_memory)."""
    proc = lwp.proc
    if lwp.stack:
        k.stacks.put(lwp.stack)
    if lwp.tls:
        k.tls_blocks.put(lwp.tls)
    k.release_memory(proc)
    k.release_program(proc)
    proc.vm_parent = 0

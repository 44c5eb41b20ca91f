"""``unifork cc``: build static x86-64 musl guests with zig's bundled clang.

Every guest is linked with the guest runtime (``guest/runtime/unifork_rt.c``)
and ``-Wl,--wrap=`` for the malloc family, so the same binary uses the
unikernel's allocator in a VM and libc's own allocator natively.

What zig (``python -m ziglang cc``) does that a plain ``cc`` does not, and how
this module copes:

- ``-O1``/``-O2``/``-O3``/``-Os`` select a zig *release* mode, which adds
  ``-D NDEBUG`` ahead of the user's flags, silently disabling ``assert``.  We
  pass ``-UNDEBUG`` right after ``-O2`` and before the user's flags: asserts
  stay active unless the user asks for ``-DNDEBUG`` (later flags win).
- ``-O0``/``-Og``/no ``-O`` select zig's Debug mode, which compiles C with
  UBSan (``-fsanitize=...`` with recovery, runtime linked in): integer division
  by zero, overflow etc. then print a UBSan report instead of faulting.  Our
  default is ``-O2``.
- The CPU is ``x86-64`` generic (no ``-march=native``), which is what the
  emulated CPU must run.
- Static-PIE: zig ignores ``-static-pie`` ("argument unused") and produces a
  non-PIE static executable; it produces a real static-PIE (``ET_DYN``
  linked at 0, no interpreter, ``R_X86_64_RELATIVE`` relocations in
  ``.rela.dyn``) when given ``-fPIE`` or ``-pie`` together with static musl.
  It relocates itself in musl's rcrt1 start code (``_start_c`` is
  ``ldso/dlstart.c``), which finds its load base from ``AT_BASE`` or else
  ``AT_PHDR``/``AT_PHNUM`` in the auxv, so a loader must supply those.  ``-static-pie`` is therefore
  translated to ``-fPIE -pie`` here.  Static-PIE is the default (``-fPIE -pie`` are
  base flags): in thread mode ``execve`` loads a new program at a fresh base
  inside the one address space (issue 14).  ``-no-pie`` (with ``-fno-PIE``) after
  them gives a non-PIE ``ET_EXEC`` linked at a fixed address.
- In the bundled libc the allocator is zig's own (``lib/c/malloc.zig``), not
  musl's mallocng; its ``strdup``/``wcsdup``/``fopen`` reach ``malloc``
  through the symbol and so through ``--wrap``, but its ``reallocarray`` and
  ``valloc`` call the allocator internally, hence they are wrapped too.
  The wrapped code keeps ``__real_*`` as the only way into zig's allocator.
- clang treats the malloc family as builtins: it may elide an unused
  allocation and assumes ``malloc`` leaves ``errno`` alone (``errno`` read
  after a failing ``malloc`` is folded to the value stored before the call).
  That is the same natively and in a VM, so we keep the builtins; programs
  that test errno after malloc call it through a volatile pointer.
- The runtime is compiled in the same clang invocation as the program, hence
  with the user's flags: it is valid C89..C2x and silences its own warnings.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tender_service.toolchain.paths import runtime_dir, zig_cache_dir

log = logging.getLogger(__name__)

TARGET = "x86_64-linux-musl"

#: libc functions whose every reference is redirected to unifork_rt.c's __wrap_*
WRAPPED_FUNCTIONS: tuple[str, ...] = (
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "aligned_alloc",
    "posix_memalign",
    "memalign",
    "valloc",
    "malloc_usable_size",
)

#: flags before the user's: later user flags (-O0, -DNDEBUG, ...) override them
BASE_FLAGS: tuple[str, ...] = ("-target", TARGET, "-static", "-fPIE", "-pie", "-O2", "-UNDEBUG")

#: flags that stop before linking: then no runtime and no --wrap are added
_NO_LINK_FLAGS = frozenset({"-c", "-S", "-E", "-M", "-MM", "-fsyntax-only"})

#: options that take their value as the next argument
_OPTIONS_WITH_VALUE = frozenset(
    {
        "-o", "-I", "-D", "-U", "-L", "-l", "-x", "-include", "-imacros", "-isystem",
        "-idirafter", "-iquote", "-MF", "-MT", "-MQ", "-Xlinker", "-Xassembler",
        "-Xpreprocessor", "-target", "--target", "-arch", "-z",
    }
)  # fmt: skip

SOURCE_SUFFIXES = frozenset({".c", ".s", ".S", ".o", ".a"})


class CompileError(Exception):
    """zig cc failed; ``stderr`` holds the compiler's diagnostics."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        super().__init__(cmd, returncode, stderr)
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        return f"guest compilation failed (exit {self.returncode}): {' '.join(self.cmd)}\n{self.stderr}"


def zig_env() -> dict[str, str]:
    """The environment for zig: both of its caches under ``zig_cache_dir()``."""
    cache = zig_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["ZIG_GLOBAL_CACHE_DIR"] = str(cache)
    env["ZIG_LOCAL_CACHE_DIR"] = str(cache)
    return env


def runtime_sources() -> list[Path]:
    """The guest runtime files every linked guest depends on (for cache keys too)."""
    rt = runtime_dir()
    return [rt / "unifork_hypercalls.h", rt / "unifork_rt.c"]


def translate_flags(flags: Sequence[str]) -> list[str]:
    """Map cc flags zig does not honour onto ones it does (``-static-pie``)."""
    out: list[str] = []
    for flag in flags:
        if flag == "-static-pie":
            out.extend(f for f in ("-fPIE", "-pie") if f not in out)
        else:
            out.append(flag)
    return out


def _zig_cc() -> list[str]:
    return [sys.executable, "-m", "ziglang", "cc"]


def guest_command(args: Sequence[str], *, link: bool = True) -> list[str]:
    """The full zig cc command for cc-style ``args`` (sources, flags, ``-o``).

    The runtime directory is always on the include path (for
    ``unifork_hypercalls.h``); linking adds the runtime and the ``--wrap`` flags.
    """
    rt = runtime_dir()
    cmd = [*_zig_cc(), *BASE_FLAGS, *translate_flags(args), f"-I{rt}"]
    if link:
        wrap = ",".join(f"--wrap={name}" for name in WRAPPED_FUNCTIONS)
        cmd += [str(rt / "unifork_rt.c"), f"-Wl,{wrap}"]
    return cmd


def compile_guest(
    sources: Sequence[Path | str], output: Path | str, flags: Sequence[str] = ()
) -> None:
    """Compile and link ``sources`` into the static guest ELF ``output``.

    Raises CompileError with the compiler's stderr on failure; warnings of a
    successful build are logged.
    """
    output = Path(output)
    if not sources:
        raise ValueError("compile_guest needs at least one source file")
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = guest_command([*flags, *(str(s) for s in sources), "-o", str(output)])
    log.debug("compiling guest: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=zig_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompileError(cmd, proc.returncode, proc.stderr)
    if proc.stderr.strip():
        log.warning("compiler diagnostics for %s:\n%s", output.name, proc.stderr.rstrip())


#: the vDSO (guest/runtime/vdso.c): a shared object without libc, jump tables or
#: relocations, laid out flat by vdso.lds (file offsets are its addresses)
VDSO_FLAGS: tuple[str, ...] = (
    "-target", TARGET, "-shared", "-nostdlib", "-fPIC", "-O2", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-jump-tables", "-Wl,--hash-style=sysv",
    "-Wl,-soname,linux-vdso.so.1",
)  # fmt: skip


def vdso_sources() -> list[Path]:
    """The vDSO's source and linker script (for its cache key too)."""
    rt = runtime_dir()
    return [rt / "vdso.c", rt / "vdso.lds"]


def compile_vdso(output: Path | str) -> None:
    """Build the guest vDSO into ``output``; raises CompileError on failure."""
    source, script = vdso_sources()
    cmd = [*_zig_cc(), *VDSO_FLAGS, f"-Wl,-T,{script}", str(source), "-o", str(output)]
    log.debug("compiling the vDSO: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=zig_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompileError(cmd, proc.returncode, proc.stderr)


#: host libraries (guest/runtime/<name>.c), shared objects for the host (zig's native
#: target), no libc, loaded through ctypes: the emulator's preemption hook, and the
#: word scan of thread and copy fork
HOST_LIBRARIES = ("preempt_hook", "relocate", "syscall_hook")
HOST_FLAGS: tuple[str, ...] = ("-shared", "-nostdlib", "-fPIC", "-O2")


def host_library_source(name: str) -> Path:
    if name not in HOST_LIBRARIES:
        raise ValueError(f"no host library {name!r}")
    return runtime_dir() / f"{name}.c"


def compile_host_library(name: str, output: Path | str) -> None:
    """Build the host library of guest/runtime/<name>.c into ``output``."""
    cmd = [*_zig_cc(), *HOST_FLAGS, str(host_library_source(name)), "-o", str(output)]
    log.debug("compiling the host library %s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, env=zig_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompileError(cmd, proc.returncode, proc.stderr)


def split_cc_args(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """Split cc-style argv into (sources, other args in order, output or None)."""
    sources: list[str] = []
    rest: list[str] = []
    output: str | None = None
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            output = next(it, None)
            if output is None:
                raise ValueError("missing filename after '-o'")
        elif arg.startswith("-o") and len(arg) > 2:
            output = arg[2:]
        elif arg in _OPTIONS_WITH_VALUE:
            value = next(it, None)
            if value is None:
                raise ValueError(f"missing argument to '{arg}'")
            rest.extend((arg, value))
        elif not arg.startswith("-") and Path(arg).suffix in SOURCE_SUFFIXES:
            sources.append(arg)
        else:
            rest.append(arg)
    return sources, rest, output


def cc_main(argv: list[str]) -> int:
    """``unifork cc SRC.c... -o OUT [cc flags]``: like cc, returns the exit status.

    Arguments keep their order (so ``-l`` after sources still works); the
    runtime and ``--wrap`` are added when linking, not for ``-c``/``-S``/``-E``
    (objects made with ``-c`` get them at the final link).
    Diagnostics go straight to this process's stderr, as with cc.
    """
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(
            "usage: unifork cc SRC.c... [-o OUT] [cc flags]\n"
            f"  static {TARGET} guest (-O2, asserts on); static-PIE by default, -no-pie -fno-PIE for ET_EXEC\n"
        )
        return 0 if argv else 2
    if any(a in ("-target", "--target") or a.startswith("--target=") for a in argv):
        sys.stderr.write("unifork cc: the target is always " + TARGET + "\n")
        return 2
    try:
        sources, _rest, output = split_cc_args(argv)
    except ValueError as exc:
        sys.stderr.write(f"unifork cc: {exc}\n")
        return 2
    link = not any(a in _NO_LINK_FLAGS for a in argv)
    args = list(argv)
    if link and output is None:
        args += ["-o", "a.out"]
    if link and not sources and not any(a.startswith("-x") for a in argv):
        sys.stderr.write("unifork cc: no input files\n")
        return 2
    cmd = guest_command(args, link=link)
    log.debug("unifork cc: %s", " ".join(cmd))
    return subprocess.run(cmd, env=zig_env(), check=False).returncode

"""``unifork cc``, the image cache and the basic guest programs, with the real zig toolchain.

Every program here also runs natively: the VM tests diff against exactly these
native runs, so their native behaviour is pinned down here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tender_service.toolchain import images
from tender_service.toolchain.cc import (
    CompileError,
    cc_main,
    compile_guest,
    split_cc_args,
    translate_flags,
)
from tender_service.toolchain.paths import CACHE_ENV, ZIG_CACHE_ENV, programs_dir, zig_cache_dir

TESTS_GUEST = Path(__file__).parent / "guest"

#: the programs of this module's owner (others live in guest/programs too)
BASIC_PROGRAMS = (
    "hello",
    "printf_test",
    "args",
    "exit_code",
    "malloc_stress",
    "fork_time",
    "pipe_talk",
    "cpu_loop",
    "getppid_loop",
    "fault_segv",
    "fault_ill",
    "fault_fpe",
    "efault",
    "unknown_syscall",
    "spin",
)


def run(exe: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60, **kw)


def elf_facts(path: Path) -> tuple[str, bool]:
    """(e_type, has PT_INTERP) of an ELF file."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        interp = any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
        return elf["e_type"], interp


@pytest.fixture
def image_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private image cache that still shares zig's cache (prebuilt musl)."""
    monkeypatch.setenv(ZIG_CACHE_ENV, str(zig_cache_dir()))
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every basic program built with -Wall -Wextra -Werror (so: warning free)."""
    out = tmp_path_factory.mktemp("programs")

    def build(name: str) -> tuple[str, Path]:
        exe = out / name
        compile_guest([programs_dir() / f"{name}.c"], exe, ["-Wall", "-Wextra", "-Werror"])
        return name, exe

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(build, BASIC_PROGRAMS))


# --- unifork cc -------------------------------------------------------------------


def test_compile_hello_runs_natively(tmp_path: Path) -> None:
    exe = tmp_path / "hello"
    compile_guest([programs_dir() / "hello.c"], exe)
    proc = run(exe)
    assert (proc.returncode, proc.stdout) == (0, "Hello, unikernel!\n")
    assert elf_facts(exe) == ("ET_DYN", False)  # static-PIE by default (exec in thread mode)


def test_no_pie_gives_et_exec(tmp_path: Path) -> None:
    exe = tmp_path / "hello-exec"
    compile_guest([programs_dir() / "hello.c"], exe, ["-no-pie", "-fno-PIE"])
    assert elf_facts(exe) == ("ET_EXEC", False)
    assert run(exe).stdout == "Hello, unikernel!\n"


def test_static_pie(tmp_path: Path) -> None:
    exe = tmp_path / "hello-pie"
    compile_guest([programs_dir() / "hello.c"], exe, ["-static-pie"])
    assert elf_facts(exe) == ("ET_DYN", False)  # PIE without an interpreter
    assert run(exe).stdout == "Hello, unikernel!\n"


def test_translate_flags() -> None:
    assert translate_flags(["-Wall", "-static-pie", "-g"]) == ["-Wall", "-fPIE", "-pie", "-g"]
    assert translate_flags(["-fPIE", "-static-pie"]) == ["-fPIE", "-pie"]


def test_assert_fires_by_default(tmp_path: Path) -> None:
    exe = tmp_path / "assert_fail"
    compile_guest([TESTS_GUEST / "assert_fail.c"], exe)
    proc = run(exe)
    assert proc.returncode == -signal.SIGABRT
    assert "asserts are active" in proc.stderr
    assert proc.stdout == "before assert\n"


def test_ndebug_disables_assert(tmp_path: Path) -> None:
    exe = tmp_path / "assert_off"
    compile_guest([TESTS_GUEST / "assert_fail.c"], exe, ["-DNDEBUG"])
    proc = run(exe)
    assert (proc.returncode, proc.stdout) == (0, "before assert\nassert compiled out\n")


def test_compile_error_carries_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return undeclared_thing; }\n")
    with pytest.raises(CompileError) as info:
        compile_guest([bad], tmp_path / "bad")
    assert "undeclared_thing" in info.value.stderr
    assert info.value.returncode != 0
    assert not (tmp_path / "bad").exists()


def test_runtime_tolerates_strict_user_flags(tmp_path: Path) -> None:
    """The runtime is compiled with the user's flags; it must survive strict dialects."""
    exe = tmp_path / "hello89"
    compile_guest(
        [programs_dir() / "hello.c"], exe, ["-std=c89", "-pedantic", "-Weverything", "-Werror"]
    )
    assert run(exe).stdout == "Hello, unikernel!\n"


def test_split_cc_args() -> None:
    sources, rest, output = split_cc_args(
        ["-I", "inc", "a.c", "-DX=1", "-o", "prog", "b.o", "-lm", "-Wl,-z,now"]
    )
    assert sources == ["a.c", "b.o"]
    assert rest == ["-I", "inc", "-DX=1", "-lm", "-Wl,-z,now"]
    assert output == "prog"
    assert split_cc_args(["x.c", "-oout"])[2] == "out"
    with pytest.raises(ValueError):
        split_cc_args(["x.c", "-o"])


def test_cc_main_links_like_cc(tmp_path: Path) -> None:
    exe = tmp_path / "hello"
    assert cc_main([str(programs_dir() / "hello.c"), "-o", str(exe), "-Wall"]) == 0
    assert run(exe).stdout == "Hello, unikernel!\n"


def test_cc_main_compile_then_link(tmp_path: Path) -> None:
    obj, exe = tmp_path / "rt_probe.o", tmp_path / "rt_probe"
    src = TESTS_GUEST / "rt_probe.c"
    assert cc_main(["-c", str(src), "-o", str(obj)]) == 0  # -I for the runtime header is implied
    assert elf_facts(obj)[0] == "ET_REL"
    assert cc_main([str(obj), "-o", str(exe)]) == 0  # the link step adds the runtime
    assert "in_vm=0\n" in run(exe).stdout


def test_cc_main_usage_errors(tmp_path: Path) -> None:
    assert cc_main(["-o", str(tmp_path / "x")]) == 2
    assert cc_main(["-target", "aarch64-linux-musl", "x.c"]) == 2
    assert cc_main([str(tmp_path / "missing.c"), "-o", str(tmp_path / "x")]) != 0


# --- the basic programs, natively ---------------------------------------------------


def test_hello_program(programs: dict[str, Path]) -> None:
    assert run(programs["hello"]).stdout == "Hello, unikernel!\n"


def test_printf_test_is_deterministic(programs: dict[str, Path]) -> None:
    first, second = run(programs["printf_test"]), run(programs["printf_test"])
    assert first.returncode == 0 and first.stdout == second.stdout
    out = first.stdout
    assert "padded: [   42] [42   ] [00042] [+42] [ 42] [-0042]\n" in out
    assert "double[4]: 3.141593 | 3 | 3.14 | 3.1415926536 | 3.141593e+00 |" in out
    assert "strings: [unikernel] [unikernel ] [       abc] [uni] [un    ]\n" in out
    assert "long long: [9007199254740993] [-9223372036854775808]" in out


def test_args_program(programs: dict[str, Path]) -> None:
    proc = run(programs["args"], "7", "two words", env={"A": "1", "B": "x=y"})
    assert proc.returncode == 7
    assert proc.stdout.splitlines()[0] == "argc=3"
    assert proc.stdout.splitlines()[2:] == [
        "argv[1]=7",
        "argv[2]=two words",
        "env[0]=A=1",
        "env[1]=B=x=y",
        "envc=2",
    ]


@pytest.mark.parametrize(
    ("mode", "status", "atexit_ran"),
    [
        ("exit", 5, True),
        ("return", 5, True),
        ("_exit", 5, False),
        ("abort", -signal.SIGABRT, False),
    ],
)
def test_exit_code_program(
    programs: dict[str, Path], mode: str, status: int, atexit_ran: bool
) -> None:
    proc = run(programs["exit_code"], "5", mode)
    assert proc.returncode == status
    assert proc.stdout.startswith(f"exit_code: code=5 mode={mode}\n")
    assert ("atexit handler ran" in proc.stdout) == atexit_ran


def test_malloc_stress_native(programs: dict[str, Path]) -> None:
    for args in ((), ("12345", "3000")):
        proc = run(programs["malloc_stress"], *args)
        assert proc.returncode == 0, proc.stdout
        assert re.fullmatch(
            r"malloc_stress: seed=\d+ ops=\d+ .* errors=0 checksum=[0-9a-f]{16}\n", proc.stdout
        )
    # the checksum depends on the operation sequence only, so it is reproducible
    assert (
        run(programs["malloc_stress"], "99", "500").stdout
        == run(programs["malloc_stress"], "99", "500").stdout
    )
    assert (
        run(programs["malloc_stress"], "99", "500").stdout
        != run(programs["malloc_stress"], "98", "500").stdout
    )


def test_fork_time_single(programs: dict[str, Path]) -> None:
    proc = run(programs["fork_time"])
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert sorted(line for line in lines if not line.startswith("fork took")) == ["child", "parent"]
    assert len([line for line in lines if re.fullmatch(r"fork took: \d+\.\d{6}s", line)]) == 2


def test_fork_time_benchmark_mode(programs: dict[str, Path]) -> None:
    proc = run(programs["fork_time"], "-n", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5
    assert all(re.fullmatch(r"fork_us=\d+\.\d{3}", line) for line in lines[:4])
    assert lines[4].startswith("fork_summary runs=4 ") and lines[4].endswith(" ok=1")
    assert run(programs["fork_time"], "-n").returncode == 2


def test_pipe_talk(programs: dict[str, Path]) -> None:
    proc = run(programs["pipe_talk"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("child:")] == ["child: wrote 30 bytes"] * 3
    parent = [line for line in lines if line.startswith("parent: got")]
    assert parent == [
        "parent: got message 1: Hello from another unikernel!",
        "parent: got message 2: Sello from another unikernel!",
        "parent: got message 3: Qello from another unikernel!",
    ]
    assert lines[-2:] == ["parent: EOF after 3 messages", "parent: child exited with status 0"]


def test_pipe_talk_literal_write_faults_natively(programs: dict[str, Path]) -> None:
    """Natively .rodata is read-only: the flag the VM test passes kills the child here."""
    proc = run(programs["pipe_talk"], "--write-literal")
    assert proc.returncode == 1
    assert f"parent: child killed by signal {int(signal.SIGSEGV)}" in proc.stdout


def test_cpu_loop(programs: dict[str, Path]) -> None:
    a, b = run(programs["cpu_loop"], "5000"), run(programs["cpu_loop"], "5000")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert re.fullmatch(r"cpu_loop n=5000 primes=\d+ checksum=[0-9a-f]{16}\n", a.stdout)
    assert run(programs["cpu_loop"], "5001").stdout != a.stdout


def test_getppid_loop(programs: dict[str, Path]) -> None:
    proc = run(programs["getppid_loop"], "1000")
    assert proc.returncode == 0
    m = re.fullmatch(r"calls=1000\nns_per_call=(\d+\.\d{3})\n", proc.stdout)
    assert m and float(m.group(1)) > 0


@pytest.mark.parametrize(
    ("name", "args", "sig"),
    [
        ("fault_segv", (), signal.SIGSEGV),
        ("fault_segv", ("unmapped",), signal.SIGSEGV),
        ("fault_ill", (), signal.SIGILL),
        ("fault_fpe", (), signal.SIGFPE),
    ],
)
def test_fault_programs(
    programs: dict[str, Path], name: str, args: tuple[str, ...], sig: signal.Signals
) -> None:
    proc = run(programs[name], *args)
    assert proc.returncode == -sig
    assert proc.stdout.startswith(f"{name}: ") and "still alive" not in proc.stdout


def test_efault_program(programs: dict[str, Path]) -> None:
    proc = run(programs["efault"], stdin=subprocess.DEVNULL)
    assert proc.returncode == 0
    assert proc.stdout == (
        "write(1, (void *)1, 10) = -1 EFAULT\n"
        "read(0, (void *)8, 10) = -1 EFAULT\n"
        'read(0, buf, 10) = 10 "0123456789"\n'
    )


def test_unknown_syscall_program(programs: dict[str, Path]) -> None:
    proc = run(programs["unknown_syscall"])
    assert (proc.returncode, proc.stdout) == (0, "syscall(500) = -1 ENOSYS\n")


def test_spin_runs_until_killed(programs: dict[str, Path]) -> None:
    with subprocess.Popen([programs["spin"]], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "spin: spinning\n"  # blocks until printed
        assert proc.poll() is None
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL


# --- images -----------------------------------------------------------------------


def test_builtin_programs_lists_the_basic_programs() -> None:
    builtins = images.builtin_programs()
    assert set(BASIC_PROGRAMS) <= builtins.keys()
    assert builtins["hello"] == programs_dir() / "hello.c"


def test_build_image_reuses_cache(image_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=images.__name__)
    first = images.build_image("hello")
    assert first.parent == image_cache / "images"
    assert re.fullmatch(r"hello-[0-9a-f]{16}\.elf", first.name)
    mtime = first.stat().st_mtime_ns
    assert caplog.text.count("building image hello") == 1
    second = images.build_image("hello")
    assert second == first and second.stat().st_mtime_ns == mtime
    assert caplog.text.count("building image hello") == 1
    assert run(first).stdout == "Hello, unikernel!\n"


def test_build_image_rebuilds_on_change(image_cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "greet.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("one"); return 0; }\n')
    one = images.build_image(src)
    src.write_text('#include <stdio.h>\nint main(void) { puts("two"); return 0; }\n')
    two = images.build_image(src)
    assert one != two and one.exists()
    assert (run(one).stdout, run(two).stdout) == ("one\n", "two\n")
    assert images.build_image(src, ["-DUNUSED=1"]) not in (one, two)  # flags are in the key


def test_concurrent_builds_threads(
    image_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=images.__name__)
    src = tmp_path / "together.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("together"); return 0; }\n')
    barrier = threading.Barrier(4)

    def build(_: int) -> Path:
        barrier.wait()
        return images.build_image(src)

    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = set(pool.map(build, range(4)))
    assert len(paths) == 1
    (path,) = paths
    assert caplog.text.count("building image together") == 1
    assert run(path).stdout == "together\n"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_concurrent_builds_processes(image_cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "procs.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("procs"); return 0; }\n')
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from tender_service.toolchain.images import build_image\n"
        "print(build_image(sys.argv[1]))\n"
    )
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(src)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert sum("building image procs" in err for _, err in results) == 1
    assert run(Path(paths.pop())).stdout == "procs\n"


def test_resolve_image(image_cache: Path, tmp_path: Path) -> None:
    built = images.resolve_image("hello")
    assert built == images.build_image("hello")
    assert images.resolve_image(str(built)) == built  # an ELF path is used as is
    src = tmp_path / "from_c.c"
    src.write_text("int main(void) { return 3; }\n")
    from_c = images.resolve_image(str(src))
    assert run(from_c).returncode == 3
    not_elf = tmp_path / "notes.txt"
    not_elf.write_text("hello")
    with pytest.raises(images.ImageNotFoundError):
        images.resolve_image(str(not_elf))
    with pytest.raises(images.ImageNotFoundError):
        images.resolve_image("no-such-program")


def test_build_all_and_list_images(image_cache: Path) -> None:
    before = {info.name: info for info in images.list_images()}
    assert before["hello"].path is None and before["hello"].sha256 is None
    calls: list[tuple[str, int, int]] = []
    built = images.build_all(["hello", "cpu_loop"], progress=lambda *a: calls.append(a))
    assert list(built) == ["hello", "cpu_loop"]
    assert sorted(done for _, done, _ in calls) == [1, 2]
    assert {name for name, _, _ in calls} == {"hello", "cpu_loop"}
    assert all(total == 2 for _, _, total in calls)
    after = {info.name: info for info in images.list_images()}
    hello = after["hello"]
    assert hello.path == built["hello"]
    assert hello.size == built["hello"].stat().st_size
    assert hello.sha256 == hashlib.sha256(built["hello"].read_bytes()).hexdigest()
    assert after["args"].path is None
    with pytest.raises(images.ImageNotFoundError):
        images.build_all(["hello", "nope"])


def test_host_libraries_build_and_an_unknown_name_is_refused() -> None:
    """The host libraries (block hook, fork word scan) come from guest/runtime/<name>.c,
    one cached shared object each; no other name builds."""
    from tender_service.toolchain.cc import HOST_LIBRARIES, host_library_source
    from tender_service.toolchain.images import build_host_library

    paths = {build_host_library(name) for name in HOST_LIBRARIES}
    assert len(paths) == len(HOST_LIBRARIES)
    for path in paths:
        assert path.is_file() and path.read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="no host library"):
        host_library_source("../../etc/passwd")

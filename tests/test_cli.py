"""The ``unifork`` command end to end: a subprocess, as a user runs it.

``unifork run`` reports the guest's exit status (and a fault, or a crash of
the emulator, without a traceback), compiles a C file on demand, takes its
options after the image, refuses RAM too small for the image, feeds the host's
stdin to the guest and traces syscalls; ``unifork images`` lists the built-in
images and ``unifork syscalls --markdown`` is docs/syscalls.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tender_service.toolchain.images import build_image

ROOT = Path(__file__).resolve().parents[1]
TESTS_GUEST = Path(__file__).resolve().parent / "guest"
UNIFORK = Path(sys.executable).parent / "unifork"


def cli(
    *args: str,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(UNIFORK), *args],
        capture_output=True,
        timeout=180,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        cwd=cwd,
        check=False,
    )


def test_cli_exit_status_is_the_guests() -> None:
    p = cli("run", "exit_code", "7")
    assert p.returncode == 7, p.stderr
    assert p.stdout == b"exit_code: code=7 mode=exit\natexit handler ran\n"


def test_cli_fault_prints_report_without_traceback() -> None:
    p = cli("run", "fault_segv")
    assert p.returncode == 139
    assert p.stdout == b"fault_segv: writing through a NULL pointer\n"
    err = p.stderr.decode()
    assert re.search(r"^unifork: pid 2: SIGSEGV: .*rip=0x[0-9a-f]+ address=0x0 insn=", err, re.M)
    assert "Traceback" not in err


def test_cli_reports_an_emulator_crash() -> None:
    """Unicorn 2.1.4 dies of SIGSEGV on tests/guest/x87_block.c; the VM runs in a forked
    child, so the command reports the lost VM and exits 137 (SIGKILL status, as the
    service does) instead of dying silently with 139."""
    p = cli("run", str(Path(__file__).with_name("guest") / "x87_block.c"))
    assert p.returncode == 137, p.stderr
    assert p.stdout == b""
    assert re.search(
        rb"^unifork: its VM was lost: the process that ran it \(pid \d+\) died "
        rb"of SIGSEGV \(the emulator crashed\)$",
        p.stderr,
        re.M,
    ), p.stderr


def test_cli_compiles_and_runs_a_c_file(tmp_path: Path) -> None:
    src = tmp_path / "prog.c"
    src.write_text(
        "#include <stdio.h>\n"
        "int main(int argc, char **argv) {\n"
        '\tprintf("compiled on demand: %d %s %s\\n", argc, argv[1], argv[2]);\n'
        "\treturn 5;\n}\n"
    )
    p = cli("run", str(src), "--", "one", "--mem", cwd=tmp_path)
    assert p.returncode == 5, p.stderr
    assert p.stdout == b"compiled on demand: 3 one --mem\n"


def test_cli_options_after_the_image() -> None:
    p = cli("run", "hello", "--mem", "8M", "--stats")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"Hello, unikernel!\n"
    m = re.search(rb"^unifork: exited, .*peak guest memory (\d+) bytes$", p.stderr, re.M)
    assert m, p.stderr
    assert 0 < int(m.group(1)) <= 8 << 20


def test_cli_stats_give_each_forks_time_in_the_kernel() -> None:
    p = cli("run", "fork_time", "--stats", "--", "-n", "3")
    assert p.returncode == 0, p.stderr
    m = re.search(
        rb"^unifork: fork in the kernel: 1st ([0-9.]+) us, the other 2 median ([0-9.]+) us$",
        p.stderr,
        re.M,
    )
    assert m, p.stderr
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    # a program that never forks has no such line
    p = cli("run", "hello", "--stats")
    assert p.returncode == 0 and b"fork in the kernel" not in p.stderr, p.stderr


def test_cli_mem_too_small_for_the_image() -> None:
    p = cli("run", str(TESTS_GUEST / "big_bss.c"), "--mem", "8M")
    assert p.returncode == 2
    assert p.stdout == b""
    assert b"more than guest RAM" in p.stderr and b"Traceback" not in p.stderr


def test_cli_stdin_from_the_host() -> None:
    data = b"piped into the unikernel\n" * 100
    p = cli("run", str(TESTS_GUEST / "machine_probe.c"), "echo", input=data)
    assert p.returncode == 0, p.stderr
    assert p.stdout == data
    assert b"EOF after 2500 bytes\n" in p.stderr


def test_cli_trace_syscalls() -> None:
    p = cli("run", "hello", "--trace-syscalls")
    assert p.returncode == 0
    assert p.stdout == b"Hello, unikernel!\n"
    assert re.search(rb"\] writev\(0x1, .*\) = 0x12$", p.stderr, re.M), p.stderr


def test_cli_images_lists_hello() -> None:
    build_image("hello")
    p = cli("images")
    assert p.returncode == 0
    assert re.search(rb"^hello +\d+ bytes +[0-9a-f]{16}$", p.stdout, re.M), p.stdout


def test_cli_syscalls_markdown_is_the_doc() -> None:
    doc = ROOT / "docs" / "syscalls.md"
    if not doc.is_file():
        pytest.skip("docs/syscalls.md has not been generated")
    p = cli("syscalls", "--markdown")
    assert p.returncode == 0
    assert p.stdout.decode() == doc.read_text()


def test_cli_main_runs_a_vmclone_instance_from_a_thread() -> None:
    """``unifork.cli.main`` called from a thread other than the main one (an embedding
    program) runs a VM-clone instance: the SIGTERM handler, which only the main thread
    may install, is left out there (it raised ValueError)."""
    code = (
        "import threading\n"
        "from unifork.cli import main\n"
        "if __name__ == '__main__':\n"
        "    out = []\n"
        "    t = threading.Thread(target=lambda: out.append(main(['run', '--fork', 'vmclone',"
        " 'hello'])))\n"
        "    t.start()\n"
        "    t.join()\n"
        "    print('status', out)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.stdout.splitlines()[-2:] == ["Hello, unikernel!", "status [0]"], r.stderr[-2000:]

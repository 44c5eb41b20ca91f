"""Standard input as users give it: ``unifork run prog < file``, ``< /dev/null``, a pipe, a tty.

The guest (guest/programs/stdin_sum.c) reads fd 0 to EOF and prints the byte
count and a checksum; with ``child`` a forked child reads it (in VM-clone mode
another VM) and the parent then reads EOF.  Every source in every fork mode
must print what the same binary prints natively with the same stdin.  Once,
the console's epoll refused a regular file and /dev/null (the CLI hid the
traceback and exited 1), and a VM-clone instance read EOF whatever was given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tender_service.toolchain.images import build_image

UNIFORK = Path(sys.executable).parent / "unifork"
DATA = bytes(range(256)) * 700 + b"the end\n"  # 179 KB: several reads of any size
MODES = {
    "thread": ["--fork", "thread"],
    "copy": ["--fork", "copy"],
    "vmclone-shm": ["--fork", "vmclone", "--pipe", "shm"],
    "vmclone-tcp": ["--fork", "vmclone", "--pipe", "tcp"],
}


def _feed(source: str, tmp_path: Path) -> tuple[object, Callable[[], None]]:
    """A stdin for subprocess.run of ``source`` kind holding DATA, and its clean-up."""
    if source == "file":
        path = tmp_path / "input"
        path.write_bytes(DATA)
        f = open(path, "rb")  # noqa: SIM115 - closed by the clean-up
        return f, f.close
    if source == "devnull":
        return subprocess.DEVNULL, lambda: None
    if source == "pipe":
        r, w = os.pipe()
        writer = threading.Thread(target=_write_all, args=(w, DATA), daemon=True)
        writer.start()

        def done() -> None:
            writer.join(30)
            os.close(r)

        return r, done
    # a tty: a pseudo-terminal in canonical mode, one typed line, then ^D twice: the
    # first reader's EOF and, with ``child``, the parent's (a terminal's EOF is one read)
    master, slave = os.openpty()
    os.write(master, b"typed at a terminal\n\x04\x04")

    def closed() -> None:
        os.close(slave)
        os.close(master)

    return slave, closed


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _run(cmd: list[str], source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    stdin, cleanup = _feed(source, tmp_path)
    try:
        return subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=120, check=False)
    finally:
        cleanup()


@pytest.fixture(scope="module")
def stdin_sum() -> Path:
    return build_image("stdin_sum")


@pytest.mark.parametrize("who", ["self", "child"])
@pytest.mark.parametrize("source", ["file", "devnull", "pipe", "tty"])
@pytest.mark.parametrize("mode", list(MODES))
def test_stdin_as_natively(
    stdin_sum: Path, mode: str, source: str, who: str, tmp_path: Path
) -> None:
    args = [] if who == "self" else ["child"]
    native = _run([str(stdin_sum), *args], source, tmp_path)
    assert native.returncode == 0, native.stderr
    vm = _run([str(UNIFORK), "run", *MODES[mode], str(stdin_sum), *args], source, tmp_path)
    assert vm.stderr == b"", vm.stderr.decode(errors="replace")
    assert (vm.returncode, vm.stdout) == (0, native.stdout)
    if source in ("file", "pipe"):
        assert f"stdin: {len(DATA)} bytes".encode() in vm.stdout


def test_stdin_none_reads_eof(stdin_sum: Path, tmp_path: Path) -> None:
    """``--stdin none``: the guest reads EOF whatever this process's stdin is."""
    p = _run([str(UNIFORK), "run", "--stdin", "none", str(stdin_sum)], "file", tmp_path)
    assert (p.returncode, p.stdout) == (0, b"stdin: 0 bytes fnv1a=cbf29ce484222325\n")


BOOM = """
import sys
import tender_service.instance.backends as backends
import unifork.cli

def boom(*args, **kwargs):
    raise RuntimeError("an internal error, injected")

backends.run_instance = boom
sys.exit(unifork.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_cli_internal_error_is_not_hidden(stdin_sum: Path, mode: str) -> None:
    """An internal error while running (injected: the run itself raises) is reported
    with its traceback and a nonzero status; the thread-mode run's forked child once
    ended in ``os._exit(1)`` with nothing said."""
    p = subprocess.run(
        [sys.executable, "-c", BOOM, "run", *MODES[mode], str(stdin_sum)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert p.returncode != 0
    err = p.stderr.decode(errors="replace")
    assert "Traceback" in err and "RuntimeError: an internal error, injected" in err, err

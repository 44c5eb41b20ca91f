"""The C header and the Python module define the same hypercalls, and the runtime probes right."""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK
from tender_service.machine import hypercalls
from tender_service.rump.syscalls.sys_memory import hc_free, hc_realloc, hc_usable_size
from tender_service.toolchain.cc import compile_guest
from tender_service.toolchain.images import build_image
from tender_service.toolchain.paths import runtime_dir
from tender_service.vm import create_vm

HEADER = runtime_dir() / "unifork_hypercalls.h"
TESTS_GUEST = Path(__file__).parent / "guest"
DEFINE_RE = re.compile(r"^#define\s+UNIFORK_(HC_[A-Z0-9_]+)\s+(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\s*$")


def header_constants() -> dict[str, int]:
    """``UNIFORK_HC_X`` numbers from the C header, keyed by the Python name ``HC_X``."""
    found: dict[str, int] = {}
    for line in HEADER.read_text().splitlines():
        m = DEFINE_RE.match(line.strip())
        if m:
            assert m.group(1) not in found, f"duplicate #define UNIFORK_{m.group(1)}"
            found[m.group(1)] = int(m.group(2), 0)
    return found


def python_constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(hypercalls).items()
        if name.startswith("HC_") and isinstance(value, int)
    }


def test_header_and_module_agree() -> None:
    c, py = header_constants(), python_constants()
    assert {"HC_PROBE", "HC_MALLOC", "HC_FREE", "HC_MAGIC"} <= c.keys()
    assert c == py


def test_hypercall_table_is_consistent() -> None:
    numbers = list(hypercalls.HYPERCALLS.values())
    assert len(set(numbers)) == len(numbers)
    assert all(n >= hypercalls.HC_BASE for n in numbers)
    assert {
        k: v for k, v in python_constants().items() if k not in ("HC_BASE", "HC_MAGIC")
    } == hypercalls.HYPERCALLS
    # far above any Linux x86-64 syscall number, so natively they are -ENOSYS
    assert hypercalls.HC_BASE > 1000


def test_compiled_header_values_match(tmp_path: Path) -> None:
    """What the C compiler sees (after macro expansion) equals the Python values."""
    names = sorted(header_constants())
    body = "".join(f'\tprintf("{n}=%llu\\n", (unsigned long long)(UNIFORK_{n}));\n' for n in names)
    src = tmp_path / "hc_dump.c"
    src.write_text(
        '#include <stdio.h>\n#include "unifork_hypercalls.h"\n'
        f"int main(void)\n{{\n{body}\treturn 0;\n}}\n"
    )
    exe = tmp_path / "hc_dump"
    compile_guest([src], exe, ["-Wall", "-Werror"])
    out = subprocess.run([exe], capture_output=True, text=True, check=True, timeout=30).stdout
    seen = dict(line.split("=") for line in out.splitlines())
    assert {k: int(v) for k, v in seen.items()} == python_constants()


@pytest.fixture(scope="module")
def rt_probe(tmp_path_factory: pytest.TempPathFactory) -> str:
    exe = tmp_path_factory.mktemp("probe") / "rt_probe"
    compile_guest([TESTS_GUEST / "rt_probe.c"], exe, ["-Wall", "-Werror"])
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_probe_is_enosys_natively(rt_probe: str) -> None:
    assert f"probe={-errno.ENOSYS} is_error=1\n" in rt_probe


def test_runtime_falls_back_to_libc_natively(rt_probe: str) -> None:
    assert "in_vm=0\n" in rt_probe
    assert "alloc_ok=1 calloc_zero=1 strdup=duplicated by libc\n" in rt_probe


def test_raw_syscall_helpers(rt_probe: str) -> None:
    assert "getpid_match=1\n" in rt_probe
    assert "raw write\nraw_write=10\n" in rt_probe
    assert f"bad_fd={-errno.EBADF} is_error=1\n" in rt_probe


def test_guest_malloc_hypercalls_refuse_kernel_blocks() -> None:
    """The guest's free/realloc/malloc_usable_size reach only its own malloc's blocks:
    a pointer to its kernel stack (a bmk heap block of the kernel's) gets EINVAL and
    the block stays as it was."""

    k = create_vm(build_image("hello"), sink=lambda pid, fd, data: None)
    try:
        lwp = k.main.lwps[0]
        stack = k.heap.get(lwp.stack)
        assert stack is not None and stack.who == MEMWHO_WIREDBMK
        before = (stack.block, stack.block_size, stack.size)
        assert hc_realloc(k, lwp, lwp.stack, 64) == -errno.EINVAL
        assert hc_usable_size(k, lwp, lwp.stack) == -errno.EINVAL
        assert hc_free(k, lwp, lwp.stack) == -errno.EINVAL
        after = k.heap.get(lwp.stack)
        assert after is stack and (after.block, after.block_size, after.size) == before
        mine = k.heap.malloc(100, owner=k.main.pid)  # the guest's own block: all fine
        assert hc_usable_size(k, lwp, mine) >= 100
        moved = hc_realloc(k, lwp, mine, 5000)
        assert moved > 0 and hc_usable_size(k, lwp, moved) >= 5000
        assert hc_free(k, lwp, moved) == 0
    finally:
        k.close()

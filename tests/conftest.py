"""Shared fixtures: build guest images once, run them in a VM or natively."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tender_service.instance.pool import WarmPool
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, run_vm


@dataclass
class VmRun:
    result: RunResult
    stdout: bytes
    stderr: bytes
    chunks: list[tuple[int, int, bytes]]

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


def image_path(name: str) -> Path:
    return build_image(name)


def vm(name: str | Path, *args: str, stdin: bytes | None = None, **config) -> VmRun:
    """Run a built-in image (or an ELF path) in a fresh VM and capture everything."""
    path = Path(name) if isinstance(name, Path) else image_path(name)
    config.setdefault("timeout", 120)
    sink = CaptureSink()
    result = run_vm(path, list(args), config=VmConfig(**config), sink=sink, stdin=stdin)
    return VmRun(result, bytes(sink.stdout), bytes(sink.stderr), sink.chunks)


def native(name: str | Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the very same static binary on the host."""
    path = Path(name) if isinstance(name, Path) else image_path(name)
    return subprocess.run([str(path), *args], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05,
               detail: Callable[[], str] = lambda: "") -> object:
    """Wait until ``cond()`` is truthy and return it; fail naming ``what`` after ``timeout``.

    This is how tests wait for something to happen: on the condition, with a
    deadline (the sleep is only the polling interval).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{detail()}")
        time.sleep(interval)  # ok-sleep: the polling interval of a wait with a deadline


@pytest.fixture
def run_vm_image():
    return vm


@pytest.fixture
def run_native():
    return native


@pytest.fixture(scope="module")
def pool() -> Iterator[WarmPool]:
    """A warm pool of two tender processes for a module's VM-clone runs."""
    p = WarmPool(2)
    try:
        p.wait_ready(60)
        yield p
    finally:
        p.close()

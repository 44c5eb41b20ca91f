"""Shared fixtures: run guest images in a VM or natively, a warm pool of tenders.

Plain helpers are in support.py (test modules import them from there).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import thirdparty
from support import native, vm

from tender_service.instance.pool import WarmPool
from tender_service.toolchain.bake import bake


def pytest_configure(config: pytest.Config) -> None:
    """Signals as an interactive start leaves them, however the suite was started.

    A command started in the background by a non-interactive shell (``cmd &`` in a
    script, as CI runners and nohup do) has SIGINT and SIGQUIT ignored, and an
    ignored signal stays ignored in every program it starts: natively, dash then
    cannot trap SIGINT and ``raise(SIGQUIT)`` does nothing, where the VM (whose
    processes start with default dispositions, as a fresh unikernel) differs.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow: the full set (make test-all; UNIFORK_SLOW=1 too)",
    )


def _full_set(config: pytest.Config) -> bool:
    return bool(config.getoption("--slow")) or os.environ.get("UNIFORK_SLOW") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default run is a representative subset: tests marked slow (more cases of what
    a quick case already covers) run only in the full set, so that the suite stays
    under 20 minutes on 2 cores."""
    if _full_set(config):
        return
    keep, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") is not None else keep).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    if _full_set(config):
        return "unifork: the full set (slow tests included)"
    return "unifork: the default subset; the full set: make test-all (pytest --slow)"


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


# -- a real shell: dash from Debian's sources and our small tools -----------------------------
@pytest.fixture(scope="module")
def programs() -> dict[str, Path]:
    """dash and our tools (skips, saying why, if dash cannot be fetched or built here)."""
    try:
        sh = thirdparty.dash()
    except thirdparty.Unavailable as e:
        pytest.skip(f"dash unavailable on this machine: {e}")
    return {"sh": sh, **thirdparty.tools()}


@pytest.fixture(scope="module")
def app(programs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image with each of ``programs`` as /bin/NAME."""
    out = tmp_path_factory.mktemp("shell") / "app.img"
    bake(out, [(f"/bin/{name}", path) for name, path in programs.items()])
    return out


@pytest.fixture(scope="module")
def native_bin(programs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same binaries under their names in one directory: the native PATH."""
    d = tmp_path_factory.mktemp("bin")
    for name, path in programs.items():
        (d / name).symlink_to(path)
    return d

"""Shared fixtures: run guest images in a VM or natively, a warm pool of tenders.

Plain helpers are in support.py (test modules import them from there).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import native, vm

from tender_service.instance.pool import WarmPool


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

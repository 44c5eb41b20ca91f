"""The fork modes' backends: how the layers above start an instance of each mode.

A fork mode is a package of its own (its strategy in ``fork/``, what it needs
at the instance layer) plus one ``InstanceBackend`` module here, registered
in ``instance/modes.py``'s ``BACKENDS`` by module name: ``make_backend`` imports
a backend only when it is asked for.  Reading the list of modes needs nothing
from here (``instance/modes.py``: ``unifork run`` reads it before it forks).
"""

from __future__ import annotations

import importlib

from tender_service.instance.backends.base import (
    BackendContext,
    InstanceBackend,
    InstanceSpec,
    RunningInstance,
    VmStatus,
    run_instance,
)
from tender_service.instance.modes import BACKENDS, FORK_MODES, ONE_VM_MODES

__all__ = [
    "BACKENDS",
    "FORK_MODES",
    "ONE_VM_MODES",
    "BackendContext",
    "InstanceBackend",
    "InstanceSpec",
    "RunningInstance",
    "VmStatus",
    "make_backend",
    "make_backends",
    "run_instance",
]


def make_backend(mode: str, ctx: BackendContext | None = None) -> InstanceBackend:
    """The backend of fork mode ``mode`` (ValueError for a mode nobody registered)."""
    if mode not in BACKENDS:
        raise ValueError(f"unknown fork mode {mode!r} (choose from {', '.join(FORK_MODES)})")
    module, _, name = BACKENDS[mode].partition(":")
    return getattr(importlib.import_module(module), name)(ctx or BackendContext())


def make_backends(ctx: BackendContext) -> dict[str, InstanceBackend]:
    """A backend of every mode (a tender serves them all)."""
    return {mode: make_backend(mode, ctx) for mode in FORK_MODES}

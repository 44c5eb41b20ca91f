"""The fork modes, by name: the one list the service, the CLI and the harness read.

A fork mode is a package of its own (its strategy in ``fork/``, what it needs
at the instance layer) plus one ``InstanceBackend`` module here, registered
in ``BACKENDS``.  The registry names each backend's module instead of
importing it, so that reading the list of modes (``unifork --help``, the gRPC
server) does not import the emulator.
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

__all__ = [
    "BACKENDS",
    "FORK_MODES",
    "BackendContext",
    "InstanceBackend",
    "InstanceSpec",
    "RunningInstance",
    "VmStatus",
    "make_backend",
    "make_backends",
    "run_instance",
]

#: mode name -> "module:class" of its InstanceBackend
BACKENDS: dict[str, str] = {
    "thread": "tender_service.instance.backends.thread:ThreadBackend",
    "vmclone": "tender_service.instance.backends.vmclone:VmcloneBackend",
    "copy": "tender_service.instance.backends.copy:CopyBackend",
}
FORK_MODES: tuple[str, ...] = tuple(BACKENDS)


def make_backend(mode: str, ctx: BackendContext | None = None) -> InstanceBackend:
    """The backend of fork mode ``mode`` (ValueError for a mode nobody registered)."""
    if mode not in BACKENDS:
        raise ValueError(f"unknown fork mode {mode!r} (choose from {', '.join(FORK_MODES)})")
    module, _, name = BACKENDS[mode].partition(":")
    return getattr(importlib.import_module(module), name)(ctx or BackendContext())


def make_backends(ctx: BackendContext) -> dict[str, InstanceBackend]:
    """A backend of every mode (a tender serves them all)."""
    return {mode: make_backend(mode, ctx) for mode in FORK_MODES}

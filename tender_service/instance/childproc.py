"""What the tender's child processes share: set-up, and their logs coming home.

The tender runs guest code only in child processes (the warm pool's tender
processes for VM-clone VMs, one process per thread-fork instance), so that a
crash of the emulator ends a child, never the tender.  A pool process's log
records travel through a multiprocessing queue to a multiprocessing-logging
handler in the tender, which hands them to the tender's logger of the same
name (thread-fork VM processes send theirs as frames: instance/vmserver.py).
"""

from __future__ import annotations

import logging

from multiprocessing_logging import MultiProcessingHandler

from tender_service.instance.hostmalloc import limit_malloc_arenas


class _Forward(logging.Handler):
    """Hands a child's record to this process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def log_receiver(name: str, mp_context) -> MultiProcessingHandler:
    """A handler whose ``queue`` children log into (``close()`` it when done)."""
    handler = MultiProcessingHandler(name, sub_handler=_Forward())
    # the queue must come from the children's context to reach them (the receiving
    # thread reads ``handler.queue`` afresh on every poll)
    handler.queue = mp_context.Queue(-1)
    return handler


def setup_child(handler: logging.Handler, level: int) -> None:
    """First thing a child does: cap malloc arenas, send its logs (all through
    ``handler``) to the tender."""
    limit_malloc_arenas()
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)

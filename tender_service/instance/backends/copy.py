"""Copy fork as an instance backend: every process in one VM, each with private memory.

The strategy is ``fork/copy.py`` (issue 18); everything else is thread fork's
(``vm.py``, ``instance/vmserver.py``, ``instance/threadvm.py``): a one-shot
run uses the calling thread, a tender runs each VM in a process of its own.
"""

from __future__ import annotations

from tender_service.instance.backends.thread import ThreadBackend
from tender_service.instance.modes import ONE_VM_MODES


class CopyBackend(ThreadBackend):
    mode = "copy"
    one_vm = mode in ONE_VM_MODES

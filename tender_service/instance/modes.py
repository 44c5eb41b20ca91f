"""The fork modes, by name: the one list the service, the CLI and the harness read.

Standard library only, on purpose: ``unifork run`` reads this list before it forks
the process its one-VM instance runs in, and every module imported before that fork
is shared copy-on-write with the parent, so the VM's first fork would pay a host
page fault for each page of those modules it writes (a refcount is a write): about
a quarter of a millisecond measured on the guest's first fork (issue 17).
"""

from __future__ import annotations

#: mode name -> "module:class" of its InstanceBackend
BACKENDS: dict[str, str] = {
    "thread": "tender_service.instance.backends.thread:ThreadBackend",
    "vmclone": "tender_service.instance.backends.vmclone:VmcloneBackend",
    "copy": "tender_service.instance.backends.copy:CopyBackend",
}
FORK_MODES: tuple[str, ...] = tuple(BACKENDS)
#: the modes whose instance is one VM, every process in it (``InstanceBackend.one_vm``)
ONE_VM_MODES: frozenset[str] = frozenset({"thread", "copy"})

"""Run one VM-clone instance to the end (the CLI's ``--fork vmclone``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tender_service.instance.pool import WarmPool
from tender_service.instance.supervisor import InstanceResult, Supervisor
from tender_service.rump.vminfo import VmConfig
from tender_service.vm import DEFAULT_ENV, _program_name


def run_vmclone(image: str | Path, args: Sequence[str] = (), env: Sequence[str] | None = None,
                config: VmConfig | None = None,
                sink: Callable[[int, int, bytes], None] | None = None,
                transport: str = "shm", pool: WarmPool | None = None, pool_size: int = 2,
                argv0: str | None = None, observer: object | None = None) -> InstanceResult:
    """Start a pool (unless given), run the instance, stop everything it started.

    ``observer`` gets ``fork_done(seconds, snapshot_bytes, remote)`` and
    ``pipe_write(nbytes, seconds)`` calls (see service/instances.py).
    """
    config = config or VmConfig()
    config.validate()
    own_pool = pool is None
    pool = pool or WarmPool(pool_size)
    try:
        if own_pool:  # a child placed on a process still starting would wait for it (and
            pool.wait_ready()  # share the CPU with its start-up): the first fork pays that

        sup = Supervisor(pool, transport, sink or (lambda pid, fd, data: None), config,
                         observer=observer)
        try:
            path = Path(image)
            sup.start(str(path.resolve()), list(args), list(DEFAULT_ENV if env is None else env),
                      argv0 or _program_name(path.name))
            return sup.wait()
        finally:
            sup.close()
    finally:
        if own_pool:
            pool.close()

"""Every registered fork mode through the one interface: same program, same output, one result.

A mode added to ``instance/backends`` is run here without a new test: the
same guest program in each registered backend must print what it prints
natively, end in a ``RunResult`` with its forks counted, and have a value in
the gRPC ``ForkMode`` enum.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import image_path, native

from tender_service import protos
from tender_service.instance.backends import (
    FORK_MODES,
    ONE_VM_MODES,
    BackendContext,
    InstanceBackend,
    InstanceSpec,
    make_backend,
    run_instance,
)
from tender_service.instance.pool import WarmPool
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.service.server import fork_mode_name, fork_mode_value
from tender_service.vm import CaptureSink

CHILDREN = "7"


@pytest.fixture(params=FORK_MODES)
def backend(request, pool: WarmPool) -> Iterator[InstanceBackend]:
    b = make_backend(request.param, BackendContext(pool=pool))
    try:
        yield b
    finally:
        b.close()


def test_a_backend_is_one_vm_exactly_when_the_registry_says_so(
    backend: InstanceBackend,
) -> None:
    """``unifork run`` decides from ``ONE_VM_MODES`` alone whether to fork the process
    the instance runs in, before any backend is imported (unifork/cli.py)."""
    assert backend.one_vm == (backend.mode in ONE_VM_MODES)
    assert set(FORK_MODES) >= ONE_VM_MODES


def test_the_registry_names_both_modes_and_refuses_others() -> None:
    assert {"thread", "vmclone"} <= set(FORK_MODES)
    with pytest.raises(ValueError, match="unknown fork mode 'nosuch'"):
        make_backend("nosuch")


def test_every_mode_runs_the_same_program_alike(backend: InstanceBackend) -> None:
    sink = CaptureSink()
    r = run_instance(
        backend,
        InstanceSpec(
            image_path("fork_exit_wait"), ["-n", CHILDREN], config=VmConfig(timeout=60, tty=False)
        ),
        sink,
    )
    ref = native("fork_exit_wait", "-n", CHILDREN)
    assert isinstance(r, RunResult)
    assert (r.outcome, r.exit_code) == ("exited", 0), r.reports
    assert bytes(sink.stdout) == ref.stdout == b"ok 7 children\n"
    assert r.forks == int(CHILDREN)
    assert {p.pid for p in r.processes} >= {1, 2}, r.processes
    # every mode says how long each fork took in the parent's kernel, in fork order
    assert r.fork_seconds is not None and len(r.fork_seconds) == r.forks
    assert all(s > 0 for s in r.fork_seconds) and sum(r.fork_seconds) < r.elapsed


def test_every_mode_has_its_value_in_the_grpc_enum() -> None:
    pb2, _ = protos.tender()
    for mode in FORK_MODES:
        assert fork_mode_name(pb2, fork_mode_value(pb2, mode)) == mode
    assert fork_mode_name(pb2, pb2.FORK_MODE_UNSPECIFIED) == "thread"

"""Prometheus metrics of a tender (``/metrics``): names ``unifork_*``, base units.

gRPC server metrics carry the standard ``grpc_server_*`` names of go-grpc-prometheus
and py-grpc-prometheus (recorded by service/auth.py), labelled only with methods the
server serves: any other name the caller sends counts as ``unknown``.

The default registry also carries the process collector, which exports the
tender's CPU seconds and resident memory (``process_cpu_seconds_total``,
``process_resident_memory_bytes``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tender_service.instance.backends import FORK_MODES

_LATENCY = (
    1e-6,
    2.5e-6,
    5e-6,
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

FORK_LATENCY = Histogram(
    "unifork_fork_latency_seconds",
    "Time a fork takes in the parent, by fork mode, transport, placement",
    ["mode", "transport", "placement"],
    buckets=_LATENCY,
)
SNAPSHOT_BYTES = Histogram(
    "unifork_clone_snapshot_bytes",
    "Size of VM-clone snapshots",
    buckets=(64e3, 128e3, 256e3, 512e3, 1e6, 2e6, 4e6, 8e6, 16e6, 64e6),
)
PIPE_BYTES = Counter(
    "unifork_pipe_bytes_total", "Bytes written into pipes, by transport", ["transport"]
)
PIPE_WRITE_LATENCY = Histogram(
    "unifork_pipe_write_latency_seconds",
    "Time from a cross-VM pipe write request to its reply (brokered pipes: over tcp, "
    "or across hosts; a pipe ring's writes, over shm on one host, pass no supervisor)",
    ["transport"],
    buckets=_LATENCY,
)
PUBLISHED_CONNECTIONS = Counter(
    "unifork_published_connections_total",
    "Host connections to published ports, by fork mode and outcome (accepted: queued "
    "for the guest's listener; refused: nothing listens on the guest port)",
    ["mode", "outcome"],
)
PUBLISHED_BYTES = Counter(
    "unifork_published_bytes_total",
    "Bytes through published ports, by direction (in: host client to guest)",
    ["direction"],
)
ACCEPT_LATENCY = Histogram(
    "unifork_accept_latency_seconds",
    "Time a connection to a listener the VMs of an instance share waits until one accepts it",
    ["transport", "placement"],
    buckets=_LATENCY,
)
VMS = Gauge(
    "unifork_vms", "VMs running in this tender's processes (never the tender itself)", ["mode"]
)
PROCESSES = Gauge("unifork_processes", "Guest processes of running instances", ["mode"])
INSTANCES = Gauge("unifork_instances", "Instances running on this tender", ["mode"])
GUEST_MEMORY = Gauge(
    "unifork_guest_memory_committed_bytes",
    "Guest memory committed by the thread-fork VMs of this tender",
)
VM_STARTS = Gauge(
    "unifork_vm_starts_in_progress",
    "Peer.StartVm calls this tender is receiving (clones in transfer or restore)",
)
SHM_EXHAUSTED = Counter(
    "unifork_shm_exhausted_total",
    "VM-clone VMs whose shm channel segment could not be made (no memory): tcp instead",
)
FINISHED = Counter(
    "unifork_instances_finished_total", "Instances that ended, by outcome", ["outcome"]
)
EMULATOR_CRASHES = Counter(
    "unifork_emulator_crashes_total",
    "VM processes that died of a signal without a result (the emulator "
    "crashed; each ends its instance's VM, never the tender)",
    ["fork_mode"],
)
for _mode in FORK_MODES:  # present from the start, at 0: alerts see a series
    EMULATOR_CRASHES.labels(_mode)
_GRPC = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server", _GRPC)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure",
    _GRPC + ["grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds", "Response latency of RPCs handled by the server", _GRPC
)
GRPC_STREAMS = Gauge(
    "unifork_grpc_streams_open", "Long-lived gRPC calls (streams, Wait) open on the client server"
)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Expose ``/metrics`` on ``addr:port`` (a daemon thread)."""
    start_http_server(port, addr=addr)

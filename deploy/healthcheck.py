"""Health probe of a tender: the standard gRPC health check, with the bearer token.

Exit 0 when the tender answers SERVING, 1 otherwise (Docker HEALTHCHECK and
Kubernetes exec probes read only the exit status).  Health checks need no
token (the tender leaves them open for orchestrators, so Kubernetes' native
``grpc:`` probe works too); the probe sends one anyway when it has it, from
``--token-file`` when that file exists, else from ``UNIFORK_TOKEN``.

    python healthcheck.py [--target HOST:PORT] [--token-file PATH] [--service NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("UNIFORK_TARGET", "127.0.0.1:7700"),
                   help="tender HOST:PORT (env UNIFORK_TARGET, default 127.0.0.1:7700)")
    p.add_argument("--token-file", help="bearer token file (used when it exists)")
    p.add_argument("--service", default="", help="health service name (default: the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    token = os.environ.get("UNIFORK_TOKEN")
    if a.token_file and Path(a.token_file).is_file():
        token = Path(a.token_file).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        with grpc.insecure_channel(a.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout,
                metadata=metadata)
    except grpc.RpcError as e:
        print(f"unhealthy: {a.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{a.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

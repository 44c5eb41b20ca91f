"""Health probe of a tender: the standard gRPC health check, over TLS when asked.

Exit 0 when the tender answers SERVING, 1 when it does not (or cannot be
reached), 2 for a wrong command line; Docker HEALTHCHECK and exec probes read
only the exit status.  Health checks need no token: the tender leaves them
open for orchestrators (they reveal only SERVING / NOT_SERVING), which is
also why Kubernetes' native ``grpc:`` probe works.  A token, when there is
one (``--token-file`` if that file exists, else ``UNIFORK_TOKEN``), is sent
anyway and changes nothing.

TLS, as the ``unifork`` client does it: ``--tls-ca`` verifies the tender's
certificate; ``--tls-cert`` with ``--tls-key`` presents a client certificate
(mutual TLS); ``--tls-server-name`` is the name to verify when the target is
an address the certificate does not name (a probe of 127.0.0.1).

    python healthcheck.py [--target HOST:PORT] [--token-file PATH] [--service NAME]
                          [--tls-ca CA.pem [--tls-cert CERT.pem --tls-key KEY.pem]
                           [--tls-server-name NAME]]
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
    p.add_argument(
        "--target",
        default=os.environ.get("UNIFORK_TARGET", "127.0.0.1:7700"),
        help="tender HOST:PORT (env UNIFORK_TARGET, default 127.0.0.1:7700)",
    )
    p.add_argument("--token-file", help="bearer token file (sent when it exists; not needed)")
    p.add_argument("--service", default="", help="health service name (default: the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS tender")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="the client certificate's private key (PEM)")
    p.add_argument(
        "--tls-server-name",
        help="the name the tender's certificate must carry (default: the target's host)",
    )
    return p


def channel(a: argparse.Namespace) -> grpc.Channel:
    """A plaintext channel, or a TLS one when --tls-ca is given."""
    if not a.tls_ca:
        return grpc.insecure_channel(a.target)
    key = Path(a.tls_key).read_bytes() if a.tls_key else None
    cert = Path(a.tls_cert).read_bytes() if a.tls_cert else None
    creds = grpc.ssl_channel_credentials(Path(a.tls_ca).read_bytes(), key, cert)
    options = [("grpc.ssl_target_name_override", a.tls_server_name)] if a.tls_server_name else []
    return grpc.secure_channel(a.target, creds, options=options)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together (a client certificate and its key)")
    if (a.tls_cert or a.tls_server_name) and not a.tls_ca:
        p.error("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
    token = os.environ.get("UNIFORK_TOKEN")
    if a.token_file and Path(a.token_file).is_file():
        token = Path(a.token_file).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        with channel(a) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=a.service),
                timeout=a.timeout,
                metadata=metadata,
            )
    except OSError as e:  # a TLS file that cannot be read
        print(f"healthcheck: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"unhealthy: {a.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{a.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

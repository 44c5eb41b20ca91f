"""The port helpers of tests/support.py keep their promises.

``reserved_port()``: while it is held, no plain socket can bind the port and a
bind to port 0 never gets it, yet a real gRPC server binds it and answers
there.  ``refused_port()``: connections are refused and nobody can bind it.
"""

from __future__ import annotations

import errno
import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import refused_port, reserved_port


def bind_error(port: int, *opts: int) -> int:
    """errno of binding 127.0.0.1:port with the given SOL_SOCKET options set, 0 if it worked."""
    with socket.socket() as s:
        for opt in opts:
            s.setsockopt(socket.SOL_SOCKET, opt, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno
        return 0


def test_a_reserved_port_is_taken_only_by_the_grpc_server() -> None:
    with reserved_port() as port:
        assert bind_error(port) == errno.EADDRINUSE
        assert bind_error(port, socket.SO_REUSEADDR) == errno.EADDRINUSE
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                assert s.getsockname()[1] != port
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        try:
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            server.start()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            server.stop(None).wait()


def test_a_refused_port_refuses_and_cannot_be_bound() -> None:
    with refused_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert bind_error(port) == errno.EADDRINUSE
        assert bind_error(port, socket.SO_REUSEADDR) == errno.EADDRINUSE
        assert bind_error(port, socket.SO_REUSEPORT) == errno.EADDRINUSE

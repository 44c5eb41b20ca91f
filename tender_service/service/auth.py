"""Bearer-token authentication for every RPC, and gRPC request metrics.

With a token file, a call without ``authorization: Bearer <token>`` metadata
(or with another token) is refused with UNAUTHENTICATED before any handler
runs: every method of the client and the peer API, and reflection.  Standard
health checks stay open (orchestrators probe them without credentials, and
they reveal nothing but SERVING / NOT_SERVING).  The same interceptor counts requests and their latency by
method and status code.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path

import grpc

from tender_service.service import metrics

HEALTH_PREFIX = "/grpc.health.v1.Health/"


#: tokens that examples shipped (deploy/kubernetes/secret.yaml until issue 12): anyone
#: who read the repository knows them, so a tender refuses to start with one
PLACEHOLDER_TOKENS = frozenset({"REPLACE-ME-with-a-random-token-of-32-or-more-characters"})
PLACEHOLDER_MARKERS = ("replace-me", "replace_me", "changeme", "change-me")


def read_token(path: str | Path) -> str:
    """The bearer token in ``path``: ValueError (naming the file) for one too short or a
    known placeholder."""
    token = Path(path).read_text().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: a token must have at least 16 characters")
    if token in PLACEHOLDER_TOKENS or any(m in token.lower() for m in PLACEHOLDER_MARKERS):
        raise ValueError(f"{path}: holds a placeholder token, not a secret: put a random "
                         "one there (e.g. openssl rand -hex 32)")
    return token


def call_metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str | None) -> None:
        self.token = token

    def intercept_service(self, continuation, details):
        method = details.method
        if self.token is not None and not method.startswith(HEALTH_PREFIX):
            got = dict(details.invocation_metadata).get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                metrics.GRPC_REQUESTS.labels(method, "UNAUTHENTICATED").inc()
                return _deny()
        handler = continuation(details)
        if handler is None:
            return None
        return _instrument(handler, method)


def _deny() -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def abort_stream(request_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    # a generic handler that accepts any request shape
    return grpc.stream_stream_rpc_method_handler(abort_stream)


def _instrument(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    def wrap_unary(fn):
        def inner(request, context):
            t0 = time.perf_counter()
            code = "OK"
            try:
                return fn(request, context)
            except Exception:
                code = _code(context)
                raise
            finally:
                metrics.GRPC_REQUESTS.labels(method, code if code != "OK" else _code(context)).inc()
                metrics.GRPC_LATENCY.labels(method).observe(time.perf_counter() - t0)

        return inner

    def wrap_stream(fn):
        def inner(request, context):
            t0 = time.perf_counter()
            try:
                yield from fn(request, context)
            finally:
                metrics.GRPC_REQUESTS.labels(method, _code(context)).inc()
                metrics.GRPC_LATENCY.labels(method).observe(time.perf_counter() - t0)

        return inner

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer,
            handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer,
            handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer,
            handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream), handler.request_deserializer,
        handler.response_serializer)


def _code(context) -> str:
    code = context.code() if hasattr(context, "code") else None
    return "OK" if code is None else getattr(code, "name", str(code))

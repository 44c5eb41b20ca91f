"""What every RPC of the tender's (grpc.aio) server passes through before its handler.

- Bearer tokens: with a token file, a call without ``authorization: Bearer <token>``
  metadata (or with another token) is refused with UNAUTHENTICATED before any handler
  runs: every method of the client and the peer API, and reflection.  Standard health
  checks stay open (orchestrators probe them without credentials, and they reveal
  nothing but SERVING / NOT_SERVING).
- Long-lived calls (every streaming method and ``Wait``) are bounded per peer host and
  in all: past either limit a call is refused with RESOURCE_EXHAUSTED.  ``Health.Watch``
  (no token needed) has a budget of its own.  On the aio
  server they hold no thread, but each still holds memory, and a peer must not be
  able to take every slot.
- Undecodable request bytes are INVALID_ARGUMENT (grpc's own answer is INTERNAL on the
  sync server, UNKNOWN on the aio one): the caller sent them, the server is fine.
- Sync handlers (they run in the server's thread pool) see ``context.abort`` raise, as
  on the sync server; grpc.aio's context for them returns from ``abort`` instead.
- Metrics with the standard names ``grpc_server_started_total``,
  ``grpc_server_handled_total`` and ``grpc_server_handling_seconds``, labelled only
  with methods the server serves: any other name a caller sends counts as ``unknown``
  (the name is attacker-chosen; as a label it would grow ``/metrics`` without bound).
  py-grpc-prometheus (0.8) is not used: it has only a sync ``grpc.ServerInterceptor``
  (asyncio support is its open issue #13) and labels by the name the caller sent.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tender_service.service import metrics

HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNKNOWN = "unknown"
#: unary calls that last as long as an instance runs
WAITING = frozenset({"/unifork.v1.Tender/Wait"})
MAX_STREAMS = 10000
MAX_STREAMS_PER_PEER = 1000


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
        raise ValueError(
            f"{path}: holds a placeholder token, not a secret: put a random "
            "one there (e.g. openssl rand -hex 32)"
        )
    return token


def call_metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``ipv4:127.0.0.1``: a peer's calls come from many ports."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


@dataclass
class StreamLimiter:
    """Counts the long-lived calls open, per peer host and in all, in two budgets:
    ``Health.Watch`` (open to anyone) and the rest (they need the token when there is
    one), so that callers without a token never take the slots of those with one."""

    total: int = MAX_STREAMS
    per_peer: int = MAX_STREAMS_PER_PEER
    open: Tally = field(default_factory=Tally)  # (budget, peer) -> calls
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, budget: str, peer: str) -> str | None:
        """Take a slot for ``peer``; the reason if there is none."""
        with self.lock:
            if sum(n for (b, _), n in self.open.items() if b == budget) >= self.total:
                return f"the tender has {self.total} long-lived {budget} calls open (its limit)"
            if self.open[budget, peer] >= self.per_peer:
                return (
                    f"{peer} has {self.per_peer} long-lived {budget} calls open (the limit "
                    "per peer): cancel some first"
                )
            self.open[budget, peer] += 1
            metrics.GRPC_STREAMS.inc()
            return None

    def release(self, budget: str, peer: str) -> None:
        with self.lock:
            self.open[budget, peer] -= 1
            if self.open[budget, peer] <= 0:
                del self.open[budget, peer]
            metrics.GRPC_STREAMS.dec()


class Aborted(Exception):
    """Raised by a sync handler's ``context.abort``; the interceptor sets the status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Undecodable:
    def __init__(self, error: str) -> None:
        self.error = error


class _Context:
    """The handler's view of the call: ``abort`` raises and records its code."""

    def __init__(self, ctx, sync: bool, count: Callable[[str], None]) -> None:
        self._ctx, self._sync, self._count = ctx, sync, count
        self.aborted: grpc.StatusCode | None = None
        self.counted = False

    def count(self, code: str) -> None:
        """Count the call's end once: when the handler is done, or at an async abort,
        which sends the status before it raises (counted after, a caller that had its
        answer could scrape ``/metrics`` without it)."""
        if not self.counted:
            self.counted = True
            self._count(code)

    def abort(self, code, details: str = "", trailing_metadata=()):
        self.aborted = code
        if self._sync:
            raise Aborted(code, details)
        self.count(_code_name(code))
        return self._ctx.abort(code, details, tuple(trailing_metadata))

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def _tolerant(deserializer):
    """A deserializer that hands undecodable bytes to the handler wrapper as such."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as e:  # protobuf's DecodeError, or whatever a codec raises
            return _Undecodable(str(e) or type(e).__name__)

    return deserialize


def _bad_request(r: _Undecodable) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({r.error})"


def _grpc_type(h: grpc.RpcMethodHandler) -> str:
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[(bool(h.request_streaming), bool(h.response_streaming))]


def _code_name(code) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c.name
    return "UNKNOWN"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str | None, limiter: StreamLimiter | None = None) -> None:
        self.token = token
        self.limiter = limiter or StreamLimiter()

    async def intercept_service(self, continuation, details):
        method = details.method
        handler = await continuation(details)
        if handler is None:
            labels = (UNKNOWN, UNKNOWN, UNKNOWN)
        else:
            service, _, name = method[1:].rpartition("/")
            labels = (_grpc_type(handler), service, name)
        if self.token is not None and not method.startswith(HEALTH_PREFIX):
            got = dict(details.invocation_metadata).get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                return self._wrap(
                    _refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"),
                    labels,
                    False,
                )
        if handler is None:
            return self._wrap(
                _refusal(grpc.StatusCode.UNIMPLEMENTED, f"no method {method[:200]!r}"),
                labels,
                False,
            )
        long_lived = (
            bool(handler.request_streaming or handler.response_streaming) or method in WAITING
        )
        return self._wrap(handler, labels, long_lived)

    def _wrap(
        self, h: grpc.RpcMethodHandler, labels: tuple[str, str, str], long_lived: bool
    ) -> grpc.RpcMethodHandler:
        """``h`` with its function wrapped as sync or async, whichever it is."""
        fn = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
        asynchronous = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        call = _Call(
            self.limiter,
            labels,
            long_lived,
            h.request_streaming,
            "Health.Watch" if labels[1] == "grpc.health.v1.Health" else "API",
        )
        if inspect.isasyncgenfunction(fn):
            wrapped = call.async_stream(fn)
        elif asynchronous:  # a coroutine: unary, or a stream written with context.write
            wrapped = call.async_unary(fn)
        else:
            wrapped = call.sync_stream(fn) if h.response_streaming else call.sync_unary(fn)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(bool(h.request_streaming), bool(h.response_streaming))]
        return make(wrapped, _tolerant(h.request_deserializer), h.response_serializer)


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that takes any request (raw bytes) and answers ``code``."""

    async def refuse(request_iterator, context):
        await context.abort(code, details)
        yield  # never reached: an async generator, as the wrapper expects

    return grpc.stream_stream_rpc_method_handler(refuse)


@dataclass
class _Call:
    """One method's wrappers: metrics, the stream limit, decoding, ``abort``."""

    limiter: StreamLimiter
    labels: tuple[str, str, str]
    long_lived: bool
    request_streaming: bool
    budget: str  # of the stream limits

    # -- the parts the four wrappers share --------------------------------------------
    def _context(self, context, sync: bool) -> tuple[_Context, str | None]:
        """The call begun: counted, a stream slot taken if it needs one; its context and
        the reason it is refused (no slot left), if it is."""
        t0 = time.perf_counter()
        metrics.GRPC_STARTED.labels(*self.labels).inc()
        peer, reason = None, None
        if self.long_lived:
            peer = peer_host(context.peer())
            reason = self.limiter.acquire(self.budget, peer)
            if reason:
                peer = None

        def end(code: str) -> None:
            if peer is not None:
                self.limiter.release(self.budget, peer)
            metrics.GRPC_HANDLED.labels(*self.labels, code).inc()
            metrics.GRPC_HANDLING.labels(*self.labels).observe(time.perf_counter() - t0)

        return _Context(context, sync, end), reason

    def _check_sync(self, request):
        if isinstance(request, _Undecodable):
            raise Aborted(*_bad_request(request))
        if self.request_streaming:
            return self._checked_sync(request)
        return request

    def _checked_sync(self, requests):
        for r in requests:
            if isinstance(r, _Undecodable):
                raise Aborted(*_bad_request(r))
            yield r

    async def _check_async(self, request, ctx: _Context):
        if isinstance(request, _Undecodable):
            await ctx.abort(*_bad_request(request))
        if self.request_streaming:
            return self._checked_async(request, ctx)
        return request

    async def _checked_async(self, requests, ctx: _Context):
        async for r in requests:
            if isinstance(r, _Undecodable):
                await ctx.abort(*_bad_request(r))
            yield r

    @staticmethod
    def _outcome(ctx: _Context, e: BaseException | None) -> str:
        if ctx.aborted is not None:
            return _code_name(ctx.aborted)
        if isinstance(e, asyncio.CancelledError):
            return "CANCELLED"
        if e is not None:
            return "UNKNOWN"
        return _code_name(ctx.code()) if hasattr(ctx._ctx, "code") else "OK"

    @staticmethod
    def _refuse_sync(ctx, e: Aborted) -> None:
        ctx.set_code(e.code)
        ctx.set_details(e.details)

    # -- the wrappers --------------------------------------------------------------------
    def sync_unary(self, fn):
        def handler(request, context):
            (ctx, reason), err = self._context(context, True), None
            try:
                if reason:
                    ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                return fn(self._check_sync(request), ctx)
            except Aborted as e:
                ctx.aborted = e.code
                self._refuse_sync(context, e)
                return None
            except BaseException as e:
                err = e
                raise
            finally:
                ctx.count(self._outcome(ctx, err))

        return handler

    def sync_stream(self, fn):
        def handler(request, context):
            (ctx, reason), err = self._context(context, True), None
            try:
                if reason:
                    ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                yield from fn(self._check_sync(request), ctx)
            except Aborted as e:
                ctx.aborted = e.code
                self._refuse_sync(context, e)
            except BaseException as e:
                err = e
                raise
            finally:
                ctx.count(self._outcome(ctx, err))

        return handler

    def async_unary(self, fn):
        async def handler(request, context):
            (ctx, reason), err = self._context(context, False), None
            try:
                if reason:
                    await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                return await fn(await self._check_async(request, ctx), ctx)
            except BaseException as e:
                err = e
                raise
            finally:
                ctx.count(self._outcome(ctx, err))

        return handler

    def async_stream(self, fn):
        async def handler(request, context):
            (ctx, reason), err = self._context(context, False), None
            try:
                if reason:
                    await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                async for reply in fn(await self._check_async(request, ctx), ctx):
                    yield reply
            except BaseException as e:
                err = e
                raise
            finally:
                ctx.count(self._outcome(ctx, err))

        return handler

"""An asyncio HTTP/1.0 load client: the host's side of the HTTP benchmark.

Each of C clients loops for a fixed time: connect, send one GET, read the
answer to EOF (the servers close after each answer: HTTP/1.0), check the
status line.  It reports requests/s over the measured time and the p50/p99
of each request's latency (connect to EOF).  Only loopback is used.
Run alone: ``python -m comparison.http_load PORT [--path /hello] [--seconds 5] [-c 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _one(host: str, port: int, request: bytes) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await reader.read()  # to EOF
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return data.startswith(b"HTTP/1.") and data[9:12] == b"200"


async def run_load(
    port: int,
    path: str = "/hello",
    seconds: float = 5.0,
    concurrency: int = 8,
    host: str = "127.0.0.1",
    warmup: float = 0.5,
) -> LoadResult:
    """Load ``host:port`` with ``concurrency`` clients: ``warmup`` seconds unmeasured, then
    ``seconds`` measured (requests that end inside the window count)."""
    request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
    lat: list[float] = []
    errors = 0
    start = time.monotonic()
    t0 = start + warmup
    t1 = t0 + seconds

    async def client() -> None:
        nonlocal errors
        while True:
            a = time.monotonic()
            if a >= t1:
                return
            try:
                ok = await asyncio.wait_for(_one(host, port, request), 30)
            except (TimeoutError, OSError):
                ok = False
            b = time.monotonic()
            if a >= t0 and b <= t1:
                if ok:
                    lat.append(b - a)
                else:
                    errors += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(
        requests=len(lat),
        errors=errors,
        seconds=seconds,
        concurrency=concurrency,
        rps=len(lat) / seconds,
        p50_ms=_quantile(lat, 0.50) * 1e3,
        p99_ms=_quantile(lat, 0.99) * 1e3,
    )


def load(port: int, path: str = "/hello", seconds: float = 5.0, concurrency: int = 8) -> LoadResult:
    return asyncio.run(run_load(port, path, seconds, concurrency))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--path", default="/hello")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    a = ap.parse_args(argv)
    r = load(a.port, a.path, a.seconds, a.concurrency)
    sys.stdout.write(json.dumps(asdict(r)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark of the worker <-> supervisor channel, tcp vs shm (not a test).

Every cross-VM pipe byte, console line and wait status of a VM-clone instance
crosses one of these channels, so their bulk throughput and small-message
round trip bound what VM-clone fork can do.  The peer is a real second
process (``spawn``), as a worker would be.  tcp sends the frames through its
socket (``--socket tcp``: loopback TCP, or ``unix``); shm sends only its
doorbells, always over a Unix socket (its segment's fd travels there), so
with ``--socket unix`` the two differ only in where the frame bytes travel.  Run: ``python -m comparison.bench_transport``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from comparison.report import grid
from comparison.stats import median, percentile
from tender_service.transports import Channel, ChannelClosed, Frame, accept_channel, connect_channel

log = logging.getLogger(__name__)

DATA, END, ACK, PING = 1, 2, 3, 4


@dataclass
class Result:
    kind: str
    mb_per_s: float
    frames_per_s: float
    rtt_median_us: float
    rtt_p99_us: float


def _peer(kind: str, address: str | tuple[str, int]) -> None:
    """The worker side: swallow DATA until END (then ACK), echo every PING."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
    else:
        sock = socket.create_connection(address)
    ch = connect_channel(kind, sock, True, {"pid": os.getpid()})
    try:
        while True:
            f = ch.recv()
            if f is None or f.type == DATA:
                continue
            if f.type == END:
                ch.send(Frame(ACK, arg=ch.bytes_received))
            elif f.type == PING:
                ch.send(f)
    except ChannelClosed:
        pass
    finally:
        ch.close()


def _throughput(ch: Channel, total: int, size: int) -> tuple[float, float]:
    payload = os.urandom(size)
    frames = total // size
    t0 = time.perf_counter()
    for i in range(frames):
        ch.send(Frame(DATA, req=i, payload=payload))
    ch.send(Frame(END))
    ack = ch.recv(timeout=120)
    elapsed = time.perf_counter() - t0
    if ack is None or ack.type != ACK:
        raise RuntimeError(f"no ACK from the peer: {ack}")
    return total / elapsed / 1e6, frames / elapsed


def _round_trips(ch: Channel, count: int, size: int) -> list[float]:
    payload = bytes(size)
    samples = []
    for i in range(count):
        t0 = time.perf_counter()
        ch.send(Frame(PING, req=i, payload=payload))
        echo = ch.recv(timeout=10)
        samples.append(time.perf_counter() - t0)
        if echo is None or echo.req != i:
            raise RuntimeError(f"bad echo {echo} for ping {i}")
    return samples


def _listen(family: str, tmp: Path) -> socket.socket:
    if family == "unix":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp / "bench.sock"))
        listener.listen()
        return listener
    return socket.create_server(("127.0.0.1", 0))


def run(kind: str, family: str, total: int, size: int, pings: int, ping_size: int) -> Result:
    ctx = multiprocessing.get_context("spawn")
    family = "unix" if kind == "shm" else family  # the segment goes with the hello
    with tempfile.TemporaryDirectory() as tmp, _listen(family, Path(tmp)) as listener:
        peer = ctx.Process(target=_peer, args=(kind, listener.getsockname()))
        peer.start()
        listener.settimeout(30)
        conn, _ = listener.accept()
    ch, _ = accept_channel(conn)
    try:
        _round_trips(ch, 200, ping_size)  # warm up both interpreters
        mb_s, frames_s = _throughput(ch, total, size)
        samples = sorted(_round_trips(ch, pings, ping_size))
    finally:
        ch.close()
        peer.join(30)
    p50, p99 = median(samples), percentile(samples, 99)
    assert p50 is not None and p99 is not None  # pings > 0 round trips were timed
    return Result(
        kind,
        mb_s,
        frames_s,
        p50 * 1e6,
        p99 * 1e6,  # inclusive, as every report (was the nearest rank above)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB streamed per transport")
    parser.add_argument("--frame-kib", type=int, default=64)
    parser.add_argument("--pings", type=int, default=20_000)
    parser.add_argument("--ping-bytes", type=int, default=32)
    parser.add_argument("--kinds", default="tcp,shm")
    parser.add_argument("--socket", choices=["tcp", "unix"], default="tcp", help="of tcp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [
        run(kind, args.socket, args.mib << 20, args.frame_kib << 10, args.pings, args.ping_bytes)
        for kind in args.kinds.split(",")
    ]
    print(
        f"{args.mib} MiB in {args.frame_kib} KiB frames one way; "
        f"{args.pings} round trips of {args.ping_bytes}-byte frames; peer in another process; "
        f"tcp over a {args.socket} socket, shm over a unix one"
    )
    head = ("transport", "MB/s", "frames/s", "RTT p50 us", "RTT p99 us")
    body = [
        (
            r.kind,
            f"{r.mb_per_s:.0f}",
            f"{r.frames_per_s:.0f}",
            f"{r.rtt_median_us:.1f}",
            f"{r.rtt_p99_us:.1f}",
        )
        for r in rows
    ]
    print("\n".join(grid(head, body, {1, 2, 3, 4})))


if __name__ == "__main__":
    main()

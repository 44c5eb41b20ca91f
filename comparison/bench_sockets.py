"""Socketpair benchmark per fork mode vs native, in one run (not a test).

``guest/programs/sock_pair.c bench ROUNDS MB``: a parent and its forked child
share a stream socketpair; the parent times ROUNDS 8-byte ping-pongs (the
round trip) and then reads MB MiB the child writes (the stream throughput).
The same static binary runs natively, in thread fork, and in VM-clone fork
over shm and over tcp (where the pair became two pipes in the supervisor's
broker), interleaved, several runs each; the table gives medians and the
ratio to native measured in this run.
Run: ``python -m comparison.bench_sockets [--runs N] [--rounds N] [--mib N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from comparison.report import grid
from comparison.stats import median
from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.instance.pool import WarmPool
from tender_service.rump.vminfo import VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, run_vm

MODES = ("native", "thread", "vmclone-shm", "vmclone-tcp")


def _figures(out: str) -> tuple[float, float]:
    rtt = re.search(r"^rtt_us ([0-9.]+)$", out, re.M)
    bw = re.search(r"^mb_per_s ([0-9.]+)$", out, re.M)
    if rtt is None or bw is None:
        raise RuntimeError(f"sock_pair bench: unexpected output {out!r}")
    return float(rtt.group(1)), float(bw.group(1))


def run_once(mode: str, image: Path, args: list[str], pool: WarmPool | None) -> tuple[float, float]:
    if mode == "native":
        p = subprocess.run([str(image), *args], capture_output=True, timeout=300, check=True)
        return _figures(p.stdout.decode())
    sink = CaptureSink()
    config = VmConfig(timeout=300)
    if mode == "thread":
        result = run_vm(image, args, config=config, sink=sink)
    else:
        result = run_vmclone(
            image, args, config=config, sink=sink, transport=mode.split("-")[1], pool=pool
        )
    if result.status != 0:
        raise RuntimeError(f"{mode}: sock_pair bench ended {result.outcome} {result.status}")
    return _figures(bytes(sink.stdout).decode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="kept runs per mode (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=2000, help="ping-pong round trips per run")
    ap.add_argument("--mib", type=int, default=16, help="MiB streamed per run")
    ap.add_argument("--json", type=Path, help="write the samples and medians here")
    opts = ap.parse_args(argv)
    image = build_image("sock_pair")
    args = ["bench", str(opts.rounds), str(opts.mib)]
    pool = WarmPool(2)
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    try:
        pool.wait_ready(60)
        for i in range(opts.runs + 1):  # interleaved; the first round is a warm-up
            for mode in MODES:
                fig = run_once(mode, image, args, pool)
                if i:
                    samples[mode].append(fig)
    finally:
        pool.close()
    med = {
        m: (median([s[0] for s in v]) or 0.0, median([s[1] for s in v]) or 0.0)
        for m, v in samples.items()
    }
    nat_rtt, nat_bw = med["native"]
    rows = [
        [
            m,
            f"{rtt:.1f}",
            f"{rtt / nat_rtt:.1f}x" if nat_rtt else "-",
            f"{bw:.1f}",
            f"{bw / nat_bw:.3f}x" if nat_bw else "-",
        ]
        for m, (rtt, bw) in med.items()
    ]
    print(
        f"sock_pair bench: {opts.rounds} round trips, {opts.mib} MiB, "
        f"median of {opts.runs} runs per mode (1 warm-up)"
    )
    print("\n".join(grid(["mode", "rtt us", "vs native", "MB/s", "vs native"], rows, {1, 2, 3, 4})))
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {"args": vars(opts) | {"json": str(opts.json)}, "samples": samples, "medians": med},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

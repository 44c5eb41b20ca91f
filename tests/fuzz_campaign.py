"""Syscall fuzzing campaign: run guest/programs/syscall_fuzz.c over many seeds.

    .venv/bin/python tests/fuzz_campaign.py --mode thread --seeds 1-10 -n 100000
    .venv/bin/python tests/fuzz_campaign.py --mode vmclone --seeds 1-4 -n 25000
    .venv/bin/python tests/fuzz_campaign.py --mode thread --seeds 1-10 -n 20000 --forks 20

Prints one line per seed and the totals (syscalls issued, errno histogram,
every internal error with its seed and report); exits 1 if any run did not
exit 0 or reported an internal error.  With ``--forks N`` the fuzzer forks
(``syscall_fuzz -f N``): the totals then count every process's calls, and a
failed fork check (the fuzzer's exit status 3) is a failure too.
docs/reliability.md has the figures.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tender_service.rump.vminfo import VmConfig  # noqa: E402
from tender_service.toolchain.images import build_image  # noqa: E402
from tender_service.vm import CaptureSink, run_vm  # noqa: E402

SUMMARY = re.compile(
    rb"seed=(\d+) calls=(\d+) ok=(\d+) errors=(\d+) skipped=(\d+) vm=(\d) "
    rb"hist=([0-9a-f]+)(?: forks=(\d+) children_ok=(\d+))?\nerrnos([ 0-9:]*)\n"
)
FORK_CHECK = re.compile(rb"^fork check: .*$", re.M)


def seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _fuzz_args(opts: argparse.Namespace, seed: int) -> list[str]:
    args = ["-s", str(seed), "-n", str(opts.n)]
    if opts.forks:
        args += ["-f", str(opts.forks)]
    if opts.child_calls:
        args += ["-c", str(opts.child_calls)]
    return args


def _count_summary(
    m: re.Match[bytes], totals: collections.Counter[str], hist: collections.Counter[int]
) -> str:
    """Add one run's summary line to the totals; what it adds to the run's line."""
    line = f" ok={int(m[3])} errors={int(m[4])} skipped={int(m[5])} hist={m[7].decode()}"
    totals.update(calls=int(m[2]), ok=int(m[3]), errors=int(m[4]), skipped=int(m[5]))
    if m[8] is not None:
        line += f" forks={int(m[8])} children_ok={int(m[9])}"
        totals.update(forks=int(m[8]), children_ok=int(m[9]))
    for pair in m[10].split():
        e, n = pair.split(b":")
        hist[int(e)] += int(n)
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("thread", "vmclone"), default="thread")
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--forks", type=int, default=0, help="fork events per run (syscall_fuzz -f)")
    ap.add_argument(
        "--child-calls",
        type=int,
        default=0,
        help="at most this many calls per child (syscall_fuzz -c; default its own)",
    )
    ap.add_argument(
        "--pipe",
        choices=("shm", "tcp"),
        default="shm",
        help="vmclone: how pipes between VMs travel",
    )
    ap.add_argument("--timeout", type=float, default=600)
    opts = ap.parse_args()
    image = build_image("syscall_fuzz")
    pool = None
    if opts.mode == "vmclone":
        from tender_service.instance.pool import WarmPool

        pool = WarmPool(2)
        pool.wait_ready(60)
    hist: collections.Counter[int] = collections.Counter()
    totals = collections.Counter()
    bad: list[str] = []
    start = time.monotonic()
    try:
        for seed in seeds(opts.seeds):
            sink = CaptureSink()
            args = _fuzz_args(opts, seed)
            config = VmConfig(timeout=opts.timeout)
            t0 = time.monotonic()
            if pool is None:
                res = run_vm(image, args, config=config, sink=sink)
            else:
                from tender_service.instance.backends.vmclone import run_vmclone

                res = run_vmclone(
                    image, args, config=config, sink=sink, pool=pool, transport=opts.pipe
                )
            out = bytes(sink.stdout)
            m = SUMMARY.search(out)
            line = (
                f"seed={seed} outcome={res.outcome} status={res.status} "
                f"{time.monotonic() - t0:.1f}s"
            )
            if m:
                line += _count_summary(m, totals, hist)
            print(line, flush=True)
            internal = [r for r in res.reports if "internal error" in r]
            checks = [c.decode(errors="replace") for c in FORK_CHECK.findall(out)]
            for r in res.reports:
                print(f"  report: {r}", flush=True)
            for c in checks:
                print(f"  {c}", flush=True)
            if internal or res.outcome != "exited" or res.status != 0 or not m:
                bad.append(
                    f"seed {seed}: outcome={res.outcome} status={res.status} "
                    f"reports={res.reports}" + (f" checks={checks}" if checks else "")
                )
            totals["seeds"] += 1
    finally:
        if pool is not None:
            pool.close()
    import errno

    forks = f" forks={totals['forks']} children_ok={totals['children_ok']}" if opts.forks else ""
    print(
        f"mode={opts.mode} seeds={totals['seeds']} syscalls={totals['calls']} ok={totals['ok']} "
        f"errors={totals['errors']} skipped={totals['skipped']}{forks} "
        f"elapsed={time.monotonic() - start:.0f}s"
    )
    print(
        "errnos: " + ", ".join(f"{errno.errorcode.get(e, e)}={n}" for e, n in sorted(hist.items()))
    )
    print(f"failures: {len(bad)}")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line options of ``unifork compare`` and ``unifork load``.

Kept free of heavy imports: ``unifork/cli.py`` builds its parser from
these for every command, and imports the harness itself only when one of the
two commands runs.
"""

from __future__ import annotations

import argparse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return value


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from comparison.modes import ALL_MODES
    from comparison.workloads import WORKLOADS

    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer runs and smaller sizes (under 2 minutes on 2 cores)",
    )
    p.add_argument(
        "--runs",
        type=_positive,
        default=None,
        help="kept runs per workload and mode (default 3 with --quick, else 10)",
    )
    p.add_argument(
        "--cold-runs",
        type=_positive,
        default=None,
        help="separate one-fork runs of fork_time per mode for the cold first fork "
        "(default 5 with --quick, else 10: the thesis's 10 runs)",
    )
    p.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="where to create the report-<timestamp>/ folder (default: .)",
    )
    p.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="also run VM-clone instances on this tender with placement remote "
        "(every VM on its peers); skipped when not given",
    )
    p.add_argument("--token-file", help="bearer token file for --target (or env UNIFORK_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate to verify a TLS --target")
    p.add_argument(
        "--only",
        nargs="+",
        choices=[w.key for w in WORKLOADS],
        metavar="WORKLOAD",
        help="run only these workloads (memory and scaling still run); exec_chain, "
        "tmpfs_write and tmpfs_read run only when named here",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(ALL_MODES),
        metavar="MODE",
        help=f"run only these modes (of {', '.join(ALL_MODES)})",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory-per-child runs")
    p.add_argument("--no-scaling", action="store_true", help="skip the fork-count scaling runs")
    p.add_argument(
        "--no-http",
        action="store_true",
        help="skip the HTTP servers under load (prefork_http at 2 workers with --quick, else "
        "at 1, 4 and 16, and mini_httpd; comparison/bench_http.py)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        action="append",
        help="tender address host:port (env UNIFORK_TARGET, else 127.0.0.1:7700); "
        "repeat it to spread the launches over several tenders",
    )
    p.add_argument("--token-file", help="bearer token file (or env UNIFORK_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate to verify a TLS tender")
    p.add_argument(
        "--concurrency", type=_positive, default=4, help="instances in flight at once (default 4)"
    )
    p.add_argument(
        "--duration",
        type=_seconds,
        default=10.0,
        help="seconds during which new instances are launched (default 10)",
    )
    p.add_argument("--image", default="hello", help="image to launch (default hello)")
    p.add_argument(
        "--fork",
        choices=("thread", "vmclone", "copy", "mixed"),
        default="thread",
        help="fork mode of the instances; mixed launches thread, copy and vmclone in turn",
    )
    p.add_argument(
        "--pipe",
        choices=("shm", "tcp"),
        default="shm",
        help="vmclone: pipe transport between VMs (default shm)",
    )
    p.add_argument(
        "--placement",
        choices=("local", "remote", "spread"),
        default="local",
        help="vmclone: where children run (default local)",
    )
    p.add_argument(
        "--max-instances",
        type=_positive,
        default=10_000,
        help="launch at most this many instances in all (default 10000)",
    )
    p.add_argument(
        "--wait-timeout",
        type=_seconds,
        default=60.0,
        help="give each instance this long to end after its launch; after "
        "--duration, in-flight instances get at most this long (default 60)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("args", nargs="*", help="arguments for the program (after --)")

"""HTTP server benchmark per fork mode vs native, in one run (not a test).

The servers: guest/programs/prefork_http.c (a pre-forking HTTP/1.0 server,
W workers accepting on one listening socket) at 1, 4 and 16 workers, and
mini_httpd (Debian's mini-httpd, a process forked per connection, serving a
file from a baked image), each run natively on a host port and behind
``unifork run --publish`` in thread, copy and VM-clone fork (shm and tcp
transports: the supervisor owns the host port and hands each connection to
a worker VM).  comparison/http_load.py loads each for a fixed time with C
concurrent clients; the table gives requests/s, p50 and p99 latency, and
the ratio of requests/s to native measured in this same run
(configurations interleaved: native, thread, copy, vmclone, vmclone-tcp).
mini_httpd in thread fork runs with one client: two at once stall it (its
request buffer is a global, shared by thread fork: docs/semantics.md).
Run: ``python -m comparison.bench_http [--seconds 5] [-c 8] [--workers 1,4,16] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from comparison.http_load import LoadResult, load
from comparison.report import grid
from tender_service.toolchain.bake import bake
from tender_service.toolchain.images import build_image
from tender_service.toolchain.thirdparty import Unavailable, mini_httpd

log = logging.getLogger(__name__)

#: vmclone: the shm transport; vmclone-tcp: the tcp one (every worker a VM of its own)
MODES = ("native", "thread", "copy", "vmclone", "vmclone-tcp")
UNIFORK = str(Path(sys.executable).parent / "unifork")
PAGE = b"<html><body>mini_httpd in a unikernel</body></html>\n" * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, path: str) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path)
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


@contextmanager
def server(cmd_native: list[str], vm: tuple[str, list[str]], mode: str, path: str) -> Iterator[int]:
    """Start a server natively (``{port}`` in its command) or in ``mode`` behind --publish."""
    port = _free_port()
    if mode == "native":
        cmd = [a.replace("{port}", str(port)) for a in cmd_native]
    else:
        image, args = vm
        fork, _, pipe = mode.partition("-")
        cmd = [UNIFORK, "run", "--fork", fork, "--console", "pipe", "--timeout", "900"]
        cmd += ["--pipe", pipe] if pipe else []
        cmd += ["-p", f"{port}:80", image, "--", *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _answers(port, path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)}: the server did not answer")
            time.sleep(0.1)  # ok-sleep: a benchmark waiting for its server, with a deadline
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mini_httpd_site(top: Path, files: dict[str, bytes] | None = None) -> tuple[Path, Path, Path]:
    """(mini_httpd ELF, document root under ``top``, baked image holding the same root
    and the passwd/group mini_httpd needs to drop root to nobody); the root holds
    index.html (PAGE) and ``files``. Raises Unavailable if mini_httpd cannot be built."""
    exe = mini_httpd()
    www = top / "www"
    www.mkdir()
    for name, data in {"index.html": PAGE, **(files or {})}.items():
        (www / name).write_bytes(data)
    for p in (top, www):
        p.chmod(0o755)
    passwd, group = top / "passwd", top / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    group.write_text("root:x:0:\nnogroup:x:65534:\n")
    image = top / "mini_httpd.img"
    bake(
        image,
        [("/bin/mini_httpd", exe)],
        [("/www", www)],
        [("/etc/passwd", passwd), ("/etc/group", group)],
    )
    return exe, www, image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("-c", "--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--workers", default="1,4,16", help="prefork_http worker counts")
    ap.add_argument("--no-mini-httpd", action="store_true")
    ap.add_argument("--json", type=Path, help="write every figure here")
    opts = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefork = str(build_image("prefork_http"))
    configs: list[tuple[str, list[str], tuple[str, list[str]], str, dict[str, int]]] = []
    for w in (int(x) for x in opts.workers.split(",") if x):
        configs.append(
            (
                f"prefork_http w={w}",
                [prefork, "-p", "{port}", "-w", str(w)],
                (prefork, ["-p", "80", "-w", str(w)]),
                "/hello",
                {},
            )
        )
    top = Path(tempfile.mkdtemp(prefix="unifork-bench-http-"))
    skipped = ""
    if not opts.no_mini_httpd:
        try:
            exe, www, image = mini_httpd_site(top)
            configs.append(
                (
                    "mini_httpd",
                    [str(exe), "-D", "-p", "{port}", "-d", str(www)],
                    (str(image), ["/bin/mini_httpd", "-D", "-p", "80", "-d", "/www"]),
                    "/index.html",
                    {"thread": 1},  # two clients at once stall it (docs/semantics.md)
                )
            )
        except Unavailable as e:
            skipped = f"mini_httpd skipped: {e}"
    results: dict[str, dict[str, LoadResult]] = {}
    for name, native_cmd, vm, path, clients in configs:
        results[name] = {}
        for mode in MODES:
            c = clients.get(mode, opts.concurrency)
            log.info("bench_http: %s, %s, %d clients ...", name, mode, c)
            with server(native_cmd, vm, mode, path) as port:
                results[name][mode] = load(port, path, opts.seconds, c)
    rows = []
    for name, per_mode in results.items():
        nat = per_mode["native"].rps
        for mode, r in per_mode.items():
            rows.append(
                [
                    name,
                    mode,
                    str(r.concurrency),
                    f"{r.rps:.0f}",
                    f"{r.p50_ms:.2f}",
                    f"{r.p99_ms:.2f}",
                    f"{r.rps / nat:.3f}x" if nat else "-",
                    str(r.errors),
                ]
            )
    print(f"HTTP benchmark: {opts.seconds:g} s per run, requests/s and latency per mode")
    head = ["server", "mode", "clients", "req/s", "p50 ms", "p99 ms", "vs native", "errors"]
    print("\n".join(grid(head, rows, {2, 3, 4, 5, 6, 7})))
    if skipped:
        print(skipped)
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "args": vars(opts) | {"json": str(opts.json)},
                    "results": {
                        n: {
                            m: asdict(r)
                            | {"vs_native": r.rps / pm["native"].rps if pm["native"].rps else None}
                            for m, r in pm.items()
                        }
                        for n, pm in results.items()
                    },
                    "skipped": skipped,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

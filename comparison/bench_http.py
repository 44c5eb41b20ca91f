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
(configurations interleaved: native, thread, copy, vmclone-shm, vmclone-tcp),
and the memory of the server's whole process tree after the load (PSS,
and per prefork worker).
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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from comparison.http_load import LoadResult, load
from comparison.modes import process_tree, pss_bytes
from comparison.report import HttpRow, Report, add_http_ratios, http_section, sig
from tender_service.toolchain.bake import bake
from tender_service.toolchain.images import build_image
from tender_service.toolchain.thirdparty import Unavailable, mini_httpd

log = logging.getLogger(__name__)

#: the modes of ``unifork compare``, less vmclone-remote (every worker a VM of its own;
#: vmclone-shm/-tcp: how the instance's channels travel)
MODES = ("native", "thread", "copy", "vmclone-shm", "vmclone-tcp")
UNIFORK = str(Path(sys.executable).parent / "unifork")
MIB = 1 << 20
CLIENTS = 8  # concurrent clients by default
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


PUBLISHED = "unifork: published 127.0.0.1:"


@contextmanager
def server(
    cmd_native: list[str], vm: tuple[str, list[str]], mode: str, path: str
) -> Iterator[tuple[int, int]]:
    """Start a server natively (``{port}`` in its command) or in ``mode`` behind
    ``--publish 0:80`` (the port ``unifork run`` says it bound): (its port, the pid at
    the top of its process tree)."""
    if mode == "native":
        port = _free_port()
        cmd = [a.replace("{port}", str(port)) for a in cmd_native]
    else:
        image, args = vm
        fork, _, pipe = mode.partition("-")
        cmd = [UNIFORK, "run", "--fork", fork, "--console", "pipe", "--timeout", "900"]
        cmd += ["--pipe", pipe] if pipe else []
        cmd += ["-p", "0:80", image, "--", *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if mode == "native" else subprocess.PIPE,
        start_new_session=True,
    )
    try:
        if mode != "native":
            assert proc.stderr is not None
            said = proc.stderr.readline().decode(errors="replace")
            if not said.startswith(PUBLISHED):
                raise RuntimeError(f"{' '.join(cmd)}: {said.strip() or 'no published port'}")
            port = int(said[len(PUBLISHED) :].split()[0])
            # the rest of its stderr is read and dropped: a full pipe would stop it
            threading.Thread(target=proc.stderr.read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not _answers(port, path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)}: the server did not answer")
            time.sleep(0.1)  # ok-sleep: a benchmark waiting for its server, with a deadline
        yield port, proc.pid
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


@dataclass(frozen=True)
class HttpServer:
    """One server configuration: its native command (``{port}`` in it), its image and
    arguments in a VM (guest port 80), the path the clients ask for, its prefork
    workers (0: a process per connection) and clients per mode where not ``clients``."""

    name: str
    native: list[str]
    image: str
    args: list[str]
    path: str
    workers: int
    clients: dict[str, int]


def prefork_servers(workers: list[int]) -> list[HttpServer]:
    prefork = str(build_image("prefork_http"))
    return [
        HttpServer(
            "prefork_http",
            [prefork, "-p", "{port}", "-w", str(w)],
            prefork,
            ["-p", "80", "-w", str(w)],
            "/hello",
            w,
            {},
        )  # fmt: skip
        for w in workers
    ]


def mini_httpd_server(top: Path) -> HttpServer:
    """Raises Unavailable if mini_httpd cannot be built here."""
    exe, www, image = mini_httpd_site(top)
    return HttpServer(
        "mini_httpd",
        [str(exe), "-D", "-p", "{port}", "-d", str(www)],
        str(image),
        ["/bin/mini_httpd", "-D", "-p", "80", "-d", "/www"],
        "/index.html",
        0,
        {"thread": 1},  # two clients at once stall it (docs/semantics.md)
    )


def _fill(row: HttpRow, r: LoadResult) -> None:
    """The load's figures into ``row``, rounded once (comparison/report.py sig)."""
    row.requests, row.errors = r.requests, r.errors
    row.rps, row.p50_ms, row.p99_ms = sig(r.rps), sig(r.p50_ms), sig(r.p99_ms)


def measure(srv: HttpServer, mode: str, seconds: float, clients: int) -> HttpRow:
    """Start ``srv`` in ``mode``, load it, measure its memory, stop it."""
    c = srv.clients.get(mode, clients)
    row = HttpRow(srv.name, mode, srv.workers, c, seconds)
    try:
        with server(srv.native, (srv.image, srv.args), mode, srv.path) as (port, top):
            r: LoadResult = load(port, srv.path, seconds, c)
            # after the load, with every worker up: the whole tree's proportional set
            # size (unifork run, its VM processes or pool workers, or the native server)
            row.pss_bytes = sum(pss_bytes(p) for p in process_tree(top))
    except (RuntimeError, OSError) as e:
        row.status, row.error = "failed", str(e)[:300]
        return row
    _fill(row, r)
    if srv.workers:
        row.pss_mib_per_worker = sig(row.pss_bytes / MIB / srv.workers)
    return row


def tender_rows(workers: list[int], seconds: float, clients: int) -> list[HttpRow]:
    """prefork_http as a VM-clone instance of a tender (Launch with publish): the tender
    owns the port, the workers run on it (placement local) or on a peer tender on this
    machine (remote): the cost of handing connections across hosts."""
    from comparison.bench_service import LocalTender
    from tender_service.service.client import Client

    rows: list[HttpRow] = []
    b = LocalTender(2, 16)
    try:
        a = LocalTender(2, 16, ["--peer", f"127.0.0.1:{b.peer_port}", "--publish-ports", "0"])
        c = Client(a.target)
        try:
            for w in workers:
                for placement in ("local", "remote"):
                    mode = f"vmclone-tcp tender {placement}"
                    log.info("bench_http: prefork_http w=%d, %s ...", w, mode)
                    rows.append(_tender_row(c, w, placement, mode, seconds, clients))
        finally:
            c.close()
            a.stop()
    finally:
        b.stop()
    return rows


def _tender_row(c, w: int, placement: str, mode: str, seconds: float, clients: int) -> HttpRow:
    pb2 = c.pb2
    row = HttpRow("prefork_http", mode, w, clients, seconds)
    iid = c.launch(
        "prefork_http",
        ["-p", "80", "-w", str(w)],
        console_pipe=True,
        fork_mode=pb2.FORK_MODE_VMCLONE,
        pipe_transport=pb2.PIPE_TRANSPORT_TCP,
        placement=pb2.PLACEMENT_REMOTE if placement == "remote" else pb2.PLACEMENT_LOCAL,
        publish=[pb2.PortMapping(host_port=0, guest_port=80)],
    )
    try:
        deadline = time.monotonic() + 120
        while not (published := c.describe(iid).published) or not _answers(
            published[0].host_port, "/hello"
        ):
            if time.monotonic() > deadline or c.wait(iid, 0.1).done:
                row.status, row.error = "failed", f"instance {iid} did not serve"
                return row
        r = load(published[0].host_port, "/hello", seconds, clients)
    finally:
        c.kill(iid)
    _fill(row, r)
    return row


METHOD = (
    "prefork_http (W workers accepting on one socket) and mini_httpd (a process per "
    "connection) behind `unifork run --publish` (natively on a host port); "
    "comparison/http_load.py: C (default 8) asyncio clients, HTTP/1.0, a new connection per "
    "request, "
    "0.5 s unmeasured then the measured seconds; vs native = requests/s over native's in "
    "this run; PSS = the server's whole process tree after the load"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("-c", "--concurrency", type=int, default=CLIENTS, help="concurrent clients")
    ap.add_argument("--workers", default="1,4,16", help="prefork_http worker counts")
    ap.add_argument("--no-mini-httpd", action="store_true")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument(
        "--tender",
        action="store_true",
        help="also prefork_http as a VM-clone instance of a local tender, its workers on "
        "that tender and on a peer tender (the connection hand-off across hosts)",
    )
    opts = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    servers = prefork_servers([int(x) for x in opts.workers.split(",") if x])
    skipped = ""
    if not opts.no_mini_httpd:
        try:
            servers.append(mini_httpd_server(Path(tempfile.mkdtemp(prefix="unifork-bench-http-"))))
        except Unavailable as e:
            skipped = f"mini_httpd skipped: {e}"
    rows: list[HttpRow] = []
    for srv in servers:
        for mode in MODES:  # interleaved: every mode of a server, then the next server
            log.info("bench_http: %s w=%d, %s ...", srv.name, srv.workers, mode)
            rows.append(measure(srv, mode, opts.seconds, opts.concurrency))
    if opts.tender:
        workers = [s.workers for s in servers if s.workers]
        rows += tender_rows(workers, opts.seconds, opts.concurrency)
    add_http_ratios(rows)
    report = Report(
        quick=False, runs=1, started="", machine={}, modes=list(MODES), skipped_modes={},
        cells=[], semantics={}, semantics_runs={}, hazards={}, hazards_runs={}, memory=[],
        memory_children=0, scaling=[], http=rows, http_note=[METHOD],
    )  # fmt: skip
    print("\n".join(http_section(report)))
    for f in report.failures:
        print(f"FAILED {f}")
    if skipped:
        print(skipped)
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "args": vars(opts) | {"json": str(opts.json)},
                    "method": METHOD,
                    "rows": [asdict(r) for r in rows],
                    "skipped": skipped,
                },
                indent=1,
            )
        )
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

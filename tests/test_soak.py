"""Soak: ``unifork load`` mixing thread and VM-clone instances on three tenders.

Three hosts (network namespaces) each run a tender of ``tests/cluster.py``;
the load generator runs in host A and launches round the three tenders,
alternating thread and VM-clone instances of ``token_ring`` (forks, pipes,
waits), VM-clone children placed with ``spread`` (so pipes cross hosts).
The launch window is ``UNIFORK_SOAK_SECONDS`` (default 45); the 10-minute
soak of docs/reliability.md is

    UNIFORK_SOAK_SECONDS=600 .venv/bin/pytest tests/test_soak.py -s

The load runs twice: a warm-up (the first quarter: pools, gRPC threads,
caches and malloc arenas reach their working size), then the soak proper.
Meanwhile the RSS of each tender's process tree (the tender, its warm pool,
its resource tracker), the tender's threads and open fds are sampled every
``SAMPLE_EVERY`` seconds, and once more when each run is over and no VM is
left (idle).  Checked:

* every accepted launch's result arrived exactly once: the generator saw no
  id twice, no answer twice, none missing, and each tender's
  ``unifork_instances_finished_total`` grew by exactly the launches it
  accepted;
* no failure other than RESOURCE_EXHAUSTED (a full tender, documented);
* memory stays flat: the idle RSS after the soak is within ``RSS_SLACK`` of
  the idle RSS after the warm-up; the slope of the RSS during the soak (the
  lowest sample of each window, what stays between instances) is printed;
* nothing left: threads and fds back to their idle level (threads within
  the gRPC pool's slack), nothing in any host's /tmp or /dev/shm but what its
  tender had there before, no Traceback or ERROR in a tender's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cluster import ROOT, UNIFORK, A, Cluster, running_cluster
from support import wait_until

from tender_service.toolchain.images import build_image

DURATION = float(os.environ.get("UNIFORK_SOAK_SECONDS", "45"))
SAMPLE_EVERY = 1.0 if DURATION < 120 else 5.0
WORKLOAD = ["token_ring", "-n", "3", "-r", "4"]
CONCURRENCY = 6
#: idle RSS growth allowed to a tender's tree from the warm-up's end to the soak's end:
#: three processes whose idle RSS wanders by tens of MiB (malloc keeps freed memory)
RSS_SLACK = 256 << 20
THREAD_SLACK = 8  # the gRPC server pool starts threads on demand
ALLOWED_ERRORS = {"RESOURCE_EXHAUSTED"}


@dataclass
class Sample:
    t: float
    rss: int  # bytes, the tender and its descendants
    threads: int  # of the tender process
    fds: int  # of the tender process


@dataclass
class Series:
    pid: int
    samples: list[Sample] = field(default_factory=list)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def sample(pid: int, t0: float) -> Sample | None:
    """RSS of ``pid`` and its descendants; its threads and fds (None if it is gone)."""
    try:
        tree, todo = [], [pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += _children(p)
        rss = 0
        for p in tree:
            with contextlib.suppress(OSError):  # a child that just ended
                rss += _status(p, "VmRSS") << 10
        return Sample(
            time.monotonic() - t0, rss, _status(pid, "Threads"), len(os.listdir(f"/proc/{pid}/fd"))
        )
    except OSError:
        return None


def fd_targets(pid: int) -> list[str]:
    """What each of ``pid``'s open fds refers to (what to look at when their number grew)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(out)


def tree_rss(pid: int) -> dict[int, int]:
    """RSS in KiB of ``pid`` and each descendant (what to look at when the sum grew)."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            out[p] = _status(p, "VmRSS")
            todo += _children(p)
    return out


def slope_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time, bytes per minute."""
    n = len(samples)
    mt = sum(s.t for s in samples) / n
    mr = sum(s.rss for s in samples) / n
    var = sum((s.t - mt) ** 2 for s in samples)
    if var == 0:
        return 0.0
    return sum((s.t - mt) * (s.rss - mr) for s in samples) / var * 60


def finished(c: Cluster, k: int) -> float:
    text = c.agent.call("metrics", url=f"http://{c.addr(k)}:9100/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("unifork_instances_finished_total{")
    )


@pytest.fixture(scope="module")
def cluster():
    build_image(WORKLOAD[0])
    with running_cluster("soak", ("--keep-finished", "256")) as c:
        yield c


def run_load(c: Cluster, seconds: float, name: str, series: list[Series], t0: float) -> dict:
    """``unifork load`` in host A for ``seconds``, sampling the tenders meanwhile."""
    n = c.hosts.n
    out = c.workdir / f"{name}.json"
    argv = [
        str(UNIFORK),
        "load",
        *(a for k in range(n) for a in ("--target", c.target(k))),
        "--token-file",
        str(c.token_file),
        "--fork",
        "mixed",
        "--placement",
        "spread",
        "--concurrency",
        str(CONCURRENCY),
        "--duration",
        str(seconds),
        "--wait-timeout",
        "60",
        "--max-instances",
        "10000000",
        "--image",
        WORKLOAD[0],
        "--json",
        str(out),
        "--",
        *WORKLOAD[1:],
    ]
    log = c.workdir / f"{name}.log"
    with log.open("w") as fh:
        load = c.hosts.popen(A, argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            for s in series:
                got = sample(s.pid, t0)
                if got is not None:
                    s.samples.append(got)
            stop.wait(SAMPLE_EVERY)  # the sampling period, not a wait for a condition

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        load.wait(seconds + 120)
    finally:
        stop.set()
        th.join()
    assert out.exists(), log.read_text()
    r = json.loads(out.read_text())
    r["text"] = log.read_text()
    return r


def check_exactly_once(c: Cluster, r: dict, before: list[float]) -> None:
    assert r["launched"] == r["succeeded"] + r["failed"] > 0, r
    assert set(r["errors"]) <= ALLOWED_ERRORS, (r["errors"], r["failures"], c.logs_tail())
    assert r["duplicate_ids"] == 0 and r["duplicate_answers"] == 0, r
    assert r["unanswered"] == 0 and r["answered"] == r["accepted"], r
    assert r["accepted"] == r["succeeded"], r  # every instance that ran exited 0
    for k in range(c.hosts.n):
        accepted = r["accepted_by_target"].get(c.target(k), 0)
        assert accepted > 0, r["accepted_by_target"]
        wait_until(
            lambda k=k, a=accepted: finished(c, k) - before[k] == a,
            30,
            f"tender {k} to count its {accepted} instances finished",
        )


def idle(c: Cluster, series: list[Series], t0: float, own: list[dict] | None) -> list[Sample]:
    """Once no VM runs anywhere (and, given ``own``, each host has only those files in
    its /tmp and /dev/shm): a sample of each tender."""
    for k in range(c.hosts.n):
        wait_until(lambda k=k: c.vms(k) == 0, 30, f"no VM left on tender {k}")
        if own is not None:
            wait_until(
                lambda k=k: c.leftovers(k) == own[k],
                30,
                f"nothing but the tender's own files in host {k}'s /tmp and /dev/shm",
                detail=lambda k=k: f"{c.leftovers(k)} != {own[k]}\n{c.log_tail(k)}",
            )
    return [sample(s.pid, t0) for s in series]


def window_minima(samples: list[Sample], width: float) -> list[Sample]:
    """The lowest RSS in each ``width``-second window: what stays between instances."""
    out: dict[int, Sample] = {}
    for s in samples:
        w = int(s.t // width)
        if w not in out or s.rss < out[w].rss:
            out[w] = s
    return [out[w] for w in sorted(out)]


@pytest.mark.timeout(DURATION * 1.5 + 300)
def test_soak_mixed_load_on_three_tenders(cluster, record_property):
    c = cluster
    n = c.hosts.n
    series = [Series(c.tenders[k].pid) for k in range(n)]
    t0 = time.monotonic()
    # warm-up: pools, gRPC threads, caches and arenas reach their working size
    before = [finished(c, k) for k in range(n)]
    warm = run_load(c, DURATION / 4, "warmup", series, t0)
    check_exactly_once(c, warm, before)
    base = idle(c, series, t0, None)
    own = [c.leftovers(k) for k in range(n)]  # the tenders' own: pool sockets, semaphores
    own_fds = [fd_targets(s.pid) for s in series]
    mark = len(series[0].samples)
    before = [finished(c, k) for k in range(n)]
    r = run_load(c, DURATION - DURATION / 4, "soak", series, t0)
    check_exactly_once(c, r, before)
    assert r["succeeded_by_fork"].get("thread", 0) > 0, r["succeeded_by_fork"]
    assert r["succeeded_by_fork"].get("vmclone", 0) > 0, r["succeeded_by_fork"]
    end = idle(c, series, t0, own)

    report = []
    for k, s in enumerate(series):
        assert c.tenders[k].poll() is None, c.log_tail(k)
        during = s.samples[mark:]
        assert len(during) >= 3, s.samples
        minima = window_minima(during, max(5.0, DURATION / 20))
        report.append(
            {
                "tender": k,
                "tree_rss_mib_idle": [round(base[k].rss / 2**20, 1), round(end[k].rss / 2**20, 1)],
                "tree_rss_slope_kib_per_min": round(slope_per_min(minima) / 1024, 1),
                "tree_rss_mib_max": round(max(x.rss for x in during) / 2**20, 1),
                "threads_idle": [base[k].threads, end[k].threads],
                "fds_idle": [base[k].fds, end[k].fds],
                "fds_new_at_idle": sorted(set(fd_targets(s.pid)) - set(own_fds[k])),
            }
        )
        assert end[k].rss - base[k].rss <= RSS_SLACK, (report[-1], tree_rss(s.pid))
        assert end[k].threads <= base[k].threads + THREAD_SLACK, report[-1]
        # a connection a peer or the load generator just closed leaves the tender's fd
        # table a moment later: wait for the idle level, then name any fd that stayed
        wait_until(
            lambda pid=s.pid, n_fds=base[k].fds: len(os.listdir(f"/proc/{pid}/fd")) <= n_fds,
            30,
            f"tender {k}'s fds back to their idle level {base[k].fds}",
            detail=lambda k=k, pid=s.pid: (
                f"{report[k]}\nnew: "
                + str(sorted(set(fd_targets(pid)) - set(own_fds[k])))
                + f"\nfds after the warm-up: {own_fds[k]}"
            ),
        )
        log_text = c.logs[k].read_text(errors="replace")
        assert "Traceback" not in log_text and "ERROR" not in log_text, c.log_tail(k, 80)
    summary = {
        k: r[k]
        for k in (
            "launched",
            "accepted",
            "succeeded",
            "failed",
            "errors",
            "throughput_per_s",
            "p50_ms",
            "p99_ms",
            "succeeded_by_fork",
            "accepted_by_target",
        )
    }
    summary["warmup_accepted"] = warm["accepted"]
    record_property("soak", {"duration_s": DURATION, "load": summary, "tenders": report})
    print(f"\nsoak {DURATION:g} s: {json.dumps(summary)}")
    for line in report:
        print(f"  {json.dumps(line)}")

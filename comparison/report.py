"""The report of ``unifork compare``: figures, the text tables, JSON and CSV.

Every figure shown is computed once, here, and rounded once (:func:`sig`);
the text tables print those very floats (shortest positional form, no
further rounding) and the JSON/CSV store them, so the files and the terminal
can never disagree.  Ratios are computed from the unrounded medians.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate

from comparison import published, targets
from comparison.modes import NATIVE, THREAD
from comparison.stats import median, percentile
from comparison.workloads import COLD_PROGRAM, COLD_WORKLOAD, HAZARD_ITEMS, SEMANTICS_ITEMS
from tender_service.rump.vminfo import FORK_PHASES

SCHEMA = "unifork-compare/1"
FIGURE_DIGITS = 4  # significant digits of medians, p95s and memory figures
RATIO_DIGITS = 3


def sig(x: float | None, digits: int = FIGURE_DIGITS) -> float | None:
    """``x`` rounded to ``digits`` significant digits (None stays None, NaN becomes None)."""
    if x is None or not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return float(f"{x:.{digits}g}")


def num(x: float | None) -> str:
    """The shortest positional text of a float that reads back as the same float."""
    if x is None:
        return "-"
    return np.format_float_positional(x, trim="-")


def ratio_text(x: float | None) -> str:
    return "-" if x is None else num(x) + "x"


# -- what was measured ----------------------------------------------------------------------------


@dataclass
class RunRecord:
    run: int
    wall_s: float
    values: list[float]
    excluded: list[float] = field(default_factory=list)  # the run's first figure(s), not in values
    #: launch to exit of the baseline run just before (a workload whose figure subtracts it)
    baseline_wall_s: float | None = None
    #: fork workloads: each of ``values``' forks in the parent's kernel, us
    #: (RunResult.fork_seconds); empty where the run does not say (natively)
    kernel_us: list[float] = field(default_factory=list)


@dataclass
class Cell:
    """One workload in one mode: its runs, and the figures shown."""

    workload: str
    title: str
    program: str
    args: list[str]
    mode: str
    metric: str
    unit: str
    better: str
    runs: list[RunRecord] = field(default_factory=list)
    status: str = "ok"  # ok | failed | skipped (not run here: ``error`` says why)
    error: str = ""
    #: why this mode is known not to run the workload (docs): a failure then is expected,
    #: shown FAILED all the same, and listed apart from the failures
    known_limit: str = ""
    n: int = 0
    median: float | None = None
    p95: float | None = None
    ratio_native: float | None = None
    ratio_thread: float | None = None
    note: str = ""  # what the figure is, and what was excluded from it and where it is shown
    raw_median: float | None = None  # unrounded, for the ratios (not in the JSON)

    def samples(self) -> list[float]:
        return [v for r in self.runs for v in r.values]

    def skip(self, why: str) -> None:
        self.status, self.error = "skipped", why

    @property
    def expected_failure(self) -> bool:
        return self.status == "failed" and bool(self.known_limit)

    def summarize(self) -> None:
        xs = self.samples()
        self.n = len(xs)
        if not xs or self.status != "ok":
            self.median = self.p95 = self.raw_median = None
            return
        self.raw_median = median(xs)
        self.median = sig(self.raw_median)
        self.p95 = sig(percentile(xs, 95))

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("raw_median")
        return d


def add_ratios(cells: list[Cell]) -> None:
    """ratio_native / ratio_thread: this mode's median over native's / thread's (same workload)."""
    ref: dict[tuple[str, str], float] = {
        (c.workload, c.mode): c.raw_median for c in cells if c.raw_median
    }
    for c in cells:
        if c.raw_median is None:
            continue
        nat, thr = ref.get((c.workload, NATIVE)), ref.get((c.workload, THREAD))
        c.ratio_native = sig(c.raw_median / nat, RATIO_DIGITS) if nat else None
        c.ratio_thread = sig(c.raw_median / thr, RATIO_DIGITS) if thr else None


@dataclass
class ColdSeries:
    """Separate one-fork runs of ``fork_time`` (the thesis's listing 4.1), one way of starting.

    ``samples_us``: the parent's ``fork took`` of each run (gettimeofday, 1 us
    resolution); ``median_us`` is the figure; ``thesis_mean_s`` their mean in
    seconds, as the thesis reports it.  Ratios come from unrounded figures.
    """

    how: str  # what each run starts afresh
    status: str = "ok"  # ok | failed
    error: str = ""
    n: int = 0
    samples_us: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)  # launch to exit of each run
    median_us: float | None = None
    min_us: float | None = None
    max_us: float | None = None
    thesis_mean_s: float | None = None
    ratio_native: float | None = None  # median / native's cold median
    thesis_ratio_native: float | None = None  # mean / native's cold mean (thesis: 7.5x)
    over_warm: float | None = None  # median / the same mode's warm median
    #: each run's fork in the parent's kernel (RunResult.fork_seconds), None where the
    #: run does not say (natively, a ``unifork run`` process); the rest of its fork is
    #: the guest's own code (libc's fork path, in a fresh VM translated as it first runs)
    kernel_us: list[float | None] = field(default_factory=list)
    kernel_median_us: float | None = None
    rest_median_us: float | None = None  # median of (fork - kernel) over the runs
    raw: dict[str, float] = field(default_factory=dict)  # unrounded median, mean (not in JSON)

    def add(self, us: float, wall: float, kernel_us: float | None = None) -> None:
        self.samples_us.append(us)
        self.wall_s.append(round(wall, 6))
        self.kernel_us.append(None if kernel_us is None else round(kernel_us, 3))

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error

    def summarize(self, warm: float | None) -> None:
        xs = self.samples_us
        self.n = len(xs)
        if self.status != "ok" or not xs:
            return
        self.raw = {"median": statistics.median(xs), "mean": statistics.fmean(xs)}
        self.median_us, self.min_us, self.max_us = sig(self.raw["median"]), min(xs), max(xs)
        self.thesis_mean_s = sig(self.raw["mean"] / 1e6)
        if warm:
            self.over_warm = sig(self.raw["median"] / warm, RATIO_DIGITS)
        pairs = [(us, k) for us, k in zip(xs, self.kernel_us, strict=True) if k is not None]
        self.kernel_median_us, self.rest_median_us = kernel_split(pairs)

    def against(self, native: ColdSeries) -> None:
        if self.raw and native.raw:
            self.ratio_native = sig(self.raw["median"] / native.raw["median"], RATIO_DIGITS)
            self.thesis_ratio_native = sig(self.raw["mean"] / native.raw["mean"], RATIO_DIGITS)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("raw")
        return d


@dataclass
class ColdRow:
    """One mode's fork, cold and warm, side by side.

    ``cold``: a fresh VM per run (natively a fresh process), as the harness runs
    every mode; ``unifork_run``: a fresh ``unifork run`` process per run, as a
    user runs the listing (None natively: ``cold`` already is that).  ``warm_*``
    come from this mode's ``fork_time`` cell; ``loop_first_us`` are the first
    forks of that cell's runs, excluded from its figure and kept here.
    """

    mode: str
    cold: ColdSeries
    unifork_run: ColdSeries | None = None
    warm_n: int = 0
    warm_median_us: float | None = None
    warm_ratio_native: float | None = None
    loop_first_us: list[float] = field(default_factory=list)
    loop_first_median_us: float | None = None
    #: the warm forks split as the cold ones are (``RunRecord.kernel_us``)
    warm_kernel_median_us: float | None = None
    warm_rest_median_us: float | None = None

    def summarize(self, warm: Cell | None) -> None:
        raw_warm = None
        if warm is not None:
            self.warm_kernel_median_us, self.warm_rest_median_us = kernel_split(
                [
                    p
                    for r in warm.runs
                    if r.kernel_us
                    for p in zip(r.values, r.kernel_us, strict=True)
                ]
            )
            self.loop_first_us = [v for r in warm.runs for v in r.excluded]
            if self.loop_first_us:
                self.loop_first_median_us = sig(median(self.loop_first_us))
            if warm.status == "ok" and warm.raw_median:
                self.warm_n, self.warm_median_us = warm.n, warm.median
                self.warm_ratio_native = warm.ratio_native
                raw_warm = warm.raw_median
        for series in self.series():
            series.summarize(raw_warm)

    def series(self) -> list[ColdSeries]:
        return [self.cold] + ([self.unifork_run] if self.unifork_run is not None else [])

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "cold": self.cold.to_json(),
            "unifork_run": self.unifork_run.to_json() if self.unifork_run else None,
            "warm_n": self.warm_n,
            "warm_median_us": self.warm_median_us,
            "warm_ratio_native": self.warm_ratio_native,
            "loop_first_us": self.loop_first_us,
            "loop_first_median_us": self.loop_first_median_us,
            "warm_kernel_median_us": self.warm_kernel_median_us,
            "warm_rest_median_us": self.warm_rest_median_us,
        }


def kernel_split(pairs: Sequence[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(median in the kernel, median of the rest) of forks given as (fork us, of which
    in the kernel): the median of the differences, not the difference of the medians."""
    if not pairs:
        return None, None
    return sig(median([k for _, k in pairs])), sig(median([us - k for us, k in pairs]))


def add_cold_ratios(rows: list[ColdRow]) -> None:
    """Every cold series against native's cold series of the same run (a fresh process)."""
    nat = next((r.cold for r in rows if r.mode == NATIVE), None)
    if nat is None:
        return
    for r in rows:
        for series in r.series():
            series.against(nat)


@dataclass
class MemoryRow:
    mode: str
    children: int
    guest_kib_per_child: float | None
    host_kib_per_child: float | None
    guest_runs_kib: list[float]
    host_runs_kib: list[float]
    note: str = ""
    status: str = "ok"
    error: str = ""


@dataclass
class ScalePoint:
    n: int
    ready_ms: float | None  # median time until all n children run (and block)
    fork_all_ms: float | None  # median time until the n-th fork() returned in the parent
    ready_runs_ms: list[float]
    fork_all_runs_ms: list[float]


@dataclass
class ScaleRow:
    mode: str
    points: list[ScalePoint] = field(default_factory=list)
    status: str = "ok"
    error: str = ""


@dataclass
class HttpRow:
    """One HTTP server in one mode under load (comparison/bench_http.py): the host's
    clients through the published port (natively: the server's own port)."""

    server: str
    mode: str
    workers: int  # prefork workers (0: a process forked per connection)
    clients: int
    seconds: float
    requests: int = 0
    errors: int = 0
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: proportional set size of the server's whole process tree after the load
    pss_bytes: int | None = None
    pss_mib_per_worker: float | None = None
    ratio_native: float | None = None
    status: str = "ok"
    error: str = ""


def add_http_ratios(rows: list[HttpRow]) -> None:
    """requests/s over native's for the same server and workers, in this same run."""
    native = {(r.server, r.workers): r.rps for r in rows if r.mode == NATIVE and r.rps}
    for r in rows:
        base = native.get((r.server, r.workers))
        if r.rps is not None and base:
            r.ratio_native = sig(r.rps / base, RATIO_DIGITS)


@dataclass
class Report:
    quick: bool
    runs: int
    started: str
    machine: dict[str, object]
    modes: list[str]
    skipped_modes: dict[str, str]
    cells: list[Cell]
    semantics: dict[str, dict[str, str]]  # mode -> item -> shared | private | mixed (k/n shared)
    semantics_runs: dict[str, int]
    hazards: dict[str, dict[str, str]]
    hazards_runs: dict[str, int]
    memory: list[MemoryRow]
    memory_children: int
    scaling: list[ScaleRow]
    cold: list[ColdRow] = field(default_factory=list)
    cold_runs: int = 0
    cold_note: list[str] = field(default_factory=list)  # the method and what was discarded
    #: VM-clone modes: median ms of each fork step (FORK_PHASES) over the warm forks of
    #: the fork_time cell, and how many forks
    fork_breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    duration_s: float = 0.0
    directory: str = ""
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    setup_failures: list[str] = field(default_factory=list)
    http: list[HttpRow] = field(default_factory=list)
    http_note: list[str] = field(default_factory=list)  # the method
    #: issue 17's targets against this run (comparison/targets.py)
    targets: list[targets.Check] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        out = list(self.setup_failures)
        out += [
            f"{c.workload} / {c.mode}: {c.error}"
            for c in self.cells
            if c.status == "failed" and not c.expected_failure
        ]
        out += [f"memory / {m.mode}: {m.error}" for m in self.memory if m.status != "ok"]
        out += [f"scaling / {s.mode}: {s.error}" for s in self.scaling if s.status != "ok"]
        out += [
            f"http {h.server} w={h.workers} / {h.mode}: {h.error}"
            for h in self.http
            if h.status != "ok"
        ]
        out += [
            f"cold first fork ({s.how}) / {c.mode}: {s.error}"
            for c in self.cold
            for s in c.series()
            if s.status != "ok"
        ]
        return out

    @property
    def expected_failures(self) -> list[str]:
        """Failures of a mode known not to run the workload: the error, then the known limit."""
        return [
            f"{c.workload} / {c.mode}: {c.error} (known limit: {c.known_limit})"
            for c in self.cells
            if c.expected_failure
        ]

    @property
    def skipped_workloads(self) -> dict[str, str]:
        """Workloads not run in some mode, and why."""
        return {c.workload: c.error for c in self.cells if c.status == "skipped"}

    def cell(self, workload: str, mode: str) -> Cell | None:
        return next((c for c in self.cells if c.workload == workload and c.mode == mode), None)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "label": "measured",
            "quick": self.quick,
            "runs": self.runs,
            "started": self.started,
            "duration_s": round(self.duration_s, 3),
            "directory": self.directory,
            "machine": self.machine,
            "modes": self.modes,
            "skipped_modes": self.skipped_modes,
            "results": [c.to_json() for c in self.cells],
            "cold_fork": {
                "program": COLD_PROGRAM,
                "args": [],
                "warm_workload": COLD_WORKLOAD,
                "unit": "us",
                "runs": self.cold_runs,
                "method": self.cold_note,
                "rows": [c.to_json() for c in self.cold],
            },
            "fork_breakdown": {
                "unit": "ms",
                "steps": list(FORK_PHASES),
                "what": BREAKDOWN_WHAT,
                "modes": self.fork_breakdown,
            },
            "semantics": {
                "items": list(SEMANTICS_ITEMS),
                "modes": self.semantics,
                "runs": self.semantics_runs,
            },
            "fork_hazards": {
                "items": list(HAZARD_ITEMS),
                "modes": self.hazards,
                "runs": self.hazards_runs,
            },
            "memory": {"children": self.memory_children, "rows": [asdict(m) for m in self.memory]},
            "scaling": {"metric": "ready_ms", "rows": [asdict(s) for s in self.scaling]},
            "http": {"method": self.http_note, "rows": [asdict(h) for h in self.http]},
            "targets": {
                "issue": 17,
                "method": targets.METHOD,
                "checks": [_check_json(c) for c in self.targets],
            },
            "published": published.to_json(),
            "failures": self.failures,
            "expected_failures": self.expected_failures,
            "skipped_workloads": self.skipped_workloads,
            "notes": self.notes,
            "files": self.files,
        }


# -- text ---------------------------------------------------------------------------------------


def grid(head: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """A plain text table (tabulate's "simple"): the head, a rule of dashes, the rows.

    Columns are two spaces apart, the ``right`` ones right-aligned; cells are shown as given
    (no number parsing), so a figure reads back exactly as the JSON holds it.
    """
    align = ["right" if i in right else "left" for i in range(len(head))]
    text = tabulate(rows, headers=head, tablefmt="simple", colalign=align, disable_numparse=True)
    return [ln.rstrip() for ln in text.splitlines()]


COLD_TITLE = "fork: cold first fork vs warm loop"
MAIN_HEAD = (
    "workload",
    "mode",
    "unit",
    "n",
    "median",
    "p95",
    "vs native",
    "vs thread",
    "1st of run",
)


def main_table(cells: Sequence[Cell]) -> list[str]:
    """The main table; '1st of run' is the median of the figures each run kept apart
    (a loop's first, cold, iteration: ``Workload.exclude_first``), '-' if none."""
    rows = []
    for c in cells:
        if c.status != "ok":
            what = "SKIPPED" if c.status == "skipped" else "FAILED"
            rows.append((c.workload, c.mode, c.unit, str(c.n), what, "-", "-", "-", "-"))
            continue
        first = [v for r in c.runs for v in r.excluded]
        rows.append(
            (
                c.workload,
                c.mode,
                c.unit,
                str(c.n),
                num(c.median),
                num(c.p95),
                ratio_text(c.ratio_native),
                ratio_text(c.ratio_thread),
                num(statistics.median(first)) if first else "-",
            )
        )
    return grid(MAIN_HEAD, rows, {3, 4, 5, 6, 7, 8})


COLD_HEAD = (
    "mode",
    "fork",
    "n",
    "median",
    "in kernel",
    "rest",
    "vs native",
    "vs warm",
    "thesis mean s",
    "thesis vs native",
)


def cold_table(r: Report) -> list[str]:
    """Per mode: the cold first fork (listing 4.1, separate runs) above the warm loop."""
    out = [f"{COLD_TITLE} (parent side, us; cold: {r.cold_runs} separate one-fork runs per mode)"]
    rows = []
    for c in r.cold:
        for label, series in (
            ("cold, fresh " + ("process" if c.mode == NATIVE else "VM"), c.cold),
            ("cold, unifork run", c.unifork_run),
        ):
            if series is None:
                continue
            if series.status != "ok":
                rows.append((c.mode, label, str(series.n), "FAILED", *["-"] * 6))
                continue
            rows.append(
                (
                    c.mode,
                    label,
                    str(series.n),
                    num(series.median_us),
                    num(series.kernel_median_us),
                    num(series.rest_median_us),
                    ratio_text(series.ratio_native),
                    ratio_text(series.over_warm),
                    num(series.thesis_mean_s),
                    ratio_text(series.thesis_ratio_native),
                )
            )
        rows.append(
            (
                c.mode,
                "warm loop",
                str(c.warm_n),
                num(c.warm_median_us),
                num(c.warm_kernel_median_us),
                num(c.warm_rest_median_us),
                ratio_text(c.warm_ratio_native),
                "1x" if c.warm_median_us else "-",
                "-",
                "-",
            )
        )
        if c.loop_first_us:
            rows.append(
                (
                    c.mode,
                    "1st of each loop run",
                    str(len(c.loop_first_us)),
                    num(c.loop_first_median_us),
                    *["-"] * 6,
                )
            )
    out += grid(COLD_HEAD, rows, set(range(2, len(COLD_HEAD))))
    out += [f"  {n}" for n in r.cold_note]
    return out


def _matrix(
    title: str, items: Sequence[str], by_mode: dict[str, dict[str, str]], runs: dict[str, int]
) -> list[str]:
    modes = [m for m in by_mode]
    if not modes:
        return [title, "  (not run)"]
    head = ("item", *(f"{m} ({runs.get(m, 0)})" for m in modes))
    rows = [(item, *(by_mode[m].get(item, "-") for m in modes)) for item in items]
    return [title, *grid(head, rows, set())]


def render(r: Report) -> str:
    out: list[str] = []
    m = r.machine
    out.append(
        f"unifork compare ({'quick' if r.quick else 'full'}, {r.runs} runs per cell), "
        f"{r.duration_s:.1f} s; {m.get('cpu_model')}, {m.get('cores_available')}/"
        f"{m.get('cores')} cores, Python {m.get('python')}, unicorn {m.get('unicorn')}, "
        f"commit {m.get('git_commit')}"
    )
    out.append(
        "measured: median and p95 over all samples of the kept runs (warm-up runs "
        "discarded); 'vs native' / 'vs thread' = this median / that mode's median "
        "(for MiB/s above 1 means faster, otherwise slower)"
    )
    out.append("")
    out += main_table(r.cells)
    out.append("")
    out += _workload_legend(r)
    out.append("")
    if r.cold:
        out += cold_table(r)
        out.append("")
    if r.fork_breakdown:
        out += breakdown_table(r)
        out.append("")
    if r.targets:
        out += targets_table(r)
        out.append("")
    out += _matrix(
        "semantics matrix (measured: the 'semantics' probe in each mode; runs in brackets)",
        SEMANTICS_ITEMS,
        r.semantics,
        r.semantics_runs,
    )
    out.append("")
    out += _matrix(
        "fork hazards (measured: the 'fork_hazards' probe in each mode)",
        HAZARD_ITEMS,
        r.hazards,
        r.hazards_runs,
    )
    out.append("")
    out += _memory_section(r)
    out.append("")
    if r.scaling:
        out += _scaling_section(r)
        out.append("")
    if r.http:
        out += http_section(r)
        out.append("")
    out.append(f"{published.LABEL} (reference rows, NOT measured here: {published.SOURCE})")
    rows = [
        (published.LABEL, f.what, f"{num(f.value)} {f.unit}", f.note) for f in published.FIGURES
    ]
    out += grid(("label", "what", "value", "note"), rows, {2})
    if r.notes:
        out.append("")
        out += [f"note: {n}" for n in r.notes]
    fails = r.failures
    if fails:
        out.append("")
        out += [f"FAILED {f}" for f in fails]
    if r.expected_failures:
        out.append("")
        out += [f"FAILED as expected: {f}" for f in r.expected_failures]
    return "\n".join(out)


BREAKDOWN_WHAT = (
    "parent side, the warm forks of fork_time (its first fork of each run excluded): "
    "lease = the pid and a place from the supervisor; share = pipes and files handed "
    "to it; capture = the snapshot; start = StartVm (transfer, the snapshot checked, the "
    "reply); restore = the child's restore, on its tender process after the reply (not "
    "part of the parent's fork)"
)


TARGETS_TITLE = "issue 17 targets, this run"
TARGETS_HEAD = ("item", "check", "target", "figure", "95% interval", "runs", "verdict")


def _rounded(c: targets.Check) -> tuple[float | None, float | None, float | None]:
    """figure, low, high as the table prints them and the JSON stores them."""
    return sig(c.figure, RATIO_DIGITS), sig(c.low, RATIO_DIGITS), sig(c.high, RATIO_DIGITS)


def _check_json(c: targets.Check) -> dict[str, object]:
    d = asdict(c)
    d["figure"], d["low"], d["high"] = _rounded(c)
    d["runs"] = list(c.runs)
    return d


def targets_table(r: Report) -> list[str]:
    """Each target of issue 17: this run's figure, its interval and the verdict."""
    rows = []
    for c in r.targets:
        figure, low, high = _rounded(c)
        interval = "-" if low is None else f"{num(low)} .. {num(high)}"
        runs = "/".join(str(n) for n in c.runs if n) or "-"
        rows.append((str(c.item), c.what, c.target, num(figure), interval, runs, c.verdict))
    out = [f"{TARGETS_TITLE} ({targets.LEVEL}% bootstrap interval over runs)"]
    out += grid(TARGETS_HEAD, rows, {3, 4, 5})
    out.append(f"  {targets.METHOD}")
    return out


def breakdown_table(r: Report) -> list[str]:
    """Where a VM-clone fork's time goes, step by step (median ms)."""
    rows = [
        (mode, str(int(steps["forks"])), *(num(steps[name]) for name in FORK_PHASES))
        for mode, steps in r.fork_breakdown.items()
    ]
    out = ["VM-clone fork, step by step (median ms)"]
    out += grid(("mode", "forks", *FORK_PHASES), rows, set(range(1, 2 + len(FORK_PHASES))))
    out.append(f"  {BREAKDOWN_WHAT}")
    return out


def _workload_legend(r: Report) -> list[str]:
    """What each workload of the table runs, and the modes that were skipped."""
    out: list[str] = []
    seen = []
    for c in r.cells:
        if c.workload not in seen:
            seen.append(c.workload)
            out.append(f"  {c.workload}: {c.title}; {c.program} {' '.join(c.args)}".rstrip())
            if c.note:
                out.append(f"    {c.note}")
        if c.status == "skipped":
            same = [d for d in r.cells if d.workload == c.workload]
            if all(d.status == "skipped" and d.error == c.error for d in same):
                if c is same[0]:
                    out.append(f"    SKIPPED in every mode ({c.error})")
            else:
                out.append(f"    {c.mode}: SKIPPED ({c.error})")
        elif c.expected_failure:
            out.append(f"    {c.mode}: FAILED, a known limit ({c.known_limit}): {c.error}")
    for mode, why in r.skipped_modes.items():
        out.append(f"  {mode}: skipped ({why})")
    return out


def _memory_section(r: Report) -> list[str]:
    out = [
        f"memory per child ({r.memory_children} children blocked on a pipe vs none; "
        "guest = RAM the child's VM state needs, host = PSS growth)"
    ]
    if not r.memory:
        out.append("  (not run)")
    rows: list[tuple[str, ...]] = []
    for mr in r.memory:
        if mr.status != "ok":
            rows.append((mr.mode, "FAILED", "FAILED", mr.error[:60]))
        else:
            rows.append((mr.mode, num(mr.guest_kib_per_child), num(mr.host_kib_per_child), mr.note))
    if rows:
        out += grid(("mode", "guest KiB/child", "host KiB/child", "how"), rows, {1, 2})
    return out


def _scaling_section(r: Report) -> list[str]:
    ns = sorted({p.n for s in r.scaling for p in s.points})
    out = ["fork-count scaling: ms until N children are all running (blocked on a pipe), median"]
    rows = []
    for s in r.scaling:
        by_n = {p.n: p for p in s.points}
        rows.append((s.mode, *(num(by_n[n].ready_ms) if n in by_n else "-" for n in ns)))
    out += grid(("mode", *(f"N={n}" for n in ns)), rows, set(range(1, len(ns) + 1)))
    return out


HTTP_HEAD: tuple[str, ...] = ("server", "mode", "workers", "clients", "req/s", "p50 ms")
HTTP_HEAD += ("p99 ms", "vs native", "errors", "PSS MiB", "MiB/worker")


def http_section(r: Report) -> list[str]:
    """The HTTP servers under load, per mode (requests/s against native's)."""
    out = ["HTTP servers under load (measured: " + "; ".join(r.http_note) + ")"]
    rows: list[tuple[str, ...]] = []
    for h in r.http:
        if h.status != "ok":
            rows.append((h.server, h.mode, str(h.workers), str(h.clients), "FAILED", h.error[:50]))
            continue
        pss = None if h.pss_bytes is None else sig(h.pss_bytes / (1 << 20))
        rows.append(
            (
                h.server,
                h.mode,
                str(h.workers or "-"),
                str(h.clients),
                num(h.rps),
                num(h.p50_ms),
                num(h.p99_ms),
                ratio_text(h.ratio_native),
                str(h.errors),
                num(pss),
                num(h.pss_mib_per_worker),
            )
        )
    return out + grid(HTTP_HEAD, rows, set(range(2, len(HTTP_HEAD))))


# -- files --------------------------------------------------------------------------------------

MACHINE_COLUMNS = ("cpu_model", "cores", "python", "unicorn", "git_commit")


def write_json(r: Report, path: Path) -> None:
    path.write_text(json.dumps(r.to_json(), indent=1) + "\n")


def write_csv(r: Report, raw: Path, summary: Path) -> None:
    """``raw``: every figure of every run (with the machine); ``summary``: the table's rows."""
    machine = [r.machine.get(k, "") for k in MACHINE_COLUMNS]
    with raw.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            (
                "section",
                "workload",
                "mode",
                "args",
                "run",
                "index",
                "metric",
                "unit",
                "value",
                *MACHINE_COLUMNS,
            )
        )
        sections = (_workload_rows(r), _cold_rows(r), _memory_rows(r), _scaling_rows(r))
        for rows in (*sections, _http_rows(r)):
            for row in rows:
                w.writerow((*row, *machine))
    with summary.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ("label", *MAIN_HEAD[:4], "median", "p95", "ratio_native", "ratio_thread", "status")
        )
        for c in r.cells:
            w.writerow(
                (
                    "measured",
                    c.workload,
                    c.mode,
                    c.unit,
                    c.n,
                    num(c.median),
                    num(c.p95),
                    num(c.ratio_native),
                    num(c.ratio_thread),
                    c.status,
                )
            )


def _workload_rows(r: Report) -> Iterator[tuple]:
    for c in r.cells:
        for run in c.runs:
            yield (
                "workload",
                c.workload,
                c.mode,
                " ".join(c.args),
                run.run,
                "",
                "wall_s",
                "s",
                run.wall_s,
            )
            if run.baseline_wall_s is not None:
                yield (
                    "workload",
                    c.workload,
                    c.mode,
                    " ".join(c.args),
                    run.run,
                    "",
                    "baseline_wall_s",
                    "s",
                    run.baseline_wall_s,
                )
            for metric, values in ((c.metric, run.values), (f"excluded_{c.metric}", run.excluded)):
                for i, v in enumerate(values):
                    yield (
                        "workload",
                        c.workload,
                        c.mode,
                        " ".join(c.args),
                        run.run,
                        i,
                        metric,
                        c.unit,
                        v,
                    )


def _cold_rows(r: Report) -> Iterator[tuple]:
    for cr in r.cold:
        for key, series in (("cold", cr.cold), ("unifork_run", cr.unifork_run)):
            for i, (v, wall) in enumerate(
                zip(
                    series.samples_us if series else [],
                    series.wall_s if series else [],
                    strict=True,
                )
            ):
                yield ("cold_fork", COLD_PROGRAM, cr.mode, "", i + 1, "", f"{key}_fork_us", "us", v)
                yield (
                    "cold_fork",
                    COLD_PROGRAM,
                    cr.mode,
                    "",
                    i + 1,
                    "",
                    f"{key}_wall_s",
                    "s",
                    wall,
                )


def _memory_rows(r: Report) -> Iterator[tuple]:
    for mr in r.memory:
        for i, v in enumerate(mr.guest_runs_kib):
            yield (
                "memory",
                "fork_scale",
                mr.mode,
                f"-n {mr.children}",
                i,
                "",
                "guest_kib_per_child",
                "KiB",
                v,
            )
        for i, v in enumerate(mr.host_runs_kib):
            yield (
                "memory",
                "fork_scale",
                mr.mode,
                f"-n {mr.children}",
                i,
                "",
                "host_kib_per_child",
                "KiB",
                v,
            )


def _scaling_rows(r: Report) -> Iterator[tuple]:
    for s in r.scaling:
        for p in s.points:
            for i, v in enumerate(p.ready_runs_ms):
                yield ("scaling", "fork_scale", s.mode, f"-n {p.n}", i, "", "ready_ms", "ms", v)
            for i, v in enumerate(p.fork_all_runs_ms):
                yield ("scaling", "fork_scale", s.mode, f"-n {p.n}", i, "", "fork_all_ms", "ms", v)


def _http_rows(r: Report) -> Iterator[tuple]:
    for h in r.http:
        if h.status != "ok":
            continue
        args = f"-w {h.workers} -c {h.clients}"
        for metric, unit, value in (
            ("requests_per_s", "req/s", h.rps),
            ("p50_ms", "ms", h.p50_ms),
            ("p99_ms", "ms", h.p99_ms),
            ("pss_bytes", "bytes", h.pss_bytes),
        ):
            yield ("http", h.server, h.mode, args, 0, "", metric, unit, value)


def write_published_csv(path: Path) -> None:
    """The thesis's figures, in a file of their own (never among the measured rows)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("label", "key", "what", "value", "unit", "note", "source"))
        for f in published.FIGURES:
            w.writerow(
                (published.LABEL, f.key, f.what, num(f.value), f.unit, f.note, published.SOURCE)
            )

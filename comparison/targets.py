"""Issue 17's targets checked against one ``unifork compare`` run, with how sure it is.

A ratio of two medians, each from a few runs on a shared host, lands on either
side of a target from one run to the next: the same tree measured thread fork
at 1.0x to 1.27x native in four compares of one evening.  So each check gives
its figure (from the unrounded medians, as the main table's ratios) and a 95%
bootstrap interval, and says:

* ``met``: the whole interval is on the target's side;
* ``missed``: the whole interval is on the other side;
* ``unsettled``: the interval holds the target (more ``--runs`` would tell), or
  a side has fewer than ``MIN_RUNS`` runs;
* ``not measured``: this run has no figure for it (a mode or workload left out,
  or failed).

The bootstrap resamples whole runs, not single forks: the forks of one run share
its VM, its process and its minute of host noise, so they are not independent
draws (a cold series has one fork a run, so there each fork is its own run).
The two sides of a ratio are resampled apart, with one fixed seed: the same
report gives the same intervals.  Items 2 (this report) and 4 (the syscall
round trip and the vDSO, ``comparison/bench.py``) are not figures of this run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from comparison.modes import NATIVE, THREAD, VMCLONE_MODES, VMCLONE_SHM, VMCLONE_TCP
from comparison.stats import median
from comparison.workloads import COLD_WORKLOAD

#: resamples per interval, and the seed that makes them the same for the same samples
RESAMPLES = 2000
SEED = 17
#: fewer runs than this on a side: no interval is worth printing (3 runs give 10 samples)
MIN_RUNS = 3
LEVEL = 95  # percent
MET, MISSED, UNSETTLED, NOT_MEASURED = "met", "missed", "unsettled", "not measured"
#: issue 17's thresholds
COLD_OVER_WARM = 2.0  # 1: the first fork in a fresh VM <= 2x a warm one
THREAD_OVER_NATIVE = 1.0  # 3: thread fork <= native, warm and cold
VMCLONE_FORK_US = 5000.0  # 5: VM-clone fork <= 5 ms, cold and warm
PIPE_FLOOR = {VMCLONE_SHM: 0.25, VMCLONE_TCP: 0.15}  # 6: x native pipe throughput

#: samples grouped by run (a run's values share its noise)
Runs = Sequence[Sequence[float]]
METHOD = (
    f"figure = median over median (unrounded), or a median (item 5); interval = {LEVEL}% "
    f"bootstrap over whole runs ({RESAMPLES} resamples, seed {SEED}; each side apart); met / "
    "missed = the whole interval on / off the target's side, unsettled = it holds the target "
    f"or a side has fewer than {MIN_RUNS} runs; items 2 (this report) and 4 (syscall, vDSO: "
    "comparison/bench.py) are not figures of this run"
)


@dataclass
class Check:
    """One target of issue 17 against this run."""

    item: int
    what: str
    target: str  # "<= 2x warm", ">= 0.25x native", "<= 5000 us"
    op: str  # "<=" or ">="
    threshold: float
    figure: float | None = None
    low: float | None = None
    high: float | None = None
    runs: tuple[int, int] = (0, 0)  # runs behind the figure's two sides (one: a median)
    verdict: str = NOT_MEASURED


def verdict(op: str, threshold: float, low: float, high: float) -> str:
    """met / missed / unsettled for an interval against ``op threshold``."""
    if op == "<=":
        return MET if high <= threshold else MISSED if low > threshold else UNSETTLED
    return MET if low >= threshold else MISSED if high < threshold else UNSETTLED


def _boot_medians(runs: Runs, rng: np.random.Generator) -> np.ndarray:
    """The median of each resample: ``len(runs)`` runs drawn with replacement."""
    groups = [np.asarray(r, dtype=float) for r in runs]
    picks = rng.integers(0, len(groups), size=(RESAMPLES, len(groups)))
    return np.array([np.median(np.concatenate([groups[i] for i in row])) for row in picks])


def _median(runs: Runs) -> float:
    """The harness's median (comparison/stats.py) of every value: the tables' figure."""
    m = median([v for r in runs for v in r])
    assert m is not None  # runs with values only
    return m


def check(c: Check, top: Runs | None, bottom: Runs | None = None, ratio: bool = True) -> Check:
    """Fill ``c`` from the samples: ``median(top) / median(bottom)``, or (``ratio``
    False) ``median(top)``.  Runs with no values do not count; no runs on a side
    leave ``c`` not measured."""
    top = [r for r in top or () if len(r)]
    bottom = [r for r in bottom or () if len(r)]
    if not top or (ratio and not bottom):
        return c
    rng = np.random.default_rng(SEED)
    c.figure, boot, fewest = _median(top), _boot_medians(top, rng), len(top)
    c.runs = (len(top), len(bottom) if ratio else 0)
    if ratio:
        c.figure /= _median(bottom)
        boot = boot / _boot_medians(bottom, rng)
        fewest = min(fewest, len(bottom))
    lo, hi = np.percentile(boot, [(100 - LEVEL) / 2, 100 - (100 - LEVEL) / 2])
    c.low, c.high = float(lo), float(hi)
    c.verdict = verdict(c.op, c.threshold, c.low, c.high) if fewest >= MIN_RUNS else UNSETTLED
    return c


def issue17(
    cells: Mapping[tuple[str, str], Runs],
    cold: Mapping[tuple[str, str], Runs],
    modes: Sequence[str],
) -> list[Check]:
    """The checks for ``modes``, by item.  ``cells``: (workload, mode) -> runs of its kept
    values (fork_time and pipe_bw); ``cold``: (mode, "cold" | "unifork_run") -> a cold
    series, one run per fork.  A mode not run has no check; one that failed, checks
    that say not measured."""
    warm = {m: cells.get((COLD_WORKLOAD, m)) for m in modes}
    forkers = [m for m in modes if m != NATIVE]
    out = [  # 1
        check(
            Check(1, f"{m}: cold ({how}) / warm", "<= 2x warm", "<=", COLD_OVER_WARM),
            cold.get((m, kind)),
            warm[m],
        )
        for m in forkers
        for kind, how in (("cold", "fresh VM"), ("unifork_run", "unifork run"))
    ]
    if THREAD in modes:  # 3
        out += [
            check(Check(3, what, "<= 1x native", "<=", THREAD_OVER_NATIVE), top, bottom)
            for what, top, bottom in (
                ("thread / native, warm loop", warm[THREAD], warm.get(NATIVE)),
                (
                    "thread / native, cold (fresh VM / process)",
                    cold.get((THREAD, "cold")),
                    cold.get((NATIVE, "cold")),
                ),
            )
        ]
    out += [  # 5
        check(
            Check(5, f"{m}: fork, {what} (us)", "<= 5000 us", "<=", VMCLONE_FORK_US),
            runs,
            ratio=False,
        )
        for m in forkers
        if m in VMCLONE_MODES
        for what, runs in (
            ("warm loop", warm[m]),
            ("cold, fresh VM", cold.get((m, "cold"))),
            ("cold, unifork run", cold.get((m, "unifork_run"))),
        )
    ]
    out += [  # 6
        check(
            Check(6, f"{m}: pipe_bw / native", f">= {floor}x native", ">=", floor),
            cells.get(("pipe_bw", m)),
            cells.get(("pipe_bw", NATIVE)),
        )
        for m, floor in PIPE_FLOOR.items()
        if m in modes
    ]
    return out

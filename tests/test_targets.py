"""comparison/targets.py: issue 17's checks, their bootstrap intervals and verdicts.

Pure functions over samples, so the samples here are made up: what is checked
is the arithmetic (figure = median over median, the interval from whole runs,
the verdict from the interval), not a measurement.  ``test_compare.py`` checks
the same section of a real ``unifork compare`` report against its own cells.
"""

from __future__ import annotations

import statistics

import pytest

from comparison import targets
from comparison.targets import MET, MISSED, NOT_MEASURED, UNSETTLED, Check, check, issue17


def flat(runs: list[list[float]]) -> list[float]:
    return [x for r in runs for x in r]


def ratio_check(op: str = "<=", threshold: float = 1.0) -> Check:
    return Check(3, "a / b", f"{op} {threshold}x", op, threshold)


@pytest.mark.parametrize(
    ("op", "low", "high", "expected"),
    [
        ("<=", 0.8, 0.95, MET),
        ("<=", 0.8, 1.0, MET),  # at the target is at or below it
        ("<=", 0.9, 1.1, UNSETTLED),
        ("<=", 1.01, 1.3, MISSED),
        (">=", 0.2, 0.3, UNSETTLED),
        (">=", 0.25, 0.3, MET),
        (">=", 0.1, 0.24, MISSED),
    ],
)
def test_the_verdict_is_where_the_whole_interval_lies(op, low, high, expected) -> None:
    threshold = 1.0 if op == "<=" else 0.25
    assert targets.verdict(op, threshold, low, high) == expected


def test_a_ratio_is_median_over_median_and_clear_gaps_are_decided() -> None:
    fast = [[10.0 + i + 0.1 * j for j in range(19)] for i in range(5)]
    slow = [[20.0 + i + 0.1 * j for j in range(19)] for i in range(5)]
    c = check(ratio_check(), fast, slow)
    assert c.figure == statistics.median(flat(fast)) / statistics.median(flat(slow))
    assert c.runs == (5, 5)
    assert c.low is not None and c.high is not None and c.low <= c.figure <= c.high < 1.0
    assert c.verdict == MET
    assert check(ratio_check(), slow, fast).verdict == MISSED


def test_runs_not_forks_are_resampled() -> None:
    """Two runs far apart, many forks each: resampling single forks would give a narrow
    interval around the middle; resampling runs shows the figure can be either run's."""
    low_run, high_run = [1.0] * 50, [3.0] * 50
    base = [[1.0]] * 5
    c = check(ratio_check(threshold=2.0), [low_run, high_run, low_run, high_run], base)
    assert c.low == pytest.approx(1.0) and c.high == pytest.approx(3.0)
    assert c.verdict == UNSETTLED


def test_an_interval_straddling_the_target_is_unsettled() -> None:
    a = [[0.9 + 0.05 * i] for i in range(5)]
    b = [[1.0]] * 5
    c = check(ratio_check(), a, b)
    assert c.low is not None and c.high is not None and c.low < 1.0 < c.high
    assert c.verdict == UNSETTLED


def test_too_few_runs_are_unsettled_even_far_from_the_target() -> None:
    c = check(ratio_check(), [[1.0], [1.1]], [[100.0], [101.0]])
    assert c.figure is not None and c.figure < 0.02
    assert c.verdict == UNSETTLED


def test_the_same_samples_give_the_same_interval() -> None:
    a = [[float(x) for x in range(i, i + 7)] for i in range(6)]
    b = [[float(x) * 1.1 for x in range(i, i + 7)] for i in range(6)]
    one, two = check(ratio_check(), a, b), check(ratio_check(), a, b)
    assert (one.low, one.high) == (two.low, two.high)


def test_a_median_check_and_empty_runs() -> None:
    runs = [[4000.0, 4100.0], [], [3900.0], [4200.0]]
    c = check(Check(5, "fork (us)", "<= 5000 us", "<=", 5000.0), runs, ratio=False)
    assert c.figure == statistics.median([4000.0, 4100.0, 3900.0, 4200.0])
    assert c.runs == (3, 0)  # the empty run does not count
    assert c.verdict == MET
    nothing = check(Check(5, "fork (us)", "<= 5000 us", "<=", 5000.0), [[]], ratio=False)
    assert (nothing.figure, nothing.verdict) == (None, NOT_MEASURED)


def test_issue17_names_each_target_and_leaves_what_was_not_run_unmeasured() -> None:
    warm = [[40.0 + i] * 19 for i in range(3)]
    cells = {
        ("fork_time", "native"): warm,
        ("fork_time", "thread"): warm,
        ("fork_time", "vmclone-shm"): [[2000.0 + i] * 19 for i in range(3)],
        ("pipe_bw", "native"): [[1000.0], [1100.0], [900.0]],
        ("pipe_bw", "vmclone-shm"): [[500.0], [550.0], [450.0]],
    }
    cold = {
        ("native", "cold"): [[70.0]] * 5,
        ("thread", "cold"): [[400.0]] * 5,
        ("vmclone-shm", "cold"): [[3000.0]] * 5,
        # thread's and vmclone-shm's unifork-run series failed: none given
    }
    checks = issue17(cells, cold, ["native", "thread", "vmclone-shm"])
    by = {(c.item, c.what): c for c in checks}
    assert {c.item for c in checks} == {1, 3, 5, 6}
    assert by[(1, "thread: cold (fresh VM) / warm")].figure == pytest.approx(400 / 41)
    assert by[(1, "thread: cold (fresh VM) / warm")].verdict == MISSED
    assert by[(1, "thread: cold (unifork run) / warm")].verdict == NOT_MEASURED
    assert by[(3, "thread / native, warm loop")].figure == pytest.approx(1.0)
    assert by[(3, "thread / native, cold (fresh VM / process)")].figure == pytest.approx(400 / 70)
    assert by[(5, "vmclone-shm: fork, warm loop (us)")].verdict == MET
    assert by[(6, "vmclone-shm: pipe_bw / native")].figure == pytest.approx(0.5)
    assert by[(6, "vmclone-shm: pipe_bw / native")].verdict == MET
    # vmclone-tcp was not run: no check claims anything about it
    assert not [c for c in checks if "vmclone-tcp" in c.what]
    # without thread mode there is no item 3
    assert not [c for c in issue17(cells, cold, ["native", "vmclone-shm"]) if c.item == 3]

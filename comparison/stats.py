"""The one median and percentile of the harness, from :mod:`statistics`.

Every report (``compare``, ``bench``, ``bench_service``, ``load``,
``bench_transport``) uses these, so a p95 means the same everywhere: the
inclusive method (linear interpolation between order statistics, numpy's
default), as comparison/README.md documents.  No samples gives None; one sample
is its own percentile (``statistics.quantiles`` needs two).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(xs: Sequence[float]) -> float | None:
    """The median, or None for no samples."""
    return statistics.median(xs) if xs else None


def percentile(xs: Sequence[float], p: int) -> float | None:
    """The ``p``-th percentile (inclusive method); None for no samples, one sample: itself.

    ``statistics.quantiles`` is asked for the fewest cut points that include ``p``% (20 for
    p95, 100 for p99), which gives the same floats the reports gave before.
    """
    if not 0 < p < 100:
        raise ValueError(f"percentile {p} is not between 0 and 100")
    if len(xs) < 2:
        return xs[0] if xs else None
    g = math.gcd(p, 100)
    return statistics.quantiles(xs, n=100 // g, method="inclusive")[p // g - 1]

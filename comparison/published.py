"""Published figures of the seed thesis: reference rows, never measured here.

Seed thesis (NTUA 2021, *Design and implementation of fork in rumprun
unikernels*), §4.6 "Αξιολόγηση": listing 4.1 (one ``fork()`` timed with
``gettimeofday``, i.e. our ``fork_time`` without ``-n``) run directly on the
host (Ubuntu 18.04 LTS, Linux 5.4.0-72-generic) and inside a Rumprun
unikernel on solo5 on the same host; the mean of 10 runs each.

These rows are kept apart from every measured figure: the report shows them
in their own section, labelled ``published``, and the JSON keeps them under
their own key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LABEL = "published"
SOURCE = (
    "seed thesis (NTUA 2021, 'Design and implementation of fork in rumprun "
    "unikernels') §4.6, listing 4.1"
)


@dataclass(frozen=True)
class PublishedFigure:
    key: str
    what: str
    value: float
    unit: str
    note: str

    def to_json(self) -> dict[str, object]:
        return {"label": LABEL, "source": SOURCE, **asdict(self)}


HOST_S = 0.000118
RUMPRUN_S = 0.000882

FIGURES: tuple[PublishedFigure, ...] = (
    PublishedFigure(
        "fork_linux_host",
        "fork (listing 4.1) on the Linux host",
        HOST_S,
        "s",
        "mean of 10 runs; Ubuntu 18.04 LTS, Linux 5.4.0-72-generic",
    ),
    PublishedFigure(
        "fork_rumprun",
        "fork (listing 4.1) in a Rumprun unikernel (thread fork)",
        RUMPRUN_S,
        "s",
        "mean of 10 runs; Rumprun on solo5 on the same host",
    ),
    PublishedFigure(
        "fork_rumprun_vs_host",
        "Rumprun / Linux host",
        round(RUMPRUN_S / HOST_S, 1),
        "x",
        "ratio of the two means above (0.000882 / 0.000118)",
    ),
)


def to_json() -> list[dict[str, object]]:
    return [f.to_json() for f in FIGURES]

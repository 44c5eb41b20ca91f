"""PNG plots of a compare report (matplotlib, Agg backend: no display needed).

Each function draws from the :class:`~comparison.report.Report` only, so the
plots show the same runs as the table and the JSON.  The thesis's published
figures appear only as grey dashed reference lines labelled "published",
never as data points.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from comparison import published  # noqa: E402
from comparison.modes import ALL_MODES  # noqa: E402
from comparison.report import Report  # noqa: E402

log = logging.getLogger(__name__)

COLORS = {
    "native": "#4c72b0",
    "thread": "#dd8452",
    "copy": "#937860",
    "vmclone-shm": "#55a868",
    "vmclone-tcp": "#c44e52",
    "vmclone-remote": "#8172b3",
}
DPI = 110


def _ordered(modes) -> list[str]:
    return sorted(modes, key=lambda m: ALL_MODES.index(m) if m in ALL_MODES else 99)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def fork_latency(r: Report, path: Path) -> Path | None:
    """Distribution of fork latencies (parent side, fork_time) per mode, log scale."""
    cells = [c for c in r.cells if c.workload == "fork_time" and c.status == "ok" and c.samples()]
    if not cells:
        return None
    cells.sort(key=lambda c: _ordered([c.mode, *ALL_MODES]).index(c.mode))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    data = [c.samples() for c in cells]
    parts = ax.violinplot(data, showmedians=True, showextrema=False)
    # matplotlib's types say one Collection; "bodies" is a list of them (one per cell)
    for body, c in zip(parts["bodies"], cells, strict=True):  # type: ignore[call-overload]
        body.set_facecolor(COLORS.get(c.mode, "grey"))
        body.set_alpha(0.55)
    ax.boxplot(data, widths=0.12, showfliers=False)
    ax.set_xticks(
        range(1, len(cells) + 1), [f"{c.mode}\nmedian {c.median:g} us\n(n={c.n})" for c in cells]
    )
    ax.set_yscale("log")
    ax.set_ylabel("fork() in the parent, microseconds (log)")
    ax.set_title(
        f"fork latency by mode: fork_time {' '.join(cells[0].args)}, "
        f"{r.runs} runs, first fork of each run excluded (see fork_cold_warm.png)",
        fontsize=9,
    )
    _published_lines(ax)
    return _save(fig, path)


def _published_lines(ax) -> None:
    """The thesis's published fork times as reference lines, legend and grid."""
    for f, style in ((published.FIGURES[0], ":"), (published.FIGURES[1], "--")):
        ax.axhline(
            f.value * 1e6,
            color="grey",
            linestyle=style,
            linewidth=1,
            label=f"{published.LABEL}: {f.what} ({f.value * 1e6:g} us, mean of 10)",
        )
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)


def fork_cold_warm(r: Report, path: Path) -> Path | None:
    """Cold first fork (listing 4.1, separate runs) beside the warm loop, per mode."""
    rows = [c for c in r.cold if c.cold.median_us is not None or c.warm_median_us is not None]
    if not rows:
        return None
    rows.sort(key=lambda c: _ordered([c.mode, *ALL_MODES]).index(c.mode))
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.27
    top = 0.0
    for x, c in enumerate(rows):
        color = COLORS.get(c.mode, "grey")
        warm_cell = r.cell("fork_time", c.mode)
        bars = [("cold\nVM", c.cold.median_us, c.cold.samples_us, "//", 0.9)]
        if c.unifork_run is not None:
            bars.append(("cold\nrun", c.unifork_run.median_us, c.unifork_run.samples_us, "xx", 0.7))
        bars.append(
            (
                "warm",
                c.warm_median_us,
                warm_cell.samples() if warm_cell is not None else [],
                "",
                0.4,
            )
        )
        for i, (what, median, samples, hatch, alpha) in enumerate(bars):
            if median is None:
                continue
            bx = x + (i - (len(bars) - 1) / 2) * width
            ax.bar(
                bx,
                median,
                width,
                color=color,
                alpha=alpha,
                hatch=hatch,
                edgecolor="black",
                linewidth=0.5,
            )
            ax.scatter([bx] * len(samples), samples, color="black", s=5, zorder=3)
            top = max(top, median, *samples)
            ax.annotate(
                f"{what}\n{median:g}",
                (bx, max([median, *samples])),
                ha="center",
                va="bottom",
                fontsize=6,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(
        range(len(rows)),
        [
            f"{c.mode}\ncold/warm {c.cold.over_warm:g}x" if c.cold.over_warm else c.mode
            for c in rows
        ],
        fontsize=8,
    )
    ax.set_yscale("log")
    ax.set_ylim(top=top * 6)  # room for the labels above the highest run
    ax.set_ylabel("fork() in the parent, microseconds (log)")
    ax.set_title(
        f"cold first fork (fork_time, one fork per run, {r.cold_runs} runs: fresh VM "
        "'//', fresh `unifork run` 'xx') vs warm loop (first fork of each run "
        "excluded)",
        fontsize=8,
    )
    _published_lines(ax)
    return _save(fig, path)


def pipe_throughput(r: Report, path: Path) -> Path | None:
    """Median pipe throughput per mode (bars) with every run (dots)."""
    cells = [c for c in r.cells if c.workload == "pipe_bw" and c.status == "ok" and c.samples()]
    if not cells:
        return None
    cells.sort(key=lambda c: _ordered([c.mode, *ALL_MODES]).index(c.mode))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = range(len(cells))
    medians = [c.median for c in cells]  # an "ok" cell with samples has one
    ax.bar(
        xs, cast(list[float], medians), color=[COLORS.get(c.mode, "grey") for c in cells], alpha=0.8
    )
    for x, c in zip(xs, cells, strict=True):
        ax.scatter([x] * len(c.samples()), c.samples(), color="black", s=10, zorder=3)
        ax.annotate(
            f"{c.median:g}",
            (x, c.median),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    labels = []
    for c in cells:
        transport = {
            "native": "kernel pipe",
            "thread": "in-VM pipe",
            "vmclone-shm": "shared memory",
            "vmclone-tcp": "TCP (loopback)",
            "vmclone-remote": "TCP to a peer tender",
        }.get(c.mode, "")
        labels.append(f"{c.mode}\n{transport}")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("MiB/s (log)")
    ax.set_title(
        f"pipe throughput by mode / transport: pipe_bw {' '.join(cells[0].args)}, 64 KiB writes",
        fontsize=10,
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    return _save(fig, path)


def memory_per_child(r: Report, path: Path) -> Path | None:
    rows = [m for m in r.memory if m.status == "ok"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, attr, runs_attr, title in (
        (axes[0], "guest_kib_per_child", "guest_runs_kib", "guest memory per child"),
        (axes[1], "host_kib_per_child", "host_runs_kib", "host memory (PSS) per child"),
    ):
        have = [m for m in rows if getattr(m, attr) is not None]
        xs = range(len(have))
        ax.bar(
            xs,
            [getattr(m, attr) for m in have],
            color=[COLORS.get(m.mode, "grey") for m in have],
            alpha=0.8,
        )
        for x, m in zip(xs, have, strict=True):
            runs = getattr(m, runs_attr)
            ax.scatter([x] * len(runs), runs, color="black", s=10, zorder=3)
            ax.annotate(
                f"{getattr(m, attr):g}",
                (x, getattr(m, attr)),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.set_xticks(list(xs), [m.mode for m in have], fontsize=8)
        ax.set_ylabel("KiB per child")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.suptitle(
        f"memory per live child: fork_scale -n {r.memory_children} minus -n 0", fontsize=10
    )
    return _save(fig, path)


def fork_scaling(r: Report, path: Path) -> Path | None:
    rows = [s for s in r.scaling if s.points]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for s in sorted(rows, key=lambda s: _ordered([s.mode, *ALL_MODES]).index(s.mode)):
        pts = [(p.n, p.ready_ms) for p in s.points if p.ready_ms is not None]
        ax.plot(
            [n for n, _ in pts],
            [ms for _, ms in pts],
            marker="o",
            markersize=4,
            color=COLORS.get(s.mode, "grey"),
            label=s.mode,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("live children N (log2)")
    ax.set_ylabel("ms until all N children run, blocked on a pipe (log)")
    ax.set_title("fork-count scaling: fork_scale -n N (VM-clone curves bounded)", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def http_servers(r: Report, path: Path) -> Path | None:
    """Requests/s of each HTTP server configuration, a bar per mode, its ratio to
    native's above the bar."""
    rows = [h for h in r.http if h.status == "ok" and h.rps is not None]
    if not rows:
        return None
    groups = list(dict.fromkeys((h.server, h.workers) for h in rows))
    modes = _ordered({h.mode for h in rows})
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.6 * len(groups) + 2), 4.8))
    for i, mode in enumerate(modes):
        by = {(h.server, h.workers): h for h in rows if h.mode == mode}
        for g, key in enumerate(groups):
            h = by.get(key)
            if h is None or h.rps is None:
                continue
            x = g + (i - (len(modes) - 1) / 2) * width
            ax.bar(x, h.rps, width, color=COLORS.get(mode, "grey"), label=mode if g == 0 else None)
            if h.ratio_native is not None and mode != "native":
                ax.annotate(f"{h.ratio_native:g}x", (x, h.rps), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    labels = [f"{name}\n{f'{w} workers' if w else 'fork per connection'}" for name, w in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("HTTP servers behind a published port: requests/s (x: vs native)", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


REAL_PROGRAMS = ("shell_loop", "system_loop")


def real_programs(r: Report, path: Path) -> Path | None:
    """The real-program workloads: one panel each, a bar per mode (median, every run a dot,
    its ratio to native), a failed or skipped mode named on its axis with no bar."""
    keys = [k for k in REAL_PROGRAMS if any(c.workload == k for c in r.cells)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        cells = [c for c in r.cells if c.workload == key]
        cells.sort(key=lambda c: _ordered([c.mode, *ALL_MODES]).index(c.mode))
        labels = []
        for x, c in enumerate(cells):
            if c.status != "ok" or c.median is None:
                labels.append(f"{c.mode}\n{c.status.upper()}")
                continue
            ax.bar(x, c.median, color=COLORS.get(c.mode, "grey"), alpha=0.8)
            ax.scatter([x] * len(c.samples()), c.samples(), color="black", s=10, zorder=3)
            ratio = "" if c.ratio_native is None else f"\n{c.ratio_native:g}x native"
            ax.annotate(
                f"{c.median:g}{ratio}",
                (x, c.median),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
            labels.append(f"{c.mode}\n(n={c.n})")
        ax.set_xticks(range(len(cells)), labels, fontsize=8)
        tops = [max(c.samples()) for c in cells if c.status == "ok" and c.samples()]
        if tops:
            ax.set_yscale("log")
            ax.set_ylim(top=max(tops) * 4)  # room for the labels above the bars
        ax.set_ylabel(f"{cells[0].unit} per iteration (log)")
        ax.set_title(cells[0].title, fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle("real programs: dash and system() (issue 14), median per mode", fontsize=10)
    return _save(fig, path)


PLOTS = (
    ("fork_latency.png", fork_latency),
    ("fork_cold_warm.png", fork_cold_warm),
    ("pipe_throughput.png", pipe_throughput),
    ("memory_per_child.png", memory_per_child),
    ("fork_scaling.png", fork_scaling),
    ("real_programs.png", real_programs),
    ("http_servers.png", http_servers),
)


def write_all(r: Report, directory: Path) -> list[Path]:
    out = []
    for name, fn in PLOTS:
        p = fn(r, directory / name)
        if p is not None:
            out.append(p)
    return out

"""``unifork compare``: every workload in every mode, measured in one run.

Modes: ``native`` (the same static binary as a Linux process), ``thread``
(thread fork, one VM in this process), ``copy`` (copy fork, one VM in this
process, private memory per process), ``vmclone-shm`` and ``vmclone-tcp``
(VM-clone fork on one shared warm pool of tender processes, pipes across VMs
over shared memory or TCP) and, with ``--target``, ``vmclone-remote`` (VM-clone
instances launched over gRPC on that tender with placement ``remote``).

For every workload (``comparison/workloads.py``) each mode gets warm-up runs
(discarded), then the kept runs, interleaved round by round over the modes so
that a slow spell of a noisy host hits every mode alike.  Then the memory per
live child and the fork-count scaling curve (``fork_scale``), the semantics
matrix (from the ``semantics`` and ``fork_hazards`` runs), and the report:
text table, JSON, CSV and PNG plots in a new ``report-<timestamp>/`` folder.

The library logs (``compare.log`` in the report folder gets everything); the
CLI prints the table.  See ``comparison/README.md``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comparison import bench_http, targets
from comparison import report as rep
from comparison.modes import (
    COPY,
    LOCAL_MODES,
    NATIVE,
    ONE_VM_MODES,
    THREAD,
    UNIFORK_RUN_FLAGS,
    VMCLONE_MODES,
    VMCLONE_REMOTE,
    VMCLONE_SHM,
    VMCLONE_TCP,
    CopyRunner,
    NativeRunner,
    Outcome,
    RemoteRunner,
    Runner,
    ThreadRunner,
    VmcloneRunner,
    run_unifork_process,
)
from comparison.progress import ProgressBar
from comparison.stats import median
from comparison.workloads import (
    BAKED,
    CAT,
    COLD_PROGRAM,
    COLD_WORKLOAD,
    EXEC_CHAIN,
    HAZARD_ITEMS,
    SCALE_PROGRAM,
    SEMANTICS_ITEMS,
    SHELL,
    SYSTEM_LOOP,
    WORKLOADS,
    OutputError,
    Workload,
    parent_fork_us,
    scale_ready_us,
    words,
)
from tender_service.rump.vminfo import FORK_PHASES

if TYPE_CHECKING:
    from tender_service.instance.pool import WarmPool

log = logging.getLogger(__name__)

KIB = 1024
POOL_SIZE = 2
HOLD_MS = 250  # fork_scale -h: how long the children stay alive for the memory probe
SCALE_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCALE_RAM = 256 << 20  # thread mode: 256 children x (256 KiB stack + TLS) must fit
#: what each cold run starts afresh, by mode
COLD_HOW = {
    NATIVE: "a fresh Linux process",
    THREAD: "a fresh VM in the harness process (thread backend; imports already paid)",
    COPY: "a fresh VM in the harness process (copy backend; imports already paid)",
    VMCLONE_SHM: "a fresh parent VM on the harness's warm pool (vmclone backend, pipes over shm)",
    VMCLONE_TCP: "a fresh parent VM on the harness's warm pool (vmclone backend, pipes over tcp)",
    VMCLONE_REMOTE: "a fresh instance on --target, placement remote",
}


@dataclass
class Params:
    quick: bool
    runs: int
    warmup: int
    memory_children: int
    memory_runs: int
    scale_runs: int
    vmclone_scale_max: int
    cold_runs: int  # separate one-fork runs per mode (the thesis: 10)
    http_workers: tuple[int, ...] = (2,)  # prefork_http's worker counts
    http_seconds: float = 1.0  # measured seconds of load per server and mode

    @classmethod
    def make(cls, quick: bool, runs: int | None, cold_runs: int | None = None) -> Params:
        if quick:
            return cls(True, runs or 3, 1, 16, 3, 3, 32, cold_runs or 5)
        return cls(False, runs or 10, 2, 32, 5, 5, 128, cold_runs or 10, (1, 4, 16), 3.0)

    def scale_runs_for(self, mode: str) -> int:
        """Kept runs per scaling point: VM-clone points are slow, so only one in a quick run."""
        return 1 if self.quick and mode in VMCLONE_MODES else self.scale_runs

    def scale_ns(self, mode: str) -> list[int]:
        top = self.vmclone_scale_max if mode in VMCLONE_MODES else SCALE_NS[-1]
        return [n for n in SCALE_NS if n <= top]


@dataclass
class Task:
    label: str
    fn: Callable[[], None]


@dataclass
class Result:
    """What the CLI gets back: the report, its text, where it is, the exit status."""

    report: rep.Report
    text: str
    directory: Path
    exit_code: int


class RemoteUnavailable(RuntimeError):
    pass


@dataclass
class RealPrograms:
    """The real-program image and, for native runs, the same binaries in one directory.

    ``image``: one baked image with dash as /bin/sh, our cat, system_loop and exec_chain; ``bindir``:
    those ELFs under their names (natively PATH); ``work``: natively the scripts' $W (in a
    VM, /tmp of the instance's own file system).
    """

    image: Path
    bindir: Path
    work: Path

    def invocation(self, native: bool, program: str, args: list[str]) -> tuple[Path, list, list]:
        """(image, args, env) of ``program`` (a path in the image) with ``args``."""
        if native:
            here = str(self.bindir)
            args = [a.replace("{bin}", here) for a in args]
            return self.bindir / Path(program).name, args, [f"PATH={here}", f"W={self.work}"]
        args = [a.replace("{bin}", "/bin") for a in args]
        return self.image, [program, *args], ["PATH=/bin", "W=/tmp"]


def make_real_programs(top: Path) -> RealPrograms:
    """Bake the real-program image under ``top``; dash comes from (or is built once into) the
    third-party cache, as for tests/test_shell.py.  Raises ``thirdparty.Unavailable``."""
    from tender_service.toolchain import thirdparty
    from tender_service.toolchain.bake import bake
    from tender_service.toolchain.images import build_image

    programs = {
        SHELL: thirdparty.dash(),
        CAT: thirdparty.tools()["cat"],
        SYSTEM_LOOP: build_image("system_loop"),
        EXEC_CHAIN: build_image("exec_chain"),
    }
    bindir, work = top / "bin", top / "work"
    bindir.mkdir()
    work.mkdir()
    for path, elf in programs.items():
        (bindir / Path(path).name).symlink_to(elf)
    image = top / "real.img"
    bake(image, list(programs.items()))
    return RealPrograms(image, bindir, work)


def new_report_dir(root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = root / (f"report-{stamp}" if i == 0 else f"report-{stamp}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a report folder under {root}")


class _TenderNoise(logging.Filter):
    """On the terminal, the VMs' own records only from ERROR up (all of them are in the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("tender_service") or record.levelno >= logging.ERROR


@contextlib.contextmanager
def session_logging(directory: Path, bar: ProgressBar, verbose: int) -> Iterator[None]:
    """Everything to ``compare.log``; warnings (ours, and VM errors) to stderr around the bar."""
    root = logging.getLogger()
    ours = logging.getLogger("comparison")
    saved = (root.handlers[:], root.level, ours.level)
    fileh = logging.FileHandler(directory / "compare.log")
    fileh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errh = logging.StreamHandler(sys.stderr)
    errh.setFormatter(logging.Formatter("compare: %(levelname)s: %(message)s"))
    level = logging.INFO if verbose else logging.WARNING
    errh.addFilter(lambda record: record.levelno >= level)  # a filter: the bar keeps filters
    if not verbose:
        errh.addFilter(_TenderNoise())
    root.handlers = [fileh, errh]
    root.setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    ours.setLevel(logging.INFO)
    try:
        with bar.logging(root):
            yield
    finally:
        root.handlers, root.level = saved[0], saved[1]
        ours.setLevel(saved[2])
        fileh.close()


class Compare:
    def __init__(
        self,
        params: Params,
        modes: list[str],
        workloads: list[Workload],
        memory: bool,
        scaling: bool,
        http: bool = False,
    ) -> None:
        self.p = params
        self.modes = modes
        self.workloads = workloads
        self.do_memory = memory
        self.do_scaling = scaling
        self.do_http = http
        self.http_rows: list[rep.HttpRow] = []
        self.runners: dict[str, Runner] = {}
        self.pool: WarmPool | None = None
        self.skipped: dict[str, str] = {}
        self.images: dict[str, Path] = {}
        self.cells: dict[tuple[str, str], rep.Cell] = {}
        self.cold: dict[str, rep.ColdRow] = {}
        self.probe_words: dict[tuple[str, str], list[dict[str, str]]] = {}
        #: VM-clone modes: the steps of each warm fork of the fork_time cell
        self.fork_phases: dict[str, list[dict[str, float]]] = {}
        self.mem_raw: dict[str, dict[str, list]] = {}
        self.mem_failed: dict[str, str] = {}
        self.scale_raw: dict[str, dict[int, list[tuple[float, float]]]] = {}
        self.scale_failed: dict[str, str] = {}
        self.notes: list[str] = []
        self.setup_failures: list[str] = []
        self.real: RealPrograms | None = None
        self.real_skipped = ""  # why the real-program workloads cannot run here
        self._real_dir: Path | None = None

    # -- setup ----------------------------------------------------------------------------------
    def build_images(self) -> None:
        from tender_service.toolchain.images import build_image

        builtin = {w.program for w in self.workloads if w.image != BAKED}
        for name in builtin | {SCALE_PROGRAM, "hello"}:
            self.images[name] = build_image(name)
        if any(w.image == BAKED for w in self.workloads):
            self.prepare_real_programs()

    def prepare_real_programs(self) -> None:
        """The baked image of the real-program workloads; if dash cannot be had here they are
        skipped, the reason in the report."""
        from tender_service.toolchain.thirdparty import Unavailable

        self._real_dir = Path(tempfile.mkdtemp(prefix="unifork-compare-"))
        log.info("real-program workloads: dash from the third-party cache (built once if absent)")
        try:
            self.real = make_real_programs(self._real_dir)
        except Unavailable as e:
            self.real_skipped = f"dash is not available on this machine: {_short(e)}"
            log.warning("real-program workloads skipped: %s", self.real_skipped)
            return
        self.images[BAKED] = self.real.image

    def start_runners(self, target: str | None, token: str | None, tls_ca: str | None) -> None:
        in_process = {NATIVE: NativeRunner, THREAD: ThreadRunner, COPY: CopyRunner}
        for mode, runner in in_process.items():
            if mode in self.modes:
                self.runners[mode] = runner()
        local_clone = [m for m in (VMCLONE_SHM, VMCLONE_TCP) if m in self.modes]
        if local_clone:
            from tender_service.instance.pool import WarmPool

            try:
                self.pool = WarmPool(POOL_SIZE)
                self.pool.wait_ready()
            except Exception as e:
                log.error("the warm pool did not start: %s", e)
                self.setup_failures += [
                    f"{m}: the warm pool did not start: {e}" for m in local_clone
                ]
                if self.pool is not None:
                    self.pool.close()
                    self.pool = None
                local_clone = []
            for m in local_clone:
                self.runners[m] = VmcloneRunner(self.pool, m.split("-", 1)[1])
        if VMCLONE_REMOTE in self.modes:
            if not target:
                self.skipped[VMCLONE_REMOTE] = "no --target given"
            else:
                r = None
                try:
                    r = RemoteRunner(target, token, tls_ca)
                    r.check()
                    for path in self.images.values():
                        r.image_name(path)  # upload now: a failure skips the mode cleanly
                    # one instance: a tender without peers fails here, not in every cell
                    r.run(self.images["hello"], [])
                    self.runners[VMCLONE_REMOTE] = r
                except Exception as e:  # any failure means: skip this mode
                    reason = getattr(e, "details", lambda: None)() or str(e)
                    self.skipped[VMCLONE_REMOTE] = f"{target}: {reason}".strip()
                    log.warning("vmclone-remote skipped: %s", self.skipped[VMCLONE_REMOTE])
                    if r is not None:
                        with contextlib.suppress(Exception):
                            r.close()
        self.modes = [m for m in self.modes if m in self.runners]

    def warm_pool(self) -> None:
        """The pool's tender processes load the ELF, Unicorn and the fork path once."""
        for mode in (VMCLONE_SHM, VMCLONE_TCP):
            if mode in self.runners:
                for _ in range(POOL_SIZE):
                    try:
                        self.runners[mode].run(self.images["fork_scale"], ["-n", "2"])
                    except Exception as e:  # the cells will say what is wrong
                        log.warning("warm-up of %s failed: %s", mode, _short(e))

    def close(self) -> None:
        for r in self.runners.values():
            with contextlib.suppress(Exception):
                r.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self._real_dir is not None:
            shutil.rmtree(self._real_dir, ignore_errors=True)
            self._real_dir = None

    # -- plan -----------------------------------------------------------------------------------
    def plan(self) -> list[Task]:
        tasks: list[Task] = []
        if self.pool is not None:
            tasks.append(Task("warm-up: tender processes of the pool", self.warm_pool))
        for w in self.workloads:
            tasks += self._plan_workload(w)
        if self.do_memory:
            tasks += self._plan_memory()
        if self.do_scaling:
            tasks += self._plan_scaling()
        if self.do_http:
            tasks += self._plan_http()
        return tasks

    def _plan_http(self) -> list[Task]:
        """HTTP servers under load (comparison/bench_http.py), every mode of a server
        one after the other; a server that cannot be built here is a note."""
        from tender_service.toolchain.thirdparty import Unavailable

        servers = bench_http.prefork_servers(list(self.p.http_workers))
        if not self.p.quick:
            try:
                servers.append(bench_http.mini_httpd_server(Path(tempfile.mkdtemp())))
            except Unavailable as e:
                self.notes.append(f"http: mini_httpd skipped: {_short(e)}")
        modes = [m for m in self.modes if m in bench_http.MODES]
        skipped = [m for m in self.modes if m not in bench_http.MODES]
        if skipped:
            self.notes.append(f"http: not run in {', '.join(skipped)} (no published port there)")

        def one(srv: bench_http.HttpServer, mode: str) -> Callable[[], None]:
            return lambda: self.http_rows.append(
                bench_http.measure(srv, mode, self.p.http_seconds, bench_http.CLIENTS)
            )

        return [
            Task(f"http: {srv.name} w={srv.workers}, {mode}", one(srv, mode))
            for srv in servers
            for mode in modes
        ]

    def _plan_workload(self, w: Workload) -> list[Task]:
        """The cells of ``w`` and its runs: warm-up runs, then rounds of loop runs (and, for
        the cold workload, cold runs in the same rounds)."""
        tasks: list[Task] = []
        args = list(w.args(self.p.quick))
        for mode in self.modes:
            self.cells[(w.key, mode)] = rep.Cell(
                w.key,
                w.title,
                w.program,
                args,
                mode,
                w.metric,
                w.unit,
                w.better,
                note="; ".join(w.notes),
                known_limit=dict(w.known_limits).get(mode, ""),
            )
            if w.image == BAKED and self.real is None:
                self.cells[(w.key, mode)].skip(self.real_skipped or "no real-program image")
        if w.image == BAKED and self.real is None:
            return tasks
        for i in range(self.p.warmup):
            for mode in self.modes:
                tasks.append(
                    Task(
                        f"{w.key}: {mode} warm-up {i + 1}/{self.p.warmup}",
                        self._workload_task(w, mode, None),
                    )
                )
        cold = self.p.cold_runs if w.key == COLD_WORKLOAD else 0
        for mode in self.modes if cold else ():
            self.cold[mode] = rep.ColdRow(mode, rep.ColdSeries(COLD_HOW[mode]))
            if mode in UNIFORK_RUN_FLAGS:
                how = f"a fresh `unifork run {' '.join(UNIFORK_RUN_FLAGS[mode])}` process"
                self.cold[mode].unifork_run = rep.ColdSeries(how)
        # the cold runs go in the same rounds as the loop runs, after the warm-up runs
        for i in range(max(self.p.runs, cold)):
            for mode in self.modes:
                if i < cold:
                    tasks += self._plan_cold_round(w, mode, i, cold)
                if i < self.p.runs:
                    tasks.append(
                        Task(
                            f"{w.key}: {mode} run {i + 1}/{self.p.runs}",
                            self._workload_task(w, mode, i),
                        )
                    )
        return tasks

    def _plan_cold_round(self, w: Workload, mode: str, i: int, cold: int) -> list[Task]:
        tasks = [
            Task(f"{w.key}: {mode} cold first fork {i + 1}/{cold}", self._cold_task(mode, False))
        ]
        if mode in UNIFORK_RUN_FLAGS:
            tasks.append(
                Task(
                    f"{w.key}: {mode} cold first fork, unifork run {i + 1}/{cold}",
                    self._cold_task(mode, True),
                )
            )
        return tasks

    def _plan_memory(self) -> list[Task]:
        tasks: list[Task] = []
        for mode in [m for m in self.modes if m in LOCAL_MODES or m in ONE_VM_MODES]:
            self.mem_raw[mode] = {"n": [], "zero": []}
            tasks.append(Task(f"memory: {mode} warm-up", self._memory_task(mode, None)))
            for i in range(self.p.memory_runs):
                for which in ("n", "zero"):
                    tasks.append(
                        Task(
                            f"memory: {mode} run {i + 1}/{self.p.memory_runs}",
                            self._memory_task(mode, which),
                        )
                    )
        if VMCLONE_REMOTE in self.modes:
            self.notes.append(
                "memory per child: not measured for vmclone-remote (the "
                "peer's memory is not observable from here)"
            )
        return tasks

    def _plan_scaling(self) -> list[Task]:
        tasks: list[Task] = []
        for mode in self.modes:
            self.scale_raw[mode] = {}
            tasks.append(Task(f"scaling: {mode} warm-up", self._scale_task(mode, 4, False)))
            runs = self.p.scale_runs_for(mode)
            for i in range(runs):
                for n in self.p.scale_ns(mode):
                    tasks.append(
                        Task(
                            f"scaling: {mode} N={n} run {i + 1}/{runs}",
                            self._scale_task(mode, n, True),
                        )
                    )
        return tasks

    # -- tasks ----------------------------------------------------------------------------------
    def _run(self, mode: str, program: str, args: list[str], **kw) -> Outcome:
        return self.runners[mode].run(self.images[program], args, **kw)

    def _run_workload(self, w: Workload, mode: str, args: list[str]) -> Outcome:
        if w.image != BAKED:
            return self._run(mode, w.program, args)
        assert self.real is not None
        image, argv, env = self.real.invocation(mode == NATIVE, w.program, args)
        return self.runners[mode].run(image, argv, env=env)

    def _workload_task(self, w: Workload, mode: str, index: int | None) -> Callable[[], None]:
        def go() -> None:
            cell = self.cells[(w.key, mode)]
            if cell.status != "ok":
                return
            try:
                base = None
                if w.baseline_args is not None:
                    b = self._run_workload(w, mode, list(w.baseline_args))
                    w.check(b.stdout)
                    base = b.wall
                o = self._run_workload(w, mode, cell.args)
                o.baseline_wall = base
                w.check(o.stdout)
                vals = w.extract(o)
                if w.key == "semantics":
                    found = words(o.stdout, SEMANTICS_ITEMS)
                elif w.key == "fork_hazards":
                    found = words(o.stdout, HAZARD_ITEMS)
                else:
                    found = None
            except Exception as e:  # any failure ends this cell, never the whole run
                cell.status, cell.error = "failed", _short(e)
                if cell.known_limit:
                    log.warning("%s in %s failed, a known limit: %s", w.key, mode, cell.error)
                else:
                    log.error("%s in %s failed: %s", w.key, mode, cell.error)
                return
            if index is None:
                return
            cut = w.exclude_first
            # each fork's time in the parent's kernel, where the run says it, fork by fork
            kernel = o.fork_seconds[cut:] if len(o.fork_seconds) == len(vals) else []
            cell.runs.append(
                rep.RunRecord(
                    index + 1,
                    round(o.wall, 6),
                    vals[cut:],
                    vals[:cut],
                    None if base is None else round(base, 6),
                    [round(x * 1e6, 3) for x in kernel],
                )
            )
            if found is not None:
                self.probe_words.setdefault((w.key, mode), []).append(found)
            if w.key == COLD_WORKLOAD and o.fork_phases:
                self.fork_phases.setdefault(mode, []).extend(o.fork_phases[cut:])

        return go

    def _cold_task(self, mode: str, process: bool) -> Callable[[], None]:
        """One run of the thesis's listing 4.1, one fork: a fresh VM (natively a fresh
        process) of this harness's runner, or (``process``) a fresh ``unifork run``."""

        def go() -> None:
            row = self.cold[mode]
            series = row.unifork_run if process else row.cold
            assert series is not None
            if series.status != "ok":
                return
            try:
                if process:
                    o = run_unifork_process(mode, self.images[COLD_PROGRAM], [])
                else:
                    o = self._run(mode, COLD_PROGRAM, [])
                us = parent_fork_us(o.stdout)
            except Exception as e:  # any failure ends this series, never the whole run
                series.fail(_short(e))
                log.error("cold first fork (%s) in %s failed: %s", series.how, mode, series.error)
                return
            series.add(us, o.wall, o.fork_seconds[0] * 1e6 if o.fork_seconds else None)

        return go

    def cold_rows(self) -> list[rep.ColdRow]:
        rows = [self.cold[m] for m in self.modes if m in self.cold]
        for r in rows:
            r.summarize(self.cells.get((COLD_WORKLOAD, r.mode)))
        rep.add_cold_ratios(rows)
        return rows

    def fork_breakdown(self) -> dict[str, dict[str, float]]:
        """Per VM-clone mode, the median ms of each fork step, and the number of forks."""
        return {
            mode: {
                **{k: round(statistics.median(p[k] for p in phases) * 1e3, 3) for k in FORK_PHASES},
                "forks": len(phases),
            }
            for mode, phases in self.fork_phases.items()
        }

    def cold_note(self) -> list[str]:
        """How the cold and warm fork figures were taken, and everything left out of them."""
        if not self.cold:
            return []
        loop = self.cells[(COLD_WORKLOAD, self.modes[0])].args if self.modes else []
        return [
            f"cold = {COLD_PROGRAM} with no arguments, the thesis's listing 4.1: the parent's "
            "'fork took' (gettimeofday around its one fork()), each of the "
            f"{self.p.cold_runs} runs a fresh VM (natively a fresh process); 'thesis mean s' is "
            "the mean of those runs in seconds, as the thesis's §4.6 reports (published: mean "
            "of 10 runs, Linux host 0.000118 s, Rumprun 0.000882 s, 7.5x)",
            f"warm = {COLD_WORKLOAD} {' '.join(loop)} (CLOCK_MONOTONIC per fork): every fork "
            "but the first of each of its runs; the first fork of each loop run is excluded "
            "from warm and shown as '1st of each loop run' here (JSON: "
            "cold_fork.rows[].loop_first_us and each run's 'excluded')",
            f"discarded: {self.p.warmup} warm-up run(s) of {COLD_WORKLOAD} "
            f"{' '.join(loop)} per mode, before the cold and the kept runs (no cold run is "
            "discarded); cold and loop runs interleaved round by round over the modes",
            "'cold, fresh VM': thread: a fresh VM in the harness process (imports already "
            "paid); vmclone-shm/-tcp: a fresh parent VM on the harness's warm pool; "
            "vmclone-remote: a fresh instance on --target.  'cold, unifork run': a fresh "
            "`unifork run --console pipe` process per run (Python start-up, imports and, for "
            "VM-clone, a new pool of its own), as a user runs the listing; vs native = against "
            "native's cold (a fresh process too)",
            "'in kernel': the fork's time in the parent's kernel (RunResult.fork_seconds: "
            "thread and copy fork build the child there, VM-clone leases, shares, captures "
            "and starts it); 'rest': the fork less that, run by run or fork by fork: the "
            "guest's own code, libc's fork path and the syscall's way in and out, which "
            "Unicorn translates as it first runs in a fresh VM; '-' where a run does not "
            "say (natively); a `unifork run` process says its first fork's (--stats)",
        ]

    def _memory_task(self, mode: str, which: str | None) -> Callable[[], None]:
        n = self.p.memory_children

        def go() -> None:
            if mode in self.mem_failed:
                return
            count = 0 if which == "zero" else n
            runner = self.runners[mode]
            gc.collect()
            before = 0 if mode == NATIVE else runner.host_memory()

            def probe(pid: int | None) -> dict:
                return {"host": runner.host_memory(pid)}

            try:
                o = self._run(
                    mode, SCALE_PROGRAM, ["-n", str(count), "-h", str(HOLD_MS)], probe=probe
                )
                scale_ready_us(o, count)
                if o.probe is None:
                    raise OutputError("the children= line was never seen")
            except Exception as e:  # any failure ends this cell, never the whole run
                self.mem_failed[mode] = _short(e)
                log.error("memory in %s failed: %s", mode, self.mem_failed[mode])
                return
            if which is None:
                return
            snap = median(o.snapshot_bytes)
            self.mem_raw[mode][which].append(
                {"host": o.probe["host"] - before, "peak": o.peak_memory, "snapshot": snap}
            )

        return go

    def _scale_task(self, mode: str, n: int, keep: bool) -> Callable[[], None]:
        def go() -> None:
            if mode in self.scale_failed:
                return
            try:
                o = self._run(
                    mode,
                    SCALE_PROGRAM,
                    ["-n", str(n)],
                    ram=SCALE_RAM if mode in ONE_VM_MODES else None,
                )
                fork_all, ready = scale_ready_us(o, n)
            except Exception as e:  # any failure ends this cell, never the whole run
                self.scale_failed[mode] = f"N={n}: {_short(e)}"
                log.error("scaling in %s failed: %s", mode, self.scale_failed[mode])
                return
            if keep:
                self.scale_raw[mode].setdefault(n, []).append((fork_all / 1e3, ready / 1e3))

        return go

    # -- results --------------------------------------------------------------------------------
    def _matrix(self, workload: str, items: tuple[str, ...]) -> tuple[dict, dict]:
        matrix: dict[str, dict[str, str]] = {}
        runs: dict[str, int] = {}
        for mode in self.modes:
            seen = self.probe_words.get((workload, mode))
            cell = self.cells.get((workload, mode))
            if not seen:
                if cell is not None:
                    matrix[mode] = {i: "FAILED" if cell.status != "ok" else "-" for i in items}
                    runs[mode] = 0
                continue
            runs[mode] = len(seen)
            matrix[mode] = {}
            for item in items:
                vals = [s[item] for s in seen]
                if len(set(vals)) == 1:
                    matrix[mode][item] = vals[0]
                else:
                    first = vals[0]
                    matrix[mode][item] = f"mixed ({vals.count(first)}/{len(vals)} {first})"
        return matrix, runs

    def memory_rows(self) -> list[rep.MemoryRow]:
        n = self.p.memory_children
        rows = []
        for mode, raw in self.mem_raw.items():
            if mode in self.mem_failed:
                rows.append(
                    rep.MemoryRow(
                        mode, n, None, None, [], [], status="failed", error=self.mem_failed[mode]
                    )
                )
                continue
            pairs = list(zip(raw["n"], raw["zero"], strict=False))
            host = [(a["host"] - b["host"]) / n / KIB for a, b in pairs]
            if mode in ONE_VM_MODES:
                guest = [(a["peak"] - b["peak"]) / n / KIB for a, b in pairs]
                how = "guest: bmk pages committed (peak N - peak 0) / N; host: PSS of this process"
            elif mode in (VMCLONE_SHM, VMCLONE_TCP):
                guest = [a["snapshot"] / KIB for a in raw["n"] if a["snapshot"] is not None]
                how = (
                    "guest: snapshot each child VM starts from (median per fork; pages of "
                    "zeros are not sent, its RAM starts zeroed); host: PSS of this process "
                    "+ the pool's tender processes"
                )
            else:
                guest = []
                how = "host: PSS of the program's process tree (no guest)"
            rows.append(
                rep.MemoryRow(
                    mode,
                    n,
                    rep.sig(median(guest)),
                    rep.sig(median(host)),
                    [round(g, 3) for g in guest],
                    [round(h, 3) for h in host],
                    how,
                )
            )
        return rows

    def scale_rows(self) -> list[rep.ScaleRow]:
        rows = []
        for mode, by_n in self.scale_raw.items():
            row = rep.ScaleRow(mode)
            if mode in self.scale_failed:
                row.status, row.error = "failed", self.scale_failed[mode]
            for n in sorted(by_n):
                fa = [round(x[0], 6) for x in by_n[n]]
                ready = [round(x[1], 6) for x in by_n[n]]
                row.points.append(
                    rep.ScalePoint(n, rep.sig(median(ready)), rep.sig(median(fa)), ready, fa)
                )
            rows.append(row)
        return rows

    def report(self, started: float, duration: float, machine: dict) -> rep.Report:
        cells = [
            self.cells[(w.key, m)]
            for w in self.workloads
            for m in self.modes
            if (w.key, m) in self.cells
        ]
        for c in cells:
            c.summarize()
        rep.add_ratios(cells)
        sem, sem_runs = self._matrix("semantics", SEMANTICS_ITEMS)
        haz, haz_runs = self._matrix("fork_hazards", HAZARD_ITEMS)
        notes = list(self.notes)
        notes.append(
            f"{self.p.warmup} warm-up run(s) per workload and mode, discarded; modes "
            "interleaved round by round; nothing pinned to a CPU"
        )
        if self.do_scaling:
            notes.append(
                f"scaling: VM-clone modes bounded at N={self.p.vmclone_scale_max}; "
                f"thread mode VM given {SCALE_RAM >> 20} MiB of guest RAM; "
                f"{self.p.scale_runs} run(s) per point "
                f"({self.p.scale_runs_for(VMCLONE_SHM)} for VM-clone modes)"
            )
        rep.add_http_ratios(self.http_rows)
        cold = self.cold_rows()
        return rep.Report(
            http=self.http_rows,
            http_note=[bench_http.METHOD] if self.http_rows else [],
            quick=self.p.quick,
            runs=self.p.runs,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            machine=machine,
            modes=list(self.modes),
            skipped_modes=dict(self.skipped),
            cells=cells,
            semantics=sem,
            semantics_runs=sem_runs,
            hazards=haz,
            hazards_runs=haz_runs,
            memory=self.memory_rows(),
            memory_children=self.p.memory_children,
            scaling=self.scale_rows(),
            cold=cold,
            targets=target_checks(cells, cold, self.modes),
            cold_runs=self.p.cold_runs if self.cold else 0,
            cold_note=self.cold_note(),
            fork_breakdown=self.fork_breakdown(),
            duration_s=duration,
            notes=notes,
            setup_failures=list(self.setup_failures),
        )


def target_checks(
    cells: list[rep.Cell], cold: list[rep.ColdRow], modes: list[str]
) -> list[targets.Check]:
    """Issue 17's targets from this run's samples: a cell's kept values by run, a cold
    series one run per fork (failed cells and series give no samples)."""
    runs = {(c.workload, c.mode): [r.values for r in c.runs] for c in cells if c.status == "ok"}
    series = {
        (row.mode, kind): [[us] for us in s.samples_us]
        for row in cold
        for kind, s in (("cold", row.cold), ("unifork_run", row.unifork_run))
        if s is not None and s.status == "ok"
    }
    return targets.issue17(runs, series, modes)


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300] if "\n" in text else text[:300]


def machine_info() -> dict[str, object]:
    from comparison.bench import machine_info as info

    m = info()
    m["pool_size"] = POOL_SIZE
    return m


def compare_from_args(a) -> Result:
    """Run ``unifork compare`` as parsed by ``options.add_compare_arguments``."""
    from tender_service.service.auth import read_token

    params = Params.make(a.quick, a.runs, getattr(a, "cold_runs", None))
    modes = list(a.modes) if a.modes else list(LOCAL_MODES) + [VMCLONE_REMOTE]
    workloads = [w for w in WORKLOADS if (w.key in a.only if a.only else w.default)]
    directory = new_report_dir(Path(a.out))
    token = read_token(a.token_file) if a.token_file else os.environ.get("UNIFORK_TOKEN")
    c = Compare(params, modes, workloads, not a.no_memory, not a.no_scaling, not a.no_http)
    bar = ProgressBar(1, enabled=not a.no_progress, by_group=True)
    started, t0 = time.time(), time.perf_counter()
    machine = machine_info()
    with session_logging(directory, bar, getattr(a, "verbose", 0)):
        log.info("report folder %s", directory)
        try:
            bar.step("setup: guest images, warm pool, remote tender")
            c.build_images()
            c.start_runners(a.target, token, a.tls_ca)
            tasks = c.plan()
            bar.total = len(tasks)
            for t in tasks:
                bar.step(t.label)
                t.fn()
                bar.advance()
            bar.finish()
        finally:
            c.close()
        r = c.report(started, time.perf_counter() - t0, machine)
        r.directory = str(directory.resolve())
        text = write_files(r, directory)
    return Result(r, text, directory.resolve(), 1 if r.failures else 0)


def write_files(r: rep.Report, directory: Path) -> str:
    """CSV, plots, then the JSON (listing every file) and the table; returns the table."""
    rep.write_csv(r, directory / "raw.csv", directory / "summary.csv")
    rep.write_published_csv(directory / "published.csv")
    pngs: list[Path] = []
    try:
        from comparison import plots  # matplotlib: the `plots` extra
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "matplotlib":
            raise
        r.notes.append(
            "plots skipped: matplotlib is not installed (pip install 'unifork[plots]' to draw them)"
        )
        log.warning("%s", r.notes[-1])
    else:
        try:
            pngs = plots.write_all(r, directory)
        except Exception as e:  # a failed plot must not lose the measured figures
            log.exception("plotting failed")
            r.notes.append(f"plots failed: {type(e).__name__}: {e} (see compare.log)")
    r.files = [
        "report.json",
        "raw.csv",
        "summary.csv",
        "published.csv",
        "table.txt",
        "compare.log",
        *(p.name for p in pngs),
    ]
    rep.write_json(r, directory / "report.json")
    text = rep.render(r)
    (directory / "table.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m comparison.compare``: the same as ``unifork compare``."""
    import argparse

    from comparison.options import add_compare_arguments

    p = argparse.ArgumentParser(
        prog="python -m comparison.compare", description=__doc__.splitlines()[0]
    )
    add_compare_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    res = compare_from_args(a)
    print(res.text)
    print(f"report: {res.directory}")
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())

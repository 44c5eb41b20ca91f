"""VM vs native benchmarks: each guest program runs in the VM and natively in the same run.

Not a test: it prints medians, the ratio VM/native and the target from the
issue with a PASS/MISS mark.  The native figure is always measured in this
run on this machine (the same static binary as an ordinary Linux process);
nothing is hard-coded.  See ``comparison/README.md``.

Run: ``python -m comparison.bench [--quick] [--json FILE] [--only KEY ...]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comparison.progress import ProgressBar
from comparison.report import grid
from comparison.stats import median, percentile
from tender_service.instance.backends.vmclone import run_vmclone
from tender_service.rump.vminfo import RunResult, VmConfig
from tender_service.toolchain.images import build_image
from tender_service.vm import CaptureSink, run_vm

log = logging.getLogger("comparison.bench")

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = (
    "getppid_loop",
    "clock_loop",
    "cpu_loop",
    "hello",
    "fork_time",
    "fork_exit_wait",
    "pipe_throughput",
    "pipe_bw",
    "children_blocked",
    "signals",
)
VM_TIMEOUT = 120.0  # seconds of wall time for any one VM
NATIVE_TIMEOUT = 120.0
KIB = 1024


class BenchError(RuntimeError):
    """A program failed (bad exit status, missing output): the figure would be meaningless."""


# -- statistics -----------------------------------------------------------------------


def p95(xs: Sequence[float]) -> float | None:
    """95th percentile (inclusive method), shown only from 20 samples on (README, Method)."""
    return percentile(xs, 95) if len(xs) >= 20 else None


# -- running a program natively and in the VM -------------------------------------------


@dataclass
class Run:
    stdout: str
    wall: float  # seconds, perf_counter around the whole run
    result: RunResult | None = None  # VM runs only

    @property
    def vm_result(self) -> RunResult:
        """The VM's result, of a run in a VM."""
        if self.result is None:
            raise BenchError("a native run has no VM result")
        return self.result


@contextmanager
def affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the block (and what it spawns) on ``cpus``, then restore; None: no change.

    Changing our own affinity instead of using a preexec_fn keeps subprocess
    on its fast spawn path, so a short run is not charged a slower spawn.
    """
    if cpus is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def run_native(path: Path, args: Sequence[str] = (), cpus: set[int] | None = None) -> Run:
    """The static binary as an ordinary process (stdout is a pipe, stdin /dev/null).

    It inherits this process's CPU affinity, or runs on ``cpus`` if given.
    """
    with affinity(cpus):
        t0 = time.perf_counter()
        p = subprocess.run(
            [str(path), *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=NATIVE_TIMEOUT,
            check=False,
        )
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(
            f"native {path.name} {' '.join(args)}: exit {p.returncode}\n{p.stderr.strip()}"
        )
    return Run(p.stdout, wall)


#: the fork modes a benchmark can run its VM side in (``--fork``, and the signal rows)
VM_MODES = ("thread", "copy", "vmclone-shm", "vmclone-tcp")


def run_in_vm(
    path: Path,
    args: Sequence[str] = (),
    sink: CaptureSink | None = None,
    config: VmConfig | None = None,
    mode: str = "thread",
) -> Run:
    """The same binary in a VM (console is a plain stream): thread or copy fork in this
    process, or a VM-clone instance (each process a VM of a pool started for the run)."""
    sink = sink or CaptureSink()
    config = config or VmConfig(timeout=VM_TIMEOUT, tty=False)
    t0 = time.perf_counter()
    if mode.startswith("vmclone"):
        r = run_vmclone(path, args, config=config, sink=sink, transport=mode.split("-")[1])
    else:
        r = run_vm(path, args, config=config, sink=sink, fork=mode)
    wall = time.perf_counter() - t0
    if r.outcome != "exited" or r.exit_code != 0:
        raise BenchError(
            f"VM {path.name} {' '.join(args)}: {r.outcome}, exit {r.exit_code}\n"
            + "\n".join(r.reports)
            + "\n"
            + sink.stderr.decode(errors="replace")
        )
    return Run(sink.stdout.decode(errors="replace"), wall, r)


def floats(stdout: str, key: str) -> list[float]:
    """Every ``key=<float>`` at the start of a line."""
    vals = [float(m) for m in re.findall(rf"^{re.escape(key)}=([0-9.eE+-]+)$", stdout, re.M)]
    if not vals:
        raise BenchError(f"no {key}= line in output:\n{stdout[-500:]}")
    return vals


def interleave(
    label: str, sides: dict[str, tuple[Callable[[], Run], int]], warmup: int, progress: ProgressBar
) -> dict[str, list[Run]]:
    """``warmup`` discarded runs of each side, then the kept runs, interleaved.

    Each side's runs are spread evenly over the rounds, so slow spells of a
    noisy host hit every side alike instead of whichever ran during them.
    """
    if warmup:
        progress.step(f"{label}: {warmup} warm-up run(s) of {', '.join(sides)}")
        for _ in range(warmup):
            for fn, _runs in sides.values():
                fn()
    out: dict[str, list[Run]] = {name: [] for name in sides}
    rounds = max(runs for _fn, runs in sides.values())
    every = max(1, rounds // 4)
    for i in range(rounds):
        if i % every == 0 or i == rounds - 1:
            progress.step(
                f"{label}: round {i + 1}/{rounds} "
                f"({', '.join(f'{n} x{r}' for n, (_f, r) in sides.items())})"
            )
        for name, (fn, runs) in sides.items():
            # runs of this side due by the end of round i
            while len(out[name]) < (i + 1) * runs // rounds:
                out[name].append(fn())
    return out


# -- results -----------------------------------------------------------------------------


@dataclass
class Target:
    """``vm`` (the VM figure) or ``ratio`` (VM/native) compared with ``limit``."""

    on: str  # "vm" | "ratio"
    op: str  # "<=" | ">="
    limit: float
    text: str

    def check(self, vm: float, ratio: float | None) -> tuple[bool, float]:
        """(met, factor by which the figure is off: > 1 means missed by that much)."""
        value = vm if self.on == "vm" else ratio
        if value is None:
            raise ValueError("no value to check")
        factor = value / self.limit if self.op == "<=" else self.limit / value
        return factor <= 1.0, factor


@dataclass
class Row:
    key: str
    name: str
    unit: str
    native: float | None
    vm: float
    target: Target | None = None
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    met: bool | None = None
    off_by: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.vm / self.native if self.native else None

    def evaluate(self) -> Row:
        if self.target is not None:
            self.met, self.off_by = self.target.check(self.vm, self.ratio)
        return self

    def mark(self) -> str:
        if self.met is None:
            return "-"
        if self.met:
            return "PASS"
        return f"MISS ({self.off_by:.2f}x)"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        if value >= 1:
            return f"{value:.3f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} us"
    if unit == "us":
        return f"{value:.3f} us" if value < 10 else f"{value:.1f} us"
    if unit == "ns":
        return f"{value:.2f} ns" if value < 1000 else f"{value / 1e3:.3f} us"
    if unit == "MiB/s":
        return f"{value:.1f} MiB/s"
    if unit == "KiB":
        return f"{value:.1f} KiB"
    return f"{value:g} {unit}"


def _median(xs: Sequence[float]) -> float:
    """The median of a benchmark's samples (every benchmark takes some)."""
    m = median(xs)
    if m is None:
        raise BenchError("no samples to take a median of")
    return m


def sample_note(label: str, xs: Sequence[float], unit: str) -> str:
    q = p95(xs)
    extra = f", p95 {fmt(q, unit)}" if q is not None else ""
    return f"{label}: n={len(xs)}, median {fmt(median(xs), unit)}{extra}"


# -- the benchmarks ----------------------------------------------------------------------


@dataclass
class Params:
    quick: bool
    #: the CPUs this process could use before it pinned itself to one; None if not pinned
    all_cpus: set[int] | None
    #: the VMs' time slice in microseconds (``--quantum``; 0: cooperative), None: default
    quantum: int | None = None
    #: the fork mode of the VM side (``--fork``)
    fork: str = "thread"

    def config(self) -> VmConfig:
        """The VM configuration every VM side runs with."""
        config = VmConfig(timeout=VM_TIMEOUT, tty=False)
        if self.quantum is not None:
            config.quantum = self.quantum
        return config

    def pick(self, quick: int, full: int) -> int:
        return quick if self.quick else full


class Bench:
    def __init__(self, params: Params, progress: ProgressBar) -> None:
        self.p = params
        self.progress = progress
        self.images: dict[str, Path] = {}

    def image(self, name: str) -> Path:
        if name not in self.images:
            self.images[name] = build_image(name)
        return self.images[name]

    def native(self, img: Path, args: Sequence[str] = ()) -> Callable[[], Run]:
        return lambda: run_native(img, args)

    def vm(self, img: Path, args: Sequence[str] = (), mode: str | None = None) -> Callable[[], Run]:
        """A VM run of ``img`` in ``mode`` (default ``--fork``), with ``--quantum``."""
        return lambda: run_in_vm(img, args, config=self.p.config(), mode=mode or self.p.fork)

    # 1 -----------------------------------------------------------------------------
    def _call_loop(self, program: str, label: str) -> tuple[dict[str, list[Run]], int, int, int]:
        """``program N`` in a VM and natively, interleaved: (runs by side, runs, VM N,
        native N); the program times its N calls itself."""
        img = self.image(program)
        vm_n, nat_n = self.p.pick(100_000, 200_000), self.p.pick(1_000_000, 2_000_000)
        runs = self.p.pick(5, 9)
        out = interleave(
            f"{label}: {program}",
            {
                "vm": (self.vm(img, [str(vm_n)]), runs),
                "native": (self.native(img, [str(nat_n)]), runs),
            },
            1,
            self.progress,
        )
        return out, runs, vm_n, nat_n

    def syscall(self) -> list[Row]:
        out, runs, vm_n, nat_n = self._call_loop("getppid_loop", "syscall")
        vm_us = [floats(r.stdout, "ns_per_call")[0] / 1e3 for r in out["vm"]]
        nat_us = [floats(r.stdout, "ns_per_call")[0] / 1e3 for r in out["native"]]
        syscalls = [
            r.vm_result.syscalls for r in out["vm"] if r.vm_result.syscalls is not None
        ]  # a thread-fork VM counts them
        return [
            Row(
                "syscall",
                "1 syscall round trip (getppid)",
                "us",
                _median(nat_us),
                _median(vm_us),
                Target("vm", "<=", 3.0, "VM <= 3 us/call"),
                notes=[
                    f"VM {runs} runs x {vm_n} calls, native {runs} runs x {nat_n} calls "
                    "(+1 warm-up run each); ns_per_call measured inside the program",
                    f"per-run VM: {', '.join(f'{x:.3f}' for x in vm_us)} us",
                    f"per-run native: {', '.join(f'{x:.3f}' for x in nat_us)} us",
                    f"VM syscalls per run (RunResult): {min(syscalls)}..{max(syscalls)}",
                ],
                samples={"vm_us_per_call": vm_us, "native_us_per_call": nat_us},
            )
        ]

    # 1c ----------------------------------------------------------------------------
    def clock(self) -> list[Row]:
        """clock_gettime(CLOCK_MONOTONIC) through libc (the vDSO) and as a raw syscall,
        timed inside ``clock_loop``, in a thread-fork VM and natively."""
        out, runs, vm_n, nat_n = self._call_loop("clock_loop", "clock")
        rows = []
        for key, name in (
            ("ns_per_libc_call", "clock_gettime through libc (the vDSO)"),
            ("ns_per_syscall", "clock_gettime as a syscall (no vDSO)"),
        ):
            vm_us = [floats(r.stdout, key)[0] / 1e3 for r in out["vm"]]
            nat_us = [floats(r.stdout, key)[0] / 1e3 for r in out["native"]]
            rows.append(
                Row(
                    "clock" if key == "ns_per_libc_call" else "clock_syscall",
                    f"1c {name}",
                    "us",
                    _median(nat_us),
                    _median(vm_us),
                    notes=[
                        f"VM {runs} runs x {vm_n} calls, native {runs} runs x {nat_n} calls "
                        "(+1 warm-up run each); measured inside the program",
                        f"per-run VM: {', '.join(f'{x:.3f}' for x in vm_us)} us",
                        f"per-run native: {', '.join(f'{x:.3f}' for x in nat_us)} us",
                    ],
                    samples={"vm_us_per_call": vm_us, "native_us_per_call": nat_us},
                )
            )
        return rows

    # 1b ----------------------------------------------------------------------------
    def signal(self) -> list[Row]:
        """kill(self) -> handler entry -> rt_sigreturn, natively and in a VM of each fork
        mode (thread, copy, VM-clone over shm and tcp; a VM-clone process with a handler
        always runs in time slices, see docs/semantics.md), interleaved in one run."""
        img = self.image("signals")
        vm_n, nat_n = self.p.pick(2_000, 5_000), self.p.pick(100_000, 200_000)
        runs = self.p.pick(5, 9)
        args = ["roundtrip", str(vm_n), "-t"]
        sides = {mode: (self.vm(img, args, mode), runs) for mode in VM_MODES}
        sides["native"] = (self.native(img, ["roundtrip", str(nat_n), "-t"]), runs)
        out = interleave("signal: signals roundtrip", sides, 1, self.progress)
        nat_us = [floats(r.stdout, "signal_roundtrip_us")[0] for r in out["native"]]
        rows = []
        for mode in VM_MODES:
            vm_us = [floats(r.stdout, "signal_roundtrip_us")[0] for r in out[mode]]
            rows.append(
                Row(
                    "signal" if mode == "thread" else f"signal_{mode.replace('-', '_')}",
                    f"1b signal round trip (kill, handler, sigreturn), {mode}",
                    "us",
                    _median(nat_us),
                    _median(vm_us),
                    notes=[
                        f"VM ({mode}) {runs} runs x {vm_n} signals, native {runs} runs x "
                        f"{nat_n} (+1 warm-up run each); measured inside the program",
                        f"per-run VM: {', '.join(f'{x:.3f}' for x in vm_us)} us",
                        f"per-run native: {', '.join(f'{x:.3f}' for x in nat_us)} us",
                    ],
                    samples={"vm_us_per_signal": vm_us, "native_us_per_signal": nat_us},
                )
            )
        return rows

    # 2 -----------------------------------------------------------------------------
    def hello(self) -> list[Row]:
        img = self.image("hello")
        expected = "Hello, unikernel!\n"
        unifork = Path(sys.executable).parent / "unifork"
        if not unifork.exists():
            unifork = Path(shutil.which("unifork") or "unifork")

        def cli() -> Run:
            # as a user would start it: on every CPU, not the benchmark's one
            with affinity(self.p.all_cpus):
                t0 = time.perf_counter()
                p = subprocess.run(
                    [str(unifork), "run", "hello"],
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    timeout=60,
                    check=False,
                )
                wall = time.perf_counter() - t0
            if p.returncode != 0 or p.stdout != expected:
                raise BenchError(
                    f"unifork run hello: exit {p.returncode}, stdout "
                    f"{p.stdout!r}, stderr {p.stderr.strip()!r}"
                )
            return Run(p.stdout, wall)

        def checked(fn: Callable[[], Run], what: str) -> Callable[[], Run]:
            def go() -> Run:
                r = fn()
                if r.stdout != expected:
                    raise BenchError(f"{what} hello printed {r.stdout!r}")
                return r

            return go

        out = interleave(
            "hello",
            {
                "cli": (cli, self.p.pick(10, 30)),
                "vm": (checked(self.vm(img), "VM"), self.p.pick(50, 200)),
            },
            3,
            self.progress,
        )
        # Not interleaved: on some hosts (seen in a Firecracker guest) a process
        # started just after a VM's 64 MiB were unmapped is sometimes ~1 ms
        # slower, which would charge the VM's cost to the native reference.
        time.sleep(0.2)
        out |= interleave(
            "hello: native",
            {"native": (checked(self.native(img), "native"), self.p.pick(50, 200))},
            3,
            self.progress,
        )
        c = [r.wall for r in out["cli"]]
        v = [r.wall for r in out["vm"]]
        loop = [r.vm_result.elapsed for r in out["vm"]]
        n = [r.wall for r in out["native"]]
        nat = _median(n)
        return [
            Row(
                "hello_cli",
                "2 `unifork run hello` process wall",
                "s",
                nat,
                _median(c),
                Target("vm", "<=", 0.25, "VM <= 0.25 s"),
                notes=[
                    sample_note("unifork run hello (subprocess)", c, "s"),
                    sample_note("native hello process (spawn + wait)", n, "s"),
                    f"CLI: {unifork}; 3 warm-up runs of each",
                ],
                samples={"vm_cli_wall_s": c, "native_process_wall_s": n},
            ),
            Row(
                "hello_inproc",
                "2 run_vm(hello) in a running process",
                "s",
                nat,
                _median(v),
                Target("vm", "<=", 0.010, "VM <= 10 ms"),
                notes=[
                    sample_note("create_vm + run + close", v, "s"),
                    sample_note("of which Kernel.run (RunResult.elapsed)", loop, "s"),
                ],
                samples={"vm_inproc_wall_s": v, "vm_run_loop_s": loop, "native_process_wall_s": n},
            ),
        ]

    # 3 -----------------------------------------------------------------------------
    def cpu(self) -> list[Row]:
        img = self.image("cpu_loop")
        vm_n, nat_n = self.p.pick(300_000, 1_000_000), self.p.pick(10_000_000, 30_000_000)
        # same output in both worlds for the same N (the checksum depends only on N)
        self.progress.step("cpu: checking VM output against native")
        for check_n in ("1", "20000"):
            if run_in_vm(img, [check_n]).stdout != run_native(img, [check_n]).stdout:
                raise BenchError("cpu_loop: VM and native outputs differ")
        out = interleave(
            "cpu: cpu_loop",
            {
                "vm": (self.vm(img, [str(vm_n)]), self.p.pick(3, 5)),
                "native": (self.native(img, [str(nat_n)]), self.p.pick(5, 7)),
            },
            1,
            self.progress,
        )
        vm_ns = [r.wall / vm_n * 1e9 for r in out["vm"]]
        nat_ns = [r.wall / nat_n * 1e9 for r in out["native"]]
        return [
            Row(
                "cpu_loop",
                "3 cpu_loop time per round",
                "ns",
                _median(nat_ns),
                _median(vm_ns),
                notes=[
                    f"wall time of the whole run / N; VM N={vm_n} ({len(vm_ns)} runs), "
                    f"native N={nat_n} ({len(nat_ns)} runs), +1 warm-up each; "
                    "start-up is ~1% of either",
                    f"VM runs: {', '.join(fmt(r.wall, 's') for r in out['vm'])}",
                    f"native runs: {', '.join(fmt(r.wall, 's') for r in out['native'])}",
                ],
                samples={"vm_ns_per_round": vm_ns, "native_ns_per_round": nat_ns},
            )
        ]

    # 4 -----------------------------------------------------------------------------
    def fork(self) -> list[Row]:
        img = self.image("fork_time")
        forks, runs = self.p.pick(50, 100), self.p.pick(4, 20)
        args = ["-n", str(forks)]
        out = interleave(
            f"fork: fork_time -n {forks}",
            {"vm": (self.vm(img, args), runs), "native": (self.native(img, args), runs)},
            1,
            self.progress,
        )
        # the first fork of each program run is its own warm-up (cold caches, JIT)
        vm_us = [x for r in out["vm"] for x in floats(r.stdout, "fork_us")[1:]]
        nat_us = [x for r in out["native"] for x in floats(r.stdout, "fork_us")[1:]]
        per_run = [median(floats(r.stdout, "fork_us")[1:]) for r in out["vm"]]
        return [
            Row(
                "fork",
                "4 fork, parent side (fork_time)",
                "us",
                _median(nat_us),
                _median(vm_us),
                Target("ratio", "<=", 1.0, "<= 1.0x native"),
                notes=[
                    sample_note("VM", vm_us, "us"),
                    sample_note("native", nat_us, "us"),
                    f"{runs} program runs x {forks} forks each side (+1 warm-up run), "
                    "first fork of each run dropped",
                    f"VM median per program run: {', '.join(f'{x:.0f}' for x in per_run)} us",
                    "reference: thesis (Rumprun) 7.5x native, a peer emulator 148x",
                ],
                samples={"vm_fork_us": vm_us, "native_fork_us": nat_us},
            )
        ]

    # 5 -----------------------------------------------------------------------------
    def fork_wait(self) -> list[Row]:
        img = self.image("fork_exit_wait")
        runs = self.p.pick(3, 20)
        args = ["-t", "-n", "100"]

        def checked(fn: Callable[[], Run]) -> Callable[[], Run]:
            def go() -> Run:
                r = fn()
                if not r.stdout.endswith("ok 100 children\n"):
                    raise BenchError(f"fork_exit_wait: no ok line:\n{r.stdout[-300:]}")
                return r

            return go

        out = interleave(
            "fork+exit+wait: fork_exit_wait -t",
            {
                "vm": (checked(self.vm(img, args)), runs),
                "native": (checked(self.native(img, args)), runs),
            },
            1,
            self.progress,
        )
        vm_us = [x for r in out["vm"] for x in floats(r.stdout, "fork_wait_us")[1:]]
        nat_us = [x for r in out["native"] for x in floats(r.stdout, "fork_wait_us")[1:]]
        return [
            Row(
                "fork_exit_wait",
                "5 fork + _exit(i%7) + waitpid",
                "us",
                _median(nat_us),
                _median(vm_us),
                Target("ratio", "<=", 3.0, "<= 3x native"),
                notes=[
                    sample_note("VM", vm_us, "us"),
                    sample_note("native", nat_us, "us"),
                    f"{runs} program runs x 100 iterations each side (+1 warm-up run), "
                    "first iteration of each run dropped; every status checked",
                ],
                samples={"vm_fork_wait_us": vm_us, "native_fork_wait_us": nat_us},
            )
        ]

    # 6 -----------------------------------------------------------------------------
    def pipe(self) -> list[Row]:
        bw = self.image("pipe_bw")
        runs = self.p.pick(5, 15)
        args = ["-m", "64"]
        sides: dict[str, tuple[Callable[[], Run], int]] = {
            "vm": (self.vm(bw, args), runs),
            "native": (self.native(bw, args), runs),
        }
        if self.p.all_cpus is not None:  # the other baseline, for information
            sides["unpinned"] = (lambda: run_native(bw, args, self.p.all_cpus), runs)
        out = interleave("pipe: pipe_bw -m 64", sides, 1, self.progress)
        for r in (x for runs_ in out.values() for x in runs_):
            if not r.stdout.startswith("bytes=67108864 blocks=1024\n"):
                raise BenchError(f"pipe_bw: unexpected output {r.stdout!r}")
        bws = {k: [floats(r.stdout, "mib_per_s")[0] for r in v] for k, v in out.items()}
        pinned = self.p.all_cpus is not None
        rows = [
            Row(
                "pipe_bw",
                "6 pipe 64 MiB in 64 KiB writes (pipe_bw)",
                "MiB/s",
                _median(bws["native"]),
                _median(bws["vm"]),
                Target("ratio", ">=", 0.5, ">= 0.5x native"),
                notes=[
                    f"{runs} runs each (+1 warm-up); first read to EOF, measured inside "
                    "the program; native "
                    + ("pinned to the benchmark's CPU" if pinned else "not pinned"),
                    *(
                        f"{k} runs: {', '.join(f'{x:.0f}' for x in v)} MiB/s"
                        for k, v in bws.items()
                    ),
                ],
                samples={f"{k}_mib_per_s": v for k, v in bws.items()},
            )
        ]
        if pinned:
            rows.append(
                Row(
                    "pipe_bw_unpinned",
                    "6 pipe_bw, native not pinned (info)",
                    "MiB/s",
                    _median(bws["unpinned"]),
                    _median(bws["vm"]),
                    notes=[
                        "native parent and child free to run on different CPUs (cross-CPU "
                        "wake-ups can make it bimodal: 0.7..3.3 GiB/s seen)"
                    ],
                    samples={"unpinned_mib_per_s": bws["unpinned"]},
                )
            )

        pt = self.image("pipe_throughput")
        mib = self.p.pick(16, 64)
        targs = ["-t", "-m", str(mib)]
        out = interleave(
            f"pipe: pipe_throughput -m {mib}",
            {
                "vm": (self.vm(pt, targs), self.p.pick(1, 3)),
                "native": (self.native(pt, targs), self.p.pick(3, 5)),
            },
            1,
            self.progress,
        )
        if len({r.stdout.splitlines()[0] for runs_ in out.values() for r in runs_}) != 1:
            raise BenchError("pipe_throughput: VM and native checksums differ")
        tvm = [floats(r.stdout, "mib_per_s")[0] for r in out["vm"]]
        tnat = [floats(r.stdout, "mib_per_s")[0] for r in out["native"]]
        rows.append(
            Row(
                "pipe_throughput",
                f"6 pipe {mib} MiB, every byte checked (pipe_throughput)",
                "MiB/s",
                _median(tnat),
                _median(tvm),
                notes=[
                    f"fork to reaped child; VM {len(tvm)} runs, native {len(tnat)} "
                    "runs (+1 warm-up); CPU-bound in the emulator (checks and hashes "
                    "every byte)"
                ],
                samples={"vm_mib_per_s": tvm, "native_mib_per_s": tnat},
            )
        )
        return rows

    # 7 -----------------------------------------------------------------------------
    def memory(self) -> list[Row]:
        img = self.image("children_blocked")
        n = 32
        config = VmConfig(timeout=VM_TIMEOUT, tty=False)
        stack = config.stack_size
        runs = self.p.pick(2, 5)

        class RssSink(CaptureSink):
            """Samples this process's RSS when the parent reports all children alive."""

            rss: int | None = None

            def __call__(self, pid: int, fd: int, data: bytes) -> None:
                super().__call__(pid, fd, data)
                if b"children=" in data and self.rss is None:
                    self.rss = host_rss()

        def one(count: int) -> tuple[int, int]:
            """(peak guest memory, host RSS growth from before the VM to the children= line)"""
            sink = RssSink()
            gc.collect()
            before = host_rss()
            r = run_in_vm(img, ["-n", str(count)], sink=sink, config=config)
            if r.stdout != f"children={count}\nreaped={count}\n":
                raise BenchError(f"children_blocked: unexpected output {r.stdout!r}")
            if sink.rss is None:
                raise BenchError("children_blocked: no children= line seen")
            return r.vm_result.peak_memory, sink.rss - before

        self.progress.step(f"memory: native children_blocked -n {n} (sanity check)")
        nat = run_native(img, ["-n", str(n)])
        if nat.stdout != f"children={n}\nreaped={n}\n":
            raise BenchError(f"native children_blocked: unexpected output {nat.stdout!r}")
        one(n)  # warm-up: first-time imports and allocations in this process
        peak0, peak32, rss0, rss32 = [], [], [], []
        for i in range(runs):
            self.progress.step(f"memory: VM children_blocked -n 0 / -n {n}, run {i + 1}/{runs}")
            a, b = one(0), one(n)
            peak0.append(a[0])
            rss0.append(a[1])
            peak32.append(b[0])
            rss32.append(b[1])
        per_child = [(b - a) / n / KIB for a, b in zip(peak0, peak32, strict=True)]
        rss_child = [(b - a) / n / KIB for a, b in zip(rss0, rss32, strict=True)]
        limit = (stack + 16 * KIB) / KIB
        return [
            Row(
                "mem_per_child",
                "7 guest memory committed per blocked child",
                "KiB",
                None,
                _median(per_child),
                Target("vm", "<=", limit, f"<= stack + 16 KiB = {limit:.0f} KiB"),
                notes=[
                    f"(peak_memory(N={n}) - peak_memory(N=0)) / {n}, {runs} runs; "
                    f"peak N=0: {_median(peak0) / KIB:.0f} KiB, N={n}: "
                    f"{_median(peak32) / KIB:.0f} KiB; stack_size {stack // KIB} KiB",
                    "native run of the same program checked (children= / reaped= lines)",
                ],
                samples={
                    "peak_memory_n0": [float(x) for x in peak0],
                    f"peak_memory_n{n}": [float(x) for x in peak32],
                    "per_child_kib": per_child,
                },
            ),
            Row(
                "rss_per_child",
                "7 host RSS growth per blocked child (info)",
                "KiB",
                None,
                _median(rss_child),
                notes=[
                    f"growth of this process's RSS from before the VM to the `children=` "
                    f"line, (N={n} - N=0) / {n}; includes the Python objects per process "
                    "and guest pages touched; noisy",
                    f"per run: {', '.join(f'{x:.1f}' for x in rss_child)} KiB",
                ],
                samples={
                    "rss_n0": [float(x) for x in rss0],
                    f"rss_n{n}": [float(x) for x in rss32],
                    "per_child_kib": rss_child,
                },
            ),
        ]


def host_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


BENCHMARKS: dict[str, Callable[[Bench], list[Row]]] = {
    "syscall": Bench.syscall,
    "signal": Bench.signal,
    "clock": Bench.clock,
    "hello": Bench.hello,
    "cpu": Bench.cpu,
    "fork": Bench.fork,
    "fork_wait": Bench.fork_wait,
    "pipe": Bench.pipe,
    "memory": Bench.memory,
}


# -- machine info, table, JSON ---------------------------------------------------------------


def machine_info() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import unicorn

        uc = unicorn.__version__
    except Exception:  # noqa: BLE001 - informational only
        uc = "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "unicorn": uc,
        "platform": platform.platform(),
        "kernel": platform.release(),
        "git_commit": commit,
    }


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.3f}x" if r < 1 else f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def table(rows: list[Row]) -> str:
    head = ("benchmark", "native", "VM", "VM/native", "target", "result")
    body = [
        (
            r.name,
            fmt(r.native, r.unit),
            fmt(r.vm, r.unit),
            fmt_ratio(r.ratio),
            r.target.text if r.target else "(none)",
            r.mark(),
        )
        for r in rows
    ]
    return "\n".join(grid(head, body, {1, 2, 3}))


def _chosen_cpu(parser: argparse.ArgumentParser, spec: str, all_cpus: set[int]) -> int | None:
    """The CPU ``--cpu`` names (auto: the first one we may use), None for 'none'."""
    if spec == "none":
        return None
    if spec == "auto":
        return min(all_cpus)
    try:
        cpu = int(spec)
    except ValueError:
        parser.error(f"--cpu: not a CPU number or 'none': {spec!r}")
    if cpu not in all_cpus:
        parser.error(f"--cpu: CPU {cpu} is not available to this process")
    return cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer and shorter runs (< 60 s); the full run takes a few minutes",
    )
    parser.add_argument("--json", metavar="FILE", help="also write raw samples and machine info")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="KEY",
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--cpu",
        default="auto",
        metavar="CPU|none",
        help="pin the benchmark, and so the VMs and the native runs, to this "
        "CPU (default: the first one this process may use); 'none' "
        "leaves the native processes free to spread over all CPUs",
    )
    parser.add_argument(
        "--quantum",
        type=int,
        metavar="US",
        help="the VMs' time slice in microseconds (0: cooperative, as unifork run's "
        "--quantum); default: the VM's default",
    )
    parser.add_argument(
        "--fork",
        choices=VM_MODES,
        default="thread",
        help="the fork mode of the VM side (the signal rows run every mode)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if a.quiet else logging.INFO,
        stream=sys.stderr,
        format="bench: %(message)s",
    )
    # the VM's own warnings (e.g. unsupported syscalls) still show; its info chatter does not
    logging.getLogger("tender_service").setLevel(logging.WARNING)

    names = a.only or list(BENCHMARKS)
    progress = ProgressBar(1 + len(names), enabled=not a.quiet)  # the images, each benchmark
    info = machine_info()  # before pinning: cores_available is what we were given
    all_cpus = os.sched_getaffinity(0)
    cpu = _chosen_cpu(parser, a.cpu, all_cpus)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    bench = Bench(
        Params(
            quick=a.quick,
            all_cpus=all_cpus if cpu is not None else None,
            quantum=a.quantum,
            fork=a.fork,
        ),
        progress,
    )
    started = time.time()
    t0 = time.perf_counter()
    rows: list[Row] = []
    failures: dict[str, str] = {}
    with progress.logging():
        progress.step("building (or reusing) guest images")
        for prog in PROGRAMS:
            bench.image(prog)
        progress.advance()
        for name in names:
            try:
                rows += [r.evaluate() for r in BENCHMARKS[name](bench)]
            except (BenchError, subprocess.TimeoutExpired) as e:
                log.error("%s failed: %s", name, e)
                failures[name] = str(e)
            progress.advance()
        progress.finish()
    duration = time.perf_counter() - t0

    print(
        f"unifork comparison ({'quick' if a.quick else 'full'}), {duration:.1f} s; "
        f"{info['cpu_model']}, {info['cores_available']}/{info['cores']} cores, "
        f"Python {info['python']}, unicorn {info['unicorn']}"
    )
    print(
        "VMs and native runs "
        + (f"pinned to CPU {cpu}" if cpu is not None else "not pinned")
        + f"; VM side: {a.fork} fork, quantum "
        + ("default" if a.quantum is None else f"{a.quantum} us")
        + "; VM/native > 1 means the VM is slower "
        "(times) or faster (MiB/s); MISS (k x) = off the target by a factor k"
    )
    print()
    print(table(rows))
    print()
    for r in rows:
        print(f"{r.name}:")
        for note in r.notes:
            print(f"    {note}")
    for name, err in failures.items():
        print(f"FAILED {name}: {err.splitlines()[0] if err else ''}")
    missed = [r for r in rows if r.met is False]
    print()
    print(
        f"targets: {sum(r.met is True for r in rows)} met, {len(missed)} missed"
        + (": " + ", ".join(f"{r.key} ({r.off_by:.2f}x)" for r in missed) if missed else "")
    )

    if a.json:
        doc = {
            "mode": "quick" if a.quick else "full",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": duration,
            "machine": info,
            "pinned_cpu": cpu,
            "fork": a.fork,
            "quantum": a.quantum,
            "results": [
                {
                    **{k: v for k, v in asdict(r).items() if k != "target"},
                    "ratio": r.ratio,
                    "target": asdict(r.target) if r.target else None,
                }
                for r in rows
            ],
            "failures": failures,
        }
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        log.info("wrote %s", a.json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

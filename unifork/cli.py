"""``unifork``: the command line (a thin shell over the library)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field

from tender_service.instance.modes import FORK_MODES, ONE_VM_MODES
from tender_service.machine.errors import ImageError
from tender_service.rump import signals
from tender_service.rump.vminfo import DEFAULT_QUANTUM, FORK_PHASES, RunResult
from unifork import logs
from unifork.args import UsageError, check_files, check_target

log = logging.getLogger("unifork")


def parse_size(text: str) -> int:
    """'64M', '1G', '512k' or a byte count (K, M, G: powers of 1024).

    Kept by hand on purpose: ``humanfriendly.parse_size(text, binary=True)`` reads the same
    sizes the same way, but argparse converts the string defaults on every command, so its
    import (~30 ms) would land on every ``unifork run`` (a figure comparison/bench measures).
    """
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def cmd_run(a: argparse.Namespace) -> int:
    """``unifork run``.  A one-VM instance runs in a forked child of this process, so
    that an emulator crash (unicorn-engine/unicorn#2240) ends with a clear report
    and the service's status for a lost VM (SIGKILL, 137), not a silent SIGSEGV.

    The fork comes before the emulator and the kernel are imported (this module
    imports neither): the child imports them into pages of its own.  Imported
    here, they were shared copy-on-write, and the guest's first fork paid a host
    page fault for every page of them its Python wrote (refcounts): +265 us median
    on listing 4.1's one fork, 20 interleaved runs each way (issue 17)."""
    if a.fork not in ONE_VM_MODES:  # its VMs run in pool processes already
        return _run(a)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _run(a)
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # never hidden: os._exit below would drop it silently
            print("unifork: internal error:", file=sys.stderr)
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C goes to the child, which decides
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, old)
    if os.WIFSIGNALED(status):
        from tender_service.vm import lost_vm_report

        print(f"unifork: {lost_vm_report(pid, status)}", file=sys.stderr)
        return signals.shell_code(signals.signaled_status(signals.SIGKILL))
    return os.waitstatus_to_exitcode(status)


class _PublishedPrinter:
    """Says on stderr where each published port listens before the guest starts:
    with ``-p 0:GUEST`` the host picks the port, and this line is how a user (or a
    script) learns it."""

    def published(self, bound: list[tuple[str, int, int]]) -> None:
        for ip, port, guest in bound:
            host = f"[{ip}]" if ":" in ip else ip
            print(f"unifork: published {host}:{port} -> guest port {guest}", file=sys.stderr)
        sys.stderr.flush()


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM while a VM-clone instance runs: unwind through ``run_instance``'s and
    ``_run``'s ``finally``, which kill the guest processes and release the pool, the
    pipe rings and the wake-up FIFOs in /dev/shm (the default action leaves those)."""
    raise SystemExit(128 + signum)


def _run(a: argparse.Namespace) -> int:
    from tender_service.instance.backends import (
        BackendContext,
        InstanceSpec,
        make_backend,
        run_instance,
    )
    from tender_service.instance.pool import PoolStartError
    from tender_service.instance.publish import PortMapping, PublishError, parse_outbound
    from tender_service.rump.vminfo import VmConfig
    from tender_service.toolchain.images import ImageNotFoundError, resolve_image
    from tender_service.vm import stdio_sink

    if a.trace_syscalls:
        logging.getLogger("tender_service.rump.kernel").setLevel(logging.INFO)
    try:
        path = resolve_image(a.image)
    except (ImageNotFoundError, OSError) as e:
        print(f"unifork: {e}", file=sys.stderr)
        return 2
    config = VmConfig(
        ram=a.mem,
        stack_size=a.stack,
        timeout=a.timeout,
        quantum=a.quantum,
        max_procs=a.max_procs,
        tty=a.console == "tty",
        trace_syscalls=a.trace_syscalls,
    )
    # read when the guest reads, as much as it asks (a file, /dev/null, a pipe, a tty);
    # the fd stays blocking: its description is shared with the user's shell
    stdin = None if a.stdin == "none" or sys.stdin is None else sys.stdin.fileno()
    try:
        publish = [PortMapping.parse(text) for text in a.publish]
        outbound = [parse_outbound(text) for text in a.allow_outbound]
    except PublishError as e:
        print(f"unifork: {e}", file=sys.stderr)
        return 2
    backend = make_backend(a.fork, BackendContext(pool_size=a.pool))
    if not backend.one_vm and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # this process holds the instance
    # argv[0]: one VM names the program after its image file, VM-clone as typed
    spec = InstanceSpec(
        path,
        a.args,
        a.env or None,
        config,
        argv0=None if backend.one_vm else a.image,
        stdin=stdin,
        transport=a.pipe,
        publish=publish,
        outbound=outbound,
    )
    try:
        result = run_instance(backend, spec, stdio_sink(a.tag_pids), _PublishedPrinter())
    except (ImageError, ValueError) as e:
        print(f"unifork: {e}", file=sys.stderr)
        return 2
    except PoolStartError as e:
        print(f"unifork: no VM-clone pool: {e}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    for r in result.reports:
        print(f"unifork: {r}", file=sys.stderr)
    if a.ps:
        print("unifork: process table at exit:", file=sys.stderr)
        print(f"{'PID':>6} {'PPID':>6} {'STATE':<8} STATUS", file=sys.stderr)
        for p in result.processes:
            st = "" if p.status is None else signals.describe_status(p.status)
            print(f"{p.pid:>6} {p.ppid:>6} {p.state:<8} {st}  {p.name}", file=sys.stderr)
    if a.stats:
        _print_stats(result)
    return result.exit_code


def _print_stats(result: RunResult) -> None:
    """``run --stats``: how the instance ended, its forks (VM-clone does not count
    syscalls: they happen in many VMs)."""
    extra = (
        f", {result.syscalls} syscalls, peak guest memory {result.peak_memory} bytes"
        if result.syscalls is not None
        else ""
    )
    print(
        f"unifork: {result.outcome}, {result.elapsed * 1e3:.1f} ms, {result.forks} forks{extra}",
        file=sys.stderr,
    )
    if result.fork_seconds:
        print(f"unifork: {fork_kernel_text(result.fork_seconds)}", file=sys.stderr)
    if result.fork_phases:
        print(f"unifork: VM-clone fork, median ms: {fork_breakdown(result)}", file=sys.stderr)


def fork_kernel_text(seconds: list[float]) -> str:
    """The forks' time in the parent's kernel: the first fork apart (a fresh VM's) and
    the median of the others (``RunResult.fork_seconds``)."""
    text = f"fork in the kernel: 1st {seconds[0] * 1e6:.1f} us"
    if len(seconds) > 1:
        text += (
            f", the other {len(seconds) - 1} median {statistics.median(seconds[1:]) * 1e6:.1f} us"
        )
    return text


def fork_breakdown(result: RunResult) -> str:
    """The median of each step of the instance's VM-clone forks (``RunResult.fork_phases``)."""
    phases = result.fork_phases or []
    return ", ".join(
        f"{name} {statistics.median(p[name] for p in phases) * 1e3:.2f}" for name in FORK_PHASES
    )


def cmd_cc(a: argparse.Namespace, rest: list[str]) -> int:
    from tender_service.toolchain.cc import cc_main

    return cc_main(rest)


def cmd_bake(a: argparse.Namespace) -> int:
    """``unifork bake``: the analogue of rumprun-bake (tender_service/toolchain/bake.py)."""
    from pathlib import Path

    from tender_service.toolchain.bake import bake, split_spec

    try:
        rootfs = bake(
            Path(a.output),
            [split_spec(s, "--bin") for s in a.bin],
            [split_spec(s, "--dir") for s in a.dir],
            [split_spec(s, "--file") for s in a.file],
        )
    except ValueError as e:  # BakeError, ImageError: what cannot be baked, and why
        print(f"unifork: {e}", file=sys.stderr)
        return 2
    print(
        f"{a.output}: {len(rootfs.programs)} programs ({', '.join(rootfs.programs)}), "
        f"{len(rootfs.entries)} entries, {Path(a.output).stat().st_size} bytes"
    )
    return 0


def _show_image(a: argparse.Namespace) -> int:
    """``unifork images FILE``: what a baked image (or an ELF) holds."""
    import hashlib
    from pathlib import Path

    from tender_service.machine.rootfs import FORMAT_MAJOR, FORMAT_MINOR, describe, parse_image

    try:
        data = Path(a.image).read_bytes()
        boot = parse_image(data, a.image)
    except OSError as e:
        print(f"unifork: {a.image}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ImageError as e:
        print(f"unifork: {e}", file=sys.stderr)
        return 2
    info: dict = {
        "path": a.image,
        "kind": "elf" if boot.rootfs is None else "baked",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if boot.rootfs is not None:
        info["format"] = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
        info["programs"] = list(boot.rootfs.programs)
        info.update(describe(boot.rootfs))
        info["tree"] = [
            {"path": e.path, "kind": e.kind, "mode": f"{e.mode:04o}", "size_bytes": len(e.data)}
            | ({"target": e.target} if e.target else {})
            for e in boot.rootfs.entries
        ]
    if a.output == "json":
        print(json.dumps(info, indent=1))
        return 0
    print(f"{a.image}: {info['kind']} image, {len(data)} bytes, sha256 {info['sha256'][:16]}")
    if boot.rootfs is None:
        return 0
    print(f"programs: {' '.join(info['programs'])}")
    print(
        f"entries: {info['entries']} ({info['files']} files, {info['dirs']} directories, "
        f"{info['symlinks']} symlinks; {info['file_bytes']} bytes of contents)"
    )
    for entry in boot.rootfs.entries:
        link = f" -> {entry.target}" if entry.target else ""
        print(f"  {entry.kind:<7} {entry.mode:04o} {len(entry.data):>9}  {entry.path}{link}")
    return 0


def cmd_images(a: argparse.Namespace) -> int:
    from tender_service.toolchain.images import build_all, list_images

    if a.image:
        if a.build:
            raise UsageError("images: --build lists the built-in images, not a file's contents")
        return _show_image(a)
    if a.build:

        def progress(name: str, done: int, total: int) -> None:
            print(f"\r[{done}/{total}] built {name:<24}", end="", file=sys.stderr, flush=True)

        build_all(progress=progress)
        print(file=sys.stderr)
    infos = list_images()
    if a.output == "json":
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "path": None if i.path is None else str(i.path),
                        "size_bytes": i.size,
                        "sha256": i.sha256,
                    }
                    for i in infos
                ],
                indent=1,
            )
        )
        return 0
    for info in infos:
        built = (
            "not built"
            if info.path is None
            else f"{info.size:>9} bytes  {(info.sha256 or '')[:16]}"
        )
        print(f"{info.name:<22} {built}")
    return 0


def cmd_syscalls(a: argparse.Namespace) -> int:
    from tender_service.rump.syscalls.table import entries, markdown

    if a.markdown:
        sys.stdout.write(markdown())
        return 0
    for e in sorted(entries(), key=lambda e: e.nr):
        print(f"{e.nr:>4} {e.name:<20} {e.support.value:<12} {e.note}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The main job so far: build the guest images, run the fork and pipe programs."""
    from tender_service.toolchain.images import build_all, build_image
    from tender_service.vm import run_vm, stdio_sink

    print("== building guest images", flush=True)
    build_all(progress=lambda n, d, t: print(f"  [{d}/{t}] {n}", flush=True))
    demos = [
        ("fork_time", []),
        ("pipe_talk", ["--write-literal"]),
        ("token_ring", []),
        ("semantics", []),
        ("fork_exit_wait", []),
    ]
    code = 0
    for name, args in demos:
        print(f"\n== unifork run {name} {' '.join(args)}  (thread fork)", flush=True)
        r = run_vm(build_image(name), args, sink=stdio_sink())
        print(
            f"-- {name}: {r.outcome}, exit {r.exit_code}, {r.forks} forks, "
            f"{r.elapsed * 1e3:.1f} ms",
            flush=True,
        )
        code = code or r.exit_code
    return code


def cmd_serve(a: argparse.Namespace) -> int:
    from tender_service.service.server import ServeOptions, serve

    check_files(a, "--token-file", "--peer-token-file", "--tls-cert", "--tls-key", "--tls-ca")
    try:
        return serve(
            ServeOptions(
                listen=a.listen,
                metrics_port=a.metrics_port,
                peers=tuple(a.peer),
                advertise=a.advertise,
                token_file=a.token_file,
                tls_cert=a.tls_cert,
                tls_key=a.tls_key,
                tls_ca=a.tls_ca,
                peer_listen=a.peer_listen,
                peer_token_file=a.peer_token_file,
                insecure_listen_any=a.insecure_listen_any,
                pool_size=a.pool,
                max_instances=a.max_instances,
                max_upload=a.max_upload,
                max_image_store=a.max_image_store,
                max_guest_memory=a.max_guest_memory,
                default_timeout=a.default_timeout,
                grace=a.grace,
                peer_timeout=a.peer_timeout,
                keep_finished=a.keep_finished,
                jail=not a.no_jail,
                max_streams=a.max_streams,
                max_streams_per_peer=a.max_streams_per_peer,
                publish_ports=a.publish_ports,
                publish_address=a.publish_address,
                allow_outbound_to=tuple(a.allow_outbound_to),
            )
        )
    except (ValueError, OSError) as e:
        print(f"unifork serve: {e}", file=sys.stderr)
        return 2


def cmd_compare(a: argparse.Namespace) -> int:
    """``unifork compare``: the harness lives in comparison/; this prints its table."""
    from comparison.compare import compare_from_args

    result = compare_from_args(a)
    print(result.text)
    print(f"report: {result.directory}")
    return result.exit_code


def cmd_load(a: argparse.Namespace) -> int:
    """``unifork load``: the load generator lives in comparison/load.py."""
    from dataclasses import asdict

    from comparison.load import load_from_args

    check_files(a, "--token-file", "--tls-ca")
    for target in a.target or []:
        check_target(target)
    result = load_from_args(a)
    print(json.dumps(asdict(result.result), indent=1) if a.output == "json" else result.text)
    return result.exit_code


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=os.environ.get("UNIFORK_TARGET", "127.0.0.1:7700"),
        help="tender address HOST:PORT (env UNIFORK_TARGET)",
    )
    p.add_argument("--token-file", help="bearer token file (or env UNIFORK_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate to verify a TLS tender")


class _Version(argparse.Action):
    """``--version``, like argparse's, but the version is looked up only when asked
    (see ``unifork.__getattr__``)."""

    def __init__(self, option_strings: list[str], dest: str, **kw) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="print the installed version and exit",
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import unifork

        print(f"unifork {unifork.__version__}")
        parser.exit()


def add_output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output",
        "-o",
        choices=("text", "json"),
        default="text",
        help="text for people (default) or json for scripts",
    )


#: what the environment variables of ``unifork serve`` say, after its options
SERVE_ENV_EPILOG = (
    "Every option can also be set in the environment: --max-upload 8M is "
    "UNIFORK_MAX_UPLOAD=8M (UNIFORK_ and the option's name in capitals, - as _), as "
    "each option's help says; an option on the command line wins over its variable. "
    "A switch (--no-jail) takes 1/true/yes/on or 0/false/no/off; --peer takes a "
    "comma-separated list."
)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class EnvOption:
    """An option that, when not given, takes its value from UNIFORK_<NAME>, else from
    its default (``kw``: add_argument's keywords)."""

    flag: str
    kw: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def var(self) -> str:
        return f"UNIFORK_{self.dest.upper()}"

    def add_to(self, p: argparse.ArgumentParser) -> None:
        """Added without a default (argparse.SUPPRESS): an option absent from the parsed
        namespace was not given, and ``fill_in`` supplies it."""
        help_text = f"{self.kw.get('help', '')} [env {self.var}]".lstrip()
        p.add_argument(self.flag, **{**self.kw, "default": argparse.SUPPRESS, "help": help_text})

    def fill_in(self, a: argparse.Namespace, env: Mapping[str, str], error) -> None:
        if hasattr(a, self.dest):  # given on the command line: it wins
            return
        text, action = env.get(self.var), self.kw.get("action")
        value = self.kw.get(
            "default", [] if action == "append" else False if action == "store_true" else None
        )
        if text is not None and action == "append":
            value = [x.strip() for x in text.split(",") if x.strip()]
        elif text is not None and action == "store_true":
            if text.strip().lower() not in TRUE_WORDS + FALSE_WORDS:
                error(f"{self.var}={text!r}: not one of {'/'.join(TRUE_WORDS + FALSE_WORDS[:-1])}")
            value = text.strip().lower() in TRUE_WORDS
        elif text is not None:
            value = text
            if "choices" in self.kw and text not in self.kw["choices"]:
                error(f"{self.var}={text!r}: not one of {', '.join(self.kw['choices'])}")
        if isinstance(value, str) and "type" in self.kw:
            try:
                value = self.kw["type"](value)
            except (ValueError, argparse.ArgumentTypeError):
                error(
                    f"{self.var if text is not None else self.flag}={value!r}: "
                    f"not a value for {self.flag}"
                )
        setattr(a, self.dest, value)


#: the options of ``unifork serve``
SERVE_OPTIONS = (
    EnvOption(
        "--listen", dict(default="127.0.0.1:7700", help="HOST:PORT (default 127.0.0.1:7700)")
    ),
    EnvOption("--metrics-port", dict(type=int, default=0, help="serve /metrics on this port")),
    EnvOption(
        "--peer-listen",
        dict(
            metavar="HOST:PORT",
            help="the peer API's own listener (default: the --listen host, "
            "its port + 1, e.g. 127.0.0.1:7701)",
        ),
    ),
    EnvOption(
        "--peer",
        dict(
            action="append",
            default=[],
            help="a peer tender's peer listener HOST:PORT (e.g. host-b:7701), or dns:NAME for "
            "every A record at this tender's peer port (repeatable)",
        ),
    ),
    EnvOption(
        "--advertise",
        dict(
            help="HOST:PORT clients and VMs reach this tender at "
            "(peers: the same host, the peer port)"
        ),
    ),
    EnvOption("--token-file", dict(help="require this bearer token on every client RPC")),
    EnvOption(
        "--peer-token-file",
        dict(
            help="the peers' bearer token (another token than --token-file): required on the "
            "peer listener, sent to peers"
        ),
    ),
    EnvOption(
        "--tls-cert",
        dict(help="TLS certificate (PEM) of both listeners; needs --tls-key and --tls-ca"),
    ),
    EnvOption("--tls-key", dict(help="the private key (PEM) of --tls-cert")),
    EnvOption(
        "--tls-ca",
        dict(
            help="CA (PEM) that signs peers' certificates: the peer "
            "listener requires one (mutual TLS); peers are dialled "
            "with TLS, presenting --tls-cert"
        ),
    ),
    EnvOption(
        "--insecure-listen-any",
        dict(action="store_true", help="allow a non-loopback listen address without a token"),
    ),
    EnvOption("--pool", dict(type=int, default=2, help="warm tender processes for clones")),
    EnvOption("--max-instances", dict(type=int, default=64)),
    EnvOption(
        "--publish-ports",
        dict(
            default="",
            help="host ports a Launch may publish for its VM-clone instance: LOW-HIGH (and 0), "
            "or 0 (only ports this host picks); default none",
        ),
    ),
    EnvOption(
        "--publish-address",
        dict(default="127.0.0.1", help="the address published ports are bound on"),
    ),
    EnvOption(
        "--allow-outbound-to",
        dict(
            action="append",
            metavar="IP:PORT",
            help="a destination (IP:PORT or IP:*) a Launch's allow_outbound may name for its "
            "VM-clone instance (repeatable; this tender's own ports never); default none",
        ),
    ),
    EnvOption("--max-upload", dict(type=parse_size, default="64M")),
    EnvOption(
        "--max-image-store",
        dict(
            type=parse_size,
            default="512M",
            help="bytes of uploaded images kept at most (default 512M); delete-image frees them",
        ),
    ),
    EnvOption(
        "--max-guest-memory",
        dict(
            type=parse_size,
            default=None,
            help="guest RAM all VMs on this tender may declare together (default: half of the "
            "host's RAM, or of the container's memory limit)",
        ),
    ),
    EnvOption(
        "--default-timeout",
        dict(type=float, default=600.0, help="time limit of instances that ask for none (seconds)"),
    ),
    EnvOption(
        "--peer-timeout",
        dict(
            type=float,
            default=60.0,
            help="seconds a VM on another host may stay silent (link down, host gone) before it "
            "counts as lost and is killed (default 60)",
        ),
    ),
    EnvOption(
        "--keep-finished",
        dict(
            type=int,
            default=4096,
            help="finished instances remembered for Wait, Describe and logs (oldest forgotten "
            "first; default 4096)",
        ),
    ),
    EnvOption(
        "--no-jail",
        dict(
            action="store_true",
            help="run VM processes unconfined, for debugging (see tender_service/instance/jail.py)",
        ),
    ),
    EnvOption(
        "--max-streams",
        dict(
            type=int,
            default=10000,
            help="long-lived calls (Wait, logs, uploads, Health.Watch) open at once; more are "
            "refused with RESOURCE_EXHAUSTED (default 10000)",
        ),
    ),
    EnvOption(
        "--max-streams-per-peer",
        dict(type=int, default=1000, help="the same, per client host (default 1000)"),
    ),
    EnvOption(
        "--grace",
        dict(type=float, default=10.0, help="seconds running instances get to finish on SIGTERM"),
    ),
    EnvOption(
        "--log-format",
        dict(
            choices=logs.SERVE_FORMATS,
            default="text",
            help="text: a UTC timestamp, the level and the logger on each line (default); json: "
            "one JSON object a line",
        ),
    ),
)


def main(argv: list[str] | None = None) -> int:
    """The command line.  A reader that leaves (`unifork images | head`) ends it
    quietly with 141, as SIGPIPE ends a C program, not with a traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None = None) -> int:  # noqa: C901 - split after the backend merge
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="unifork", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a program in a unikernel VM")
    r.add_argument(
        "image",
        help="built-in image name, ELF file, C source or baked image (unifork bake; "
        "`run IMAGE -- /bin/prog args` runs its program /bin/prog)",
    )
    r.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    r.add_argument("--mem", type=parse_size, default="64M", help="guest RAM (default 64M)")
    r.add_argument("--stack", type=parse_size, default="256K", help="stack per process")
    r.add_argument("--timeout", type=float, default=None, help="wall-time limit in seconds")
    r.add_argument(
        "--quantum",
        type=int,
        default=DEFAULT_QUANTUM,
        help=f"time slice in microseconds (default {DEFAULT_QUANTUM}); 0: cooperative",
    )
    r.add_argument("--console", choices=("tty", "pipe"), default="tty")
    r.add_argument(
        "--stdin",
        choices=("host", "none"),
        default="host",
        help="guest stdin: this process's stdin, or EOF",
    )
    r.add_argument("--env", action="append", default=[], help="NAME=VALUE (repeatable)")
    r.add_argument(
        "--fork",
        choices=FORK_MODES,
        default="thread",
        help="fork strategy: a thread in the same VM, or a clone of the whole VM",
    )
    r.add_argument(
        "--pipe",
        choices=("shm", "tcp"),
        default="shm",
        help="vmclone: how pipes between VMs travel (default shm)",
    )
    r.add_argument(
        "--pool", type=int, default=2, help="vmclone: warm tender processes to start (default 2)"
    )
    r.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:]HOST:GUEST",
        help="accept TCP on the host port (default IP 127.0.0.1) and hand each connection "
        "to the guest's listener on GUEST port (repeatable; vmclone: to whichever VM accepts); "
        "HOST 0 picks a free port; each mapping is printed on stderr before the guest starts",
    )
    r.add_argument(
        "--allow-outbound",
        action="append",
        default=[],
        metavar="IP:PORT",
        help="thread/copy: let the guest connect (TCP) to IP:PORT on the host (IP:* for any "
        "port; the guest reaches the host's 127.0.0.1 as 10.0.2.2); nothing else leaves "
        "the instance (repeatable)",
    )
    r.add_argument("--max-procs", type=int, default=1024)
    r.add_argument("--trace-syscalls", action="store_true")
    r.add_argument("--tag-pids", action="store_true", help="prefix output lines with the pid")
    r.add_argument("--ps", action="store_true", help="print the process table at exit")
    r.add_argument("--stats", action="store_true", help="print run statistics at exit")

    sub.add_parser("cc", help="compile a guest program (like cc)", add_help=False)
    i = sub.add_parser(
        "images", help="list (and build) the built-in images, or a tender's, or what a file holds"
    )
    i.add_argument(
        "image", nargs="?", help="a baked image (or ELF) file: list its programs and tree"
    )
    i.add_argument("--build", action="store_true")
    i.add_argument("--target", help="list the images of the tender at HOST:PORT instead")
    i.add_argument("--token-file", help="bearer token file (or env UNIFORK_TOKEN)")
    i.add_argument("--tls-ca", help="CA certificate to verify a TLS tender")
    add_output_arg(i)

    b = sub.add_parser(
        "bake",
        help="pack static ELFs, files and directories into one image (like rumprun-bake)",
        description="Programs, files and directories in one versioned image "
        "(docs/image-format.md): `unifork run IMAGE -- /bin/prog args` runs a program of it, "
        "the first --bin when none is named.",
    )
    b.add_argument("-o", "--output", required=True, metavar="IMAGE", help="the image to write")
    b.add_argument(
        "--bin",
        action="append",
        default=[],
        metavar="PATH=ELF",
        help="a static x86-64 program at PATH in the image (repeatable; the first is the default)",
    )
    b.add_argument(
        "--dir",
        action="append",
        default=[],
        metavar="PATH=HOST_DIR",
        help="a host directory's tree at PATH (repeatable)",
    )
    b.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH=HOST_FILE",
        help="one host file at PATH (repeatable)",
    )

    sv = sub.add_parser("serve", help="run a tender daemon (gRPC)", epilog=SERVE_ENV_EPILOG)
    for option in SERVE_OPTIONS:
        option.add_to(sv)

    la = sub.add_parser("launch", help="launch an instance on a tender")
    la.add_argument("image")
    la.add_argument("args", nargs=argparse.REMAINDER)
    la.add_argument("--fork", choices=FORK_MODES, default="thread")
    la.add_argument("--pipe", choices=("shm", "tcp"), default="shm")
    la.add_argument("--placement", choices=("local", "remote", "spread"), default="local")
    la.add_argument("--mem", type=parse_size, default=0)
    la.add_argument("--timeout", type=float, default=None)
    la.add_argument("--max-procs", type=int, default=0)
    la.add_argument("--console", choices=("tty", "pipe"), default="tty")
    la.add_argument("--env", action="append", default=[])
    la.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="vmclone: the tender accepts TCP on its host's port HOST (0: it picks one; "
        "the tender must allow it: serve --publish-ports) for the guest's listener on GUEST; "
        "describe shows the ports bound",
    )
    la.add_argument(
        "--allow-outbound",
        action="append",
        default=[],
        metavar="IP:PORT",
        help="vmclone: the instance may connect to IP:PORT (or IP:*) on the tender's host "
        "network (within the tender's --allow-outbound-to; the guest reaches the tender "
        "host's 127.0.0.1 as 10.0.2.2)",
    )
    la.add_argument("--wait", action="store_true", help="stream the console and wait for the end")
    la.add_argument("--tag-pids", action="store_true")
    add_client_args(la)
    for name, text in (
        ("ps", "list a tender's instances"),
        ("logs", "stream an instance's console"),
        ("wait", "wait for an instance"),
        ("kill", "kill an instance"),
        ("describe", "describe an instance and its process tree"),
    ):
        c = sub.add_parser(name, help=text)
        if name != "ps":
            c.add_argument("instance")
        if name == "logs":
            c.add_argument("--live", action="store_true", help="only what comes from now on")
            c.add_argument("--tag-pids", action="store_true")
        if name == "wait":
            c.add_argument("--timeout", type=float, default=0.0)
        if name in ("ps", "wait", "describe"):
            add_output_arg(c)
        add_client_args(c)
    up = sub.add_parser("upload", help="upload an ELF image to a tender")
    up.add_argument("file")
    up.add_argument("--name")
    add_client_args(up)
    de = sub.add_parser("delete-image", help="delete an uploaded image from a tender")
    de.add_argument("name")
    add_client_args(de)
    s = sub.add_parser("syscalls", help="list the supported syscalls")
    s.add_argument("--markdown", action="store_true")
    sub.add_parser("demo", help="build the images and run the fork/pipe programs")
    from comparison.options import add_compare_arguments, add_load_arguments

    add_compare_arguments(
        sub.add_parser(
            "compare",
            help="run every workload natively, with thread fork and with VM-clone fork; "
            "report tables, JSON, CSV and plots",
        )
    )
    lo = sub.add_parser(
        "load",
        help="launch instances on a tender at a given concurrency "
        "for a while; report throughput and latency",
    )
    add_load_arguments(lo)
    add_output_arg(lo)

    if argv and argv[0] == "cc":
        return cmd_cc(argparse.Namespace(), argv[1:])
    a = p.parse_args(argv)
    if a.cmd == "serve":
        for option in SERVE_OPTIONS:
            option.fill_in(a, os.environ, sv.error)
    logs.setup(a.verbose, a.log_format if a.cmd == "serve" else None)
    if a.cmd == "run":
        # options may follow the image name; program args follow a '--' or unknown words
        return cmd_run(_split_run_args(r, a, argv))
    if a.cmd == "launch":
        a = _split_run_args(la, a, argv)
    try:
        return _dispatch(a)
    except UsageError as e:
        print(f"unifork: {e}", file=sys.stderr)
        return 2


def _dispatch(a: argparse.Namespace) -> int:
    if a.cmd in ("launch", "ps", "logs", "wait", "kill", "describe", "upload", "delete-image") or (
        a.cmd == "images" and a.target and not a.image
    ):
        from unifork.remote import cmd

        return cmd(a)
    return {
        "bake": cmd_bake,
        "images": cmd_images,
        "syscalls": cmd_syscalls,
        "demo": cmd_demo,
        "serve": cmd_serve,
        "compare": cmd_compare,
        "load": cmd_load,
    }[a.cmd](a)


def _split_run_args(
    parser: argparse.ArgumentParser, a: argparse.Namespace, argv: list[str] | None = None
) -> argparse.Namespace:
    """Options may also follow the image: `run hello --mem 8M -n 3` or `run hello -- --mem`.

    After the image, words that are unifork options are taken (with their
    values) up to the first word that is not, or up to ``--``; the rest are the
    program's arguments.

    Kept by hand, reading argparse's ``_actions`` (unchanged since Python 2.7): argparse
    has no public "options up to the first word that is not one" mode.  ``parse_known_args``
    and ``parse_intermixed_args`` would take a unifork option from anywhere in the
    program's arguments (``run prog -n 3 --timeout 5``: ``--timeout`` is the program's).
    """
    takes_value = {s for act in parser._actions for s in act.option_strings if act.nargs != 0}
    flags = {s for act in parser._actions for s in act.option_strings if act.nargs == 0}
    rest, ours = list(a.args), []
    # argparse drops the '--' of `run IMAGE -- -p 1` from the remainder: what followed it
    tail = argv[argv.index("--") + 1 :] if argv and "--" in argv else None
    while rest:
        word = rest[0]
        if tail is not None and rest == tail:
            break
        if word == "--":
            rest.pop(0)
            break
        name = word.split("=", 1)[0]
        if name in flags:
            ours.append(rest.pop(0))
        elif name in takes_value:
            ours.append(rest.pop(0))
            if "=" not in word and rest:
                ours.append(rest.pop(0))
        else:
            break
    opts = parser.parse_args([*ours, a.image])
    for key, value in vars(opts).items():
        if key != "args" and value != parser.get_default(key):
            setattr(a, key, value)
    a.args = rest
    return a


if __name__ == "__main__":
    sys.exit(main())

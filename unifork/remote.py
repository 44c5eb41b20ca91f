"""The commands that talk to a tender: ``unifork launch|ps|logs|wait|kill|describe|
upload|delete-image|images --target``.

The library's ``Client`` makes the calls; this module is what a user sees of them:
tables with a header, a readable description, ``--output json`` for scripts, and one
line (exit 2) for a file or target that cannot be used, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tender_service.rump import signals
from tender_service.service.auth import read_token
from tender_service.service.client import Client
from unifork.args import UsageError, check_files, check_target

TOKEN_ENV = "UNIFORK_TOKEN"


def client_from(a: argparse.Namespace) -> Client:
    check_files(a, "--token-file", "--tls-ca")
    token = read_token(a.token_file) if a.token_file else os.environ.get(TOKEN_ENV)
    return Client(check_target(a.target), token, a.tls_ca)


def message_dict(msg: Message) -> dict:
    """A response as JSON-ready data, every field present (zeros too: a script reads
    ``exit_code`` 0 as 0, not as missing)."""
    try:
        return json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf before 5.26 calls it including_default_value_fields
        return json_format.MessageToDict(  # type: ignore[call-arg]  # stubs: protobuf>=5.26
            msg, preserving_proto_field_name=True, including_default_value_fields=True
        )


def print_json(data: object) -> None:
    print(json.dumps(data, indent=1))


def print_result(r) -> int:
    if not r.done:
        print(f"{r.instance_id}: still running", file=sys.stderr)
        return 124
    print(
        f"{r.instance_id}: {r.outcome}, {signals.describe_status(r.wait_status)}, "
        f"{r.duration_seconds * 1e3:.1f} ms, {r.fork_count} forks, peak guest memory "
        f"{r.peak_guest_memory_bytes} bytes",
        file=sys.stderr,
    )
    for line in r.reports:
        print(f"  {line}", file=sys.stderr)
    return r.exit_code


def stream_logs(c: Client, instance_id: str, tag: bool, from_start: bool = True) -> None:
    for chunk in c.logs(instance_id, from_start):
        out = sys.stdout.buffer if chunk.fd == 1 else sys.stderr.buffer
        data = chunk.data
        if tag:
            data = b"".join(b"[%d] %s" % (chunk.pid, line) for line in data.splitlines(True))
        out.write(data)
        out.flush()


def _enum(pb2, enum: str, value: int) -> str:
    """``FORK_MODE_VMCLONE`` -> ``vmclone``."""
    name = pb2.DESCRIPTOR.enum_types_by_name[enum].values_by_number[value].name
    return name.rsplit("_", 1)[-1].lower()


PS_HEADER = f"{'INSTANCE':<16}  {'STATE':<8} {'FORK':<8} {'AGE':>9}  IMAGE"


def ps_text(pb2, instances) -> str:
    rows = [PS_HEADER]
    for s in instances:
        mode = _enum(pb2, "ForkMode", s.fork_mode)
        rows.append(f"{s.instance_id}  {s.state:<8} {mode:<8} {s.age_seconds:8.1f}s  {s.image}")
    return "\n".join(rows)


def describe_text(pb2, d) -> str:
    """An instance as a person reads it: its fields, then its process table."""
    s, r = d.summary, d.result
    pipes = _enum(pb2, "PipeTransport", d.pipe_transport)
    fields = [
        ("instance", s.instance_id),
        ("image", s.image),
        ("state", s.state),
        ("fork", _enum(pb2, "ForkMode", s.fork_mode)),
        ("pipes", f"{pipes} ({d.transport_note})" if d.transport_note else pipes),
        ("placement", _enum(pb2, "Placement", d.placement)),
        ("age", f"{s.age_seconds:.1f} s"),
        *(
            ("published", f"{m.host_ip}:{m.host_port} -> guest port {m.guest_port}")
            for m in d.published
        ),
    ]
    if r.done:
        fields += [
            ("outcome", r.outcome),
            ("status", signals.describe_status(r.wait_status)),
            ("exit code", str(r.exit_code)),
            ("duration", f"{r.duration_seconds * 1e3:.1f} ms"),
            ("forks", str(r.fork_count)),
            ("peak guest memory", f"{r.peak_guest_memory_bytes} bytes"),
            *(("report", line) for line in r.reports),
        ]
    lines = [f"{key + ':':<19}{value}" for key, value in fields]
    lines += ["", f"{'PID':>6} {'PPID':>6} {'STATE':<7} {'VM':<10} {'HOST':<21} STATUS"]
    for p in d.processes:
        status = signals.describe_status(p.wait_status) if p.exited else ""
        lines.append(
            f"{p.pid:>6} {p.ppid:>6} {p.state:<7} {p.vm or '-':<10} "
            f"{p.host or '-':<21} {status}".rstrip()
        )
    return "\n".join(lines)


def _port_mapping(pb2, text: str):
    """``HOST:GUEST`` (the tender binds its own --publish-address)."""
    host, sep, guest = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return pb2.PortMapping(host_port=int(host), guest_port=int(guest))
    except ValueError:
        raise UsageError(f"--publish {text!r}: expected HOST_PORT:GUEST_PORT") from None


def _launch(c: Client, a: argparse.Namespace) -> int:
    pb2 = c.pb2
    fields = dict(
        env=a.env,
        fork_mode=pb2.ForkMode.Value(f"FORK_MODE_{a.fork.upper()}"),  # a registered mode
        pipe_transport=pb2.PIPE_TRANSPORT_TCP if a.pipe == "tcp" else pb2.PIPE_TRANSPORT_SHM,
        placement={"remote": pb2.PLACEMENT_REMOTE, "spread": pb2.PLACEMENT_SPREAD}.get(
            a.placement, pb2.PLACEMENT_LOCAL
        ),
        memory_bytes=a.mem,
        time_limit_seconds=a.timeout or 0.0,
        max_procs=a.max_procs,
        console_pipe=a.console == "pipe",
        publish=[_port_mapping(pb2, text) for text in a.publish],
        allow_outbound=a.allow_outbound,
    )
    iid = c.launch(a.image, a.args, **fields)
    if not a.wait:
        print(iid)
        return 0
    stream_logs(c, iid, a.tag_pids)
    return print_result(c.wait(iid))


def _run(c: Client, a: argparse.Namespace) -> int:
    json_out = getattr(a, "output", "text") == "json"
    if a.cmd == "launch":
        return _launch(c, a)
    if a.cmd == "ps":
        _ps(c, json_out)
    elif a.cmd == "logs":
        stream_logs(c, a.instance, a.tag_pids, not a.live)
    elif a.cmd == "wait":
        return _wait(c, a, json_out)
    elif a.cmd == "kill":
        print("killed" if c.kill(a.instance) else "not running")
    elif a.cmd == "describe":
        d = c.describe(a.instance)
        print(json.dumps(message_dict(d), indent=1) if json_out else describe_text(c.pb2, d))
    elif a.cmd == "upload":
        _upload(c, a)
    elif a.cmd == "delete-image":
        info = c.delete_image(a.name)
        print(f"deleted {info.name} {info.size_bytes} {info.sha256}")
    elif a.cmd == "images":
        _images(c, json_out)
    else:
        raise ValueError(a.cmd)
    return 0


def _ps(c: Client, json_out: bool) -> None:
    instances = c.instances()
    if json_out:
        print_json([message_dict(s) for s in instances])
    else:
        print(ps_text(c.pb2, instances))


def _wait(c: Client, a: argparse.Namespace, json_out: bool) -> int:
    r = c.wait(a.instance, a.timeout or 0.0)
    if not json_out:
        return print_result(r)
    print_json(message_dict(r))
    return r.exit_code if r.done else 124


def _upload(c: Client, a: argparse.Namespace) -> None:
    try:
        data = Path(a.file).read_bytes()
    except OSError as e:
        raise UsageError(f"upload {a.file}: {e.strerror or e}") from None
    info = c.upload(a.name or Path(a.file).stem, data)
    print(f"{info.name} {info.size_bytes} {info.sha256}")


def _images(c: Client, json_out: bool) -> None:
    images = c.images()
    if json_out:
        print_json([message_dict(i) for i in images])
        return
    for i in images:
        print(
            f"{i.name:<24} {i.size_bytes:>9} {i.sha256[:16]} "
            f"{'builtin' if i.builtin else 'uploaded'}"
        )


def cmd(a: argparse.Namespace) -> int:
    """Dispatch ``unifork launch|ps|logs|wait|kill|images|upload|delete-image|describe``."""
    c = client_from(a)
    try:
        return _run(c, a)
    except grpc.RpcError as e:
        print(f"unifork: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    finally:
        c.close()

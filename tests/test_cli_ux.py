"""The command line as its users expect it (issue 13): ``--version``, ``--output json``,
a ``ps`` header, a readable ``describe``, one-line errors (exit 2) for a file that
cannot be read or a target without a port, timestamped or JSON server logs,
``UNIFORK_*`` variables for every ``serve`` option, and reflection under the
standard v1 name beside v1alpha.

Every command is the installed ``unifork`` entry point (or ``python -m unifork``)
run as a process, against real tenders on loopback ports.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tomllib
import urllib.request
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from test_service import (
    HELLO,
    ROOT,
    RPC_TIMEOUT,
    Tender,
    cli,
    free_port,
    stopped_cleanly,
    unifork_cmd,
)

TOKEN = "cli-ux-token-0123456789abcdef"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture(scope="module")
def tender(tmp_path_factory):
    t = Tender.start(tmp_path_factory.mktemp("cli-ux"), "--pool", "1")
    yield t
    stopped_cleanly(t)


@pytest.fixture(scope="module")
def done_id(tender) -> str:
    """An instance of hello that ran to its end."""
    r = cli("launch", "hello", "--console", "pipe", "--target", tender.target)
    assert r.returncode == 0, r
    iid = r.stdout.strip()
    r = cli("wait", iid, "--target", tender.target)
    assert r.returncode == 0, r
    return iid


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """``r`` failed with exit 2 and one line on stderr (no traceback) naming ``words``."""
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unifork: "), r.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


# -- --version ---------------------------------------------------------------------------------
def test_version_is_the_installed_one():
    want = f"unifork {version('unifork')}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert want == f"unifork {pyproject['project']['version']}\n"
    for cmd in (unifork_cmd(), [sys.executable, "-m", "unifork"]):
        r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60, cwd="/")
        assert (r.returncode, r.stdout) == (0, want), r


# -- ps, describe, wait, images, load: text and json ----------------------------------------
def test_ps_has_a_header_and_json(tender, done_id):
    r = cli("ps", "--target", tender.target)
    assert r.returncode == 0, r
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["INSTANCE", "STATE", "FORK", "AGE", "IMAGE"], header
    row = next(line for line in rows if line.startswith(done_id))
    assert row.split()[1:3] == ["done", "thread"] and row.endswith(" hello"), row

    r = cli("ps", "--output", "json", "--target", tender.target)
    assert r.returncode == 0, r
    mine = [s for s in json.loads(r.stdout) if s["instance_id"] == done_id]
    assert len(mine) == 1, r.stdout
    assert (mine[0]["image"], mine[0]["state"], mine[0]["fork_mode"]) == (
        "hello",
        "done",
        "FORK_MODE_THREAD",
    ), mine
    assert mine[0]["age_seconds"] > 0


def test_describe_is_readable_and_json(tender, done_id):
    r = cli("describe", done_id, "--target", tender.target)
    assert r.returncode == 0, r
    assert "{" not in r.stdout and '"' not in r.stdout, r.stdout  # not protobuf text
    fields = dict(re.findall(r"^([a-z ]+): +(.*)$", r.stdout, re.M))
    assert fields["instance"] == done_id and fields["image"] == "hello", fields
    assert (fields["state"], fields["fork"], fields["outcome"], fields["exit code"]) == (
        "done",
        "thread",
        "exited",
        "0",
    ), fields
    assert fields["status"] == "exited with status 0", fields
    table = r.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["PID", "PPID", "STATE", "VM", "HOST", "STATUS"], table
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["1"][1:3] == ["0", "alive"], rows  # the kernel's init
    prog = rows["2"]  # hello: a child of init, reaped, on a VM of this tender
    assert prog[1:3] == ["1", "reaped"] and prog[4] == tender.target, prog
    assert prog[5:] == ["exited", "with", "status", "0"], prog

    r = cli("describe", done_id, "-o", "json", "--target", tender.target)
    assert r.returncode == 0, r
    d = json.loads(r.stdout)
    assert d["summary"]["instance_id"] == done_id
    # zeros are there too: a script reads exit_code 0, not a missing key
    assert (d["result"]["done"], d["result"]["outcome"], d["result"]["exit_code"]) == (
        True,
        "exited",
        0,
    ), d["result"]
    prog = next(p for p in d["processes"] if p["pid"] == 2)
    assert (prog["ppid"], prog["state"], prog["exited"], prog["wait_status"]) == (
        1,
        "reaped",
        True,
        0,
    ), prog


def test_wait_json(tender, done_id):
    r = cli("wait", done_id, "--output", "json", "--target", tender.target)
    assert (r.returncode, r.stderr) == (0, ""), r
    res = json.loads(r.stdout)
    assert (res["instance_id"], res["done"], res["exit_code"], res["signal"]) == (
        done_id,
        True,
        0,
        0,
    ), res

    r = cli("launch", "spin", "--timeout", "120", "--target", tender.target)
    iid = r.stdout.strip()
    try:
        r = cli("wait", iid, "--timeout", "0.2", "--output", "json", "--target", tender.target)
        assert r.returncode == 124, r  # as in text: still running
        assert json.loads(r.stdout)["done"] is False, r.stdout
    finally:
        assert cli("kill", iid, "--target", tender.target).returncode == 0


def test_images_json_local_and_remote(tender):
    r = cli("images", "--output", "json", "--target", tender.target)
    assert r.returncode == 0, r
    hello = next(i for i in json.loads(r.stdout) if i["name"] == "hello")
    assert hello["builtin"] is True and re.fullmatch(r"[0-9a-f]{64}", hello["sha256"]), hello

    r = cli("images", "--output", "json")
    assert r.returncode == 0, r
    local = next(i for i in json.loads(r.stdout) if i["name"] == "hello")
    assert Path(local["path"]).stat().st_size == local["size_bytes"] > 0, local
    assert local["sha256"] == hello["sha256"]  # the tender serves the same built image


def test_load_json(tender):
    r = cli(
        "load",
        "--target",
        tender.target,
        "--concurrency",
        "1",
        "--duration",
        "30",
        "--max-instances",
        "2",
        "--output",
        "json",
    )
    assert r.returncode == 0, r
    res = json.loads(r.stdout)
    assert (res["image"], res["launched"], res["succeeded"], res["failed"]) == ("hello", 2, 2, 0), (
        res
    )
    assert res["target"] == tender.target and len(res["latencies_ms"]) == 2


def test_launch_wait_still_streams_the_console(tender):
    r = cli("launch", "hello", "--wait", "--target", tender.target)
    assert (r.returncode, r.stdout) == (0, HELLO.decode()), r


# -- one-line errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cmd",
    [
        ["ps"],
        ["wait", "0123456789abcdef"],
        ["describe", "x"],
        ["images"],
        ["load", "--max-instances", "1"],
    ],
)
def test_a_missing_token_file_is_one_line(tender, tmp_path, cmd):
    missing = tmp_path / "no-such-token"
    r = cli(*cmd, "--target", tender.target, "--token-file", str(missing))
    one_line_error(r, "--token-file", str(missing), "No such file or directory")


def test_a_token_file_that_is_no_token_is_one_line(tender, tmp_path):
    (tmp_path / "short").write_text("abc\n")
    r = cli("ps", "--target", tender.target, "--token-file", str(tmp_path / "short"))
    one_line_error(r, "--token-file", str(tmp_path / "short"))


def test_a_missing_tls_ca_is_one_line(tender, tmp_path):
    r = cli("ps", "--target", tender.target, "--tls-ca", str(tmp_path / "ca.pem"))
    one_line_error(r, "--tls-ca", str(tmp_path / "ca.pem"), "No such file or directory")


def test_a_missing_upload_file_is_one_line(tender, tmp_path):
    r = cli("upload", str(tmp_path / "nothing.elf"), "--target", tender.target)
    one_line_error(r, "upload", str(tmp_path / "nothing.elf"), "No such file or directory")
    r = cli("upload", str(tmp_path), "--target", tender.target)  # a directory
    one_line_error(r, "upload", str(tmp_path), "Is a directory")


def test_serve_with_a_missing_token_file_is_one_line(tmp_path):
    r = cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--token-file", str(tmp_path / "gone"))
    one_line_error(r, "--token-file", str(tmp_path / "gone"), "No such file or directory")


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.1:", "127.0.0.1:https", "127.0.0.1:70000"],
)
def test_a_target_without_a_port_is_refused(target):
    for r in (
        cli("ps", "--target", target),
        cli("ps", env={"UNIFORK_TARGET": target}),
        cli("images", "--target", target),
        cli("load", "--target", target, "--max-instances", "1"),
    ):
        one_line_error(r, repr(target), "HOST:PORT")


def test_a_target_without_a_port_dials_nothing():
    """A target without a port would go to port 443: with a listener there, the refused
    command connects to nothing."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 443))
        except OSError as e:  # not root, or 443 taken: the test above still holds
            pytest.skip(f"cannot listen on 127.0.0.1:443: {e}")
        s.listen(8)
        s.setblocking(False)
        one_line_error(cli("ps", "--target", "127.0.0.1"), "HOST:PORT")
        with pytest.raises(BlockingIOError):
            s.accept()


# -- serve: logs, environment ------------------------------------------------------------------
TIMESTAMPED = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR|DEBUG) "
    r"[\w.]+: "
)


#: what gRPC's C core writes to stderr itself (absl logging), not through Python's logging
ABSL_LINE = re.compile(r"^([EWIF]\d{4} |WARNING: All log messages before absl)")


def log_lines(t: Tender) -> list[str]:
    """The whole log (``Tender.log()`` is its tail), less gRPC core's lines."""
    text = t.log_path.read_text(errors="replace")
    return [ln for ln in text.splitlines() if ln.strip() and not ABSL_LINE.match(ln)]


def test_server_log_lines_have_timestamps(tender):
    lines = log_lines(tender)
    serving = [ln for ln in lines if "tender serving on" in ln]
    assert len(serving) == 1 and TIMESTAMPED.match(serving[0]), serving
    assert all(TIMESTAMPED.match(ln) for ln in lines), lines  # the pool worker's too


def test_serve_help_names_a_variable_for_every_option():
    r = subprocess.run(
        [*unifork_cmd(), "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    flags = set(re.findall(r"^  (--[a-z][a-z-]*)", r.stdout, re.M)) - {"--help"}
    assert {"--listen", "--token-file", "--peer", "--no-jail", "--log-format"} <= flags
    text = " ".join(r.stdout.split())
    for flag in flags:
        var = "UNIFORK_" + flag[2:].replace("-", "_").upper()
        assert f"[env {var}]" in text, flag
    assert "wins over its variable" in text


@pytest.fixture(scope="module")
def env_tender(tmp_path_factory):
    """A tender configured through UNIFORK_* variables, one of them (--listen) also
    given as an option: the option wins."""
    d = tmp_path_factory.mktemp("env-tender")
    (d / "token").write_text(TOKEN + "\n")
    env_port = free_port()
    env = {
        "UNIFORK_LISTEN": f"127.0.0.1:{env_port}",
        "UNIFORK_TOKEN_FILE": str(d / "token"),
        "UNIFORK_LOG_FORMAT": "json",
        "UNIFORK_POOL": "1",
        "UNIFORK_MAX_INSTANCES": "1",
        "UNIFORK_INSECURE_LISTEN_ANY": "no",
    }
    with pytest.MonkeyPatch.context() as m:  # Tender.start's process inherits them
        for k, v in env.items():
            m.setenv(k, v)
        t = Tender.start(d)  # gives --listen, --peer-listen, --metrics-port as options
    t.env_port = env_port
    yield t
    stopped_cleanly(t)


def test_serve_takes_its_options_from_the_environment(env_tender):
    t = env_tender
    # the option --listen won over UNIFORK_LISTEN: nothing listens at the variable's port
    assert t.health() == health_pb2.HealthCheckResponse.SERVING
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", t.env_port))
    # UNIFORK_TOKEN_FILE: the API needs the token
    r = cli("ps", "--target", t.target)
    one_line_error(r, "UNAUTHENTICATED")
    tok = {"UNIFORK_TOKEN": TOKEN}
    # UNIFORK_MAX_INSTANCES=1: a second instance beside a running one is refused
    r = cli("launch", "spin", "--timeout", "120", "--target", t.target, env=tok)
    assert r.returncode == 0, r
    iid = r.stdout.strip()
    try:
        r = cli("launch", "hello", "--target", t.target, env=tok)
        one_line_error(r, "RESOURCE_EXHAUSTED")
    finally:
        assert cli("kill", iid, "--target", t.target, env=tok).returncode == 0
    # UNIFORK_LOG_FORMAT=json: every line of the log is a JSON record
    with urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
    records = [json.loads(ln) for ln in log_lines(t)]
    serving = [x for x in records if x["message"].startswith("tender serving on")]
    assert len(serving) == 1, records
    rec = serving[0]
    assert rec["level"] == "INFO" and rec["logger"] == "tender_service.service.server", rec
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"]), rec
    assert f"127.0.0.1:{t.port}" in rec["message"]


def test_a_bad_variable_is_named(tmp_path):
    r = cli("serve", env={"UNIFORK_MAX_UPLOAD": "lots"})
    assert r.returncode == 2 and "UNIFORK_MAX_UPLOAD='lots'" in r.stderr, r
    r = cli("serve", env={"UNIFORK_NO_JAIL": "maybe"})
    assert r.returncode == 2 and "UNIFORK_NO_JAIL='maybe'" in r.stderr, r
    # the serve variables do not reach the other commands
    r = cli("images", env={"UNIFORK_MAX_UPLOAD": "lots"})
    assert r.returncode == 0 and "hello" in r.stdout, r


# -- reflection v1 ------------------------------------------------------------------------------
def _reflect(target: str, method: str, *reqs, md=()) -> list:
    """Reflection requests sent on ``method``.  The v1 messages are v1alpha's field for
    field (only the proto package differs), so v1alpha's classes write v1's bytes."""
    with grpc.insecure_channel(target) as ch:
        call = ch.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(reqs), timeout=RPC_TIMEOUT, metadata=md))


def test_reflection_v1_beside_v1alpha(tender):
    reqs = (
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="unifork.v1.Tender"),
    )
    for method in (V1, V1ALPHA):
        listed, v1_file, tender_file = _reflect(tender.target, method, *reqs)
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "unifork.v1.Tender",
            "grpc.health.v1.Health",
        } <= names, (method, names)
        fds = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in v1_file.file_descriptor_response.file_descriptor_proto
        ]
        v1 = next(f for f in fds if f.package == "grpc.reflection.v1")
        (service,) = v1.service
        assert (service.name, [m.name for m in service.method]) == (
            "ServerReflection",
            ["ServerReflectionInfo"],
        )
        assert service.method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
        fds = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in tender_file.file_descriptor_response.file_descriptor_proto
        ]
        assert any(
            f.package == "unifork.v1" and any(s.name == "Tender" for s in f.service) for f in fds
        ), method


def test_reflection_v1_needs_the_token(env_tender):
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as e:
        _reflect(env_tender.target, V1, req)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (listed,) = _reflect(env_tender.target, V1, req, md=[("authorization", f"Bearer {TOKEN}")])
    assert "unifork.v1.Tender" in {s.name for s in listed.list_services_response.service}


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "printf_test"],
        ["run", "--fork", "vmclone", "printf_test"],
        ["images"],
    ],
    ids=["run-thread", "run-vmclone", "images"],
)
def test_a_reader_that_left_ends_the_command_with_sigpipe(argv: list[str]) -> None:
    """`unifork run prog | head`: the guest's write gets EPIPE and SIGPIPE, as a native
    program's does (exit 128 + 13), and the CLI prints no traceback; its own listings
    end the same way."""
    p = subprocess.Popen(
        [*unifork_cmd(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert p.stdout is not None
    p.stdout.close()  # the reader leaves before the first byte
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err
    assert b"Traceback" not in err and b"internal error" not in err and b"vanished" not in err, err

"""deploy/: the container image, compose file, Kubernetes manifests, Prometheus and Grafana.

No Docker engine and no Kubernetes here, so the files are checked by what can
run: every file parses; every ``unifork serve`` argument list in them is
parsed by the real command line and started as a real tender (addresses moved
to loopback); ports, names and paths agree across the files; the probes run
against a tender with a token (the kubelet's native gRPC probe, without one);
the Kubernetes objects have the properties issue 12 asked for (no shipped
token, client affinity, a disruption budget, a network policy that keeps the
peer port to peers); the Prometheus alert rules pass promtool; and a real
Prometheus, configured from deploy/prometheus/prometheus.yml, scrapes two
tenders running a workload until every PromQL expression of the Grafana
dashboard returns data.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from argparse import Namespace
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, wait_until

from tender_service import protos
from tender_service.service.auth import read_token
from tender_service.service.client import Client
from unifork import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "unifork.json"
HEALTHCHECK = DEPLOY / "healthcheck.py"
START_TIMEOUT = 60.0
TOKEN = "deploy-test-token-0123456789abcdef"
PEER_TOKEN = "deploy-test-peer-token-0123456789abcdef"


# -- reading the files ---------------------------------------------------------------------


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose() -> dict:
    return yaml_docs(DEPLOY / "docker-compose.yml")[0]


def compose_tenders() -> dict[str, dict]:
    """The compose services that run the tender image (their entrypoint is `unifork serve`)."""
    services = compose()["services"]
    return {name: s for name, s in services.items() if "build" in s}


def k8s_objects() -> list[dict]:
    return [
        d
        for p in sorted(K8S.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in yaml_docs(p)
    ]


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [
        o
        for o in k8s_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


def k8s_tender() -> dict:
    sts = k8s_object("StatefulSet")
    (container,) = [
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "tender"
    ]
    return container


def dockerfile() -> list[tuple[int, str, str]]:
    """(stage number, INSTRUCTION, arguments) of deploy/Dockerfile, continuations joined."""
    out, stage, pending = [], -1, ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        instr, _, args = text.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stage += 1
        out.append((stage, instr, args.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def docker_env() -> dict[str, str]:
    """ENV of the final stage (the image the tenders run in)."""
    instrs = dockerfile()
    final = max(stage for stage, _, _ in instrs)
    env: dict[str, str] = {}
    for stage, instr, args in instrs:
        if instr == "ENV" and stage == final:
            env.update(w.partition("=")[::2] for w in shlex.split(args))
    return env


def bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of a compose service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith("."):
            out[container] = (DEPLOY / host).resolve()
    return out


def prometheus_config() -> dict:
    return yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]


def unifork_job(config: dict) -> dict:
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "unifork"]
    return job


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("unifork_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the real command line -----------------------------------------------------------------


def serve_argv_lists() -> dict[str, list[str]]:
    """Every `unifork serve` argument list in deploy/, by where it is."""
    lists = {
        f"compose {name}": [str(a) for a in s["command"]] for name, s in compose_tenders().items()
    }
    lists["kubernetes statefulset"] = [str(a) for a in k8s_tender()["args"]]
    (cmd,) = [args for _, instr, args in dockerfile() if instr == "CMD"]
    lists["Dockerfile CMD"] = exec_form(cmd)
    return lists


def parse_serve(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Namespace:
    """Parse with the real parser of unifork.cli (serving replaced by a capture)."""
    seen: list[Namespace] = []
    with monkeypatch.context() as m:
        m.setattr(cli, "cmd_serve", lambda a: seen.append(a) or 0)
        assert cli.main(["serve", *argv]) == 0
    return seen[0]


@functools.cache
def serve_help_flags() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "unifork", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", out))


def pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """[('--flag', value-or-None)] of an argument list made only of long options."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"not an option: {flag!r} in {argv}"
        if "=" in flag:
            name, _, value = flag.partition("=")
            out.append((name, value))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((flag, argv[i + 1]))
            i += 2
        else:
            out.append((flag, None))
            i += 1
    return out


def values(argv: list[str], flag: str) -> list[str]:
    return [v for f, v in pairs(argv) if f == flag]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- processes -----------------------------------------------------------------------------


def unifork_argv() -> list[str]:
    """The image's ENTRYPOINT `unifork serve`, from this venv."""
    exe = Path(sys.executable).with_name("unifork")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unifork"]


class Tender:
    """A `unifork serve` started from a deploy/ argument list moved to loopback."""

    def __init__(self, name: str, argv: list[str], workdir: Path, token_file: Path) -> None:
        self.name, self.port, self.metrics_port = name, free_port(), free_port()
        self.peer_port = free_port()
        self.token_file, self.deploy_argv = token_file, argv
        self.peer_token_file = workdir / "peer_token"
        self.peer_token_file.write_text(PEER_TOKEN + "\n")
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def peer_target(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def loopback_argv(self, peers: dict[str, str]) -> list[str]:
        """Addresses, ports and the token path changed; every other option kept as is.

        ``peers`` maps a deploy peer (``tender-b:7701``) to a loopback address;
        ``dns:NAME`` becomes ``dns:localhost`` (it resolves to this tender,
        which skips itself); peers not in the map are dropped.
        """
        moved = {
            "--listen": self.target,
            "--metrics-port": str(self.metrics_port),
            "--token-file": str(self.token_file),
            "--peer-token-file": str(self.peer_token_file),
            "--advertise": self.target,
            "--peer-listen": f"127.0.0.1:{self.peer_port}",
            "--publish-address": "127.0.0.1",
            "--publish-ports": "0",  # ports the host picks: no fixed port to collide with
        }
        out: list[str] = []
        for flag, value in pairs(self.deploy_argv):
            if flag in moved:
                value = moved[flag]
            elif flag == "--peer":
                if value.startswith("dns:"):
                    value = "dns:localhost"
                elif value in peers:
                    value = peers[value]
                else:
                    continue
            out += [flag] if value is None else [flag, value]
        return [*out, "--peer-listen", self.peer_target]

    def start(self, peers: dict[str, str]) -> None:
        argv = [*unifork_argv(), "serve", *self.loopback_argv(peers)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_healthy(self) -> None:
        md = [("authorization", f"Bearer {self.token_file.read_text().strip()}")]
        deadline = time.monotonic() + START_TIMEOUT
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2, metadata=md)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"{self.name} not healthy: {self.tail()}"
                time.sleep(0.1)  # ok-sleep: polling interval of a wait with a deadline

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "unifork_token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def compose_pair(tmp_path_factory, token_file) -> Iterator[tuple[Tender, Tender]]:
    """tender-a and tender-b of the compose file, peered with each other on loopback."""
    workdir = tmp_path_factory.mktemp("tenders")
    services = compose_tenders()
    a, b = (
        Tender(n, [str(x) for x in services[n]["command"]], workdir, token_file)
        for n in ("tender-a", "tender-b")
    )
    peers = {"tender-a:7701": a.peer_target, "tender-b:7701": b.peer_target}
    try:
        a.start(peers)
        b.start(peers)
        a.wait_healthy()
        b.wait_healthy()
        yield a, b
    finally:
        codes = [t.stop() for t in (a, b)]
    assert codes == [0, 0], f"tenders exited {codes}:\n{a.tail()}\n{b.tail()}"


# -- every file parses ---------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json"))
    assert len(files) >= 10, files
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_every_kubernetes_manifest_is_in_the_kustomization() -> None:
    kust = yaml_docs(K8S / "kustomization.yaml")[0]
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kust["namespace"] == k8s_object("Namespace")["metadata"]["name"]
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == kust["namespace"], obj["metadata"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests(tmp_path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    (copy / "secrets" / "token").write_text(TOKEN + "\n")  # what the operator makes
    out = subprocess.run(
        ["kubectl", "kustomize", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    names = {
        v["secret"]["secretName"]
        for v in sts["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    # the generated (hashed) name is used; the peers' token is made by hand
    assert names == {secret["metadata"]["name"], "unifork-peer-token"}


def test_dashboard_configmap_is_generated_from_the_json() -> None:
    spec = importlib.util.spec_from_file_location(
        "dashboard_configmap", K8S / "dashboard_configmap.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    path = K8S / "grafana-dashboard-configmap.yaml"
    assert path.read_text() == gen.render(DASHBOARD), (
        "stale: run python deploy/kubernetes/dashboard_configmap.py"
    )
    cm = k8s_object("ConfigMap", "unifork-grafana-dashboard")
    assert json.loads(cm["data"]["unifork.json"]) == dashboard()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    out = subprocess.run(
        [
            "promtool",
            "check",
            "config",
            "--syntax-only",
            str(DEPLOY / "prometheus" / "prometheus.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def alert_rules() -> dict[str, dict]:
    return {
        r["alert"]: r for g in yaml_docs(ALERTS)[0]["groups"] for r in g["rules"] if "alert" in r
    }


def test_alert_rules_cover_what_issue_12_asked_for() -> None:
    """Tender down, emulator crashes, RESOURCE_EXHAUSTED rate, shm exhaustion; loaded by
    the Prometheus config and mounted where it looks for them."""
    rules = {name: " ".join(r["expr"].split()) for name, r in alert_rules().items()}
    assert re.search(r'\bup\{job="unifork"\} == 0', rules["UniforkTenderDown"])
    assert "increase(unifork_emulator_crashes_total[5m])" in rules["UniforkEmulatorCrashes"]
    assert "fork_mode" in rules["UniforkEmulatorCrashes"]
    assert re.search(
        r'rate\(grpc_server_handled_total\{[^}]*grpc_code="RESOURCE_EXHAUSTED"',
        rules["UniforkResourceExhausted"],
    )
    assert "unifork_shm_exhausted_total" in rules["UniforkShmExhausted"]
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    config = prometheus_config()
    assert [(DEPLOY / "prometheus" / f).resolve() for f in config["rule_files"]] == [ALERTS]
    prom = compose()["services"]["prometheus"]
    mounts = bind_mounts(prom)
    (config_path,) = [c for c, h in mounts.items() if h == DEPLOY / "prometheus" / "prometheus.yml"]
    for f in config["rule_files"]:
        assert mounts[str(Path(config_path).parent / f)] == ALERTS


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_and_tests_the_alert_rules() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and f"{len(alert_rules())} rules found" in check.stdout, (
        check.stdout + check.stderr
    )
    # each alert fires when it should and not before (deploy/prometheus/alerts.test.yml)
    tests = yaml_docs(DEPLOY / "prometheus" / "alerts.test.yml")[0]
    tested = {
        t["alertname"]
        for case in tests["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert tested == set(alert_rules())
    run = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    # and the config with its rule files, as Prometheus will load it
    config = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stdout + config.stderr


# -- the command line accepts what deploy/ gives it ----------------------------------------


def test_every_serve_flag_is_one_the_cli_knows(monkeypatch) -> None:
    known = serve_help_flags()
    assert {"--listen", "--metrics-port", "--peer", "--advertise", "--token-file"} <= known
    for where, argv in serve_argv_lists().items():
        flags = {f for f, _ in pairs(argv)}
        assert flags <= known, f"{where}: unknown flags {flags - known}"
        # k8s expands $(VAR) in args before the container starts
        a = parse_serve([re.sub(r"\$\((\w+)\)", "10.0.0.7", x) for x in argv], monkeypatch)
        assert a.listen == "0.0.0.0:7700", where
        assert a.metrics_port == 9100, where
        assert a.token_file, f"{where}: a non-loopback listen address needs a token"
        assert not a.insecure_listen_any, where
        assert a.grace >= 0 and a.max_upload > 0, where


def test_kubernetes_arg_variables_are_defined_in_the_container() -> None:
    c = k8s_tender()
    defined = {e["name"] for e in c.get("env", [])}
    used = {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", str(a))}
    assert used and used <= defined, (used, defined)
    pod_ip = [e for e in c["env"] if e["name"] == "POD_IP"][0]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert values(c["args"], "--advertise") == ["$(POD_IP):7700"]


def test_environment_variables_are_ones_unifork_reads() -> None:
    """UNIFORK_* names in deploy/ must be read somewhere (a typo is silently ignored)."""
    sources = [*(ROOT / "tender_service").rglob("*.py"), HEALTHCHECK]
    read = set()
    for path in sources:
        read |= set(re.findall(r"\bUNIFORK_[A-Z_]+\b", path.read_text()))
    assert {"UNIFORK_CACHE_DIR", "UNIFORK_TOKEN", "UNIFORK_TARGET"} <= read
    used = set(docker_env())
    for _, instr, args in dockerfile():
        if instr == "ENV":
            used |= {w.partition("=")[0] for w in shlex.split(args)}
    for s in compose_tenders().values():
        env = s.get("environment") or {}
        used |= set(env if isinstance(env, dict) else (e.partition("=")[0] for e in env))
    used |= {e["name"] for e in k8s_tender().get("env", [])}
    unifork = {n for n in used if n.startswith("UNIFORK_")}
    assert unifork <= read, f"not read by unifork: {unifork - read}"
    generic = {"PATH", "POD_IP"} | {n for n in used if n.startswith(("PYTHON", "PIP_"))}
    assert used - unifork <= generic, used - unifork - generic
    assert docker_env()["UNIFORK_CACHE_DIR"] == "/opt/unifork-cache"


# -- the files agree with each other -------------------------------------------------------


def test_ports_agree_everywhere() -> None:
    argvs = serve_argv_lists()
    grpc_ports = {port_of(values(a, "--listen")[0]) for a in argvs.values()}
    metrics_ports = {int(values(a, "--metrics-port")[0]) for a in argvs.values()}
    assert grpc_ports == {7700} and metrics_ports == {9100}
    (gport,), (mport,) = grpc_ports, metrics_ports
    pport = gport + 1  # serve's default --peer-listen: peers have a port of their own
    for where, argv in argvs.items():
        assert not values(argv, "--peer-listen"), f"{where}: the default peer port is used"

    # the image
    exposed = {int(p) for _, instr, args in dockerfile() if instr == "EXPOSE" for p in args.split()}
    assert exposed == {gport, pport, mport}

    # compose: published ports, peers and advertised addresses
    tenders = compose_tenders()
    for name, s in tenders.items():
        argv = [str(x) for x in s["command"]]
        published = values(argv, "--publish-ports")  # the host maps them one to one
        assert {str(p).rpartition(":")[2] for p in s["ports"]} == {str(gport), *published}, name
        assert {int(p) for p in s["expose"]} == {gport, pport, mport}, name
        assert values(argv, "--advertise") == [f"{name}:{gport}"]
        assert sorted(values(argv, "--peer")) == sorted(
            f"{o}:{pport}" for o in tenders if o != name
        )
        assert s.get("hostname", name) == name

    # Prometheus scrapes the tenders' metrics port
    job = unifork_job(prometheus_config())
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{n}:{mport}" for n in tenders)
    assert job.get("metrics_path", "/metrics") == "/metrics"

    # Kubernetes: container ports, Services, annotations, probes
    sts = k8s_object("StatefulSet")
    pod = sts["spec"]["template"]
    c = k8s_tender()
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named == {"grpc": gport, "peer": pport, "metrics": mport}
    assert not values(c["args"], "--peer-listen") and pport == 7701  # the default
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == mport
    assert ann["prometheus.io/path"] == "/metrics"
    headless = k8s_object("Service", "unifork-tenders")
    client = k8s_object("Service", "unifork")
    assert headless["spec"]["clusterIP"] == "None"
    assert client["spec"].get("type", "ClusterIP") == "ClusterIP"
    for svc in (headless, client):
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        grpc_port = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"][0]
        assert grpc_port["port"] == gport and named[grpc_port["targetPort"]] == gport
    headless_ports = {
        p["name"]: (p["port"], named[p["targetPort"]]) for p in headless["spec"]["ports"]
    }
    assert headless_ports == {
        "grpc": (gport, gport),
        "peer": (pport, pport),
        "metrics": (mport, mport),
    }
    assert [p["name"] for p in client["spec"]["ports"]] == ["grpc"]  # never the peer port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["grpc"]["port"] == gport, kind
    hc = load_healthcheck().parser()
    (health,) = [args for _, instr, args in dockerfile() if instr == "HEALTHCHECK"]
    probe = exec_form(health.partition("CMD ")[2])
    assert probe[:2] == ["python", "/opt/unifork/healthcheck.py"]
    assert port_of(hc.parse_args(probe[2:]).target) == gport


def test_names_and_paths_agree_everywhere() -> None:
    # Kubernetes: peer discovery through the headless service of the StatefulSet
    ns = k8s_object("Namespace")["metadata"]["name"]
    sts = k8s_object("StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "unifork-tenders"
    assert (
        sts["spec"]["selector"]["matchLabels"].items()
        <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    c = k8s_tender()
    assert values(c["args"], "--peer") == [f"dns:unifork-tenders.{ns}.svc.cluster.local"]
    assert k8s_object("Service", "unifork-tenders")["spec"]["publishNotReadyAddresses"]
    # the token: the kustomization's generated Secret -> volume -> --token-file
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"] if "secret" in volumes[m["name"]]}
    assert set(mounts) == {"token", "peer-token"}, mounts
    # the peers' token: a Secret of its own, made by hand (not shipped in the kustomization)
    assert volumes["peer-token"]["secret"]["secretName"] == "unifork-peer-token"
    assert values(c["args"], "--peer-token-file") == [f"{mounts['peer-token']['mountPath']}/token"]
    mount = mounts["token"]
    (generator,) = yaml_docs(K8S / "kustomization.yaml")[0]["secretGenerator"]
    assert volumes[mount["name"]]["secret"]["secretName"] == generator["name"]
    (entry,) = generator["files"]
    key = entry.partition("=")[0]
    token_path = f"{mount['mountPath']}/{key}"
    assert values(c["args"], "--token-file") == [token_path]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    pod_sc = sts["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] and pod_sc["runAsUser"] > 0
    image = c["image"].partition(":")[0]
    kust = yaml_docs(K8S / "kustomization.yaml")[0]
    assert image in {i["name"] for i in kust.get("images", [])}

    # compose: the secret file is where --token-file and the image's healthcheck look
    doc = compose()
    for name, s in compose_tenders().items():
        assert set(s["secrets"]) == {"unifork_token", "unifork_peer_token"}, name
        assert set(s["secrets"]) <= set(doc["secrets"])
        for flag, secret_name in (
            ("--token-file", "unifork_token"),
            ("--peer-token-file", "unifork_peer_token"),
        ):
            assert values([str(x) for x in s["command"]], flag) == [
                f"/run/secrets/{secret_name}"
            ], name
        assert s["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / s["build"]["context"]).resolve() == ROOT
        assert s["image"].partition(":")[0] == image
    (health,) = [args for _, instr, args in dockerfile() if instr == "HEALTHCHECK"]
    probe = exec_form(health.partition("CMD ")[2])
    assert values(probe[2:], "--token-file") == ["/run/secrets/unifork_token"]
    assert (DEPLOY / "secrets" / ".gitignore").exists()

    # Grafana: datasource uid, the provisioned paths, the Prometheus address
    (ds,) = yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    refs = [p["datasource"] for p in dashboard_panels() if "datasource" in p]
    refs += [t["datasource"] for p in dashboard_panels() for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dashboard()["templating"]["list"]]
    assert refs and all(r == {"type": "prometheus", "uid": ds["uid"]} for r in refs), refs
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text()
    url = urllib.parse.urlsplit(ds["url"])
    assert url.hostname in doc["services"] and url.port == 9090
    prom = doc["services"][url.hostname]
    assert any(str(p).endswith(":9090") for p in prom["ports"])
    assert "/etc/prometheus/prometheus.yml" in " ".join(prom["command"])
    config = prometheus_config()
    assert ds["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    (provider,) = yaml_docs(DEPLOY / "grafana/provisioning/dashboards/unifork.yml")[0]["providers"]
    grafana = bind_mounts(doc["services"]["grafana"])
    assert grafana[provider["options"]["path"]] == DASHBOARD.parent
    assert grafana["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    assert (
        bind_mounts(prom)["/etc/prometheus/prometheus.yml"]
        == DEPLOY / "prometheus" / "prometheus.yml"
    )


def test_read_only_containers_can_write_where_a_tender_writes() -> None:
    """Uploaded images (under UNIFORK_CACHE_DIR), sockets in /tmp, Python's semaphores
    in /dev/shm."""
    uploads = f"{docker_env()['UNIFORK_CACHE_DIR']}/uploads"
    runs = " ".join(a for s, i, a in dockerfile() if i == "RUN" and s == 1)
    assert f"mkdir -p {uploads}" in runs and "chown" in runs
    c = k8s_tender()
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert {"/tmp", uploads} <= {m["mountPath"] for m in c["volumeMounts"]}
    volumes = {
        v["name"]: v for v in k8s_object("StatefulSet")["spec"]["template"]["spec"]["volumes"]
    }
    (dshm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[dshm["name"]]["emptyDir"]["medium"] == "Memory"
    for name, s in compose_tenders().items():
        if s.get("read_only"):
            assert {"/tmp", uploads} <= set(s["tmpfs"]), name
        assert s["shm_size"], name


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent of it) decides."""

    def regex(p: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*|\*|\?)", p.strip("/")):
            out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = regex(pat[1:] if neg else pat)
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerfile_builds_in_stages_and_runs_unprivileged() -> None:
    instrs = dockerfile()
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    froms = [a for _, i, a in instrs if i == "FROM"]
    assert len(froms) == 2
    base, _, name = froms[0].partition(" AS ")
    assert re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base) == "python:3.11-slim"
    assert name == "builder"
    runs = " ".join(a for s, i, a in instrs if i == "RUN" and s == 0)
    assert "pip install" in runs and "unifork images --build" in runs
    assert "python -m tender_service.protos" in runs
    builder_env = " ".join(a for s, i, a in instrs if i == "ENV" and s == 0)
    assert "UNIFORK_CACHE_DIR=/opt/unifork-cache" in builder_env
    final = [(i, a) for s, i, a in instrs if s == 1]
    copies = [a for i, a in final if i == "COPY"]
    assert any(a.startswith("--from=builder /opt/venv ") for a in copies)
    assert any(a.startswith("--from=builder /opt/unifork-cache") for a in copies)
    (user,) = [a for i, a in final if i == "USER"]
    assert all(int(x) > 0 for x in user.split(":")), "a numeric, non-root USER"
    (entry,) = [a for i, a in final if i == "ENTRYPOINT"]
    assert exec_form(entry) == ["unifork", "serve"]
    assert any(i == "HEALTHCHECK" for i, _ in final)

    # the build context (the repository root) holds what COPY takes, and no more
    patterns = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for _, i, a in instrs:
        if i != "COPY" or a.startswith("--from"):
            continue
        *srcs, _dest = a.split()
        for src in srcs:
            under = [f for f in tracked if f == src or f.startswith(src.rstrip("/") + "/")]
            assert under, f"COPY {src}: nothing in the repository"
            left_out = [f for f in under if dockerignore_excludes(f, patterns)]
            assert not left_out, f"COPY {src}: excluded by the dockerignore: {left_out[:5]}"
    for path in (
        "tests/test_deploy.py",
        ".venv/bin/python",
        ".git/HEAD",
        "tender_service/gen/unifork/v1/tender_pb2.py",
        "deploy/docker-compose.yml",
        "tender_service/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignore_excludes(path, patterns), path


# -- the Kubernetes objects issue 12 asked for (finding 10) ---------------------------------


def quantity(text: str) -> int:
    """A Kubernetes memory quantity (512Mi, 3Gi, 1G) in bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    assert m, text
    units = {
        "Ki": 1 << 10,
        "Mi": 1 << 20,
        "Gi": 1 << 30,
        "Ti": 1 << 40,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    return int(m[1]) * units.get(m[2] or "", 1)


def tender_labels() -> dict[str, str]:
    return k8s_object("StatefulSet")["spec"]["template"]["metadata"]["labels"]


PLACEHOLDER = "REPLACE-ME-with-a-random-token-of-32-or-more-characters"  # secret.yaml's, before


def test_no_token_is_shipped_and_a_placeholder_is_refused(tmp_path) -> None:
    """Before: secret.yaml held a placeholder every tender accepted, and `kubectl apply -k`
    put it back over a real Secret.  Now no Secret is in the manifests; the kustomization
    generates it from a file the operator makes (ignored by git); a tender refuses a
    known placeholder at start, naming the file."""
    assert not [o for o in k8s_objects() if o["kind"] == "Secret"]
    assert PLACEHOLDER not in "".join(p.read_text() for p in K8S.rglob("*") if p.is_file())
    kust = yaml_docs(K8S / "kustomization.yaml")[0]
    (generator,) = kust["secretGenerator"]
    (entry,) = generator["files"]
    source = entry.partition("=")[2]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"deploy/kubernetes/{source}"], cwd=ROOT, timeout=60
    )
    assert ignored.returncode == 0, f"{source} must be ignored by git (the operator's token)"
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/kubernetes/secrets"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert tracked.split() == ["deploy/kubernetes/secrets/.gitignore"]

    for token in (PLACEHOLDER, "REPLACE-ME-" + "x" * 32, "changeme-changeme-changeme"):
        path = tmp_path / "token"
        path.write_text(token + "\n")
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*placeholder"):
            read_token(path)
        r = subprocess.run(
            [*unifork_argv(), "serve", "--listen", "127.0.0.1:0", "--token-file", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 2 and str(path) in r.stderr and "placeholder" in r.stderr, r
    real = tmp_path / "real"
    real.write_text(TOKEN + "\n")
    assert read_token(real) == TOKEN  # a random token still passes


def test_client_service_keeps_each_client_on_one_tender() -> None:
    """Before: each connection of `unifork wait ID` went to any tender, mostly not the one
    holding the instance (NOT_FOUND).  Now one client address sticks to one tender."""
    spec = k8s_object("Service", "unifork")["spec"]
    assert spec["sessionAffinity"] == "ClientIP"
    # long enough for a launch and a later wait on a long instance (the default time limit)
    assert spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] >= 3600
    assert "ClientIP" in (DEPLOY / "README.md").read_text()  # the choice is documented
    # the way around it: the launching tender by its stable name, through the headless Service
    assert k8s_object("StatefulSet")["spec"]["serviceName"] == "unifork-tenders"


def test_pod_disruption_budget_keeps_tenders_up_in_a_drain() -> None:
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= tender_labels().items()
    replicas = k8s_object("StatefulSet")["spec"]["replicas"]
    unavailable = pdb["spec"].get(
        "maxUnavailable", replicas - pdb["spec"].get("minAvailable", replicas)
    )
    assert 1 <= unavailable < replicas


def policy_admits(policy: dict, source: dict[str, str] | None, port: int | str) -> bool:
    """Does ``policy`` let a pod with labels ``source`` (None: anything outside the
    cluster's pods) reach a tender pod on ``port`` (a number or a container port name)?
    The Kubernetes semantics for what the manifests use: rules are ORed; a rule without
    ``from`` admits any source, without ``ports`` any port; a podSelector matches pods
    of the policy's namespace whose labels include its matchLabels."""
    c = k8s_tender()
    names = {p["name"]: p["containerPort"] for p in c["ports"]}
    number = names.get(port, port)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= tender_labels().items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        if peers is not None:
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"unexpected peer kind: {peer}"
            if source is None or not any(
                peer["podSelector"]["matchLabels"].items() <= source.items() for peer in peers
            ):
                continue
        ports = rule.get("ports")
        if ports is None or any(
            names.get(p["port"], p["port"]) == number and p.get("protocol", "TCP") == "TCP"
            for p in ports
        ):
            return True
    return False


def test_network_policy_lets_only_peers_reach_the_peer_port() -> None:
    policy = k8s_object("NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    tender = dict(tender_labels())
    other = {"app.kubernetes.io/name": "something-else"}
    ephemeral = 40000  # a VM-clone supervisor's listener or a cross-VM pipe
    # clients and Prometheus
    assert policy_admits(policy, None, "grpc") and policy_admits(policy, other, "grpc")
    assert policy_admits(policy, None, "metrics")
    # the peer API: tenders only
    assert policy_admits(policy, tender, "peer")
    assert not policy_admits(policy, None, "peer")
    assert not policy_admits(policy, other, "peer")
    assert not policy_admits(policy, {"app.kubernetes.io/name": "unifork"}, "peer")
    # VM-clone traffic between tenders on ephemeral ports, and nobody else's
    assert policy_admits(policy, tender, ephemeral)
    assert not policy_admits(policy, other, ephemeral)


def test_probes_are_native_grpc_checks_of_the_client_port() -> None:
    """Health checks are open (no token): the kubelet's own gRPC probe is used, and the
    docs say so (they used to say the token was needed)."""
    c = k8s_tender()
    gport = port_of(values(c["args"], "--listen")[0])
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[kind]) - {
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "initialDelaySeconds",
            "successThreshold",
        } == {"grpc"}, kind
        assert c[kind]["grpc"]["port"] == gport, kind
    docs = [
        (DEPLOY / "README.md").read_text(),
        (K8S / "statefulset.yaml").read_text(),
        HEALTHCHECK.read_text(),
    ]
    for text in docs:
        assert not re.search(
            r"(?i)health[^.\n]*(need|require)s? the token|with\W+the bearer "
            r"token|refuses (unauthenticated )?health",
            text,
        ), text[:200]


def test_kubernetes_limits_fit_the_container(monkeypatch) -> None:
    c = k8s_tender()
    a = parse_serve([re.sub(r"\$\((\w+)\)", "10.0.0.7", x) for x in c["args"]], monkeypatch)
    memory = quantity(c["resources"]["limits"]["memory"])
    assert a.max_guest_memory and a.max_guest_memory <= memory // 2, (a.max_guest_memory, memory)
    volumes = {
        v["name"]: v for v in k8s_object("StatefulSet")["spec"]["template"]["spec"]["volumes"]
    }
    (uploads,) = [m for m in c["volumeMounts"] if m["mountPath"].endswith("/uploads")]
    size = quantity(volumes[uploads["name"]]["emptyDir"]["sizeLimit"])
    assert a.max_upload <= a.max_image_store <= size


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 and "tender.test", and a client one."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    for name, san in (("server", "IP:127.0.0.1,DNS:tender.test"), ("client", "DNS:client")):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={name}",
                "-addext",
                f"subjectAltName={san}",
                "-keyout",
                str(d / f"{name}.key"),
                "-out",
                str(d / f"{name}.pem"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return {
        "cert": d / "server.pem",
        "key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }


def test_healthcheck_speaks_tls(tmp_path, tls_files) -> None:
    """deploy/healthcheck.py had no TLS option: a TLS tender could not be probed."""
    port = free_port()
    log = tmp_path / "tls.log"
    with open(log, "wb") as out:
        # the self-signed server certificate is its own CA (--tls-ca: the peers' CA)
        proc = subprocess.Popen(
            [
                *unifork_argv(),
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--peer-listen",
                f"127.0.0.1:{free_port()}",
                "--tls-cert",
                str(tls_files["cert"]),
                "--tls-key",
                str(tls_files["key"]),
                "--tls-ca",
                str(tls_files["cert"]),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    target = f"127.0.0.1:{port}"

    def probe(*extra: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("UNIFORK_TOKEN", "UNIFORK_TARGET")}
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK), "--target", target, "--timeout", "5", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    ca = ["--tls-ca", str(tls_files["cert"])]
    try:

        def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            return probe(*ca).returncode == 0

        wait_for("the TLS tender to serve", serving)
        r = probe(*ca)
        assert r.returncode == 0 and "SERVING" in r.stdout, r
        # a client certificate (mutual TLS) and a name to verify instead of the address
        r = probe(
            *ca,
            "--tls-cert",
            str(tls_files["client_cert"]),
            "--tls-key",
            str(tls_files["client_key"]),
            "--tls-server-name",
            "tender.test",
        )
        assert r.returncode == 0, r
        # plaintext against TLS, a name the certificate lacks: unhealthy, said why
        assert probe().returncode == 1
        r = probe(*ca, "--tls-server-name", "other.test")
        assert r.returncode == 1 and "unhealthy" in r.stderr, r
        # half a client certificate, or TLS options without a CA: a usage error
        for bad in (
            ["--tls-cert", str(tls_files["client_cert"])],
            ["--tls-key", str(tls_files["client_key"])],
            ["--tls-server-name", "x"],
        ):
            r = probe(*(ca if bad[0] != "--tls-server-name" else []), *bad)
            assert r.returncode == 2 and "--tls-" in r.stderr, (bad, r)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()


# -- real tenders from the deploy/ argument lists ------------------------------------------


def run_probe(command: list[str], target: str, token_file: Path) -> subprocess.CompletedProcess:
    """A probe command of deploy/ run here: its script, target and token file moved."""
    assert command[:2] == ["python", "/opt/unifork/healthcheck.py"], command
    argv = []
    for flag, value in pairs(command[2:]):
        value = {"--target": target, "--token-file": str(token_file)}.get(flag, value)
        argv += [flag] if value is None else [flag, value]
    if "--target" not in argv:
        argv += ["--target", target]
    env = {k: v for k, v in os.environ.items() if k not in ("UNIFORK_TOKEN", "UNIFORK_TARGET")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def kubelet_grpc_probe(probe: dict, port: int) -> int:
    """What the kubelet's `grpc:` probe does: a plaintext Health.Check, no metadata, of
    ``probe["service"]`` (default ""), here on ``port`` of loopback instead of the pod's."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=probe.get("service", "")), timeout=10)
            .status
        )


def test_compose_tenders_serve_with_their_arguments(compose_pair, token_file, tmp_path) -> None:
    a, b = compose_pair
    (health,) = [args for _, instr, args in dockerfile() if instr == "HEALTHCHECK"]
    probe = exec_form(health.partition("CMD ")[2])
    for t in (a, b):
        r = run_probe(probe, t.target, token_file)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SERVING" in r.stdout
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert "unifork_guest_memory_committed_bytes" in text
        assert "process_resident_memory_bytes" in text
    # health checks are open (orchestrators probe without credentials): a wrong token or
    # none still gets SERVING, while the API itself refuses them
    wrong = tmp_path / "wrong"
    wrong.write_text("x" * 32)
    assert run_probe(probe, a.target, wrong).returncode == 0
    assert run_probe(probe, a.target, tmp_path / "missing").returncode == 0
    tender_pb2, tender_grpc = protos.tender()
    with grpc.insecure_channel(a.target) as ch, pytest.raises(grpc.RpcError) as e:
        tender_grpc.TenderStub(ch).ListImages(
            tender_pb2.ListImagesRequest(),
            timeout=10,
            metadata=[("authorization", "Bearer " + "x" * 32)],
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_kubernetes_tender_serves_with_its_arguments(tmp_path, token_file) -> None:
    c = k8s_tender()
    t = Tender("k8s", [str(x) for x in c["args"]], tmp_path, token_file)
    argv = t.loopback_argv({})
    assert values(argv, "--peer") == ["dns:localhost"]  # resolves to itself: skipped
    try:
        t.start({})
        t.wait_healthy()
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert (
                kubelet_grpc_probe(c[kind]["grpc"], t.port)
                == health_pb2.HealthCheckResponse.SERVING
            ), kind
        # placement consults the dns: peers; the only address is this tender's own
        client = Client(t.target, TOKEN)
        try:
            pb2 = client.pb2
            iid = client.launch(
                "fork_time",
                [],
                console_pipe=True,
                fork_mode=pb2.FORK_MODE_VMCLONE,
                placement=pb2.PLACEMENT_SPREAD,
            )
            r = client.wait(iid, 120)
            assert r.done and r.outcome == "exited" and r.exit_code == 0, r
        finally:
            client.close()
    finally:
        code = t.stop()
    assert code == 0, t.tail()


# -- a real Prometheus scraping real tenders -----------------------------------------------


def prom_get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as the dashboard's defaults make them ('All' tenders)."""
    out = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    assert "$" not in out, f"unknown Grafana variable in {expr}"
    return out


def wait_for(what: str, fn, timeout: float = 60.0, interval: float = 0.25):
    return wait_until(fn, timeout, what, interval)


@contextlib.contextmanager
def prometheus(tmp_path: Path, targets: list[str]) -> Iterator[str]:
    """deploy/prometheus/prometheus.yml with the targets moved here, scraping every second."""
    config = prometheus_config()
    job = unifork_job(config)
    job["static_configs"] = [{"targets": targets}]
    job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["scrape_configs"] = [job]
    config["rule_files"] = [
        str((DEPLOY / "prometheus" / f).resolve()) for f in config.get("rule_files", [])
    ]
    (tmp_path / "prom.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prom.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_for("prometheus to be ready", ready)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def workload(a: Tender, b: Tender) -> int:
    """Thread and VM-clone instances (local and on the peer, shm and tcp) and some errors.

    Returns how many instances ended.
    """
    ca, cb = Client(a.target, TOKEN), Client(b.target, TOKEN)
    pb2 = ca.pb2
    try:
        jobs = []
        for image, args in (
            ("fork_time", ["-n", "5"]),
            ("token_ring", ["-n", "3", "-r", "3"]),
            ("pipe_talk", []),
        ):
            for client in (ca, cb):
                jobs.append(
                    (client, f"{image} thread", client.launch(image, args, console_pipe=True))
                )
            for transport in (pb2.PIPE_TRANSPORT_SHM, pb2.PIPE_TRANSPORT_TCP):
                for placement in (pb2.PLACEMENT_LOCAL, pb2.PLACEMENT_REMOTE):
                    what = (
                        f"{image} vmclone {pb2.PipeTransport.Name(transport)} "
                        f"{pb2.Placement.Name(placement)}"
                    )
                    jobs.append(
                        (
                            ca,
                            what,
                            ca.launch(
                                image,
                                args,
                                console_pipe=True,
                                fork_mode=pb2.FORK_MODE_VMCLONE,
                                pipe_transport=transport,
                                placement=placement,
                            ),
                        )
                    )
        jobs += published_traffic(ca)
        for client in (ca, cb):  # errors for the error panel
            for call in (
                lambda c=client: c.wait("no-such-instance"),
                lambda c=client: c.launch("no-such-image", []),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
        for client, what, iid in jobs:
            r = client.wait(iid, 120)
            assert r.done and r.outcome == "exited" and r.exit_code == 0, f"{what}: {r}"
        return len(jobs)
    finally:
        ca.close()
        cb.close()


def published_traffic(c: Client) -> list[tuple[Client, str, str]]:
    """prefork_http on A behind a port A publishes (workers local, then on the peer):
    requests for the connection panels, then the instance killed.  A connection to a
    published port nobody listens on yet is the "refused" series."""
    pb2 = c.pb2
    jobs = []
    for transport, placement in (
        (pb2.PIPE_TRANSPORT_SHM, pb2.PLACEMENT_LOCAL),
        (pb2.PIPE_TRANSPORT_TCP, pb2.PLACEMENT_REMOTE),
    ):
        iid = c.launch(
            "prefork_http",
            ["-p", "8080", "-w", "2"],
            console_pipe=True,
            fork_mode=pb2.FORK_MODE_VMCLONE,
            pipe_transport=transport,
            placement=placement,
            publish=[pb2.PortMapping(host_port=0, guest_port=8080)],
        )
        published = wait_for("the published port", lambda i=iid: c.describe(i).published)
        port = published[0].host_port

        def ok(p: int = port) -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", p, timeout=10)
                conn.request("GET", "/bytes/5000")
                r = conn.getresponse()
                return r.status == 200 and len(r.read()) == 5000
            except (OSError, http.client.HTTPException):
                return False  # not listening yet: the port closed it (a refused connection)

        wait_for("prefork_http to answer through the published port", ok)
        for _ in range(10):
            assert ok()
        c.kill(iid)
        r = c.wait(iid, 60)
        assert r.done and r.outcome == "killed", r
    return jobs


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (.ci/run installs Debian's package)",
)
def test_every_dashboard_query_has_data_in_prometheus(compose_pair, tmp_path) -> None:
    a, b = compose_pair
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    targets = [f"127.0.0.1:{t.metrics_port}" for t in (a, b)]
    with prometheus(tmp_path, targets) as base, ThreadPoolExecutor(4) as pool:

        def scraped_since(t0: float) -> bool:
            data = prom_get(base, "/api/v1/query", query='timestamp(up{job="unifork"} == 1)')
            return len(data["result"]) == 2 and all(
                float(r["value"][1]) > t0 for r in data["result"]
            )

        # round 1 makes every series; once scraped, round 2 makes every rate() non-zero
        workload(a, b)
        t1 = time.time()
        wait_for("a scrape of both tenders after round 1", lambda: scraped_since(t1))
        workload(a, b)

        def has_data(expr: str) -> list:
            result = prom_get(base, "/api/v1/query", query=grafana_to_promql(expr))["result"]
            return [r for r in result if math.isfinite(float(r["value"][1]))]

        def wait_data(item: tuple[str, str]) -> tuple[str, str, bool]:
            title, expr = item
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                if has_data(expr):
                    return title, expr, True
                time.sleep(0.5)  # ok-sleep: polling interval of a wait with a deadline
            return title, expr, False

        results = list(pool.map(wait_data, exprs))
        empty = [f"{title}: {expr}" for title, expr, ok in results if not ok]
        assert not empty, "no data for:\n" + "\n".join(empty)

        # the alert rules are loaded and evaluate without error on real metrics; with both
        # tenders up, UniforkTenderDown is not firing
        def rules_evaluated() -> list:
            groups = prom_get(base, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            ok = len(rules) == len(alert_rules()) and all(
                r["health"] == "ok" and r["lastEvaluation"] > "2000" for r in rules
            )
            return ok and rules

        rules = wait_for("the alert rules to be evaluated", rules_evaluated)
        assert {r["name"] for r in rules} == set(alert_rules())
        down = [r for r in rules if r["name"] == "UniforkTenderDown"][0]
        assert down["state"] == "inactive", down

        # the dashboard's tender variable lists both tenders
        var = dashboard()["templating"]["list"][0]
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"]).groups()
        series = prom_get(base, "/api/v1/series", **{"match[]": metric})
        assert {s[label] for s in series} == set(targets)

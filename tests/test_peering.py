"""Two tenders peered on loopback: the peer API's own listener, credential and TLS.

Real ``unifork serve`` processes (test_service.Tender): A launches, B is A's
peer (``--peer`` names B's peer listener).  Each test starts its own pair.

* An emulator crash of a VM placed on B ends only that instance: B's tender
  hands every VM to one of its pool workers, so B survives and serves on
  (finding 5).
* Two TLS tenders peer (mutual TLS on the peer listener, TLS when dialling);
  a plaintext caller, or one without a certificate of the cluster's CA, is
  refused (finding 7); half TLS configurations and a key that does not match
  its certificate are refused at start-up with one line and exit status 2.
"""

from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2
from test_service import (
    GUEST,
    HELLO,
    MODES,
    ROOT,
    SIGKILL,
    START_TIMEOUT,
    Tender,
    console,
    free_port,
    launch,
    rpc_error,
    stdout_of,
    stopped_cleanly,
    unifork_cmd,
    wait,
)
from tlscerts import make_ca, make_cert

from tender_service import protos
from tender_service.toolchain.images import build_image

pb2, _ = protos.tender()
ppb2, peer_grpc = protos.peer()

TOKEN = "client-token-0123456789abcdef"
PEER_TOKEN = "peer-token-0123456789abcdef"
REMOTE = dict(MODES["vmclone-tcp"], placement=pb2.PLACEMENT_REMOTE)


def warm(t: Tender) -> None:
    """SERVING comes before the warm pool is: a local VM-clone hello waits for it."""
    c = t.client()
    try:
        iid = launch(c, "hello", console_pipe=True, **MODES["vmclone-tcp"])
        r = wait(c, iid)
        assert (r.outcome, r.exit_code) == ("exited", 0), (r, t.log())
    finally:
        c.close()


def pair(workdir, tls_a=None, tls_b=None) -> tuple[Tender, Tender]:
    """B, then A with B as its peer (pools of one worker each, warm)."""
    b = Tender.start(workdir, "--pool", "1", token=TOKEN, peer_token=PEER_TOKEN, tls=tls_b)
    try:
        a = Tender.start(
            workdir,
            "--pool",
            "1",
            "--peer",
            b.peer_target,
            token=TOKEN,
            peer_token=PEER_TOKEN,
            tls=tls_a,
        )
    except BaseException:
        b.stop()
        raise
    try:
        warm(a)
        warm(b)
    except BaseException:
        a.stop()
        b.stop()
        raise
    return a, b


def hosts(c, iid: str) -> set[str]:
    return {p.host for p in c.describe(iid).processes if p.pid != 1}


def run_remote(a: Tender, b: Tender, image: str, args: list[str], want: bytes) -> None:
    """``image`` launched on A with placement remote: it runs on B, as natively."""
    c = a.client()
    try:
        iid = launch(c, image, args, console_pipe=True, **REMOTE)
        r = wait(c, iid)
        out = stdout_of(console(c, iid))
        assert (r.outcome, r.exit_code) == ("exited", 0), (list(r.reports), out, a.log(), b.log())
        assert out == want
        assert hosts(c, iid) == {b.target}, (c.describe(iid), b.log())
    finally:
        c.close()


def test_an_emulator_crash_on_a_peer_ends_only_its_instance(tmp_path):
    """tests/guest/x87_block.c crashes Unicorn 2.1.4.  Launched on A with placement
    remote, its VM runs on B: before, in B's tender process, which the crash took
    down; now in one of B's pool workers.  The instance ends with the lost-VM report,
    B's tender lives on and serves the next remote instances (forks included, which
    go from B's worker through B's relay, with a ticket, back to B)."""
    a, b = pair(tmp_path)
    try:
        c = a.client()
        x87 = c.upload("x87-block", build_image(GUEST / "x87_block.c").read_bytes()).name
        iid = launch(c, x87, console_pipe=True, **REMOTE)
        r = wait(c, iid)
        assert (r.done, r.outcome, r.signal, r.exit_code) == (True, "signaled", SIGKILL, 137), (
            list(r.reports),
            a.log(),
            b.log(),
        )
        assert any("its VM was lost" in line for line in r.reports), r.reports
        assert hosts(c, iid) == {b.target}
        c.close()
        assert b.proc.poll() is None, b.log()
        assert b.health() == health_pb2.HealthCheckResponse.SERVING
        run_remote(a, b, "hello", [], HELLO)
        run_remote(a, b, "fork_exit_wait", ["-n", "4"], b"ok 4 children\n")
    finally:
        stopped_cleanly(a)
        stopped_cleanly(b)


@pytest.fixture
def pki(tmp_path):
    ca = make_ca(tmp_path, "ca")
    return {
        "ca": ca,
        "a": make_cert(ca, tmp_path, "tender-a"),
        "b": make_cert(ca, tmp_path, "tender-b"),
        "stranger": make_cert(make_ca(tmp_path, "other-ca"), tmp_path, "stranger"),
    }


def tls_of(pki, name: str) -> tuple:
    return (pki[name].cert, pki[name].key, pki["ca"].cert)


def test_two_tls_tenders_peer(tmp_path, pki):
    """A and B with --tls-cert/--tls-key/--tls-ca: A dials B's peer listener with TLS,
    presenting its certificate; clones and their snapshots cross encrypted.  B's peer
    listener refuses a plaintext caller, a TLS caller without a certificate, and one
    whose certificate another CA signed, even with the peer token."""
    a, b = pair(tmp_path, tls_of(pki, "a"), tls_of(pki, "b"))
    try:
        run_remote(a, b, "fork_exit_wait", ["-n", "4"], b"ok 4 children\n")
        md = [("authorization", f"Bearer {PEER_TOKEN}")]
        ca = pki["ca"].cert.read_bytes()
        callers = {
            "plaintext": grpc.insecure_channel(b.peer_target),
            "no certificate": grpc.secure_channel(b.peer_target, grpc.ssl_channel_credentials(ca)),
            "another CA's certificate": grpc.secure_channel(
                b.peer_target,
                grpc.ssl_channel_credentials(
                    ca, pki["stranger"].key.read_bytes(), pki["stranger"].cert.read_bytes()
                ),
            ),
        }
        for name, ch in callers.items():
            with ch:
                e = rpc_error(
                    lambda ch=ch: peer_grpc.PeerStub(ch).GetLoad(
                        ppb2.LoadRequest(), metadata=md, timeout=10
                    )
                )
                assert e.code() == grpc.StatusCode.UNAVAILABLE, (name, e.code(), e.details())
        member = grpc.ssl_channel_credentials(
            ca, pki["a"].key.read_bytes(), pki["a"].cert.read_bytes()
        )
        with grpc.secure_channel(b.peer_target, member) as ch:
            stub = peer_grpc.PeerStub(ch)
            assert stub.GetLoad(ppb2.LoadRequest(), metadata=md, timeout=10).vms == 0
            e = rpc_error(lambda: stub.GetLoad(ppb2.LoadRequest(), timeout=10))
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED  # the cert is not all
        with grpc.insecure_channel(b.target) as ch:  # nor does the client port speak plain
            e = rpc_error(lambda: ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10))
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert b.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        stopped_cleanly(a)
        stopped_cleanly(b)


def serve_fails(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [
            *unifork_cmd(),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--peer-listen",
            f"127.0.0.1:{free_port()}",
            "--pool",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
    )
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return r


def test_half_tls_configurations_are_refused(tmp_path, pki):
    """--tls-cert without --tls-key served plaintext; a mismatched key gave a
    traceback.  Now: one line, exit status 2, nothing served."""
    cert, key, ca = pki["a"].cert, pki["a"].key, pki["ca"].cert
    r = serve_fails("--tls-cert", str(cert))
    assert "missing --tls-key, --tls-ca" in r.stderr, r.stderr
    r = serve_fails("--tls-cert", str(cert), "--tls-key", str(key))
    assert "missing --tls-ca" in r.stderr, r.stderr
    r = serve_fails("--tls-key", str(key), "--tls-ca", str(ca))
    assert "missing --tls-cert" in r.stderr, r.stderr
    r = serve_fails("--tls-cert", str(cert), "--tls-key", str(pki["b"].key), "--tls-ca", str(ca))
    assert "does not match" in r.stderr, r.stderr
    r = serve_fails("--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(key))
    assert "--tls-ca" in r.stderr, r.stderr


def test_peer_credentials_are_checked_at_start_up(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    r = serve_fails("--token-file", str(token), "--peer-token-file", str(token))
    assert "peers need a token of their own" in r.stderr, r.stderr
    r = subprocess.run(
        [
            *unifork_cmd(),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--peer-listen",
            f"0.0.0.0:{free_port()}",
            "--pool",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
    )
    assert r.returncode == 2, r
    assert (
        "refusing to serve the peer API on '0.0.0.0' without --peer-token-file or TLS" in r.stderr
    ), r.stderr

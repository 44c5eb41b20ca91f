"""A client of tenders that runs inside a test host (a network namespace).

Python 3.11 has no ``os.setns``, so the multi-host tests run their gRPC
clients in a process started with ``ip netns exec HOST``: this one.  It reads
one JSON request per line on stdin, ``{"op": ..., ...}``, and answers each
with one JSON line on stdout: ``{"ok": true, "value": ...}`` or
``{"ok": false, "error": "...", "code": "UNAVAILABLE"}``.

    python tests/mh_agent.py TOKEN_FILE
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tender_service import protos
from tender_service.service.auth import call_metadata, read_token
from tender_service.service.client import Client


def to_dict(msg) -> dict:
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class Agent:
    def __init__(self, token: str, peer_token: str) -> None:
        self.token = token
        self.md = call_metadata(token)
        self.peer_md = call_metadata(peer_token)  # Peer.GetLoad, on a peer listener
        self.clients: dict[str, Client] = {}
        self.tpb2, _ = protos.tender()
        self.ppb2, self.pgrpc = protos.peer()

    def client(self, target: str) -> Client:
        if target not in self.clients:
            self.clients[target] = Client(target, self.token)
        return self.clients[target]

    # -- ops ------------------------------------------------------------------------------
    def op_health(self, target: str, timeout: float = 60.0, service: str = "") -> str:
        """Wait until the tender at ``target`` says SERVING; the last status seen."""
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{target} not SERVING after {timeout:g} s: {status}")
                try:
                    r = stub.Check(
                        health_pb2.HealthCheckRequest(service=service),
                        timeout=min(left, 5.0),
                        wait_for_ready=True,
                        metadata=self.md,
                    )
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return status
                except grpc.RpcError as e:
                    status = e.code().name
                time.sleep(0.05)  # ok-sleep: polling interval of a wait with a deadline

    def op_upload(self, target: str, name: str, path: str) -> dict:
        with open(path, "rb") as f:
            data = f.read()
        return to_dict(self.client(target).upload(name, data))

    def op_launch(
        self,
        target: str,
        image: str,
        args: list[str],
        fork_mode: str = "vmclone",
        pipe_transport: str = "shm",
        placement: str = "local",
        time_limit: float = 0.0,
        console_pipe: bool = False,
        env: list[str] | None = None,
    ) -> str:
        pb2 = self.tpb2
        return self.client(target).launch(
            image,
            list(args),
            env=list(env or ()),
            fork_mode=pb2.ForkMode.Value(f"FORK_MODE_{fork_mode.upper()}"),
            pipe_transport=pb2.PipeTransport.Value(f"PIPE_TRANSPORT_{pipe_transport.upper()}"),
            placement=pb2.Placement.Value(f"PLACEMENT_{placement.upper()}"),
            time_limit_seconds=time_limit,
            console_pipe=console_pipe,
        )

    def op_wait(self, target: str, id: str, timeout: float = 60.0) -> dict:
        return to_dict(self.client(target).wait(id, timeout))

    def op_describe(self, target: str, id: str) -> dict:
        return to_dict(self.client(target).describe(id))

    def op_kill(self, target: str, id: str) -> bool:
        return self.client(target).kill(id)

    def op_logs(
        self,
        target: str,
        id: str,
        timeout: float = 60.0,
        until: str | None = None,
        from_start: bool = True,
    ) -> dict:
        """Console chunks [pid, fd, text] until the instance ends (or ``until`` shows up
        on stdout); ``complete`` says whether the stream ended or the text came."""
        call = self.client(target).logs(id, from_start)
        timer = threading.Timer(timeout, call.cancel)
        timer.start()
        chunks, out, complete = [], "", False
        try:
            for c in call:
                text = c.data.decode(errors="replace")
                chunks.append([c.pid, c.fd, text])
                if c.fd == 1:
                    out += text
                if until is not None and until in out:
                    complete = True
                    call.cancel()
                    break
            else:
                complete = until is None
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise
        finally:
            timer.cancel()
        return {"chunks": chunks, "complete": complete}

    def op_run(self, target: str, timeout: float = 90.0, **launch) -> dict:
        """Launch, follow the console to the end, wait, describe."""
        iid = self.op_launch(target, **launch)
        logs = self.op_logs(target, iid, timeout)
        result = self.op_wait(target, iid, timeout)
        return {
            "id": iid,
            "logs": logs,
            "result": result,
            "describe": self.op_describe(target, iid),
        }

    def op_load(self, target: str) -> dict:
        with grpc.insecure_channel(target) as ch:
            r = self.pgrpc.PeerStub(ch).GetLoad(
                self.ppb2.LoadRequest(), timeout=5.0, metadata=self.peer_md
            )
        return to_dict(r)

    def op_metrics(self, url: str) -> str:
        """The text of a tender's /metrics page."""
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def op_ping(self) -> str:
        return "pong"


def main() -> int:
    agent = Agent(read_token(sys.argv[1]), read_token(sys.argv[2]))
    protos.ensure()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.pop("op")
            value = getattr(agent, f"op_{op}")(**req)
            reply = {"ok": True, "value": value}
        except grpc.RpcError as e:
            reply = {"ok": False, "code": e.code().name, "error": e.details()}
        except Exception as e:  # reported to the test, which decides
            reply = {"ok": False, "code": type(e).__name__, "error": str(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Client commands against a tender: launch, ps, logs, wait, kill, images, upload,
delete-image, describe."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from tender_service import protos
from tender_service.rump import signals
from tender_service.service.auth import call_metadata, read_token

TOKEN_ENV = "UNIFORK_TOKEN"


class Client:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | None = None) -> None:
        self.pb2, grpc_mod = protos.tender()
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(
                target, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = grpc_mod.TenderStub(self.channel)
        self.md = call_metadata(token)

    def close(self) -> None:
        self.channel.close()

    def launch(self, image: str, args: list[str], **fields) -> str:
        req = self.pb2.LaunchRequest(image=image, args=args, **fields)
        return self.stub.Launch(req, metadata=self.md).instance_id

    def wait(self, instance_id: str, timeout: float = 0.0):
        return self.stub.Wait(self.pb2.WaitRequest(instance_id=instance_id,
                                                   timeout_seconds=timeout), metadata=self.md)

    def logs(self, instance_id: str, from_start: bool = True):
        return self.stub.StreamConsole(self.pb2.ConsoleRequest(instance_id=instance_id,
                                                               from_start=from_start),
                                       metadata=self.md)

    def kill(self, instance_id: str) -> bool:
        return self.stub.Kill(self.pb2.KillRequest(instance_id=instance_id),
                              metadata=self.md).was_running

    def describe(self, instance_id: str):
        return self.stub.Describe(self.pb2.DescribeRequest(instance_id=instance_id),
                                  metadata=self.md)

    def instances(self):
        return self.stub.ListInstances(self.pb2.ListInstancesRequest(), metadata=self.md).instances

    def images(self):
        return self.stub.ListImages(self.pb2.ListImagesRequest(), metadata=self.md).images

    def delete_image(self, name: str):
        return self.stub.DeleteImage(self.pb2.DeleteImageRequest(name=name), metadata=self.md)

    def upload(self, name: str, data: bytes, chunk: int = 1 << 20):
        def parts():
            yield self.pb2.UploadImageRequest(name=name)
            for off in range(0, len(data), chunk):
                yield self.pb2.UploadImageRequest(data=data[off : off + chunk])

        return self.stub.UploadImage(parts(), metadata=self.md)


def client_from(a: argparse.Namespace) -> Client:
    token = read_token(a.token_file) if a.token_file else os.environ.get(TOKEN_ENV)
    return Client(a.target, token, a.tls_ca)


def print_result(r) -> int:
    if not r.done:
        print(f"{r.instance_id}: still running", file=sys.stderr)
        return 124
    print(f"{r.instance_id}: {r.outcome}, {signals.describe_status(r.wait_status)}, "
          f"{r.duration_seconds * 1e3:.1f} ms, {r.fork_count} forks, peak guest memory "
          f"{r.peak_guest_memory_bytes} bytes", file=sys.stderr)
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


def cmd(a: argparse.Namespace) -> int:
    """Dispatch ``unifork launch|ps|logs|wait|kill|images|upload|delete-image|describe``."""
    c = client_from(a)
    pb2 = c.pb2
    try:
        if a.cmd == "launch":
            fields = dict(
                env=a.env,
                fork_mode=pb2.FORK_MODE_VMCLONE if a.fork == "vmclone" else pb2.FORK_MODE_THREAD,
                pipe_transport=pb2.PIPE_TRANSPORT_TCP if a.pipe == "tcp"
                else pb2.PIPE_TRANSPORT_SHM,
                placement={"remote": pb2.PLACEMENT_REMOTE, "spread": pb2.PLACEMENT_SPREAD}.get(
                    a.placement, pb2.PLACEMENT_LOCAL),
                memory_bytes=a.mem, time_limit_seconds=a.timeout or 0.0,
                max_procs=a.max_procs, console_pipe=a.console == "pipe")
            iid = c.launch(a.image, a.args, **fields)
            if not a.wait:
                print(iid)
                return 0
            stream_logs(c, iid, a.tag_pids)
            return print_result(c.wait(iid))
        if a.cmd == "ps":
            for s in c.instances():
                mode = "vmclone" if s.fork_mode == pb2.FORK_MODE_VMCLONE else "thread"
                print(f"{s.instance_id}  {s.state:<8} {mode:<8} {s.age_seconds:8.1f}s  {s.image}")
            return 0
        if a.cmd == "logs":
            stream_logs(c, a.instance, a.tag_pids, not a.live)
            return 0
        if a.cmd == "wait":
            return print_result(c.wait(a.instance, a.timeout or 0.0))
        if a.cmd == "kill":
            print("killed" if c.kill(a.instance) else "not running")
            return 0
        if a.cmd == "describe":
            d = c.describe(a.instance)
            print(d)
            return 0
        if a.cmd == "upload":
            data = Path(a.file).read_bytes()
            info = c.upload(a.name or Path(a.file).stem, data)
            print(f"{info.name} {info.size_bytes} {info.sha256}")
            return 0
        if a.cmd == "delete-image":
            info = c.delete_image(a.name)
            print(f"deleted {info.name} {info.size_bytes} {info.sha256}")
            return 0
        if a.cmd == "images":
            for i in c.images():
                print(f"{i.name:<24} {i.size_bytes:>9} {i.sha256[:16]} "
                      f"{'builtin' if i.builtin else 'uploaded'}")
            return 0
    except grpc.RpcError as e:
        print(f"unifork: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    finally:
        c.close()
    raise ValueError(a.cmd)

"""A tender's client API as Python calls (the commands that use it, and what a user
sees of them, are in unifork/remote.py)."""

from __future__ import annotations

from pathlib import Path

import grpc

from tender_service import protos
from tender_service.service.auth import call_metadata


class Client:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | None = None) -> None:
        self.pb2, grpc_mod = protos.tender()
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(
                target, options=[("grpc.max_send_message_length", 64 << 20)]
            )
        self.stub = grpc_mod.TenderStub(self.channel)
        self.md = call_metadata(token)

    def close(self) -> None:
        self.channel.close()

    def launch(self, image: str, args: list[str], **fields) -> str:
        req = self.pb2.LaunchRequest(image=image, args=args, **fields)
        return self.stub.Launch(req, metadata=self.md).instance_id

    def wait(self, instance_id: str, timeout: float = 0.0):
        return self.stub.Wait(
            self.pb2.WaitRequest(instance_id=instance_id, timeout_seconds=timeout), metadata=self.md
        )

    def logs(self, instance_id: str, from_start: bool = True):
        return self.stub.StreamConsole(
            self.pb2.ConsoleRequest(instance_id=instance_id, from_start=from_start),
            metadata=self.md,
        )

    def kill(self, instance_id: str) -> bool:
        return self.stub.Kill(
            self.pb2.KillRequest(instance_id=instance_id), metadata=self.md
        ).was_running

    def describe(self, instance_id: str):
        return self.stub.Describe(
            self.pb2.DescribeRequest(instance_id=instance_id), metadata=self.md
        )

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

"""gRPC server reflection under both names: the standard ``grpc.reflection.v1`` and the
older ``grpc.reflection.v1alpha``.

grpcio-reflection ships only v1alpha (grpc/grpc#38576); grpcurl, Postman and
grpc-java's clients ask for v1 first.  The two protocols are the same messages,
field for field, in another proto package, so the v1alpha servicer answers v1 calls
byte for byte: its method is registered a second time under the v1 name.  The v1
file descriptor (v1alpha's, renamed) joins the descriptor pool, so that v1 itself
can be reflected like any other listed service.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, reflection.SERVICE_NAME)


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """v1alpha's file descriptor, renamed to v1, into ``pool`` (once)."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    old = reflection_pb2.DESCRIPTOR.package
    fd = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fd)
    fd.name, fd.package = V1_FILE, V1_PACKAGE
    fd.ClearField("options")  # v1alpha's deprecation and language packages
    for msg in fd.message_type:
        for f in msg.field:
            if f.HasField("type_name"):  # a message field (setting it on others marks them)
                f.type_name = f.type_name.replace(f".{old}.", f".{V1_PACKAGE}.")
    for service in fd.service:
        for m in service.method:
            m.input_type = m.input_type.replace(f".{old}.", f".{V1_PACKAGE}.")
            m.output_type = m.output_type.replace(f".{old}.", f".{V1_PACKAGE}.")
    pool.Add(fd)


def enable_server_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Reflection of ``service_names`` and of both reflection services on ``server``."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = reflection.aio.ReflectionServicer((*service_names, *SERVICE_NAMES), pool=pool)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for name in SERVICE_NAMES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))

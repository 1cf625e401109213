"""Server reflection in both protocols: `grpc.reflection.v1` (what buf curl and grpcurl ask first) and `v1alpha`.

grpcio-reflection 1.81 ships only `grpc_reflection.v1alpha`. The v1 protocol is the same proto under another
package (grpc/reflection/v1/reflection.proto: the same messages with the same field numbers), so one servicer
answers both: on the v1 method path it reads and writes the identical wire format. The v1 file descriptor is built
from the v1alpha one and added to the default pool, so reflection can describe itself, and `ServerReflectionStub`
here is a v1 client (its messages are the v1 types).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from grpc import aio
from grpc_reflection.v1alpha import reflection as v1alpha_reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

V1ALPHA_SERVICE = v1alpha_reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
METHOD = "ServerReflectionInfo"
# The options of the canonical v1 proto (grpc-proto: grpc/reflection/v1/reflection.proto).
_V1_OPTIONS = {
    "go_package": "google.golang.org/grpc/reflection/grpc_reflection_v1",
    "java_multiple_files": True,
    "java_package": "io.grpc.reflection.v1",
    "java_outer_classname": "ServerReflectionProto",
}


def _v1_file() -> FileDescriptor:
    """The v1 reflection file in the default pool (built from v1alpha's unless something registered it already)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{v1alpha_pb2.DESCRIPTOR.package}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for key, value in _V1_OPTIONS.items():
        setattr(proto.options, key, value)
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = f".{V1_PACKAGE}." + f.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type[len(old) :]
            method.output_type = f".{V1_PACKAGE}." + method.output_type[len(old) :]
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(V1_FILE)


DESCRIPTOR = _v1_file()
ServerReflectionRequest: Any = message_factory.GetMessageClass(
    DESCRIPTOR.message_types_by_name["ServerReflectionRequest"]
)
ServerReflectionResponse: Any = message_factory.GetMessageClass(
    DESCRIPTOR.message_types_by_name["ServerReflectionResponse"]
)
ListServiceResponse: Any = message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name["ListServiceResponse"])


class ServerReflectionStub:
    """A `grpc.reflection.v1.ServerReflection` client, as a generated stub would be."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            f"/{SERVICE_NAME}/{METHOD}",
            request_serializer=ServerReflectionRequest.SerializeToString,
            response_deserializer=ServerReflectionResponse.FromString,
        )


def enable_server_reflection(service_names: list[str], server: aio.Server) -> None:
    """Serves reflection on `server` as v1 and v1alpha; `service_names` are listed with both reflection services."""
    names = [*service_names, SERVICE_NAME, V1ALPHA_SERVICE]
    servicer = v1alpha_reflection.aio.ReflectionServicer(list(dict.fromkeys(names)))
    v1alpha_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # The v1 path with the v1alpha codec: the bytes are the same, and the servicer builds v1alpha messages.
    handlers = {
        METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

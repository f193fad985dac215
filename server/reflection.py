"""Server reflection, v1alpha and v1, behind the call layer's token check (`CallGuard.authenticated_stream`).

grpcio-reflection serves the descriptors it is given: here, copies of the served files and their imports
that carry each field's JSON name, so a tool that learns the contract through reflection prints the same
JSON names as one given the .proto files or the committed descriptor set.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, text_format
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from streamflow.server.rpc import CallGuard

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""Reflection's GA name: grpcio-reflection ships only v1alpha, whose messages v1 kept as they were on the wire
(`buf curl` asks for v1 first; grpcurl 1.8 for v1alpha)."""


def register_reflection(server: grpc.aio.Server, service_names: Sequence[str], guard: CallGuard) -> None:
    """Serve server reflection, v1alpha and v1, for `service_names`, the error detail types and itself,
    behind the token check when the server has tokens: a service's shape is for its callers only.

    The descriptors served carry each field's JSON name, as protoc's and the committed descriptor set do: the
    generated Python modules' copies lack them, so grpcurl printed `user_id` through reflection where it
    prints `userId` from the .proto files."""
    default = descriptor_pool.Default()
    files = [default.FindFileContainingSymbol(name) for name in service_names]
    pool = descriptor_pool.DescriptorPool()
    for file in _with_dependencies([*files, error_details_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]):
        pool.Add(_with_json_names(file))
    pool.Add(_as_v1(_with_json_names(reflection_pb2.DESCRIPTOR)))
    reflection_names = (reflection.SERVICE_NAME, REFLECTION_V1)
    served = (*service_names, *reflection_names)
    servicer = reflection.aio.ReflectionServicer(served, pool=pool)  # type: ignore[attr-defined]
    handler = grpc.stream_stream_rpc_method_handler(
        guard.authenticated_stream(servicer.ServerReflectionInfo),
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in reflection_names
        )
    )


def _with_dependencies(files: Sequence[descriptor.FileDescriptor]) -> list[descriptor.FileDescriptor]:
    """`files` and everything they import, each after its imports (the order a pool accepts them in)."""
    ordered: dict[str, descriptor.FileDescriptor] = {}

    def visit(file: descriptor.FileDescriptor) -> None:
        if file.name not in ordered:
            for dependency in file.dependencies:
                visit(dependency)
            ordered[file.name] = file

    for file in files:
        visit(file)
    return list(ordered.values())


def _with_json_names(file: descriptor.FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    """`file` as a proto whose fields carry the JSON name protobuf computes for them (`CopyToProto` leaves
    json_name out when the file was built without it, as generated code builds it)."""
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)

    def fill(message: descriptor_pb2.DescriptorProto, message_type: descriptor.Descriptor) -> None:
        for declared in message.field:
            declared.json_name = message_type.fields_by_name[declared.name].json_name
        for nested in message.nested_type:
            fill(nested, message_type.nested_types_by_name[nested.name])

    for message in proto.message_type:
        fill(message, file.message_types_by_name[message.name])
    return proto


def _as_v1(v1alpha: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The reflection proto under its v1 package (text format has no length prefixes, so renaming is safe)."""
    v1 = text_format.Parse(
        text_format.MessageToString(v1alpha).replace("v1alpha", "v1"), descriptor_pb2.FileDescriptorProto()
    )
    v1.options.ClearField("deprecated")  # v1alpha is deprecated in favour of v1
    return v1

"""grpc.health.v1 and server reflection answer on every service."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from services.gateway.server import Gateway
from services.transcriber.server import Transcriber


async def _reflect(address: str, method: str) -> list[reflection_pb2.ServerReflectionResponse]:
    """Ask for the service list and the file defining every stt.v1 service, over v1alpha or v1."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        out = [listed]
        for svc in listed.list_services_response.service:
            if svc.name.startswith("stt."):
                await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=svc.name))
                out.append(await call.read())
        await call.done_writing()
        return out


@pytest.mark.parametrize("method", [
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
])  # fmt: skip
async def test_reflection_describes_every_service(gateway: Gateway, transcriber: Transcriber, method: str):
    for port, expected in (
        (gateway.port, {"stt.v1.Speech", "stt.v1.Jobs"}),
        (transcriber.port, {"stt.internal.v1.Transcriber"}),
    ):
        listed, *files = await _reflect(f"127.0.0.1:{port}", method)
        names = {s.name for s in listed.list_services_response.service}
        assert expected | {"grpc.health.v1.Health"} <= names
        described = set()
        for resp in files:
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                described |= {f"{fd.package}.{s.name}" for s in fd.service}
        assert expected <= described


async def test_health_on_every_service(gateway: Gateway, transcriber: Transcriber):
    for port, services in (
        (gateway.port, ["", "stt.v1.Speech", "stt.v1.Jobs", "dependency/transcribers"]),
        (transcriber.port, ["", "stt.internal.v1.Transcriber"]),
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in services:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING, (port, name)
            listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
            assert set(services) <= set(listed.statuses)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

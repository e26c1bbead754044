"""Builds a grpc.aio server with health, reflection, interceptors; runs it until SIGTERM/SIGINT.

`start_server` returns the running server with its bound port, so tests start real servers on
port 0 in-process and talk to them over real channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from services.shared.config import CommonSettings
from services.shared.interceptors import ErrorMapper, ServiceInterceptor
from services.shared.security import ANONYMOUS_WARNING
from services.shared.tls import ReloadingServerCredentials

log = logging.getLogger("server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass
class Service:
    """One gRPC service to host: its full name (for health and reflection) and how to add it."""

    name: str
    add: Callable[[grpc.aio.Server], None]


class HealthServicer(health_async.HealthServicer):
    """The stock asyncio health servicer plus the `List` RPC (all statuses at once)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in self._server_status.items()}
        )


def server_options(settings: CommonSettings, max_message_bytes: int) -> list[tuple[str, int]]:
    ms = 1000
    # Connection ageing sends GOAWAY after max_connection_age, so new calls go to a new connection
    # (and a new pod). Calls already running keep the old connection until they end unless a grace
    # is set: with grace 0 (the default) no live stream is ever cut by ageing (measured: with a
    # grace, grpc cancels every call still open when it expires, UNAVAILABLE "max connection age").
    grace = (
        [("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * ms))]
        if settings.max_connection_age_grace_seconds > 0
        else []
    )
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * ms)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * ms)),
        # Accept client pings as often as every 10 s (clients ping every 30 s by default).
        ("grpc.http2.min_ping_interval_without_data_ms", 10 * ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * ms)),
        *grace,
        ("grpc.so_reuseport", 0),
        # One connection cannot open thousands of calls at once (each may hold a decoder).
        ("grpc.max_concurrent_streams", max(1, settings.max_concurrent_streams)),
    ]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    services: list[str]
    grace: float
    tls: ReloadingServerCredentials | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    _on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _on_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def set_serving(self, serving: bool, services: Iterable[str] | None = None) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ["", *(services if services is not None else self.services)]:
            await self.health.set(name, status)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` after the server has drained (close pools, engines, connections)."""
        self._on_stop.append(fn)

    def on_drain(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` when shutdown starts, before in-flight calls are drained (stop background work)."""
        self._on_drain.append(fn)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: report NOT_SERVING, refuse new calls, let in-flight ones finish within grace."""
        await self.health.enter_graceful_shutdown()
        for fn in self._on_drain:
            try:
                await fn()
            except Exception:
                log.exception("error while draining")
        self._on_drain.clear()
        await self.server.stop(self.grace if grace is None else grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for fn in reversed(self._on_stop):
            try:
                await fn()
            except Exception:
                log.exception("error while stopping")
        self._on_stop.clear()


async def start_server(
    services: Sequence[Service],
    *,
    settings: CommonSettings,
    host: str,
    port: int,
    max_message_bytes: int = 4 * 1024 * 1024,
    serving: bool = True,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    error_mapper: ErrorMapper | None = None,
    anonymous: bool = False,
) -> RunningServer:
    """Serve `services` with health and (unless STT_REFLECTION=false) reflection; TLS when the
    settings name a certificate (mutual when they name a client CA). `anonymous`: the service runs
    without authentication off loopback; a health entry says so."""
    tls_files = settings.tls()
    tls_files.check()
    server = grpc.aio.server(
        # Ours first, so rejected calls (e.g. by auth) are logged and counted too.
        interceptors=[ServiceInterceptor(error_mapper), *interceptors],
        options=server_options(settings, max_message_bytes),
        # Calls beyond this many at once are refused with RESOURCE_EXHAUSTED instead of piling up.
        maximum_concurrent_rpcs=10_000,
    )
    for svc in services:
        svc.add(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [svc.name for svc in services]
    for name in ["", *names]:
        await health.set(name, SERVING if serving else NOT_SERVING)
    if anonymous:
        await health.set(ANONYMOUS_WARNING, SERVING)
    if settings.reflection:
        _enable_reflection(server, names)
    creds = ReloadingServerCredentials(tls_files) if tls_files.enabled else None
    address = f"{_bracket(host)}:{port}"
    bound = server.add_secure_port(address, creds.credentials) if creds else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    health_server, health_port = None, 0
    if settings.health_port:
        health_server, health_port = _health_only_server(health, host, settings.health_port)
    await server.start()
    if health_server is not None:
        await health_server.start()
    mode = "plaintext" if creds is None else ("mutual TLS" if tls_files.mutual else "TLS")
    log.info(
        "listening on %s:%d (%s)",
        host,
        bound,
        mode,
        extra={"services": ",".join(names), "health_port": health_port or None},
    )
    return RunningServer(
        server,
        bound,
        health,
        names,
        settings.shutdown_grace_seconds,
        tls=creds,
        health_server=health_server,
        health_port=health_port,
    )


def _health_only_server(health: HealthServicer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Plaintext grpc.health.v1 (and nothing else) for probes that cannot present a certificate."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 16)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{_bracket(host)}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the health port {host}:{port}")
    return server, bound


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _enable_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    all_names = (*names, health_name, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(all_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # grpc.reflection.v1 is wire-identical to v1alpha: serve both so every client finds one.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


async def run_until_signalled(
    servers: Sequence[RunningServer], *, extra_stop: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Block until SIGTERM/SIGINT, then drain every server (in order) and return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    if extra_stop is not None:
        await extra_stop()
    for running in servers:
        await running.stop()
    log.info("stopped")


def write_port_file(path: str | None, port: int) -> None:
    """Write the bound port for whoever started us with port 0 (tests, the local cluster)."""
    if not path:
        return
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{port}\n")
    os.replace(tmp, path)

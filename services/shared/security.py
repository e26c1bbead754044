"""Who may call a service: the internal services' caller check, and the fail-closed start rule.

Internal services (transcriber, jobstore) accept a call only when every configured credential
matches: with mutual TLS, the client certificate (already verified against STT_TLS_CLIENT_CA_FILE
by the handshake) must name one of STT_ALLOWED_CLIENTS (SAN or CN); with STT_SERVICE_TOKEN, the
call must carry `x-service-token: <token>`. Health and reflection stay open (probes).

A service bound to a non-loopback address with no credential configured refuses to start, unless
STT_ALLOW_ANONYMOUS=true says so explicitly (then it warns at start and in its health list).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.shared.context import audit
from services.shared.errors import PermissionDenied, ServiceError, Unauthenticated
from services.shared.status import abort
from services.shared.tls import is_tls, peer_identities

log = logging.getLogger("security")

SERVICE_TOKEN_HEADER = "x-service-token"
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Health entry present while a service runs without authentication off loopback.
ANONYMOUS_WARNING = "warning/anonymous-access"


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartRefused(SystemExit):
    """A configuration that would serve unauthenticated off loopback."""


def check_exposure(service: str, host: str, *, authenticated: bool, allow_anonymous: bool) -> bool:
    """Fail closed: refuse to serve unauthenticated on a non-loopback address. Returns True when
    the service runs anonymously off loopback (allowed explicitly: the caller warns in health)."""
    if authenticated or is_loopback(host):
        return False
    if not allow_anonymous:
        what = (
            "API keys (STT_API_KEYS)"
            if service == "gateway"
            else "mutual TLS (STT_TLS_CLIENT_CA_FILE) or a service token (STT_SERVICE_TOKEN)"
        )
        raise StartRefused(
            f"{service}: refusing to serve on {host} without authentication: configure {what}, "
            "bind to 127.0.0.1, or set STT_ALLOW_ANONYMOUS=true to accept anonymous callers"
        )
    log.warning(
        "%s serves ANONYMOUS callers on %s (STT_ALLOW_ANONYMOUS=true): anyone who reaches the port can "
        "use it",
        service,
        host,
    )
    return True


class InternalAuth:
    """The caller check of an internal service (see the module doc)."""

    def __init__(self, *, token: str = "", allowed: set[str] | None = None, mtls: bool = False) -> None:
        self.token = token
        self.allowed = allowed or set()
        self.mtls = mtls

    @property
    def enabled(self) -> bool:
        return bool(self.token) or self.mtls

    def check(self, metadata: Any, auth_context: dict[str, list[bytes]]) -> None:
        record = audit()
        if self.mtls:
            if not is_tls(auth_context):
                raise Unauthenticated("a client certificate is required", reason="UNAUTHENTICATED")
            names = peer_identities(auth_context)
            if self.allowed and not names & self.allowed:
                raise PermissionDenied(
                    f"client certificate {sorted(names)[:3]} may not call this service",
                    reason="CALLER_NOT_ALLOWED",
                )
            record.key_id = "cert:" + ",".join(sorted(names & self.allowed))
        if self.token:
            presented = ""
            for key, value in metadata or ():
                if key == SERVICE_TOKEN_HEADER and isinstance(value, str):
                    presented = value
            if not hmac.compare_digest(presented.encode(), self.token.encode()):
                raise Unauthenticated("missing or wrong service token", reason="UNAUTHENTICATED")
            record.key_id = record.key_id or "service-token"


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs InternalAuth.check inside each call (the peer certificate is only known there)."""

    def __init__(self, auth: InternalAuth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.auth.enabled or details.method.startswith(OPEN_METHODS):
            return handler
        return guarded(handler, lambda context: self.auth.check(details.invocation_metadata, _auth(context)))


def _auth(context: grpc.aio.ServicerContext) -> dict[str, list[bytes]]:
    try:
        return dict(context.auth_context() or {})
    except Exception:
        return {}


def guarded(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.aio.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    """The handler with `check(context)` run first; a ServiceError from it aborts the call."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                check(context)
            except ServiceError as exc:
                await abort(context, exc)
            return await behavior(request, context)

        return run

    def stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                check(context)
            except ServiceError as exc:
                await abort(context, exc)
            async for item in behavior(request, context):
                yield item

        return run

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kw)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kw)


def internal_auth(settings: Any) -> InternalAuth:
    """The caller check from a service's settings (STT_SERVICE_TOKEN, mTLS, STT_ALLOWED_CLIENTS)."""
    tls = settings.tls()
    allowed = {n.strip() for n in settings.allowed_clients.split(",") if n.strip()}
    return InternalAuth(token=settings.token(), allowed=allowed, mtls=tls.mutual)

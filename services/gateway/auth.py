"""API-key authentication, for every door of the gateway (gRPC here, HTTP in the front door).

`Authenticator.authenticate(token)` turns a presented key into a `Caller` (tenant, key id, read-only)
or raises Unauthenticated; the gRPC interceptor below reads `authorization: Bearer <key>` (or
`x-api-key`) and puts the caller in a contextvar for the call. With no keys configured every caller
is tenant "default". Health and reflection stay open.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.shared.errors import Unauthenticated
from services.shared.status import abort


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str = ""  # never the key itself
    read_only: bool = False


ANONYMOUS = Caller("default")
caller_var: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=ANONYMOUS)

_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_caller() -> Caller:
    return caller_var.get()


def current_tenant() -> str:
    return caller_var.get().tenant


def key_id(key: str) -> str:
    """A stable, non-secret id of a key for logs (the first 12 hex digits of its sha256)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Authenticator:
    """Keys -> callers. `keys` maps a key to its tenant; empty means no authentication."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.callers = {k: Caller(tenant, key_id(k)) for k, tenant in keys.items()}

    @property
    def enabled(self) -> bool:
        return bool(self.callers)

    def authenticate(self, token: str | None) -> Caller:
        if not self.enabled:
            return ANONYMOUS
        presented = (token or "").strip()
        found = None
        for key, caller in self.callers.items():  # compare with every key: no timing hint
            if hmac.compare_digest(key.encode(), presented.encode()):
                found = caller
        if found is None or not presented:
            raise Unauthenticated(
                "missing or invalid API key: send 'authorization: Bearer <key>'", reason="UNAUTHENTICATED"
            )
        return found


def token_from_metadata(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.auth.enabled or details.method.startswith(_OPEN):
            return handler
        try:
            caller = self.auth.authenticate(token_from_metadata(details.invocation_metadata))
        except Unauthenticated as exc:
            return _deny(handler, exc)
        caller_var.set(caller)  # copied into the handler's context
        return handler


def _deny(handler: grpc.RpcMethodHandler, err: Unauthenticated) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, err)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, err)
        yield  # pragma: no cover

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)

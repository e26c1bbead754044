"""API-key authentication: `authorization: Bearer <key>` (or `x-api-key`) -> tenant.

With no keys configured every caller is tenant "default". Health and reflection stay open.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="default")

_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_tenant() -> str:
    return tenant_var.get()


def _key_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tenants_by_key: dict[str, str]) -> None:
        self.keys = tenants_by_key

    def _tenant(self, metadata: Any) -> str | None:
        presented = _key_from(metadata)
        if not presented:
            return None
        for key, tenant in self.keys.items():
            if hmac.compare_digest(key, presented):
                return tenant
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.keys or details.method.startswith(_OPEN):
            return handler
        tenant = self._tenant(details.invocation_metadata)
        if tenant is None:
            return _deny(handler)
        tenant_var.set(tenant)  # copied into the handler's context
        return handler


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    msg = "missing or invalid API key: send 'authorization: Bearer <key>'"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
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

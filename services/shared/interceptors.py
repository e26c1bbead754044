"""Server interceptors: request ids, access logs, metrics, and domain errors -> rich status.

Servicers raise `services.shared.errors.ServiceError`; this layer turns it into the canonical
status with details, so no servicer repeats that code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.shared import errors, metrics, tracing
from services.shared.context import (
    REQUEST_ID_HEADER,
    CallAudit,
    audit_var,
    call_cleanups_var,
    new_request_id,
    request_id_var,
)
from services.shared.domain import MAX_REQUEST_ID_CHARS
from services.shared.status import abort, code_for

log = logging.getLogger("access")

# Calls logged at DEBUG when they succeed: probes, and the long polls and heartbeats an idle or
# busy cluster makes all the time.
_QUIET = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/stt.internal.v1.JobStore/ClaimJob",
    "/stt.internal.v1.JobStore/Heartbeat",
    "/stt.internal.v1.Transcriber/GetInfo",
)


def _valid_request_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_REQUEST_ID_CHARS
        and all(33 <= ord(c) <= 126 for c in value)
    )


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and _valid_request_id(value):
            return str(value)
    return new_request_id()


ErrorMapper = Callable[[BaseException], errors.ServiceError | None]


class _Malformed:
    """Stands for a request message that did not parse (bad wire format, invalid UTF-8 in a string
    field, ...), so the call gets INVALID_ARGUMENT instead of gRPC's own INTERNAL."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def error(self) -> errors.InvalidInput:
        return errors.InvalidInput(
            f"the request message is not valid protobuf for this method ({type(self.exc).__name__})",
            reason="BAD_FIELD_VALUE",
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return _Malformed(exc)

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Malformed):
            raise item.error()
        yield item


def _check_request(request: Any, streaming: bool) -> Any:
    if streaming:
        return _checked(request)
    if isinstance(request, _Malformed):
        raise request.error()
    return request


class _Call:
    """Bookkeeping for one RPC: request id, timing, final code, access log and metrics."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, mapper: ErrorMapper | None) -> None:
        self.mapper = mapper
        self.method = method
        self.context = context
        self.rid = _request_id(context)
        # Read now: touching the call's C-core state after it ended (a client that went away) can crash.
        self.peer = context.peer()
        self.token = request_id_var.set(self.rid)
        self.audit = CallAudit()
        self.audit_token = audit_var.set(self.audit)
        self.cleanups = call_cleanups_var.get()
        self.trace = (
            tracing.start_rpc(method, context.invocation_metadata(), quiet=method.startswith(_QUIET))
            if tracing.enabled()
            else None
        )
        self.headers_sent = False
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.error = ""
        metrics.RPC_IN_FLIGHT.labels(method).inc()

    async def headers(self) -> None:
        """Echo the request id in the response headers, just before the first response message.
        Not earlier: a client may only retry a call (UNAVAILABLE) until headers arrive. Errors carry
        it in their trailers instead."""
        if self.headers_sent:
            return
        self.headers_sent = True
        with contextlib.suppress(Exception):
            await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.rid),))

    async def fail(self, exc: BaseException) -> None:
        if self.mapper is not None and not isinstance(exc, errors.ServiceError | asyncio.CancelledError):
            exc = self.mapper(exc) or exc
        if isinstance(exc, errors.ServiceError):
            self.code, self.error = code_for(exc), exc.message
            await abort(self.context, exc)
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        code = self.context.code()
        if code is not None and code != grpc.StatusCode.OK:
            # context.abort() raised: keep the code it set.
            self.code = code
            self.error = self.context.details() or ""
            raise exc
        self.code = grpc.StatusCode.INTERNAL
        self.error = f"{type(exc).__name__}: {exc}"
        log.exception("unhandled error in %s", self.method)
        await abort(
            self.context,
            errors.Internal(f"internal error; report it with request id {self.rid}", reason="INTERNAL"),
        )

    def done(self) -> None:
        """End the call: access log and metrics, the call's cleanups, its span, its context. Every
        step runs even if one before it fails. A stream can end in another asyncio context than the
        one it began in (a client cancelled while its response was being sent: the handler's
        generator is then closed later by the event loop's finaliser, in a task of its own), where
        the context variables set at the start cannot be reset."""
        for step in (self._record, self._run_cleanups, self._end_span, self._restore_context):
            try:
                step()
            except Exception:
                log.exception("ending the call %s failed", self.method)

    def _record(self) -> None:
        code = self.context.code()
        if self.code == grpc.StatusCode.OK and code is not None:
            self.code = code
        elapsed = time.perf_counter() - self.start
        name = self._name
        metrics.RPC_IN_FLIGHT.labels(self.method).dec()
        metrics.RPC_TOTAL.labels(self.method, name).inc()
        metrics.RPC_SECONDS.labels(self.method).observe(elapsed)
        quiet = self.method.startswith(_QUIET) and name in ("OK", "CANCELLED")
        level = logging.DEBUG if quiet else (logging.INFO if name in ("OK", "CANCELLED") else logging.WARNING)
        a = self.audit
        # The call's own ids, not the current context's: a call can end in another context (see
        # done), where they are another call's or none.
        ids = tracing.handle_log_ids(self.trace)
        log.log(
            level,
            "%s %s %.1fms",
            self.method,
            name,
            elapsed * 1000,
            extra={
                "method": self.method,
                "status": name,
                "tenant": a.tenant or "-",
                "key_id": a.key_id or "-",
                "audio_bytes": a.audio_bytes,
                "peer": self.peer,
                "error": self.error,
                "request_id": self.rid,
                **({"trace_id": ids[0], "span_id": ids[1]} if ids is not None else {}),
            },
        )

    @property
    def _name(self) -> str:
        return self.code.name if isinstance(self.code, grpc.StatusCode) else str(self.code)

    def _run_cleanups(self) -> None:
        for fn in self.cleanups or ():
            try:
                fn()
            except Exception:
                log.exception("call cleanup failed")

    def _end_span(self) -> None:
        code_value = self.code.value[0] if isinstance(self.code, grpc.StatusCode) else 2
        tracing.end_rpc(self.trace, self._name, code_value, self.error)

    def _restore_context(self) -> None:
        _reset(audit_var, self.audit_token, self.audit, None)
        _reset(request_id_var, self.token, self.rid, "")


def _reset(var: contextvars.ContextVar[Any], token: contextvars.Token[Any], value: Any, default: Any) -> None:
    """Undo `var.set(value)` (which returned `token`). In another context than the one it was set
    in the token cannot be used: there the variable goes back to its default if it holds `value`."""
    try:
        var.reset(token)
    except ValueError:  # "created in a different Context"
        if var.get() is value:
            var.set(default)


DRAIN_SECONDS = 0.5


async def _drain(requests: Any) -> None:
    """Before failing a client-streaming call, read what the client is still sending for a moment.

    A gRPC C-core client (Python, Ruby, C#, PHP, ...) whose write is in flight when the error
    arrives reports "INTERNAL: Internal error from Core" instead of our status; a client that has
    finished writing (or writes at real-time pace) then sees the real error."""
    if requests is None or not hasattr(requests, "__aiter__"):
        return

    async def consume() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(consume(), timeout=DRAIN_SECONDS)


def _wrap_unary(
    method: str,
    behavior: Callable[..., Awaitable[Any]],
    mapper: ErrorMapper | None,
    *,
    client_streaming: bool = False,
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, context, mapper)
        try:
            response = await behavior(_check_request(request, client_streaming), context)
            await call.headers()
            return response
        except BaseException as exc:
            if client_streaming and isinstance(exc, Exception):
                await _drain(request)
            await call.fail(exc)
        finally:
            call.done()

    return wrapper


def _wrap_stream(
    method: str, behavior: Callable[..., Any], mapper: ErrorMapper | None, *, client_streaming: bool = False
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(method, context, mapper)
        try:
            result = behavior(_check_request(request, client_streaming), context)
            if inspect.isasyncgen(result):
                async for item in result:
                    await call.headers()
                    yield item
            else:  # a handler that writes with context.write() (e.g. the health Watch)
                await result
        except GeneratorExit:  # the stream was closed from our side of the call (client gone)
            call.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:
            if client_streaming and isinstance(exc, Exception):
                await _drain(request)
            await call.fail(exc)
        finally:
            call.done()

    return wrapper


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """`error_mapper` turns other exceptions (e.g. a lost database connection) into domain errors."""

    def __init__(self, error_mapper: ErrorMapper | None = None) -> None:
        self.mapper = error_mapper

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, self.mapper), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, handler.stream_unary, self.mapper, client_streaming=True), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, self.mapper), **kwargs
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(method, handler.stream_stream, self.mapper, client_streaming=True), **kwargs
            )
        return handler

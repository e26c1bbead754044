"""The HTTP door's cross-cutting layer (the gRPC interceptors' counterpart), as plain ASGI:
request ids, API-key authentication into `caller_var`, body limits while receiving, access log and
metrics. Handlers below it see `current_caller()` / `current_tenant()` exactly as gRPC servicers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers, MutableHeaders

from services.gateway.auth import ANONYMOUS, Caller, caller_var
from services.gateway.http.context import HttpContext
from services.gateway.http.errors import body_of, headers_of, status_of
from services.shared import metrics, tracing
from services.shared.context import REQUEST_ID_HEADER, new_request_id, request_id_var
from services.shared.domain import MAX_REQUEST_ID_CHARS
from services.shared.errors import DeadlineExceeded, LimitExceeded, ServiceError, Unauthenticated

log = logging.getLogger("access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths anyone may fetch: the page and its assets, the API docs, health.
OPEN_PREFIXES = ("/static/", "/docs", "/openapi.json", "/healthz", "/readyz")
OPEN_PATHS = ("/", "/favicon.ico")
FORM_OVERHEAD = 1024 * 1024  # multipart boundaries and the small form fields around the file
SMALL_BODY = 1024 * 1024  # every other request body
# A request body from which no bytes arrive for this long is refused (408, STREAM_IDLE) and its
# connection closed: a stalled upload does not hold the request, nor its spooled part, for longer.
BODY_IDLE_SECONDS = 30.0
# Before a body over the limit is answered (413, and the connection closed), what the client is
# still sending is read and dropped for up to this long and this many bytes: closing a socket with
# unread bytes resets it, and a client still writing would see the reset instead of the 413.
LINGER_SECONDS = 1.0
LINGER_BYTES = 16 * 1024 * 1024


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def valid_request_id(value: str | None) -> bool:
    return (
        bool(value)
        and len(value or "") <= MAX_REQUEST_ID_CHARS
        and all(33 <= ord(c) <= 126 for c in value or "")
    )


def token_of(scope: Scope, headers: Headers) -> str:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    if scope["type"] == "websocket":
        # Browsers cannot set headers on a WebSocket: the key comes as a subprotocol (as OpenAI's
        # Realtime API takes it from browsers).
        for proto in headers.get("sec-websocket-protocol", "").split(","):
            proto = proto.strip()
            if proto.startswith("openai-insecure-api-key."):
                return proto.removeprefix("openai-insecure-api-key.")
    return ""


class FrontDoor:
    def __init__(self, app: ASGIApp, ctx: HttpContext) -> None:
        self.app = app
        self.ctx = ctx

    def body_limit(self, scope: Scope) -> int:
        s = self.ctx.settings
        path = scope["path"].rstrip("/")
        if path == "/v1/audio/transcriptions":
            return s.max_recognize_bytes + FORM_OVERHEAD
        if path == "/v1/jobs" and scope.get("method") == "POST":
            return s.max_job_bytes + FORM_OVERHEAD
        return SMALL_BODY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = headers.get(REQUEST_ID_HEADER)
        rid = rid if rid is not None and valid_request_id(rid) else new_request_id()
        rid_token = request_id_var.set(rid)
        method = scope.get("method", "WS")
        trace = tracing.start_http(method, scope["path"], headers) if tracing.enabled() else None
        started = time.perf_counter()
        # status, error: for the log; answered: the front door answered for the app (its body was
        # refused); gone: the client went away before its body had all arrived.
        state: dict[str, Any] = {"status": 0, "error": "", "answered": False, "gone": False}
        caller: Caller = ANONYMOUS

        async def send_with_id(message: Message) -> None:
            if state["answered"]:
                return  # the app's own answer to a body the front door refused: already answered
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                # Set, not appended: error responses already carry it (headers_of).
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            elif message["type"] == "websocket.accept":
                state["status"] = 101
            elif message["type"] == "websocket.close" and not state["status"]:
                state["status"] = 403
            await send(message)

        try:
            if self.ctx.auth.enabled and not is_open(scope["path"]):
                try:
                    caller = self.ctx.auth.authenticate(token_of(scope, headers))
                except Unauthenticated as exc:
                    state["status"], state["error"] = 401, exc.message
                    await self.deny(scope, receive, send, exc, rid)
                    return
            caller_token = caller_var.set(caller)
            try:
                if scope["type"] == "http":
                    limit = self.body_limit(scope)
                    declared = headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        too_big = _too_large(limit)
                        state["status"], state["error"] = 413, too_big.message
                        await self.deny(scope, receive, send, too_big, rid)
                        return
                    receive = self._body(receive, send, state, limit, rid)
                await self.app(scope, receive, send_with_id)
            finally:
                caller_var.reset(caller_token)
        finally:
            self.log(scope, method, state, started, caller)
            tracing.end_http(trace, state["status"], getattr(scope.get("route"), "path", None))
            request_id_var.reset(rid_token)

    def _body(self, receive: Receive, send: Send, state: dict[str, Any], limit: int, rid: str) -> Receive:
        """The request body as the app reads it: counted against `limit`, and each read waiting at
        most BODY_IDLE_SECONDS. Past either the front door answers itself (413 AUDIO_TOO_LARGE or
        408 STREAM_IDLE, closing the connection) and tells the app the client is gone: the app
        stops reading (starlette's ClientDisconnect) and cleans up, and its answer goes nowhere.
        Once the body is whole, reads pass through (they wait for the client to leave)."""
        seen = 0
        done = False

        async def linger() -> None:
            dropped = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINGER_SECONDS):
                    while dropped < LINGER_BYTES:
                        message = await receive()
                        dropped += len(message.get("body", b""))
                        if message["type"] == "http.disconnect" or not message.get("more_body", False):
                            return

        async def refuse(exc: ServiceError, *, sending: bool = False) -> Message:
            nonlocal done
            done = True
            if sending and state["status"] == 0:
                await linger()
            state["error"] = exc.message
            if state["status"] == 0:  # (an app that answered before reading all of it: too late)
                state["status"] = status_of(exc)[0]
                state["answered"] = True
                await _respond(send, exc, rid, close=True)
            return {"type": "http.disconnect"}

        async def wrapped() -> Message:
            nonlocal seen, done
            if done:
                return await receive()
            try:
                async with asyncio.timeout(BODY_IDLE_SECONDS):
                    message = await receive()
            except TimeoutError:
                return await refuse(
                    DeadlineExceeded(
                        f"no bytes of the request body arrived for {BODY_IDLE_SECONDS:g}s (received "
                        f"{seen} bytes); the request is refused and the connection closed",
                        reason="STREAM_IDLE",
                    )
                )
            if message["type"] == "http.disconnect":
                done = True
                state["gone"] = True
                state["error"] = f"the client went away after {seen} bytes of the request body"
                return message
            seen += len(message.get("body", b""))
            if seen > limit:
                return await refuse(_too_large(limit), sending=message.get("more_body", False))
            done = not message.get("more_body", False)
            return message

        return wrapped

    async def deny(self, scope: Scope, receive: Receive, send: Send, exc: ServiceError, rid: str) -> None:
        if scope["type"] == "http":
            await _respond(send, exc, rid)
            return
        status, _ = status_of(exc)
        body = json.dumps(body_of(exc)).encode()
        hdrs = _headers(exc, rid, body)
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": hdrs})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})

    def log(self, scope: Scope, method: str, state: dict[str, Any], started: float, caller: Caller) -> None:
        route = scope.get("route")
        name = f"HTTP {method} {getattr(route, 'path', None) or scope['path']}"
        if not (scope["path"].startswith("/v1/") or route is not None):
            name = f"HTTP {method} (other)"  # bound the metric labels: unknown paths share one
        elapsed = time.perf_counter() - started
        # 499 (nginx's "client closed request"): whatever the app made of it went nowhere.
        status = 499 if state["gone"] and not state["answered"] else int(state["status"] or 0)
        metrics.RPC_TOTAL.labels(name, str(status)).inc()
        metrics.RPC_SECONDS.labels(name).observe(elapsed)
        quiet = scope["path"].startswith(("/static/", "/healthz", "/readyz"))
        level = logging.DEBUG if quiet else (logging.INFO if status < 500 else logging.WARNING)
        log.log(
            level,
            "%s %s %d %.1fms",
            method,
            scope["path"],
            status,
            elapsed * 1000,
            extra={
                "tenant": caller.tenant,
                "key_id": caller.key_id,
                "peer": ":".join(str(p) for p in scope.get("client") or ()),
                "error": state["error"],
            },
        )


def _too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(
        f"the request body is over the {limit} byte limit",
        reason="AUDIO_TOO_LARGE",
        field="file",
        metadata={"limit_bytes": str(limit)},
    )


def _headers(exc: ServiceError, rid: str, body: bytes) -> list[tuple[bytes, bytes]]:
    hdrs = [(k.lower().encode(), v.encode()) for k, v in headers_of(exc, rid).items()]
    return [*hdrs, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


async def _respond(send: Send, exc: ServiceError, rid: str, *, close: bool = False) -> None:
    """An error response in the app's format, from the front door itself. `close`: the request's
    body was not read to its end, so the connection cannot carry another request."""
    status, _ = status_of(exc)
    body = json.dumps(body_of(exc)).encode()
    hdrs = _headers(exc, rid, body) + ([(b"connection", b"close")] if close else [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})

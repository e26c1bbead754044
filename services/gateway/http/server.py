"""The HTTP front door's server: uvicorn on the gateway's own event loop (no thread, no second
process), started and drained with the gRPC server.

Drain (SIGTERM): `begin_drain` stops accepting connections; live sockets go on until shortly before
the shutdown grace ends, then finish the audio they have and close (see live.py); `stop` waits for
them and for in-flight requests within the grace, and cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.gateway.http.app import create_app
from services.gateway.http.context import HttpContext

log = logging.getLogger("gateway.http")

WS_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one WebSocket message (a Realtime append is base64 JSON)
CUT_MARGIN = 5.0  # seconds of the drain's grace kept for live sockets' last results
# A connection whose request headers have not all arrived this long after it opened (or after the
# first bytes of its next request) is closed, with 408 if some had. (A stalled body: middleware.)
HEADER_TIMEOUT_SECONDS = 30.0
_LATE = b"the request headers did not arrive in time"
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_LATE), _LATE)
)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers. uvicorn has none: a
    client that opens a connection and sends nothing, or part of its headers, holds the connection
    (and its memory) for as long as it likes; its keep-alive timeout only covers the wait between
    requests, and ends as soon as a byte arrives. Armed while h11 waits for a request (their state
    IDLE) with no timer running; disarmed as soon as the request line and headers are in."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._check_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _check_headers(self) -> None:
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._disarm()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        partial = bool(self.conn.trailing_data[0])
        if partial:  # a request had begun: say why it ends (no request was parsed: h11 cannot)
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
            log.info(
                "closed a connection from %s: its request headers did not arrive within %gs",
                ":".join(str(p) for p in self.client or ()),
                HEADER_TIMEOUT_SECONDS,
            )
        self.transport.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, ctx: HttpContext, host: str, port: int, grace: float) -> None:
        self.ctx = ctx
        self.grace = grace
        self.app: Any = create_app(ctx)
        self.sock = _bind(host, port)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,  # our middleware logs one line per request, with tenant and key id
            server_header=False,
            http=HeaderTimeoutProtocol,
            ws="websockets-sansio",
            ws_max_size=WS_MAX_MESSAGE_BYTES,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=max(1, math.ceil(grace)),
        )
        self.server = uvicorn.Server(self.config)
        self._deadline: float | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._cut_timer: asyncio.TimerHandle | None = None
        self._stopped = False

    async def start(self) -> None:
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self.sock])
        # Ticks once per 0.1 s: keeps the Date header current; ends once should_exit is set.
        self._ticker = asyncio.create_task(self.server.main_loop(), name="http-ticker")
        log.info("http listening on %s:%d", self.host, self.port)

    async def begin_drain(self) -> None:
        """Stop accepting connections; live sockets finish what they have and close."""
        if self._deadline is not None:
            return
        self._deadline = time.monotonic() + self.grace
        self.ctx.draining.set()
        for server in self.server.servers:
            server.close()
        # Live sockets are cut before the grace ends, leaving time for their last results.
        cut_after = max(0.0, self.grace - min(CUT_MARGIN, self.grace * 0.25))
        self._cut_timer = asyncio.get_running_loop().call_later(cut_after, self.ctx.cut.set)

    async def stop(self, grace: float | None = None) -> None:
        """Wait for live sockets and in-flight requests (until the grace is over), then close."""
        if self._stopped:
            return
        self._stopped = True
        if grace is not None and grace < self.grace:
            self.grace = grace
            self._deadline = None
            if self._cut_timer is not None:
                self._cut_timer.cancel()
        await self.begin_drain()
        assert self._deadline is not None
        remaining = max(0.0, self._deadline - time.monotonic())
        if self.ctx.live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ctx.live_done.wait(), remaining)
        self.config.timeout_graceful_shutdown = max(1, math.ceil(self._deadline - time.monotonic()))
        self.server.should_exit = True
        try:
            await self.server.shutdown(sockets=[self.sock])
        except Exception:
            log.exception("error while stopping the HTTP server")
        if self._ticker is not None:
            await self._ticker
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        log.info("http stopped")

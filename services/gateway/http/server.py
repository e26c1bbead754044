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

import uvicorn

from services.gateway.http.app import create_app
from services.gateway.http.context import HttpContext

log = logging.getLogger("gateway.http")

WS_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one WebSocket message (a Realtime append is base64 JSON)
CUT_MARGIN = 5.0  # seconds of the drain's grace kept for live sockets' last results


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

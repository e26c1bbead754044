"""What the HTTP handlers share: the door-agnostic APIs, auth, settings, and the drain signal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.jobs import JobsAPI
from services.gateway.speech import SpeechAPI
from services.shared.errors import NotFound
from stt.v1 import speech_pb2


@dataclass
class HttpContext:
    settings: GatewaySettings
    speech: SpeechAPI
    jobs: JobsAPI
    auth: Authenticator
    server_info: Callable[[], Awaitable[speech_pb2.ServerInfo]]
    # Set when the gateway starts draining (no new connections; /readyz says not ready).
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    # Set a little before the drain's grace runs out: live sockets still open then end their audio,
    # send its final results and close with 1012. Sockets that end before it are not disturbed.
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    # Live WebSocket sessions in progress (the drain waits for them).
    live: set[asyncio.Task[None]] = field(default_factory=set)
    live_done: asyncio.Event = field(default_factory=asyncio.Event)

    def model_names(self) -> list[str]:
        caps = self.speech.caps()
        names = [caps.name] if caps and caps.name else []
        return names + [a for a in self.settings.model_aliases() if a not in names]

    def check_model(self, model: str, field: str = "model") -> None:
        """A model name the client asked for: the loaded model's own or an alias, else NOT_FOUND
        (404 over HTTP, an error event on a Realtime socket) naming `field`."""
        names = self.model_names()
        if model and names and model not in names:
            raise NotFound(
                f"The model `{model}` does not exist; this server has {', '.join(names)}",
                reason="BAD_FIELD_VALUE",
                field=field,
            )

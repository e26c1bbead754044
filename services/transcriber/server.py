"""Builds the transcriber: engine + batcher + gRPC server. The model loads in the background;
health reports NOT_SERVING (and Transcribe answers UNAVAILABLE) until it is warm."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import Gauge

from services.shared.internal.v1 import transcriber_pb2, transcriber_pb2_grpc
from services.shared.security import InternalAuthInterceptor, check_exposure, internal_auth
from services.shared.server import RunningServer, Service, start_server
from services.transcriber.batcher import Batcher
from services.transcriber.config import TranscriberSettings
from services.transcriber.engine import Engine
from services.transcriber.servicer import MAX_PCM_BYTES, TranscriberServicer

log = logging.getLogger("transcriber")

SERVICE_NAME = transcriber_pb2.DESCRIPTOR.services_by_name["Transcriber"].full_name
READY = Gauge("stt_transcriber_ready", "1 once the model is loaded and the transcriber serves, else 0")


@dataclass
class Transcriber:
    running: RunningServer
    engine: Engine
    batcher: Batcher

    @property
    def port(self) -> int:
        return self.running.port

    async def load(self) -> None:
        """Load and warm the model in a thread, then report SERVING."""
        if not self.engine.ready:
            await asyncio.to_thread(self.engine.load)
        await self.running.set_serving(True)
        READY.set(1)

    async def stop(self, grace: float | None = None) -> None:
        await self.running.stop(grace)


async def create_server(
    settings: TranscriberSettings,
    *,
    port: int | None = None,
    host: str | None = None,
    load: bool = True,
    engine: Engine | None = None,
) -> Transcriber:
    """Serve at once (NOT_SERVING until loaded); start loading the model unless load=False."""
    host = host if host is not None else settings.host
    auth = internal_auth(settings)
    anonymous = check_exposure(
        "transcriber", host, authenticated=auth.enabled, allow_anonymous=settings.allow_anonymous
    )
    engine = engine or Engine(settings)
    batcher = Batcher(
        engine.transcribe_batch,
        window_ms=settings.batching()[1],
        max_batch=settings.batching()[0],
        max_queue=settings.max_queue,
        workers=settings.workers(),
        live_gather_ms=settings.live_gather_ms,
        share_live=not settings.on_gpu(),
    )
    servicer = TranscriberServicer(engine, batcher)
    running = await start_server(
        [
            Service(
                SERVICE_NAME, lambda s: transcriber_pb2_grpc.add_TranscriberServicer_to_server(servicer, s)
            )
        ],
        settings=settings,
        host=host,
        port=settings.transcriber_port if port is None else port,
        max_message_bytes=MAX_PCM_BYTES + 64 * 1024,
        serving=engine.ready,
        interceptors=[InternalAuthInterceptor(auth)],
        anonymous=anonymous,
    )
    batcher.start()
    READY.set(1 if engine.ready else 0)
    running.on_drain(_not_ready)
    running.on_stop(batcher.close)
    app = Transcriber(running, engine, batcher)
    if load:
        task = asyncio.create_task(_load(app), name="load-model")
        running.on_stop(lambda: _cancel(task))
    return app


async def _load(app: Transcriber) -> None:
    try:
        await app.load()
    except Exception:
        log.exception("model failed to load; staying NOT_SERVING")


async def _not_ready() -> None:
    READY.set(0)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

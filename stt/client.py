"""Python client for the stt.v1 API, in asyncio (`AsyncClient`) and blocking (`Client`) flavours.

    from stt import Client
    with Client("localhost:50051") as c:
        print(c.recognize("meeting.wav", language="en").transcript)

Every call has a deadline; UNAVAILABLE is retried by the channel's retry policy (honouring the
server's retry push-back); other failures raise `stt.errors.SttError`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stt.channel import DEFAULT_SERVER, insecure_channel, insecure_sync_channel
from stt.errors import SttError
from stt.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, speech_pb2, speech_pb2_grpc

PUBLIC_SERVICES = ["stt.v1.Speech", "stt.v1.Jobs"]
HEALTH_NAMES = ["", "stt.v1.Speech", "stt.v1.Jobs", "stt.v1.Transcriber", "stt.v1.JobStore"]
Audio = bytes | str | os.PathLike[str]

P = ParamSpec("P")
T = TypeVar("T")


def default_server() -> str:
    return os.environ.get("STT_SERVER") or DEFAULT_SERVER


def read_audio(audio: Audio) -> bytes:
    if isinstance(audio, bytes):
        return audio
    return Path(audio).read_bytes()


def recognition_config(
    *,
    language: str | None = None,
    encoding: str | int | None = None,
    sample_rate: int = 0,
    channels: int = 0,
    word_timestamps: bool = False,
    beam_size: int = 0,
    prompt: str | None = None,
    temperature: float = 0.0,
) -> common_pb2.RecognitionConfig:
    if isinstance(encoding, str):
        enc = common_pb2.AudioEncoding.Value(encoding.upper()) if encoding else 0
    else:
        enc = encoding or 0
    return common_pb2.RecognitionConfig(
        encoding=enc,  # type: ignore[arg-type]
        sample_rate_hz=sample_rate,
        audio_channel_count=channels,
        language_code=language or "",
        enable_word_time_offsets=word_timestamps,
        beam_size=beam_size,
        initial_prompt=prompt or "",
        temperature=temperature,
    )


def segments_of(results: Any) -> list[dict[str, Any]]:
    """Recognition results (or Segment messages) as plain dicts for `stt.formats.render`."""
    out = []
    for r in results:
        text = r.transcript if hasattr(r, "transcript") else r.text
        out.append(
            {
                "start": round(r.start_seconds, 3),
                "end": round(r.end_seconds, 3),
                "text": text,
                "words": [
                    {
                        "word": w.word,
                        "start": round(w.start_seconds, 3),
                        "end": round(w.end_seconds, 3),
                        "probability": round(w.probability, 4),
                    }
                    for w in r.words
                ],
            }
        )
    return out


def _wrap_async(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except grpc.RpcError as exc:
            raise SttError.from_rpc_error(exc) from None

    return wrapper


def _wrap_sync(fn: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            raise SttError.from_rpc_error(exc) from None

    return wrapper


def _health_statuses(resp: health_pb2.HealthListResponse) -> dict[str, str]:
    return {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(st.status)
        for name, st in sorted(resp.statuses.items())
    }


class AsyncClient:
    """asyncio client. Use as `async with AsyncClient(server) as client: ...`."""

    def __init__(self, server: str | None = None, *, timeout: float = 600.0) -> None:
        self.server = server or default_server()
        self.timeout = timeout
        self.channel = insecure_channel(self.server, PUBLIC_SERVICES)
        self.speech = speech_pb2_grpc.SpeechStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    @_wrap_async
    async def recognize(
        self,
        audio: Audio,
        *,
        config: common_pb2.RecognitionConfig | None = None,
        timeout: float | None = None,
        **config_kwargs: Any,
    ) -> speech_pb2.RecognizeResponse:
        """Transcribe a whole file (path or bytes). Keyword arguments build the config
        (language, encoding, sample_rate, channels, word_timestamps, beam_size, prompt)."""
        request = speech_pb2.RecognizeRequest(
            config=config or recognition_config(**config_kwargs), content=read_audio(audio)
        )
        return await self.speech.Recognize(request, timeout=timeout or self.timeout)

    @_wrap_async
    async def health(self, timeout: float = 5.0) -> dict[str, str]:
        """Every health entry the server reports: '' (the server), its services, its dependencies."""
        try:
            resp = await self._health.List(health_pb2.HealthListRequest(), timeout=timeout)
            return _health_statuses(resp)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        out: dict[str, str] = {}
        for name in HEALTH_NAMES:
            try:
                r = await self._health.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
                out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return out


class Client:
    """Blocking client with the same methods as AsyncClient."""

    def __init__(self, server: str | None = None, *, timeout: float = 600.0) -> None:
        self.server = server or default_server()
        self.timeout = timeout
        self.channel = insecure_sync_channel(self.server, PUBLIC_SERVICES)
        self.speech = speech_pb2_grpc.SpeechStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @_wrap_sync
    def recognize(
        self,
        audio: Audio,
        *,
        config: common_pb2.RecognitionConfig | None = None,
        timeout: float | None = None,
        **config_kwargs: Any,
    ) -> speech_pb2.RecognizeResponse:
        request = speech_pb2.RecognizeRequest(
            config=config or recognition_config(**config_kwargs), content=read_audio(audio)
        )
        return self.speech.Recognize(request, timeout=timeout or self.timeout)

    @_wrap_sync
    def health(self, timeout: float = 5.0) -> dict[str, str]:
        try:
            return _health_statuses(self._health.List(health_pb2.HealthListRequest(), timeout=timeout))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        out: dict[str, str] = {}
        for name in HEALTH_NAMES:
            try:
                r = self._health.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
                out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return out


__all__ = ["AsyncClient", "Client", "SttError", "jobs_pb2", "recognition_config", "segments_of", "speech_pb2"]

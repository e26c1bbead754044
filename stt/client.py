"""Python client for the stt.v1 API, in asyncio (`AsyncClient`) and blocking (`Client`) flavours.

    from stt import Client
    with Client("localhost:50051") as c:
        print(c.recognize("meeting.wav", language="en").transcript)

Every call has a deadline; UNAVAILABLE is retried by the channel's retry policy (honouring the
server's retry push-back); other failures raise `stt.errors.SttError`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
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


PRIORITIES = {"low": jobs_pb2.LOW, "normal": jobs_pb2.NORMAL, "high": jobs_pb2.HIGH}
STATUSES = {"queued": jobs_pb2.QUEUED, "running": jobs_pb2.RUNNING, "completed": jobs_pb2.COMPLETED,
            "failed": jobs_pb2.FAILED, "cancelled": jobs_pb2.CANCELLED}  # fmt: skip
TRANSCRIPT_FORMATS = {
    "text": common_pb2.TEXT,
    "json": common_pb2.JSON,
    "srt": common_pb2.SRT,
    "vtt": common_pb2.VTT,
}
UPLOAD_PIECE = 256 * 1024
TERMINAL = (jobs_pb2.COMPLETED, jobs_pb2.FAILED, jobs_pb2.CANCELLED)


def _priority(value: str | int) -> int:
    if isinstance(value, int):
        return value
    try:
        return PRIORITIES[value.lower()]
    except KeyError:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}") from None


def upload_requests(
    data: bytes,
    *,
    filename: str,
    priority: str | int,
    request_id: str | None,
    config: common_pb2.RecognitionConfig,
) -> list[jobs_pb2.CreateJobRequest]:
    """CreateJob's client stream: metadata first, then the audio in pieces."""
    meta = jobs_pb2.JobMetadata(
        request_id=request_id or uuid.uuid4().hex,
        filename=filename,
        priority=_priority(priority),  # type: ignore[arg-type]
        config=config,
        size_bytes=len(data),
    )
    pieces = [data[i : i + UPLOAD_PIECE] for i in range(0, len(data), UPLOAD_PIECE)]
    return [jobs_pb2.CreateJobRequest(metadata=meta)] + [
        jobs_pb2.CreateJobRequest(audio_chunk=p) for p in pieces
    ]


def _filename(audio: Audio, filename: str | None) -> str:
    if filename:
        return filename
    return "" if isinstance(audio, bytes) else os.path.basename(os.fspath(audio))


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


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...]:
    key = api_key if api_key is not None else os.environ.get("STT_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


class AsyncClient:
    """asyncio client. Use as `async with AsyncClient(server) as client: ...`.

    `api_key` (or env STT_API_KEY) is sent as `authorization: Bearer <key>` on every call."""

    def __init__(
        self, server: str | None = None, *, timeout: float = 600.0, api_key: str | None = None
    ) -> None:
        self.server = server or default_server()
        self.timeout = timeout
        self.metadata = _auth(api_key)
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
        return await self.speech.Recognize(request, timeout=timeout or self.timeout, metadata=self.metadata)

    # -- jobs -------------------------------------------------------------------------------------

    @_wrap_async
    async def submit(
        self,
        audio: Audio,
        *,
        priority: str | int = "normal",
        request_id: str | None = None,
        filename: str | None = None,
        config: common_pb2.RecognitionConfig | None = None,
        timeout: float | None = None,
        **config_kwargs: Any,
    ) -> jobs_pb2.Job:
        """Upload a recording as a job. The request_id (a new UUID unless given) makes retries safe.
        Word timings are on unless word_timestamps=False (they are what JSON transcripts carry)."""
        config_kwargs.setdefault("word_timestamps", True)
        reqs = upload_requests(
            read_audio(audio),
            filename=_filename(audio, filename),
            priority=priority,
            request_id=request_id,
            config=config or recognition_config(**config_kwargs),
        )
        return await self.jobs.CreateJob(iter(reqs), timeout=timeout or self.timeout, metadata=self.metadata)

    @_wrap_async
    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        return await self.jobs.GetJob(
            jobs_pb2.GetJobRequest(job_id=job_id), timeout=30, metadata=self.metadata
        )

    @_wrap_async
    async def list_jobs(
        self, *, status: str | int | None = None, page_size: int = 0, page_token: str = ""
    ) -> jobs_pb2.ListJobsResponse:
        st = STATUSES[status.lower()] if isinstance(status, str) else (status or 0)
        req = jobs_pb2.ListJobsRequest(status=st, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
        return await self.jobs.ListJobs(req, timeout=30, metadata=self.metadata)

    async def watch_job(self, job_id: str) -> AsyncIterator[jobs_pb2.JobEvent]:
        """The job's state now, then every change until it ends. Reconnects if the stream breaks
        (each new stream starts with the current state, so nothing needed is missed)."""
        backoff = 0.2
        while True:
            try:
                async for event in self.jobs.WatchJob(
                    jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self.metadata
                ):
                    backoff = 0.2
                    yield event
                    if event.job.status in TERMINAL:
                        return
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise SttError.from_rpc_error(exc) from None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def wait(self, job_id: str) -> jobs_pb2.Job:
        """Block until the job is COMPLETED, FAILED or CANCELLED."""
        job = None
        async for event in self.watch_job(job_id):
            job = event.job
        assert job is not None
        return job

    @_wrap_async
    async def cancel_job(self, job_id: str) -> jobs_pb2.Job:
        return await self.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job_id), timeout=30, metadata=self.metadata
        )

    @_wrap_async
    async def delete_job(self, job_id: str) -> None:
        await self.jobs.DeleteJob(
            jobs_pb2.DeleteJobRequest(job_id=job_id), timeout=30, metadata=self.metadata
        )

    @_wrap_async
    async def transcript(self, job_id: str, format: str = "text") -> jobs_pb2.Transcript:
        req = jobs_pb2.GetTranscriptRequest(job_id=job_id, format=TRANSCRIPT_FORMATS[format])
        return await self.jobs.GetTranscript(req, timeout=60, metadata=self.metadata)

    @_wrap_async
    async def queue_stats(self) -> jobs_pb2.QueueStats:
        return await self.jobs.GetQueueStats(
            jobs_pb2.GetQueueStatsRequest(), timeout=30, metadata=self.metadata
        )

    async def stream(
        self,
        audio: AsyncIterable[bytes] | Iterable[bytes],
        *,
        interim: bool = True,
        single_utterance: bool = False,
        max_seconds: float = 0.0,
        config: common_pb2.RecognitionConfig | None = None,
        timeout: float | None = None,
        **config_kwargs: Any,
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        """Live recognition: `audio` yields chunks (LINEAR16 by default at 16 kHz, or set encoding);
        responses carry interim and final results and speech events as they happen."""
        if config is None:
            config_kwargs.setdefault("encoding", "LINEAR16")
            config_kwargs.setdefault("sample_rate", 16000)
            config_kwargs.setdefault("word_timestamps", True)
            config = recognition_config(**config_kwargs)
        first = speech_pb2.StreamingRecognizeRequest(
            streaming_config=speech_pb2.StreamingRecognitionConfig(
                config=config,
                interim_results=interim,
                single_utterance=single_utterance,
                max_stream_seconds=max_seconds,
            )
        )

        async def requests() -> AsyncIterator[speech_pb2.StreamingRecognizeRequest]:
            yield first
            if isinstance(audio, AsyncIterable):
                async for chunk in audio:
                    yield speech_pb2.StreamingRecognizeRequest(audio_content=chunk)
            else:
                for chunk in audio:
                    yield speech_pb2.StreamingRecognizeRequest(audio_content=chunk)

        call = self.speech.StreamingRecognize(requests(), timeout=timeout, metadata=self.metadata)
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as exc:
            raise SttError.from_rpc_error(exc) from None
        finally:
            call.cancel()

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

    def __init__(
        self, server: str | None = None, *, timeout: float = 600.0, api_key: str | None = None
    ) -> None:
        self.server = server or default_server()
        self.timeout = timeout
        self.metadata = _auth(api_key)
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
        return self.speech.Recognize(request, timeout=timeout or self.timeout, metadata=self.metadata)

    @_wrap_sync
    def submit(
        self,
        audio: Audio,
        *,
        priority: str | int = "normal",
        request_id: str | None = None,
        filename: str | None = None,
        config: common_pb2.RecognitionConfig | None = None,
        timeout: float | None = None,
        **config_kwargs: Any,
    ) -> jobs_pb2.Job:
        config_kwargs.setdefault("word_timestamps", True)
        reqs = upload_requests(
            read_audio(audio),
            filename=_filename(audio, filename),
            priority=priority,
            request_id=request_id,
            config=config or recognition_config(**config_kwargs),
        )
        return self.jobs.CreateJob(iter(reqs), timeout=timeout or self.timeout, metadata=self.metadata)

    @_wrap_sync
    def get_job(self, job_id: str) -> jobs_pb2.Job:
        return self.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30, metadata=self.metadata)

    @_wrap_sync
    def list_jobs(
        self, *, status: str | int | None = None, page_size: int = 0, page_token: str = ""
    ) -> jobs_pb2.ListJobsResponse:
        st = STATUSES[status.lower()] if isinstance(status, str) else (status or 0)
        req = jobs_pb2.ListJobsRequest(status=st, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
        return self.jobs.ListJobs(req, timeout=30, metadata=self.metadata)

    def watch_job(self, job_id: str) -> Iterator[jobs_pb2.JobEvent]:
        backoff = 0.2
        while True:
            try:
                for event in self.jobs.WatchJob(
                    jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self.metadata
                ):
                    backoff = 0.2
                    yield event
                    if event.job.status in TERMINAL:
                        return
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise SttError.from_rpc_error(exc) from None
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def wait(self, job_id: str) -> jobs_pb2.Job:
        job = None
        for event in self.watch_job(job_id):
            job = event.job
        assert job is not None
        return job

    @_wrap_sync
    def cancel_job(self, job_id: str) -> jobs_pb2.Job:
        return self.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job_id), timeout=30, metadata=self.metadata
        )

    @_wrap_sync
    def delete_job(self, job_id: str) -> None:
        self.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job_id), timeout=30, metadata=self.metadata)

    @_wrap_sync
    def transcript(self, job_id: str, format: str = "text") -> jobs_pb2.Transcript:
        req = jobs_pb2.GetTranscriptRequest(job_id=job_id, format=TRANSCRIPT_FORMATS[format])
        return self.jobs.GetTranscript(req, timeout=60, metadata=self.metadata)

    @_wrap_sync
    def queue_stats(self) -> jobs_pb2.QueueStats:
        return self.jobs.GetQueueStats(jobs_pb2.GetQueueStatsRequest(), timeout=30, metadata=self.metadata)

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

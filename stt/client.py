"""Python client for the stt.v1 API, in asyncio (`AsyncClient`) and blocking (`Client`) flavours.

    from stt import Client
    with Client("localhost:50051") as c:
        print(c.recognize("meeting.wav", language="en").transcript)

Every call has a deadline; UNAVAILABLE is retried by the channel's retry policy (honouring the
server's retry push-back); other failures raise `stt.errors.SttError`. `Client` runs the same code
as `AsyncClient` on a private event loop, so both behave identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stt.backoff import Backoff
from stt.channel import DEFAULT_SERVER, secure_or_insecure_channel
from stt.errors import SttError
from stt.streaming import Outbox
from stt.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, speech_pb2, speech_pb2_grpc

PUBLIC_SERVICES = ["stt.v1.Speech", "stt.v1.Jobs"]
HEALTH_NAMES = ["", "stt.v1.Speech", "stt.v1.Jobs", "dependency/transcribers"]
Audio = bytes | str | os.PathLike[str]

log = logging.getLogger("stt.client")
RECONNECT_WAIT = 5.0  # longest wait for the channel to connect before a resumption attempt
P = ParamSpec("P")
T = TypeVar("T")


def default_server() -> str:
    return os.environ.get("STT_SERVER") or DEFAULT_SERVER


def read_audio(audio: Audio) -> bytes:
    if isinstance(audio, bytes):
        return audio
    return Path(audio).read_bytes()


def _enum(wrapper: Any, prefix: str, value: str | int | None, what: str) -> int:
    """'linear16' / 'LINEAR16' / 'AUDIO_ENCODING_LINEAR16' / 1 -> 1."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    name = value.upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(wrapper.Value(name))
    except ValueError:
        choices = ", ".join(n[len(prefix) :].lower() for n, v in wrapper.items() if v)
        raise ValueError(f"{what} must be one of {choices}") from None


def encoding_value(encoding: str | int | None) -> int:
    return _enum(common_pb2.AudioEncoding, "AUDIO_ENCODING_", encoding, "encoding")


def priority_value(priority: str | int | None) -> int:
    return _enum(jobs_pb2.Priority, "PRIORITY_", priority, "priority")


def status_value(status: str | int | None) -> int:
    return _enum(jobs_pb2.JobStatus, "JOB_STATUS_", status, "status")


def final_result_timing(value: str | int | None) -> int:
    """'stable' / 'utterance_end' / 'utterance-end' / 'FINAL_RESULT_TIMING_STABLE' / 2 -> the enum."""
    if isinstance(value, str):
        value = value.replace("-", "_")
    return _enum(speech_pb2.FinalResultTiming, "FINAL_RESULT_TIMING_", value, "final_results")


def format_value(fmt: str | int | None) -> int:
    return _enum(common_pb2.TranscriptFormat, "TRANSCRIPT_FORMAT_", fmt, "format")


def enum_label(wrapper: Any, value: int) -> str:
    """JOB_STATUS_RUNNING -> RUNNING (for display)."""
    name = str(wrapper.Name(value))
    prefix = wrapper.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix)


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
    return common_pb2.RecognitionConfig(
        encoding=encoding_value(encoding),  # type: ignore[arg-type]
        sample_rate_hz=sample_rate,
        audio_channel_count=channels,
        language_code=language or "",
        enable_word_time_offsets=word_timestamps,
        beam_size=beam_size,
        initial_prompt=prompt or "",
        temperature=temperature,
    )


UPLOAD_PIECE = 256 * 1024
TERMINAL = (jobs_pb2.JOB_STATUS_COMPLETED, jobs_pb2.JOB_STATUS_FAILED, jobs_pb2.JOB_STATUS_CANCELLED)


def upload_requests(
    data: bytes,
    *,
    filename: str,
    priority: str | int,
    request_id: str | None,
    config: common_pb2.RecognitionConfig,
    keep_audio: bool = False,
) -> list[jobs_pb2.CreateJobRequest]:
    """CreateJob's client stream: metadata first, then the audio in pieces."""
    meta = jobs_pb2.JobMetadata(
        request_id=request_id or uuid.uuid4().hex,
        filename=filename,
        priority=priority_value(priority),  # type: ignore[arg-type]
        config=config,
        size_bytes=len(data),
        keep_audio=keep_audio,
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


async def _write_stream(
    call: Any, first: speech_pb2.StreamingRecognizeRequest, outbox: Outbox, start: int
) -> None:
    """Write the config, then the audio from byte `start`, then half-close; stop quietly once the
    call has ended."""
    try:
        await outbox.write(
            call, first, start, lambda piece: speech_pb2.StreamingRecognizeRequest(audio_content=piece)
        )
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # the call is over: its status is what the reader reports


# What grpc's C core reports (as INTERNAL, locally) when the transport under a call breaks while the
# client writes: a server never sends it, so it means the connection, not the request, failed.
_TRANSPORT_BROKE = "Internal error from Core"


def _resumable(err: SttError) -> bool:
    """A broken stream (not a refused one): the server went away, is draining, or the connection
    under the call broke."""
    if err.code == grpc.StatusCode.INTERNAL:
        return err.message.strip() == _TRANSPORT_BROKE
    return err.code == grpc.StatusCode.UNAVAILABLE


def _rpc_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except grpc.RpcError as exc:
            raise SttError.from_rpc_error(exc) from None

    return wrapper


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...]:
    key = api_key if api_key is not None else os.environ.get("STT_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


class AsyncClient:
    """asyncio client. Use as `async with AsyncClient(server) as client: ...`.

    `api_key` (or env STT_API_KEY) is sent as `authorization: Bearer <key>` on every call.
    TLS: `tls=True` (system roots), or `tls_ca` (a CA file); `tls_cert` + `tls_key` for mTLS;
    `tls_server_name` when the certificate does not carry the address; the STT_TLS_* environment
    variables set the same. `timeout` is the default deadline of a call."""

    def __init__(
        self,
        server: str | None = None,
        *,
        timeout: float = 600.0,
        api_key: str | None = None,
        tls: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.server = server or default_server()
        self.timeout = timeout
        self.metadata = _auth(api_key)
        self.channel = secure_or_insecure_channel(
            self.server,
            PUBLIC_SERVICES,
            tls=tls,
            ca=tls_ca,
            cert=tls_cert,
            key=tls_key,
            server_name=tls_server_name,
        )
        self.speech = speech_pb2_grpc.SpeechStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def _deadline(self, timeout: float | None, default: float | None = None) -> float:
        return timeout or default or self.timeout

    @_rpc_errors
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
        return await self.speech.Recognize(request, timeout=self._deadline(timeout), metadata=self.metadata)

    @_rpc_errors
    async def server_info(self, *, timeout: float | None = None) -> speech_pb2.ServerInfo:
        """The server's model, languages, features, limits and your quotas."""
        return await self.speech.GetServerInfo(
            speech_pb2.GetServerInfoRequest(), timeout=self._deadline(timeout, 30), metadata=self.metadata
        )

    # -- jobs -------------------------------------------------------------------------------------

    @_rpc_errors
    async def submit(
        self,
        audio: Audio,
        *,
        priority: str | int = "normal",
        request_id: str | None = None,
        filename: str | None = None,
        keep_audio: bool = False,
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
            keep_audio=keep_audio,
        )
        return await self.jobs.CreateJob(iter(reqs), timeout=self._deadline(timeout), metadata=self.metadata)

    @_rpc_errors
    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        return await self.jobs.GetJob(
            jobs_pb2.GetJobRequest(job_id=job_id), timeout=self._deadline(None, 30), metadata=self.metadata
        )

    @_rpc_errors
    async def list_jobs(
        self, *, status: str | int | None = None, page_size: int = 0, page_token: str = ""
    ) -> jobs_pb2.ListJobsResponse:
        req = jobs_pb2.ListJobsRequest(
            status=status_value(status),  # type: ignore[arg-type]
            page_size=page_size,
            page_token=page_token,
        )
        return await self.jobs.ListJobs(req, timeout=self._deadline(None, 30), metadata=self.metadata)

    async def watch_job(self, job_id: str) -> AsyncIterator[jobs_pb2.JobEvent]:
        """The job's state now, then every change until it ends. Reconnects if the stream breaks
        (each new stream starts with the current state, so nothing needed is missed)."""
        backoff = Backoff()
        while True:
            try:
                async for event in self.jobs.WatchJob(
                    jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self.metadata
                ):
                    backoff.reset()
                    yield event
                    if event.job.status in TERMINAL:
                        return
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise SttError.from_rpc_error(exc) from None
            await asyncio.sleep(backoff.next())

    async def wait(self, job_id: str) -> jobs_pb2.Job:
        """Block until the job is COMPLETED, FAILED or CANCELLED."""
        job = None
        async for event in self.watch_job(job_id):
            job = event.job
        assert job is not None
        return job

    @_rpc_errors
    async def cancel_job(self, job_id: str) -> jobs_pb2.Job:
        return await self.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job_id), timeout=self._deadline(None, 30), metadata=self.metadata
        )

    @_rpc_errors
    async def retry_job(self, job_id: str) -> jobs_pb2.Job:
        """Queue a FAILED or CANCELLED job again (same id, fresh attempts)."""
        return await self.jobs.RetryJob(
            jobs_pb2.RetryJobRequest(job_id=job_id), timeout=self._deadline(None, 30), metadata=self.metadata
        )

    @_rpc_errors
    async def delete_job(self, job_id: str) -> None:
        await self.jobs.DeleteJob(
            jobs_pb2.DeleteJobRequest(job_id=job_id), timeout=self._deadline(None, 30), metadata=self.metadata
        )

    @_rpc_errors
    async def transcript(self, job_id: str, format: str = "text") -> jobs_pb2.Transcript:
        req = jobs_pb2.GetTranscriptRequest(job_id=job_id, format=format_value(format))  # type: ignore[arg-type]
        return await self.jobs.GetTranscript(req, timeout=self._deadline(None, 60), metadata=self.metadata)

    @_rpc_errors
    async def queue_stats(self) -> jobs_pb2.QueueStats:
        return await self.jobs.GetQueueStats(
            jobs_pb2.GetQueueStatsRequest(), timeout=self._deadline(None, 30), metadata=self.metadata
        )

    # -- live streams ------------------------------------------------------------------------------

    async def stream(
        self,
        audio: AsyncIterable[bytes] | Iterable[bytes],
        *,
        interim: bool = True,
        single_utterance: bool = False,
        max_seconds: float = 0.0,
        config: common_pb2.RecognitionConfig | None = None,
        timeout: float | None = None,
        resume: bool = True,
        max_resume_attempts: int = 6,
        final_results: str | None = None,
        **config_kwargs: Any,
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        """Live recognition: `audio` yields chunks (LINEAR16 by default at 16 kHz, or set encoding);
        responses carry interim and final results and speech events as they happen.

        `resume`: a stream that breaks (UNAVAILABLE: a gateway killed or draining, a lost
        connection) is continued on a new call from the server's latest resume point, after a
        backoff; up to `max_resume_attempts` attempts in a row without a response in between. A
        LINEAR16 stream sends the audio kept since that point; a compressed stream (whose bytes
        cannot be cut at an offset) is sent again from its first byte (`resume_audio_from_start`;
        the server skips what was transcribed), so its bytes are kept: past
        stt.streaming.REPLAY_MAX_BYTES (64 MiB) it is no longer resumed and its error is raised. The
        caller sees one stream: no final word twice or missing, times from the start of the stream,
        speech events not repeated. `timeout` bounds the whole stream, resumptions included.

        `final_results`: when words become final: "stable" (as soon as hypotheses agree on them,
        the lowest latency), "utterance_end" (only when the utterance ends: later, fewer word
        errors), or None for the server's default (StreamingRecognitionConfig.final_result_timing)."""
        if config is None:
            config_kwargs.setdefault("encoding", "LINEAR16")
            config_kwargs.setdefault("sample_rate", 16000)
            config_kwargs.setdefault("word_timestamps", True)
            config = recognition_config(**config_kwargs)
        streaming_config = speech_pb2.StreamingRecognitionConfig(
            config=config,
            interim_results=interim,
            single_utterance=single_utterance,
            max_stream_seconds=max_seconds,
            final_result_timing=final_result_timing(final_results),  # type: ignore[arg-type]
        )
        linear16 = config.encoding == common_pb2.AUDIO_ENCODING_LINEAR16 and config.sample_rate_hz > 0
        outbox = Outbox(
            audio,
            frame_bytes=2 * max(config.audio_channel_count, 1) if resume and linear16 else 0,
            sample_rate=config.sample_rate_hz,
            replay=resume and config.encoding != common_pb2.AUDIO_ENCODING_LINEAR16,
        )
        deadline = time.monotonic() + timeout if timeout else None
        backoff = Backoff(initial=0.1, maximum=2.0)
        point: speech_pb2.StreamResumePoint | None = None
        progress: speech_pb2.StreamingRecognizeResponse | None = None  # the latest one not passed on
        billed = 0.0  # total_billed_seconds of the latest response passed on
        last_event = seen = (-1.0, 0)
        broke: SttError | None = None  # what broke the stream, while it is being resumed
        try:
            while True:
                cfg = speech_pb2.StreamingRecognitionConfig()
                cfg.CopyFrom(streaming_config)
                if point is not None:
                    cfg.resume_from.CopyFrom(point)
                    cfg.resume_audio_from_start = outbox.replay
                first = speech_pb2.StreamingRecognizeRequest(streaming_config=cfg)
                start = outbox.byte_offset(point.audio_offset_seconds) if point is not None else 0
                left = deadline - time.monotonic() if deadline else None
                # The requests are written by a task of our own rather than handed to grpc as an
                # iterator: when the server ends the call while a write is due, grpc's iterator
                # consumer can replace the server's status with "INTERNAL: Internal error from
                # Core"; a failed write here just stops writing, and the call's own status is what
                # the caller sees.
                call = self.speech.StreamingRecognize(timeout=left, metadata=self.metadata)
                writer = asyncio.create_task(_write_stream(call, first, outbox, start))
                unconfirmed = cfg.resume_audio_from_start
                try:
                    while True:
                        resp = await call.read()
                        if unconfirmed:
                            if resp is grpc.aio.EOF or not resp.resume_audio_from_start_accepted:
                                # A server that predates resume_audio_from_start would transcribe the
                                # stream again as if it began at the offset: its words twice.
                                log.warning("the server cannot resume a compressed stream; giving up")
                                raise broke or SttError(grpc.StatusCode.UNAVAILABLE, "stream broke")
                            unconfirmed = False
                            continue
                        if resp is grpc.aio.EOF:
                            break
                        backoff.reset()
                        if resp.HasField("resume_point"):
                            point = resp.resume_point
                            outbox.trim(point.audio_offset_seconds)
                        if resp.speech_event_type:
                            event = (resp.speech_event_offset_seconds, int(resp.speech_event_type))
                            if event <= seen:
                                continue  # sent again after a resumption
                            last_event = max(last_event, event)
                        elif not resp.results:
                            progress = resp  # only moves the resume point on
                            continue
                        billed = resp.total_billed_seconds
                        yield resp
                    await writer  # a failure of the audio source itself surfaces here
                    if progress is not None and progress.total_billed_seconds > billed:
                        yield progress  # the stream's whole billed seconds (silence after the last result)
                    return
                except grpc.aio.AioRpcError as exc:
                    err = broke = SttError.from_rpc_error(exc)
                    if (
                        err.code == grpc.StatusCode.INTERNAL
                        and deadline
                        and time.monotonic() >= deadline - 0.05
                    ):
                        # grpc's C core reports a write cut off by the deadline as an internal error.
                        raise SttError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                    delay = backoff.next()
                    if not (
                        outbox.resumable
                        and _resumable(err)
                        and backoff.attempts <= max_resume_attempts
                        and (deadline is None or time.monotonic() + delay < deadline)
                    ):
                        raise err from None
                    log.info(
                        "stream broke (%s); resuming from %.2fs in %.1fs",
                        err,
                        point.audio_offset_seconds if point is not None else 0.0,
                        delay,
                    )
                    seen = last_event  # events up to here were delivered: not again
                finally:
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
                    call.cancel()
                await asyncio.sleep(delay)
                # Let the channel reconnect (a restarted server may be in gRPC's connection backoff).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.channel.channel_ready(), RECONNECT_WAIT)
        finally:
            await outbox.close()

    # -- health ------------------------------------------------------------------------------------

    @_rpc_errors
    async def health(self, timeout: float = 5.0) -> dict[str, str]:
        """Every health entry the server reports: '' (the server), its services, its dependencies."""
        name_of = health_pb2.HealthCheckResponse.ServingStatus.Name
        try:
            resp = await self._health.List(health_pb2.HealthListRequest(), timeout=timeout)
            return {name: name_of(st.status) for name, st in sorted(resp.statuses.items())}
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        out: dict[str, str] = {}  # an older server: check the names we know
        for name in HEALTH_NAMES:
            try:
                r = await self._health.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
                out[name] = name_of(r.status)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return out


class _Loop:
    """A private event loop on a daemon thread that runs the async client for the blocking one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stt-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(anext(agen))  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self.run(aclose())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def _blocking(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> T:
        return self._loop.run(getattr(self._async, method.__name__)(*args, **kwargs))

    return call


def _blocking_iter(method: Callable[..., AsyncIterator[T]]) -> Callable[..., Iterator[T]]:
    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Iterator[T]:
        return self._loop.iterate(getattr(self._async, method.__name__)(*args, **kwargs))

    return call


class Client:
    """Blocking client with the same methods and arguments as AsyncClient (iterators instead of
    async iterators). Use as `with Client(server) as client: ...`."""

    def __init__(self, server: str | None = None, **kwargs: Any) -> None:
        self._loop = _Loop()
        self._async: AsyncClient = self._loop.run(_make(server, **kwargs))
        self.server = self._async.server

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        self._loop.run(self._async.close())
        self._loop.close()

    recognize = _blocking(AsyncClient.recognize)
    server_info = _blocking(AsyncClient.server_info)
    submit = _blocking(AsyncClient.submit)
    get_job = _blocking(AsyncClient.get_job)
    list_jobs = _blocking(AsyncClient.list_jobs)
    watch_job = _blocking_iter(AsyncClient.watch_job)
    wait = _blocking(AsyncClient.wait)
    cancel_job = _blocking(AsyncClient.cancel_job)
    retry_job = _blocking(AsyncClient.retry_job)
    delete_job = _blocking(AsyncClient.delete_job)
    transcript = _blocking(AsyncClient.transcript)
    queue_stats = _blocking(AsyncClient.queue_stats)
    stream = _blocking_iter(AsyncClient.stream)
    health = _blocking(AsyncClient.health)


async def _make(server: str | None, **kwargs: Any) -> AsyncClient:
    return AsyncClient(server, **kwargs)  # channels belong to the loop they are made on


__all__ = [
    "AsyncClient",
    "Client",
    "SttError",
    "enum_label",
    "jobs_pb2",
    "recognition_config",
    "segments_of",
    "speech_pb2",
]

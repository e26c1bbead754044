"""The Speech API as the gateway's doors use it: Recognize, live streams, server info.

Protobuf messages in and out, no grpc: the gRPC servicer and the HTTP front door both call this, so
there is one implementation of validation, limits, decoding, recognition and streaming.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Gauge

from services.gateway import audio as audio_mod
from services.gateway.admission import StreamAdmission
from services.gateway.auth import current_caller, require_write
from services.gateway.config import GatewaySettings
from services.gateway.observe import StreamObserver
from services.gateway.pool import TranscriberPool
from services.gateway.quotas import ByteBudget, Quotas, Reservation, TenantQuota, inflight_var
from services.gateway.recognize import SampleStore, recognize, recognize_blocks
from services.gateway.requests import (
    MAX_BEAM_SIZE,
    MAX_PROMPT_CHARS,
    STREAMING_ENCODINGS,
    ModelCaps,
    ValidConfig,
    result_from_segment,
    validate_config,
)
from services.gateway.stream_decoder import StreamDecoder, make_decoder
from services.gateway.streaming import Event, EventType, ResumeState, StreamingSession, StreamPolicy
from services.shared import tracing
from services.shared.context import audit, request_id_var
from services.shared.domain import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_REQUEST_ID_CHARS,
    SAMPLE_RATE,
    Segment,
    join_text,
)
from services.shared.errors import DeadlineExceeded, InvalidInput, LimitExceeded, ServiceError, Unavailable
from stt.v1 import common_pb2, speech_pb2

STREAMS = Gauge("stt_gateway_streams", "Live StreamingRecognize sessions")
_EVENT_TYPES = {
    EventType.SPEECH_BEGIN: speech_pb2.SPEECH_EVENT_TYPE_SPEECH_ACTIVITY_BEGIN,
    EventType.SPEECH_END: speech_pb2.SPEECH_EVENT_TYPE_SPEECH_ACTIVITY_END,
    EventType.END_OF_SINGLE_UTTERANCE: speech_pb2.SPEECH_EVENT_TYPE_END_OF_SINGLE_UTTERANCE,
}
# StreamPolicy.finals <-> StreamingRecognitionConfig.final_result_timing (asked for, and reported).
_TIMINGS = {
    "agreement": speech_pb2.FINAL_RESULT_TIMING_STABLE,
    "utterance_end": speech_pb2.FINAL_RESULT_TIMING_UTTERANCE_END,
}
RECOGNIZE_ENCODINGS = ("LINEAR16", "FLAC", "MP3", "OGG_OPUS", "WEBM_OPUS", "MP4_AAC", "WAV", "OGG_VORBIS")
VERSION = "0.2.0"
MAX_RESUME_CONTEXT_CHARS = 4000
MAX_SESSION_ID_CHARS = 128
PROGRESS_EVERY_SECONDS = 2.0  # a results-less response when the resume point moved this much
# Compressed stream bytes a second of audio may take (FLAC 48 kHz stereo is ~150-200 kB/s).
COMPRESSED_BYTES_PER_SECOND = 256_000


@dataclass
class JobLimits:
    """What GetServerInfo reports about jobs (the store's part comes from the jobstore)."""

    max_bytes: int
    max_seconds: float
    max_attempts: int


def resume_point(state: ResumeState, session_id: str) -> speech_pb2.StreamResumePoint:
    return speech_pb2.StreamResumePoint(
        session_id=session_id,
        audio_offset_seconds=state.offset,
        final_end_seconds=state.final_end,
        context=state.context,
        next_utterance_index=state.utterance,
        in_speech=state.utterance_open,
        context_window_words=state.window_words,
    )


class _Replay:
    """A resumed compressed stream sent again from its first byte (resume_audio_from_start): the
    decoded samples before the resume offset are dropped, and the audio must reach the offset."""

    def __init__(self, skip: int) -> None:
        self.skip = skip  # 16 kHz samples still to drop
        self.offset = skip / SAMPLE_RATE

    def take(self, samples: Any) -> Any:
        if self.skip:
            dropped = min(self.skip, len(samples))
            self.skip -= dropped
            samples = samples[dropped:]
        return samples

    def check_complete(self) -> None:
        """At the end of the audio: a stream sent again that ended before the offset was not the
        same stream (or not from its first byte)."""
        if self.skip:
            raise InvalidInput(
                f"the audio sent again from the first byte ended {self.skip / SAMPLE_RATE:.2f}s before "
                f"resume_from.audio_offset_seconds ({self.offset:.2f}s): with resume_audio_from_start, "
                "send the same stream again, byte for byte, from its first byte",
                reason="BAD_RESUME_POINT",
                field="streaming_config.resume_audio_from_start",
            )


UTTERANCES_PER_SECOND = 100  # far more than VAD can end (each needs a pause): a bound, not an estimate


def resume_state(point: speech_pb2.StreamResumePoint, max_seconds: float) -> ResumeState:
    """A client's resume_from, checked (BAD_RESUME_POINT)."""

    def bad(message: str, name: str) -> InvalidInput:
        return InvalidInput(
            f"resume_from.{name} {message}; send back the latest resume_point unchanged",
            reason="BAD_RESUME_POINT",
            field=f"streaming_config.resume_from.{name}",
        )

    for name in ("audio_offset_seconds", "final_end_seconds"):
        value = getattr(point, name)
        if not math.isfinite(value) or value < 0:
            raise bad("must be a finite number, not negative", name)
    if point.audio_offset_seconds >= max_seconds:
        raise bad(f"is past the stream's maximum duration ({max_seconds:g}s)", "audio_offset_seconds")
    if len(point.context) > MAX_RESUME_CONTEXT_CHARS:
        raise bad(f"is longer than {MAX_RESUME_CONTEXT_CHARS} characters", "context")
    if len(point.session_id) > MAX_SESSION_ID_CHARS:
        raise bad(f"is longer than {MAX_SESSION_ID_CHARS} characters", "session_id")
    if point.next_utterance_index < 0:
        raise bad("must not be negative", "next_utterance_index")
    if point.next_utterance_index > max_seconds * UTTERANCES_PER_SECOND:
        raise bad(f"is more than a stream of {max_seconds:g}s can have", "next_utterance_index")
    if not 0 <= point.context_window_words <= len(point.context.split()):
        raise bad("must be between 0 and the number of words in context", "context_window_words")
    return ResumeState(
        offset=point.audio_offset_seconds,
        final_end=point.final_end_seconds,
        context=point.context,
        window_words=point.context_window_words,
        utterance=point.next_utterance_index,
        utterance_open=point.in_speech,
    )


def stream_response(
    ev: Event, session: StreamingSession, *, words: bool, session_id: str = ""
) -> speech_pb2.StreamingRecognizeResponse:
    response = speech_pb2.StreamingRecognizeResponse(
        total_billed_seconds=round(session.received_seconds, 3),
        resume_point=resume_point(session.resume_state(), session_id),
        final_result_timing=_TIMINGS[session.policy.finals],
    )
    if ev.type == EventType.PROGRESS:
        return response
    if ev.type != EventType.RESULT:
        response.speech_event_type = _EVENT_TYPES[ev.type]
        response.speech_event_offset_seconds = ev.offset
        return response
    seg = Segment(ev.start, ev.end, ev.text, ev.words)
    result = result_from_segment(
        seg,
        language=ev.language,
        words=words,
        is_final=ev.is_final,
        stability=ev.stability,
        utterance_index=ev.utterance,
        utterance_end=ev.utterance_end,
    )
    response.results.append(result)
    return response


@dataclass
class _IdleClock:
    last: float  # loop time of the last audio (or of the end of a wait that was ours)
    waiting: bool = True  # the reader waits for the client's next message


async def _watch_idle(clock: _IdleClock, session: StreamingSession, idle: float) -> None:
    """End the session with STREAM_IDLE once the client has sent no audio for `idle` seconds."""
    loop = asyncio.get_running_loop()
    while True:
        due = clock.last + idle - loop.time()
        if due <= 0 and clock.waiting:
            session.fail(
                DeadlineExceeded(
                    f"no audio for {idle:g}s: the stream is closed (send silence to keep a quiet "
                    "stream open, or half-close it when the audio ends)",
                    reason="STREAM_IDLE",
                    field="audio_content",
                )
            )
            return
        await asyncio.sleep(min(max(due, 0.1), idle))


def _decode_failed(done: asyncio.Future[None], session: StreamingSession) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        session.fail(exc)


def _propagate(task: asyncio.Task[bool], session: StreamingSession) -> None:
    """A reader failure (bad audio, a second config, ...) ends the session with that error."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        session.fail(exc)


def _encoding_values(names: tuple[str, ...]) -> list[common_pb2.AudioEncoding.ValueType]:
    return [common_pb2.AudioEncoding.Value(f"AUDIO_ENCODING_{n}") for n in names]


# A Recognize body is in memory about twice while a call runs: gRPC's receive buffer and the
# parsed message overlap before the handler takes its copy (measured: a 32 MiB call peaks ~7x its
# size without the bound's accounting; see tests/test_memory_bound.py).
BODY_COPIES = 2


def decode_estimate(size: int, encoding: str, sample_rate: int, channels: int, max_seconds: float) -> int:
    """Bytes decoding `size` bytes of audio may need (16 kHz 16-bit samples kept, plus one decoded
    float32 block and the planner's VAD block), bounded by the duration limit."""
    per_second = 16000 * 2
    if encoding == "LINEAR16" and sample_rate > 0:
        seconds = size / (2 * max(channels, 1) * sample_rate)
    else:
        seconds = size / 1000.0  # >= 8 kbit/s: every format we accept
    return int(min(seconds, max_seconds) * per_second) + PLANNER_BYTES


PLANNER_BYTES = 16000 * 4 * 100
# Bodies up to this size are decoded, then recognized (short clips: nothing to overlap); larger ones
# are recognized while they decode.
SMALL_BODY = 1 << 20  # the streaming planner's VAD block and pending window (float32)


class SpeechAPI:
    def __init__(
        self,
        settings: GatewaySettings,
        pool: TranscriberPool,
        decode_slots: asyncio.Semaphore,
        quotas: Quotas | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.decode_slots = decode_slots
        self.quotas = quotas or Quotas(TenantQuota())
        self.budget = budget or ByteBudget(0)
        self.limits = audio_mod.Limits(settings.max_recognize_bytes, settings.max_recognize_seconds)
        self.vad = settings.vad()
        # Set when the gateway starts draining: resumable (gRPC) streams end with DRAINING.
        self.draining = asyncio.Event()
        self.admission = StreamAdmission(
            pool.serving_replicas,
            target_tick=settings.stream_target_tick_seconds,
            initial=settings.stream_capacity_initial,
            fixed=settings.stream_capacity,
            share=settings.stream_capacity_share,
        )

    @property
    def live_streams(self) -> int:
        """This gateway's open streams, the ones admission let in (STREAMS counts the process's)."""
        return self.admission.active

    async def drain(self) -> None:
        """SIGTERM: end every resumable live stream now with UNAVAILABLE (DRAINING), so its client
        resumes it on another gateway rather than being cut when the grace expires."""
        self.draining.set()

    def caps(self) -> ModelCaps | None:
        return self.pool.caps()

    # -- Recognize ---------------------------------------------------------------------------------

    async def recognize(self, request: speech_pb2.RecognizeRequest) -> speech_pb2.RecognizeResponse:
        """Admission (read-only keys, rate), validation, the tenant's concurrency quota and the
        gateway's in-flight bytes, then decoding and recognition."""
        started = time.perf_counter()
        caller = require_write(current_caller())
        self.quotas.admit(caller)
        # One copy of the audio: protobuf hands out a new bytes object on every access, so take
        # it once and drop the message's own.
        content = request.content
        request.ClearField("content")
        size = len(content)
        audit().audio_bytes += size
        cfg = validate_config(request.config, prefix="config.", caps=self.caps())
        audio_mod.check_size(size, self.limits)
        async with self.quotas.slot(caller, "concurrent_recognize"):
            held = inflight_var.get()  # the gRPC door reserved before reading the body
            reservation = held or await self.budget.reserve(size * BODY_COPIES)
            try:
                result = await self._recognize(content, cfg, reservation)
            finally:
                if held is None:
                    reservation.release()
        return self._response(result, cfg, started)

    async def _recognize(self, content: bytes, cfg: ValidConfig, reservation: Reservation) -> Any:
        """Decoded once, while recognition runs: windows go to the pool as soon as they are planned.
        At most max_concurrent_decodes calls decode at once (and hold a decoding estimate beyond the
        budget); the slot is given back when the decoding ends."""
        size = len(content)
        await self.decode_slots.acquire()
        slot = [True]

        def decoded(store: SampleStore) -> None:
            reservation.resize(size + store.nbytes)
            if slot[0]:
                slot[0] = False
                self.decode_slots.release()

        def blocks() -> Iterator[np.ndarray]:
            return audio_mod.iter_source(
                content,
                limits=self.limits,
                encoding=cfg.encoding,
                sample_rate=cfg.sample_rate,
                channels=cfg.channels,
            )

        try:
            reservation.resize(
                size * BODY_COPIES
                + decode_estimate(size, cfg.encoding, cfg.sample_rate, cfg.channels, self.limits.max_seconds)
            )
            if size <= SMALL_BODY:
                # Short clips (the interactive case): decode, then recognize; no pipeline to set up.
                whole = await asyncio.to_thread(
                    audio_mod.decode,
                    content,
                    limits=self.limits,
                    encoding=cfg.encoding,
                    sample_rate=cfg.sample_rate,
                    channels=cfg.channels,
                )
                reservation.resize(size + whole.samples.nbytes)
                if slot[0]:
                    slot[0] = False
                    self.decode_slots.release()
                return await recognize(
                    whole.samples,
                    self.pool.transcribe,
                    cfg.options,
                    vad=self.vad,
                    max_parallel=self.settings.max_parallel_windows,
                )
            return await recognize_blocks(
                blocks,
                self.pool.transcribe,
                cfg.options,
                vad=self.vad,
                max_parallel=self.settings.max_parallel_windows,
                on_decoded=decoded,
                group=self.pool.batch_capacity,
                replicas=lambda: self.pool.serving_count,
            )
        finally:
            if slot[0]:
                self.decode_slots.release()

    def _response(self, result: Any, cfg: ValidConfig, started: float) -> speech_pb2.RecognizeResponse:
        tracing.set_attributes(
            {"stt.audio_seconds": round(result.duration, 3), "stt.windows": len(result.windows)}
        )
        return speech_pb2.RecognizeResponse(
            results=[
                result_from_segment(s, language=result.language, words=cfg.word_timestamps, utterance_index=i)
                for i, s in enumerate(result.segments)
            ],
            transcript=join_text(result.segments),
            language_code=result.language or self._only_language(),
            metadata=speech_pb2.RecognitionMetadata(
                audio_duration_seconds=round(result.duration, 3),
                processing_seconds=round(time.perf_counter() - started, 3),
                window_count=len(result.windows),
                model=result.model or self._model_name(),
                request_id=request_id_var.get(),
            ),
        )

    def _model_name(self) -> str:
        caps = self.caps()
        return caps.name if caps else ""

    def _only_language(self) -> str:
        """The language of a model that has one (English-only models), for a call that found no
        speech before the model said; "" for a multilingual model."""
        caps = self.caps()
        return (
            next(iter(caps.languages)) if caps and not caps.multilingual and len(caps.languages) == 1 else ""
        )

    # -- StreamingRecognize ------------------------------------------------------------------------

    async def stream(
        self,
        requests: AsyncIterator[speech_pb2.StreamingRecognizeRequest],
        *,
        resumable: bool = False,
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        """One live stream. `resumable`: the door's clients resume broken streams (gRPC), so a
        draining gateway ends the stream with DRAINING at once instead of finishing it."""
        caller = require_write(current_caller())
        self.quotas.admit(caller)
        if resumable and self.draining.is_set():
            raise Unavailable("this gateway is shutting down; reconnect", reason="DRAINING")
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
            # arrives as the awaited message does (a WebSocket client's second config right after the
            # first: the cancelled session went on until its idle timer, 30 s).
            async with asyncio.timeout(self.settings.stream_config_timeout_seconds):
                first = await anext(aiter(requests), None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no streaming_config within {self.settings.stream_config_timeout_seconds:g}s",
                reason="STREAM_IDLE",
                field="streaming_config",
            ) from None
        if first is None:
            raise InvalidInput(
                "the stream ended before its streaming_config",
                reason="MISSING_CONFIG",
                field="streaming_config",
            )
        if not first.HasField("streaming_config"):
            raise InvalidInput(
                "the first message must carry streaming_config; audio_content may only follow it",
                reason="MISSING_CONFIG",
                field="streaming_config",
            )
        cfg = first.streaming_config
        observer = StreamObserver()
        session, decoder, max_seconds, session_id, replay = self._open_stream(cfg, observer)
        try:
            async with self.quotas.slot(caller, "concurrent_streams"):
                with self.admission.admit():  # refused here if the transcribers are at capacity
                    async for response in self._run_stream(
                        requests, cfg, session, decoder, replay, max_seconds, observer, session_id, resumable
                    ):
                        yield response
        finally:
            decoder.close()

    async def _run_stream(
        self,
        requests: AsyncIterator[speech_pb2.StreamingRecognizeRequest],
        cfg: speech_pb2.StreamingRecognitionConfig,
        session: StreamingSession,
        decoder: StreamDecoder,
        replay: _Replay,
        max_seconds: float,
        observer: StreamObserver,
        session_id: str,
        resumable: bool,
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        words = cfg.config.enable_word_time_offsets
        STREAMS.inc()
        reader = asyncio.create_task(self._read_stream(requests, session, decoder, replay, max_seconds))
        reader.add_done_callback(lambda t: _propagate(t, session))
        # A decoding error ends the stream at once, not with the client's next message.
        decoder.done.add_done_callback(lambda f: _decode_failed(f, session))
        drain = asyncio.create_task(self._drain_stream(session)) if resumable else None
        sent_offset = -1.0
        billed = 0.0
        try:
            if cfg.resume_audio_from_start:
                # At once: a client learns that this server skips the audio before the offset (a
                # server that predates the field would transcribe it again).
                response = stream_response(
                    Event(EventType.PROGRESS), session, words=words, session_id=session_id
                )
                response.resume_audio_from_start_accepted = True
                sent_offset = response.resume_point.audio_offset_seconds
                billed = response.total_billed_seconds
                yield response
            async for ev in session.events():
                if ev.type == EventType.PROGRESS:
                    offset = session.resume_state().offset
                    if offset - sent_offset < PROGRESS_EVERY_SECONDS:
                        continue
                if ev.is_final and ev.words:
                    observer.final(ev.words, ev.start, ev.end)
                response = stream_response(ev, session, words=words, session_id=session_id)
                sent_offset = response.resume_point.audio_offset_seconds
                billed = response.total_billed_seconds
                yield response
            if not cfg.single_utterance and round(session.received_seconds, 3) > billed:
                # Audio after the last result (silence): the last response carries the whole stream.
                # (A single utterance ends with its END_OF_SINGLE_UTTERANCE event; later audio is
                # ignored.)
                yield stream_response(Event(EventType.PROGRESS), session, words=words, session_id=session_id)
            if reader.done() and not reader.cancelled() and reader.result():
                raise LimitExceeded(
                    f"the stream reached its maximum duration of {max_seconds:.0f}s",
                    reason="STREAM_TOO_LONG",
                    field="streaming_config.max_stream_seconds",
                )
        finally:
            STREAMS.dec()
            observer.closed()
            reader.cancel()
            if drain is not None:
                drain.cancel()
            decoder.close()
            await asyncio.gather(reader, *([drain] if drain else []), return_exceptions=True)

    async def _drain_stream(self, session: StreamingSession) -> None:
        await self.draining.wait()
        session.fail(
            Unavailable(
                "this gateway is shutting down: resume the stream on another connection "
                "(streaming_config.resume_from = the latest resume_point)",
                reason="DRAINING",
            )
        )

    def _open_stream(
        self, cfg: speech_pb2.StreamingRecognitionConfig, observer: StreamObserver
    ) -> tuple[StreamingSession, StreamDecoder, float, str, _Replay]:
        if not cfg.HasField("config"):
            raise InvalidInput(
                "streaming_config.config is required (at least its encoding)",
                reason="MISSING_FIELD",
                field="streaming_config.config",
            )
        valid = validate_config(
            cfg.config, prefix="streaming_config.config.", caps=self.caps(), streaming=True
        )
        if not math.isfinite(cfg.max_stream_seconds) or cfg.max_stream_seconds < 0:
            raise InvalidInput(
                "max_stream_seconds must be a finite number, not negative (0: the server maximum)",
                reason="BAD_CONFIG_VALUE",
                field="streaming_config.max_stream_seconds",
            )
        max_seconds = min(
            cfg.max_stream_seconds or self.settings.max_stream_seconds, self.settings.max_stream_seconds
        )
        resume = resume_state(cfg.resume_from, max_seconds) if cfg.HasField("resume_from") else None
        session_id = (resume and cfg.resume_from.session_id) or uuid.uuid4().hex
        offset = resume.offset if resume else 0.0
        if cfg.resume_audio_from_start and resume is None:
            raise InvalidInput(
                "resume_audio_from_start is only for a resumed stream (set resume_from)",
                reason="BAD_CONFIG_VALUE",
                field="streaming_config.resume_audio_from_start",
            )
        # Audio sent again from the stream's first byte: the samples before the offset are dropped.
        replay = _Replay(round(offset * SAMPLE_RATE) if cfg.resume_audio_from_start else 0)
        finals = self._final_results(cfg.final_result_timing)
        observer.received_seconds = offset
        options = valid.options
        if not options.beam_size:
            options.beam_size = self.settings.stream_beam_size
        s = self.settings
        at_end = finals == "utterance_end"
        context = s.stream_utterance_end_final_context_seconds if at_end else s.stream_final_context_seconds
        session = StreamingSession(
            observer.transcribe(self._live_transcribe),
            options,
            StreamPolicy(
                step=s.stream_step_seconds,
                max_window=s.stream_max_window_seconds,
                endpoint_silence=s.stream_endpoint_silence_seconds,
                max_buffer=s.stream_max_buffer_seconds,
                agreement=s.stream_agreement,
                hold=s.stream_hold_seconds,
                settle=s.stream_settle_seconds,
                interim_beam=s.stream_interim_beam_size,
                trim=s.stream_trim,
                final_context=context,
                final_prefix=at_end,
                # Finals at utterance ends come from final passes: their hypotheses are interims only.
                hypothesis_context=0.0 if at_end else s.stream_hypothesis_context_seconds,
                commit_window=s.stream_commit_window_seconds,
                commit_probability=s.stream_commit_probability,
                finals=finals,
            ),
            interim=cfg.interim_results,
            single_utterance=cfg.single_utterance,
            resume=resume,
            hypothesis=self.hypothesis,
            final_pass=lambda: self.final_pass(options.beam_size, context),
            agreement_for=self.agreement,
        )

        def sink(samples: Any) -> None:
            samples = replay.take(samples)
            if not len(samples):
                return  # still before the offset: nothing arrived for the session
            try:
                session.add_audio(samples)
                observer.arrived(session.received_seconds)
            except ServiceError as exc:
                session.fail(exc)

        # This part's audio: what is left of the stream's duration (and a margin: the reader ends
        # the stream at max_seconds; the decoder refuses audio well past it), in bytes as well.
        seconds = max_seconds - (0.0 if cfg.resume_audio_from_start else offset) + 60.0
        per_second = (
            valid.sample_rate * max(valid.channels, 1) * 2
            if valid.encoding == "LINEAR16"
            else COMPRESSED_BYTES_PER_SECOND
        )
        limits = audio_mod.Limits(int(seconds * per_second) + (1 << 20), seconds)
        decoder = make_decoder(
            valid.encoding, valid.sample_rate, valid.channels, limits, sink, asyncio.get_running_loop()
        )
        return session, decoder, max_seconds, session_id, replay

    def _final_results(self, timing: int) -> str:
        """The session's policy.finals for a stream's final_result_timing (_TIMINGS read backwards)."""
        if timing == speech_pb2.FINAL_RESULT_TIMING_UNSPECIFIED:
            return "utterance_end" if self.settings.stream_final_results == "utterance_end" else "agreement"
        for finals, known in _TIMINGS.items():
            if timing == known:
                return finals
        names = ", ".join(speech_pb2.FinalResultTiming.Name(t) for t in _TIMINGS.values())
        raise InvalidInput(
            f"final_result_timing {timing} is not one this server knows ({names})",
            reason="BAD_CONFIG_VALUE",
            field="streaming_config.final_result_timing",
        )

    def _load_at_most(self, streams_per_transcriber: int) -> bool:
        """At most this many live streams per serving transcriber on this gateway (gateways that
        share transcribers count their share, as admission does)."""
        s = self.settings
        return (
            self.admission.active
            <= streams_per_transcriber * self.pool.serving_count * s.stream_capacity_share
        )

    def _light_load(self) -> bool:
        return self._load_at_most(self.settings.stream_light_load_streams)

    def agreement(self) -> int:
        """Hypotheses that must agree on a live word: stream_agreement, but above
        stream_heavy_load_streams per transcriber stream_loaded_agreement (each hypothesis of a
        loaded tick comes late; waiting for a second one to agree doubles how late a word is final)."""
        s = self.settings
        if s.stream_heavy_load_streams <= 0 or self._load_at_most(s.stream_heavy_load_streams):
            return s.stream_agreement
        return min(max(s.stream_loaded_agreement, 1), s.stream_agreement)

    def hypothesis(self) -> tuple[int, float]:
        """(beam, left context seconds) of a live hypothesis: at light load
        stream_light_load_beam_size (if set) and, with at most stream_hypothesis_context_streams
        streams per transcriber, stream_hypothesis_context_seconds, else
        stream_interim_beam_size (greedy) and no left context: a wider beam makes fewer confident
        wrong guesses and the speech before the window decides its first words better, but under
        load every stream's hypothesis shares one batched call per tick and both would lengthen it."""
        s = self.settings
        if not self._light_load():
            return s.stream_interim_beam_size, 0.0
        beam = (
            s.stream_light_load_beam_size if s.stream_light_load_beam_size > 0 else s.stream_interim_beam_size
        )
        context = s.stream_hypothesis_context_seconds
        return beam, context if self._load_at_most(s.stream_hypothesis_context_streams) else 0.0

    def final_pass(self, beam: int, context: float) -> tuple[int, float]:
        """(beam, left context seconds) of an utterance's final pass: the stream's beam and left
        context at light load; under load at most stream_loaded_final_beam_size and
        stream_loaded_final_context_seconds (each negative: as at light load), so that the finals of
        many streams do not hold up every stream's next hypothesis."""
        s = self.settings
        if self._light_load():
            return beam, context
        if s.stream_loaded_final_beam_size > 0:
            beam = min(beam or s.stream_loaded_final_beam_size, s.stream_loaded_final_beam_size)
        if s.stream_loaded_final_context_seconds >= 0:
            context = min(context, s.stream_loaded_final_context_seconds)
        return beam, context

    async def _live_transcribe(self, audio: Any, options: Any, work_class: Any) -> Any:
        result = await self.pool.transcribe(audio, options, work_class)
        if self._learns_cost(options):
            self.admission.observe(result)
        return result

    def _learns_cost(self, options: Any) -> bool:
        """Whether admission learns the transcriber's cost from this live window: only from windows
        as every stream's are under load (greedy hypotheses and finals, the live window's shorter
        encoder context, no prefix), since capacity is what fits in a tick then. Light-load windows
        (beam 3, left context, beam-5 finals) cost several times more, and fitted beside the loaded
        ones they made the estimate swing: with a lone stream's prefixed hypotheses counted, 2
        streams (the bench's 4-stream level refused 2); with all but those counted, 3 (4 streams had
        been served with final-word p95 1.5 s). Until loaded windows are measured, a transcriber
        counts for stream_capacity_initial streams."""
        s = self.settings
        greedy = max(s.stream_interim_beam_size, s.stream_loaded_final_beam_size, 1)
        return options.beam_size <= greedy and not options.prefix and options.dynamic_context

    async def _read_stream(
        self,
        requests: AsyncIterator[speech_pb2.StreamingRecognizeRequest],
        session: StreamingSession,
        decoder: StreamDecoder,
        replay: _Replay,
        max_seconds: float,
    ) -> bool:
        """Feed audio to the decoder; True if the stream hit its maximum duration. A stream that
        sends no audio for stream_idle_seconds ends with DEADLINE_EXCEEDED (STREAM_IDLE)."""
        high_water = session.policy.max_buffer / 2
        idle = self.settings.stream_idle_seconds
        loop = asyncio.get_running_loop()
        clock = _IdleClock(loop.time())
        # A watchdog rather than a timeout on each read: cancelling a pending read of the request
        # stream from a nested task can leave the call's handler waiting for it.
        watch = asyncio.create_task(_watch_idle(clock, session, idle))
        try:
            async for req in requests:
                clock.waiting = False
                if req.HasField("streaming_config"):
                    raise InvalidInput(
                        "streaming_config may only be sent once, in the first message",
                        reason="DUPLICATE_CONFIG",
                        field="streaming_config",
                    )
                if req.audio_content:
                    audit().audio_bytes += len(req.audio_content)
                    decoder.feed(req.audio_content)
                    # The decoder holds a bounded amount of undecoded bytes: wait for room.
                    await decoder.room()
                if session.received_seconds >= max_seconds:
                    decoder.finish()
                    await decoder.done
                    session.end_audio()
                    return True
                # Back-pressure: stop reading (the client's writes block) while the backlog is high.
                while session.backlog_seconds > high_water:
                    await session.progressed()
                # Time spent not reading (back-pressure, a full decoder) is not the client's idleness.
                if req.audio_content:
                    clock.last = loop.time()
                clock.waiting = True
        finally:
            watch.cancel()
        decoder.finish()
        await decoder.done
        replay.check_complete()
        session.end_audio()
        return False

    # -- GetServerInfo -------------------------------------------------------------------------------

    def server_info(
        self,
        *,
        jobs: JobLimits,
        result_ttl: float,
        failed_ttl: float,
        max_message_bytes: int,
        queued_jobs: int = 0,
        stored_audio_bytes: int = 0,
    ) -> speech_pb2.ServerInfo:
        s = self.settings
        caps = self.caps()
        caller = current_caller()
        self.quotas.admit(caller)
        return speech_pb2.ServerInfo(
            version=VERSION,
            model=speech_pb2.ModelInfo(
                name=caps.name if caps else "",
                multilingual=bool(caps and caps.multilingual),
                language_codes=sorted(caps.languages) if caps else [],
                serving_replicas=self.pool.serving_count,
            ),
            limits=speech_pb2.ServerLimits(
                max_recognize_bytes=s.max_recognize_bytes,
                max_recognize_seconds=s.max_recognize_seconds,
                max_job_bytes=jobs.max_bytes,
                max_job_seconds=jobs.max_seconds,
                max_message_bytes=max_message_bytes,
                max_stream_seconds=s.max_stream_seconds,
                stream_idle_timeout_seconds=s.stream_idle_seconds,
                stream_config_timeout_seconds=s.stream_config_timeout_seconds,
                max_stream_backlog_seconds=s.stream_max_buffer_seconds,
                max_stream_message_bytes=max_message_bytes,
                max_beam_size=MAX_BEAM_SIZE,
                max_prompt_chars=MAX_PROMPT_CHARS,
                max_request_id_chars=MAX_REQUEST_ID_CHARS,
                default_page_size=DEFAULT_PAGE_SIZE,
                max_page_size=MAX_PAGE_SIZE,
                max_job_attempts=jobs.max_attempts,
                result_ttl_seconds=result_ttl,
                failed_ttl_seconds=failed_ttl,
                max_inflight_bytes=s.max_inflight_bytes,
                max_concurrent_streams_per_connection=s.max_concurrent_streams,
                live_stream_capacity=self.admission.capacity(),
            ),
            features=speech_pb2.ServerFeatures(
                recognize_encodings=_encoding_values(RECOGNIZE_ENCODINGS),
                streaming_encodings=_encoding_values(STREAMING_ENCODINGS),
                transcript_formats=[
                    common_pb2.TRANSCRIPT_FORMAT_TEXT,
                    common_pb2.TRANSCRIPT_FORMAT_JSON,
                    common_pb2.TRANSCRIPT_FORMAT_SRT,
                    common_pb2.TRANSCRIPT_FORMAT_VTT,
                ],
                stream_resumption=True,
                job_retry=True,
                final_result_timing=True,
            ),
            caller=speech_pb2.CallerInfo(
                tenant=caller.tenant,
                key_id=caller.key_id,
                read_only=caller.read_only,
                quotas=self.quotas.usage(caller.tenant, queued=queued_jobs, stored=stored_audio_bytes),
                max_priority=self.quotas.of(caller.tenant).max_priority,  # type: ignore[arg-type]
            ),
        )

"""stt.v1.Speech: thin mapping from RPCs to decoding and recognition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import Gauge

from services.gateway import audio as audio_mod
from services.gateway.config import GatewaySettings
from services.gateway.pool import TranscriberPool
from services.gateway.recognize import recognize
from services.gateway.requests import decode_options, encoding_name, result_from_segment, validate_language
from services.gateway.stream_decoder import StreamDecoder, make_decoder
from services.gateway.streaming import Event, EventType, StreamingSession, StreamPolicy
from services.shared.context import request_id_var
from services.shared.domain import Segment, join_text
from services.shared.errors import InvalidInput, LimitExceeded, ServiceError
from stt.v1 import speech_pb2, speech_pb2_grpc

STREAMS = Gauge("stt_gateway_streams", "Live StreamingRecognize sessions")
_EVENT_TYPES = {
    EventType.SPEECH_BEGIN: speech_pb2.SPEECH_ACTIVITY_BEGIN,
    EventType.SPEECH_END: speech_pb2.SPEECH_ACTIVITY_END,
    EventType.END_OF_SINGLE_UTTERANCE: speech_pb2.END_OF_SINGLE_UTTERANCE,
}


def _propagate(task: asyncio.Task[bool], session: StreamingSession) -> None:
    """A reader failure (bad audio, a second config, ...) ends the session with that error."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        session.fail(exc)


def stream_response(
    ev: Event, session: StreamingSession, *, words: bool
) -> speech_pb2.StreamingRecognizeResponse:
    billed = round(session.received_seconds, 3)
    if ev.type != EventType.RESULT:
        return speech_pb2.StreamingRecognizeResponse(
            speech_event_type=_EVENT_TYPES[ev.type],
            speech_event_offset_seconds=ev.offset,
            total_billed_seconds=billed,
        )
    seg = Segment(ev.start, ev.end, ev.text, ev.words)
    result = result_from_segment(
        seg, language=ev.language, words=words, is_final=ev.is_final, stability=ev.stability
    )
    return speech_pb2.StreamingRecognizeResponse(results=[result], total_billed_seconds=billed)


class SpeechServicer(speech_pb2_grpc.SpeechServicer):
    def __init__(
        self, settings: GatewaySettings, pool: TranscriberPool, decode_slots: asyncio.Semaphore
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.decode_slots = decode_slots
        self.limits = audio_mod.Limits(settings.max_recognize_bytes, settings.max_recognize_seconds)
        self.vad = settings.vad()

    async def Recognize(
        self, request: speech_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.RecognizeResponse:
        started = time.perf_counter()
        cfg = request.config
        options = decode_options(cfg)
        async with self.decode_slots:
            decoded = await asyncio.to_thread(
                audio_mod.decode,
                request.content,
                limits=self.limits,
                encoding=encoding_name(cfg),
                sample_rate=cfg.sample_rate_hz,
                channels=cfg.audio_channel_count,
            )
        result = await recognize(
            decoded.samples,
            self.pool.transcribe,
            options,
            vad=self.vad,
            max_parallel=self.settings.max_parallel_windows,
        )
        words = cfg.enable_word_time_offsets
        return speech_pb2.RecognizeResponse(
            results=[result_from_segment(s, language=result.language, words=words) for s in result.segments],
            transcript=join_text(result.segments),
            language_code=result.language,
            metadata=speech_pb2.RecognitionMetadata(
                audio_duration_seconds=round(result.duration, 3),
                processing_seconds=round(time.perf_counter() - started, 3),
                window_count=len(result.windows),
                request_id=request_id_var.get(),
            ),
        )

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[speech_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidInput("the stream ended before its streaming_config", field="streaming_config")
        if not first.HasField("streaming_config"):
            raise InvalidInput(
                "the first message must carry streaming_config; audio_content may only follow it",
                reason="MISSING_CONFIG",
                field="streaming_config",
            )
        cfg = first.streaming_config
        session, decoder, max_seconds = self._open_stream(cfg)
        words = cfg.config.enable_word_time_offsets
        STREAMS.inc()
        reader = asyncio.create_task(self._read_stream(request_iterator, session, decoder, max_seconds))
        reader.add_done_callback(lambda t: _propagate(t, session))
        try:
            async for ev in session.events():
                yield stream_response(ev, session, words=words)
            if reader.done() and not reader.cancelled() and reader.result():
                raise LimitExceeded(
                    f"the stream reached its maximum duration of {max_seconds:.0f}s",
                    reason="STREAM_TOO_LONG",
                    field="streaming_config.max_stream_seconds",
                )
        finally:
            STREAMS.dec()
            reader.cancel()
            decoder.close()
            await asyncio.gather(reader, return_exceptions=True)

    def _open_stream(
        self, cfg: speech_pb2.StreamingRecognitionConfig
    ) -> tuple[StreamingSession, StreamDecoder, float]:
        encoding = encoding_name(cfg.config)
        if cfg.max_stream_seconds < 0:
            raise InvalidInput(
                "max_stream_seconds must not be negative", field="streaming_config.max_stream_seconds"
            )
        max_seconds = min(
            cfg.max_stream_seconds or self.settings.max_stream_seconds, self.settings.max_stream_seconds
        )
        options = decode_options(cfg.config)
        validate_language(options.language, "streaming_config.config.language_code")
        if not options.beam_size:
            options.beam_size = self.settings.stream_beam_size
        s = self.settings
        session = StreamingSession(
            self.pool.transcribe,
            options,
            StreamPolicy(
                step=s.stream_step_seconds,
                max_window=s.stream_max_window_seconds,
                endpoint_silence=s.stream_endpoint_silence_seconds,
                max_buffer=s.stream_max_buffer_seconds,
                agreement=s.stream_agreement,
                hold=s.stream_hold_seconds,
                settle=s.stream_settle_seconds,
            ),
            interim=cfg.interim_results,
            single_utterance=cfg.single_utterance,
        )

        def sink(samples: Any) -> None:
            try:
                session.add_audio(samples)
            except ServiceError as exc:
                session.fail(exc)

        limits = audio_mod.Limits(1 << 62, max_seconds + 60.0)
        decoder = make_decoder(
            encoding,
            cfg.config.sample_rate_hz,
            cfg.config.audio_channel_count,
            limits,
            sink,
            asyncio.get_running_loop(),
        )
        return session, decoder, max_seconds

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[speech_pb2.StreamingRecognizeRequest],
        session: StreamingSession,
        decoder: StreamDecoder,
        max_seconds: float,
    ) -> bool:
        """Feed audio to the decoder; True if the stream hit its maximum duration."""
        high_water = session.policy.max_buffer / 2
        async for req in request_iterator:
            if req.HasField("streaming_config"):
                raise InvalidInput(
                    "streaming_config may only be sent once, in the first message",
                    reason="DUPLICATE_CONFIG",
                    field="streaming_config",
                )
            if req.audio_content:
                decoder.feed(req.audio_content)
            if session.received_seconds >= max_seconds:
                decoder.finish()
                await decoder.done
                session.end_audio()
                return True
            # Back-pressure: stop reading (the client's writes block) while the backlog is high.
            while session.backlog_seconds > high_water:
                await session.progressed()
        decoder.finish()
        await decoder.done
        session.end_audio()
        return False

"""stt.v1.Speech: thin mapping from RPCs to decoding and recognition."""

from __future__ import annotations

import asyncio
import time

import grpc

from services.gateway import audio as audio_mod
from services.gateway.config import GatewaySettings
from services.gateway.pool import TranscriberPool
from services.gateway.recognize import recognize
from services.gateway.requests import decode_options, encoding_name, result_from_segment
from services.shared.context import request_id_var
from services.shared.domain import join_text
from stt.v1 import speech_pb2, speech_pb2_grpc


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
        audio_mod.check_size(len(request.content), self.limits)
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

    async def StreamingRecognize(self, request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StreamingRecognize is not implemented yet")
        yield speech_pb2.StreamingRecognizeResponse()  # pragma: no cover
